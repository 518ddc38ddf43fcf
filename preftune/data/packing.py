"""Language-modelling rows: packing several examples into one row, batching, and the packed attention mask.

An :class:`LMExample` is one training sequence and the tokens it is trained on. Packing puts several
examples side by side in a row of at most ``max_length`` tokens; each keeps its own position ids
(restarting at 0) and sees only itself: the attention mask is block-diagonal causal and no label
crosses a boundary (the first token of an example is never predicted from the one before it).
So the loss of a packed row equals, token for token, the loss of its examples run one by one.

Rows are described by ``position_ids`` alone: an example starts wherever the position is 0.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import torch

from preftune.errors import ConfigError


@dataclass
class LMExample:
    """One sequence; ``loss_mask[t]`` is True where token ``t`` is trained (predicted from tokens ``< t``)."""

    input_ids: list[int]
    loss_mask: list[bool]
    row: int = 0


@dataclass
class LMRow:
    """What the model sees as one batch row: one example, or several packed, with their position ids."""

    input_ids: list[int]
    loss_mask: list[bool]
    position_ids: list[int]


def single_row(example: LMExample) -> LMRow:
    """An example alone in its row (no packing)."""
    mask = list(example.loss_mask)
    mask[0] = False  # nothing precedes the first token
    return LMRow(list(example.input_ids), mask, list(range(len(example.input_ids))))


def _append(row: LMRow, ids: list[int], mask: list[bool]) -> None:
    row.input_ids.extend(ids)
    row.loss_mask.extend([False] + list(mask[1:]))  # never predict across the boundary
    row.position_ids.extend(range(len(ids)))


def pack_examples(examples: list[LMExample], max_length: int) -> list[LMRow]:
    """Best-fit-decreasing packing of whole examples into rows of at most ``max_length`` tokens.

    Deterministic: longest examples first (ties by input order), each into the fullest row it fits.
    """
    for example in examples:
        if len(example.input_ids) > max_length:
            raise ValueError(f"example from row {example.row} has {len(example.input_ids)} tokens, "
                             f"more than max_length={max_length}; truncate before packing")
    order = sorted(range(len(examples)), key=lambda i: (-len(examples[i].input_ids), i))
    rows: list[LMRow] = []
    rooms: list[tuple[int, int]] = []  # (free tokens, row index), sorted: the best fit is the first that fits
    for i in order:
        example = examples[i]
        size = len(example.input_ids)
        at = bisect.bisect_left(rooms, (size, -1))
        if at < len(rooms):
            room, r = rooms.pop(at)
        else:
            room, r = max_length, len(rows)
            rows.append(LMRow([], [], []))
        _append(rows[r], example.input_ids, example.loss_mask)
        if room - size > 0:
            bisect.insort(rooms, (room - size, r))
    return rows


def join_rows(rows: list[LMRow]) -> LMRow:
    """Rows side by side in one row (a padding-free batch): each keeps its position ids, so its examples stay apart."""
    return LMRow([t for r in rows for t in r.input_ids], [m for r in rows for m in r.loss_mask],
                 [p for r in rows for p in r.position_ids])


def pack_stream(documents: list[list[int]], max_length: int) -> list[LMRow]:
    """Pretraining packing: documents concatenated in order and cut into rows of ``max_length`` tokens.

    A document cut by a row boundary continues at position 0 of the next row. Every token but the
    first of each piece is trained; the last row may be shorter (rows under 2 tokens are dropped).
    """
    if max_length < 2:
        raise ConfigError(f"max_length must be at least 2, got {max_length}")
    rows: list[LMRow] = []
    row = LMRow([], [], [])
    for ids in documents:
        start = 0
        while start < len(ids):
            room = max_length - len(row.input_ids)
            piece = ids[start:start + room]
            _append(row, piece, [True] * len(piece))
            start += len(piece)
            if len(row.input_ids) == max_length:
                rows.append(row)
                row = LMRow([], [], [])
    if len(row.input_ids) >= 2:
        rows.append(row)
    return rows


def collate_rows(rows: list[LMRow], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` (1 on real tokens), ``loss_mask`` and ``position_ids``.

    Padding gets positions 0, 1, ... of its own, so it forms a block of its own in a packed mask.
    """
    if not rows:
        raise ValueError("collate_rows needs at least one row")
    if pad_token_id is None:
        raise ConfigError("the tokenizer has no pad token; set tokenizer.pad_token (for example to EOS)")
    width = max(len(r.input_ids) for r in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    loss_mask = torch.zeros((len(rows), width), dtype=torch.bool)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        n = len(row.input_ids)
        input_ids[i, :n] = torch.tensor(row.input_ids, dtype=torch.long)
        attention_mask[i, :n] = 1
        loss_mask[i, :n] = torch.tensor(row.loss_mask, dtype=torch.bool)
        position_ids[i, :n] = torch.tensor(row.position_ids, dtype=torch.long)
        position_ids[i, n:] = torch.arange(width - n)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "loss_mask": loss_mask,
            "position_ids": position_ids}


def segment_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """``[B, L]``: which example (0, 1, ...) of its row each token belongs to."""
    return (position_ids == 0).long().cumsum(-1)


def block_causal_mask(position_ids: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``[B, 1, L, L]`` mask letting each token attend to earlier tokens of its own example only.

    Boolean (True = attend) when ``dtype`` is None, as SDPA takes it; otherwise additive in ``dtype``
    (0 = attend, the dtype's minimum = blocked), as eager attention adds it to the scores.
    """
    segments = segment_ids(position_ids)
    length = position_ids.shape[-1]
    causal = torch.ones(length, length, dtype=torch.bool, device=position_ids.device).tril()
    allowed = (segments[:, :, None] == segments[:, None, :]) & causal
    allowed = allowed[:, None]
    if dtype is None:
        return allowed
    blocked = torch.zeros(allowed.shape, dtype=dtype, device=position_ids.device)
    return blocked.masked_fill(~allowed, torch.finfo(dtype).min)
