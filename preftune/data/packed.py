"""Padding-free and prefix-shared batches: sequences concatenated into one row, no padding.

A packed batch is one row of *blocks*. A block is a prompt followed by one or more completions of
it; every block of a batch has the same number ``k`` of completions::

    prefix-shared pair:   prompt | chosen | rejected            (k = 2: the prompt is encoded once)
    padding-free:         prompt | completion                   (k = 1: one block per sequence)

Position ids restart at 0 for every block, and every completion of a block continues from the end of
its prompt (chosen and rejected both start at position ``len(prompt)``). Attention stays inside a
block, and inside a block each completion sees the prompt and its own earlier tokens only; so every
completion token gets exactly the log-probability it gets in an ordinary padded row of
``prompt + completion``. (The first token of the second completion is predicted by the prompt's
last hidden state, which is not its neighbour in the row: :func:`scored_positions` says which.)

The batch holds ``input_ids``, ``position_ids`` and ``attention_mask`` (all ones; ``[1, T]``) and the
layout itself: ``prompt_lengths`` ``[blocks]`` and ``completion_lengths`` ``[blocks, k]``. Sequences
are numbered completion-major, as the rows of a padded batch are: all first completions (DPO's
chosen) in block order, then all second completions (rejected), and so on.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

Block = tuple[list[int], list[list[int]]]   # (prompt ids, [completion ids, ...])


def is_packed(batch: dict) -> bool:
    return "completion_lengths" in batch


def collate_blocks(blocks: list[Block]) -> dict[str, torch.Tensor]:
    """One packed row holding ``blocks`` side by side (see the module docstring)."""
    if not blocks:
        raise ValueError("collate_blocks needs at least one block")
    k = len(blocks[0][1])
    if k == 0 or any(len(completions) != k for _, completions in blocks):
        raise ValueError("every block of a packed batch needs the same (positive) number of completions")
    ids: list[int] = []
    positions: list[int] = []
    for prompt, completions in blocks:
        ids += prompt
        positions += range(len(prompt))
        for completion in completions:
            ids += completion
            positions += range(len(prompt), len(prompt) + len(completion))
    return {
        "input_ids": torch.tensor([ids], dtype=torch.long),
        "position_ids": torch.tensor([positions], dtype=torch.long),
        "attention_mask": torch.ones(1, len(ids), dtype=torch.long),
        "prompt_lengths": torch.tensor([len(prompt) for prompt, _ in blocks], dtype=torch.long),
        "completion_lengths": torch.tensor([[len(c) for c in completions] for _, completions in blocks],
                                           dtype=torch.long),
    }


def blocks_of_sequences(prompts: list[list[int]], completions: list[list[int]], share_prefix: bool) -> list[Block]:
    """Blocks for sequences given in completion-major order (``prompts[i] + completions[i]``).

    With ``share_prefix`` and an even count whose halves share their prompts pairwise (``prompts[i] ==
    prompts[i + n/2]``, as DPO pairs and KTO's mismatched completions are laid out), each pair of
    sequences becomes one block of two completions; otherwise every sequence is a block of its own.
    """
    half = len(prompts) // 2
    if share_prefix and len(prompts) % 2 == 0 and half and prompts[:half] == prompts[half:]:
        return [(prompts[i], [completions[i], completions[half + i]]) for i in range(half)]
    return [(p, [c]) for p, c in zip(prompts, completions)]


def adjacent_blocks(prompts: list[list[int]], completions: list[list[int]], share_prefix: bool) -> list[Block]:
    """Blocks for sequences in any order: with ``share_prefix``, when sequences ``2i`` and ``2i + 1`` share
    their prompt for every i, each such two is one block (else one block per sequence).

    The packed batch numbers its sequences completion-major; ``values.view(k, -1).t().reshape(-1)``
    (``k`` completions per block) puts them back in the given order."""
    n = len(prompts)
    if share_prefix and n % 2 == 0 and n and all(prompts[i] == prompts[i + 1] for i in range(0, n, 2)):
        return [(prompts[i], [completions[i], completions[i + 1]]) for i in range(0, n, 2)]
    return [(p, [c]) for p, c in zip(prompts, completions)]


def packed_sequences(batch: dict) -> list[tuple[list[int], list[int]]]:
    """``(prompt ids, completion ids)`` of every sequence of a packed batch, in sequence order."""
    ids = batch["input_ids"][0].tolist()
    found = {seq: (ids[start:start + prompt], ids[offset:offset + length])
             for seq, start, prompt, offset, length in PackedLayout.of(batch).completions()}
    return [found[s] for s in range(len(found))]


@dataclass
class PackedLayout:
    """Where every block and completion of a packed row lies (host-side integers)."""

    prompt_lengths: list[int]
    completion_lengths: list[list[int]]

    @classmethod
    def of(cls, batch: dict) -> PackedLayout:
        return cls(batch["prompt_lengths"].tolist(), batch["completion_lengths"].tolist())

    @property
    def blocks(self) -> int:
        return len(self.prompt_lengths)

    def spans(self) -> list[tuple[int, int]]:
        """``(start, end)`` of every block in the row."""
        out, start = [], 0
        for prompt, completions in zip(self.prompt_lengths, self.completion_lengths):
            end = start + prompt + sum(completions)
            out.append((start, end))
            start = end
        return out

    def completions(self):
        """``(sequence, block start, prompt length, completion start, completion length)`` for every completion."""
        for b, ((start, _), prompt) in enumerate(zip(self.spans(), self.prompt_lengths)):
            offset = start + prompt
            for j, length in enumerate(self.completion_lengths[b]):
                yield j * self.blocks + b, start, prompt, offset, length
                offset += length

    def last_positions(self) -> torch.Tensor:
        """``[S]`` row index of each sequence's last token (sequence order)."""
        last = {seq: offset + length - 1 for seq, _, _, offset, length in self.completions()}
        return torch.tensor([last[s] for s in range(len(last))], dtype=torch.long)

    def lengths(self) -> torch.Tensor:
        """``[S]`` float completion lengths (sequence order)."""
        return torch.tensor(self.completion_lengths, dtype=torch.float32).t().reshape(-1)


def scored_positions(layout: PackedLayout) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(targets, predictors, sequences)``, each ``[N]``: the row index of every scored completion token,
    of the hidden state that predicts it, and the sequence it belongs to.

    A completion's first token is predicted by the prompt's last token; with an empty prompt it is
    not scored (as position 0 of a padded row is not).
    """
    targets, predictors, sequences = [], [], []
    for seq, start, prompt, offset, length in layout.completions():
        first = 0 if prompt > 0 else 1
        if length <= first:
            continue
        positions = torch.arange(offset + first, offset + length)
        before = positions - 1
        if first == 0:
            before[0] = start + prompt - 1  # the prompt's last token
        targets.append(positions)
        predictors.append(before)
        sequences.append(torch.full((length - first,), seq, dtype=torch.long))
    if not targets:
        empty = torch.zeros(0, dtype=torch.long)
        return empty, empty, empty
    return torch.cat(targets), torch.cat(predictors), torch.cat(sequences)


def block_mask(prompt: int, completions: list[int], device=None) -> torch.Tensor:
    """``[n, n]`` bool (True = attend) for one block: causal, and completions do not see each other."""
    branch = torch.zeros(prompt + sum(completions), dtype=torch.long, device=device)
    offset = prompt
    for j, length in enumerate(completions):
        branch[offset:offset + length] = j + 1
        offset += length
    n = branch.shape[0]
    causal = torch.ones(n, n, dtype=torch.bool, device=device).tril()
    return causal & ((branch[None, :] == 0) | (branch[None, :] == branch[:, None]))


def packed_mask(layout: PackedLayout, device=None) -> torch.Tensor:
    """``[1, 1, T, T]`` bool mask of a whole packed row: :func:`block_mask` on the diagonal, False elsewhere."""
    blocks = [block_mask(p, c, device) for p, c in zip(layout.prompt_lengths, layout.completion_lengths)]
    return torch.block_diag(*blocks)[None, None]
