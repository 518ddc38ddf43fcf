"""Padding-free and prefix-shared batches give the padded batch's log-probs and gradients (1e-5)."""

from types import SimpleNamespace

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


def gqa_llama(vocab: int, attention: str = "sdpa", classifier: bool = False):
    """A tiny Llama with grouped-query attention (4 query heads over 2 key/value heads)."""
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         attn_implementation=attention, num_labels=1, pad_token_id=0)
    return (LlamaForSequenceClassification if classifier else LlamaForCausalLM)(config)


def tiny_gpt2(vocab: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=4, n_positions=128, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0, attn_implementation="sdpa")
    return GPT2LMHeadModel(config)


@pytest.mark.parametrize("arch", ["gqa-llama", "gpt2"])
def test_blockwise_sdpa_runs_and_equals_padded(arch, tiny_tokenizer, monkeypatch):
    import preftune.speed.attention as attention

    vocab = len(tiny_tokenizer)
    model = gqa_llama(vocab) if arch == "gqa-llama" else tiny_gpt2(vocab)
    assert attention.use_blockwise_sdpa(model)          # the blockwise_attention setting, applied explicitly
    calls = []
    real = attention.F.scaled_dot_product_attention
    spy = SimpleNamespace(scaled_dot_product_attention=lambda *a, **k: calls.append(k) or real(*a, **k))
    monkeypatch.setattr(attention, "F", spy)
    pairs = toy_pairs(vocab)
    padded = padded_sums(model, pairs, tiny_tokenizer.pad_token_id)
    calls.clear()
    packed = packed_sequence_logprobs(model, collate_blocks(pair_blocks(pairs, True)), chunk_size=5)
    torch.testing.assert_close(packed, padded, rtol=0, atol=1e-5)
    assert_same_grads(grads(model, packed), grads(model, padded))
    # block by block: in each of 2 layers, 4 pair blocks of two calls each, no dense mask anywhere
    assert len(calls) == 16 and all(k["enable_gqa"] == (arch == "gqa-llama") for k in calls)
    assert sum(k.get("is_causal", False) for k in calls) == 8   # prompt + chosen: plain causal
    assert all(type(k.get("attn_mask")).__name__ in ("NoneType", "CausalBias") for k in calls)


def test_lora_and_gradient_checkpointing(tiny_tokenizer):
    from peft import LoraConfig, get_peft_model

    base = gqa_llama(len(tiny_tokenizer))
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False,
                                            target_modules=["q_proj", "v_proj", "lm_head"]))
    model.train()
    pairs = toy_pairs(len(tiny_tokenizer), seed=1)
    padded = padded_sums(model, pairs, tiny_tokenizer.pad_token_id)
    packed = packed_sequence_logprobs(model, collate_blocks(pair_blocks(pairs, True)), chunk_size=3)
    torch.testing.assert_close(packed, padded, rtol=0, atol=1e-5)
    assert_same_grads(grads(model, packed), grads(model, padded))   # LoRA weights only
    with model.disable_adapter(), torch.no_grad():
        base_packed = packed_sequence_logprobs(model, collate_blocks(pair_blocks(pairs, True)))
        base_padded = padded_sums(model, pairs, tiny_tokenizer.pad_token_id)
    torch.testing.assert_close(base_packed, base_padded, rtol=0, atol=1e-5)
    assert (base_packed - packed).abs().max() > 1e-3


