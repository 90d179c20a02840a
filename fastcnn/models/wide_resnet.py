"""Wide ResNets (Zagoruyko & Komodakis, arXiv 1605.07146) for CIFAR: WRN-d-k has a 3x3 stem
with 16 channels, three stages of n = (d - 4) / 6 pre-activation basic blocks of widths
16k/32k/64k, a final BN-ReLU, global average pool and a linear classifier.

Block: BN-ReLU-conv3x3, BN-ReLU-(dropout)-conv3x3, + shortcut. Each BN-ReLU-conv is a
:class:`BnActConv`; where the width or stride changes the shortcut is a 1x1 projection of the
pre-activated input, whose BN-ReLU is then a :class:`BnAct` shared by the first conv and the
projection. With ``drop_rate > 0`` (the paper uses 0.3) dropout sits between the second
BN-ReLU and its conv; the unit then runs as its BN-ReLU half (fused or not, same parameters)
followed by dropout and its convolution.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from ..layers import BnAct, BnActConv
from ..registry import register_model
from .preact_resnet import PreActNet


class WideBasic(nn.Module):
    def __init__(self, in_chs: int, out_chs: int, stride: int = 1, act="relu", drop_rate: float = 0.0):
        super().__init__()
        self.project = stride != 1 or in_chs != out_chs
        if self.project:
            self.preact = BnAct(in_chs, act=act)
            self.conv1 = nn.Conv2d(in_chs, out_chs, 3, stride, 1, bias=False)
            self.shortcut = nn.Conv2d(in_chs, out_chs, 1, stride, bias=False)
        else:
            self.conv1 = BnActConv(in_chs, out_chs, 3, stride, act=act)
        self.conv2 = BnActConv(out_chs, out_chs, 3, act=act)
        self.drop_rate = drop_rate

    def forward(self, x):
        if self.project:
            h = self.preact(x)
            shortcut = self.shortcut(h)
            out = self.conv1(h)
            del h  # from here only the convolutions' saved copies (recipes, fused) need it
        else:
            shortcut = x
            out = self.conv1(x)
        if self.drop_rate > 0 and self.training:
            # BN-ReLU half of conv2 (BnAct.forward reads the same bn/act/fused attributes),
            # dropout, then the convolution and the residual add.
            h = BnAct.forward(self.conv2, out)
            h = F.dropout(h, self.drop_rate, training=True)
            return self.conv2.conv(h) + shortcut
        return self.conv2(out, residual=shortcut)


class WideResNet(PreActNet):
    def __init__(self, depth: int, widen: int, num_classes: int = 10, in_chans: int = 3, act="relu",
                 drop_rate: float = 0.0):
        if (depth - 4) % 6:
            raise ValueError(f"WRN depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        blocks, chs = [], 16
        for i, w in enumerate((16 * widen, 32 * widen, 64 * widen)):
            for j in range(n):
                blocks.append(WideBasic(chs, w, 2 if (i > 0 and j == 0) else 1, act, drop_rate))
                chs = w
        super().__init__(blocks, chs, num_classes, in_chans, act)


_SRC = "Zagoruyko & Komodakis, arXiv 1605.07146; BIGBALLON/cifar-10-cnn"


@register_model(params=10_961_370, aliases=("wrn_16_8", "wide_resnet16_8"),
                reported="CIFAR-10 95.13% (BIGBALLON/cifar-10-cnn)", source=_SRC)
def wrn16_8(num_classes=10, in_chans=3, act="relu", drop_rate=0.0):
    return WideResNet(16, 8, num_classes, in_chans, act, drop_rate)


@register_model(params=36_479_194, aliases=("wrn_28_10", "wide_resnet28_10"),
                reported="CIFAR-10 95.78% (BIGBALLON/cifar-10-cnn)", source=_SRC)
def wrn28_10(num_classes=10, in_chans=3, act="relu", drop_rate=0.0):
    return WideResNet(28, 10, num_classes, in_chans, act, drop_rate)
