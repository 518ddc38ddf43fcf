"""The policy's weights as an engine loads them: transformers checkpoint names, LoRA adapters merged."""

from __future__ import annotations

import torch

from ..models import is_peft_model


@torch.no_grad()
def merged_weights(policy) -> dict[str, torch.Tensor]:
    """Every tensor of ``policy``'s state dict under the names of an ordinary transformers checkpoint.

    For a peft LoRA policy each adapted weight is ``W + ΔW`` (peft's own ``get_delta_weight``: the
    scaling and fan-in/fan-out layout included) computed into a new tensor, so the policy itself is
    never merged and unmerged (which would change its weights by rounding); adapter tensors are left out.
    """
    if not is_peft_model(policy):
        return {name: tensor.detach() for name, tensor in policy.state_dict().items()}
    from peft.tuners.lora import LoraLayer

    inner = policy.get_base_model()
    deltas = {}
    for name, module in inner.named_modules():
        if isinstance(module, LoraLayer) and not module.merged:
            adapters = [a for a in module.active_adapters if a in module.lora_A]
            if adapters:
                deltas[f"{name}.weight"] = sum(module.get_delta_weight(a) for a in adapters)
    weights = {}
    for key, tensor in inner.state_dict().items():
        if "lora_" in key:
            continue
        clean = key.replace(".base_layer.", ".")
        weights[clean] = tensor.detach() + deltas[clean].to(tensor.dtype) if clean in deltas else tensor.detach()
    return weights
