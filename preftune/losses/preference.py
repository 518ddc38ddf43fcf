"""Pairwise preference losses of the DPO family, as pure functions of log-prob tensors.

Every loss takes a :class:`PreferenceLogps` (summed completion log-probs of the chosen and rejected
responses under the policy and, except for reference-free losses, the reference model) and returns a
:class:`LossOutput` with one loss per pair and the detached implicit rewards. Nothing here runs a
model or tokenises: trainers compute the log-probs (``preftune.logprobs``) and pick a loss by name.

Each loss carries its row of the loss table (``@pair_loss(...)``: name, options, whether it needs a
reference, paper, TRL name; see :mod:`preftune.config.losses`). This module holds the shared pieces,
the five original losses and :func:`preference_loss`; ``dpo_variants.py`` and ``reference_free.py``
hold the rest of the family.

Notation used in the docstrings, per pair::

    Δ  = (log π(y_c) - log π_ref(y_c)) - (log π(y_r) - log π_ref(y_r))     (sums over completion tokens)
    s(y) = the score of y's log-ratio u = log π(y) - log π_ref(y) under ``f_divergence_type``
         (f-DPO, Wang et al. 2023; :func:`f_scores`): u for reverse KL (the default, plain DPO),
         1 - exp(-u) for forward KL, log 2 + log σ(u) for Jensen-Shannon, (exp((a - 1)·u) - 1)/(a - 1)
         for the α-divergence with a = ``f_alpha_divergence_coef``; Δ_s = s(y_c) - s(y_r)
    β  = inverse temperature of the KL penalty
    m  = per-pair margin in reward units (``PreferenceLogps.margin``, default 0)
    p  = probability that the chosen response really is better: ``preference_prob`` per pair when
         given, else ``1 - label_smoothing``; p = 1 is an ordinary hard preference
    σ  = logistic sigmoid

Soft labels (p < 1) follow conservative / probabilistic DPO (Mitchell 2023): the pair is treated
as "chosen wins" with probability p and "rejected wins" with probability 1 - p.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache

import torch
import torch.nn.functional as F
from torch import Tensor

from preftune.config.losses import (
    F_DIVERGENCES,
    LOSS_HYPERPARAMETERS,
    PAIR_LOSSES,
    REFERENCE_FREE,
    pair_loss,
    parse_loss_types,
)
from preftune.errors import ConfigError
from preftune.loading import load_callable
from preftune.losses.weighting import weighted_pair_losses


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
    pair_weights: Tensor | None = None      # WPO: each pair's loss is multiplied by it (losses/weighting.py)


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


def f_scores(log_ratio: Tensor, f_divergence_type: str = "reverse_kl", f_alpha_divergence_coef: float = 0.5) -> Tensor:
    """``s(u)``: f'(t) of the f-divergence regulariser at ``t = π/π_ref = exp(u)``, with f normalised so that
    f'(1) = 0 (a policy equal to its reference scores 0).

    f-DPO (Wang et al. 2023, "Beyond Reverse KL: Generalizing Direct Preference Optimization with Diverse
    Divergence Constraints", Table 1): the implicit reward is β·f'(π/π_ref). reverse KL: s = u (plain
    DPO); forward KL: s = 1 - exp(-u); Jensen-Shannon: s = log(2t / (1 + t)) = log 2 + log σ(u);
    α-divergence with a = ``f_alpha_divergence_coef``: s = (t^(a-1) - 1)/(a - 1), which tends to u as
    a -> 1 (reverse KL is used within 1e-6 of it).
    """
    if f_divergence_type == "reverse_kl":
        return log_ratio
    if f_divergence_type == "forward_kl":
        return -torch.expm1(-log_ratio)
    if f_divergence_type == "js_divergence":
        return math.log(2.0) + F.logsigmoid(log_ratio)
    if f_divergence_type == "alpha_divergence":
        a = float(f_alpha_divergence_coef)
        if abs(a - 1.0) < 1e-6:
            return log_ratio
        return torch.expm1((a - 1.0) * log_ratio) / (a - 1.0)
    raise ValueError(f"unknown f_divergence_type '{f_divergence_type}' (choose {', '.join(F_DIVERGENCES)})")


def _scored_ratios(lp: PreferenceLogps, loss_name: str, f_divergence_type: str,
                   f_alpha_divergence_coef: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(chosen log-ratio, rejected log-ratio, s(chosen), s(rejected))``."""
    chosen, rejected = _log_ratios(lp, loss_name)
    return (chosen, rejected, f_scores(chosen, f_divergence_type, f_alpha_divergence_coef),
            f_scores(rejected, f_divergence_type, f_alpha_divergence_coef))


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


