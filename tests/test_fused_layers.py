"""Fused RMSNorm and gated MLP (``fused_layers``): equal to transformers' modules, and keeping fewer activations.

Outputs are bitwise equal (the same operations run in the forward); gradients equal within 1e-6 (fp32)
and pass gradcheck in float64; DPO losses and gradients of tiny Llama and Qwen2 models equal within
1e-5 with the option on and off (full, LoRA, gradient checkpointing); the bytes autograd keeps fall by
the amount the shapes give.
"""

import copy
import json

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM
from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm

from preftune.config import DPOConfig
from preftune.data.preference import TokenizedPair
from preftune.modality import TEXT, CompletionLogprobs, sequence_sums
from preftune.modality.text import PairCollator
from preftune.models import freeze, prepare_policy
from preftune.recipes.dpo import DPOTask
from preftune.runtime.reference import AdapterReference, ModelReference
from preftune.speed.fused_layers import (
    GatedMLPFunction,
    LoraDownFunction,
    RMSNormFunction,
    SiluMulFunction,
    fuse_layers,
    fused_mlp_forward,
    fused_norm_forward,
    patched,
)
from saved_bytes import SavedBytes

pytestmark = pytest.mark.usefixtures("one_thread")
HIDDEN, INTERMEDIATE, LAYERS, VOCAB = 32, 80, 2, 96


def shapes(**extra):
    return dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=LAYERS,
                num_attention_heads=4, num_key_value_heads=2, attn_implementation="sdpa", **extra)


