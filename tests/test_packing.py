"""Packing: rows are laid out right, and a packed row's log-probs equal each example's run alone."""

import pytest
import torch

from preftune.data.packing import (
    LMExample,
    block_causal_mask,
    collate_rows,
    pack_examples,
    pack_stream,
    segment_ids,
    single_row,
)
from preftune.errors import ConfigError
from preftune.logprobs import token_logprobs
from preftune.modality import TEXT, TOKENS, CompletionLogprobs, text as text_modality
from preftune.recipes.sft import LMTask, check_packed_attention

pytestmark = pytest.mark.usefixtures("one_thread")


def random_examples(n, seed=0, vocab=400, low=3, high=12):
    g = torch.Generator().manual_seed(seed)
    examples = []
    for i in range(n):
        length = int(torch.randint(low, high, (1,), generator=g))
        ids = torch.randint(3, vocab, (length,), generator=g).tolist()
        prompt = int(torch.randint(1, length - 1, (1,), generator=g))
        examples.append(LMExample(ids, [False] * prompt + [True] * (length - prompt), row=i + 1))
    return examples


def tiny_gpt2(attn):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=400, n_positions=64, n_embd=32, n_layer=2, n_head=4, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2LMHeadModel(config)
    model.set_attn_implementation(attn)
    return model.eval()


@pytest.fixture(params=["llama-sdpa", "llama-eager", "gpt2-sdpa", "gpt2-eager"])
def model(request, tiny_tokenizer):
    from preftune.toy import build_tiny_llama

    family, attn = request.param.split("-")
    if family == "gpt2":
        return tiny_gpt2(attn)
    llama = build_tiny_llama(tiny_tokenizer)
    llama.set_attn_implementation(attn)
    return llama.eval()


def test_best_fit_packing_keeps_every_example_whole_and_restarts_positions():
    examples = random_examples(40)
    rows = pack_examples(examples, max_length=24)
    assert all(len(r.input_ids) <= 24 for r in rows)
    assert len(rows) < len(examples) / 2  # several examples per row
    pieces = []
    for row in rows:
        starts = [i for i, p in enumerate(row.position_ids) if p == 0] + [len(row.input_ids)]
        for a, b in zip(starts, starts[1:]):
            assert row.position_ids[a:b] == list(range(b - a))
            assert row.loss_mask[a] is False  # never predicted from the example before
            pieces.append((row.input_ids[a:b], row.loss_mask[a + 1:b]))
    expected = sorted((e.input_ids, e.loss_mask[1:]) for e in examples)
    assert sorted(pieces) == expected
    assert pack_examples(examples, 24) == rows  # deterministic
    with pytest.raises(ValueError, match="more than max_length"):
        pack_examples(examples, 5)


def test_stream_packing_cuts_documents_into_full_rows():
    docs = [[1, 10, 11, 12, 2], [1, 20, 21, 2], [1, 30, 31, 32, 33, 34, 35, 2]]
    rows = pack_stream(docs, max_length=6)
    assert [len(r.input_ids) for r in rows] == [6, 6, 5]
    assert sum((r.input_ids for r in rows), []) == sum(docs, [])
    assert rows[0].position_ids == [0, 1, 2, 3, 4, 0]
    assert rows[0].loss_mask == [False, True, True, True, True, False]
    assert rows[1].position_ids == [0, 1, 2, 0, 1, 2]  # doc 2 continues at position 0 of the new row
    assert rows[1].loss_mask == [False, True, True, False, True, True]
    assert rows[2].position_ids == [0, 1, 2, 3, 4]


def test_block_causal_mask_and_padding():
    rows = [single_row(LMExample([5, 6, 7], [False, True, True]))] + pack_examples(
        [LMExample([5, 6], [True, True]), LMExample([7, 8, 9], [False, True, True])], 8)
    batch = collate_rows(rows, pad_token_id=0)
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 0, 1]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert batch["loss_mask"].tolist() == [[False, True, True, False, False], [False, True, True, False, True]]
    assert segment_ids(batch["position_ids"]).tolist() == [[1, 1, 1, 2, 2], [1, 1, 1, 2, 2]]
    mask = block_causal_mask(batch["position_ids"])[1, 0].int().tolist()
    assert mask == [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [0, 0, 0, 1, 0], [0, 0, 0, 1, 1]]
    additive = block_causal_mask(batch["position_ids"], dtype=torch.float32)[1, 0]
    assert additive[4, 3] == 0 and additive[4, 0] == torch.finfo(torch.float32).min


