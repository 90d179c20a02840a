"""DenseNet-BC (Huang et al., arXiv 1608.06993) for CIFAR: a 3x3 stem with 2k channels, three
dense blocks of (depth - 4) / 6 bottleneck layers (BN-ReLU-1x1 conv to 4k, BN-ReLU-3x3 conv to
k, output concatenated to the input), transitions BN-ReLU-1x1 conv (compression 0.5) + 2x2
average pool, a final BN-ReLU, global average pool and a linear classifier.

Every BN-ReLU-conv is a :class:`BnActConv`. The network concatenates its list of feature maps
where a layer needs them; fused, the concatenations and BN+ReLU outputs are rebuilt in backward
(:mod:`fastcnn.recompute`), so a layer keeps only its new features and its bottleneck output.
``drop_rate`` adds dropout after each conv, as the paper does without augmentation (0.2).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import recompute
from ..layers import BnAct, BnActConv, GlobalAvgPool2d
from ..registry import register_model
from ..layers.weight_init import init_he


class DenseLayer(nn.Module):
    def __init__(self, in_chs: int, growth: int, act="relu", drop_rate: float = 0.0):
        super().__init__()
        self.conv1 = BnActConv(in_chs, 4 * growth, 1, act=act)
        self.conv2 = BnActConv(4 * growth, growth, 3, act=act)
        self.drop_rate = drop_rate

    def new_features(self, x):
        """The ``growth`` channels this layer adds to its input."""
        out = F.dropout(self.conv1(x), self.drop_rate, self.training)
        return F.dropout(self.conv2(out), self.drop_rate, self.training)

    def forward(self, x):
        return torch.cat([x, self.new_features(x)], 1)


class Transition(nn.Module):
    def __init__(self, in_chs: int, out_chs: int, act="relu", drop_rate: float = 0.0):
        super().__init__()
        self.conv = BnActConv(in_chs, out_chs, 1, act=act)
        self.pool = nn.AvgPool2d(2)
        self.drop_rate = drop_rate

    def forward(self, x):
        return self.pool(F.dropout(self.conv(x), self.drop_rate, self.training))


class DenseNetBC(nn.Module):
    def __init__(self, depth: int, growth: int, num_classes: int = 10, in_chans: int = 3, act="relu",
                 drop_rate: float = 0.0, compression: float = 0.5):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"DenseNet-BC depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        chs = 2 * growth
        self.stem = nn.Conv2d(in_chans, chs, 3, padding=1, bias=False)
        stages = []
        for i in range(3):
            for _ in range(n):
                stages.append(DenseLayer(chs, growth, act, drop_rate))
                chs += growth
            if i < 2:
                out = int(chs * compression)
                stages.append(Transition(chs, out, act, drop_rate))
                chs = out
        self.features = nn.Sequential(*stages)
        self.final = BnAct(chs, act=act)
        self.pool = GlobalAvgPool2d()
        self.fc = nn.Linear(chs, num_classes)
        init_he(self)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x):
        # The network keeps the list of feature maps and concatenates them where a layer needs
        # its input; fused, those concatenations are rebuilt in backward from the parts
        # (fastcnn.recompute.cat), so memory grows with the depth, not its square.
        parts = [self.stem(x)]
        for layer in self.features:
            if isinstance(layer, DenseLayer):
                parts.append(layer.new_features(recompute.cat(parts)))
            else:
                parts = [layer(recompute.cat(parts))]
        x = self.final(recompute.cat(parts))
        return self.fc(self.pool(x).flatten(1))


_SRC = "Huang et al., arXiv 1608.06993; BIGBALLON/cifar-10-cnn; liuzhuang13/DenseNet"


@register_model(params=769_162, aliases=("densenet100", "densenet_bc_100"),
                reported="CIFAR-10 94.91% (BIGBALLON/cifar-10-cnn)", source=_SRC)
def densenet_bc_100_12(num_classes=10, in_chans=3, act="relu", drop_rate=0.0):
    return DenseNetBC(100, 12, num_classes, in_chans, act, drop_rate)


@register_model(params=3_020_506, reported="CIFAR-10 95.30% (BIGBALLON/cifar-10-cnn)", source=_SRC)
def densenet_bc_100_24(num_classes=10, in_chans=3, act="relu", drop_rate=0.0):
    return DenseNetBC(100, 24, num_classes, in_chans, act, drop_rate)


@register_model(params=6_831_466, aliases=("densenet160",),
                reported="CIFAR-10 95.90% (BIGBALLON/cifar-10-cnn)", source=_SRC)
def densenet_bc_160_24(num_classes=10, in_chans=3, act="relu", drop_rate=0.0):
    return DenseNetBC(160, 24, num_classes, in_chans, act, drop_rate)