@pytest.mark.parametrize("share", [True, False])
def test_reward_model_packed_equals_padded(share, tiny_tokenizer):
    from preftune.config import RewardConfig
    from preftune.modality.text import RewardScorer
    from preftune.recipes.reward import RewardTask

    model = gqa_llama(len(tiny_tokenizer), classifier=True)
    scorer = RewardScorer(model)
    pairs = toy_pairs(len(tiny_tokenizer), seed=2)
    padded_task = RewardTask(RewardConfig(), tiny_tokenizer.pad_token_id)
    packed_task = RewardTask(RewardConfig(prefix_sharing=share), tiny_tokenizer.pad_token_id, model)
    packed_batch = packed_task.collate(pairs)
    assert "completion_lengths" in packed_batch and packed_batch["completion_lengths"].shape[1] == (2 if share else 1)
    padded = torch.cat(padded_task.rewards(scorer, padded_task.collate(pairs)))
    packed = torch.cat(packed_task.rewards(scorer, packed_batch))
    torch.testing.assert_close(packed, padded, rtol=0, atol=1e-5)
    assert_same_grads(grads(model, packed), grads(model, padded))


def test_precomputed_reference_packed_equals_padded(tiny_tokenizer, tmp_path):
    from preftune.modality.text import PairCollator, sequence_key
    from preftune.runtime.reference import ModelReference, PrecomputedReference, precompute_logps

    model = gqa_llama(len(tiny_tokenizer)).eval()
    reference = ModelReference(model, chunk_size=4)
    pairs = toy_pairs(len(tiny_tokenizer), seed=3)
    sequences = [(p.prompt_ids, c) for p in pairs for c in (p.chosen_ids, p.rejected_ids)]
    pad = tiny_tokenizer.pad_token_id
    padded = precompute_logps(reference, sequences, pad, 4, tmp_path / "a.safetensors")
    for layout in (PairCollator(pad, packed=True, share_prefix=True), PairCollator(pad, packed=True)):
        packed = precompute_logps(reference, sequences, pad, 4, tmp_path / f"{layout.share_prefix}.safetensors",
                                  layout=layout)
        torch.testing.assert_close(packed.logps, padded.logps, rtol=0, atol=1e-5)
    # a training batch, packed, finds its sequences in the table
    table = PrecomputedReference(dict(zip((sequence_key(*s) for s in sequences), padded.logps.tolist())))
    batch = PairCollator(pad, packed=True, share_prefix=True)(pairs)
    live = reference.sequence_logps(batch)
    torch.testing.assert_close(table.sequence_logps(batch), live, rtol=0, atol=1e-5)


def test_dpo_loss_and_gradients_equal_in_every_layout(tiny_tokenizer):
    from preftune.config import DPOConfig
    from preftune.modality import TEXT, CompletionLogprobs
    from preftune.recipes.dpo import DPOTask
    from preftune.runtime.reference import ModelReference

    policy = gqa_llama(len(tiny_tokenizer))
    reference = ModelReference(gqa_llama(len(tiny_tokenizer)).eval(), chunk_size=4)
    with torch.no_grad():  # a policy that differs from its reference
        for p in policy.parameters():
            p.add_(0.1 * torch.randn_like(p))
    pairs = toy_pairs(len(tiny_tokenizer), seed=4)
    lm = CompletionLogprobs(policy, TEXT, chunk_size=5)
    results = []
    for share, free in ((False, False), (False, True), (True, True)):
        cfg = DPOConfig(beta=1.0, prefix_sharing=share, padding_free=free)
        task = DPOTask(cfg, tiny_tokenizer.pad_token_id, reference, policy)
        batch = task.collate(pairs)
        assert ("completion_lengths" in batch) == free
        loss, metrics = task.loss(lm, batch)
        results.append((loss, metrics, torch.autograd.grad(loss, list(policy.parameters()))))
    base_loss, base_metrics, base_grads = results[0]
    assert float(base_loss.detach()) != pytest.approx(0.6931, abs=1e-3)   # not the trivial loss at policy == reference
    for loss, metrics, g in results[1:]:
        torch.testing.assert_close(loss, base_loss, rtol=1e-5, atol=1e-5)
        for key in base_metrics:
            torch.testing.assert_close(metrics[key], base_metrics[key], rtol=1e-5, atol=1e-5)
        assert_same_grads(g, base_grads)