def _per_token(lp: PreferenceLogps, which: str, reference: bool = False) -> Tensor:
    """Mean log-prob per completion token of the chosen or rejected responses (length at least 1)."""
    logps = getattr(lp, f"{'ref' if reference else 'policy'}_{which}")
    return logps / getattr(lp, f"{which}_lengths").to(logps).clamp(min=1)


def chosen_nll(lp: PreferenceLogps) -> Tensor:
    """``[B]`` terms whose mean is the NLL per chosen token over the batch, ``Σ -log π(y_c) / Σ |y_c|``.

    Each pair's term is ``-log π(y_c) / mean(|y_c|)``: a token mean over the whole batch (as a language
    model's cross-entropy), not a mean of per-sequence means.
    """
    lengths = lp.chosen_lengths.to(lp.policy_chosen)
    return -lp.policy_chosen / lengths.mean().clamp(min=1)


# ----------------------------------------------------------------------------------------- losses

@pair_loss(name="sigmoid", hyper=("label_smoothing", "f_divergence_type", "f_alpha_divergence_coef"),
           needs_reference=True, paper="Rafailov et al. 2023 (DPO); soft labels: Mitchell 2023 (cDPO)",
           trl="sigmoid", beta_range=(0.01, 1.0), formula="−p·log σ(βΔ_s − m) − (1−p)·log σ(−(βΔ_s − m))")
def sigmoid_loss(lp: PreferenceLogps, beta: float, label_smoothing: float = 0.0,
                 f_divergence_type: str = "reverse_kl", f_alpha_divergence_coef: float = 0.5) -> LossOutput:
    """DPO (Rafailov et al. 2023, "Direct Preference Optimization"), with soft labels.

    z = β·Δ_s - m;   loss = -(p·log σ(z) + (1 - p)·log σ(-z)).

    With p = 1, m = 0 and reverse KL this is the paper's ``-log σ(β·Δ)``; p < 1 is conservative DPO
    (cDPO, Mitchell 2023) / probabilistic-preference DPO. Rewards are ``β·(log π(y) - log π_ref(y))``.
    """
    _check_beta(beta)
    chosen, rejected, s_c, s_r = _scored_ratios(lp, "sigmoid", f_divergence_type, f_alpha_divergence_coef)
    z = beta * (s_c - s_r) - _margin(lp, chosen)
    p = _preference_prob(lp, label_smoothing, chosen)
    return LossOutput(_soft_logistic(z, p), *_rewards(beta, chosen, rejected))


@pair_loss(name="ipo", hyper=("label_smoothing", "f_divergence_type", "f_alpha_divergence_coef"),
           needs_reference=True, paper="Azar et al. 2023 (IPO), summed log-ratios",
           trl="ipo of TRL's online DPO (TRL's offline ipo is ipo_norm)", beta_range=(0.01, 1.0),
           formula="(Δ_s − (2p−1)/(2β))², Δ over summed log-probs")
def ipo_loss(lp: PreferenceLogps, beta: float, label_smoothing: float = 0.0,
             f_divergence_type: str = "reverse_kl", f_alpha_divergence_coef: float = 0.5) -> LossOutput:
    """IPO (Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human Preferences").

    loss = (Δ_s - (2p - 1) / (2β))².

    With p = 1 the target is the paper's 1/(2β) (β plays the role of the paper's τ); a soft label p
    regresses Δ toward the expected target ``E[I - 1/2]/β`` with ``I ~ Bernoulli(p)``, so p = 1/2
    asks for no preference at all. Δ uses summed log-probs as in the paper (and TRL's online DPO);
    ``ipo_norm`` divides each log-ratio by its token count (TRL's offline DPO). The margin is not used.
    """
    _check_beta(beta)
    chosen, rejected, s_c, s_r = _scored_ratios(lp, "ipo", f_divergence_type, f_alpha_divergence_coef)
    p = _preference_prob(lp, label_smoothing, chosen)
    target = (2 * p - 1) / (2 * beta)
    losses = (s_c - s_r - target) ** 2
    return LossOutput(losses, *_rewards(beta, chosen, rejected))


