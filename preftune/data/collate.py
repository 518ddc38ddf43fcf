"""Batching preference pairs: chosen and rejected sequences stacked into one right-padded batch."""

from __future__ import annotations

import functools

import torch

from preftune.data.preference import TokenizedPair
from preftune.errors import ConfigError


def collate_pairs(pairs: list[TokenizedPair], pad_token_id: int,
                  pad_to_multiple_of: int | None = None) -> dict[str, torch.Tensor]:
    """Rows 0..B-1 are prompt+chosen, rows B..2B-1 prompt+rejected, right-padded.

    ``completion_mask`` is True exactly on response tokens (EOS included), False on prompt and padding.
    """
    if not pairs:
        raise ValueError("collate_pairs needs at least one pair")
    if pad_token_id is None:
        raise ConfigError("the tokenizer has no pad token; set tokenizer.pad_token (for example to EOS)")
    responses = [p.chosen_ids for p in pairs] + [p.rejected_ids for p in pairs]
    prompts = [p.prompt_ids for p in pairs] * 2
    width = _padded_width(max(len(p) + len(r) for p, r in zip(prompts, responses)), pad_to_multiple_of)
    input_ids = torch.full((len(responses), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(responses), width), dtype=torch.long)
    completion_mask = torch.zeros((len(responses), width), dtype=torch.bool)
    for i, (prompt, response) in enumerate(zip(prompts, responses)):
        end = len(prompt) + len(response)
        input_ids[i, :end] = torch.tensor(prompt + response, dtype=torch.long)
        attention_mask[i, :end] = 1
        completion_mask[i, len(prompt):end] = True
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "completion_mask": completion_mask,
        "preference_prob": torch.tensor([p.preference_prob for p in pairs], dtype=torch.float),
        "margin": torch.tensor([p.margin for p in pairs], dtype=torch.float),
        "row": torch.tensor([p.row for p in pairs], dtype=torch.long),
    }


def _padded_width(length: int, multiple: int | None) -> int:
    if not multiple:
        return length
    return -(-length // multiple) * multiple


def collate_pairs_fn(pad_token_id: int, pad_to_multiple_of: int | None = None):
    """A picklable ``collate_fn`` for ``torch.utils.data.DataLoader``."""
    return functools.partial(collate_pairs, pad_token_id=pad_token_id, pad_to_multiple_of=pad_to_multiple_of)
