"""Critic-free online RL (GRPO, RLOO and their DAPO / Dr. GRPO variants) as pure functions.

Several completions are sampled for each prompt; a *group* is the ``G`` completions of one prompt,
laid out contiguously: a flat ``[N]`` tensor of per-sequence values with ``N = groups x G`` holds
group ``g`` at ``[g·G, (g+1)·G)`` (the order of ``repeat_interleave``). Per-token tensors are
``[B, T]`` over completion tokens with a bool ``mask`` (True on completion tokens, False on padding).

References:

- GRPO: Shao et al. 2024, "DeepSeekMath", eq. 3-4: ``Â_i = (r_i - mean(r)) / std(r)`` within a group;
  loss ``1/G Σ_i 1/|o_i| Σ_t`` of the clipped surrogate.
- RLOO: Ahmadian et al. 2024, "Back to Basics: Revisiting REINFORCE Style Optimization for Learning
  from Human Feedback in LLMs": reward ``R_i = r_i - β·KL_i`` (sequence KL folded in), baseline the
  mean of the other ``G - 1`` samples' ``R``.
- DAPO: Yu et al. 2025, "DAPO: An Open-Source LLM Reinforcement Learning System at Scale": decoupled
  clip ``ε_low`` / ``ε_high`` ("clip-higher"), token-level loss (``token_mean``), dynamic sampling
  (drop groups whose rewards are all equal), overlong filtering and soft overlong punishment.
- Dr. GRPO: Liu et al. 2025, "Understanding R1-Zero-Like Training: A Critical Perspective": no
  std division (``scale_rewards="none"``) and a constant loss normaliser (``constant``).
- Batch std: Liu et al. 2025, "Part I: Tricks or Traps? A Deep Dive into RL for LLM Reasoning"
  (group mean, batch std; ``scale_rewards="batch"``).
- k3 KL estimator: Schulman 2020, "Approximating KL Divergence" (:func:`preftune.losses.ppo.kl_penalty`).
- GSPO: Zheng et al. 2025, "Group Sequence Policy Optimization": one importance ratio per sequence,
  ``exp(mean_t log π/π_old)`` (``importance_sampling_level="sequence"``); LUSPO sums its tokens per
  sequence (``sequence_sum``). CISPO: MiniMax 2025, "MiniMax-M1": the clipped, detached ratio weights
  ``A·log π``. SAPO: Gao et al. 2025, "Soft Adaptive Policy Optimization": a sigmoid gate instead of
  the clip. VESPO: TRL 1.16's gamma-shaped sequence weight φ(w) = e^λ·w^k·e^(-λw) times ``A·log π``.
  Two-sided clipping ``delta``: Cui et al. 2025 (INTELLECT-2). The off-policy sequence mask:
  DeepSeek-AI 2025, "DeepSeek-V3.2". Entropy masking: Wang et al. 2025, "Beyond the 80/20 Rule".
  REINFORCE++: Hu 2025, "REINFORCE++: A Simple and Efficient Approach for Aligning Large Language Models".
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .ppo import kl_penalty, masked_mean

SCALE_REWARDS = ("group", "batch", "none")
AGGREGATIONS = ("token_mean", "sequence_mean", "constant", "sequence_sum")
# TRL's ``loss_type`` names for the same aggregations ("bnpo" and "dapo" differ in TRL only in
# which batch the tokens are counted over; here ``num_tokens`` says that).
LOSS_TYPE_ALIASES = {"grpo": "sequence_mean", "dapo": "token_mean", "bnpo": "token_mean", "dr_grpo": "constant",
                     "luspo": "sequence_sum"}
OBJECTIVES = ("clip", "cispo", "sapo", "vespo")


def _groups(values: Tensor, group_size: int) -> Tensor:
    """``[N]`` -> ``[N / G, G]``, with a clear error when ``N`` is not a multiple of ``G``."""
    if group_size < 2:
        raise ValueError(f"a group needs at least 2 completions per prompt, got group_size={group_size}")
    if values.dim() != 1 or values.numel() % group_size:
        raise ValueError(f"expected a flat tensor of groups of {group_size}, got shape {tuple(values.shape)}")
    return values.view(-1, group_size)


def group_std(rewards: Tensor, group_size: int) -> Tensor:
    """``[N / G]`` sample standard deviation of each group's rewards (Bessel-corrected, over ``G``)."""
    return _groups(rewards, group_size).std(dim=1)


