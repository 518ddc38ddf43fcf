"""The one training loop every algorithm runs on.

An algorithm supplies a :class:`Task`: how a batch of examples becomes a loss and metrics. The loop
owns the rest: devices and data parallelism (``accelerate``), AdamW and the schedule, gradient
accumulation and clipping, metrics (progress bar, ``metrics.jsonl``, trackers), evaluation,
checkpoints and exact resume.

Data order is a pure function of (seed, epoch): step ``s`` of a run always sees the same examples,
whatever the number of processes, so a resumed run and a data-parallel run reproduce a single
uninterrupted one. Each optimiser step consumes one *global batch* of
``per_device_batch_size x processes x gradient_accumulation_steps`` examples; the incomplete
remainder of an epoch is dropped (it is reshuffled into the next epoch).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import signal
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..errors import ConfigError, PreftuneError

CHECKPOINT_PREFIX = "step-"


class Task(Protocol):
    """What an algorithm module provides to the loop."""

    def collate(self, examples: list[Any]) -> dict[str, torch.Tensor]: ...

    def loss(self, model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]: ...

    def eval_metrics(self, model, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]: ...

    # Optional: ``eval_summary(outputs: list[dict[str, Tensor]]) -> dict[str, float]`` for metrics of the
    # whole eval set. When a task defines it, the per-example (non-scalar) values that ``eval_metrics``
    # returns are not averaged but collected batch by batch, from every process, and handed to it.


@dataclass
class TrainResult:
    run_dir: Path
    global_step: int
    last_metrics: dict[str, float] = field(default_factory=dict)
    eval_metrics: dict[str, float] = field(default_factory=dict)


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=generator).tolist()


class Trainer:
    """Runs a :class:`Task` over examples with the settings of a :class:`~preftune.config.TrainSettings`."""

    def __init__(self, *, accelerator, model, task: Task, train_examples: list, eval_examples: list, settings,
                 run_dir: Path, config_dict: dict, count_tokens: Callable[[dict], int], unit: str = "pairs",
                 steps_per_epoch: int | None = None, updates_per_step: int = 1):
        """``steps_per_epoch`` and ``updates_per_step`` are for drivers that call :meth:`train_step` themselves
        (PPO: one step = one rollout batch, ``updates_per_step`` optimiser steps over it); the LR schedule
        then spans ``total_steps x updates_per_step`` optimiser steps."""
        self.acc = accelerator
        self.task = task
        self.train_examples = train_examples
        self.eval_examples = eval_examples
        self.s = settings
        self.run_dir = Path(run_dir)
        self.count_tokens = count_tokens
        self.unit = unit  # what one example is, for the throughput metric ("pairs/s", "samples/s")
        self.world = accelerator.num_processes
        self.rank = accelerator.process_index
        self.global_batch = settings.per_device_batch_size * self.world * settings.gradient_accumulation_steps
        self.updates_per_step = updates_per_step
        self.steps_per_epoch = steps_per_epoch or len(train_examples) // self.global_batch
        if self.steps_per_epoch == 0:
            raise ConfigError(
                f"the training data has {len(train_examples)} examples, fewer than one global batch of {self.global_batch} "
                f"(per_device_batch_size x processes x gradient_accumulation_steps)")
        if settings.max_steps > 0:
            self.total_steps = settings.max_steps
        else:
            self.total_steps = max(1, math.ceil(settings.num_epochs * self.steps_per_epoch))
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ConfigError("the model has no trainable parameters")
        optimizer = torch.optim.AdamW(params, lr=settings.learning_rate, weight_decay=settings.weight_decay,
                                      betas=(settings.adam_beta1, settings.adam_beta2))
        self.scheduler = self._make_scheduler(optimizer)
        self.model, self.optimizer = accelerator.prepare(model, optimizer)
        self.global_step = 0
        if accelerator.is_main_process:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        self.config_dict = config_dict

    # ------------------------------------------------------------------ set-up

    def _make_scheduler(self, optimizer):
        from transformers import get_scheduler

        updates = self.total_steps * self.updates_per_step
        warmup = self.s.warmup_steps if self.s.warmup_steps > 0 else int(round(self.s.warmup_ratio * updates))
        name = {"constant": "constant_with_warmup"}.get(self.s.lr_scheduler, self.s.lr_scheduler)
        return get_scheduler(name, optimizer=optimizer, num_warmup_steps=warmup, num_training_steps=updates)

    def unwrapped(self):
        return self.acc.unwrap_model(self.model)

    # ------------------------------------------------------------------ data

    def micro_batches(self, step: int) -> list[list[Any]]:
        """This process's micro-batches for optimiser step ``step`` (0-based)."""
        epoch, within = divmod(step, self.steps_per_epoch)
        order = epoch_order(len(self.train_examples), self.s.seed, epoch)
        start = within * self.global_batch
        b = self.s.per_device_batch_size
        batches = []
        for k in range(self.s.gradient_accumulation_steps):
            offset = start + k * b * self.world + self.rank * b
            batches.append([self.train_examples[i] for i in order[offset:offset + b]])
        return batches

    def to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.acc.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    # ------------------------------------------------------------------ the loop

    def begin(self) -> dict:
        """Resume if asked, write ``config.json``, start trackers; returns the checkpoint's extra state."""
        extra = self.load_checkpoint(self.resolve_resume(self.s.resume)) if self.s.resume else {}
        if self.acc.is_main_process:
            (self.run_dir / "config.json").write_text(json.dumps(self.config_dict, indent=2, default=str))
        if self.s.report_to:
            self.acc.init_trackers(self.run_dir.name, config=_flat_for_trackers(self.config_dict))
        return extra

    def end(self) -> None:
        if self.s.report_to:
            self.acc.end_training()

    def train(self) -> TrainResult:
        self.begin()
        window: dict[str, list[float]] = defaultdict(list)
        window_pairs = window_tokens = 0
        window_time = 0.0
        last: dict[str, float] = {}
        eval_results: dict[str, float] = {}
        if self.s.eval_on_start and self.eval_examples and self.global_step == 0:
            eval_results = self.evaluate()
        progress = _progress(self.acc.is_main_process)
        with progress:
            bar = progress.add_task("training", total=self.total_steps, completed=self.global_step, status="")
            while self.global_step < self.total_steps:
                started = time.perf_counter()
                metrics, pairs, tokens = self.train_step(self.micro_batches(self.global_step))
                elapsed = time.perf_counter() - started
                self.global_step += 1
                for key, value in metrics.items():
                    window[key].append(value)
                window_pairs += pairs
                window_tokens += tokens
                window_time += elapsed
                kill_point(self.global_step)
                if self.global_step % self.s.logging_steps == 0 or self.global_step == self.total_steps:
                    last = {k: float(np.mean(v)) for k, v in window.items()}
                    last.update({f"{self.unit}/s": window_pairs / window_time, "tokens/s": window_tokens / window_time})
                    self.log(last)
                    progress.update(bar, status=_status_line(last))
                    window.clear()
                    window_pairs = window_tokens = 0
                    window_time = 0.0
                if self.s.eval_steps and self.global_step % self.s.eval_steps == 0 and self.global_step < self.total_steps:
                    eval_results = self.evaluate()
                if self.s.save_steps and self.global_step % self.s.save_steps == 0:
                    self.save_checkpoint()
                progress.update(bar, advance=1)
        if self.eval_examples:
            eval_results = self.evaluate()
        self.end()
        return TrainResult(self.run_dir, self.global_step, last, eval_results)

    def train_step(self, micro_batches: list[list[Any]]) -> tuple[dict[str, float], int, int]:
        self.model.train()
        sums: dict[str, torch.Tensor] = {}
        local_tokens = 0
        steps = len(micro_batches)
        for k, examples in enumerate(micro_batches):
            batch = self.to_device(self.task.collate(examples))
            local_tokens += self.count_tokens(batch)
            sync = k == steps - 1
            with self.acc.no_sync(self.model) if not sync else contextlib.nullcontext():
                with self.acc.autocast():
                    loss, metrics = self.task.loss(self.model, batch)
                self.acc.backward(loss / steps)
            for key, value in metrics.items():
                sums[key] = sums.get(key, 0) + value.detach().float() / steps
        grad_norm = None
        if self.s.max_grad_norm > 0:
            grad_norm = self.acc.clip_grad_norm_(self.model.parameters(), self.s.max_grad_norm)
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        keys = sorted(sums)
        stacked = torch.stack([sums[k] for k in keys] + [torch.tensor(float(local_tokens), device=self.acc.device)])
        stacked = self.acc.reduce(stacked.to(self.acc.device), reduction="mean")
        values = {k: float(v) for k, v in zip(keys, stacked[:-1].tolist())}
        tokens = int(round(float(stacked[-1]) * self.world))
        if grad_norm is not None:
            values["grad_norm"] = float(grad_norm)
        values["learning_rate"] = lr
        return values, self.global_batch, tokens

    # ------------------------------------------------------------------ evaluation

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        self.model.eval()
        b = self.s.per_device_batch_size
        chunks = [self.eval_examples[i:i + b] for i in range(0, len(self.eval_examples), b)]
        totals: dict[str, torch.Tensor] = {}
        count = 0
        summarise = getattr(self.task, "eval_summary", None)
        outputs: list[dict[str, torch.Tensor]] = []
        for examples in chunks[self.rank::self.world]:
            batch = self.to_device(self.task.collate(examples))
            with self.acc.autocast():
                metrics = self.task.eval_metrics(self.model, batch)
            if summarise is not None:
                outputs.append({k: v.detach().float().cpu() for k, v in metrics.items() if v.ndim > 0})
                metrics = {k: v for k, v in metrics.items() if v.ndim == 0}
            for key, value in metrics.items():
                totals[key] = totals.get(key, 0) + value.detach().float() * len(examples)
            count += len(examples)
        keys = sorted(totals) or sorted(self._eval_keys_hint())
        local = torch.stack([totals.get(k, torch.tensor(0.0, device=self.acc.device)) for k in keys]
                            + [torch.tensor(float(count), device=self.acc.device)]).to(self.acc.device)
        summed = self.acc.reduce(local, reduction="sum")
        n = float(summed[-1])
        results = {f"eval/{k}": float(v) / max(n, 1.0) for k, v in zip(keys, summed[:-1].tolist())}
        if summarise is not None:
            if self.world > 1:
                from accelerate.utils import gather_object

                outputs = gather_object(outputs)
            results.update({f"eval/{k}": float(v) for k, v in summarise(outputs).items()})
        self.log(results)
        return results

    def _eval_keys_hint(self):
        return ["loss"]

    # ------------------------------------------------------------------ metrics

    def log(self, metrics: dict[str, float]) -> None:
        record = {"step": self.global_step, "epoch": round(self.global_step / self.steps_per_epoch, 4), **metrics}
        if self.acc.is_main_process:
            with open(self.run_dir / "metrics.jsonl", "a") as handle:
                handle.write(json.dumps(record) + "\n")
        if self.s.report_to:
            self.acc.log(metrics, step=self.global_step)

    # ------------------------------------------------------------------ checkpoints

    def checkpoint_dir(self) -> Path:
        return self.run_dir / "checkpoints"

    def resolve_resume(self, resume: str) -> Path:
        if resume == "latest":
            found = sorted(self.checkpoint_dir().glob(f"{CHECKPOINT_PREFIX}*"), key=_step_of)
            found = [p for p in found if (p / "state.json").is_file()]
            if not found:
                raise ConfigError(f"--resume: no checkpoint found in {self.checkpoint_dir()}")
            return found[-1]
        path = Path(resume)
        if not (path / "state.json").is_file():
            raise ConfigError(f"--resume: {path} is not a checkpoint (no state.json)")
        return path

    def save_checkpoint(self, extra_state: dict | None = None) -> Path:
        """Trainable weights, optimiser, scheduler, RNG states and data position, written atomically.

        ``extra_state`` (JSON-serialisable, e.g. PPO's KL coefficient) comes back from :meth:`load_checkpoint`.
        """
        final = self.checkpoint_dir() / f"{CHECKPOINT_PREFIX}{self.global_step}"
        staging = final.with_name(final.name + ".partial")
        self.acc.wait_for_everyone()
        if self.acc.is_main_process:
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
            weights = {name: p.detach().cpu().contiguous() for name, p in self.unwrapped().named_parameters() if p.requires_grad}
            save_file(weights, staging / "trainable.safetensors")
            torch.save(self.optimizer.state_dict(), staging / "optimizer.pt")
            torch.save(self.scheduler.state_dict(), staging / "scheduler.pt")
        self.acc.wait_for_everyone()
        torch.save(_rng_state(), staging / f"rng-{self.rank}.pt")
        self.acc.wait_for_everyone()
        if self.acc.is_main_process:
            state = {"global_step": self.global_step, "total_steps": self.total_steps, "global_batch": self.global_batch,
                     "world_size": self.world, "seed": self.s.seed, "extra": extra_state or {}}
            (staging / "state.json").write_text(json.dumps(state, indent=2))
            if final.exists():
                shutil.rmtree(final)
            staging.rename(final)
            self._prune_checkpoints()
        self.acc.wait_for_everyone()
        return final

    def _prune_checkpoints(self) -> None:
        found = sorted((p for p in self.checkpoint_dir().glob(f"{CHECKPOINT_PREFIX}*") if not p.name.endswith(".partial")),
                       key=_step_of)
        for old in found[:-self.s.save_total_limit] if self.s.save_total_limit > 0 else []:
            shutil.rmtree(old, ignore_errors=True)

    def load_checkpoint(self, path: Path) -> dict:
        state = json.loads((path / "state.json").read_text())
        if state["global_batch"] != self.global_batch or state["seed"] != self.s.seed:
            raise ConfigError(f"{path}: checkpoint was written with global batch {state['global_batch']} and seed "
                              f"{state['seed']}; this run has {self.global_batch} and {self.s.seed}")
        weights = load_file(path / "trainable.safetensors")
        params = {name: p for name, p in self.unwrapped().named_parameters() if p.requires_grad}
        if set(weights) != set(params):
            raise PreftuneError(f"{path}: checkpoint weights do not match this model's trainable parameters")
        with torch.no_grad():
            for name, tensor in weights.items():
                params[name].copy_(tensor.to(params[name].device))
        self.optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location=self.acc.device, weights_only=False))
        self.scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=False))
        rng_file = path / f"rng-{self.rank}.pt"
        if rng_file.is_file():
            _set_rng_state(torch.load(rng_file, weights_only=False))
        self.global_step = state["global_step"]
        if self.acc.is_main_process:
            _truncate_metrics(self.run_dir / "metrics.jsonl", self.global_step)
        return state.get("extra", {})


# ---------------------------------------------------------------------- helpers


def kill_point(step: int) -> None:
    """SIGKILL this process after step ``PREFTUNE_KILL_AT_STEP``: lets tests simulate a crash."""
    kill_at = int(os.environ.get("PREFTUNE_KILL_AT_STEP", "0"))
    if kill_at and step == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)


def _step_of(path: Path) -> int:
    try:
        return int(path.name.removeprefix(CHECKPOINT_PREFIX).split(".")[0])
    except ValueError:
        return -1


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metric lines written after the checkpoint we resume from (they will be written again)."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line).get("step", 0) <= step]
    path.write_text("".join(line + "\n" for line in kept))


def _flat_for_trackers(config: dict) -> dict:
    return {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in config.items()}


def _status_line(metrics: dict[str, float]) -> str:
    shown = ["loss", "rewards/accuracies", "rewards/margins", "accuracy", "pairs/s", "samples/s"]
    return "  ".join(f"{k}={metrics[k]:.4g}" for k in shown if k in metrics)


def _progress(enabled: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TimeRemainingColumn(), TextColumn("{task.fields[status]}"), disable=not enabled)
