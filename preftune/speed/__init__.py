"""The speed mechanisms: faster or lighter training that computes the same numbers (to float rounding).

Each has one switch in :class:`preftune.config.shared.SpeedSettings`, recorded in the run's config.json:

=====================  ==================================  ====================================================
switch                 module                              what it does
=====================  ==================================  ====================================================
``fused_layers``       :mod:`.fused_layers`                RMSNorm and SiLU-gated MLP as autograd functions
                                                           that keep fewer activations
``fused_lora``         :mod:`.fused_lora`                  a plain LoRA update added in place
``fused_head``         :mod:`.head`                        output projection + log-softmax with a written-out
                                                           backward
``blockwise_attention``:mod:`.attention`                   SDPA over packed rows block by block
``reuse_freed_memory``,:mod:`.allocator`                   glibc heap settings for the run (CPU), restored
``trim_freed_memory``                                      after it; or freed pages returned every N layers
=====================  ==================================  ====================================================

:func:`apply` installs the model-level ones while the policy (or a reference) is prepared; the allocator is
scoped to a run by :func:`preftune.runtime.run.start_run` / ``finish_run``.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..wrappers import base_model, is_peft_model
from .allocator import trim_during_forward
from .attention import use_blockwise_sdpa
from .fused_layers import fuse_layers
from .fused_lora import fuse_lora_layers
from .head import use_head_function

MODEL_SWITCHES = ("fused_layers", "fused_lora", "fused_head", "blockwise_attention")


@dataclass
class Applied:
    """What :func:`apply` installed: layers patched per mechanism, and whether each model-level switch is on."""

    fused_layers: int = 0
    fused_lora: int = 0
    fused_head: bool = False
    blockwise_attention: bool = False
    trimmed_layers: int = 0


def apply(model, settings) -> Applied:
    """Install the model-level mechanisms that ``settings`` switch on (after LoRA wrapping, if any).

    Idempotent: a layer already patched is left as it is, so a model prepared twice is unchanged."""
    hf = base_model(model)
    applied = Applied()
    if settings.fused_layers:
        applied.fused_layers = fuse_layers(hf)
    if settings.fused_lora and is_peft_model(model):
        applied.fused_lora = fuse_lora_layers(model)
    applied.fused_head = use_head_function(hf, settings.fused_head)
    if settings.blockwise_attention:
        applied.blockwise_attention = use_blockwise_sdpa(hf)
    applied.trimmed_layers = trim_during_forward(hf, settings.trim_freed_memory)
    return applied


__all__ = ["MODEL_SWITCHES", "Applied", "apply"]
