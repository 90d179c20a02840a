"""CIFAR ResNets of He et al. (arXiv 1512.03385, section 4.2): a 3x3 stem with 16 channels,
three stages of ``n`` basic blocks (16/32/64 channels), global average pool and a linear
classifier; depth = 6n + 2. Shortcuts are option A (parameter-free: subsample with the stride
and zero-pad the new channels), which gives the 0.27M / 0.46M / 0.85M / 1.7M counts of the
paper.

Each block is two :class:`ConvBnAct` units; the second computes ``act(BN(conv(x)) + shortcut)``
through its ``residual=`` argument, so the fused kernel takes the add and the ReLU into its
epilogue. Fused, a block keeps its two conv outputs for backward; the block output is rebuilt
from the second one and the block input's recipe (:mod:`fastcnn.recompute`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..layers import ConvBnAct, GlobalAvgPool2d
from ..ops.layout import kernel_format
from ..layers.weight_init import init_he
from ..registry import register_model


class _ShortcutA(torch.autograd.Function):
    """The option-A shortcut with a backward that writes the input gradient in the input's
    memory format: autograd's own (slice and pad backward) builds it NCHW, and the block's
    fused BN+activation backward, which reads its gradient in its input's layout, had to copy
    it (one extra pass over a full feature map at every stage transition)."""

    @staticmethod
    def forward(ctx, x, stride: int, pad_lo: int, pad_hi: int):
        ctx.shape, ctx.geometry, ctx.format = x.shape, (stride, pad_lo, pad_hi), kernel_format(x)
        return _shortcut_a(x, stride, pad_lo, pad_hi)

    @staticmethod
    def backward(ctx, grad):
        stride, pad_lo, pad_hi = ctx.geometry
        grad_x = torch.empty(ctx.shape, dtype=grad.dtype, device=grad.device, memory_format=ctx.format).zero_()
        grad_x[:, :, ::stride, ::stride] = grad[:, pad_lo:grad.shape[1] - pad_hi]
        return grad_x, None, None, None


def _shortcut_a(x, stride: int, pad_lo: int, pad_hi: int):
    if stride > 1:
        x = x[:, :, ::stride, ::stride]
    if pad_lo or pad_hi:
        x = F.pad(x, (0, 0, 0, 0, pad_lo, pad_hi))
    return x


class ShortcutA(nn.Module):
    """Option-A identity shortcut: ``x[:, :, ::s, ::s]`` zero-padded to ``out_chs`` channels.

    Fused, its output is kept (not marked rebuildable, though it could be): it cuts the chain
    of block-output recipes (:mod:`fastcnn.recompute`) at each stage, so the first rebuild in
    a stage's backward does not also rebuild the previous, larger stage's outputs (measured:
    ResNet-20 step peak at batch 16 0.65x eager with the cut, 0.79x without). Fused, its
    backward also keeps the input's memory format (:class:`_ShortcutA`)."""

    fused: bool = False

    def __init__(self, in_chs: int, out_chs: int, stride: int):
        super().__init__()
        self.stride, self.pad = stride, out_chs - in_chs

    def forward(self, x):
        pad_lo, pad_hi = self.pad // 2, self.pad - self.pad // 2
        if self.fused and torch.is_grad_enabled() and x.requires_grad:
            return _ShortcutA.apply(x, self.stride, pad_lo, pad_hi)
        return _shortcut_a(x, self.stride, pad_lo, pad_hi)


class BasicBlock(nn.Module):
    def __init__(self, in_chs: int, out_chs: int, stride: int = 1, act="relu"):
        super().__init__()
        self.conv1 = ConvBnAct(in_chs, out_chs, 3, stride, act=act)
        self.conv2 = ConvBnAct(out_chs, out_chs, 3, 1, act=act)
        if stride != 1 or in_chs != out_chs:
            self.shortcut = ShortcutA(in_chs, out_chs, stride)
        else:
            self.shortcut = nn.Identity()

    def forward(self, x):
        return self.conv2(self.conv1(x), residual=self.shortcut(x))


class CifarResNet(nn.Module):
    def __init__(self, depth: int, num_classes: int = 10, in_chans: int = 3, act="relu",
                 widths=(16, 32, 64)):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.stem = ConvBnAct(in_chans, widths[0], 3, act=act)
        blocks, chs = [], widths[0]
        for i, w in enumerate(widths):
            for j in range(n):
                blocks.append(BasicBlock(chs, w, 2 if (i > 0 and j == 0) else 1, act))
                chs = w
        self.blocks = nn.Sequential(*blocks)
        self.pool = GlobalAvgPool2d()
        self.fc = nn.Linear(chs, num_classes)
        init_he(self)

    def forward(self, x):
        x = self.pool(self.blocks(self.stem(x))).flatten(1)
        return self.fc(x)


_SRC = "He et al., arXiv 1512.03385 (CIFAR, option A); BIGBALLON/cifar-10-cnn"


@register_model(params=269_722, reported="CIFAR-10 91.82% (BIGBALLON/cifar-10-cnn)", source=_SRC)
def resnet20(num_classes=10, in_chans=3, act="relu"):
    return CifarResNet(20, num_classes, in_chans, act)


@register_model(params=464_154, reported="CIFAR-10 92.68% (BIGBALLON/cifar-10-cnn)", source=_SRC)
def resnet32(num_classes=10, in_chans=3, act="relu"):
    return CifarResNet(32, num_classes, in_chans, act)


@register_model(params=853_018, reported="not reported by the seeds", source=_SRC)
def resnet56(num_classes=10, in_chans=3, act="relu"):
    return CifarResNet(56, num_classes, in_chans, act)


@register_model(params=1_727_962, reported="CIFAR-10 93.93% (BIGBALLON/cifar-10-cnn)", source=_SRC)
def resnet110(num_classes=10, in_chans=3, act="relu"):
    return CifarResNet(110, num_classes, in_chans, act)
