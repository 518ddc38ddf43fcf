"""The one training loop every algorithm runs on.

An algorithm supplies a :class:`Task`: how a batch of examples becomes a loss and metrics. The loop
owns the rest: devices and data parallelism (``accelerate``), AdamW and the schedule, gradient accumulation
and clipping, metrics (progress bar, ``metrics.jsonl``, trackers), evaluation, checkpoints and exact resume.

Data order is a pure function of (seed, epoch): step ``s`` of a run always sees the same examples,
whatever the number of processes, so a resumed run and a data-parallel run reproduce a single
uninterrupted one. By default each step is one optimiser update on one *global batch* of
``per_device_batch_size x processes x gradient_accumulation_steps`` examples; the incomplete
remainder of an epoch is dropped (it is reshuffled into the next epoch).

Online algorithms (PPO, GRPO/RLOO, iterative and online DPO) make their own batch each step: they
pass a :class:`StepFunction` as ``step`` and the loop calls ``step.run(trainer, s)`` for every step
``s`` (0-based). A step function typically

* takes its prompts with ``trainer.step_examples(s, per_process)`` (the training examples are the
  prompts; ``examples_per_step`` tells the loop how many one step consumes, across processes);
* generates and scores, then runs any number of optimiser updates with ``trainer.optimizer_step(micro_batches)``
  (``updates_per_step`` of them: the LR schedule spans ``total_steps x updates_per_step`` updates);
* returns a :class:`StepOutput`: its metrics, the examples and tokens it processed, and optional
  ``samples`` (rows the loop appends to ``samples.jsonl`` with the step number).

Its ``state_dict()`` (JSON) is saved in every checkpoint and handed to ``load_state_dict`` on resume;
put there what the step owns that is not a trainable weight or an RNG state (both of which the loop
saves): an adaptive KL coefficient, running score statistics; tensors go in optional ``tensors()`` /
``load_tensors(tensors)`` (a synced reference's weights), saved beside the trainable weights. Make
generation seeds and minibatch orders functions of (seed, step, process): resume is then exact.
Metrics named in ``gauges`` are logged as their last value rather than the mean over the logging window.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np
import torch

from ..errors import ConfigError
from . import checkpoint as ckpt
from .distributed import eval_chunks, full_tensor, is_sharded, loss_divisor, mark_boundary
from .progress import Display, run_summary
from .records import METRICS, RECORD_FILES, SAMPLES, append_records
from .resume import TrainingInterrupted, record_config
from .seeds import mix_seed


class Task(Protocol):
    """What an algorithm module provides to the loop."""

    def collate(self, examples: list[Any]) -> dict[str, torch.Tensor]: ...

    def loss(self, model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]: ...

    def eval_metrics(self, model, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]: ...

    # Optional: ``eval_summary(outputs: list[dict[str, Tensor]]) -> dict[str, float]`` for metrics of the
    # whole eval set. When a task defines it, the per-example (non-scalar) values that ``eval_metrics``
    # returns are not averaged but collected batch by batch, from every process, and handed to it.


@dataclass
class StepOutput:
    """What one training step did: metrics (floats), examples and tokens processed (all processes)."""

    metrics: dict[str, float]
    examples: int
    tokens: int
    samples: list[dict] = field(default_factory=list)   # rows for samples.jsonl (main process writes them)


class StepFunction(Protocol):
    """One training step of an online algorithm (see the module docstring)."""

    gauges: tuple[str, ...]

    def run(self, trainer: "Trainer", step: int) -> StepOutput: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class OfflineStep:
    """The default step: one optimiser update on the step's global batch of training examples."""

    gauges: tuple[str, ...] = ()

    def run(self, trainer: "Trainer", step: int) -> StepOutput:
        return trainer.optimizer_step(trainer.micro_batches(step))

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


@dataclass
class TrainResult:
    run_dir: Path
    global_step: int
    last_metrics: dict[str, float] = field(default_factory=dict)
    eval_metrics: dict[str, float] = field(default_factory=dict)


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    generator = torch.Generator().manual_seed(mix_seed(seed, epoch))
    return torch.randperm(n, generator=generator).tolist()


def attention_tokens(batch: dict[str, torch.Tensor]) -> int:
    return int(batch["attention_mask"].sum())


def window_mean(values: list[float]) -> float:
    """Mean of the finite values (a step may have none: explained variance of constant returns), else NaN."""
    finite = [v for v in values if np.isfinite(v)]
    return float(np.mean(finite)) if finite else float("nan")


