"""Knowledge distillation losses: the generalised Jensen-Shannon divergence of GKD, and its chunked evaluation.

Generalised JSD (Agarwal et al. 2024, "On-Policy Distillation of Language Models: Learning from Self-Generated
Mistakes", the GKD paper), for the teacher's next-token distribution ``P`` and the student's ``Q`` at one
position, with ``β ∈ [0, 1]``::

    M     = β·P + (1 - β)·Q
    JSD_β = β·KL(P ‖ M) + (1 - β)·KL(Q ‖ M)

and at the ends, as the paper (and the ``beta`` option) define them, the two KLs it interpolates between:
``β = 0`` is the forward KL ``KL(P ‖ Q)`` (mean-seeking, plain KD) and ``β = 1`` the reverse KL ``KL(Q ‖ P)``
(mode-seeking). ``JSD_β / β → KL(P ‖ Q)`` as ``β → 0`` and ``JSD_β / (1 - β) → KL(Q ‖ P)`` as ``β → 1``, so the
ends are the limits of the divergence's direction (its value itself goes to 0 there). Both distributions are
taken at a temperature ``τ``: ``log_softmax(logits / τ)``.

:func:`chunked_divergence` evaluates such a per-position divergence over the ``N`` positions of a batch that
carry a loss, ``chunk_size`` positions at a time: the largest tensors it builds are one ``[chunk_size, vocab]``
block per model, never ``[batch, seq, vocab]``. The teacher's block is computed under ``no_grad`` at the same
positions; the student's chunk runs under activation checkpointing when gradients are needed, so the backward
pass keeps only the two chunks' hidden states and recomputes both blocks one chunk at a time.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint


def _kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    """``KL(p ‖ q)`` over the last dimension (terms with ``p = 0`` are 0)."""
    p = log_p.exp()
    return torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p)).sum(-1)


def generalized_jsd(student_logps: Tensor, teacher_logps: Tensor, beta: float) -> Tensor:
    """Generalised JSD of GKD between the teacher's and the student's next-token distributions (see the module
    docstring for the formula). Inputs are log-distributions ``[..., V]`` (each row a log-softmax); returns
    ``[...]``. ``beta = 0``: ``KL(teacher ‖ student)``; ``beta = 1``: ``KL(student ‖ teacher)``."""
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    if beta == 0.0:
        return _kl(teacher_logps, student_logps)
    if beta == 1.0:
        return _kl(student_logps, teacher_logps)
    mixture = torch.logaddexp(teacher_logps + math.log(beta), student_logps + math.log1p(-beta))
    return beta * _kl(teacher_logps, mixture) + (1.0 - beta) * _kl(student_logps, mixture)


def chunked_divergence(student_hidden: Tensor, teacher_hidden: Tensor, student_logits: Callable[[Tensor], Tensor],
                       teacher_logits: Callable[[Tensor], Tensor], divergence: Callable[[Tensor, Tensor], Tensor],
                       temperature: float = 1.0, chunk_size: int = 1024) -> Tensor:
    """``divergence(student_logps, teacher_logps)`` at each of ``N`` positions, chunk by chunk.

    ``student_hidden`` ``[N, Hs]`` and ``teacher_hidden`` ``[N, Ht]`` are the two models' final hidden states at
    the same positions; ``*_logits`` map a chunk of them to logits ``[n, V]``. When the two output layers have
    different widths (padded embeddings), the first ``min`` columns are compared (the caller checks that the
    tokenizer's tokens all lie there). Returns ``[N]`` (or ``[N, k]`` for a divergence with ``k`` values per
    position), float32 (float64 for float64 logits), differentiable with respect to the student.
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if student_hidden.shape[0] != teacher_hidden.shape[0]:
        raise ValueError(f"the student has {student_hidden.shape[0]} positions and the teacher "
                         f"{teacher_hidden.shape[0]}; they must be the same")

    def chunk(student: Tensor, teacher: Tensor) -> Tensor:
        with torch.no_grad():
            teacher_out = teacher_logits(teacher)
        student_out = student_logits(student)
        width = min(student_out.shape[-1], teacher_out.shape[-1])
        logq = torch.log_softmax(_wide(student_out[:, :width]) / temperature, -1)
        logp = torch.log_softmax(_wide(teacher_out[:, :width]) / temperature, -1)
        return divergence(logq, logp)

    if student_hidden.shape[0] == 0:    # nothing to compare: stay attached to the graph
        return student_hidden.sum(-1).float() * 0.0
    grad = torch.is_grad_enabled() and student_hidden.requires_grad
    values = []
    for start in range(0, student_hidden.shape[0], chunk_size):
        args = (student_hidden[start:start + chunk_size], teacher_hidden[start:start + chunk_size].detach())
        values.append(checkpoint(chunk, *args, use_reentrant=False) if grad else chunk(*args))
    return torch.cat(values)


def _wide(logits: Tensor) -> Tensor:
    """Half-precision logits in float32 for the softmax (float64 kept)."""
    return logits if logits.dtype == torch.float64 else logits.float()


def distill_divergences(student_logps: Tensor, teacher_logps: Tensor, beta: float) -> Tensor:
    """``[..., 3]``: the generalised JSD at ``beta``, ``KL(teacher ‖ student)`` and ``KL(student ‖ teacher)``
    (what a held-out evaluation reports)."""
    return torch.stack([generalized_jsd(student_logps, teacher_logps, beta), _kl(teacher_logps, student_logps),
                        _kl(student_logps, teacher_logps)], -1)
