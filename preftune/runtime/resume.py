"""Resuming a run a person can follow: what ``--resume`` finds, which changed settings it refuses or
reports, how ``config.json`` records each resume, and what Ctrl-C prints.

``--resume`` is checked before any model is loaded (:func:`check_resume`): with nothing to resume from,
or with a changed setting that would make the continuation a different run (:data:`REFUSED_ON_RESUME`:
the model, tokenizer, reference, data, LoRA shape, seed, batch shape), it fails with exit code 2. Any
other changed setting (``max_steps``, ``save_steps``, ``logging_steps``, ``beta``, the schedule...) is
allowed and listed as a warning; the warning says when the checkpoint's optimiser state overrides it
(:data:`KEPT_BY_CHECKPOINT`: the learning rate, weight decay and Adam betas).
``config.json`` keeps the settings the run started with; each resume appends an entry to its ``resumes``
list: the step it resumed from, the checkpoint and the changed fields as ``[old, new]``.
"""

from __future__ import annotations

import json
import shlex
from datetime import datetime, timezone
from pathlib import Path

from ..errors import ConfigError, PreftuneError
from .checkpoint import find_checkpoint, step_of

# Refused on resume: a changed model, data, adapter shape, seed or batch makes the continuation a different
# experiment.
REFUSED_ON_RESUME = ("model_name_or_path", "tokenizer_name_or_path", "ref_model_name_or_path", "model_config",
                     "reward_model_path", "dataset", "split", "text_column", "lora", "lora_r", "lora_alpha",
                     "lora_target_modules", "seed", "per_device_batch_size", "gradient_accumulation_steps",
                     "num_generations", "precompute_ref")
# Allowed, but the optimiser state in the checkpoint keeps the old value: the warning says so.
KEPT_BY_CHECKPOINT = ("learning_rate", "weight_decay", "adam_beta1", "adam_beta2")
# Settings of the invocation, not of the run.
NOT_COMPARED = ("resume", "overwrite_output_dir", "resumes", "precision_chosen")


class TrainingInterrupted(PreftuneError):
    """Ctrl-C during training: where the run stopped and the newest checkpoint it can resume from."""

    exit_code = 130

    def __init__(self, step: int, total: int, checkpoint: Path | None):
        self.step, self.total, self.checkpoint = step, total, checkpoint
        super().__init__(f"interrupted at step {step} of {total}")


def config_changes(saved: dict, current: dict) -> dict[str, list]:
    """``{field: [old, new]}`` for every setting that differs between two ``config.json`` dictionaries."""
    names = [k for k in dict.fromkeys([*saved, *current]) if k not in NOT_COMPARED]
    return {k: [saved.get(k), current.get(k)] for k in names if _plain(saved.get(k)) != _plain(current.get(k))}


def _plain(value):
    """Values as JSON stores them (tuples become lists, paths strings)."""
    return json.loads(json.dumps(value, default=str))


def check_resume(run_dir: Path, config: dict, resume: str) -> tuple[Path, dict[str, list]]:
    """The checkpoint ``resume`` names and the settings changed since the run started; raises a ConfigError
    when there is nothing to resume or a :data:`REFUSED_ON_RESUME` setting changed."""
    checkpoint = find_checkpoint(Path(run_dir) / "checkpoints", resume)
    saved = original_config(Path(run_dir))
    changes = config_changes(saved, config) if saved is not None else {}
    refused = [f"{k} ({_show(old)} -> {_show(new)})" for k, (old, new) in changes.items() if k in REFUSED_ON_RESUME]
    if refused:
        raise ConfigError(f"--resume: {run_dir} was started with other settings that a resumed run cannot change: "
                          f"{', '.join(refused)}; start a new run in another --output_dir instead")
    return checkpoint, changes


def change_warnings(changes: dict[str, list]) -> list[str]:
    """One warning per changed setting of a resumed run."""
    kept = " (no effect: the optimiser state in the checkpoint keeps the old value)"
    return [f"resuming with {name} changed: {_show(old)} -> {_show(new)}{kept if name in KEPT_BY_CHECKPOINT else ''}"
            for name, (old, new) in changes.items()]


def _show(value) -> str:
    return json.dumps(_plain(value))


def original_config(run_dir: Path) -> dict | None:
    path = run_dir / "config.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        raise ConfigError(f"{path}: not valid JSON; cannot compare the resumed run's settings with it") from None


def record_config(run_dir: Path, config: dict, checkpoint: Path | None = None) -> None:
    """Write ``config.json``: the settings of a new run; on resume, the original settings plus one more entry
    in ``resumes`` (the step, the checkpoint and the changed fields)."""
    path = run_dir / "config.json"
    saved = original_config(run_dir) if checkpoint is not None else None
    if saved is None:
        path.write_text(json.dumps(config, indent=2, default=str))
        return
    entry = {"from_step": step_of(checkpoint), "checkpoint": str(checkpoint),
             "time": datetime.now(timezone.utc).isoformat(timespec="seconds"), "changed": config_changes(saved, config)}
    saved["resumes"] = [*saved.get("resumes", []), entry]
    path.write_text(json.dumps(saved, indent=2, default=str))


def resume_command(argv: list[str], checkpoint: Path) -> str:
    """The command line that continues this run from ``checkpoint``: ``argv`` without its own ``--resume``
    (or TRL's ``--resume_from_checkpoint``) and ``--overwrite_output_dir``, plus ``--resume CHECKPOINT``."""
    kept, skip_value = [], False
    for word in argv:
        if skip_value:
            skip_value = False
            if not word.startswith("--"):
                continue
        name = word.split("=", 1)[0]
        if name in ("--resume", "--resume_from_checkpoint"):
            skip_value = "=" not in word
            continue
        if name in ("--overwrite_output_dir", "--overwrite-output-dir"):
            continue
        kept.append(word)
    return shlex.join(["preftune", *kept, "--resume", str(checkpoint)])


def interruption_message(stop: TrainingInterrupted, argv: list[str]) -> str:
    """What Ctrl-C prints: where the run stopped, its last checkpoint and the command that resumes it."""
    lines = [f"interrupted at step {stop.step} of {stop.total}."]
    if stop.checkpoint is None:
        lines.append("no checkpoint was written, so this run cannot be resumed (set --save_steps to write "
                     "checkpoints during training).")
    else:
        lines += [f"last checkpoint: {stop.checkpoint} (step {step_of(stop.checkpoint)})", "resume with:",
                  f"  {resume_command(argv, stop.checkpoint)}"]
    return "\n".join(lines)
