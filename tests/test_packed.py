"""Padding-free and prefix-shared batches give the padded batch's log-probs and gradients (1e-5)."""

import pytest
import torch

from preftune.data.collate import collate_pairs
from preftune.data.packed import PackedLayout, block_mask, collate_blocks, packed_mask, scored_positions
from preftune.data.preference import TokenizedPair
from preftune.logprobs import packed_sequence_logprobs, sequence_logprobs


def toy_pairs(vocab: int, seed: int = 0) -> list[TokenizedPair]:
    """Pairs with different prompt, chosen and rejected lengths (one prompt empty of all but one token)."""
    generator = torch.Generator().manual_seed(seed)

    def ids(n):
        return torch.randint(3, vocab, (n,), generator=generator).tolist()

    shapes = [(5, 4, 7), (1, 6, 2), (9, 3, 3), (3, 8, 5)]
    return [TokenizedPair(ids(p), ids(c), ids(r), 1.0, 0.0, i) for i, (p, c, r) in enumerate(shapes)]


def pair_blocks(pairs, share):
    if share:
        return [(p.prompt_ids, [p.chosen_ids, p.rejected_ids]) for p in pairs]
    return [(p.prompt_ids, [p.chosen_ids]) for p in pairs] + [(p.prompt_ids, [p.rejected_ids]) for p in pairs]


def padded_sums(model, pairs, pad):
    batch = collate_pairs(pairs, pad)
    return sequence_logprobs(model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"],
                             chunk_size=5)[0]


def grads(model, values):
    weights = torch.linspace(0.5, 1.5, values.numel())
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.autograd.grad((values * weights).sum(), params)


def assert_same_grads(a, b):
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5 * float(y.abs().max()))


def test_layout_positions_and_masks():
    batch = collate_blocks([([1, 2], [[3, 4, 5], [6]]), ([7], [[8], [9, 10]])])
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 2, 0, 1, 1, 2]]
    layout = PackedLayout.of(batch)
    assert layout.spans() == [(0, 6), (6, 10)]
    targets, predictors, sequences = scored_positions(layout)
    # sequences: 0 = block 0 first completion, 1 = block 1 first, 2 = block 0 second, 3 = block 1 second
    assert targets.tolist() == [2, 3, 4, 5, 7, 8, 9]
    assert predictors.tolist() == [1, 2, 3, 1, 6, 6, 8]
    assert sequences.tolist() == [0, 0, 0, 2, 1, 3, 3]
    assert layout.last_positions().tolist() == [4, 7, 5, 9]
    mask = block_mask(2, [3, 1])
    assert mask[5].tolist() == [True, True, False, False, False, True]   # the rejected token: prompt and itself
    assert mask[4].tolist() == [True, True, True, True, True, False]
    full = packed_mask(layout)[0, 0]
    assert full.shape == (10, 10) and not full[6:, :6].any() and full[9].tolist()[6:] == [True, False, True, True]


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("share", [True, False])
def test_packed_pairs_equal_padded(attention, share, tiny_tokenizer):
    from preftune.toy import build_tiny_llama

    model = build_tiny_llama(tiny_tokenizer)
    model.config._attn_implementation = attention
    pairs = toy_pairs(len(tiny_tokenizer))
    padded = padded_sums(model, pairs, tiny_tokenizer.pad_token_id)
    packed = packed_sequence_logprobs(model, collate_blocks(pair_blocks(pairs, share)), chunk_size=5)
    torch.testing.assert_close(packed, padded, rtol=0, atol=1e-5)
    assert_same_grads(grads(model, packed), grads(model, padded))