def group_advantages(rewards: Tensor, group_size: int, scale_rewards: str = "group", eps: float = 1e-4) -> Tensor:
    """GRPO advantages ``[N]``, one per completion (DeepSeekMath eq. 4, outcome supervision).

    ``A_i = (r_i - mean_g(r)) / (s + eps)`` where ``mean_g`` is the mean of the completion's group and

    - ``group``: ``s`` = the group's sample std (original GRPO);
    - ``batch``: ``s`` = the sample std of all ``N`` rewards (group mean, batch std);
    - ``none``:  no division (Dr. GRPO): ``A_i = r_i - mean_g(r)``.

    A group whose rewards are all equal gets advantage 0 under every mode.
    """
    grouped = _groups(rewards, group_size)
    centred = (grouped - grouped.mean(dim=1, keepdim=True)).reshape(-1)
    if scale_rewards == "group":
        return centred / (group_std(rewards, group_size).repeat_interleave(group_size) + eps)
    if scale_rewards == "batch":
        return centred / (rewards.std() + eps)
    if scale_rewards == "none":
        return centred
    raise ValueError(f"unknown scale_rewards '{scale_rewards}' (choose {', '.join(SCALE_REWARDS)})")


def combined_rewards(per_function: Tensor, weights: Tensor | None = None, group_size: int | None = None,
                     normalize: bool = False) -> Tensor:
    """``[N]`` total reward from ``[N, K]`` rewards of ``K`` reward functions: ``Σ_k w_k·r_k`` (weights 1 by default).

    ``normalize`` first standardises each function's rewards within each group,
    ``r_k ← (r_k - mean_g(r_k)) / (std_g(r_k) + 1e-4)`` (as :func:`group_advantages` with ``group``),
    so that a function with a large scale or spread does not drown the others.
    """
    if per_function.dim() != 2:
        raise ValueError(f"expected [completions, reward functions] rewards, got shape {tuple(per_function.shape)}")
    if normalize:
        if group_size is None:
            raise ValueError("per-reward normalisation needs the group size")
        per_function = torch.stack([group_advantages(column, group_size, "group") for column in per_function.T], dim=1)
    if weights is None:
        return per_function.sum(dim=1)
    if weights.shape != per_function.shape[1:]:
        raise ValueError(f"{weights.numel()} reward weights for {per_function.shape[1]} reward functions")
    return per_function @ weights.to(per_function.dtype)


def rloo_advantages(rewards: Tensor, kl: Tensor, beta: float, group_size: int) -> Tensor:
    """RLOO advantages ``[N]`` with the KL folded into the reward (Ahmadian et al. 2024, sec. 3-4).

    ``R_i = r_i - β·KL_i``  (``KL_i``: the completion's KL to the reference, e.g. Σ_t log π - log π_ref)

    ``A_i = R_i - 1/(G-1) Σ_{j≠i} R_j  =  G/(G-1) · (R_i - mean_g(R))``

    The baseline of each sample is the mean of the other ``G - 1`` samples of its prompt, so it is
    independent of the sample and the estimate unbiased.
    """
    shaped = _groups(rewards - beta * kl, group_size)
    others = (shaped.sum(dim=1, keepdim=True) - shaped) / (group_size - 1)
    return (shaped - others).reshape(-1)


def sequence_kl(logps: Tensor, ref_logps: Tensor, mask: Tensor, estimator: str = "k1") -> Tensor:
    """``[B]`` KL of each completion to the reference: the per-token estimate summed over its tokens.

    With ``k1`` this is ``Σ_t log π(o_t) - log π_ref(o_t)``, the sequence KL RLOO subtracts from the reward.
    """
    return (kl_penalty(logps, ref_logps, estimator) * mask.to(logps.dtype)).sum(-1)