def test_packed_logprobs_equal_each_example_alone(model):
    examples = random_examples(12, seed=1)
    lm = CompletionLogprobs(model, TEXT, chunk_size=7, mask="loss_mask")
    packed_task, plain_task = LMTask(0, packed=True), LMTask(0, packed=False)
    rows = pack_examples(examples, 30)
    batch = packed_task.collate(rows)
    with torch.no_grad():
        packed = lm(batch, TOKENS).values
        alone = {}
        for e in examples:
            b = plain_task.collate([single_row(e)])
            alone[tuple(e.input_ids)] = lm(b, TOKENS).values[0]
    checked = 0
    for r, row in enumerate(rows):
        starts = [i for i, p in enumerate(row.position_ids) if p == 0] + [len(row.input_ids)]
        for a, b in zip(starts, starts[1:]):
            reference = alone[tuple(row.input_ids[a:b])]
            torch.testing.assert_close(packed[r, a:b], reference, atol=1e-5, rtol=0)
            checked += 1
    assert checked == len(examples)
    # and the loss of the packed batch is the mean over the same tokens
    with torch.no_grad():
        loss = packed_task.loss(lm, batch)[0]
    every = torch.cat([alone[tuple(e.input_ids)][1:][torch.tensor(e.loss_mask[1:])] for e in examples])
    assert float(loss) == pytest.approx(float(-every.mean()), abs=1e-5)


def test_changing_one_example_leaves_its_neighbours_unchanged(model):
    first, second = LMExample([5, 9, 33, 71, 8], [True] * 5), LMExample([17, 4, 99, 23, 61, 7], [True] * 6)
    changed = LMExample([88, 12, 45, 3, 200], [True] * 5)
    lm, task = CompletionLogprobs(model, TEXT, mask="loss_mask"), LMTask(0, packed=True)
    with torch.no_grad():
        outs = []
        for a in (first, changed):
            row = pack_stream([a.input_ids, second.input_ids], max_length=11)
            b = task.collate(row)
            outs.append(lm(b, TOKENS).values[0])
    assert outs[0][5] == 0 and outs[1][5] == 0  # the boundary token is not scored
    torch.testing.assert_close(outs[0][5:], outs[1][5:], atol=1e-6, rtol=0)
    assert not torch.allclose(outs[0][:5], outs[1][:5])


def test_position_ids_alone_give_the_same_packed_result(tiny_model):
    """What flash / flex attention rely on: transformers derives the packed mask from position_ids."""
    lm, task = CompletionLogprobs(tiny_model.eval(), TEXT, mask="loss_mask"), LMTask(0, packed=True)
    rows = pack_examples(random_examples(8, seed=2), 30)
    batch = task.collate(rows)
    args = (batch["input_ids"], batch["loss_mask"])
    with torch.no_grad():
        explicit = lm(batch, TOKENS).values
        derived = token_logprobs(tiny_model, args[0], None, args[1], position_ids=batch["position_ids"])
        leaky = token_logprobs(tiny_model, args[0], batch["attention_mask"], args[1],
                               position_ids=batch["position_ids"])
    torch.testing.assert_close(derived, explicit, atol=1e-5, rtol=0)
    assert (leaky - explicit).abs().max() > 1e-3  # a plain 2D mask lets packed examples see each other


def test_a_model_that_ignores_the_packed_mask_is_refused(tiny_model, monkeypatch):
    check_packed_attention(CompletionLogprobs(tiny_model, TEXT, mask="loss_mask"))  # honours it: no error
    monkeypatch.setattr(text_modality, "packed_lm_inputs",
                        lambda model, attention_mask, position_ids: {"attention_mask": torch.ones_like(position_ids),
                                                                     "position_ids": position_ids})
    with pytest.raises(ConfigError, match="packing is not supported"):
        check_packed_attention(CompletionLogprobs(tiny_model, TEXT, mask="loss_mask"))
