"""ResNeXt-29 (Xie et al., arXiv 1611.05431) for CIFAR, as in prlz77/ResNeXt.pytorch and
BIGBALLON/cifar-10-cnn, and SE-ResNeXt-29 (Hu et al., arXiv 1709.01507).

Stem conv3x3(64)-BN-ReLU; three stages of three bottleneck blocks with outputs 256/512/1024
(stride 2 at the start of stages 2 and 3); global average pool; linear classifier. Block:
1x1 conv to D, **grouped** 3x3 conv (groups = cardinality), 1x1 conv to the output, each with
BN, with D = cardinality x 64 x 2^stage; shortcut = 1x1 conv-BN projection where the shape
changes. All convs are :class:`ConvBnAct` (the grouped one with ``groups=cardinality``); the
last one takes the shortcut through ``residual=`` and computes ``ReLU(BN(conv) + shortcut)``.

SE variant: the last conv is conv-BN only, then :class:`SqueezeExcite` (reduction 16) scales
the branch and closes the block, ``ReLU(SE(branch) + shortcut)``.
"""
from __future__ import annotations

from torch import nn

from ..layers import ConvBnAct, SqueezeExcite, GlobalAvgPool2d
from ..registry import register_model
from ..layers.weight_init import init_he


class ResNeXtBottleneck(nn.Module):
    def __init__(self, in_chs: int, out_chs: int, stride: int, cardinality: int, width: int,
                 act="relu", se: bool = False):
        super().__init__()
        self.conv1 = ConvBnAct(in_chs, width, 1, act=act)
        self.conv2 = ConvBnAct(width, width, 3, stride, groups=cardinality, act=act)
        self.conv3 = ConvBnAct(width, out_chs, 1, act=None if se else act)
        self.se = SqueezeExcite(out_chs, reduction=16, out_act=act) if se else None
        if stride != 1 or in_chs != out_chs:
            self.shortcut = ConvBnAct(in_chs, out_chs, 1, stride, act=None)
        else:
            self.shortcut = nn.Identity()

    def forward(self, x):
        shortcut = self.shortcut(x)
        out = self.conv2(self.conv1(x))
        if self.se is None:
            return self.conv3(out, residual=shortcut)
        return self.se(self.conv3(out), residual=shortcut)


class ResNeXt29(nn.Module):
    def __init__(self, cardinality: int, base_width: int = 64, num_classes: int = 10, in_chans: int = 3,
                 act="relu", se: bool = False, blocks_per_stage: int = 3):
        super().__init__()
        self.stem = ConvBnAct(in_chans, 64, 3, act=act)
        blocks, chs = [], 64
        for i, out_chs in enumerate((256, 512, 1024)):
            width = cardinality * base_width * 2 ** i
            for j in range(blocks_per_stage):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(ResNeXtBottleneck(chs, out_chs, stride, cardinality, width, act, se))
                chs = out_chs
        self.blocks = nn.Sequential(*blocks)
        self.pool = GlobalAvgPool2d()
        self.fc = nn.Linear(chs, num_classes)
        init_he(self)

    def forward(self, x):
        x = self.blocks(self.stem(x))
        return self.fc(self.pool(x).flatten(1))


_SRC = "Xie et al., arXiv 1611.05431; prlz77/ResNeXt.pytorch; BIGBALLON/cifar-10-cnn"


@register_model(params=17_562_442, aliases=("resnext29", "resnext29_4x64"),
                reported="CIFAR-10 95.19% (BIGBALLON/cifar-10-cnn)", source=_SRC)
def resnext29_4x64d(num_classes=10, in_chans=3, act="relu"):
    return ResNeXt29(4, 64, num_classes, in_chans, act)


@register_model(params=34_426_698, aliases=("resnext29_8x64",),
                reported="not reported by the seeds (paper: CIFAR-10 96.35%, via prlz77/ResNeXt.pytorch)",
                source=_SRC)
def resnext29_8x64d(num_classes=10, in_chans=3, act="relu"):
    return ResNeXt29(8, 64, num_classes, in_chans, act)


@register_model(params=18_084_250, aliases=("se_resnext29", "senet"),
                reported="CIFAR-10 95.60% (BIGBALLON/cifar-10-cnn)",
                source="Hu et al., arXiv 1709.01507; BIGBALLON/cifar-10-cnn SENet_keras")
def se_resnext29_4x64d(num_classes=10, in_chans=3, act="relu"):
    return ResNeXt29(4, 64, num_classes, in_chans, act, se=True)