def zero_std_groups(rewards: Tensor, group_size: int, atol: float = 1e-8) -> Tensor:
    """``[N / G]`` bool: True for groups whose rewards are all equal (within ``atol``), which carry no signal."""
    grouped = _groups(rewards, group_size)
    return (grouped.max(dim=1).values - grouped.min(dim=1).values) <= atol


def frac_reward_zero_std(rewards: Tensor, group_size: int, atol: float = 1e-8) -> Tensor:
    """Fraction of groups whose rewards are all equal (the ``frac_reward_zero_std`` metric)."""
    return zero_std_groups(rewards, group_size, atol).to(rewards.dtype).mean()


def drop_zero_std_groups(rewards: Tensor, group_size: int, *tensors: Tensor, atol: float = 1e-8) -> tuple[Tensor, ...]:
    """Dynamic sampling (DAPO sec. 3.2): keep only the completions of groups whose rewards differ.

    Returns ``(rewards, *tensors)`` each indexed along dim 0 by the kept completions (whole groups,
    in order); ``tensors`` are any per-completion tensors (ids, masks, log-probs, other rewards).
    The caller samples more prompts until it has enough groups.
    """
    keep = (~zero_std_groups(rewards, group_size, atol)).repeat_interleave(group_size)
    for tensor in tensors:
        if tensor.shape[0] != rewards.shape[0]:
            raise ValueError(f"tensor with {tensor.shape[0]} rows does not match {rewards.shape[0]} rewards")
    return tuple(t[keep] for t in (rewards, *tensors))


def overlong_penalty(lengths: Tensor, max_completion_length: int, overlong_cache: int) -> Tensor:
    """DAPO soft overlong punishment (eq. 13), a reward added to the task reward.

    With ``L = max_completion_length`` and ``C = overlong_cache`` (the soft zone before the limit)::

        0                       if |y| <= L - C
        ((L - C) - |y|) / C     if L - C < |y| <= L     (0 down to -1, linearly)
        -1                      if |y| > L
    """
    if not 0 < overlong_cache <= max_completion_length:
        raise ValueError(f"overlong_cache must be in (0, max_completion_length={max_completion_length}], "
                         f"got {overlong_cache}")
    lengths = lengths if lengths.is_floating_point() else lengths.float()
    penalty = (max_completion_length - overlong_cache - lengths) / overlong_cache
    return penalty.clamp(min=-1.0, max=0.0)


def aggregate_loss(per_token: Tensor, mask: Tensor, aggregation: str = "token_mean",
                   max_completion_length: int | None = None, num_tokens: float | None = None) -> Tensor:
    """Reduce a ``[B, T]`` per-token loss to a scalar.

    - ``token_mean`` (DAPO): ``Σ_{i,t} ℓ_it / Σ_i |o_i|``: every token weighs the same. ``num_tokens``
      replaces the denominator: pass the loss tokens of the whole optimiser batch divided by the
      number of micro-batches averaged (accumulation steps x processes) to get one token mean over
      the whole batch rather than a mean of per-micro-batch means.
    - ``sequence_mean`` (GRPO): ``1/B Σ_i 1/|o_i| Σ_t ℓ_it``: every sequence weighs the same (a row
      with no loss tokens contributes 0 and still counts in ``B``).
    - ``constant`` (Dr. GRPO): ``Σ_{i,t} ℓ_it / (B · max_completion_length)``: no length bias.
    - ``sequence_sum`` (LUSPO): ``1/B Σ_i Σ_t ℓ_it``: every token of a sequence counts in full.
    """
    mask_f = mask.to(per_token.dtype)
    total = (per_token * mask_f).sum()
    if aggregation == "token_mean":
        if num_tokens is not None:
            return total / num_tokens
        return masked_mean(per_token, mask)
    if aggregation == "sequence_mean":
        per_sequence = (per_token * mask_f).sum(-1) / mask_f.sum(-1).clamp(min=1.0)
        return per_sequence.mean()
    if aggregation == "sequence_sum":
        return (per_token * mask_f).sum(-1).mean()
    if aggregation == "constant":
        if not max_completion_length or max_completion_length < 1:
            raise ValueError("the constant aggregation needs max_completion_length (a positive number of tokens)")
        return total / (per_token.shape[0] * max_completion_length)
    raise ValueError(f"unknown loss aggregation '{aggregation}' (choose {', '.join(AGGREGATIONS)})")


