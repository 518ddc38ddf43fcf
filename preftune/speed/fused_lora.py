"""LoRA layers whose adapter update is added in place: fewer temporaries, less heap, same numbers.

peft's ``Linear`` computes ``base(x) + lora_B(lora_A(x)) * scaling``: besides the base output and the
result it allocates ``lora_B``'s output and the scaled copy, three ``[tokens, out_features]`` tensors
per adapted layer of which only the result survives. On CPU the freed ones stay in glibc's heap,
interleaved with the activations kept for the backward pass; measured on SmolLM2-135M with LoRA on
every linear layer (one DPO forward + backward of 4 pairs, 1,598 tokens), the resident set grew by
~1.4 GB more than the tensors alive at the end of the forward pass.

:func:`fuse_lora_layers` gives each peft LoRA ``Linear`` of a model a forward that computes ``base(x)`` and
then adds ``scaling * lora_A(x) @ lora_B^T`` into it with one in-place ``addmm_``: no ``[tokens,
out_features]`` temporary, and the adapter's two products as before (the gradient of the in-place sum is the
same sum of gradients). Only the plain case takes this path: one active, unmerged adapter without dropout,
bias, DoRA or another variant, plain ``nn.Linear`` layers, contiguous inputs in the adapter's dtype (under autocast:
any dtype, input and weights cast to autocast's dtype as autocast would cast them, the products in that dtype),
weights not partitioned by DeepSpeed ZeRO-3 (:func:`preftune.speed.fused_layers.plain_lora`); any other
call (adapters disabled, merged, mixed-adapter batches, dropout) runs peft's own forward. The patch is on
instances (nothing is saved with the model) and works under ``torch.no_grad`` and activation checkpointing.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .fused_layers import FusedForward, autocast_cast, plain_lora


def fuse_lora_layers(model: nn.Module) -> int:
    """Patch every peft LoRA ``Linear`` in ``model``; returns how many were patched."""
    try:
        from peft.tuners.lora.layer import Linear as LoraLinear
    except ImportError:   # peft missing: nothing can be a LoRA layer
        return 0
    count = 0
    for module in model.modules():
        if type(module) is LoraLinear and "forward" not in module.__dict__:
            module.forward = FusedForward(module, lora_forward)
            count += 1
    return count


def lora_forward(self, x: Tensor, *args, **kwargs) -> Tensor:
    """``base(x) + scaling * lora_B(lora_A(x))`` with the update added in place (peft's forward otherwise)."""
    device = x.device.type
    autocast = torch.is_autocast_enabled(device)
    plain = not (args or kwargs) and x.is_contiguous()
    lora = plain_lora(self, None if autocast else x.dtype) if plain else None
    if lora is None or x.shape[-1] != lora[0].shape[1]:
        return type(self).forward(self, x, *args, **kwargs)
    if autocast:
        x, weight, bias, lora_a, lora_b = autocast_cast(x, *lora[:4], device=device)
        with torch.autocast(device, enabled=False):
            return _add_low_rank(x, weight, bias, lora_a, lora_b, lora[4])
    return _add_low_rank(x, *lora)


def _add_low_rank(x: Tensor, weight: Tensor, bias: Tensor | None, lora_a: Tensor, lora_b: Tensor,
                  scaling: float) -> Tensor:
    result = nn.functional.linear(x, weight, bias)
    low_rank = nn.functional.linear(x, lora_a)
    result.view(-1, result.shape[-1]).addmm_(low_rank.reshape(-1, low_rank.shape[-1]), lora_b.t(), alpha=scaling)
    return result


__all__ = ["fuse_lora_layers", "lora_forward"]
