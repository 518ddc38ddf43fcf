"""token_logprobs / sequence_logprobs against the textbook full-logits computation."""

import pytest
import torch
import torch.nn.functional as F

from preftune.logprobs import sequence_logprobs, token_logprobs


def naive_token_logprobs(model, input_ids, attention_mask, completion_mask):
    """Full logits, float64 log_softmax, shift, gather, mask: the recipe the library avoids."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    logits = logits[:, logits.shape[1] - input_ids.shape[1]:]  # prompt tuning prepends virtual tokens
    logp = torch.log_softmax(logits.double(), dim=-1)[:, :-1]
    picked = logp.gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    picked = picked * completion_mask[:, 1:].double()
    return F.pad(picked, (1, 0))


def make_batch(tok, rows=((3, 4), (1, 6), (5, 1), (2, 2))):
    """Right-padded prompt+completion batch; each row has its own prompt and completion length."""
    from toydata import CALM_WORDS, TOPICS

    seqs, prompt_lens = [], []
    for i, (prompt_words, completion_words) in enumerate(rows):
        prompt = tok(f"Describe {TOPICS[i]} " + " ".join(CALM_WORDS[:prompt_words]) + ":").input_ids
        completion = tok(" " + " ".join(CALM_WORDS[i:i + completion_words]), add_special_tokens=False).input_ids
        seqs.append(prompt + completion + [tok.eos_token_id])
        prompt_lens.append(len(prompt))
    length = max(map(len, seqs))
    input_ids = torch.full((len(seqs), length), tok.pad_token_id)
    attention_mask = torch.zeros(len(seqs), length, dtype=torch.long)
    completion_mask = torch.zeros(len(seqs), length, dtype=torch.bool)
    for b, (seq, p) in enumerate(zip(seqs, prompt_lens)):
        input_ids[b, :len(seq)] = torch.tensor(seq)
        attention_mask[b, :len(seq)] = 1
        completion_mask[b, p:len(seq)] = True
    assert len(set(prompt_lens)) > 1 and len({len(s) for s in seqs}) > 1
    return input_ids, attention_mask, completion_mask


def tiny_gpt2(tok):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=4, n_positions=128,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    return GPT2LMHeadModel(config)


def assert_grads_match(model, ours, ref):
    weights = torch.linspace(0.5, 1.5, ours.numel()).reshape(ours.shape)
    params = [p for p in model.parameters() if p.requires_grad]
    g_ours = torch.autograd.grad((ours * weights).sum(), params, allow_unused=True)
    g_ref = torch.autograd.grad((ref * weights.double()).sum(), params, allow_unused=True)
    for p, a, b in zip(params, g_ours, g_ref):
        if b is None:
            assert a is None or a.abs().max() == 0
            continue
        # float32 noise: relative to the gradient's scale, 1e-5
        torch.testing.assert_close(a.double(), b.double(), rtol=1e-5, atol=1e-5 * float(b.abs().max()))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_matches_naive_values_and_gradients(arch, tiny_model, tiny_tokenizer):
    model = tiny_model if arch == "llama" else tiny_gpt2(tiny_tokenizer)
    model.eval()
    ids, am, cm = make_batch(tiny_tokenizer)
    ours = token_logprobs(model, ids, am, cm, chunk_size=7)
    ref = naive_token_logprobs(model, ids, am, cm)
    assert cm[:, 1:].sum() > 2 * 7  # several chunks ran
    assert ours.dtype == torch.float32 and ours.shape == ids.shape
    torch.testing.assert_close(ours.double(), ref, rtol=0, atol=1e-5)
    assert torch.all(ours[~cm] == 0) and torch.all(ours[:, 0] == 0)
    assert torch.all(ours[cm] < 0)
    assert_grads_match(model, ours, ref)

    logps, lengths = sequence_logprobs(model, ids, am, cm, chunk_size=7)
    torch.testing.assert_close(logps.double(), ref.sum(-1), rtol=0, atol=1e-5)
    assert lengths.dtype == torch.float32
    assert lengths.tolist() == cm.sum(-1).float().tolist()


def test_bfloat16_model_gives_float32_close_to_naive(tiny_model, tiny_tokenizer):
    model = tiny_model.to(torch.bfloat16).eval()
    ids, am, cm = make_batch(tiny_tokenizer)
    ours = token_logprobs(model, ids, am, cm, chunk_size=7)
    assert ours.dtype == torch.float32
    ref = naive_token_logprobs(model, ids, am, cm)  # bf16 logits, float64 softmax
    # same bf16 logits up to kernel blocking; a bf16 softmax would be off by ~1e-1
    torch.testing.assert_close(ours.double(), ref, rtol=0, atol=1e-2)
    ours.sum().backward()
    assert model.get_output_embeddings().weight.grad.dtype == torch.bfloat16


def test_works_with_backbone_gradient_checkpointing(tiny_model, tiny_tokenizer):
    ids, am, cm = make_batch(tiny_tokenizer)
    tiny_model.eval()
    ref = naive_token_logprobs(tiny_model, ids, am, cm)
    tiny_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    tiny_model.train()  # HF only checkpoints layers in training mode (no dropout in this model)
    ours = token_logprobs(tiny_model, ids, am, cm, chunk_size=7)
    torch.testing.assert_close(ours.double(), ref, rtol=0, atol=1e-5)
    assert_grads_match(tiny_model, ours, ref)


def test_chunk_size_does_not_change_result(tiny_model, tiny_tokenizer):
    ids, am, cm = make_batch(tiny_tokenizer)
    with torch.no_grad():
        results = [token_logprobs(tiny_model, ids, am, cm, chunk_size=c) for c in (1, 5, 1024)]
    for r in results[1:]:
        torch.testing.assert_close(r, results[0], rtol=0, atol=1e-6)


def test_no_grad_and_inference_mode(tiny_model, tiny_tokenizer):
    ids, am, cm = make_batch(tiny_tokenizer)
    with torch.no_grad():
        a = token_logprobs(tiny_model, ids, am, cm, chunk_size=7)
    with torch.inference_mode():
        b = token_logprobs(tiny_model, ids, am, cm, chunk_size=7)
    assert not a.requires_grad and not b.requires_grad
    torch.testing.assert_close(a, b)


def test_lora_model_matches_naive_and_disable_adapter(tiny_tokenizer):
    from peft import LoraConfig, get_peft_model

    from preftune.toy import build_tiny_llama

    ids, am, cm = make_batch(tiny_tokenizer)
    base = build_tiny_llama(tiny_tokenizer).eval()
    with torch.no_grad():
        base_ref = naive_token_logprobs(base, ids, am, cm)
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False,
                        target_modules=["q_proj", "v_proj", "lm_head"])
    model = get_peft_model(base, config)
    ours = token_logprobs(model, ids, am, cm, chunk_size=7)
    ref = naive_token_logprobs(model, ids, am, cm)
    torch.testing.assert_close(ours.double(), ref, rtol=0, atol=1e-5)
    assert (ref - base_ref).abs().max() > 1e-3  # the adapters (lm_head's included) really act
    assert_grads_match(model, ours, ref)        # only LoRA weights are trainable
    with model.disable_adapter(), torch.no_grad():
        disabled = token_logprobs(model, ids, am, cm, chunk_size=7)
    torch.testing.assert_close(disabled.double(), base_ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind", ["prefix", "prompt"])
def test_prompt_learning_adapters(kind, tiny_tokenizer):
    from peft import PrefixTuningConfig, PromptTuningConfig, get_peft_model

    from preftune.toy import build_tiny_llama

    ids, am, cm = make_batch(tiny_tokenizer)
    config_cls = PrefixTuningConfig if kind == "prefix" else PromptTuningConfig
    model = get_peft_model(build_tiny_llama(tiny_tokenizer).eval(),
                           config_cls(task_type="CAUSAL_LM", num_virtual_tokens=3))
    ours = token_logprobs(model, ids, am, cm, chunk_size=7)
    ref = naive_token_logprobs(model, ids, am, cm)
    torch.testing.assert_close(ours.double(), ref, rtol=0, atol=1e-5)
    assert_grads_match(model, ours, ref)


def test_never_materialises_full_vocabulary_logits(tiny_tokenizer):
    from preftune.toy import build_tiny_llama

    vocab, chunk = 32000, 64
    model = build_tiny_llama(tiny_tokenizer, vocab_size=vocab)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (4, 80), generator=generator)
    am = torch.ones_like(ids)
    am[2, 60:] = 0
    cm = torch.zeros_like(ids, dtype=torch.bool)
    cm[0, 10:80] = cm[1, 50:80] = cm[2, 20:60] = cm[3, 79:] = True
    n_completion = int(cm[:, 1:].sum())
    assert n_completion > 2 * chunk

    rows = []
    handle = model.get_output_embeddings().register_forward_hook(lambda m, args, out: rows.append(args[0].shape[0]))
    saved_shapes = []

    def pack(t):
        saved_shapes.append(tuple(t.shape))
        return t

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            logps, _ = sequence_logprobs(model, ids, am, cm, chunk_size=chunk)
        assert sum(rows) == n_completion and max(rows) <= chunk
        # what the graph keeps for backward: nothing near [N, V] or [B, L, V]
        assert all(torch.Size(s).numel() <= chunk * vocab for s in saved_shapes)
        assert not any(s[-1:] == (vocab,) and len(s) == 3 for s in saved_shapes)
        forward_rows = list(rows)
        logps.sum().backward()
        # backward recomputes the logits one chunk at a time
        assert sum(rows) == 2 * n_completion and max(rows[len(forward_rows):]) <= chunk
        assert model.get_output_embeddings().weight.grad is not None
    finally:
        handle.remove()


def test_softcapping_and_logit_scale(tiny_model, tiny_tokenizer):
    """Config-driven logit post-processing is applied as the model's own forward would."""
    from preftune.logprobs import _chunk_logprobs, _logit_postprocessing

    config = tiny_model.config
    assert _logit_postprocessing(config) == (None, None)
    config.final_logit_softcapping = 3.0
    config.logit_scale = 0.5
    scale, cap = _logit_postprocessing(config)
    assert (scale, cap) == (0.5, 3.0)
    head = tiny_model.get_output_embeddings()
    h = torch.randn(5, config.hidden_size)
    targets = torch.tensor([1, 2, 3, 4, 5])
    logits = (head(h).double() * 0.5 / 3.0).tanh() * 3.0
    expected = torch.log_softmax(logits, -1).gather(-1, targets[:, None]).squeeze(-1)
    torch.testing.assert_close(_chunk_logprobs(head, h, targets, scale, cap).double(), expected,
                               rtol=0, atol=1e-6)


def test_empty_completion_and_bad_inputs(tiny_model, tiny_tokenizer):
    ids, am, cm = make_batch(tiny_tokenizer)
    out = token_logprobs(tiny_model, ids, am, torch.zeros_like(cm), chunk_size=7)
    assert torch.all(out == 0) and out.shape == ids.shape
    out.sum().backward()  # still part of the graph
    with pytest.raises(ValueError):
        token_logprobs(tiny_model, ids, am, cm[:, :-1])
    with pytest.raises(ValueError):
        token_logprobs(tiny_model, ids, am, cm, chunk_size=0)
    with pytest.raises(TypeError):
        token_logprobs(tiny_model.model, ids, am, cm)
