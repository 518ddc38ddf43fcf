"""Two modifiers of every pair loss, each formula written once: LD-DPO's per-token weights and WPO's per-pair weights.

**LD-DPO** (Liu et al. 2024, "Length Desensitization in Direct Preference Optimization"), ``ld_alpha`` = α in
[0, 1]. A pair's shared length is ``ℓ = min(|y_c|, |y_r|)``; each completion's log-probability becomes its first
ℓ tokens plus α times the rest::

    log π_LD(y) = Σ_{j < ℓ} log π(y_j | x, y_<j) + α · Σ_{j ≥ ℓ} log π(y_j | x, y_<j) = Σ_j w_j · log π(y_j | ...)

with the per-token weight ``w_j = 1 if j < ℓ else α`` (:func:`ld_token_weights`, j the token's index in its
completion). Policy and reference are combined alike, so the log-ratios (and the implicit rewards) are of π_LD.
α = 1 is plain DPO; α = 0 drops the longer response's excess tokens. The collators attach the weights to a batch
(:func:`preftune.data.collate.add_length_weights`) and the log-prob sums apply them.

**WPO** (Zhou et al. 2024, "WPO: Enhancing RLHF with Weighted Preference Optimization", Eq. 2, as TRL 1.16's
``use_weighting``): each pair's loss is multiplied by

    w = exp( mean_j [log π(y_c,j) − log Σ_v π(v)²] + mean_j [log π(y_r,j) − log Σ_v π(v)²] )

(:func:`wpo_weights`), the means over each completion's scored tokens, ``Σ_v π(v)²`` over the whole vocabulary at
that token's position (computed with the chunked head, :func:`preftune.speed.head.token_stats`, never as a
``[B, L, V]`` tensor), from the policy's own forward, without gradient. ``exp(log π(y_j) − log Σ_v π(v)²) =
π(y_j) / E_{v∼π}[π(v)]`` is a token's probability relative to that of a token the policy samples itself, so the
weight favours pairs that look on-policy. TRL 1.16 does not clamp the weight (older TRL clamped it at 1).
"""

from __future__ import annotations

import torch
from torch import Tensor

from preftune.config.losses import UNWEIGHTABLE


def active_ld_alpha(ld_alpha: float | None) -> float | None:
    """The α that changes anything: None for unset and for 1 (then every path stays the plain, unweighted sum)."""
    return None if ld_alpha is None or float(ld_alpha) == 1.0 else float(ld_alpha)


def ld_token_weights(index: Tensor, shared_length: Tensor, ld_alpha: float) -> Tensor:
    """LD-DPO's weight of a completion token: ``1`` where its index in the completion (0-based) ``< shared_length``
    (the pair's ``min(|y_c|, |y_r|)``), ``ld_alpha`` after; float64 (cast to the log-probs' dtype where applied),
    broadcast over the two arguments."""
    one, alpha = (torch.tensor(value, dtype=torch.float64, device=index.device) for value in (1.0, float(ld_alpha)))
    return torch.where(index < shared_length, one, alpha)


def pair_shared_lengths(lengths: Tensor, adjacent: bool = False) -> Tensor:
    """``[S]`` the shared length ``min(|y_c|, |y_r|)`` of every sequence's pair, for ``[S]`` completion lengths in
    completion-major order (every chosen, then every rejected: a pair is ``i`` and ``i + S/2``) or, ``adjacent``,
    pair ``i`` at ``2i`` and ``2i + 1``."""
    if lengths.shape[0] % 2:
        raise ValueError(f"LD-DPO needs pairs: {lengths.shape[0]} sequences")
    if adjacent:
        return lengths.view(-1, 2).min(-1).values.repeat_interleave(2)
    half = lengths.shape[0] // 2
    shared = torch.minimum(lengths[:half], lengths[half:])
    return torch.cat([shared, shared])


@torch.no_grad()
def wpo_weights(aligned: Tensor, sequence: Tensor, pairs: int) -> Tensor:
    """``[pairs]`` WPO weights (module docstring), detached.

    ``aligned`` ``[N]``: ``log π(y_j) − log Σ_v π(v)²`` of every scored completion token of a batch; ``sequence``
    ``[N]``: its sequence, completion-major (``i < pairs``: pair i's chosen, ``pairs + i``: its rejected). A sequence
    with no scored token has mean 0 (TRL divides by the token count clamped at 1)."""
    sequence = sequence.to(aligned.device)
    totals = torch.zeros(2 * pairs, dtype=torch.float64 if aligned.dtype == torch.float64 else torch.float32,
                         device=aligned.device)
    totals = totals.index_add(0, sequence, aligned.to(totals.dtype))
    counts = torch.bincount(sequence, minlength=2 * pairs).clamp(min=1).to(totals.dtype)
    means = totals / counts
    return torch.exp(means[:pairs] + means[pairs:])


def weighted_pair_losses(losses: Tensor, weights: Tensor | None, loss_name: str) -> Tensor:
    """A pair loss's ``[B]`` values, each times its pair's WPO weight (None: unchanged)."""
    if weights is None:
        return losses
    if loss_name in UNWEIGHTABLE:
        raise ValueError(f"WPO weighting (use_weighting) is not defined for '{loss_name}': it sorts values over the "
                         "batch, so a loss value belongs to no pair")
    return losses * weights.to(losses)