@pair_loss(name="hinge", hyper=("label_smoothing", "f_divergence_type", "f_alpha_divergence_coef"),
           needs_reference=True, paper="Zhao et al. 2023 (SLiC-HF)", trl="hinge", beta_range=(0.01, 1.0),
           formula="p·relu(1 − (βΔ_s − m)) + (1−p)·relu(1 + βΔ_s − m)")
def hinge_loss(lp: PreferenceLogps, beta: float, label_smoothing: float = 0.0,
               f_divergence_type: str = "reverse_kl", f_alpha_divergence_coef: float = 0.5) -> LossOutput:
    """SLiC hinge loss (Zhao et al. 2023, "SLiC-HF: Sequence Likelihood Calibration with Human Feedback").

    z = β·Δ_s - m;   loss = p·relu(1 - z) + (1 - p)·relu(1 + z).

    With p = 1 and m = 0: ``relu(1 - β·Δ)``, i.e. the pair is done once the chosen response leads
    by 1/β nats (relative to the reference); a margin m raises that requirement.
    """
    _check_beta(beta)
    chosen, rejected, s_c, s_r = _scored_ratios(lp, "hinge", f_divergence_type, f_alpha_divergence_coef)
    z = beta * (s_c - s_r) - _margin(lp, chosen)
    p = _preference_prob(lp, label_smoothing, chosen)
    losses = p * torch.relu(1 - z) + (1 - p) * torch.relu(1 + z)
    return LossOutput(losses, *_rewards(beta, chosen, rejected))


@pair_loss(name="robust", hyper=("label_smoothing", "f_divergence_type", "f_alpha_divergence_coef"),
           needs_reference=True, paper="Chowdhury et al. 2024 (rDPO)", trl="robust", beta_range=(0.01, 1.0),
           formula="[(1−ε)·ℓ(z) − ε·ℓ(−z)] / (1 − 2ε), z = βΔ_s − m, ℓ = −log σ")
def robust_loss(lp: PreferenceLogps, beta: float, label_smoothing: float = 0.0,
                f_divergence_type: str = "reverse_kl", f_alpha_divergence_coef: float = 0.5) -> LossOutput:
    """Robust DPO (rDPO, Chowdhury et al. 2024, "Provably Robust DPO: Aligning Language Models with Noisy Feedback").

    ε = label_smoothing is the assumed rate at which labels are flipped (0 ≤ ε < 1/2); z = β·Δ_s - m:

        loss = ((1 - ε)·(-log σ(z)) - ε·(-log σ(-z))) / (1 - 2ε).

    This is an unbiased estimate of the clean-label DPO loss under symmetric label noise. rDPO uses
    the one global ε: a per-pair ``preference_prob`` is ignored (use the ``sigmoid`` loss for soft
    labels). ε = 0 is plain DPO.
    """
    _check_beta(beta)
    eps = float(label_smoothing)
    if not 0.0 <= eps < 0.5:
        raise ValueError(f"the robust (rDPO) loss needs a label-noise rate label_smoothing in [0, 0.5), got {eps}")
    chosen, rejected, s_c, s_r = _scored_ratios(lp, "robust", f_divergence_type, f_alpha_divergence_coef)
    z = beta * (s_c - s_r) - _margin(lp, chosen)
    losses = ((1 - eps) * -F.logsigmoid(z) - eps * -F.logsigmoid(-z)) / (1 - 2 * eps)
    return LossOutput(losses, *_rewards(beta, chosen, rejected))


@pair_loss(name="simpo", hyper=("label_smoothing", "simpo_gamma"), needs_reference=False,
           paper="Meng et al. 2024 (SimPO)", trl="simpo (CPOTrainer)", beta_range=(0.5, 10.0),
           formula="−p·log σ(z) − (1−p)·log σ(−z), z = β·(avg log π(y_c) − avg log π(y_r)) − γ − m")
def simpo_loss(lp: PreferenceLogps, beta: float, label_smoothing: float = 0.0,
               simpo_gamma: float = 0.5) -> LossOutput:
    """SimPO (Meng et al. 2024, "SimPO: Simple Preference Optimization with a Reference-Free Reward").

    Reference-free, length-normalised: the reward of y is ``β·log π(y) / |y|`` (|y| = completion
    tokens, at least 1), and with γ = ``simpo_gamma`` the target reward margin (in reward units):

        z = β·(log π(y_c)/|y_c| - log π(y_r)/|y_r|) - γ - m;   loss = -(p·log σ(z) + (1 - p)·log σ(-z)).

    Reference log-probs, if present, are ignored.
    """
    _check_beta(beta)
    chosen, rejected = _per_token(lp, "chosen"), _per_token(lp, "rejected")
    z = beta * (chosen - rejected) - simpo_gamma - _margin(lp, chosen)
    p = _preference_prob(lp, label_smoothing, chosen)
    return LossOutput(_soft_logistic(z, p), *_rewards(beta, chosen, rejected))