MODELS = {"llama": lambda: LlamaForCausalLM(LlamaConfig(**shapes())),
          "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**shapes()))}


def build(kind: str, seed: int = 0):
    """A tiny model with every weight (norms included) moved away from its initial value."""
    torch.manual_seed(seed)
    model = MODELS[kind]()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return model


def toy_pairs(seed: int = 0) -> list[TokenizedPair]:
    generator = torch.Generator().manual_seed(seed)

    def ids(n):
        return torch.randint(3, VOCAB, (n,), generator=generator).tolist()

    return [TokenizedPair(ids(p), ids(c), ids(r), 1.0, 0.0, i) for i, (p, c, r) in enumerate([(6, 5, 8), (3, 9, 4),
                                                                                               (8, 4, 4)])]


def assert_close_grads(expected, got, tol=1e-5):
    assert expected.keys() == got.keys()
    for name in expected:
        scale = float(expected[name].abs().max())
        assert scale > 0, name                     # a gradient that is zero would prove nothing
        torch.testing.assert_close(got[name], expected[name], rtol=tol, atol=tol * scale, msg=name)


def test_norm_equals_llama_rmsnorm_outputs_and_gradients():
    torch.manual_seed(0)
    norm = LlamaRMSNorm(HIDDEN, eps=1e-5)
    with torch.no_grad():
        norm.weight.add_(torch.randn(HIDDEN))
    x = torch.randn(3, 7, HIDDEN, requires_grad=True)
    weights = torch.randn(3, 7, HIDDEN)
    expected = norm(x)
    (expected * weights).sum().backward()
    grads = x.grad.clone(), norm.weight.grad.clone()
    x.grad = norm.weight.grad = None
    got = fused_norm_forward(norm, x)
    (got * weights).sum().backward()
    assert torch.equal(got, expected)
    torch.testing.assert_close(x.grad, grads[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(norm.weight.grad, grads[1], rtol=1e-6, atol=1e-6)


def test_mlp_equals_llama_mlp_outputs_and_gradients():
    torch.manual_seed(0)
    mlp = LlamaMLP(LlamaConfig(**shapes(mlp_bias=True)))
    x = torch.randn(2, 5, HIDDEN, requires_grad=True)
    weights = torch.randn(2, 5, HIDDEN)

    def run(forward):
        x.grad = None
        mlp.zero_grad(set_to_none=True)
        out = forward(x)
        (out * weights).sum().backward()
        return out.detach(), {"x": x.grad.clone(), **{n: p.grad.clone() for n, p in mlp.named_parameters()}}

    expected, expected_grads = run(mlp)
    got, got_grads = run(lambda t: fused_mlp_forward(mlp, t))
    assert torch.equal(got, expected)
    assert_close_grads(expected_grads, got_grads, tol=1e-6)


def test_functions_pass_gradcheck_in_float64():
    torch.manual_seed(0)

    def leaf(*shape):
        return torch.randn(*shape, dtype=torch.float64, requires_grad=True)

    assert torch.autograd.gradcheck(lambda x, w: RMSNormFunction.apply(x, w, 1e-6), (leaf(2, 3, 6), leaf(6)))
    assert torch.autograd.gradcheck(SiluMulFunction.apply, (leaf(2, 3, 5), leaf(2, 3, 5)))
    assert torch.autograd.gradcheck(GatedMLPFunction.apply, (leaf(2, 3, 4), leaf(7, 4), leaf(7), leaf(7, 4), leaf(7),
                                                             leaf(4, 7), leaf(4)))
    assert torch.autograd.gradcheck(GatedMLPFunction.apply, (leaf(3, 4), leaf(7, 4), None, leaf(7, 4), None,
                                                             leaf(4, 7), None))
    assert torch.autograd.gradcheck(LoraDownFunction.apply, (leaf(2, 3, 7), leaf(2, 3, 7), leaf(4, 7), leaf(4),
                                                             leaf(2, 7), leaf(4, 2), 0.7))


def test_only_standard_formulas_are_patched():
    gelu_mlp = LlamaMLP(LlamaConfig(**shapes(hidden_act="gelu")))
    gemma_norm = GemmaRMSNorm(HIDDEN)                  # weight * (1 + w): another formula
    model = nn.ModuleList([gelu_mlp, gemma_norm, LlamaRMSNorm(HIDDEN), LlamaMLP(LlamaConfig(**shapes()))])
    assert fuse_layers(model) == 2
    assert [patched(m) for m in model] == [False, False, True, True]
    assert fuse_layers(model) == 0                     # patching twice changes nothing


def test_a_norm_with_another_epsilon_attribute_is_left_alone():
    class OddNorm(LlamaRMSNorm):   # declares eps but adds 1e-2 inside its forward: the probe sees it
        def forward(self, hidden_states):
            variance = hidden_states.pow(2).mean(-1, keepdim=True)
            return self.weight * hidden_states * torch.rsqrt(variance + 1e-2)

    assert fuse_layers(OddNorm(HIDDEN, eps=1e-6)) == 0


def dpo_loss_and_grads(kind: str, fused: bool, lora: bool, checkpointing: bool):
    """One DPO loss on prefix-shared pairs (the policy a little away from its reference) and its gradients."""
    model = build(kind)
    cfg = DPOConfig(fused_layers=fused, fused_lora=fused, lora=lora, lora_r=4, lora_alpha=8,
                    gradient_checkpointing=checkpointing)
    reference = None if lora else freeze(copy.deepcopy(model))
    policy = prepare_policy(model, cfg)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    policy.train()
    reference = AdapterReference(policy, 1024) if lora else ModelReference(reference, 1024)
    task = DPOTask(cfg, 0, reference, policy)
    batch = task.collate(toy_pairs())
    assert "completion_lengths" in batch and batch["input_ids"].shape[0] == 1    # prefix-shared
    loss, _ = task.loss(CompletionLogprobs(policy, TEXT), batch)
    loss.backward()
    patches = sum(patched(m) for m in policy.modules())
    return loss.detach(), {n: p.grad for n, p in policy.named_parameters() if p.requires_grad}, patches


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointing"])
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("kind", list(MODELS))
def test_dpo_loss_and_gradients_equal_with_and_without(kind, lora, checkpointing):
    loss, grads, none = dpo_loss_and_grads(kind, False, lora, checkpointing)
    fused_loss, fused_grads, patches = dpo_loss_and_grads(kind, True, lora, checkpointing)
    lora_layers = 7 * LAYERS if lora else 0               # (LoRA: each adapted linear adds in place, fused_lora)
    assert none == 0 and patches == LAYERS * 3 + 1 + lora_layers   # two norms and an MLP per layer, the final norm
    assert abs(float(loss) - 0.6931) > 1e-3               # the policy differs from its reference
    torch.testing.assert_close(fused_loss, loss, rtol=1e-5, atol=1e-6)
    assert_close_grads(grads, fused_grads)


def saved_bytes_per_token(kind: str, fused: bool, lora: bool) -> float:
    model = build(kind)
    cfg = DPOConfig(fused_layers=fused, lora=lora, lora_r=4, lora_alpha=8)
    policy = prepare_policy(model, cfg)
    policy.train()
    batch = PairCollator.for_model(cfg, 0, policy)(toy_pairs())
    with SavedBytes(policy).counting() as saved:
        sums, _ = sequence_sums(CompletionLogprobs(policy, TEXT), batch)
    sums.sum().backward()
    return saved.total / batch["input_ids"].numel()


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_fewer_bytes_kept_for_the_backward(lora):
    """Per token, fp32. Full: each norm (two per layer and the final one) no longer keeps its normalised
    tensor (HIDDEN floats) and each MLP keeps gate and up only (2 x INTERMEDIATE fewer: not silu(gate) nor
    the product). LoRA (frozen norm weights, so autograd keeps no normalised tensor anyway): silu(gate) and
    the product (the down projection's adapter input) are not kept."""
    reduction = saved_bytes_per_token("llama", False, lora) - saved_bytes_per_token("llama", True, lora)
    floats = LAYERS * 2 * INTERMEDIATE if lora else LAYERS * (2 * INTERMEDIATE + 2 * HIDDEN) + HIDDEN
    assert reduction == pytest.approx(4 * floats, rel=0.1)


def test_saved_model_is_an_ordinary_checkpoint(tmp_path):
    plain = build("qwen2")
    model = copy.deepcopy(plain)
    assert fuse_layers(model) == LAYERS * 3 + 1
    keys = set(plain.state_dict())
    model.save_pretrained(tmp_path)
    assert "fused" not in (tmp_path / "config.json").read_text().lower()
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == ["Qwen2ForCausalLM"]
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert set(loaded.state_dict()) == keys and not any(patched(m) for m in loaded.modules())
    ids = torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = plain(ids).logits
        assert torch.equal(loaded(ids).logits, expected)
        assert torch.equal(model(ids).logits, expected)


def test_a_pickled_model_keeps_its_fused_layers(tmp_path):
    model = build("llama")
    fuse_layers(model)
    torch.save(model, tmp_path / "model.pt")
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)
    assert [patched(m) for m in loaded.modules()] == [patched(m) for m in model.modules()]
    ids = torch.randint(0, VOCAB, (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        loaded.model.norm.weight.mul_(2.0)          # the loaded model's forward reads its own weights
        assert not torch.allclose(loaded(ids).logits, model(ids).logits)


def test_copies_run_their_own_weights_under_inference_mode():
    model = build("llama")
    fuse_layers(model)
    twin = copy.deepcopy(model)
    assert all(patched(a) == patched(b) for a, b in zip(model.modules(), twin.modules()))
    with torch.no_grad():
        twin.model.layers[0].mlp.down_proj.weight.mul_(2.0)
        twin.model.norm.weight.mul_(4.0)
    ids = torch.randint(0, VOCAB, (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ours, theirs = model(ids).logits, twin(ids).logits
    assert not torch.allclose(ours, theirs)                   # the copy's forward reads the copy's weights
    with torch.no_grad():
        twin.model.layers[0].mlp.down_proj.weight.div_(2.0)
        twin.model.norm.weight.div_(4.0)
    with torch.inference_mode():
        assert torch.equal(twin(ids).logits, ours)


def lora_llama(dropout: float):
    """A tiny Llama with LoRA adapters whose B matrices are not zero (so that every adapter has a gradient)."""
    from preftune.models import apply_lora

    model = apply_lora(build("llama"), 4, 8, dropout, ["all-linear"])
    torch.manual_seed(2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_()
    return model


@pytest.mark.parametrize("dropout", [0.0, 0.1], ids=["lora-down-fused", "product-only"])
def test_lora_mlp_equals_peft_outputs_and_gradients(dropout):
    """Dropout 0: the LoRA down projection runs fused; with a dropout layer (here in eval mode) only the product."""
    model = lora_llama(dropout)
    model.eval()
    mlp = model.get_base_model().model.layers[0].mlp
    x = torch.randn(2, 5, HIDDEN, requires_grad=True)
    results = []
    for forward in (lambda t: LlamaMLP.forward(mlp, t), lambda t: fused_mlp_forward(mlp, t)):
        x.grad = None
        model.zero_grad(set_to_none=True)
        out = forward(x)
        out.square().sum().backward()
        results.append((out.detach(), {"x": x.grad.clone(), **{n: p.grad.clone() for n, p in mlp.named_parameters()
                                                               if p.requires_grad}}))
    assert len(results[0][1]) == 7                       # x and the A and B of three adapters
    assert torch.equal(results[1][0], results[0][0])
    assert_close_grads(results[0][1], results[1][1], tol=1e-6)


@pytest.mark.parametrize("lora", [False, True], ids=["fused-mlp", "lora-product-only"])
def test_autocast_matches_in_bfloat16(lora):
    """Under autocast the MLP computes in bfloat16 as transformers' does: the same output, gradients to bf16
    rounding (the full function sums the input's two gradients in bf16, autograd in fp32)."""
    model = lora_llama(0.0).get_base_model() if lora else build("llama")
    mlp = model.model.layers[0].mlp
    x = torch.randn(2, 5, HIDDEN, requires_grad=True)
    results = []
    for forward in (lambda t: LlamaMLP.forward(mlp, t), lambda t: fused_mlp_forward(mlp, t)):
        x.grad = None
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = forward(x)
        out.float().square().sum().backward()
        results.append((out.detach(), {"x": x.grad.clone(), **{n: p.grad.clone() for n, p in mlp.named_parameters()
                                                               if p.requires_grad}}))
    assert results[1][0].dtype == torch.bfloat16 and torch.equal(results[1][0], results[0][0])
    assert all(g.dtype == torch.float32 for g in results[1][1].values())
    assert_close_grads(results[0][1], results[1][1], tol=1e-2)
