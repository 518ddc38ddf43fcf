"""Bytes autograd keeps for the backward pass (activation memory), counted once per storage."""

from contextlib import contextmanager

import torch


class SavedBytes:
    """Inside :meth:`counting`, every tensor saved for the backward that is not a parameter of ``model``."""

    def __init__(self, model: torch.nn.Module):
        self.skip = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.seen: dict[int, int] = {}

    @property
    def total(self) -> int:
        return sum(self.seen.values())

    def pack(self, tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in self.skip:
            self.seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    @contextmanager
    def counting(self):
        with torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t):
            yield self
