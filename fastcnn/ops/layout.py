"""The memory format fastcnn's ops write their outputs in, given an input: channels_last when
the input is laid out so (and is not also plain contiguous, as a 1x1 map or a single channel
is), else contiguous. The C++ kernels decide the same way (``kernel_format`` in
csrc/include/common.h); the extension's fake implementations and the layers whose backward
builds a gradient for such an op (``fastcnn.layers.pool``, ResNet's shortcut) use this."""
from __future__ import annotations

import torch


def kernel_format(x: torch.Tensor) -> torch.memory_format:
    if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format
