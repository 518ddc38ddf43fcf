"""Reward-model losses, as pure functions of the scalar rewards of chosen and rejected responses.

Each loss takes the rewards ``r_c`` and ``r_r`` (``[B]``) a reward model gave the chosen and rejected
response of each pair and returns one loss per pair; nothing here runs a model. Notation::

    Δ = r_c - r_r          (reward difference)
    m = per-pair margin    (the ``margin`` column, default 0)
    p = preference_prob    (probability that chosen really is better, default 1)
    σ = logistic sigmoid
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from preftune.errors import ConfigError


def _as(value, like: Tensor) -> Tensor | float:
    """A per-pair tensor or a number, on the dtype and device of ``like``; None becomes 0."""
    if value is None:
        return 0.0
    if isinstance(value, Tensor):
        return value.to(dtype=like.dtype, device=like.device)
    return float(value)


def bradley_terry_loss(chosen: Tensor, rejected: Tensor, margin: Tensor | float | None = None) -> Tensor:
    """Bradley-Terry (Bradley & Terry 1952; InstructGPT, Ouyang et al. 2022).

    The model ``P(y_c ≻ y_r) = σ(r_c - r_r)``; maximum likelihood of the observed preferences gives

        loss = -log σ(Δ - m).

    The per-pair margin m (Llama 2, Touvron et al. 2023) asks for a larger gap on clearly better pairs.
    """
    return -F.logsigmoid(chosen - rejected - _as(margin, chosen))


def ranking_loss(chosen: Tensor, rejected: Tensor, margin: Tensor | float = 1.0) -> Tensor:
    """Margin ranking loss (``torch.nn.MarginRankingLoss`` with target 1, as in seed 002).

        loss = relu(margin - Δ) = max(0, -(r_c - r_r) + margin).

    Zero once the chosen response leads by ``margin``; ``margin`` may be a number or per pair.
    """
    return torch.relu(_as(margin, chosen) - (chosen - rejected))


def soft_label_loss(chosen: Tensor, rejected: Tensor, preference_prob: Tensor | float | None = None,
                    margin: Tensor | float | None = None) -> Tensor:
    """Bradley-Terry with soft labels: cross-entropy against the probability p that chosen is better.

        z = Δ - m;   loss = -p·log σ(z) - (1 - p)·log σ(-z).

    The pair counts as "chosen wins" with weight p and "rejected wins" with weight 1 - p (probabilistic
    preferences); its minimum is at σ(z) = p. p = 1 is :func:`bradley_terry_loss`.
    """
    z = chosen - rejected - _as(margin, chosen)
    p = 1.0 if preference_prob is None else _as(preference_prob, chosen)
    return -p * F.logsigmoid(z) - (1 - p) * F.logsigmoid(-z)


def centering_penalty(chosen: Tensor, rejected: Tensor) -> Tensor:
    """Reward centring (Eisenstein et al. 2023, "Helping or Herding?"): ``(r_c + r_r)²`` per pair.

    Bradley-Terry only sees differences, so rewards can drift by a constant; this keeps them near 0.
    """
    return (chosen + rejected) ** 2


REWARD_LOSSES: dict[str, Callable[..., Tensor]] = {
    "bradley_terry": bradley_terry_loss,
    "ranking": ranking_loss,
    "soft_label": soft_label_loss,
}


def reward_loss(name: str, chosen: Tensor, rejected: Tensor, *, margin: Tensor | None = None,
                preference_prob: Tensor | None = None, ranking_margin: float = 1.0,
                centering_coef: float = 0.0) -> tuple[Tensor, dict[str, Tensor]]:
    """The scalar training loss of a batch of pairs, and its metrics.

    total = mean(loss_name) + centering_coef · mean((r_c + r_r)²)

    ``bradley_terry`` uses the per-pair ``margin``; ``ranking`` requires a gap of
    ``ranking_margin + margin``; ``soft_label`` uses ``preference_prob`` and ``margin``.
    Metrics: ``loss``, ``loss/centering`` (when used), ``accuracy`` (share of pairs with r_c > r_r),
    ``margin`` (mean r_c - r_r), ``rewards/chosen``, ``rewards/rejected``.
    """
    if name == "bradley_terry":
        losses = bradley_terry_loss(chosen, rejected, margin)
    elif name == "ranking":
        extra = _as(margin, chosen)
        losses = ranking_loss(chosen, rejected, ranking_margin + extra)
    elif name == "soft_label":
        losses = soft_label_loss(chosen, rejected, preference_prob, margin)
    else:
        raise ConfigError(f"unknown reward loss '{name}'; valid losses are: {', '.join(sorted(REWARD_LOSSES))}")
    total = losses.mean()
    metrics: dict[str, Tensor] = {}
    if centering_coef:
        penalty = centering_penalty(chosen, rejected).mean()
        total = total + centering_coef * penalty
        metrics["loss/centering"] = penalty.detach()
    c, r = chosen.detach(), rejected.detach()
    metrics.update({
        "loss": total.detach(),
        "accuracy": (c > r).float().mean(),
        "margin": (c - r).mean(),
        "rewards/chosen": c.mean(),
        "rewards/rejected": r.mean(),
    })
    return total, metrics


def eos_penalized(scores, ended, penalty: float) -> Tensor:
    """Scores with TRL's ``missing_eos_penalty``: ``score - penalty`` for a response that never emitted EOS
    (``ended`` false), unchanged otherwise. Lists or tensors in, a float tensor out (the scores' dtype)."""
    scores = torch.as_tensor(scores, dtype=torch.float64) if not torch.is_tensor(scores) else scores   # lists: exact
    ended = torch.as_tensor(ended, dtype=torch.bool, device=scores.device)
    return scores - penalty * (~ended).to(scores.dtype)
