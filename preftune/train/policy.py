"""A causal LM seen as a function from token ids to per-token log-probs of its completions.

The loop prepares (and, under data parallelism, wraps) this module rather than the bare language
model, so that the forward that computes chunked log-probs is the one the distributed wrapper sees.
"""

from __future__ import annotations

import torch
from torch import nn

from ..logprobs import token_logprobs


class PolicyLogprobs(nn.Module):
    def __init__(self, model: nn.Module, chunk_size: int = 1024):
        super().__init__()
        self.model = model
        self.chunk_size = chunk_size

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                completion_mask: torch.Tensor) -> torch.Tensor:
        return token_logprobs(self.model, input_ids, attention_mask, completion_mask, chunk_size=self.chunk_size)
