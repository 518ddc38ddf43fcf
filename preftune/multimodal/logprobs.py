"""Completion log-probs of a vision-language model, with each prompt's images encoded once.

A preference batch holds each pair's prompt twice (chosen rows, then rejected rows) but its image
tensors once (:mod:`preftune.multimodal.data`). Two ways to run the model on it:

* **once per pair** (:func:`vision_hidden_states`, the default): the model's ``get_image_features``
  encodes each pair's images once (vision tower + projector), the features are repeated for the
  chosen and rejected rows, and the model's forward takes them as ``mm_encoder_outputs`` (the
  transformers 5 API of Llava, Idefics3/SmolVLM, Qwen2-VL, Qwen2.5-VL, ...);
* **repeated pixels** (``share_images=False``): the pixel values are repeated for every row and the
  model encodes them itself, as it would with any other input. Models whose forward takes no
  ``mm_encoder_outputs`` use this path. A test holds both equal to 1e-5.

Either way the final hidden states go through :func:`preftune.logprobs.completion_logprobs`, the same
chunked vocabulary projection as text: only completion positions are projected, so image tokens and
the prompt are never scored and no ``[batch, seq, vocab]`` tensor exists. The trainers run them through
the one log-prob module (:class:`preftune.modality.logprobs.CompletionLogprobs`, which asks the vision
modality for :func:`vision_hidden_states`); :func:`vision_token_logprobs` is the same as a plain function.
"""

from __future__ import annotations

import inspect

import torch
from torch import Tensor, nn

from ..logprobs import _first_output, _to_token_layout, completion_logprobs
from ..models import base_model
from .data import IMAGE_PREFIX

PIXEL_KEYS = ("pixel_values", "pixel_attention_mask", "pixel_values_videos", "input_features",
              "feature_attention_mask")


def image_inputs(batch: dict) -> dict[str, Tensor]:
    return {k[len(IMAGE_PREFIX):]: v for k, v in batch.items() if k.startswith(IMAGE_PREFIX)}


def repeat_inputs(inputs: dict[str, Tensor], repeats: int) -> dict[str, Tensor]:
    """Per-prompt tensors for ``repeats`` blocks of rows (the rows are the prompts, ``repeats`` times over)."""
    return {k: torch.cat([v] * repeats) for k, v in inputs.items()}


def takes_encoder_outputs(model) -> bool:
    inner = base_model(model).model
    return "mm_encoder_outputs" in inspect.signature(inner.forward).parameters and hasattr(inner, "get_image_features")


def encode_images(inner: nn.Module, inputs: dict[str, Tensor]):
    """The model's image features of one batch of prompts (its ``get_image_features`` output)."""
    wanted = inspect.signature(inner.get_image_features).parameters
    return inner.get_image_features(**{k: v for k, v in inputs.items() if k in wanted}, return_dict=True)


def vision_hidden_states(model, batch: dict, share_images: bool = True) -> Tensor:
    """``[rows, L, H]`` final hidden states of every row of a vision batch (peft unwrapped, adapters applied)."""
    inner = base_model(model).model
    inputs, repeats = image_inputs(batch), int(batch.get("repeats", 1))
    kwargs = {"attention_mask": batch["attention_mask"], "use_cache": False}
    if "mm_token_type_ids" in batch:
        kwargs["mm_token_type_ids"] = batch["mm_token_type_ids"]
    if inputs and share_images and takes_encoder_outputs(model):
        features = encode_images(inner, inputs)
        features.pooler_output = tuple(features.pooler_output) * repeats
        rest = {k: v for k, v in inputs.items() if k not in PIXEL_KEYS}
        kwargs.update(repeat_inputs(rest, repeats), mm_encoder_outputs={"image": features})
    else:
        kwargs.update(repeat_inputs(inputs, repeats))
    return _first_output(inner(input_ids=batch["input_ids"], **kwargs))


def vision_token_logprobs(model, batch: dict, chunk_size: int = 1024, share_images: bool = True) -> Tensor:
    """``[rows, L]`` float32 completion-token log-probs, 0 elsewhere (as :func:`preftune.logprobs.token_logprobs`)."""
    hidden = vision_hidden_states(model, batch, share_images)
    values, _ = completion_logprobs(model, hidden, batch["input_ids"], batch["completion_mask"], chunk_size=chunk_size)
    return _to_token_layout(values, batch["completion_mask"])


def last_token_states(hidden: Tensor, attention_mask: Tensor) -> Tensor:
    """``[rows, H]``: each right-padded row's state at its last attended token."""
    last = attention_mask.long().sum(-1) - 1
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


class VisionRewardScorer(nn.Module):
    """A vision-language model's backbone and a scalar head: batch → one reward per row (last token)."""

    def __init__(self, model: nn.Module, head: nn.Linear):
        super().__init__()
        self.model = model
        self.head = head

    def forward(self, batch: dict) -> Tensor:
        hidden = vision_hidden_states(self.model, batch)
        return self.head(last_token_states(hidden, batch["attention_mask"]).to(self.head.weight.dtype)).squeeze(-1)
