"""KTO: learning from desirable / undesirable examples, as pure functions of log-prob tensors.

Kahneman-Tversky Optimization (Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic
Optimization") needs no pairs: each example is a prompt x, one completion y and a binary label.
With log-probs summed over the completion's tokens::

    r(x, y) = log π(y|x) - log π_ref(y|x)                     (the implied reward, before β)
    z₀      = max(0, mean over mismatched (x, y') of [log π(y'|x) - log π_ref(y'|x)])   (detached)

    desirable y:    loss = λ_D · (1 - σ(β·(r - z₀)))
    undesirable y:  loss = λ_U · (1 - σ(β·(z₀ - r)))

z₀ is the reference point: an estimate of KL(π ‖ π_ref) from each prompt paired with another
example's completion y'. It carries no gradient. An optional per-example ``weights`` multiplies each
loss (the annotation export's ``weight`` = 2·label_prob − 1: with λ_D = λ_U the expected loss under a
label that is right with probability p has exactly the hard label's gradient times 2p − 1). The
paper's variant without it sets z₀ = 0.
Nothing here runs a model: trainers compute the log-probs (``preftune.logprobs``), and decide over
which examples z₀ is estimated (the KTO trainer uses the global batch of every process).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class KTOOutput:
    losses: Tensor    # [N] per-example loss, weight included; the caller takes the mean
    rewards: Tensor   # [N] detached implied rewards β·r
    z0: Tensor        # scalar reference point (0 without the KL term)


def kto_reference_point(kl_logratios: Tensor | None, like: Tensor) -> Tensor:
    """z₀ = max(0, mean(log π(y'|x) - log π_ref(y'|x))) over mismatched pairs, detached; 0 when ``None``."""
    if kl_logratios is None or kl_logratios.numel() == 0:
        return torch.zeros((), dtype=like.dtype, device=like.device)
    return kl_logratios.detach().to(like).mean().clamp(min=0)


def kto_loss(policy_logps: Tensor, ref_logps: Tensor, desirable: Tensor, beta: float, *,
             kl_logratios: Tensor | None = None, desirable_weight: float = 1.0,
             undesirable_weight: float = 1.0, weights: Tensor | None = None) -> KTOOutput:
    """Per-example KTO losses (formula in the module docstring).

    ``policy_logps``, ``ref_logps``: ``[N]`` summed completion log-probs; ``desirable``: ``[N]`` bool;
    ``kl_logratios``: ``log π - log π_ref`` of the mismatched completions that z₀ is estimated from
    (any length, e.g. gathered from every process), or ``None`` for the variant with z₀ = 0;
    ``weights``: ``[N]`` per-example weights (``None``: all 1).
    """
    if not beta > 0:
        raise ValueError(f"beta must be positive, got {beta}")
    ratio = policy_logps - ref_logps
    z0 = kto_reference_point(kl_logratios, ratio)
    good = desirable.to(device=ratio.device, dtype=torch.bool)
    desirable_losses = desirable_weight * (1 - torch.sigmoid(beta * (ratio - z0)))
    undesirable_losses = undesirable_weight * (1 - torch.sigmoid(beta * (z0 - ratio)))
    losses = torch.where(good, desirable_losses, undesirable_losses)
    if weights is not None:
        losses = losses * weights.to(device=losses.device, dtype=losses.dtype)
    return KTOOutput(losses, (beta * ratio).detach(), z0)


def kto_metrics(rewards: Tensor, policy_logps: Tensor, desirable: Tensor) -> dict[str, Tensor]:
    """TRL's KTO metrics: means over the desirable (``chosen``) and undesirable (``rejected``) examples.

    A kind with no example in the batch gives NaN for its means and for ``rewards/margins``. (The
    fourth metric, ``kl``, is the reference point z₀ of :class:`KTOOutput`.)
    """
    good = desirable.to(device=rewards.device, dtype=torch.bool)
    logps = policy_logps.detach().float()
    chosen, rejected = _mean(rewards.float(), good), _mean(rewards.float(), ~good)
    return {
        "rewards/chosen": chosen,
        "rewards/rejected": rejected,
        "rewards/margins": chosen - rejected,
        "logps/chosen": _mean(logps, good),
        "logps/rejected": _mean(logps, ~good),
    }


def _mean(values: Tensor, mask: Tensor) -> Tensor:
    if not bool(mask.any()):
        return torch.tensor(float("nan"), device=values.device)
    return values[mask].mean()
