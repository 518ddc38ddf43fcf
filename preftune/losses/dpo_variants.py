"""The rest of the DPO family that needs a reference: length-normalised, contrastive, anchored, sorted and
discovered variants. Notation as in :mod:`preftune.losses.preference` (Δ, s, β, p, m, σ); per pair,
``u_c = log π(y_c) - log π_ref(y_c)`` and ``u_r`` likewise, ``|y|`` the completion's token count.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from preftune.config.losses import pair_loss

from .preference import (
    LossOutput,
    PreferenceLogps,
    _check_beta,
    _log_ratios,
    _margin,
    _preference_prob,
    _rewards,
    _scored_ratios,
    _soft_logistic,
)

EXO_EPSILON = 1e-3   # EXO's label smoothing for hard labels


def _lengths(lp: PreferenceLogps, like: Tensor) -> tuple[Tensor, Tensor]:
    return lp.chosen_lengths.to(like).clamp(min=1), lp.rejected_lengths.to(like).clamp(min=1)


@pair_loss(name="sigmoid_norm", hyper=("label_smoothing", "f_divergence_type", "f_alpha_divergence_coef"),
           needs_reference=True, paper="Lambert et al. 2024 (Tülu 3, dpo_norm)", trl="sigmoid_norm",
           beta_range=(1.0, 10.0), formula="−p·log σ(z) − (1−p)·log σ(−z), z = β·(s_c/n_c − s_r/n_r) − m")
def sigmoid_norm_loss(lp: PreferenceLogps, beta: float, label_smoothing: float = 0.0,
                      f_divergence_type: str = "reverse_kl", f_alpha_divergence_coef: float = 0.5) -> LossOutput:
    """Length-normalised DPO (Lambert et al. 2024, "Tülu 3: Pushing Frontiers in Open Language Model
    Post-Training", sec. 5.2, ``dpo_norm``): DPO on per-token log-ratios.

    z = β·(s(y_c)/|y_c| - s(y_r)/|y_r|) - m;   loss = -(p·log σ(z) + (1 - p)·log σ(-z)).

    Tülu 3 trains it with β = 5. Rewards are the unnormalised ``β·u``.
    """
    _check_beta(beta)
    chosen, rejected, s_c, s_r = _scored_ratios(lp, "sigmoid_norm", f_divergence_type, f_alpha_divergence_coef)
    len_c, len_r = _lengths(lp, chosen)
    z = beta * (s_c / len_c - s_r / len_r) - _margin(lp, chosen)
    p = _preference_prob(lp, label_smoothing, chosen)
    return LossOutput(_soft_logistic(z, p), *_rewards(beta, chosen, rejected))


@pair_loss(name="ipo_norm", hyper=("label_smoothing", "f_divergence_type", "f_alpha_divergence_coef"),
           needs_reference=True, paper="Azar et al. 2023 (IPO), per-token log-ratios",
           trl="ipo (DPOTrainer)", beta_range=(0.01, 1.0), formula="(s_c/n_c − s_r/n_r − (2p−1)/(2β))²")
def ipo_norm_loss(lp: PreferenceLogps, beta: float, label_smoothing: float = 0.0,
                  f_divergence_type: str = "reverse_kl", f_alpha_divergence_coef: float = 0.5) -> LossOutput:
    """IPO on per-token log-ratios (Azar et al. 2023, eq. 17, with each sequence's log-ratio divided by
    its token count, the convention of TRL's offline DPO trainer, which reports the paper's results
    were obtained this way).

    loss = (s(y_c)/|y_c| - s(y_r)/|y_r| - (2p - 1)/(2β))².   The margin is not used.
    """
    _check_beta(beta)
    chosen, rejected, s_c, s_r = _scored_ratios(lp, "ipo_norm", f_divergence_type, f_alpha_divergence_coef)
    len_c, len_r = _lengths(lp, chosen)
    p = _preference_prob(lp, label_smoothing, chosen)
    losses = (s_c / len_c - s_r / len_r - (2 * p - 1) / (2 * beta)) ** 2
    return LossOutput(losses, *_rewards(beta, chosen, rejected))


@pair_loss(name="exo_pair", hyper=("label_smoothing", "f_divergence_type", "f_alpha_divergence_coef"),
           needs_reference=True, paper="Ji et al. 2024 (EXO)", trl="exo_pair", beta_range=(0.01, 1.0),
           formula="σ(z)·(log σ(z) − log p) + σ(−z)·(log σ(−z) − log(1−p)), z = βΔ_s, p within [1e-3, 1 − 1e-3]")
def exo_pair_loss(lp: PreferenceLogps, beta: float, label_smoothing: float = 0.0,
                  f_divergence_type: str = "reverse_kl", f_alpha_divergence_coef: float = 0.5) -> LossOutput:
    """EXO for pairs (Ji et al. 2024, "Towards Efficient Exact Optimization of Language Model Alignment", eq. 16).

    The reverse KL from the model's preference distribution ``q = (σ(z), σ(-z))``, z = β·Δ_s, to the
    label distribution ``(p, 1 - p)``::

        loss = σ(z)·(log σ(z) - log p) + σ(-z)·(log σ(-z) - log(1 - p)).

    p is kept within [ε₀, 1 - ε₀], ε₀ = 1e-3 (the paper's value): hard labels (label_smoothing 0) use
    p = 1 - 1e-3, as TRL does.
    """
    _check_beta(beta)
    chosen, rejected, s_c, s_r = _scored_ratios(lp, "exo_pair", f_divergence_type, f_alpha_divergence_coef)
    p = _preference_prob(lp, label_smoothing, chosen).clamp(EXO_EPSILON, 1 - EXO_EPSILON)
    z = beta * (s_c - s_r)
    losses = (torch.sigmoid(z) * (F.logsigmoid(z) - torch.log(p))
              + torch.sigmoid(-z) * (F.logsigmoid(-z) - torch.log1p(-p)))
    return LossOutput(losses, *_rewards(beta, chosen, rejected))


@pair_loss(name="nca_pair", hyper=(), needs_reference=True,
           paper="Chen et al. 2024 (NCA)", trl="nca_pair", beta_range=(0.01, 1.0),
           formula="−log σ(βu_c) − ½·log σ(−βu_c) − ½·log σ(−βu_r)")
def nca_pair_loss(lp: PreferenceLogps, beta: float) -> LossOutput:
    """NCA for pairs (Chen et al. 2024, "Noise Contrastive Alignment of Language Models with Explicit
    Rewards", eq. 11 with K = 2 and the winner's reward taken as the optimum): with r = β·u,

        loss = -log σ(r_c) - ½·log σ(-r_c) - ½·log σ(-r_r).

    Unlike DPO it scores each response against the reference on its own, so the chosen response's
    likelihood does not fall.
    """
    _check_beta(beta)
    chosen, rejected = _log_ratios(lp, "nca_pair")
    r_c, r_r = beta * chosen, beta * rejected
    losses = -F.logsigmoid(r_c) - 0.5 * F.logsigmoid(-r_c) - 0.5 * F.logsigmoid(-r_r)
    return LossOutput(losses, *_rewards(beta, chosen, rejected))


@pair_loss(name="bco_pair", hyper=(), needs_reference=True,
           paper="Jung et al. 2024 (BCO)", trl="bco_pair", beta_range=(0.01, 1.0),
           formula="−log σ(βu_c) − log σ(−βu_r)")
def bco_pair_loss(lp: PreferenceLogps, beta: float) -> LossOutput:
    """BCO on pairs (Jung et al. 2024, "Binary Classifier Optimization for Large Language Model Alignment"):
    a binary classifier with logit r = β·u, chosen as class 1 and rejected as class 0, with no reward
    shift δ:

        loss = -log σ(r_c) - log σ(-r_r).
    """
    _check_beta(beta)
    chosen, rejected = _log_ratios(lp, "bco_pair")
    losses = -F.logsigmoid(beta * chosen) - F.logsigmoid(-beta * rejected)
    return LossOutput(losses, *_rewards(beta, chosen, rejected))


@pair_loss(name="sppo_hard", hyper=(), needs_reference=True,
           paper="Wu et al. 2024 (SPPO), hard labels", trl="sppo_hard", beta_range=(0.001, 1.0),
           formula="(u_c − 1/(2β))² + (u_r + 1/(2β))²")
def sppo_hard_loss(lp: PreferenceLogps, beta: float) -> LossOutput:
    """SPPO with hard win probabilities (Wu et al. 2024, "Self-Play Preference Optimization for Language
    Model Alignment", eq. 4.7 with P(y_c ≻ π) = 1 and P(y_r ≻ π) = 0): each log-ratio regresses to
    ``±1/(2β)`` (the paper's η = 1/β):

        loss = (u_c - 1/(2β))² + (u_r + 1/(2β))².
    """
    _check_beta(beta)
    chosen, rejected = _log_ratios(lp, "sppo_hard")
    losses = (chosen - 0.5 / beta) ** 2 + (rejected + 0.5 / beta) ** 2
    return LossOutput(losses, *_rewards(beta, chosen, rejected))


def _sorted_logistic(delta: Tensor, beta: float, label_smoothing: float) -> Tensor:
    eps = float(label_smoothing)
    return -(1 - eps) * F.logsigmoid(beta * delta) - eps * F.logsigmoid(-beta * delta)


@pair_loss(name="aot", hyper=("label_smoothing",), needs_reference=True,
           paper="Melnyk et al. 2024 (AOT), paired", trl="aot", beta_range=(0.01, 1.0),
           formula="−(1−ε)·log σ(βd_i) − ε·log σ(−βd_i), d = sort(log π_c − log π_r) − sort(log π_ref,c − log π_ref,r)")
def aot_loss(lp: PreferenceLogps, beta: float, label_smoothing: float = 0.0) -> LossOutput:
    """Alignment via Optimal Transport, paired (Melnyk et al. 2024, "Distributional Preference Alignment of
    LLMs via Optimal Transport"): first-order stochastic dominance of the policy's chosen-over-rejected
    log-ratio distribution over the reference's, the 1-D optimal transport done by sorting over the batch::

        d = sort_B(log π(y_c) - log π(y_r)) - sort_B(log π_ref(y_c) - log π_ref(y_r))
        loss_i = -(1 - ε)·log σ(β·d_i) - ε·log σ(-β·d_i)

    The i-th loss belongs to the i-th quantile, not the i-th pair; per-pair labels and margins are not used.
    """
    _check_beta(beta)
    chosen, rejected = _log_ratios(lp, "aot")
    policy = torch.sort(lp.policy_chosen - lp.policy_rejected, dim=0).values
    reference = torch.sort(lp.ref_chosen - lp.ref_rejected, dim=0).values
    return LossOutput(_sorted_logistic(policy - reference, beta, label_smoothing), *_rewards(beta, chosen, rejected))


@pair_loss(name="aot_unpaired", hyper=("label_smoothing",), needs_reference=True,
           paper="Melnyk et al. 2024 (AOT), unpaired", trl="aot_unpaired", beta_range=(0.01, 1.0),
           formula="−(1−ε)·log σ(βd_i) − ε·log σ(−βd_i), d = sort(u_c) − sort(u_r)")
def aot_unpaired_loss(lp: PreferenceLogps, beta: float, label_smoothing: float = 0.0) -> LossOutput:
    """Alignment via Optimal Transport, unpaired (Melnyk et al. 2024): the distribution of chosen log-ratios
    should dominate that of rejected ones, quantile by quantile::

        d = sort_B(u_c) - sort_B(u_r);   loss_i = -(1 - ε)·log σ(β·d_i) - ε·log σ(-β·d_i)
    """
    _check_beta(beta)
    chosen, rejected = _log_ratios(lp, "aot_unpaired")
    delta = torch.sort(chosen, dim=0).values - torch.sort(rejected, dim=0).values
    return LossOutput(_sorted_logistic(delta, beta, label_smoothing), *_rewards(beta, chosen, rejected))


@pair_loss(name="apo_zero", hyper=(), needs_reference=True, paper="D'Oosterlinck et al. 2024 (APO-zero)",
           trl="apo_zero", beta_range=(0.01, 1.0), formula="1 − σ(βu_c) + σ(βu_r)")
def apo_zero_loss(lp: PreferenceLogps, beta: float) -> LossOutput:
    """APO-zero (D'Oosterlinck et al. 2024, "Anchored Preference Optimization and Contrastive Revisions",
    eq. 7): for chosen outputs better than the model's own, raise the chosen likelihood and lower the
    rejected one, each anchored to the reference::

        loss = (1 - σ(β·u_c)) + σ(β·u_r)
    """
    _check_beta(beta)
    chosen, rejected = _log_ratios(lp, "apo_zero")
    losses = 1 - torch.sigmoid(beta * chosen) + torch.sigmoid(beta * rejected)
    return LossOutput(losses, *_rewards(beta, chosen, rejected))


@pair_loss(name="apo_down", hyper=(), needs_reference=True, paper="D'Oosterlinck et al. 2024 (APO-down)",
           trl="apo_down", beta_range=(0.01, 1.0), formula="σ(βu_c) + 1 − σ(β(u_c − u_r))")
def apo_down_loss(lp: PreferenceLogps, beta: float) -> LossOutput:
    """APO-down (D'Oosterlinck et al. 2024, eq. 8): for chosen outputs worse than the model's own, lower the
    chosen likelihood, and the rejected one more::

        loss = σ(β·u_c) + (1 - σ(β·(u_c - u_r)))
    """
    _check_beta(beta)
    chosen, rejected = _log_ratios(lp, "apo_down")
    losses = torch.sigmoid(beta * chosen) + 1 - torch.sigmoid(beta * (chosen - rejected))
    return LossOutput(losses, *_rewards(beta, chosen, rejected))


@pair_loss(name="discopop", hyper=("discopop_tau", "f_divergence_type", "f_alpha_divergence_coef"),
           needs_reference=True, paper="Lu et al. 2024 (DiscoPOP)", trl="discopop", beta_range=(0.01, 1.0),
           formula="(1 − w)·(−log σ(z)) + w·exp(−z), z = βΔ_s, w = σ(z/τ)")
def discopop_loss(lp: PreferenceLogps, beta: float, discopop_tau: float = 0.05,
                  f_divergence_type: str = "reverse_kl", f_alpha_divergence_coef: float = 0.5) -> LossOutput:
    """DiscoPOP, the log-ratio modulated loss (Lu et al. 2024, "Discovering Preference Optimization
    Algorithms with and for Large Language Models", eq. 5): a blend of the logistic (DPO) and the
    exponential loss, weighted by a sigmoid of the logit with temperature τ = ``discopop_tau``::

        z = β·Δ_s;  w = σ(z / τ);  loss = (1 - w)·(-log σ(z)) + w·exp(-z)

    The loss is not convex: its slope at z = 0 is ``(1 - log 2)/(4τ) - 3/4``, positive for τ < 0.307
    (0.78 at the paper's τ = 0.05), so a policy equal to its reference first moves the margin down,
    towards a local minimum below 0.
    """
    _check_beta(beta)
    if not discopop_tau > 0:
        raise ValueError(f"discopop_tau must be positive, got {discopop_tau}")
    chosen, rejected, s_c, s_r = _scored_ratios(lp, "discopop", f_divergence_type, f_alpha_divergence_coef)
    z = beta * (s_c - s_r)
    w = torch.sigmoid(z / discopop_tau)
    losses = (1 - w) * -F.logsigmoid(z) + w * torch.exp(-z)
    return LossOutput(losses, *_rewards(beta, chosen, rejected))