@pytest.mark.parametrize("kto_kl", [True, False])
def test_kto_loss_equal_packed_and_padded(kto_kl, tiny_tokenizer):
    from accelerate import Accelerator

    from preftune.config import KTOConfig
    from preftune.modality import TEXT, CompletionLogprobs
    from preftune.recipes.kto import KTOItem, KTOTask
    from preftune.runtime.reference import ModelReference

    policy = gqa_llama(len(tiny_tokenizer))
    reference = ModelReference(gqa_llama(len(tiny_tokenizer)).eval(), chunk_size=4)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.1 * torch.randn_like(p))
    items = [KTOItem(pair, i % 2 == 0) for i, pair in enumerate(toy_pairs(len(tiny_tokenizer), seed=5))]
    lm = CompletionLogprobs(policy, TEXT, chunk_size=5)
    out = []
    for free in (False, True):
        cfg = KTOConfig(kto_kl=kto_kl, padding_free=free, prefix_sharing=free)
        task = KTOTask(cfg, tiny_tokenizer.pad_token_id, reference, Accelerator(cpu=True), policy)
        batch = task.collate(items)
        assert ("completion_lengths" in batch) == free
        loss, metrics = task.loss(lm, batch)
        out.append((loss, metrics["kl"], torch.autograd.grad(loss, list(policy.parameters()))))
    torch.testing.assert_close(out[1][0], out[0][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[1][1], out[0][1], rtol=0, atol=1e-5)
    assert_same_grads(out[1][2], out[0][2])


@pytest.mark.parametrize("packing", [False, True])
def test_sft_padding_free_equals_padded(packing, tiny_tokenizer):
    from preftune.data.packing import LMExample, pack_examples, single_row
    from preftune.modality import TEXT, CompletionLogprobs
    from preftune.recipes.sft import LMTask

    generator = torch.Generator().manual_seed(6)
    examples = []
    for i, n in enumerate((7, 3, 12, 5, 9, 4)):
        ids = torch.randint(3, len(tiny_tokenizer), (n,), generator=generator).tolist()
        examples.append(LMExample(ids, [t >= n // 3 for t in range(n)], i))
    rows = pack_examples(examples, 16) if packing else [single_row(e) for e in examples]
    model = gqa_llama(len(tiny_tokenizer))
    lm = CompletionLogprobs(model, TEXT, chunk_size=5, mask="loss_mask")
    losses = []
    for free in (False, True):
        task = LMTask(tiny_tokenizer.pad_token_id, packing, padding_free=free)
        batch = task.collate(rows)
        assert batch["input_ids"].shape[0] == (1 if free else len(rows))
        loss, _ = task.loss(lm, batch)
        losses.append((loss, torch.autograd.grad(loss, list(model.parameters()))))
    torch.testing.assert_close(losses[1][0], losses[0][0], rtol=1e-5, atol=1e-5)
    assert_same_grads(losses[1][1], losses[0][1])


def test_a_model_whose_attention_ignores_the_layout_stays_padded(tiny_tokenizer):
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from preftune.config import DPOConfig
    from preftune.modality.text import PairCollator
    from preftune.speed import attention

    cfg = DPOConfig()
    for kind in ("sdpa", "eager"):
        model = gqa_llama(len(tiny_tokenizer), attention=kind)
        assert attention.check_block_attention(model)
        assert PairCollator.for_model(cfg, 0, model).share_prefix
    model = gqa_llama(len(tiny_tokenizer))
    attention.use_blockwise_sdpa(model)

    def leaky(module, query, key, value, attention_mask, **kwargs):   # drops the layout: blocks see each other
        kwargs.pop(attention.LAYOUT_KEY, None)
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register(attention.IMPLEMENTATION, leaky)
    try:
        assert not attention.check_block_attention(model)
        assert not PairCollator.for_model(cfg, 0, model).packed
    finally:
        AttentionInterface.register(attention.IMPLEMENTATION, attention.blockwise_sdpa)