class Trainer:
    """Runs a :class:`Task` over examples with the settings of a :class:`~preftune.config.TrainSettings`."""

    def __init__(self, *, accelerator, model, task: Task, train_examples: list, eval_examples: list, settings,
                 run_dir: Path, config_dict: dict, count_tokens: Callable[[dict], int] = attention_tokens,
                 unit: str = "pairs", step: StepFunction | None = None, examples_per_step: int | None = None,
                 updates_per_step: int = 1):
        self.acc = accelerator
        self.task = task
        self.train_examples = train_examples
        self.eval_examples = eval_examples
        self.s = settings
        self.run_dir = Path(run_dir)
        self.config_dict = config_dict
        self.count_tokens = count_tokens
        self.unit = unit  # what one example is, for the throughput metric ("pairs/s", "samples/s")
        self.step = step or OfflineStep()
        self.world = accelerator.num_processes
        self.rank = accelerator.process_index
        self.global_batch = settings.per_device_batch_size * self.world * settings.gradient_accumulation_steps
        self.updates_per_step = updates_per_step
        per_step = examples_per_step or self.global_batch
        self.steps_per_epoch = len(train_examples) // per_step
        if self.steps_per_epoch == 0:
            raise ConfigError(
                f"the training data has {len(train_examples)} examples, fewer than one global batch of "
                f"{per_step} (per_device_batch_size x processes x gradient_accumulation_steps)")
        self.total_steps = (settings.max_steps if settings.max_steps > 0
                            else max(1, math.ceil(settings.num_epochs * self.steps_per_epoch)))
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ConfigError("the model has no trainable parameters")
        devices = {t.device.type for t in params} | {accelerator.device.type}  # fused AdamW: ~6x PyTorch's CPU default
        fused = devices <= {"cpu", "cuda"} and all(t.is_floating_point() for t in params)
        optimizer = torch.optim.AdamW(params, lr=settings.learning_rate, weight_decay=settings.weight_decay,
                                      betas=(settings.adam_beta1, settings.adam_beta2), fused=fused or None)
        self.scheduler = self._make_scheduler(optimizer)
        self.model, self.optimizer = accelerator.prepare(model, optimizer)
        self.global_step = 0
        self.resumed_from: Path | None = None
        if accelerator.is_main_process:
            self.run_dir.mkdir(parents=True, exist_ok=True)

    @classmethod
    def from_run(cls, ctx, *, model, task: Task, train_examples: list, eval_examples: list = (),
                 **options) -> "Trainer":
        """A trainer for the run set up by :func:`~preftune.runtime.run.start_run`; ``options`` as for __init__."""
        return cls(accelerator=ctx.accelerator, model=model, task=task, train_examples=train_examples,
                   eval_examples=list(eval_examples), settings=ctx.settings, run_dir=ctx.run_dir,
                   config_dict=ctx.config_dict, **options)

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

    def step_examples(self, step: int, per_process: int) -> list[Any]:
        """This process's ``per_process`` training examples of step ``step``, for a step function that
        consumes ``per_process x processes`` examples a step (an online algorithm's prompts)."""
        epoch, within = divmod(step, self.steps_per_epoch)
        order = epoch_order(len(self.train_examples), self.s.seed, epoch)
        start = (within * self.world + self.rank) * per_process
        return [self.train_examples[i] for i in order[start:start + per_process]]

    def to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.acc.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    # ------------------------------------------------------------------ the loop

    def train(self) -> TrainResult:
        """Run the remaining steps; Ctrl-C raises :class:`~.resume.TrainingInterrupted` (the last checkpoint)."""
        self._begin()
        display = Display(self.acc.is_main_process, self.total_steps, self.global_step)
        display.say(run_summary(self, self.unit))
        try:
            with display:
                last, eval_results = self._steps(display)
        except KeyboardInterrupt:
            last_saved = ckpt.newest_checkpoint(self.checkpoint_dir())
            raise TrainingInterrupted(self.global_step, self.total_steps, last_saved) from None
        if self.eval_examples:
            eval_results = self.evaluate()
        if self.s.report_to:
            self.acc.end_training()
        return TrainResult(self.run_dir, self.global_step, last, eval_results)

    def _steps(self, display: Display) -> tuple[dict[str, float], dict[str, float]]:
        window: dict[str, list[float]] = defaultdict(list)
        window_examples, window_tokens, window_time = 0, 0, 0.0
        last: dict[str, float] = {}
        eval_results: dict[str, float] = {}
        if self.s.eval_on_start and self.eval_examples and self.global_step == 0:
            eval_results = self.evaluate()
        while self.global_step < self.total_steps:
            started = time.perf_counter()
            out = self.step.run(self, self.global_step)
            window_time += time.perf_counter() - started
            self.global_step += 1
            for key, value in out.metrics.items():
                window[key].append(value)
            window_examples += out.examples
            window_tokens += out.tokens
            if self.global_step % self.s.logging_steps == 0 or self.global_step == self.total_steps:
                last = {k: v[-1] if k in self.step.gauges else window_mean(v) for k, v in window.items()}
                last.update({f"{self.unit}/s": window_examples / window_time, "tokens/s": window_tokens / window_time})
                self.log(last)
                display.logged(self.global_step, last)
                window.clear()
                window_examples, window_tokens, window_time = 0, 0, 0.0
            self.log_samples(out.samples)
            if self.s.eval_steps and self.global_step % self.s.eval_steps == 0 and self.global_step < self.total_steps:
                eval_results = self.evaluate()
            if self.s.save_steps and self.global_step % self.s.save_steps == 0:
                self.save_checkpoint()
            display.advance()
        return last, eval_results

    def _begin(self) -> None:
        """Resume if asked, write (or on resume add to) ``config.json``, start trackers."""
        if self.s.resume:
            self.resumed_from = ckpt.find_checkpoint(self.checkpoint_dir(), self.s.resume)
            self.load_checkpoint(self.resumed_from)
        if self.acc.is_main_process:
            record_config(self.run_dir, self.config_dict, self.resumed_from)
        if self.s.report_to:
            self.acc.init_trackers(self.run_dir.name, config=_flat_for_trackers(self.config_dict))

    def optimizer_step(self, micro_batches: list[list[Any]]) -> StepOutput:
        """One optimiser update: forward and backward over the micro-batches (accumulated), clip, step."""
        self.model.train()
        values_of: dict[str, list[torch.Tensor]] = defaultdict(list)
        local_tokens = 0
        steps = len(micro_batches)
        for k, examples in enumerate(micro_batches):
            batch = self.to_device(self.task.collate(examples))
            local_tokens += self.count_tokens(batch)
            sync = k == steps - 1
            mark_boundary(self.acc, sync)
            with self.acc.no_sync(self.model) if not sync else contextlib.nullcontext():
                with self.acc.autocast():
                    loss, metrics = self.task.loss(self.model, batch)
                self.acc.backward(loss / loss_divisor(self.acc, steps))
            for key, value in metrics.items():
                values_of[key].append(value.detach().float())
        clip = self.s.max_grad_norm > 0
        grad_norm = self.acc.clip_grad_norm_(self.model.parameters(), self.s.max_grad_norm) if clip else None
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        keys = sorted(values_of)  # each metric's mean over the micro-batches where it is a number (NaN: none)
        stacked = torch.stack([torch.stack(values_of[k]).nanmean() for k in keys]
                              + [torch.tensor(float(local_tokens), device=self.acc.device)])
        stacked = self.acc.reduce(stacked.to(self.acc.device), reduction="mean")
        values = {k: float(v) for k, v in zip(keys, stacked[:-1].tolist())}
        tokens = int(round(float(stacked[-1]) * self.world))
        if grad_norm is not None:
            values["grad_norm"] = float(full_tensor(grad_norm))
        values["learning_rate"] = lr
        examples = sum(len(m) for m in micro_batches) * self.world
        return StepOutput(values, examples, tokens)

    # ------------------------------------------------------------------ evaluation

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        self.model.eval()
        chunks = eval_chunks(self.eval_examples, self.s.per_device_batch_size, self.world, is_sharded(self.acc))
        totals: dict[str, torch.Tensor] = {}
        count = 0
        summarise = getattr(self.task, "eval_summary", None)
        outputs: list[dict[str, torch.Tensor]] = []
        for examples in chunks[self.rank::self.world]:  # under sharding: as many on every process
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
    # (a metric with no value this step, such as KTO's rewards/rejected on a batch of desirable examples only, is
    # NaN in memory and null in metrics.jsonl)

    def log(self, metrics: dict[str, float]) -> None:
        record = {"step": self.global_step, "epoch": round(self.global_step / self.steps_per_epoch, 4), **metrics}
        if self.acc.is_main_process:
            append_records(self.run_dir / METRICS, [record])
        if self.s.report_to:
            self.acc.log(metrics, step=self.global_step)

    def log_samples(self, rows: list[dict]) -> None:
        """Append example generations to ``samples.jsonl``, tagged with the current step."""
        if rows and self.acc.is_main_process:
            append_records(self.run_dir / SAMPLES, [{"step": self.global_step, **row} for row in rows])

    # ------------------------------------------------------------------ checkpoints

    def checkpoint_dir(self) -> Path:
        return self.run_dir / "checkpoints"

    def save_checkpoint(self) -> Path:
        """Trainable weights, optimiser, scheduler, RNG states, data position and the step function's state."""
        state = {"global_step": self.global_step, "total_steps": self.total_steps, "world_size": self.world,
                 **self._must_match(), "extra": self.step.state_dict()}
        path = self.checkpoint_dir() / f"{ckpt.PREFIX}{self.global_step}"
        return ckpt.save_checkpoint(self.acc, path, self.unwrapped(), self.optimizer, self.scheduler, state,
                                    self.s.save_total_limit, self.step)

    def load_checkpoint(self, path: Path) -> None:
        state = ckpt.load_checkpoint(self.acc, path, self.unwrapped(), self.optimizer, self.scheduler,
                                     self._must_match(), self.step)
        self.global_step = state["global_step"]
        self.step.load_state_dict(state.get("extra", {}))
        if self.acc.is_main_process:
            for name in RECORD_FILES:
                ckpt.truncate_records(self.run_dir / name, self.global_step)

    def _must_match(self) -> dict:
        return {"global_batch": self.global_batch, "seed": self.s.seed}


# ---------------------------------------------------------------------- helpers


def _flat_for_trackers(config: dict) -> dict:
    return {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in config.items()}
