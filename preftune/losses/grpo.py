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
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .ppo import kl_penalty, masked_mean

SCALE_REWARDS = ("group", "batch", "none")
AGGREGATIONS = ("token_mean", "sequence_mean", "constant")
# TRL's ``loss_type`` names for the same aggregations ("bnpo" and "dapo" differ in TRL only in
# which batch the tokens are counted over; here ``num_tokens`` says that).
LOSS_TYPE_ALIASES = {"grpo": "sequence_mean", "dapo": "token_mean", "bnpo": "token_mean", "dr_grpo": "constant"}


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
    if aggregation == "constant":
        if not max_completion_length or max_completion_length < 1:
            raise ValueError("the constant aggregation needs max_completion_length (a positive number of tokens)")
        return total / (per_token.shape[0] * max_completion_length)
    raise ValueError(f"unknown loss aggregation '{aggregation}' (choose {', '.join(AGGREGATIONS)})")


@dataclass
class GRPOLoss:
    loss: Tensor           # scalar, to minimise
    clip_low: Tensor       # fraction of loss tokens with ρ < 1-ε_low and A < 0 (clipped, no gradient)
    clip_high: Tensor      # fraction of loss tokens with ρ > 1+ε_high and A > 0
    clip_region: Tensor    # either of the two
    kl: Tensor | None      # mean per-token k3 KL to the reference over loss tokens; None without a reference

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
              num_tokens: float | None = None) -> GRPOLoss:
    """The clipped importance-ratio loss of GRPO / RLOO / DAPO / Dr. GRPO, with an optional k3 KL term.

    Per token, with ``ρ_t = exp(log π(o_t) - log π_old(o_t))`` and the sequence's advantage ``A``::

        ℓ_t = -min(ρ_t·A, clip(ρ_t, 1 - ε_low, 1 + ε_high)·A) + β·k3_t
        k3_t = exp(log π_ref - log π) - (log π_ref - log π) - 1            (≥ 0)

    then reduced by :func:`aggregate_loss`. ``old_logps=None`` means on-policy (``π_old = π``
    detached: ratio 1, gradient ``-A·∇log π``). ``epsilon_high=None`` uses ``epsilon_low``
    (symmetric, original GRPO). With ``beta=0`` no KL enters the loss and ``ref_logps`` may be None
    (if given, its KL is still reported). ``truncated`` (bool ``[B]``) removes completions that hit
    the length limit without ending from the loss (DAPO overlong filtering). RLOO uses this loss
    with ``beta=0``, its KL being in the reward (:func:`rloo_advantages`).

    ``advantages`` is ``[B]`` (one per sequence) or ``[B, T]``.
    """
    if beta < 0:
        raise ValueError(f"beta must be >= 0, got {beta}")
    if beta > 0 and ref_logps is None:
        raise ValueError("beta > 0 needs the reference log-probs (ref_logps)")
    epsilon_high = epsilon_low if epsilon_high is None else epsilon_high
    mask = mask.to(torch.bool)
    if truncated is not None:
        mask = mask & ~truncated.to(torch.bool)[:, None]
    if advantages.dim() == 1:
        advantages = advantages[:, None]
    old_logps = logps.detach() if old_logps is None else old_logps
    ratio = torch.exp((logps - old_logps).masked_fill(~mask, 0.0))  # padding: ratio 1, whatever it holds
    clipped_ratio = torch.clamp(ratio, 1.0 - epsilon_low, 1.0 + epsilon_high)
    per_token = -torch.minimum(ratio * advantages, clipped_ratio * advantages)
    kl = None
    if ref_logps is not None:
        token_kl = kl_penalty(logps, torch.where(mask, ref_logps, logps.detach()), "k3")
        if beta > 0:
            per_token = per_token + beta * token_kl
        kl = masked_mean(token_kl.detach(), mask)
    loss = aggregate_loss(per_token, mask, aggregation, max_completion_length, num_tokens)
    with torch.no_grad():
        low = (ratio < 1.0 - epsilon_low) & (advantages < 0)
        high = (ratio > 1.0 + epsilon_high) & (advantages > 0)
        stats = [masked_mean(x.float(), mask) for x in (low, high, low | high)]
    return GRPOLoss(loss, *stats, kl)
