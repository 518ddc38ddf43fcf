"""Loss functions: pure functions of log-prob (or score) tensors, picked by name by the trainers."""

from preftune.losses.preference import (
    LOSSES,
    REFERENCE_FREE,
    LossOutput,
    PreferenceLogps,
    hinge_loss,
    ipo_loss,
    load_constraint,
    preference_loss,
    robust_loss,
    sigmoid_loss,
    simpo_loss,
)

__all__ = [
    "LOSSES",
    "REFERENCE_FREE",
    "LossOutput",
    "PreferenceLogps",
    "hinge_loss",
    "ipo_loss",
    "load_constraint",
    "preference_loss",
    "robust_loss",
    "sigmoid_loss",
    "simpo_loss",
]
