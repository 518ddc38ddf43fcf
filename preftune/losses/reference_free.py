"""Preference losses that need no reference model: ORPO, CPO and the SFT term (SimPO is in ``preference.py``).

No reference model is loaded for them (``needs_reference=False`` in their rows); reference log-probs,
if present, are ignored. Notation as in :mod:`preftune.losses.preference`; ``ā(y) = log π(y) / |y|``
is the mean log-prob per completion token, ``NLL`` the chosen responses' negative log-likelihood per
token over the batch (:func:`preftune.losses.preference.chosen_nll`).
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
    _margin,
    _per_token,
    _preference_prob,
    _rewards,
    _soft_logistic,
    chosen_nll,
)


def log1m_exp(x: Tensor) -> Tensor:
    """``log(1 - exp(x))`` for x < 0, accurate on both sides of -log 2 (Mächler 2012); x = 0 gives -inf."""
    near_zero = x > -0.6931471805599453
    return torch.where(near_zero, torch.log(-torch.expm1(x.clamp(max=0))),
                       torch.log1p(-torch.exp(x.clamp(max=-0.6931471805599453))))


@pair_loss(name="orpo", hyper=(), needs_reference=False, paper="Hong et al. 2024 (ORPO)",
           trl="ORPOTrainer (experimental)", beta_range=(0.01, 1.0),
           formula="NLL − β·log σ(log odds(y_c) − log odds(y_r)), odds(y) = e^ā / (1 − e^ā)")
def orpo_loss(lp: PreferenceLogps, beta: float) -> LossOutput:
    """ORPO (Hong et al. 2024, "ORPO: Monolithic Preference Optimization without Reference Model", eq. 6-7).

    With the mean token log-prob ā(y) and odds(y) = P/(1 - P), P = exp(ā(y)) (eq. 4)::

        log odds(y) = ā(y) - log(1 - exp(ā(y)))
        loss = NLL - β·log σ(log odds(y_c) - log odds(y_r))

    β is the paper's λ (0.1 there). Rewards are ``β·ā(y)``.
    """
    _check_beta(beta)
    chosen, rejected = _per_token(lp, "chosen"), _per_token(lp, "rejected")
    log_odds = (chosen - rejected) - (log1m_exp(chosen) - log1m_exp(rejected))
    losses = chosen_nll(lp) - beta * F.logsigmoid(log_odds)
    return LossOutput(losses, *_rewards(beta, chosen, rejected))


@pair_loss(name="cpo", hyper=("label_smoothing", "cpo_alpha"), needs_reference=False,
           paper="Xu et al. 2024 (CPO)", trl="CPOTrainer sigmoid (experimental)", beta_range=(0.01, 1.0),
           formula="−p·log σ(z) − (1−p)·log σ(−z) + α·NLL, z = β·(log π(y_c) − log π(y_r)) − m")
def cpo_loss(lp: PreferenceLogps, beta: float, label_smoothing: float = 0.0, cpo_alpha: float = 1.0) -> LossOutput:
    """CPO (Xu et al. 2024, "Contrastive Preference Optimization: Pushing the Boundaries of LLM Performance
    in Machine Translation", eq. 3-6): DPO with a uniform reference (so none is needed) plus a
    behaviour-cloning NLL term on the chosen responses, weighted by α = ``cpo_alpha``::

        z = β·(log π(y_c) - log π(y_r)) - m;   loss = -(p·log σ(z) + (1 - p)·log σ(-z)) + α·NLL

    Log-probs are summed over tokens. Rewards are ``β·log π(y)``.
    """
    _check_beta(beta)
    z = beta * (lp.policy_chosen - lp.policy_rejected) - _margin(lp, lp.policy_chosen)
    p = _preference_prob(lp, label_smoothing, lp.policy_chosen)
    losses = _soft_logistic(z, p) + cpo_alpha * chosen_nll(lp)
    return LossOutput(losses, *_rewards(beta, lp.policy_chosen, lp.policy_rejected))


@pair_loss(name="sft", hyper=(), needs_reference=False, paper="supervised fine-tuning on the chosen responses",
           trl="sft", beta_range=None, formula="NLL of the chosen response per token (over the batch)")
def sft_loss(lp: PreferenceLogps, beta: float) -> LossOutput:
    """The negative log-likelihood of the chosen responses per token over the batch, as a pair loss: mixed
    into other losses by ``loss_type`` lists (MPO's ``sigmoid, bco_pair, sft``), or alone. Rewards are
    ``β·log π(y)`` (β does not enter the loss)."""
    return LossOutput(chosen_nll(lp), *_rewards(beta, lp.policy_chosen, lp.policy_rejected))
