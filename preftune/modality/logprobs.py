"""The one module that turns a model and a batch into completion log-probs, for every recipe and modality.

The loop prepares (and, under data parallelism, wraps) a module rather than the bare model, so that the
forward that computes the chunked log-probs is the one the distributed wrapper (DDP, FSDP2, DeepSpeed)
sees: :class:`CompletionLogprobs` is that module for DPO, KTO, online DPO, SFT, GRPO / RLOO and, inside
PPO's policy-and-value module, for PPO; the live reference runs its model through it too. Two steps:

1. **hidden states**, the modality's (:meth:`~.base.Modality.hidden_states`): text as padded rows, text
   packed into one row (prefix-shared pairs, padding-free sequences, packed language-modelling rows), or
   a vision-language model encoding each prompt's images;
2. **projection and log-softmax** of the states that predict completion tokens only, chunk by chunk
   (:func:`preftune.logprobs.completion_logprobs`; a packed row's scored positions from its layout,
   :func:`preftune.data.packed.scored_positions`), so no ``[batch, seq, vocab]`` tensor exists.

What the forward returns is named by its ``shape``: ``"tokens"`` (``[B, L]`` per-token rows, 0 off the
completion), ``"flat"`` (``[N]``, the completion tokens row-major) or ``"sums"`` (``[S]``, one summed
log-prob per sequence: the rows of a padded batch, the sequences of a packed one; a ``token_weights`` entry of
the batch, LD-DPO's, weights each token's term: :func:`preftune.data.collate.add_length_weights`).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from ..data.packed import PackedLayout, is_packed
from ..logprobs import _to_token_layout, completion_logprobs, packed_completion_logprobs, packed_sums, weighted_sums
from ..speed.head import STAT_COLUMNS

TOKENS, FLAT, SUMS = "tokens", "flat", "sums"


class Logprobs(NamedTuple):
    """What :class:`CompletionLogprobs` returns (a tuple, so distributed wrappers see its tensors)."""

    values: Tensor                     # float32 log-probs, laid out as the forward's ``shape`` says
    entropy: Tensor | None = None      # ``with_entropy``: each predicted distribution's entropy (tokens or flat)
    stats: tuple[Tensor, Tensor] | None = None   # ``with_stats``: (token stats [N, 4], row or sequence [N])
    hidden: Tensor | None = None       # ``with_hidden``: the final hidden states the log-probs came from


class CompletionLogprobs(nn.Module):
    """``model`` as "batch -> completion log-probs": the module the loop prepares and a distributed wrapper wraps.

    Args:
        model: the policy (a causal LM or a vision-language model, peft-wrapped or not).
        modality: whose :meth:`~.base.Modality.hidden_states` runs the model on a batch (``TEXT``, ``VISION``).
        chunk_size: rows projected onto the vocabulary at a time.
        temperature: divides the logits first, as sampling does (the online recipes).
        mask: the batch's key of the tokens scored (``completion_mask``; SFT: ``loss_mask``).
    """

    def __init__(self, model: nn.Module, modality, chunk_size: int = 1024, temperature: float = 1.0,
                 mask: str = "completion_mask"):
        super().__init__()
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive integer, got {chunk_size}")
        self.model = model
        self.modality = modality
        self.chunk_size = chunk_size
        self.temperature = temperature
        self.mask = mask

    def forward(self, batch: dict, shape: str, with_entropy: bool = False, with_stats: bool = False,
                with_hidden: bool = False) -> Logprobs:
        """The log-probs of ``batch``'s completion tokens as ``shape`` (``"tokens"``, ``"flat"`` or ``"sums"``; a
        packed batch gives ``"flat"`` or ``"sums"``), with the entropies (not for sums), the head's
        :func:`~preftune.speed.head.token_stats` of each token and the row (padded) or sequence (packed) it
        belongs to, and the hidden states, where asked."""
        if shape not in (TOKENS, FLAT, SUMS) or (with_entropy and shape == SUMS):
            raise ValueError(f"shape must be one of {TOKENS!r}, {FLAT!r}, {SUMS!r} (entropy not for sums), "
                             f"got {shape!r}")
        hidden = self.modality.hidden_states(self.model, batch)
        chunks = [] if with_stats else None
        if is_packed(batch):
            values, entropy, owner = self._packed(batch, hidden, shape, with_entropy, chunks)
        else:
            values, entropy, owner = self._rows(batch, hidden, shape, with_entropy, chunks)
        stats = None
        if with_stats:
            stats = (torch.cat(chunks) if chunks else values.new_zeros(0, len(STAT_COLUMNS)), owner)
        return Logprobs(values, entropy, stats, hidden if with_hidden else None)

    def _rows(self, batch, hidden, shape, with_entropy, chunks):
        """Padded (or packed language-modelling) rows: state ``t-1`` predicts token ``t`` where the mask is set."""
        mask = batch[self.mask]
        flat, entropy = completion_logprobs(self.model, hidden, batch["input_ids"], mask, self.chunk_size,
                                            self.temperature, with_entropy, stats=chunks)
        rows = mask[:, 1:].to(device=flat.device, dtype=torch.bool).nonzero()[:, 0] if chunks is not None else None
        if shape == FLAT:
            return flat, entropy, rows
        values = _to_token_layout(flat, mask)
        if shape == SUMS:
            return weighted_sums(values, batch.get("token_weights")), None, rows
        return values, None if entropy is None else _to_token_layout(entropy, mask), rows

    def _packed(self, batch, hidden, shape, with_entropy, chunks):
        """A packed row of blocks (:mod:`preftune.data.packed`): its layout says which state predicts which token."""
        if shape == TOKENS:
            raise ValueError("a packed batch has no per-token rows: ask for 'flat' or 'sums'")
        flat, entropy, sequences, targets = packed_completion_logprobs(self.model, hidden, batch, self.chunk_size,
                                                                       self.temperature, with_entropy, chunks)
        if shape == FLAT:
            return flat, entropy, sequences
        return packed_sums(flat, sequences, targets, batch), None, sequences


def completion_lengths(batch: dict) -> Tensor:
    """``[S]`` float32 completion lengths of every sequence of a padded or packed batch, in its order."""
    if is_packed(batch):
        return PackedLayout.of(batch).lengths().to(batch["input_ids"].device)
    return batch["completion_mask"].sum(-1).float()


def sequence_sums(module: nn.Module, batch: dict) -> tuple[Tensor, Tensor]:
    """``(summed log-probs, completion lengths)`` of every sequence of a padded or packed batch, through the
    :class:`CompletionLogprobs` ``module`` (called as a module, so a distributed wrapper sees the forward)."""
    sums = module(batch, SUMS).values
    return sums, completion_lengths(batch).to(sums.device)
