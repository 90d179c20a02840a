"""How many bytes of tensors a forward pass leaves saved for backward, measured on any device.

Peak GPU memory needs a GPU; what autograd keeps between forward and backward does not. This
counts the distinct storages the autograd graph holds after a forward (parameters excluded:
they exist anyway), seen through saved-tensor hooks -- including the rebuild hooks of fused
models (:mod:`fastcnn.recompute`), so a tensor kept as a recipe counts nothing. It is what the
"one activation per layer" goal is about, and what the memory tests and benchmarks report.
"""
from __future__ import annotations

import torch
from torch import nn

from . import recompute


class SavedTensorCounter:
    """Context manager; ``.bytes`` and ``.tensors`` after (or during) the block."""

    def __init__(self, exclude: nn.Module | None = None):
        self._exclude = set()
        if exclude is not None:
            self._exclude = {p.untyped_storage().data_ptr() for p in exclude.parameters()}
            self._exclude |= {b.untyped_storage().data_ptr() for b in exclude.buffers()}
        self._storages: dict[int, int] = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._record, lambda t: t)

    def _record(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in self._exclude and storage.nbytes() > 0:
            self._storages[ptr] = storage.nbytes()
        return t

    @property
    def bytes(self) -> int:
        return sum(self._storages.values())

    @property
    def tensors(self) -> int:
        return len(self._storages)

    def __enter__(self):
        self._hooks.__enter__()
        recompute.set_observer(self._record)
        return self

    def __exit__(self, *exc):
        recompute.set_observer(None)
        return self._hooks.__exit__(*exc)


def saved_bytes(model: nn.Module, *inputs, backward: bool = True) -> int:
    """Bytes of non-parameter tensors that ``model(*inputs)`` keeps for backward. Runs the
    backward too (``backward=True``) so that buffers are freed and the step is complete."""
    with SavedTensorCounter(exclude=model) as counter:
        out = model(*inputs)
    if backward:
        out.float().sum().backward()
    return counter.bytes
