"""preftune.speed.head: the hand-written projection + log-softmax of a plain linear head, against the plain
``[N, vocab]`` computation (values and gradients), gradcheck in float64, the frozen-head path, and the
model-level paths (tied embeddings, temperature, logit scale, LoRA) against the module-called path."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from preftune.logprobs import projected_logprobs, token_logprobs, token_logprobs_and_entropy
from preftune.speed.head import _LinearHeadLogprobs, linear_head_logprobs, plain_linear
from test_logprobs import make_batch, naive_token_logprobs, tiny_gpt2


def plain(hidden, weight, bias, targets, multiplier):
    """The textbook computation: all ``[N, vocab]`` logits at once, log_softmax, gather; and the entropy."""
    logits = torch.nn.functional.linear(hidden, weight, bias) * multiplier
    logp = torch.log_softmax(logits, -1)
    return logp.gather(-1, targets[:, None]).squeeze(-1), -(logp.exp() * logp).sum(-1)


def head_inputs(n=23, hidden=16, vocab=50, bias=True, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, hidden, generator=g, dtype=dtype)
    w = torch.randn(vocab, hidden, generator=g, dtype=dtype) * 0.5
    b = torch.randn(vocab, generator=g, dtype=dtype) if bias else None
    t = torch.randint(0, vocab, (n,), generator=g)
    return h, w, b, t


def weighted_grads(outputs, inputs, seed=1):
    """Gradients of a sum of the outputs with distinct per-row weights (so row mix-ups show)."""
    g = torch.Generator().manual_seed(seed)
    total = sum((o * torch.rand(o.shape, generator=g, dtype=o.dtype)).sum() for o in outputs)
    return torch.autograd.grad(total, inputs)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("multiplier", [1.0, 0.37])
@pytest.mark.parametrize("with_entropy", [False, True])
def test_equals_plain_log_softmax_values_and_gradients(bias, multiplier, with_entropy):
    h, w, b, t = head_inputs(bias=bias)
    head = torch.nn.Linear(16, 50, bias=bias)
    with torch.no_grad():
        head.weight.copy_(w)
        if bias:
            head.bias.copy_(b)
    h.requires_grad_(True)
    logp, entropy = linear_head_logprobs(head, h, t, 7, multiplier, with_entropy)  # 23 rows: chunks 7, 7, 7, 2
    ref_logp, ref_entropy = plain(h, head.weight, head.bias, t, multiplier)
    torch.testing.assert_close(logp, ref_logp, rtol=0, atol=1e-5)
    outs, refs = ([logp, entropy], [ref_logp, ref_entropy]) if with_entropy else ([logp], [ref_logp])
    if with_entropy:
        torch.testing.assert_close(entropy, ref_entropy, rtol=0, atol=1e-5)
    params = [h, *head.parameters()]
    for ours, ref in zip(weighted_grads(outs, params), weighted_grads(refs, params)):
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))


@pytest.mark.parametrize("case", ["trainable", "no bias", "frozen", "frozen, entropy", "trainable, entropy"])
def test_gradcheck_in_float64(case):
    h, w, b, t = head_inputs(n=9, hidden=5, vocab=11, bias=case != "no bias", dtype=torch.float64)
    h.requires_grad_(True)
    if "frozen" not in case:
        w.requires_grad_(True)
        if b is not None:
            b.requires_grad_(True)
    with_entropy = "entropy" in case
    inputs = [x for x in (h, w, b) if x is not None and x.requires_grad]

    def fn(*args):
        it = iter(args)
        hh, ww = next(it), (next(it) if w.requires_grad else w)
        bb = next(it) if b is not None and b.requires_grad else b
        return _LinearHeadLogprobs.apply(hh, ww, bb, t, 4, 0.8, with_entropy)

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7)


class CountProducts(TorchDispatchMode):
    """Counts the matrix products that run (and the largest tensor any op returns)."""

    def __init__(self):
        super().__init__()
        self.products, self.largest = 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.addmm_):
            self.products += 1
        for o in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(o, torch.Tensor):
                self.largest = max(self.largest, o.numel())
        return out


@pytest.mark.parametrize("frozen", [False, True])
def test_backward_projects_once_per_chunk_or_not_at_all_when_frozen(frozen):
    h, w, b, t = head_inputs(n=23, vocab=300, bias=False)
    h.requires_grad_(True)
    w.requires_grad_(not frozen)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(x.shape) or x, lambda x: x):
        logp = _LinearHeadLogprobs.apply(h, w, None, t, 7, 1.0, False)
    # kept for the backward: the inputs and [N] / [N, hidden] results, never a [rows, vocab] block
    assert all(s in (h.shape, w.shape, t.shape) or torch.Size(s).numel() <= h.numel() for s in saved)
    counter = CountProducts()
    with counter:
        grads = torch.autograd.grad(logp.sum(), [h] if frozen else [h, w])
    # 4 chunks: trainable = recompute + d/dh + d/dW per chunk; frozen = none (d/dh was computed forward)
    assert counter.products == (0 if frozen else 3 * 4)
    assert counter.largest <= max(7 * 300, w.numel())
    ref = torch.autograd.grad(plain(h, w, None, t, 1.0)[0].sum(), [h] if frozen else [h, w])
    for ours, expected in zip(grads, ref):
        torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)


def test_no_rows_and_no_grad():
    head = torch.nn.Linear(16, 50)
    h, _, _, t = head_inputs()
    with torch.no_grad():
        logp, entropy = linear_head_logprobs(head, h, t, 7, 1.0, True)
    assert not logp.requires_grad
    torch.testing.assert_close(logp, plain(h, head.weight, head.bias, t, 1.0)[0].detach(), rtol=0, atol=1e-5)

    for frozen in (False, True):   # no rows straight into the function: nothing to add to any gradient
        head.weight.requires_grad_(not frozen)
        rows = torch.zeros(0, 16, requires_grad=True)
        logp, _ = linear_head_logprobs(head, rows, t[:0], 7, 1.0, False)
        assert logp.shape == (0,)
        logp.sum().backward()
        assert rows.grad.shape == (0, 16) and head.weight.grad is None
    head.weight.requires_grad_(True)

    class Model(torch.nn.Module):   # the smallest thing projected_logprobs accepts
        base_model_prefix = "body"

        def __init__(self):
            super().__init__()
            self.body, self.head = torch.nn.Identity(), head
            self.config = type("Config", (), {})()

        def get_output_embeddings(self):
            return self.head

    empty = torch.zeros(0, 16, requires_grad=True)
    values, ent = projected_logprobs(Model(), empty, torch.zeros(0, dtype=torch.long), 7, with_entropy=True)
    assert values.shape == ent.shape == (0,) and values.requires_grad
    values.sum().backward()
    assert empty.grad.shape == (0, 16)


def module_path(model):
    """Force the module-called (checkpointed) path: a forward hook on the head rules the fused path out."""
    head = model.get_output_embeddings()
    assert plain_linear(head) is head
    handle = head.register_forward_hook(lambda *args: None)
    assert plain_linear(head) is None
    return handle


def both_paths(model, fn, params):
    """``fn(model)`` and its gradients on ``params`` through the fused path and through the module path."""
    results = []
    for fused in (True, False):
        handle = None if fused else module_path(model)
        try:
            outs = fn(model)
            results.append((outs, weighted_grads(outs, params)))
        finally:
            if handle is not None:
                handle.remove()
    return results


def assert_same(results, atol=1e-5):
    (outs, grads), (ref_outs, ref_grads) = results
    for a, b in zip(outs, ref_outs):
        torch.testing.assert_close(a, b, rtol=0, atol=atol)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=atol * float(b.abs().max()))


@pytest.mark.parametrize("arch", ["gpt2 tied", "llama tied", "llama frozen tied embedding"])
def test_tied_embeddings_equal_naive_and_module_path(arch, tiny_tokenizer):
    from preftune.toy import build_tiny_llama

    if arch == "gpt2 tied":
        model = tiny_gpt2(tiny_tokenizer)
    else:
        model = build_tiny_llama(tiny_tokenizer)
        model.config.tie_word_embeddings = True
        model.tie_weights()
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    if "frozen" in arch:
        model.get_input_embeddings().weight.requires_grad_(False)
    model.eval()
    ids, am, cm = make_batch(tiny_tokenizer)
    params = [p for p in model.parameters() if p.requires_grad]
    results = both_paths(model, lambda m: [token_logprobs(m, ids, am, cm, chunk_size=5)], params)
    assert_same(results)
    ref = naive_token_logprobs(model, ids, am, cm)
    torch.testing.assert_close(results[0][0][0].double(), ref, rtol=0, atol=1e-5)


def test_temperature_logit_scale_and_entropy_equal_module_path(tiny_model, tiny_tokenizer):
    tiny_model.config.logit_scale = 1.7
    tiny_model.eval()
    ids, am, cm = make_batch(tiny_tokenizer)
    params = list(tiny_model.parameters())
    results = both_paths(tiny_model, lambda m: list(token_logprobs_and_entropy(m, ids, am, cm, chunk_size=6,
                                                                               temperature=0.6)), params)
    assert_same(results)
    logits = tiny_model(input_ids=ids, attention_mask=am).logits.double()[:, :-1] * 1.7 / 0.6
    logp = torch.log_softmax(logits, -1)
    expected = logp.gather(-1, ids[:, 1:, None]).squeeze(-1) * cm[:, 1:]
    torch.testing.assert_close(results[0][0][0][:, 1:].double(), expected, rtol=0, atol=1e-5)


def test_lora_model_with_frozen_head_equals_module_path(tiny_tokenizer):
    from peft import LoraConfig, get_peft_model

    from preftune.toy import build_tiny_llama

    model = get_peft_model(build_tiny_llama(tiny_tokenizer).eval(),
                           LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False,
                                      target_modules=["q_proj", "v_proj", "down_proj"]))
    head = model.get_base_model().get_output_embeddings()
    assert not head.weight.requires_grad
    ids, am, cm = make_batch(tiny_tokenizer)
    params = [p for p in model.parameters() if p.requires_grad]
    results = both_paths(model, lambda m: [token_logprobs(m, ids, am, cm, chunk_size=5)], params)
    assert_same(results)
    torch.testing.assert_close(results[0][0][0].double(), naive_token_logprobs(model, ids, am, cm), rtol=0, atol=1e-5)


def test_bfloat16_autocast_close_to_module_path(tiny_model, tiny_tokenizer):
    tiny_model.eval()
    ids, am, cm = make_batch(tiny_tokenizer)
    params = [tiny_model.get_output_embeddings().weight, tiny_model.model.norm.weight]

    def run(m):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return [token_logprobs(m, ids, am, cm, chunk_size=5)]

    (ours, g_ours), (ref, g_ref) = both_paths(tiny_model, run, params)
    assert ours[0].dtype == torch.float32
    # same bf16 products on both paths; only the order of float32 roundings differs
    torch.testing.assert_close(ours[0], ref[0], rtol=0, atol=1e-4)
    for a, b in zip(g_ours, g_ref):
        assert a.dtype == b.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=0, atol=2e-2 * float(b.abs().max()))
