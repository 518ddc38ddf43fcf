"""A run's life outside the loop: its accelerator and precision, its directory (never silently mixed
with an earlier run's files), its final model (written atomically) and its ``summary.json``."""

from __future__ import annotations

import dataclasses
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..errors import ConfigError
from ..speed.allocator import restore_defaults, reuse_freed_memory
from .distributed import configure_deepspeed, engine_name, full_state_dict, is_sharded, make_accelerator
from .loop import TrainResult
from .records import METRICS, RUN_OUTPUTS, SUMMARY
from .resume import change_warnings, check_resume
from .seeds import set_seed


@dataclass
class RunContext:
    """What every command sets up before training: the accelerator, the run directory, the precision, and
    the settings the loop reads (``settings``, a config with the training fields; ``config_dict``, saved
    as ``config.json``). :meth:`Trainer.from_run <preftune.runtime.loop.Trainer.from_run>` builds on it."""

    accelerator: Any
    run_dir: Path
    precision: str
    settings: Any = None
    config_dict: dict = field(default_factory=dict)
    reuses_freed_memory: bool = False     # glibc's heap set up for this run (restored by finish_run)

    @property
    def is_main_process(self) -> bool:
        return self.accelerator.is_main_process


@dataclass
class RunResult:
    """Where a finished run put its outputs (returned by every ``train_*`` function)."""

    run_dir: Path
    model_dir: Path
    metrics_file: Path
    train: TrainResult
    is_main_process: bool = True


def start_run(cfg, warnings: list[str] = ()) -> RunContext:
    """Accelerator, precision and a clean (or resumable) run directory; prints sanity warnings once.
    ``--resume`` is checked here, before any model loads (:func:`~.resume.check_resume`). On CPU,
    freed memory is kept for reuse during the run (``reuse_freed_memory``, :mod:`preftune.speed.allocator`)."""
    from rich.console import Console
    from rich.markup import escape

    from ..models import resolve_precision

    run_dir = Path(cfg.output_dir)
    if cfg.resume:
        _, changes = check_resume(run_dir, dataclasses.asdict(cfg), cfg.resume)
        warnings = [*warnings, *change_warnings(changes)]
    precision = resolve_precision(cfg.precision)
    accelerator = make_accelerator(precision, cfg.report_to, run_dir, getattr(cfg, "fsdp", ""))
    if is_sharded(accelerator) and getattr(cfg, "merge_lora", False):
        raise ConfigError("merge_lora is not supported with sharded training (FSDP2, DeepSpeed): the adapter is "
                          "saved; merge it afterwards on one process")
    configure_deepspeed(accelerator, cfg)
    reuses_freed_memory = reuse_freed_memory(cfg, accelerator.device)   # for this run only: see finish_run
    prepare_run_dir(run_dir, cfg.resume, cfg.overwrite_output_dir, accelerator.is_main_process)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        console = Console(stderr=True)
        for note in warnings:
            console.print(f"[yellow]warning:[/] {escape(note)}", soft_wrap=True)
        if accelerator.num_processes > 1:
            console.print(f"distributed: {engine_name(accelerator)} over {accelerator.num_processes} processes")
    set_seed(cfg.seed)
    return RunContext(accelerator, run_dir, precision, cfg, dataclasses.asdict(cfg), reuses_freed_memory)


def finish_run(ctx: RunContext, model_dir: Path, result: TrainResult, extra: dict | None = None) -> RunResult:
    """Write ``summary.json``, put the allocator back as it was before the run, and return where everything went."""
    if ctx.reuses_freed_memory:
        restore_defaults()
    if ctx.is_main_process:
        summary = {"model_dir": str(model_dir), "steps": result.global_step, "train": result.last_metrics,
                   "eval": result.eval_metrics, "distributed": {"engine": engine_name(ctx.accelerator),
                                                                "processes": ctx.accelerator.num_processes},
                   **(extra or {})}
        (ctx.run_dir / SUMMARY).write_text(json.dumps(summary, indent=2))
    return RunResult(ctx.run_dir, model_dir, ctx.run_dir / METRICS, result, ctx.is_main_process)


def train_and_eval(cfg, read: Callable[[str, str], list]) -> tuple[list, list]:
    """Training and held-out items: ``read(source, split)`` of ``dataset``, then of ``eval_dataset`` or,
    without one, an ``eval_fraction`` of the training items held out."""
    from ..data.split import hold_out

    train = read(cfg.dataset, cfg.split)
    if cfg.eval_dataset:
        return train, read(cfg.eval_dataset, cfg.eval_split)
    return hold_out(train, cfg.eval_fraction, cfg.seed)


def tokenized_reader(cfg, tokenizer, tokenize: Callable) -> Callable[[str, str], list]:
    """``read(source, split)`` for :func:`train_and_eval`: load the rows, ``tokenize(records, tokenizer, settings,
    skip_invalid=...)`` them within the config's length limits, and report the rows skipped."""
    from accelerate import PartialState

    from ..data import TokenizeSettings, load_records
    from ..data.columns import scores_as_margins
    from ..data.split import report_skipped
    from .progress import data_line

    settings = TokenizeSettings(max_length=cfg.max_length, max_prompt_length=cfg.max_prompt_length,
                                truncation_mode=cfg.truncation_mode)

    def read(source: str, split: str) -> list:
        records = load_records(source, split=split)
        if getattr(cfg, "margin_from_scores", False):
            records = scores_as_margins(records)
        items, report = tokenize(records, tokenizer, settings, skip_invalid=cfg.skip_invalid)
        report_skipped(records.name, report)
        if PartialState().is_main_process:
            print(data_line(records, report), flush=True)   # the first line of the run's summary
        return items

    return read




def prepare_run_dir(run_dir: Path, resume: str | None, overwrite: bool, is_main: bool) -> None:
    """Refuse to mix a new run into an earlier one's files, unless resuming or told to overwrite."""
    existing = [name for name in RUN_OUTPUTS if (run_dir / name).exists()]
    if not existing or resume:
        return
    if not overwrite:
        raise ConfigError(f"{run_dir} already holds a run ({', '.join(existing)}); pass --resume to continue it, "
                          f"--overwrite_output_dir to start afresh, or choose another --output_dir")
    if is_main:
        for name in existing:
            target = run_dir / name
            shutil.rmtree(target) if target.is_dir() else target.unlink()


def save_final_model(accelerator, model, tokenizer, path: Path, merge_lora: bool = False) -> Path:
    """Save with ``save_pretrained`` (an adapter for LoRA unless merged) plus the tokenizer.

    Written to a staging directory first and renamed, so a crash never leaves a half-written model.
    """
    accelerator.wait_for_everyone()
    state = full_state_dict(accelerator, model)  # sharded weights gathered (every process takes part)
    if accelerator.is_main_process:
        model = accelerator.unwrap_model(model)
        if merge_lora and hasattr(model, "merge_and_unload"):
            model = model.merge_and_unload()
        staging = path.with_name(path.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        model.save_pretrained(staging, **({"state_dict": state} if state is not None else {}))
        tokenizer.save_pretrained(staging)
        if path.exists():
            shutil.rmtree(path)
        staging.rename(path)
    accelerator.wait_for_everyone()
    return path
