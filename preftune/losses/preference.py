"""Pairwise preference losses of the DPO family, as pure functions of log-prob tensors.

Every loss takes a :class:`PreferenceLogps` (summed completion log-probs of the chosen and rejected
responses under the policy and, except for reference-free losses, the reference model) and returns a
:class:`LossOutput` with one loss per pair and the detached implicit rewards. Nothing here runs a
model or tokenises: trainers compute the log-probs (``preftune.logprobs``) and pick a loss by name.

Notation used in the docstrings, per pair::

    Δ  = (log π(y_c) - log π_ref(y_c)) - (log π(y_r) - log π_ref(y_r))     (sums over completion tokens)
    β  = inverse temperature of the KL penalty
    m  = per-pair margin in reward units (``PreferenceLogps.margin``, default 0)
    p  = probability that the chosen response really is better: ``preference_prob`` per pair when
         given, else ``1 - label_smoothing``; p = 1 is an ordinary hard preference
    σ  = logistic sigmoid

Soft labels (p < 1) follow conservative / probabilistic DPO (Mitchell 2023): the pair is treated
as "chosen wins" with probability p and "rejected wins" with probability 1 - p.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from preftune.errors import ConfigError
from preftune.loading import load_callable


@dataclass
class PreferenceLogps:
    """Summed completion log-probs of a batch of preference pairs (all tensors ``[B]``)."""

    policy_chosen: Tensor
    policy_rejected: Tensor
    ref_chosen: Tensor | None
    ref_rejected: Tensor | None
    chosen_lengths: Tensor           # float, completion token counts
    rejected_lengths: Tensor
    preference_prob: Tensor | None = None   # in [0, 1]: probability that chosen really is better
    margin: Tensor | None = None            # reward units, default 0


@dataclass
class LossOutput:
    losses: Tensor            # [B] per-pair loss; the caller takes the mean
    chosen_rewards: Tensor    # [B] detached implicit reward of the chosen response
    rejected_rewards: Tensor  # [B] detached


# ----------------------------------------------------------------------------------------- helpers

def _check_beta(beta: float) -> None:
    if not beta > 0:
        raise ValueError(f"beta must be positive, got {beta}")


def _require_reference(lp: PreferenceLogps, loss_name: str) -> None:
    if lp.ref_chosen is None or lp.ref_rejected is None:
        raise ValueError(f"the '{loss_name}' loss needs reference log-probs (ref_chosen and ref_rejected); "
                         "only reference-free losses (" + ", ".join(sorted(REFERENCE_FREE)) + ") work without them")


def _log_ratios(lp: PreferenceLogps, loss_name: str) -> tuple[Tensor, Tensor]:
    """``(log π(y_c) - log π_ref(y_c), log π(y_r) - log π_ref(y_r))``."""
    _require_reference(lp, loss_name)
    return lp.policy_chosen - lp.ref_chosen, lp.policy_rejected - lp.ref_rejected


def _preference_prob(lp: PreferenceLogps, label_smoothing: float, like: Tensor) -> Tensor:
    """Per-pair p: the pair's own ``preference_prob`` where given, else (None or NaN) ``1 - label_smoothing``."""
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    default = torch.full_like(like, 1.0 - label_smoothing)
    if lp.preference_prob is None:
        return default
    probs = lp.preference_prob.to(dtype=like.dtype, device=like.device)
    return torch.where(torch.isnan(probs), default, probs)


def _margin(lp: PreferenceLogps, like: Tensor) -> Tensor | float:
    return 0.0 if lp.margin is None else lp.margin.to(dtype=like.dtype, device=like.device)


def _soft_logistic(z: Tensor, p: Tensor) -> Tensor:
    """``-(p·log σ(z) + (1 - p)·log σ(-z))``, numerically stable for any z."""
    return -p * F.logsigmoid(z) - (1 - p) * F.logsigmoid(-z)


def _rewards(beta: float, chosen_ratio: Tensor, rejected_ratio: Tensor) -> tuple[Tensor, Tensor]:
    return (beta * chosen_ratio).detach(), (beta * rejected_ratio).detach()


# ----------------------------------------------------------------------------------------- losses

