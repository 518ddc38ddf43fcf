"""LoRA layers with the adapter update added in place equal peft's own forward, values and gradients."""

import copy

import pytest
import torch
from torch import nn

from preftune.speed.fused_lora import fuse_lora_layers


def lora_stack(dropout: float = 0.0, bias: bool = True, seed: int = 0):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    base = nn.Sequential(nn.Linear(12, 20, bias=bias), nn.Tanh(), nn.Linear(20, 7, bias=bias))
    config = LoraConfig(r=4, lora_alpha=12, lora_dropout=dropout, init_lora_weights=False, target_modules=["0", "2"])
    return get_peft_model(base, config)


def forward_backward(model, x):
    x = x.clone().requires_grad_(True)
    out = model(x)
    (out * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.detach(), x.grad.clone(), grads


@pytest.mark.parametrize("shape", [(5, 12), (3, 6, 12)])
@pytest.mark.parametrize("bias", [True, False])
def test_in_place_update_equals_peft(shape, bias):
    plain = lora_stack(bias=bias)
    fused = copy.deepcopy(plain)
    assert fuse_lora_layers(fused) == 2
    x = torch.randn(*shape)
    out_a, dx_a, grads_a = forward_backward(plain, x)
    out_b, dx_b, grads_b = forward_backward(fused, x)
    torch.testing.assert_close(out_b, out_a, rtol=0, atol=1e-6)
    torch.testing.assert_close(dx_b, dx_a, rtol=0, atol=1e-6)
    assert grads_a.keys() == grads_b.keys() and any("lora_B" in n for n in grads_a)
    # A weight gradient sums one product per input row; two float32 summation orders may differ by up to
    # rows * eps * max|term| (the bound of recursive summation), so the tolerance is derived from that,
    # not set below float32 rounding.
    rows = x.numel() // x.shape[-1]
    eps = torch.finfo(torch.float32).eps
    for name in grads_a:
        atol = rows * eps * grads_a[name].abs().max().item()
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=0, atol=atol)
    # the adapter really contributes: without it the output differs
    with fused.disable_adapter():
        assert (fused(x) - out_b).abs().max() > 1e-2


def test_in_place_path_is_taken_and_keeps_no_temporary():
    model = lora_stack()
    fuse_lora_layers(model)
    layer = model.base_model.model[0]
    x = torch.randn(64, 12)
    seen = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: seen.append(tuple(t.shape)) or t, lambda t: t):
        layer(x.requires_grad_(True))
    # saved: the input (for lora_A and the base's weight gradient), lora_A's output and lora_B's weight
    assert (64, 4) in seen and (64, 7) not in seen and (64, 20) not in seen


def test_other_cases_run_peft_forward():
    fused = lora_stack(dropout=0.5)
    plain = copy.deepcopy(fused)
    fuse_lora_layers(fused)
    x = torch.randn(8, 12)
    fused.train(), plain.train()
    torch.manual_seed(3)
    a = plain(x)
    torch.manual_seed(3)
    b = fused(x)
    torch.testing.assert_close(b, a, rtol=0, atol=0)   # dropout in training: peft's own path, same draws
    fused.eval(), plain.eval()
    torch.testing.assert_close(fused(x), plain(x), rtol=0, atol=1e-6)  # dropout off in eval
    with fused.disable_adapter(), plain.disable_adapter():
        torch.testing.assert_close(fused(x), plain(x), rtol=0, atol=0)
    fused.merge_adapter(), plain.merge_adapter()
    torch.testing.assert_close(fused(x), plain(x), rtol=0, atol=1e-6)


def test_policy_lora_dpo_logprobs_equal_and_checkpoint_unchanged(tiny_tokenizer, tmp_path):
    from preftune.config import DPOConfig
    from preftune.logprobs import packed_sequence_logprobs
    from preftune.models import prepare_policy
    from preftune.toy import build_tiny_llama
    from test_packed import collate_blocks, grads, pair_blocks, toy_pairs

    torch.manual_seed(0)
    base = build_tiny_llama(tiny_tokenizer)
    cfg = DPOConfig(lora=True, lora_r=4, lora_alpha=8, lora_dropout=0.0)
    fused = prepare_policy(copy.deepcopy(base), cfg)
    patched = [m for m in fused.modules() if hasattr(m, "lora_A") and "forward" in vars(m)]
    assert len(patched) == 7 * base.config.num_hidden_layers
    plain = copy.deepcopy(fused)
    for module in plain.modules():          # back to peft's class forward (fused norms and MLPs too)
        if "forward" in vars(module):
            del module.forward
    for model in (fused, plain):            # non-zero adapters, the same in both
        torch.manual_seed(1)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.data.normal_(0, 0.05)
    batch = collate_blocks(pair_blocks(toy_pairs(len(tiny_tokenizer)), True))
    a = packed_sequence_logprobs(plain, batch, chunk_size=7)
    b = packed_sequence_logprobs(fused, batch, chunk_size=7)
    torch.testing.assert_close(b, a, rtol=0, atol=1e-5)
    for ga, gb in zip(grads(plain, a), grads(fused, b)):
        torch.testing.assert_close(gb, ga, rtol=0, atol=1e-5)
    fused.save_pretrained(tmp_path / "fused"), plain.save_pretrained(tmp_path / "plain")
    from safetensors.torch import load_file

    saved_a = load_file(tmp_path / "plain" / "adapter_model.safetensors")
    saved_b = load_file(tmp_path / "fused" / "adapter_model.safetensors")
    assert saved_a.keys() == saved_b.keys() and all(torch.equal(saved_a[k], saved_b[k]) for k in saved_a)
