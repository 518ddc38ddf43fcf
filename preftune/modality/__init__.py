"""What differs between text and images: loading the model and its processor, reading rows, collation, the
hidden states the one log-prob module (:class:`CompletionLogprobs`) starts from, policy preparation and the
reference's cache key (:class:`.base.Modality`). A recipe asks :func:`modality_for` once and talks to the
answer only."""

from __future__ import annotations

from ..data.images import has_images
from ..data.load import load_records
from .base import Modality
from .logprobs import FLAT, SUMS, TOKENS, CompletionLogprobs, Logprobs, completion_lengths, sequence_sums
from .text import TEXT
from .vision import VISION


def modality_for(cfg) -> Modality:
    """Images when the config's training data has an image column or image parts, else text."""
    return modality_of_data(cfg.dataset, cfg.split)


def modality_of_data(source: str, split: str = "train") -> Modality:
    """Images when the rows of ``source`` have an image column or image parts, else text (read before any model)."""
    return VISION if has_images(load_records(str(source), split=split).rows) else TEXT


__all__ = ["FLAT", "SUMS", "TEXT", "TOKENS", "VISION", "CompletionLogprobs", "Logprobs", "Modality",
           "completion_lengths", "modality_for", "modality_of_data", "sequence_sums"]