def sigmoid_loss(lp: PreferenceLogps, beta: float, label_smoothing: float = 0.0) -> LossOutput:
    """DPO (Rafailov et al. 2023, "Direct Preference Optimization"), with soft labels.

    z = β·Δ - m;   loss = -(p·log σ(z) + (1 - p)·log σ(-z)).

    With p = 1 and m = 0 this is the paper's ``-log σ(β·Δ)``; p < 1 is conservative DPO (cDPO,
    Mitchell 2023) / probabilistic-preference DPO. Rewards are ``β·(log π(y) - log π_ref(y))``.
    """
    _check_beta(beta)
    chosen, rejected = _log_ratios(lp, "sigmoid")
    z = beta * (chosen - rejected) - _margin(lp, chosen)
    p = _preference_prob(lp, label_smoothing, chosen)
    return LossOutput(_soft_logistic(z, p), *_rewards(beta, chosen, rejected))


def ipo_loss(lp: PreferenceLogps, beta: float, label_smoothing: float = 0.0) -> LossOutput:
    """IPO (Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human Preferences").

    loss = (Δ - (2p - 1) / (2β))².

    With p = 1 the target is the paper's 1/(2β) (β plays the role of the paper's τ); a soft label p
    regresses Δ toward the expected target ``E[I - 1/2]/β`` with ``I ~ Bernoulli(p)``, so p = 1/2
    asks for no preference at all. Δ uses summed log-probs as in the paper. The margin is not used.
    """
    _check_beta(beta)
    chosen, rejected = _log_ratios(lp, "ipo")
    p = _preference_prob(lp, label_smoothing, chosen)
    target = (2 * p - 1) / (2 * beta)
    losses = (chosen - rejected - target) ** 2
    return LossOutput(losses, *_rewards(beta, chosen, rejected))


def hinge_loss(lp: PreferenceLogps, beta: float, label_smoothing: float = 0.0) -> LossOutput:
    """SLiC hinge loss (Zhao et al. 2023, "SLiC-HF: Sequence Likelihood Calibration with Human Feedback").

    z = β·Δ - m;   loss = p·relu(1 - z) + (1 - p)·relu(1 + z).

    With p = 1 and m = 0: ``relu(1 - β·Δ)``, i.e. the pair is done once the chosen response leads
    by 1/β nats (relative to the reference); a margin m raises that requirement.
    """
    _check_beta(beta)
    chosen, rejected = _log_ratios(lp, "hinge")
    z = beta * (chosen - rejected) - _margin(lp, chosen)
    p = _preference_prob(lp, label_smoothing, chosen)
    losses = p * torch.relu(1 - z) + (1 - p) * torch.relu(1 + z)
    return LossOutput(losses, *_rewards(beta, chosen, rejected))


def robust_loss(lp: PreferenceLogps, beta: float, label_smoothing: float = 0.0) -> LossOutput:
    """Robust DPO (rDPO, Chowdhury et al. 2024, "Provably Robust DPO: Aligning Language Models with Noisy Feedback").

    ε = label_smoothing is the assumed rate at which labels are flipped (0 ≤ ε < 1/2); z = β·Δ - m:

        loss = ((1 - ε)·(-log σ(z)) - ε·(-log σ(-z))) / (1 - 2ε).

    This is an unbiased estimate of the clean-label DPO loss under symmetric label noise. rDPO uses
    the one global ε: a per-pair ``preference_prob`` is ignored (use the ``sigmoid`` loss for soft
    labels). ε = 0 is plain DPO.
    """
    _check_beta(beta)
    eps = float(label_smoothing)
    if not 0.0 <= eps < 0.5:
        raise ValueError(f"the robust (rDPO) loss needs a label-noise rate label_smoothing in [0, 0.5), got {eps}")
    chosen, rejected = _log_ratios(lp, "robust")
    z = beta * (chosen - rejected) - _margin(lp, chosen)
    losses = ((1 - eps) * -F.logsigmoid(z) - eps * -F.logsigmoid(-z)) / (1 - 2 * eps)
    return LossOutput(losses, *_rewards(beta, chosen, rejected))


def simpo_loss(lp: PreferenceLogps, beta: float, label_smoothing: float = 0.0,
               simpo_gamma: float = 0.5) -> LossOutput:
    """SimPO (Meng et al. 2024, "SimPO: Simple Preference Optimization with a Reference-Free Reward").

    Reference-free, length-normalised: the reward of y is ``β·log π(y) / |y|`` (|y| = completion
    tokens, at least 1), and with γ = ``simpo_gamma`` the target reward margin (in reward units):

        z = β·(log π(y_c)/|y_c| - log π(y_r)/|y_r|) - γ - m;   loss = -(p·log σ(z) + (1 - p)·log σ(-z)).

    Reference log-probs, if present, are ignored.
    """
    _check_beta(beta)
    chosen = lp.policy_chosen / lp.chosen_lengths.to(lp.policy_chosen).clamp(min=1)
    rejected = lp.policy_rejected / lp.rejected_lengths.to(lp.policy_rejected).clamp(min=1)
    z = beta * (chosen - rejected) - simpo_gamma - _margin(lp, chosen)
    p = _preference_prob(lp, label_smoothing, chosen)
    return LossOutput(_soft_logistic(z, p), *_rewards(beta, chosen, rejected))


