"""Seeds: the run's global seed set once, and every other seed derived from a tuple of integers.

Every random stream of a run (the epoch's example order, a rollout's samples, a minibatch's shuffle, a
process's share) is a function of the run's seed and its position, so a resumed run draws exactly what an
uninterrupted one would.
"""

from __future__ import annotations

import random

import numpy as np
import torch

MULTIPLIER = 1_000_003


def mix_seed(*parts: int) -> int:
    """One seed from integers (the run's seed, the step, the process, ...): ``((p0·K + p1)·K + p2)...`` mod 2^62,
    K = 1,000,003 (so ``mix_seed(seed, epoch) = seed·K + epoch``)."""
    value = 0
    for part in parts:
        value = (value * MULTIPLIER + int(part)) % 2**62
    return value


def set_seed(seed: int) -> None:
    """Python's, NumPy's and PyTorch's global generators, from the run's seed."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
