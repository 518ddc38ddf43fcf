"""GRPO and RLOO sampling: groups of completions per prompt, scored, with their advantages.

For each prompt :class:`GroupSampler` samples ``num_generations`` completions (through the run's
generation engine, :mod:`preftune.engines`; the ``G`` completions of a prompt are contiguous), scores
them with every reward function (:mod:`preftune.scoring`, each logged on its own), optionally drops
groups whose rewards are all equal and samples more prompts (DAPO dynamic sampling), runs the no-grad
forwards the updates need (the sampling policy's log-probs when updates go off-policy, the reference's
when ``beta > 0``) and turns the weighted total reward into advantages (:mod:`preftune.losses.grpo`).

Completion ``j`` of the step's ``g``-th prompt (counted over all processes) is sampled with its own seed,
a function of (seed, step, g, j), and the batch-wide numbers (``scale_rewards: batch``, the logged
reward and length statistics) are taken over every process's groups: the samples, advantages and
metrics do not depend on the number of processes (dynamic sampling's extra prompts excepted).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from ..config import GRPOConfig
from ..engines import sample_with
from ..errors import ConfigError
from ..generate import SamplingSettings
from ..losses.grpo import (
    combined_rewards,
    frac_reward_zero_std,
    group_advantages,
    overlong_penalty,
    reinforce_pp_advantages,
    rloo_advantages,
    zero_std_groups,
)
from ..losses.reward import eos_penalized
from ..modality import FLAT
from ..runtime.distributed import gathered
from ..runtime.seeds import mix_seed
from ..scoring import FunctionScorer, as_scorer, check_scores
from ..wrappers import evaluating
from .online import PromptExample, Replies, device_batches, pad_rows


@dataclass
class Completion:
    """One sampled completion and what its updates need (per-token tensors over its tokens, or None)."""

    prompt: list[int] | object            # as the modality holds it: token ids, or ids with images
    response_ids: list[int]
    advantage: float
    truncated: bool                       # reached max_completion_length without EOS
    old_logps: Tensor | None = None       # the sampling policy's, when the updates go off-policy
    ref_logps: Tensor | None = None       # the reference's, when beta > 0


def reward_scorers(cfg: GRPOConfig, device, given=None) -> list:
    """One checked scorer per reward function: the given objects, else ``cfg.reward_funcs`` (a
    ``module:function`` name, or a reward model directory). Names are unique: they key the metrics."""
    if given:
        scorers = [as_scorer(obj, "reward_funcs") for obj in given]
    else:
        scorers = []
        for spec in cfg.reward_funcs:
            if Path(spec).is_dir():
                from ..scoring.reward_model import RewardModelScorer

                scorers.append(RewardModelScorer(spec, device=device, batch_size=cfg.sampling_batch_size))
            else:
                scorers.append(FunctionScorer(spec, option="reward_funcs", name=spec.rpartition(":")[2]))
    if cfg.reward_weights and len(cfg.reward_weights) != len(scorers):
        raise ConfigError(f"{len(cfg.reward_weights)} reward_weights for {len(scorers)} reward functions")
    names = [Path(str(s.name)).name or "reward" for s in scorers]
    return [(name if names.count(name) == 1 else f"{name}_{i}", s) for i, (name, s) in enumerate(zip(names, scorers))]


@dataclass
class Groups:
    """Sampled groups, flat: completion ``i`` belongs to prompt ``i // G``."""

    prompts: list[PromptExample]
    response_ids: list[list[int]]
    texts: list[str]
    ended: list[bool]
    per_function: Tensor                  # [N, K] rewards of each reward function
    total: Tensor                         # [N] what the advantages use: weighted sum (of normalised rewards
                                          # with normalize_rewards), plus the overlong penalty
    reward: Tensor                        # [N] the same of the raw rewards (logged)

    def select(self, groups: list[int], size: int) -> "Groups":
        rows = [g * size + j for g in groups for j in range(size)]
        return Groups([self.prompts[g] for g in groups], [self.response_ids[i] for i in rows],
                      [self.texts[i] for i in rows], [self.ended[i] for i in rows], self.per_function[rows],
                      self.total[rows], self.reward[rows])

    @staticmethod
    def join(parts: list["Groups"]) -> "Groups":
        return Groups([p for g in parts for p in g.prompts], [r for g in parts for r in g.response_ids],
                      [t for g in parts for t in g.texts], [e for g in parts for e in g.ended],
                      *(torch.cat([getattr(g, name) for g in parts]) for name in ("per_function", "total", "reward")))


