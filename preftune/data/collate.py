"""Batching: prompt + completion sequences right-padded with a completion mask; preference pairs as
chosen and rejected stacked into one such batch (one forward serves both). The same sequences packed
into one row without padding, each pair's prompt encoded once, are :func:`collate_pairs_packed` and
:func:`collate_completions_packed` (layout: :mod:`preftune.data.packed`)."""

from __future__ import annotations

import functools

import torch

from preftune.data.packed import PackedLayout, blocks_of_sequences, collate_blocks, is_packed
from preftune.data.preference import TokenizedPair
from preftune.errors import ConfigError
from preftune.losses.weighting import ld_token_weights, pair_shared_lengths


def collate_pairs(pairs: list[TokenizedPair], pad_token_id: int,
                  pad_to_multiple_of: int | None = None) -> dict[str, torch.Tensor]:
    """Rows 0..B-1 are prompt+chosen, rows B..2B-1 prompt+rejected, right-padded.

    ``completion_mask`` is True exactly on response tokens (EOS included), False on prompt and padding.
    """
    if not pairs:
        raise ValueError("collate_pairs needs at least one pair")
    prompts, responses = pair_sequences_in_rows(pairs)
    return {**collate_completions(prompts, responses, pad_token_id, pad_to_multiple_of), **pair_columns(pairs)}


def collate_pairs_packed(pairs: list[TokenizedPair], share_prefix: bool = True) -> dict[str, torch.Tensor]:
    """The sequences of :func:`collate_pairs`, in the same order, as one packed row without padding.

    With ``share_prefix`` each pair is one block ``prompt | chosen | rejected``; otherwise every
    sequence is a block of its own (padding-free)."""
    if not pairs:
        raise ValueError("collate_pairs_packed needs at least one pair")
    prompts, responses = pair_sequences_in_rows(pairs)
    return {**collate_blocks(blocks_of_sequences(prompts, responses, share_prefix)), **pair_columns(pairs)}


def collate_completions_packed(prompts: list[list[int]], completions: list[list[int]]) -> dict[str, torch.Tensor]:
    """The sequences of :func:`collate_completions` as one padding-free row (a block each)."""
    return collate_blocks(blocks_of_sequences(prompts, completions, share_prefix=False))


def add_length_weights(batch: dict[str, torch.Tensor], ld_alpha: float | None,
                       adjacent: bool = False) -> dict[str, torch.Tensor]:
    """``batch`` with LD-DPO's weights (``ld_alpha`` None: unchanged): ``token_weights`` laid out as ``input_ids``
    (padded ``[B, L]`` or packed ``[1, T]``; 1 off the completions), each completion token's
    :func:`~preftune.losses.weighting.ld_token_weights` for its pair's shared length, and ``shared_lengths`` ``[S]``
    (per sequence, in the batch's order). The batch's sequences are pairs completion-major (``i`` and ``i + S/2``, as
    :func:`collate_pairs` lays them out) or, ``adjacent``, ``2i`` and ``2i + 1``."""
    if ld_alpha is None:
        return batch
    if is_packed(batch):
        layout = PackedLayout.of(batch)
        spans = {seq: (offset, length) for seq, _, _, offset, length in layout.completions()}
        lengths = torch.tensor([spans[s][1] for s in range(len(spans))], dtype=torch.long)
        shared = pair_shared_lengths(lengths, adjacent)
        weights = torch.ones(batch["input_ids"].shape, dtype=torch.float64)
        for seq, (offset, length) in spans.items():
            weights[0, offset:offset + length] = ld_token_weights(torch.arange(length), shared[seq], ld_alpha)
    else:
        mask = batch["completion_mask"].to(torch.bool)
        shared = pair_shared_lengths(mask.sum(-1), adjacent)
        index = mask.long().cumsum(-1) - 1                  # each completion token's index in its completion
        weights = torch.where(mask, ld_token_weights(index, shared[:, None], ld_alpha), 1.0)
    return {**batch, "token_weights": weights, "shared_lengths": shared}


def pair_sequences_in_rows(pairs: list[TokenizedPair]) -> tuple[list[list[int]], list[list[int]]]:
    """Prompts and completions of a pair batch's sequences: every chosen, then every rejected."""
    return [p.prompt_ids for p in pairs] * 2, [p.chosen_ids for p in pairs] + [p.rejected_ids for p in pairs]


def pair_columns(pairs: list[TokenizedPair]) -> dict[str, torch.Tensor]:
    return {
        "preference_prob": torch.tensor([p.preference_prob for p in pairs], dtype=torch.float),
        "margin": torch.tensor([p.margin for p in pairs], dtype=torch.float),
        "row": torch.tensor([p.row for p in pairs], dtype=torch.long),
    }


def collate_completions(prompts: list[list[int]], completions: list[list[int]], pad_token_id: int,
                        pad_to_multiple_of: int | None = None) -> dict[str, torch.Tensor]:
    """Row i is prompts[i] + completions[i], right-padded: ``input_ids``, ``attention_mask`` and
    ``completion_mask`` (True exactly on completion tokens)."""
    if pad_token_id is None:
        raise ConfigError("the tokenizer has no pad token; set tokenizer.pad_token (for example to EOS)")
    width = _padded_width(max(len(p) + len(c) for p, c in zip(prompts, completions)), pad_to_multiple_of)
    input_ids = torch.full((len(completions), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(completions), width), dtype=torch.long)
    completion_mask = torch.zeros((len(completions), width), dtype=torch.bool)
    for i, (prompt, completion) in enumerate(zip(prompts, completions)):
        end = len(prompt) + len(completion)
        input_ids[i, :end] = torch.tensor(prompt + completion, dtype=torch.long)
        attention_mask[i, :end] = 1
        completion_mask[i, len(prompt):end] = True
    return {"input_ids": input_ids, "attention_mask": attention_mask, "completion_mask": completion_mask}


def _padded_width(length: int, multiple: int | None) -> int:
    if not multiple:
        return length
    return -(-length // multiple) * multiple


def collate_pairs_fn(pad_token_id: int, pad_to_multiple_of: int | None = None):
    """A picklable ``collate_fn`` for ``torch.utils.data.DataLoader``."""
    return functools.partial(collate_pairs, pad_token_id=pad_token_id, pad_to_multiple_of=pad_to_multiple_of)