def importance_log_ratio(logps: Tensor, old_logps: Tensor, mask: Tensor, level: str = "token") -> Tensor:
    """``log ρ``: per token ``log π - log π_old`` (``[B, T]``), or GSPO's per sequence mean of it (``[B, 1]``)."""
    log_ratio = (logps - old_logps).masked_fill(~mask, 0.0)   # padding: ratio 1, whatever it holds
    if level == "token":
        return log_ratio
    if level == "sequence":
        return (log_ratio.sum(-1) / mask.sum(-1).clamp(min=1)).unsqueeze(-1)
    raise ValueError(f"unknown importance_sampling_level '{level}' (choose token or sequence)")


def vespo_weights(log_ratio: Tensor, mask: Tensor, advantages: Tensor, shape: tuple[float, float, float, float]
                  ) -> Tensor:
    """VESPO's ``[B, 1]`` weight ``φ(w) = exp(λ + k·log w - λ·w)`` (φ(1) = 1, a gamma shape peaking at w = k/λ), with
    ``w = exp(Σ_t log ρ_t)`` the sequence's importance ratio (per-token log-ratios clamped to [-20, 20], log w to
    [log 1e-8, 20]) and ``(k, λ) = shape[:2]`` for A >= 0, ``shape[2:]`` for A < 0. No gradient flows through it."""
    with torch.no_grad():
        log_w = (log_ratio.clamp(-20.0, 20.0) * mask).sum(-1, keepdim=True).clamp(math.log(1e-8), 20.0)
        positive = advantages >= 0
        k = torch.where(positive, log_w.new_tensor(shape[0]), log_w.new_tensor(shape[2]))
        lam = torch.where(positive, log_w.new_tensor(shape[1]), log_w.new_tensor(shape[3])).clamp(min=1e-4)
        return torch.exp(lam + k * log_w - lam * torch.exp(log_w)).nan_to_num(0.0, 0.0, 0.0)


def off_policy_mask(advantages: Tensor, logps: Tensor, old_logps: Tensor, mask: Tensor, threshold: float) -> Tensor:
    """DeepSeek-V3.2's off-policy sequence mask ``[B, 1]``: drop a sequence with A < 0 whose mean per-token
    ``log π_old - log π`` (a KL estimate from the sampling policy) exceeds ``threshold``; keep the rest."""
    drift = ((old_logps - logps.detach()) * mask).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1)
    return (advantages >= 0) | (drift <= threshold)


def high_entropy_mask(entropy: Tensor, mask: Tensor, top_quantile: float) -> Tensor:
    """``[B, T]`` bool: the completion tokens whose entropy is at or above the ``1 - top_quantile`` quantile of
    the batch's completion tokens ("Beyond the 80/20 Rule": train on the top 20% forking tokens only)."""
    if not 0.0 < top_quantile <= 1.0:
        raise ValueError(f"top_entropy_quantile must be in (0, 1], got {top_quantile}")
    values = entropy.detach()[mask].float()
    if values.numel() == 0:
        return torch.zeros_like(mask)
    return (entropy.detach() >= torch.quantile(values, 1.0 - top_quantile).to(entropy.dtype)) & mask


