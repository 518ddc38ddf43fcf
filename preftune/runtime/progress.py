"""What a run prints while it trains: a summary at the start, then its progress.

On a terminal the progress is a live bar with the latest metrics; when stdout is not a terminal (a
log file, a pipe, a job scheduler) it is one plain line per logging step instead, each complete:
``step 20/100  loss=0.6812  rewards/accuracies=0.625 ...``. Only the main process prints.
"""

from __future__ import annotations

import sys
from dataclasses import fields, is_dataclass

BAR = ["loss", "rewards/accuracies", "rewards/margins", "accuracy", "objective/scores", "objective/kl", "pairs/s",
       "samples/s"]   # the live bar has room for a few
SHOWN = ["loss", "rewards/accuracies", "rewards/margins", "accuracy", "objective/scores", "objective/kl", "kl",
         "reward", "learning_rate", "grad_norm", "pairs/s", "samples/s", "examples/s", "tokens/s"]
REFERENCES = {"model": "a frozen copy of the starting model", "adapter": "the policy with its LoRA adapters disabled",
              "precomputed": "log-probs computed once before training (cached)", "none": "none (a reference-free loss)"}


def status_line(metrics: dict[str, float], shown: list[str] = SHOWN) -> str:
    return "  ".join(f"{key}={metrics[key]:.4g}" for key in shown if key in metrics)


def example_tokens(example) -> int:
    """Tokens of one training example: the lengths of its ``*_ids`` lists but ``position_ids`` (0 when none)."""
    if is_dataclass(example):
        values = [getattr(example, f.name) for f in fields(example)
                  if f.name.endswith("_ids") and f.name != "position_ids"]
    elif isinstance(example, dict):
        values = [v for k, v in example.items() if k.endswith("_ids") and k != "position_ids"]
    else:
        values = []
    return sum(len(v) for v in values if isinstance(v, (list, tuple)))


def data_line(records, report) -> str:
    """What was read from one data source: rows, format, kept and skipped (with why)."""
    from ..data import detect_format
    from ..errors import PreftuneError

    rows = records.rows
    if rows and "chosen" in rows[0]:
        try:
            form = detect_format(records).replace("_", " ") + " preference pairs"
        except PreftuneError:
            form = "mixed"
    else:
        messages = any(isinstance(v, list) and v and isinstance(v[0], dict) for v in (rows[0] if rows else {}).values())
        form = "conversational" if messages else "standard"
    skipped = report.total - report.kept
    reasons = ", ".join(f"{n} {kind}" for kind, n in sorted(report.skipped.items()))
    return (f"data: {records.name}: {report.total} rows ({form}); {report.kept} kept, {skipped} skipped"
            + (f" ({reasons})" if reasons else ""))


def run_summary(trainer, unit: str) -> list[str]:
    """The lines a run starts with: examples, steps, tokens, precision, reference (where there is one)."""
    s = trainer.s
    train, held = len(trainer.train_examples), len(trainer.eval_examples)
    lines = [f"examples: {train} training {unit}" + (f", {held} held out" if held else "")]
    tokens = sum(example_tokens(e) for e in trainer.train_examples)
    if tokens:
        lines[0] += f"; {tokens:,} tokens in the training {unit}"
    epochs = _count(trainer.total_steps / trainer.steps_per_epoch, "epoch")
    lines.append(f"steps: {trainer.total_steps} ({epochs} of {_count(trainer.steps_per_epoch, 'step')}), "
                 f"per device batch {s.per_device_batch_size} x {trainer.world} processes x "
                 f"{s.gradient_accumulation_steps} accumulation; learning rate {s.learning_rate:g} ({s.lr_scheduler})")
    lines.append(f"precision: {precision_words(trainer)}")
    reference = getattr(getattr(trainer.task, "reference", None), "kind", None)
    if reference is not None:
        lines.append(f"reference: {REFERENCES.get(reference, reference)}")
    if trainer.resumed_from is not None:
        lines.append(f"resumed from step {trainer.global_step} of {trainer.total_steps} ({trainer.resumed_from})")
    return lines


def _count(number: float, noun: str) -> str:
    return f"{number:.3g} {noun}" + ("" if number == 1 else "s")


def precision_words(trainer) -> str:
    import torch

    dtypes = {p.dtype for p in trainer.model.parameters() if p.requires_grad}
    weights = ", ".join(sorted(str(d).removeprefix("torch.") for d in dtypes)) or "none trainable"
    mixed = str(trainer.acc.mixed_precision)
    compute = f"{mixed} autocast" if mixed not in ("no", "None") else "no autocast"
    trained = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in trainer.model.parameters())
    device = trainer.acc.device.type if isinstance(trainer.acc.device, torch.device) else trainer.acc.device
    return (f"trainable weights in {weights}, {compute}, on {device}; {trained:,} of {total:,} parameters trained "
            f"({100 * trained / max(total, 1):.3g}%)")


class Display:
    """The run's progress: a live bar on a terminal, else one plain line per logging step."""

    def __init__(self, enabled: bool, total: int, done: int, plain: bool | None = None):
        self.enabled = enabled
        self.total = total
        self.plain = (not sys.stdout.isatty()) if plain is None else plain
        self.progress = None
        if enabled and not self.plain:
            from rich import progress as rp

            self.progress = rp.Progress(rp.TextColumn("[bold]{task.description}"), rp.BarColumn(),
                                        rp.MofNCompleteColumn(), rp.TimeElapsedColumn(), rp.TimeRemainingColumn(),
                                        rp.TextColumn("{task.fields[status]}"))
            self.bar = self.progress.add_task("training", total=total, completed=done, status="")

    def __enter__(self) -> "Display":
        if self.progress is not None:
            self.progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.progress is not None:
            self.progress.__exit__(*exc)

    def say(self, lines: list[str]) -> None:
        if self.enabled:
            text = "\n".join(lines)
            if self.progress is not None:
                self.progress.console.print(text, highlight=False, markup=False)
            else:
                print(text, flush=True)

    def logged(self, step: int, metrics: dict[str, float]) -> None:
        if self.progress is not None:
            self.progress.update(self.bar, status=status_line(metrics, BAR))
        elif self.enabled:
            print(f"step {step}/{self.total}  {status_line(metrics)}", flush=True)

    def advance(self) -> None:
        if self.progress is not None:
            self.progress.update(self.bar, advance=1)
