"""ResNet-164: the pre-activation bottleneck ResNet of He et al. "Identity Mappings in Deep
Residual Networks" (arXiv 1603.05027) for CIFAR: a 3x3 stem with 16 channels, three stages of
18 bottleneck units (BN-ReLU-1x1, BN-ReLU-3x3, BN-ReLU-1x1 to 4x the bottleneck width:
64/128/256 channels), a final BN-ReLU, global average pool and a linear classifier.

Each BN-ReLU-conv is a :class:`BnActConv` (fused: the BN+ReLU is the prologue of the conv, so
only the conv input before BN is saved). The first unit of a stage has a 1x1 projection
shortcut that, as in the paper's code, reads the pre-activated input; there the shared
BN-ReLU is a :class:`BnAct` feeding both the first conv and the projection. As in the paper's
code (KaimingHe/resnet-1k-layers ``resnet-pre-act.lua``) the stride sits on the first 1x1 conv.
"""
from __future__ import annotations

from torch import nn

from ..layers import BnAct, BnActConv, GlobalAvgPool2d
from ..registry import register_model
from ..layers.weight_init import init_he


class PreActBottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_chs: int, planes: int, stride: int = 1, act="relu"):
        super().__init__()
        out_chs = planes * self.expansion
        self.project = stride != 1 or in_chs != out_chs
        if self.project:
            self.preact = BnAct(in_chs, act=act)
            self.conv1 = nn.Conv2d(in_chs, planes, 1, stride, bias=False)
            self.shortcut = nn.Conv2d(in_chs, out_chs, 1, stride, bias=False)
        else:
            self.conv1 = BnActConv(in_chs, planes, 1, stride, act=act)
        self.conv2 = BnActConv(planes, planes, 3, act=act)
        self.conv3 = BnActConv(planes, out_chs, 1, act=act)

    def forward(self, x):
        if self.project:
            x = self.preact(x)
            shortcut = self.shortcut(x)
        else:
            shortcut = x
        return self.conv3(self.conv2(self.conv1(x)), residual=shortcut)


class PreActNet(nn.Module):
    """The frame shared by the pre-activation nets (ResNet-164, Wide ResNets): a 3x3 stem with
    16 channels, the blocks, a final BN-activation, global average pool and a linear layer."""

    def __init__(self, blocks: list, chs: int, num_classes: int, in_chans: int, act):
        super().__init__()
        self.stem = nn.Conv2d(in_chans, 16, 3, padding=1, bias=False)
        self.blocks = nn.Sequential(*blocks)
        self.final = BnAct(chs, act=act)
        self.pool = GlobalAvgPool2d()
        self.fc = nn.Linear(chs, num_classes)
        init_he(self)

    def forward(self, x):
        x = self.final(self.blocks(self.stem(x)))
        return self.fc(self.pool(x).flatten(1))


class PreActResNet(PreActNet):
    def __init__(self, depth: int, num_classes: int = 10, in_chans: int = 3, act="relu"):
        if (depth - 2) % 9:
            raise ValueError(f"pre-activation bottleneck ResNet depth must be 9n+2, got {depth}")
        n = (depth - 2) // 9
        blocks, chs = [], 16
        for i, planes in enumerate((16, 32, 64)):
            for j in range(n):
                blocks.append(PreActBottleneck(chs, planes, 2 if (i > 0 and j == 0) else 1, act))
                chs = planes * PreActBottleneck.expansion
        super().__init__(blocks, chs, num_classes, in_chans, act)


@register_model(params=1_703_258, aliases=("preact_resnet164", "resnet164_preact"),
                reported="CIFAR-10 93.18% ('Residual-Network50', 1.7M, BIGBALLON/cifar-10-cnn)",
                source="He et al., arXiv 1603.05027 (pre-activation bottleneck, CIFAR)")
def resnet164(num_classes=10, in_chans=3, act="relu"):
    return PreActResNet(164, num_classes, in_chans, act)