def reinforce_pp_advantages(rewards: Tensor, token_kl: Tensor, mask: Tensor, beta: float,
                            group_size: int | None = None, eps: float = 1e-8) -> Tensor:
    """REINFORCE++ advantages ``[B, T]`` (Hu 2025, eq. 5-7): per token, the return of the outcome reward with a
    per-token KL penalty, ``R_t = r - β·Σ_{s≥t} KL_s``, whitened over every completion token of the batch
    (global batch normalisation). With ``group_size`` (the "REINFORCE++-baseline" variant) each reward first
    has its group's mean subtracted."""
    if group_size is not None:
        grouped = _groups(rewards, group_size)
        rewards = (grouped - grouped.mean(dim=1, keepdim=True)).reshape(-1)
    mask_f = mask.to(token_kl.dtype)
    penalty = (token_kl * mask_f).flip(-1).cumsum(-1).flip(-1)   # Σ_{s≥t} KL_s
    returns = (rewards[:, None] - beta * penalty) * mask_f
    mean = returns.sum() / mask_f.sum()
    var = (((returns - mean) * mask_f) ** 2).sum() / mask_f.sum()
    return (returns - mean) / (var.sqrt() + eps) * mask_f


@dataclass
class GRPOLoss:
    loss: Tensor           # scalar, to minimise
    clip_low: Tensor       # fraction of loss tokens with ρ < 1-ε_low and A < 0 (clipped, no gradient)
    clip_high: Tensor      # fraction of loss tokens with ρ > 1+ε_high and A > 0
    clip_region: Tensor    # either of the two
    kl: Tensor | None      # mean per-token k3 KL to the reference over loss tokens; None without a reference
    entropy: Tensor | None = None   # mean entropy over the tokens trained on, when entropies were given

    def metrics(self) -> dict[str, Tensor]:
        """The statistics under their TRL names."""
        out = {"clip_ratio/low_mean": self.clip_low, "clip_ratio/high_mean": self.clip_high,
               "clip_ratio/region_mean": self.clip_region}
        if self.kl is not None:
            out["kl"] = self.kl
        return out