@dataclass
class Batch:
    completions: list[Completion]
    stats: dict[str, float]
    examples: list[dict] = field(default_factory=list)
    replies: Replies | None = None           # what the reward-hacking monitors read


class GroupSampler:
    """Prompts in, scored groups of completions with their advantages out."""

    def __init__(self, cfg: GRPOConfig, accelerator, module, scorers: list, tokenizer, reference, engine):
        self.cfg = cfg
        self.acc = accelerator
        self.module = module              # the unwrapped CompletionLogprobs the loop trains
        self.scorers = scorers            # [(name, scorer)]
        self.tokenizer = tokenizer
        self.reference = reference
        self.engine = engine              # what samples the completions (preftune.engines)
        self.settings = SamplingSettings(max_new_tokens=cfg.max_completion_length, temperature=cfg.temperature,
                                         top_k=cfg.top_k, top_p=cfg.top_p, do_sample=True)
        weights = cfg.reward_weights or [1.0] * len(scorers)
        self.weights = torch.tensor(weights, dtype=torch.float32)

    def sample(self, prompts: list[PromptExample], seed: int, first: int) -> Groups:
        """``G`` completions of each prompt, scored; prompt ``i`` is group ``first + i`` of the step."""
        cfg, size = self.cfg, self.cfg.num_generations
        repeated = [p for p in prompts for _ in range(size)]
        seeds = [mix_seed(seed, first + i, j) for i in range(len(prompts)) for j in range(size)]
        images = self.module.modality.sampling_inputs([p.encoded for p in repeated])   # None for text
        with self.acc.autocast(), gathered(self.module):  # FSDP2: the whole policy, no collective per token
            generation = sample_with(self.engine, self.module.model, [p.ids for p in repeated], self.settings,
                                     row_seeds=seeds, prompt_inputs=images)
        texts = self.tokenizer.batch_decode(generation.response_ids, skip_special_tokens=True)
        columns = [score(scorer, repeated, texts) for _, scorer in self.scorers]
        per_function = torch.tensor(columns, dtype=torch.float32).T.reshape(len(texts), len(columns))
        reward = combined_rewards(per_function, self.weights)
        total = combined_rewards(per_function, self.weights, size, normalize=True) if cfg.normalized_sum else reward
        if cfg.eos_mode() == "penalize":
            penalty = eos_penalized(torch.zeros(len(generation.ended)), generation.ended, cfg.missing_eos_penalty)
            reward, total = reward + penalty, total + penalty
        if cfg.overlong_cache:
            lengths = torch.tensor([len(r) for r in generation.response_ids])
            penalty = overlong_penalty(lengths, cfg.max_completion_length, cfg.overlong_cache)
            reward, total = reward + penalty, total + penalty
        return Groups(prompts, generation.response_ids, texts, generation.ended, per_function, total, reward)

    def collect(self, trainer, step: int, local_prompts: int) -> Batch:
        """The step's groups (with dynamic sampling: groups with a reward spread, resampled), then advantages."""
        cfg, size = self.cfg, self.cfg.num_generations
        first = self.sample(trainer.step_examples(step, local_prompts), mix_seed(cfg.seed, step, 0),
                            trainer.rank * local_prompts)
        scale = cfg.reward_scaling if cfg.advantage == "grpo" else "group"   # the std TRL tests for 0 (RLOO: finish)
        stats = {"frac_reward_zero_std": float(frac_reward_zero_std(self.everywhere(first.total), size,
                                                                    scale_rewards=scale))}
        groups = first
        if cfg.dynamic_sampling:
            groups, attempts = self.resample(trainer, step, first, local_prompts)
            stats["dynamic_sampling/attempts"] = float(attempts)
        return self.finish(groups, stats)

    def resample(self, trainer, step: int, first: Groups, wanted: int) -> tuple[Groups, int]:
        """DAPO dynamic sampling: keep groups whose rewards differ, sample more prompts until ``wanted``
        groups (at most ``max_resample_attempts`` more rounds), then fill up with all-equal groups."""
        cfg, size = self.cfg, self.cfg.num_generations
        kept, dropped, current, attempt = [], [], first, 0
        while True:
            zero = zero_std_groups(current.total, size).tolist()
            kept.append(current.select([g for g, z in enumerate(zero) if not z], size))
            dropped.append(current.select([g for g, z in enumerate(zero) if z], size))
            missing = wanted - sum(len(k.prompts) for k in kept)
            if missing <= 0 or attempt == cfg.max_resample_attempts:
                break
            attempt += 1
            seed = mix_seed(cfg.seed, step, attempt)
            generator = torch.Generator().manual_seed(mix_seed(seed, trainer.rank))
            picks = torch.randint(len(trainer.train_examples), (missing,), generator=generator)
            current = self.sample([trainer.train_examples[i] for i in picks.tolist()], seed, trainer.rank * wanted)
        groups = Groups.join(kept + dropped)
        return groups.select(list(range(wanted)), size), attempt + 1

    def finish(self, groups: Groups, stats: dict[str, float]) -> Batch:
        cfg, size = self.cfg, self.cfg.num_generations
        prompts = [p.encoded for p in groups.prompts for _ in range(size)]
        kl_in_reward = cfg.advantage != "grpo" and cfg.beta > 0
        off_policy = cfg.num_iterations > 1 or cfg.updates_per_generation(self.acc.num_processes) > 1 or kl_in_reward
        old, ref = self.token_logps(prompts, groups.response_ids, off_policy, cfg.beta > 0)
        if cfg.advantage != "grpo":
            mask = pad_rows([torch.ones(len(r)) for r in groups.response_ids])[1]
            token_kl = torch.zeros(mask.shape)
            if kl_in_reward:   # the k1 estimate the reward subtracts, logged per token over every process (as TRL)
                (old_pad, mask), ref_pad = pad_rows(old), pad_rows(ref)[0]
                token_kl = (old_pad - ref_pad).masked_fill(~mask, 0.0).cpu()   # k1
                mask = mask.cpu()
                tokens = self.everywhere(mask.sum(-1).float())
                stats["kl"] = float(self.everywhere(token_kl.sum(-1)).sum() / tokens.sum().clamp(min=1.0))
            kl = token_kl.sum(-1)
        if cfg.advantage == "rloo":
            shaped = groups.total - cfg.beta * kl
            stats["frac_reward_zero_std"] = float(frac_reward_zero_std(self.everywhere(shaped), size))
            advantages = rloo_advantages(groups.total, kl, cfg.beta, size)
        elif cfg.advantage != "grpo":   # REINFORCE++: per-token advantages, whitened over this process's tokens
            baseline = size if cfg.advantage == "reinforce_pp_baseline" else None
            per_token = reinforce_pp_advantages(groups.total, token_kl, mask, cfg.beta, baseline)
            advantages = [row[:len(r)].float() for row, r in zip(per_token, groups.response_ids)]
        else:   # over every process's groups (the batch std), this process's part
            n = len(groups.total)
            advantages = group_advantages(self.everywhere(groups.total), size, cfg.reward_scaling)
            advantages = advantages[self.acc.process_index * n:(self.acc.process_index + 1) * n]
        advantages = advantages if isinstance(advantages, list) else [float(a) for a in advantages.tolist()]
        completions = [Completion(p, r, a, not e, old[i] if old else None, ref[i] if ref else None)
                       for i, (p, r, a, e) in enumerate(zip(prompts, groups.response_ids, advantages,
                                                            groups.ended))]
        stats.update(self.reward_stats(groups))
        examples = [{"prompt": p.text, "completion": t, "reward": r}
                    for p, t, r in zip([p for p in groups.prompts for _ in range(size)], groups.texts,
                                       groups.reward.tolist())]
        replies = Replies(groups.texts, list(groups.ended), [len(r) for r in groups.response_ids],
                          scores=groups.reward.tolist())
        return Batch(completions, stats, examples, replies)

    def everywhere(self, values: Tensor) -> Tensor:
        """``values`` of every process, concatenated in process order (each process has as many)."""
        if self.acc.num_processes == 1:
            return values
        return self.acc.gather(values.to(self.acc.device)).cpu()

    def reward_stats(self, groups: Groups) -> dict[str, float]:
        """The logged statistics, over every process's groups."""
        lengths = self.everywhere(torch.tensor([len(r) for r in groups.response_ids], dtype=torch.float32))
        reward, per_function = self.everywhere(groups.reward), self.everywhere(groups.per_function)
        ended = self.everywhere(torch.tensor(groups.ended, dtype=torch.float32))
        stats = {"reward": float(reward.mean()),
                 "reward_std": float(reward.std()) if reward.numel() > 1 else 0.0,   # over the batch, as TRL
                 "completions/mean_length": float(lengths.mean()), "completions/min_length": float(lengths.min()),
                 "completions/max_length": float(lengths.max()), "completions/clipped_ratio": 1.0 - float(ended.mean())}
        for k, (name, _) in enumerate(self.scorers):
            column = per_function[:, k]
            stats[f"rewards/{name}/mean"] = float(column.mean())
            stats[f"rewards/{name}/std"] = float(column.std()) if column.numel() > 1 else 0.0
        return stats

    @torch.no_grad()
    def token_logps(self, prompts, response_ids, want_old: bool, want_ref: bool):
        """Per completion (1-D tensors): the sampling policy's log-probs and the reference's, each only if wanted."""
        if not (want_old or want_ref):
            return None, None
        old, ref = [], []
        with evaluating(self.module):
            for batch, lengths in device_batches(prompts, response_ids, self.cfg.sampling_batch_size,
                                                 self.tokenizer.pad_token_id, self.acc.device, self.module.modality):
                with self.acc.autocast():
                    if want_old:
                        old += torch.split(self.module(batch, FLAT).values.float(), lengths)
                    if want_ref:
                        ref += torch.split(self.reference.token_logps(batch, self.cfg.temperature).float(), lengths)
        return old or None, ref or None