# ----------------------------------------------------------------------------------------- total

Constraint = Callable[[PreferenceLogps], "Tensor | float"]


@cache
def pair_loss_function(name: str) -> Callable[..., LossOutput]:
    """The function of the table's row ``name`` (its module imported on first use)."""
    spec = PAIR_LOSSES.get(name)
    if spec is None:
        parse_loss_types(name)   # raises the ConfigError with the valid names
    return getattr(importlib.import_module(spec.module), spec.function)


def preference_loss(loss_type: str | Sequence[str], lp: PreferenceLogps, beta: float, *,
                    loss_weights: Sequence[float] | None = None, nll_weight: float = 0.0,
                    constraints: Sequence[tuple[Constraint, float]] = (),
                    **options) -> tuple[Tensor, dict[str, Tensor]]:
    """The scalar training loss of a batch of pairs, and its metrics.

    total = Σ_k w_k · mean(ω ⊙ loss_k) + nll_weight · mean(-log π(y_c) / |y_c|) + Σ_j c_j · mean(constraint_j(lp))

    ``loss_type`` is one name of the loss table or several (a list, or names separated by commas),
    mixed with ``loss_weights`` (default 1 each; MPO, Wang et al. 2024, mixes sigmoid, bco_pair and
    sft this way). ``options`` are the losses' hyperparameters by config field name
    (``label_smoothing``, ``simpo_gamma``, ...): each loss receives those its row lists.

    The NLL term is the per-token negative log-likelihood of the chosen responses (RPO-style
    regularisation that keeps chosen responses likely). Each constraint is a function of the
    :class:`PreferenceLogps` returning a scalar or ``[B]`` penalty (e.g. a constitutional rule);
    it is averaged over the batch and added with its weight. ``ω`` is ``lp.pair_weights`` (WPO,
    :func:`~preftune.losses.weighting.wpo_weights`; 1 when None): each pair loss's value of a pair times its
    weight, as TRL's ``use_weighting`` (the NLL and constraint terms are not weighted).

    Metrics (detached scalars, TRL names): ``loss``, ``loss/preference``, ``loss/<name>`` per loss of
    a mix, ``loss/nll`` (when ``nll_weight > 0``), ``loss/constraint/<function name>``,
    ``rewards/chosen``, ``rewards/rejected``, ``rewards/accuracies``, ``rewards/margins`` (the first
    loss's implicit rewards), ``logps/chosen``, ``logps/rejected``.
    """
    names = parse_loss_types(list(loss_type) if not isinstance(loss_type, str) else loss_type)
    weights = list(loss_weights) if loss_weights else [1.0] * len(names)
    if len(weights) != len(names):
        raise ConfigError(f"{len(weights)} loss_weights for {len(names)} losses ({', '.join(names)})")
    unknown = sorted(set(options) - set(LOSS_HYPERPARAMETERS))
    if unknown:
        raise TypeError(f"preference_loss got options no loss takes: {', '.join(unknown)}")
    terms, first = {}, None
    for name in names:
        out = pair_loss_function(name)(lp, beta, **{h: options[h] for h in PAIR_LOSSES[name].hyper if h in options})
        terms[name] = weighted_pair_losses(out.losses, lp.pair_weights, name).mean()
        first = first or out
    preference = sum(w * terms[name] for name, w in zip(names, weights))
    total = preference
    metrics: dict[str, Tensor] = {"loss/preference": preference.detach()}
    if len(names) > 1:
        metrics.update({f"loss/{name}": term.detach() for name, term in terms.items()})
    if nll_weight:
        nll = (-_per_token(lp, "chosen")).mean()
        total = total + nll_weight * nll
        metrics["loss/nll"] = nll.detach()
    for fn, weight in constraints:
        value = fn(lp)
        value = torch.as_tensor(value, dtype=preference.dtype, device=preference.device).mean()
        total = total + weight * value
        metrics[_unique_key(metrics, f"loss/constraint/{_function_name(fn)}")] = value.detach()

    chosen_r, rejected_r = first.chosen_rewards, first.rejected_rewards
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