def grpo_loss(logps: Tensor, advantages: Tensor, mask: Tensor, *, old_logps: Tensor | None = None,
              ref_logps: Tensor | None = None, beta: float = 0.0, epsilon_low: float = 0.2,
              epsilon_high: float | None = None, aggregation: str = "token_mean",
              max_completion_length: int | None = None, truncated: Tensor | None = None,
              num_tokens: float | None = None, objective: str = "clip", importance_sampling_level: str = "token",
              delta: float | None = None, sapo_temperatures: tuple[float, float] = (1.0, 1.05),
              vespo_shape: tuple[float, float, float, float] = (2.0, 3.0, 3.0, 2.0),
              off_policy_threshold: float | None = None, entropy: Tensor | None = None,
              top_entropy_quantile: float = 1.0, entropy_coef: float = 0.0) -> GRPOLoss:
    """The policy loss of GRPO / RLOO / DAPO / Dr. GRPO and their newer objectives, with an optional k3 KL term.

    Per token, with the importance ratio ``ρ = exp(log ρ)`` (:func:`importance_log_ratio`: per token, or
    GSPO's one per sequence) and the sequence's advantage ``A``, the ``objective``:

    - ``clip`` (GRPO, PPO's surrogate): ``ℓ = -min(ρ'·A, clip(ρ, 1 - ε_low, 1 + ε_high)·A)``, where
      ``ρ' = min(ρ, delta)`` with two-sided clipping (``delta``) and ``ρ' = ρ`` otherwise;
    - ``cispo``: ``ℓ = -sg(min(ρ, ε_high))·A·log π`` (ε_high is the cap itself, as in TRL);
    - ``sapo``: ``ℓ = -(4/τ)·σ(τ·(ρ - 1))·A`` with τ = ``sapo_temperatures[0]`` for A > 0, else ``[1]``;
    - ``vespo``: ``ℓ = -φ(w)·A·log π`` (:func:`vespo_weights`);

    then ``+ β·k3_t`` with ``k3_t = exp(log π_ref - log π) - (log π_ref - log π) - 1``, and the token
    mask: padding, ``truncated`` completions (DAPO overlong filtering), sequences the off-policy mask
    drops (``off_policy_threshold``, :func:`off_policy_mask`), and with ``top_entropy_quantile < 1``
    the tokens below the entropy quantile (:func:`high_entropy_mask`) leave the policy term; the
    reduction is :func:`aggregate_loss`. With ``entropy_coef`` the mean entropy over the tokens
    trained on is subtracted: ``loss - c·mean(H)`` (an exploration bonus; ``entropy`` must carry
    gradient). ``old_logps=None`` means on-policy (``π_old = π`` detached: ratio 1). ``epsilon_high=None``
    uses ``epsilon_low``. RLOO uses this loss with ``beta=0``, its KL being in the reward.

    ``advantages`` is ``[B]`` (one per sequence) or ``[B, T]``; ``entropy`` ``[B, T]`` like ``logps``.
    """
    if beta < 0:
        raise ValueError(f"beta must be >= 0, got {beta}")
    if beta > 0 and ref_logps is None:
        raise ValueError("beta > 0 needs the reference log-probs (ref_logps)")
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective '{objective}' (choose {', '.join(OBJECTIVES)})")
    if entropy is None and (top_entropy_quantile < 1.0 or entropy_coef):
        raise ValueError("entropy masking and the entropy bonus need the per-token entropies (entropy)")
    epsilon_high = epsilon_low if epsilon_high is None else epsilon_high
    mask = mask.to(torch.bool)
    if truncated is not None:
        mask = mask & ~truncated.to(torch.bool)[:, None]
    if advantages.dim() == 1:
        advantages = advantages[:, None]
    old_logps = logps.detach() if old_logps is None else old_logps
    ratio = torch.exp(importance_log_ratio(logps, old_logps, mask, importance_sampling_level))
    if objective == "clip":
        clipped_ratio = torch.clamp(ratio, 1.0 - epsilon_low, 1.0 + epsilon_high)
        capped = ratio if delta is None else torch.clamp(ratio, max=delta)
        per_token = -torch.minimum(capped * advantages, clipped_ratio * advantages)
    elif objective == "cispo":
        per_token = -torch.clamp(ratio, max=epsilon_high).detach() * advantages * logps
    elif objective == "sapo":
        pos, neg = (ratio.new_tensor(t) for t in sapo_temperatures)
        tau = torch.where(advantages > 0, pos, neg)
        per_token = -torch.sigmoid(tau * (ratio - 1)) * 4 / tau * advantages
    else:
        weights = vespo_weights((logps - old_logps).masked_fill(~mask, 0.0), mask, advantages, vespo_shape)
        per_token = -weights * advantages * logps
    policy_mask = mask
    if off_policy_threshold is not None:
        policy_mask = policy_mask & off_policy_mask(advantages, logps, old_logps, mask, off_policy_threshold)
    if top_entropy_quantile < 1.0:
        policy_mask = policy_mask & high_entropy_mask(entropy, mask, top_entropy_quantile)
    per_token = per_token.expand_as(logps) * policy_mask
    kl = None
    if ref_logps is not None:
        token_kl = kl_penalty(logps, torch.where(mask, ref_logps, logps.detach()), "k3")
        if beta > 0:
            per_token = per_token + beta * token_kl
        kl = masked_mean(token_kl.detach(), mask)
    loss = aggregate_loss(per_token, mask, aggregation, max_completion_length, num_tokens)
    mean_entropy = None
    if entropy is not None:
        trained = policy_mask if top_entropy_quantile < 1.0 else mask
        mean_entropy = masked_mean(entropy, trained)
        if entropy_coef:
            loss = loss - entropy_coef * mean_entropy
        mean_entropy = mean_entropy.detach()
    with torch.no_grad():
        full = ratio.expand_as(logps)
        low = (full < 1.0 - epsilon_low) & (advantages < 0)
        high = (full > 1.0 + epsilon_high) & (advantages > 0)
        stats = [masked_mean(x.float(), mask) for x in (low, high, low | high)]
    return GRPOLoss(loss, *stats, kl, mean_entropy)
