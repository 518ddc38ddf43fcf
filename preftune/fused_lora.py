"""LoRA layers whose adapter update is added in place: fewer temporaries, less heap, same numbers.

peft's ``Linear`` computes ``base(x) + lora_B(lora_A(x)) * scaling``: besides the base output and the
result it allocates ``lora_B``'s output and the scaled copy, three ``[tokens, out_features]`` tensors
per adapted layer of which only the result survives. On CPU the freed ones stay in glibc's heap,
interleaved with the activations kept for the backward pass; measured on SmolLM2-135M with LoRA on
every linear layer (one DPO forward + backward of 4 pairs, 1,598 tokens), the resident set grew by
~1.4 GB more than the tensors alive at the end of the forward pass.

:func:`fuse_lora_layers` gives each peft LoRA ``Linear`` of a model a forward that computes ``base(x)``
and then adds ``scaling * lora_A(x) @ lora_B^T`` into it with one in-place ``addmm_``: no ``[tokens,
out_features]`` temporary, and the adapter's two products as before (the gradient of the in-place sum is
the same sum of gradients). Only the plain case takes this path: one active, unmerged adapter without
dropout, bias, DoRA or another variant, a plain ``nn.Linear`` base, and inputs in the adapter's dtype,
weights not partitioned by DeepSpeed ZeRO-3; any other call (adapters disabled, merged, mixed-adapter
batches, dropout in training) runs peft's own forward. The patch is on instances (nothing is saved with
the model) and works under ``torch.no_grad`` and activation checkpointing.
"""

from __future__ import annotations

import types

from torch import Tensor, nn


def fuse_lora_layers(model: nn.Module) -> int:
    """Patch every peft LoRA ``Linear`` in ``model``; returns how many were patched."""
    try:
        from peft.tuners.lora.layer import Linear as LoraLinear
    except ImportError:   # peft missing: nothing can be a LoRA layer
        return 0
    count = 0
    for module in model.modules():
        if type(module) is LoraLinear and not getattr(module, "_preftune_fused", False):
            module.forward = types.MethodType(_forward, module)
            module._preftune_fused = True
            count += 1
    return count


def _forward(self, x: Tensor, *args, **kwargs) -> Tensor:
    adapter = _plain_adapter(self, x, args, kwargs)
    if adapter is None:
        return type(self).forward(self, x, *args, **kwargs)
    lora_a, lora_b = self.lora_A[adapter], self.lora_B[adapter]
    result = self.base_layer(x)
    low_rank = lora_a(x)
    flat = result.view(-1, result.shape[-1])
    flat.addmm_(low_rank.reshape(-1, low_rank.shape[-1]), lora_b.weight.t(), alpha=self.scaling[adapter])
    return result


def _plain_adapter(layer, x: Tensor, args: tuple, kwargs: dict) -> str | None:
    """The one active adapter's name when the in-place path computes what peft would, else None."""
    if args or kwargs or layer.disable_adapters or layer.merged or len(layer.active_adapters) != 1:
        return None
    name = layer.active_adapters[0]
    if name not in layer.lora_A or name in getattr(layer, "lora_variant", {}):
        return None
    base, lora_a, lora_b = layer.base_layer, layer.lora_A[name], layer.lora_B[name]
    if type(base) is not nn.Linear or not _no_dropout(layer.lora_dropout[name]):
        return None
    if lora_a.bias is not None or lora_b.bias is not None or hasattr(lora_b.weight, "ds_id"):
        return None     # (ds_id: a weight DeepSpeed ZeRO-3 gathers only when its module is called)
    if not (x.dtype == base.weight.dtype == lora_a.weight.dtype == lora_b.weight.dtype):
        return None
    if x.dim() < 1 or x.shape[-1] != base.in_features or not x.is_contiguous():
        return None
    return name


def _no_dropout(dropout: nn.Module) -> bool:
    return isinstance(dropout, nn.Identity) or (isinstance(dropout, nn.Dropout) and
                                                 (dropout.p == 0.0 or not dropout.training))


__all__ = ["fuse_lora_layers"]
