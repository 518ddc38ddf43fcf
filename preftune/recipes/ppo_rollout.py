"""PPO's rollouts: prompts in, scored samples with per-token advantages and returns out.

One rollout samples a response per prompt (through the run's generation engine,
:mod:`preftune.engines`), scores each with the reward scorer (:mod:`preftune.scoring`: a function or a
reward model), recomputes every log-prob and value with the same forward the updates use (no grad,
dropout off, same temperature), builds the KL-penalised per-token reward with the score on the last
response token, and runs GAE and advantage whitening (:mod:`preftune.losses.ppo`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..engines import sample_with
from ..generate import SamplingSettings
from ..losses.ppo import explained_variance, gae_advantages, kl_penalty, masked_whiten, token_rewards
from ..losses.reward import eos_penalized
from ..runtime.distributed import gathered
from ..scoring import CheckedScorer, FunctionScorer, as_scorer
from ..scoring.reward_model import RewardModelScorer
from ..wrappers import evaluating
from .online import PromptExample, Replies, device_batches, pad_rows


def reward_scorer(cfg, device, reward=None) -> CheckedScorer:
    """The PPO reward: ``reward`` (a scorer or a function) when given, else the configured reward model or function."""
    if reward is not None:
        return as_scorer(reward, "reward")
    if cfg.reward_model_path:
        return RewardModelScorer(cfg.reward_model_path, device=device, batch_size=cfg.sampling_batch_size)
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
    replies: Replies | None = None                        # what the reward-hacking monitors read


def adjusted_scores(raw: torch.Tensor, ended: torch.Tensor, missing_eos_penalty: float,
                    moments: RunningMoments | None, all_scores: torch.Tensor | None, clip: float) -> torch.Tensor:
    """The score PPO optimises: penalise responses without EOS, then normalise (running) and clip."""
    scores = eos_penalized(raw, ended, missing_eos_penalty)
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
        self.reference = reference                # a live reference (runtime/reference.py)
        self.engine = engine                      # what samples the responses (preftune.engines)
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
            all_scores = self.acc.gather(eos_penalized(raw, ended, cfg.missing_eos_penalty))
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
        examples = [{"prompt": p.text, "response": t, "score": s, "ended": e}
                    for p, t, s, e in zip(prompts, texts, raw.tolist(), generation.ended)]
        replies = Replies(texts, list(generation.ended), lengths.tolist(), kl.sum(-1).tolist(), raw.tolist())
        return Rollout(samples, stats, examples, replies)

    @torch.no_grad()
    def forward_all(self, prompt_ids, response_ids) -> tuple[list[torch.Tensor], ...]:
        """Per response: policy log-probs, values, entropies and reference log-probs (1-D tensors)."""
        module = self.policy_value
        out: tuple[list, list, list, list] = ([], [], [], [])
        with evaluating(module):
            for batch, lengths in device_batches(prompt_ids, response_ids, self.cfg.sampling_batch_size,
                                                 self.tokenizer.pad_token_id, self.acc.device):
                with self.acc.autocast():
                    logps, values, entropy = module(batch, with_entropy=True)
                    ref = self.reference.token_logps(batch, self.cfg.temperature)
                for target, flat in zip(out, (logps, values, entropy, ref)):
                    target += list(torch.split(flat.float(), lengths))
        return out
