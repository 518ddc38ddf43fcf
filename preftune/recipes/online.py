"""PPO rollouts: prompts in, scored samples with per-token advantages and returns out.

One rollout samples a response per prompt (through the run's generation engine,
:mod:`preftune.engines`), scores each with the reward scorer (:mod:`preftune.scoring`: a function or a
reward model), recomputes every log-prob and value with the same forward the updates use (no grad,
dropout off, same temperature), builds the KL-penalised per-token reward with the score on the last
response token, and runs GAE and advantage whitening (:mod:`preftune.losses.ppo`).
"""

from __future__ import annotations

import contextlib
import math
from collections import defaultdict
from dataclasses import dataclass, field

import torch
from rich.console import Console
from torch import nn

from ..data import load_records
from ..data.collate import collate_completions
from ..data.messages import prompt_text
from ..data.rows import InvalidRow, settle_problems
from ..engines import sample_with
from ..errors import ConfigError
from ..generate import SamplingSettings
from ..losses.ppo import explained_variance, gae_advantages, kl_penalty, masked_whiten, token_rewards
from ..models import load_tokenizer
from ..monitors import OnlineMonitor
from ..runtime.distributed import gathered
from ..runtime.run import start_run
from ..scoring import CheckedScorer, FunctionScorer, as_scorer
from ..scoring.reward_model import RewardModelScorer

console = Console(stderr=True)


# ---------------------------------------------------------------------- prompts


@dataclass
class PromptExample:
    prompt: str | list        # as in the data: handed to reward functions
    text: str                 # the prompt as the policy reads it (chat template applied)
    ids: list[int]
    row: int
    columns: dict = field(default_factory=dict)   # the row's other fields (a reference answer for a reward function)


def start_online_run(cfg, tokenizer, outputs: str):
    """Start the run of a validated ``cfg``; load the tokenizer (unless given) and the prompts.

    The tokenizer must have an EOS token: ``outputs`` (named in the error) end there.
    """
    ctx = start_run(cfg, cfg.sanity_warnings())
    tokenizer = tokenizer or load_tokenizer(cfg.tokenizer_name_or_path or cfg.model_name_or_path)
    if tokenizer.eos_token_id is None:
        raise ConfigError(f"the tokenizer has no EOS token; {outputs} end at EOS")
    prompts = load_prompts(cfg.dataset, cfg.split, tokenizer, cfg.max_prompt_length, cfg.skip_invalid)
    return ctx, tokenizer, prompts


def load_prompts(source: str, split: str, tokenizer, max_prompt_length: int,
                 skip_invalid: bool = False) -> list[PromptExample]:
    """Read and validate the ``prompt`` column; long prompts keep their last ``max_prompt_length`` tokens."""
    records = load_records(source, split=split)
    examples, problems = [], []
    for row, number in zip(records.rows, records.row_numbers):
        try:
            example = _prompt_example(row.get("prompt"), number, tokenizer, max_prompt_length)
            example.columns = {k: v for k, v in row.items() if k != "prompt"}
            examples.append(example)
        except InvalidRow as invalid:
            problems.append(invalid.problem(records.name, number))
    report = settle_problems(records.name, len(records.rows), examples, problems, skip_invalid)
    if report.skipped:
        reasons = ", ".join(f"{n} x {kind}" for kind, n in sorted(report.skipped.items()))
        skipped = report.total - report.kept
        console.print(f"[yellow]{records.name}: skipped {skipped} of {report.total} rows ({reasons})")
    return examples


def _prompt_example(value, number: int, tokenizer, max_prompt_length: int) -> PromptExample:
    text, chat = prompt_text(tokenizer, value)
    ids = list(tokenizer(text, add_special_tokens=not chat)["input_ids"])
    if not ids:
        raise InvalidRow("empty prompt", "prompt", "the prompt has no tokens")
    return PromptExample(value, text, ids[-max_prompt_length:], number)


# ---------------------------------------------------------------------- reward


def reward_scorer(cfg, device, reward=None) -> CheckedScorer:
    """The PPO reward: ``reward`` (a scorer or a function) when given, else the configured reward model or function."""
    if reward is not None:
        return as_scorer(reward, "reward")
    if cfg.reward_model_path:
        return RewardModelScorer(cfg.reward_model_path, device=device, batch_size=cfg.generation_batch_size)
    return FunctionScorer(cfg.reward_function, option="reward_function")


