"""Attention over packed rows (:mod:`preftune.data.packed`) without a ``[T, T]`` mask over the whole row.

A packed row of T tokens holds many blocks, and attention never crosses a block. A dense
``[T, T]`` mask would be exact, but PyTorch's SDPA kernels (the CPU flash kernel included) compute
every query-key product the mask allows *or forbids*: one row of four pairs would cost several times
the attention work of four padded rows. So for SDPA models the attention runs block by block
instead, through an attention function registered with transformers (``preftune_sdpa``):

* the prompt and the block's first completion are a plain causal span: SDPA with ``is_causal``,
  which skips the upper triangle (a padding-free block is only this);
* every further completion of a prefix-shared block (``prompt | chosen | rejected``) attends to the
  prompt's keys followed by its own, with a causal mask aligned to the lower right (each token
  sees the whole prompt and its own earlier tokens): no mask is materialised at all.

Grouped-query attention runs with ``enable_gqa`` (keys and values are not repeated per head, which
transformers does whenever a mask is given). The block layout reaches the attention function as a
keyword argument of the model's forward, which transformers hands down to every attention layer
(and to activation-checkpointed recomputation alike). Without a layout the function is
transformers' own SDPA attention, unchanged.

Other attention implementations: ``eager`` gets the dense block mask (exact, memory-hungry);
flash-attention (GPU) gets no mask and derives variable-length sequences from the position ids, which
is exact for padding-free blocks (prefix sharing needs SDPA or eager, see :func:`supports_prefix_sharing`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F
from torch.nn.attention.bias import causal_lower_right

from ..data.packed import PackedLayout, collate_blocks, packed_mask
from ..data.packing import block_causal_mask
from ..wrappers import base_model, evaluating

IMPLEMENTATION = "preftune_sdpa"
LAYOUT_KEY = "preftune_blocks"


@dataclass
class BlockAttention:
    """``(row, start, prompt length, completion lengths)`` of every block; the blocks cover each row of the
    batch in order."""

    blocks: list[tuple[int, int, int, list[int]]]


def blockwise_sdpa(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, is_causal=None,
                   **kwargs):
    """A transformers attention function: SDPA block by block when a layout is given, else transformers' SDPA."""
    blocks = kwargs.pop(LAYOUT_KEY, None)
    if blocks is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    options = {"dropout_p": dropout, "scale": scaling, "enable_gqa": query.shape[1] != key.shape[1]}
    rows: list[list[torch.Tensor]] = [[] for _ in range(query.shape[0])]
    for r, start, prompt, completions in blocks.blocks:
        q, k, v = (t[r:r + 1] for t in (query, key, value))
        offset = start + prompt + completions[0]
        rows[r].append(F.scaled_dot_product_attention(q[:, :, start:offset], k[:, :, start:offset],
                                                      v[:, :, start:offset], is_causal=True, **options))
        for length in completions[1:]:
            end = offset + length
            keys, values = (torch.cat([t[:, :, start:start + prompt], t[:, :, offset:end]], dim=2) for t in (k, v))
            rows[r].append(F.scaled_dot_product_attention(q[:, :, offset:end], keys, values,
                                                          attn_mask=causal_lower_right(length, prompt + length),
                                                          **options))
            offset = end
    output = torch.cat([torch.cat(row, dim=2) for row in rows])
    return output.transpose(1, 2).contiguous(), None


_registered = False


def register() -> None:
    """Make ``preftune_sdpa`` known to transformers' attention registry (once per process; explicit, by
    :func:`use_blockwise_sdpa`)."""
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(IMPLEMENTATION, blockwise_sdpa)
    AttentionMaskInterface.register(IMPLEMENTATION, sdpa_mask)
    _registered = True


def attention_implementation(model) -> str:
    config = getattr(model, "config", None)
    return str(getattr(config, "_attn_implementation", None) or "eager")


def supports_packing(model) -> bool:
    """Padding-free rows need attention that keeps blocks apart (SDPA, eager or flash attention) and
    inputs taken as they are (not a prompt-learning adapter, which prepends virtual tokens)."""
    if getattr(getattr(model, "active_peft_config", None), "is_prompt_learning", False):
        return False
    kind = attention_implementation(model)
    return kind in ("sdpa", IMPLEMENTATION, "eager") or kind.startswith("flash_attention")


def supports_prefix_sharing(model) -> bool:
    """Prefix-shared blocks need a mask inside a block: SDPA (block by block) or eager (dense mask)."""
    return supports_packing(model) and attention_implementation(model) in ("sdpa", IMPLEMENTATION, "eager")


def runs_blockwise(model) -> bool:
    """True when ``model`` was switched to :func:`blockwise_sdpa` (by :func:`use_blockwise_sdpa`)."""
    return attention_implementation(model) == IMPLEMENTATION


