"""What the online recipes (PPO, GRPO/RLOO, online DPO) share: prompts, and one step of the loop.

Prompts are read by the run's modality (:meth:`~preftune.modality.base.Modality.read_prompts`): token ids for
text, ids with image tensors for prompts with images; the sampler gets each prompt's image tensors from the
modality (``sampling_inputs``) and the training forward runs on the modality's batches.

:class:`OnlineStep` is the loop's step function of every online recipe: a sampling phase (the recipe's
:meth:`~OnlineStep.sample`: generate, score or judge, build what the updates train on), then optimiser
updates over it (:func:`minibatch_updates` by default), the timing of both, the sampling statistics averaged
over processes, the sample-log cadence and the step's state for checkpoints. A recipe writes only what
differs: how it samples, how its updates are cut, what it does after them.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable

import torch
from rich.console import Console

from ..data import load_records
from ..data.columns import REWARD_ARGUMENTS, note_unused_columns
from ..data.prompts import PromptExample
from ..errors import ConfigError
from ..modality import TEXT, Modality, modality_for
from ..monitors import OnlineMonitor
from ..runtime.loop import StepOutput, window_mean
from ..runtime.run import start_run
from ..runtime.seeds import mix_seed

console = Console(stderr=True)


# ---------------------------------------------------------------------- prompts


@dataclass
class OnlineStart:
    """A started online run: its context, the modality of its prompts, the processor (a tokenizer for text),
    the text tokenizer within it, and the prompts (:class:`~preftune.data.prompts.PromptExample`)."""

    ctx: object
    modality: Modality
    processor: object
    tokenizer: object
    prompts: list[PromptExample]


def start_online_run(cfg, processor, outputs: str, modality: Modality | None = None) -> OnlineStart:
    """Start the run of a validated ``cfg``; load the processor (unless given) and the prompts, read by
    ``modality`` (default: the data's own, :func:`~preftune.modality.modality_for`).

    The tokenizer must have an EOS token: ``outputs`` (named in the error) end there.
    """
    modality = modality or modality_for(cfg)
    ctx = start_run(cfg, cfg.sanity_warnings())
    processor = processor or modality.load_processor(cfg.tokenizer_name_or_path or cfg.model_name_or_path, cfg)
    tokenizer = modality.tokenizer_of(processor)
    if tokenizer.eos_token_id is None:
        raise ConfigError(f"the tokenizer has no EOS token; {outputs} end at EOS")
    prompts = load_prompts(cfg.dataset, cfg.split, processor, cfg.max_prompt_length, cfg.skip_invalid, modality)
    return OnlineStart(ctx, modality, processor, tokenizer, prompts)


def load_prompts(source: str, split: str, processor, max_prompt_length: int, skip_invalid: bool = False,
                 modality: Modality = TEXT) -> list[PromptExample]:
    """Read and validate the ``prompt`` column through ``modality`` (text prompts keep their last
    ``max_prompt_length`` tokens; prompts with images are never cut)."""
    records = load_records(source, split=split)
    examples, report = modality.read_prompts(records, processor, max_prompt_length, skip_invalid)
    note_unused_columns(records, None, reserved=REWARD_ARGUMENTS)
    if report.skipped:
        reasons = ", ".join(f"{n} x {kind}" for kind, n in sorted(report.skipped.items()))
        skipped = report.total - report.kept
        console.print(f"[yellow]{records.name}: skipped {skipped} of {report.total} rows ({reasons})")
    return examples


# ---------------------------------------------------------------------- the online step


@dataclass
class Sampled:
    """What a sampling phase produced: the items the updates train on, statistics (averaged over processes
    by the step), rows for samples.jsonl, and how many examples the step counts (over all processes)."""

    items: list
    stats: dict[str, float]
    examples: list[dict] = field(default_factory=list)
    count: int = 0
    replies: Replies | None = None


@dataclass
class Replies:
    """This process's sampled replies, as the reward-hacking monitors (:mod:`preftune.monitors`) read them."""

    texts: list[str]
    ended: list[bool]
    lengths: list[int]                      # tokens
    kl: list[float] | None = None           # each reply's summed KL to the reference (nats)
    scores: list[float] | None = None       # the training reward or judge score of each reply


class MicroBatch(list):
    """A micro-batch of one optimiser update, with the update's loss-token count over every process divided by
    the number of micro-batch losses averaged (accumulation x processes), for token-mean losses: the
    denominator travels with the batch (``Task.collate`` reads ``loss_tokens``)."""

    def __init__(self, items, loss_tokens: float | None = None):
        super().__init__(items)
        self.loss_tokens = loss_tokens


class OnlineStep:
    """The loop's step function of an online recipe (see the module docstring). Subclasses implement
    :meth:`sample` and may override :meth:`update`, :meth:`after_update`, the state methods and ``gauges``."""

    gauges: tuple[str, ...] = ()

    def __init__(self, cfg):
        self.cfg = cfg
        self.monitor: OnlineMonitor | None = None

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def sample(self, trainer, step: int) -> Sampled:
        raise NotImplementedError

    def update(self, trainer, items: list, step: int) -> tuple[dict[str, list], int]:
        """Optimiser updates over the sampled items; every update's metrics and the tokens processed."""
        raise NotImplementedError

    def after_update(self, trainer, step: int, metrics: dict[str, float]) -> dict[str, float]:
        """Metrics (or state changes) that come after the updates: an adaptive KL coefficient, a reference sync."""
        return {}

    def run(self, trainer, step: int) -> StepOutput:
        cfg = self.cfg
        started = time.perf_counter()
        sampled = self.sample(trainer, step)
        if sampled.replies is not None:
            sampled.stats.update(self.watch(trainer, sampled.replies))
        sampling_time = time.perf_counter() - started
        updates, tokens = self.update(trainer, sampled.items, step)
        metrics = {**mean_over_processes(trainer.acc, sampled.stats),
                   **{k: window_mean(v) for k, v in updates.items()}, "learning_rate": updates["learning_rate"][-1]}
        metrics.update(self.after_update(trainer, step, metrics))
        metrics.update({"time/rollout": sampling_time, "time/update": time.perf_counter() - started - sampling_time})
        logged = cfg.log_samples_steps and ((step + 1) % cfg.log_samples_steps == 0 or step == 0)
        return StepOutput(metrics, sampled.count, tokens, sampled.examples[:cfg.log_samples] if logged else [])


    def watch(self, trainer, replies: Replies) -> dict[str, float]:
        """The monitors' ``monitor/...`` numbers for this step's replies, against the first step's; a crossed
        threshold is printed once (by the main process)."""
        if self.monitor is None:
            self.monitor = OnlineMonitor(self.cfg.thresholds(), trainer.acc.is_main_process, warn=console.print)
        return self.monitor.observe(replies.texts, replies.ended, replies.lengths, kl=replies.kl,
                                    scores=replies.scores)


def minibatch_updates(trainer, samples: list, *, epochs: int, per_update: int, micro: int, seed: int, step: int,
                      loss_tokens: Callable[[list], int] | None = None) -> tuple[dict[str, list], int]:
    """``epochs`` shuffled passes over ``samples``, one optimiser update per ``per_update`` of them (in
    micro-batches of ``micro``). The order is a function of (seed, step, epoch). With ``loss_tokens`` (the loss
    tokens of a list of samples), each micro-batch carries its update's token-mean denominator
    (:class:`MicroBatch`). Returns every update's metrics and the tokens processed."""
    metrics: dict[str, list[float]] = defaultdict(list)
    tokens = 0
    for epoch in range(epochs):
        generator = torch.Generator().manual_seed(mix_seed(seed, step, epoch))
        order = torch.randperm(len(samples), generator=generator).tolist()
        for start in range(0, len(order), per_update):
            chosen = [samples[i] for i in order[start:start + per_update]]
            denominator = None if loss_tokens is None else update_tokens(trainer, loss_tokens(chosen))
            out = trainer.optimizer_step([MicroBatch(chosen[k:k + micro], denominator)
                                          for k in range(0, len(chosen), micro)])
            tokens += out.tokens
            for key, value in out.metrics.items():
                metrics[key].append(value)
    return metrics, tokens


def update_tokens(trainer, local: int) -> float:
    """An update's loss tokens on every process, divided by the number of micro-batch losses the loop and data
    parallelism average (accumulation x processes): the token-mean denominator of each micro-batch."""
    value = torch.tensor(float(local), device=trainer.acc.device)
    total = float(trainer.acc.reduce(value, reduction="sum")) if trainer.world > 1 else float(value)
    return max(total, 1.0) / (trainer.s.gradient_accumulation_steps * trainer.world)


def pad_rows(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """1-D tensors -> ``(padded [B, T], mask [B, T])``, zeros after each row's end."""
    width = max(r.numel() for r in rows)
    out = rows[0].new_zeros((len(rows), width))
    mask = torch.zeros((len(rows), width), dtype=torch.bool, device=rows[0].device)
    for i, r in enumerate(rows):
        out[i, :r.numel()] = r
        mask[i, :r.numel()] = True
    return out, mask


def device_batches(prompts: list, response_ids: list[list[int]], size: int, pad_token_id: int, device,
                   modality: Modality = TEXT):
    """``(padded batch on device, completion lengths)`` for every ``size`` consecutive sequences; ``prompts`` as
    ``modality`` holds them (token ids, or ids with images)."""
    for start in range(0, len(prompts), size):
        batch = modality.collate_completions(prompts[start:start + size], response_ids[start:start + size],
                                             pad_token_id)
        yield to_device(batch, device), [len(r) for r in response_ids[start:start + size]]


def to_device(batch: dict, device) -> dict:
    """A batch's tensors on ``device`` (other values, such as a vision batch's ``repeats``, as they are)."""
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def mean_over_processes(acc, stats: dict[str, float]) -> dict[str, float]:
    """Each statistic averaged over the processes (every process gets the same dict)."""
    if acc.num_processes == 1:
        return dict(stats)
    from accelerate.utils import gather_object

    # a statistic one process lacks (a monitor's alarm only it raised) must not desynchronise the collective:
    # every process reduces the union of the keys, each averaging over the processes that have it
    keys = sorted(set(gather_object(sorted(stats))))
    values = torch.tensor([[float(stats.get(k, float("nan"))) for k in keys]], device=acc.device)
    gathered = acc.gather(values)
    return dict(zip(keys, gathered.nanmean(dim=0).tolist()))


