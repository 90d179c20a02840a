"""Pooling layers with a leaner backward in fused models.

* :class:`MaxPool2d` keeps no indices for backward (below).
* :class:`GlobalAvgPool2d` gives its input gradient in the input's memory format.


``nn.MaxPool2d`` in training saves its input and an int64 index per output element: for a
2x2 pool, half as many bytes as its fp32 input again. In a fused model the input is usually a
rebuildable BN+activation output (:mod:`fastcnn.recompute`), kept as a recipe, so the indices
are most of what the pool costs. Fused, this pool saves only its input and recomputes the
indices in backward with the same ``max_pool2d_with_indices`` op eager PyTorch uses, so the
gradient is routed identically (ties included). Unfused, it is ``nn.MaxPool2d``.

``nn.AdaptiveAvgPool2d(1)`` backward (``mean``'s: an expanded gradient divided by H*W) hands the
last layer an NCHW gradient even when the model runs channels_last; the fused kernels read
their gradient in their input's layout, so that gradient was copied once more (a full pass
over the last feature map). Fused, :class:`GlobalAvgPool2d` writes it channels_last directly.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.utils import _pair

from ..ops.layout import kernel_format


class _MaxPoolRecomputeIndices(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, kernel_size, stride, padding, dilation, ceil_mode):
        ctx.geometry = (_pair(kernel_size), _pair(stride), _pair(padding), _pair(dilation), ceil_mode)
        ctx.save_for_backward(x)
        return F.max_pool2d(x, kernel_size, stride, padding, dilation, ceil_mode)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        kernel, stride, padding, dilation, ceil_mode = ctx.geometry
        # [1]: the recomputed pool output is freed at once, so the backward's peak is eager's
        indices = torch.ops.aten.max_pool2d_with_indices(x, kernel, stride, padding, dilation, ceil_mode)[1]
        grad_x = torch.ops.aten.max_pool2d_with_indices_backward(grad, x, kernel, stride, padding, dilation,
                                                                  ceil_mode, indices)
        return grad_x, None, None, None, None, None


class MaxPool2d(nn.MaxPool2d):
    """``nn.MaxPool2d``; with ``fused=True`` (set by :func:`fastcnn.set_fused`) it recomputes
    its indices in backward instead of keeping them."""

    fused: bool = False
    single_op = True  # one op: set_fused gives a lone pool no rebuild hooks

    def forward(self, x):
        if not self.fused or self.return_indices or not (torch.is_grad_enabled() and x.requires_grad):
            return super().forward(x)
        return _MaxPoolRecomputeIndices.apply(x, self.kernel_size, self.stride, self.padding, self.dilation,
                                              self.ceil_mode)


class _GlobalAvgPool(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.shape, ctx.format = x.shape, kernel_format(x)
        return x.mean(dim=(2, 3), keepdim=True)

    @staticmethod
    def backward(ctx, grad):
        n, c, h, w = ctx.shape
        return (grad / (h * w)).expand(n, c, h, w).contiguous(memory_format=ctx.format)


class GlobalAvgPool2d(nn.AdaptiveAvgPool2d):
    """``nn.AdaptiveAvgPool2d(1)``; with ``fused=True`` its input gradient comes in the input's
    memory format (one pass) instead of NCHW (which the next kernel had to copy)."""

    fused: bool = False
    single_op = True  # one op: set_fused gives a lone pool no rebuild hooks

    def __init__(self):
        super().__init__(1)

    def forward(self, x):
        if not self.fused or not (torch.is_grad_enabled() and x.requires_grad) or x.dim() != 4:
            return super().forward(x)
        return _GlobalAvgPool.apply(x)