def use_blockwise_sdpa(model) -> bool:
    """Switch an SDPA model to :func:`blockwise_sdpa` (the same computation without a layout; the
    ``blockwise_attention`` setting, applied once while the model is prepared); True if it runs it."""
    kind = attention_implementation(model)
    if kind == "sdpa":
        register()
        model.config._attn_implementation = IMPLEMENTATION
        for sub in model.modules():  # nested configs (a backbone's own) follow
            config = getattr(sub, "config", None)
            if config is not None and getattr(config, "_attn_implementation", None) == "sdpa":
                config._attn_implementation = IMPLEMENTATION
        return True
    return kind == IMPLEMENTATION


def packed_model_inputs(model, batch: dict) -> dict:
    """Keyword arguments (besides ``input_ids``) that run ``model`` on a packed batch exactly."""
    layout = PackedLayout.of(batch)
    device = batch["input_ids"].device
    inputs = {"position_ids": batch["position_ids"]}
    if runs_blockwise(model):
        blocks = [(0, start, prompt, completions) for (start, _), prompt, completions
                  in zip(layout.spans(), layout.prompt_lengths, layout.completion_lengths)]
        inputs["attention_mask"] = batch["attention_mask"]     # all ones: transformers builds no mask
        inputs[LAYOUT_KEY] = BlockAttention(blocks)
    elif attention_implementation(model).startswith("flash_attention"):
        if any(len(c) > 1 for c in layout.completion_lengths):
            raise ValueError("prefix-shared blocks need SDPA or eager attention, not flash attention")
        inputs["attention_mask"] = None    # variable-length flash attention from the position ids
    else:
        mask = packed_mask(layout, device)
        if attention_implementation(model) in ("eager", "sdpa"):   # sdpa not switched: the dense mask, exact
            dtype = next(model.parameters()).dtype
            mask = torch.zeros(mask.shape, dtype=dtype, device=device).masked_fill(~mask, torch.finfo(dtype).min)
        inputs["attention_mask"] = mask
    return inputs


def packed_lm_inputs(model, attention_mask: torch.Tensor, position_ids: torch.Tensor) -> dict:
    """Keyword arguments that run ``model`` on packed language-modelling rows (:mod:`preftune.data.packing`:
    examples side by side, each starting at position 0, padding a block of its own at the end).

    SDPA runs block by block; eager attention gets the dense block-diagonal causal mask; other kernels
    (flash, flex) get no mask and derive the packed layout from ``position_ids`` themselves."""
    inputs = {"position_ids": position_ids}
    if runs_blockwise(model):
        starts = [(row == 0).nonzero().flatten().tolist() for row in position_ids.cpu()]
        length = position_ids.shape[1]
        blocks = [(r, s, 0, [e - s]) for r, row in enumerate(starts) for s, e in zip(row, row[1:] + [length])]
        inputs["attention_mask"] = torch.ones_like(attention_mask)   # the blocks say it all: no mask is built
        inputs[LAYOUT_KEY] = BlockAttention(blocks)
    elif attention_implementation(model) in ("eager", "sdpa"):   # sdpa not switched: the dense mask, exact
        inputs["attention_mask"] = block_causal_mask(position_ids, dtype=next(model.parameters()).dtype)
    else:
        inputs["attention_mask"] = None
    return inputs


@torch.no_grad()
def check_block_attention(model) -> bool:
    """True when ``model`` keeps the blocks of a packed row apart (a probe of under 20 tokens).

    A model whose attention layers do not hand the layout down (custom code without ``**kwargs``)
    would let blocks see each other; then a prompt-shared response's hidden states differ from
    those of the same sequence run alone, and this returns False.
    """
    hf = base_model(model)
    backbone = getattr(hf, getattr(hf, "base_model_prefix", ""), None)
    if not isinstance(backbone, torch.nn.Module):
        return False
    param = next(hf.parameters())
    vocab = hf.get_input_embeddings().weight.shape[0]
    ids = torch.randint(vocab, (13,), generator=torch.Generator().manual_seed(0)).tolist()
    last = [ids[8:10], ids[10:13]] if supports_prefix_sharing(model) else [ids[10:13]]
    batch = {k: v.to(param.device) for k, v in collate_blocks([(ids[:4], [ids[4:8]] * len(last)),
                                                                (ids[:4], last)]).items()}
    with evaluating(hf):
        packed = backbone(input_ids=batch["input_ids"], use_cache=False, **packed_model_inputs(hf, batch))[0][0]
        alone = backbone(input_ids=torch.tensor([ids[:4] + ids[10:13]], device=param.device), use_cache=False)[0][0]
    tolerance = 1e-4 if param.dtype == torch.float32 else 5e-2
    return bool((packed[-3:] - alone[4:7]).abs().max() <= tolerance * max(1.0, float(alone.abs().max())))