LOSSES: dict[str, Callable[..., LossOutput]] = {
    "sigmoid": sigmoid_loss,
    "ipo": ipo_loss,
    "hinge": hinge_loss,
    "robust": robust_loss,
    "simpo": simpo_loss,
}
REFERENCE_FREE: set[str] = {"simpo"}


# ----------------------------------------------------------------------------------------- total

Constraint = Callable[[PreferenceLogps], "Tensor | float"]


def preference_loss(name: str, lp: PreferenceLogps, beta: float, *, label_smoothing: float = 0.0,
                    simpo_gamma: float = 0.5, nll_weight: float = 0.0,
                    constraints: Sequence[tuple[Constraint, float]] = ()) -> tuple[Tensor, dict[str, Tensor]]:
    """The scalar training loss of a batch of pairs, and its metrics.

    total = mean(losses) + nll_weight · mean(-log π(y_c) / |y_c|) + Σ_k w_k · mean(constraint_k(lp))

    The NLL term is the per-token negative log-likelihood of the chosen responses (RPO-style
    regularisation that keeps chosen responses likely). Each constraint is a function of the
    :class:`PreferenceLogps` returning a scalar or ``[B]`` penalty (e.g. a constitutional rule);
    it is averaged over the batch and added with its weight.

    Metrics (detached scalars, TRL names): ``loss``, ``loss/preference``, ``loss/nll`` (when
    ``nll_weight > 0``), ``loss/constraint/<function name>``, ``rewards/chosen``,
    ``rewards/rejected``, ``rewards/accuracies``, ``rewards/margins``, ``logps/chosen``,
    ``logps/rejected``.
    """
    loss_fn = LOSSES.get(name)
    if loss_fn is None:
        raise ConfigError(f"unknown preference loss '{name}'; valid losses are: {', '.join(sorted(LOSSES))}")
    kwargs = {"label_smoothing": label_smoothing}
    if name == "simpo":
        kwargs["simpo_gamma"] = simpo_gamma
    out = loss_fn(lp, beta, **kwargs)

    preference = out.losses.mean()
    total = preference
    metrics: dict[str, Tensor] = {"loss/preference": preference.detach()}
    if nll_weight:
        lengths = lp.chosen_lengths.to(lp.policy_chosen).clamp(min=1)
        nll = (-lp.policy_chosen / lengths).mean()
        total = total + nll_weight * nll
        metrics["loss/nll"] = nll.detach()
    for fn, weight in constraints:
        value = fn(lp)
        value = torch.as_tensor(value, dtype=preference.dtype, device=preference.device).mean()
        total = total + weight * value
        metrics[_unique_key(metrics, f"loss/constraint/{_function_name(fn)}")] = value.detach()

    chosen_r, rejected_r = out.chosen_rewards, out.rejected_rewards
    metrics.update({
        "loss": total.detach(),
        "rewards/chosen": chosen_r.mean(),
        "rewards/rejected": rejected_r.mean(),
        "rewards/accuracies": (chosen_r > rejected_r).float().mean(),
        "rewards/margins": (chosen_r - rejected_r).mean(),
        "logps/chosen": lp.policy_chosen.detach().mean(),
        "logps/rejected": lp.policy_rejected.detach().mean(),
    })
    return total, metrics


def _function_name(fn) -> str:
    name = getattr(fn, "__name__", None)
    if name is None and hasattr(fn, "func"):  # functools.partial
        name = getattr(fn.func, "__name__", None)
    return name or type(fn).__name__


def _unique_key(existing: dict, key: str) -> str:
    if key not in existing:
        return key
    n = 2
    while f"{key}_{n}" in existing:
        n += 1
    return f"{key}_{n}"


def load_constraint(spec: str) -> Constraint:
    """Resolve ``"package.module:function"`` (or ``"path/to/file.py:function"``) to the function.

    The function receives a :class:`PreferenceLogps` and returns a scalar or ``[B]`` penalty.
    Raises :class:`ConfigError` when the spec is malformed, the module cannot be imported, the
    attribute is missing, or it is not callable.
    """
    return load_callable(spec, "constraint")
