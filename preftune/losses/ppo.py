"""PPO for language models as pure functions of per-token tensors (the RL step of the RLHF pipeline).

Everything is ``[B, T]`` over response tokens with a bool ``mask`` (True up to and including each
response's EOS, False on padding after it); padded positions never influence a result. References:
Schulman et al. 2017 (PPO), Schulman et al. 2016 (GAE), Ziegler et al. 2019 (KL-penalised reward,
adaptive KL coefficient), Huang et al. 2024, "The N+ Implementation Details of RLHF with PPO".

Per-token reward, with the sequence score s only on the last response token (index T_b - 1)::

    r_t = -β·kl_t + [t = T_b - 1]·s

GAE with discount γ and λ, V_{T_b} = 0::

    δ_t = r_t + γ·V_{t+1} - V_t,    A_t = δ_t + γ·λ·A_{t+1},    R_t = A_t + V_t   (returns)

Clipped policy objective with ρ_t = exp(log π(a_t) - log π_old(a_t))::

    L_policy = mean_t max(-A_t·ρ_t, -A_t·clip(ρ_t, 1-ε, 1+ε))

Clipped value loss::

    V^clip_t = clip(V_t, V_old_t - ε_v, V_old_t + ε_v),   L_value = ½·mean_t max((V_t - R_t)², (V^clip_t - R_t)²)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

KL_ESTIMATORS = ("k1", "k3")


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``values`` where ``mask`` is true (0 when the mask is empty)."""
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1.0)


def masked_var(values: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance over the masked entries; ``unbiased`` applies Bessel's correction n/(n-1)."""
    mean = masked_mean(values, mask)
    var = masked_mean((values - mean) ** 2, mask)
    if unbiased:
        n = mask.sum().to(values.dtype)
        var = var * n / (n - 1).clamp(min=1.0)
    return var


def masked_whiten(values: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """``(x - mean) / sqrt(var + eps)`` over the masked entries (mean added back if not ``shift_mean``).

    Entries off the mask are 0.
    """
    mean, var = masked_mean(values, mask), masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask.to(values.dtype)


def kl_penalty(logps: Tensor, ref_logps: Tensor, estimator: str = "k1") -> Tensor:
    """Per-token estimate of KL(π ‖ π_ref) at tokens sampled from π (Schulman, "Approximating KL").

    ``k1``: log π - log π_ref (unbiased, can be negative per token).
    ``k3``: (ρ - 1) - log ρ with ρ = π_ref / π (unbiased, never negative, lower variance).
    """
    log_ratio = logps - ref_logps
    if estimator == "k1":
        return log_ratio
    if estimator == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"unknown KL estimator '{estimator}' (choose {', '.join(KL_ESTIMATORS)})")


def token_rewards(scores: Tensor, kl: Tensor, mask: Tensor, kl_coef: float) -> Tensor:
    """``-kl_coef·kl`` on every response token, plus each sequence's score on its last token; 0 on padding."""
    mask_f = mask.to(kl.dtype)
    rewards = -kl_coef * kl * mask_f
    last = (mask.long().sum(-1) - 1).clamp(min=0)
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    has_tokens = mask.any(-1).to(kl.dtype)
    return rewards.index_put((rows, last), rewards[rows, last] + scores.to(kl.dtype) * has_tokens)


def gae_advantages(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float = 1.0,
                   lam: float = 0.95) -> tuple[Tensor, Tensor]:
    """``(advantages, returns)`` by generalised advantage estimation, backwards over each response.

    Padding after a response contributes nothing: rewards and values there are treated as 0, so the
    value after a response's last token is 0 (the episode ends).
    """
    mask_f = mask.to(values.dtype)
    rewards, values = rewards * mask_f, values * mask_f
    length = rewards.shape[1]
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(length)):
        next_value = values[:, t + 1] if t + 1 < length else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = (delta + gamma * lam * running) * mask_f[:, t]
        advantages[:, t] = running
    return advantages, (advantages + values) * mask_f


@dataclass
class PolicyLoss:
    loss: Tensor       # scalar
    clipfrac: Tensor   # fraction of tokens where the clipped term was chosen
    approxkl: Tensor   # ½·mean (log ρ)², a KL(π_old ‖ π) estimate


def policy_loss(logps: Tensor, old_logps: Tensor, advantages: Tensor, mask: Tensor,
                cliprange: float = 0.2) -> PolicyLoss:
    """The clipped surrogate objective (negated, to minimise), averaged over response tokens."""
    log_ratio = logps - old_logps
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        clipfrac = masked_mean((clipped > unclipped).float(), mask)
        approxkl = 0.5 * masked_mean(log_ratio.detach() ** 2, mask)
    return PolicyLoss(loss, clipfrac, approxkl)


def value_loss(values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor,
               cliprange_value: float = 0.2) -> tuple[Tensor, Tensor]:
    """``(loss, clipfrac)``: half the larger of the plain and clipped squared errors, averaged over tokens."""
    # Clamp the value itself: ``old + clamp(v - old)`` rounds, so an unclipped v would differ from itself.
    clipped = torch.clamp(values, old_values - cliprange_value, old_values + cliprange_value)
    plain_error = (values - returns) ** 2
    clipped_error = (clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(plain_error, clipped_error), mask)
    with torch.no_grad():
        clipfrac = masked_mean((clipped_error > plain_error).float(), mask)
    return loss, clipfrac


def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> float:
    """``1 - Var(R - V) / Var(R)`` over response tokens (1: perfect critic, 0: no better than a constant)."""
    var_returns = float(masked_var(returns, mask, unbiased=False))
    if var_returns == 0.0:
        return float("nan")
    return 1.0 - float(masked_var(returns - values, mask, unbiased=False)) / var_returns


def adaptive_kl_coef(kl_coef: float, current_kl: float, target_kl: float, n_steps: int, horizon: float) -> float:
    """Ziegler et al. (2019) proportional controller for β.

    ``e = clip(KL / KL_target - 1, -0.2, 0.2)``,  ``β ← β·(1 + e·n_steps / horizon)``; ``n_steps`` is
    the number of samples the KL was measured on.
    """
    if not math.isfinite(current_kl):
        return kl_coef
    error = min(max(current_kl / target_kl - 1.0, -0.2), 0.2)
    return kl_coef * (1.0 + error * n_steps / horizon)