def score(scorer, prompts: list[PromptExample], texts: list[str]) -> list[float]:
    """``scorer``'s rewards. Reward functions are called as TRL calls them when they ask for it: one with a
    ``completions`` parameter gets keywords (``prompts=``, ``completions=``), and one with ``**kwargs`` or
    parameters named after the dataset's other columns also gets those columns, one value per completion
    (the reference answer a verifiable reward checks against)."""
    params = _parameters(getattr(scorer, "fn", None))
    if params is None:
        return scorer.score([p.prompt for p in prompts], texts)
    columns = prompts[0].columns if prompts else {}
    any_keyword = any(p.kind is p.VAR_KEYWORD for p in params.values())
    wanted = [k for k in columns if any_keyword or k in params]
    if not wanted and "completions" not in params:
        return scorer.score([p.prompt for p in prompts], texts)
    extra = {k: [p.columns.get(k) for p in prompts] for k in wanted}
    if "completions" in params:
        if "prompts" in params or any_keyword:
            extra["prompts"] = [p.prompt for p in prompts]
        values = scorer.fn(completions=texts, **extra)
    else:
        values = scorer.fn([p.prompt for p in prompts], texts, **extra)
    return check_scores(scorer.name, values, len(texts))


def _parameters(fn) -> dict | None:
    if fn is None:
        return None
    try:
        return dict(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return None