@dataclass
class RunningMoments:
    """Mean and standard deviation of every score seen so far (Chan et al.'s parallel update)."""

    count: float = 0.0
    mean: float = 0.0
    m2: float = 0.0

    def update(self, values: torch.Tensor) -> None:
        n = float(values.numel())
        if n == 0:
            return
        batch_mean = float(values.double().mean())
        batch_m2 = float(((values.double() - batch_mean) ** 2).sum())
        total = self.count + n
        delta = batch_mean - self.mean
        self.mean += delta * n / total
        self.m2 += batch_m2 + delta ** 2 * self.count * n / total
        self.count = total

    @property
    def std(self) -> float:
        return math.sqrt(self.m2 / self.count) if self.count > 1 else 1.0


# ---------------------------------------------------------------------- rollouts


@dataclass
class Sample:
    """One response and its per-token training targets (1-D tensors over the response tokens)."""

    prompt_ids: list[int]
    response_ids: list[int]
    old_logps: torch.Tensor
    old_values: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor


@dataclass
class Rollout:
    samples: list[Sample]
    stats: dict[str, float]
    examples: list[dict] = field(default_factory=list)   # prompt / response / score rows for samples.jsonl


def pad_rows(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """1-D tensors -> ``(padded [B, T], mask [B, T])``, zeros after each row's end."""
    width = max(r.numel() for r in rows)
    out = rows[0].new_zeros((len(rows), width))
    mask = torch.zeros((len(rows), width), dtype=torch.bool, device=rows[0].device)
    for i, r in enumerate(rows):
        out[i, :r.numel()] = r
        mask[i, :r.numel()] = True
    return out, mask


def adjusted_scores(raw: torch.Tensor, ended: torch.Tensor, missing_eos_penalty: float,
                    moments: RunningMoments | None, all_scores: torch.Tensor | None, clip: float) -> torch.Tensor:
    """The score PPO optimises: penalise responses without EOS, then normalise (running) and clip."""
    scores = raw - missing_eos_penalty * (~ended).to(raw.dtype)
    if moments is not None:
        moments.update(all_scores if all_scores is not None else scores)
        scores = (scores - moments.mean) / (moments.std + 1e-8)
    if clip > 0:
        scores = scores.clamp(-clip, clip)
    return scores


class RolloutWorker:
    """Everything a rollout needs that stays fixed over the run."""

    def __init__(self, *, cfg, accelerator, policy_value, reward, tokenizer, reference, engine):
        self.cfg = cfg
        self.acc = accelerator
        self.policy_value = policy_value          # unwrapped PolicyValue
        self.reward = reward                      # a preftune.scoring scorer
        self.tokenizer = tokenizer
        self.reference = reference                # a live reference (train/reference.py)
        self.engine = engine                      # what samples the responses (preftune.engines)
        self.monitor = OnlineMonitor(cfg.thresholds(), accelerator.is_main_process, warn=console.print)
        self.settings = SamplingSettings(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                                         top_k=cfg.top_k, top_p=cfg.top_p, do_sample=True)

    def collect(self, prompts: list[PromptExample], seed: int, kl_coef: float,
                moments: RunningMoments | None) -> Rollout:
        cfg, device = self.cfg, self.acc.device
        policy = self.policy_value.policy
        with self.acc.autocast(), gathered(self.policy_value):  # FSDP2: the whole policy, no per-token collective
            generation = sample_with(self.engine, policy, [p.ids for p in prompts], self.settings, seed=seed)
        texts = self.tokenizer.batch_decode(generation.response_ids, skip_special_tokens=True)
        raw = torch.tensor(self.reward.score([p.prompt for p in prompts], texts), dtype=torch.float32, device=device)
        ended = torch.tensor(generation.ended, device=device)
        all_scores = None
        if cfg.normalize_scores:  # every process keeps the same statistics: update them with all scores
            all_scores = self.acc.gather(raw - cfg.missing_eos_penalty * (~ended).float())
        scores = adjusted_scores(raw, ended, cfg.missing_eos_penalty, moments if cfg.normalize_scores else None,
                                 all_scores, cfg.score_clip)

        logps, values, entropy, ref_logps = self.forward_all(generation.prompt_ids, generation.response_ids)
        logps, mask = pad_rows(logps)
        values, entropy, ref_logps = pad_rows(values)[0], pad_rows(entropy)[0], pad_rows(ref_logps)[0]
        kl = kl_penalty(logps, ref_logps, cfg.kl_estimator) * mask
        rewards = token_rewards(scores, kl, mask, kl_coef)
        advantages, returns = gae_advantages(rewards, values, mask, cfg.gamma, cfg.lam)
        advantages = masked_whiten(advantages, mask)
        if cfg.eos_mode() == "drop":   # an unfinished response takes no part in the policy update
            advantages = advantages * ended[:, None].to(advantages.dtype)

        lengths = mask.sum(-1)
        samples = [Sample(list(p), list(r), logps[i, :n], values[i, :n], advantages[i, :n], returns[i, :n])
                   for i, (p, r, n) in enumerate(zip(generation.prompt_ids, generation.response_ids, lengths.tolist()))]
        non_score = (-kl_coef * kl).sum(-1)
        stats = {
            "objective/scores": float(raw.mean()),
            "objective/kl": float(kl.sum(-1).mean()),
            "objective/entropy": float((entropy * mask).sum(-1).mean()),
            "objective/non_score_reward": float(non_score.mean()),
            "objective/rlhf_reward": float((non_score + scores).mean()),
            "val/explained_variance": explained_variance(values, returns, mask),
            "val/mean": float(values[mask].mean()),
            "response/length": float(lengths.float().mean()),
            "response/ended": float(ended.float().mean()),
        }
        if self.monitor is not None:
            stats.update(self.monitor.observe(texts, generation.ended, lengths.tolist(), kl=kl.sum(-1).tolist(),
                                              scores=raw.tolist()))
        examples = [{"prompt": p.text, "response": t, "score": s, "ended": e}
                    for p, t, s, e in zip(prompts, texts, raw.tolist(), generation.ended)]
        return Rollout(samples, stats, examples)

    @torch.no_grad()
    def forward_all(self, prompt_ids, response_ids) -> tuple[list[torch.Tensor], ...]:
        """Per response: policy log-probs, values, entropies and reference log-probs (1-D tensors)."""
        module = self.policy_value
        out: tuple[list, list, list, list] = ([], [], [], [])
        with evaluating(module):
            for batch, lengths in device_batches(prompt_ids, response_ids, self.cfg.generation_batch_size,
                                                 self.tokenizer.pad_token_id, self.acc.device):
                with self.acc.autocast():
                    logps, values, entropy = module(batch["input_ids"], batch["attention_mask"],
                                                    batch["completion_mask"], with_entropy=True)
                    ref = self.reference.token_logps(batch, self.cfg.temperature)
                for target, flat in zip(out, (logps, values, entropy, ref)):
                    target += list(torch.split(flat.float(), lengths))
        return out


# ---------------------------------------------------------------------- updates (PPO, GRPO, RLOO)


def minibatch_updates(trainer, samples: list, *, epochs: int, per_update: int, micro: int, seed: int, step: int,
                      before_update=None) -> tuple[dict[str, list], int]:
    """``epochs`` shuffled passes over ``samples``, one optimiser update per ``per_update`` of them (in
    micro-batches of ``micro``). The order is a function of (seed, step, epoch); ``before_update(chosen)``,
    if given, sees each update's samples first. Returns every update's metrics and the tokens processed."""
    metrics: dict[str, list[float]] = defaultdict(list)
    tokens = 0
    for epoch in range(epochs):
        generator = torch.Generator().manual_seed((seed * 1_000_003 + step * 1_009 + epoch) % 2**62)
        order = torch.randperm(len(samples), generator=generator).tolist()
        for start in range(0, len(order), per_update):
            chosen = [samples[i] for i in order[start:start + per_update]]
            if before_update is not None:
                before_update(chosen)
            out = trainer.optimizer_step([chosen[k:k + micro] for k in range(0, len(chosen), micro)])
            tokens += out.tokens
            for key, value in out.metrics.items():
                metrics[key].append(value)
    return metrics, tokens


def device_batches(prompt_ids: list[list[int]], response_ids: list[list[int]], size: int, pad_token_id: int, device):
    """``(padded batch on device, completion lengths)`` for every ``size`` consecutive sequences."""
    for start in range(0, len(prompt_ids), size):
        batch = collate_completions(prompt_ids[start:start + size], response_ids[start:start + size], pad_token_id)
        yield {k: v.to(device) for k, v in batch.items()}, [len(r) for r in response_ids[start:start + size]]


@contextlib.contextmanager
def evaluating(module: nn.Module):
    """``module`` in eval mode for the block (no dropout), its mode restored after."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)


def mean_over_processes(acc, stats: dict[str, float]) -> dict[str, float]:
    """Each statistic averaged over the processes (every process gets the same dict)."""
    if acc.num_processes == 1:
        return dict(stats)
    keys = sorted(stats)
    reduced = acc.reduce(torch.tensor([stats[k] for k in keys], device=acc.device), reduction="mean")
    return dict(zip(keys, reduced.tolist()))


def no_dropout(model: nn.Module) -> None:
    """Every dropout off, LoRA's included: rollouts and updates must evaluate the same function."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0
