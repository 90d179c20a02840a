"""Network in Network (Lin et al., arXiv 1312.4400) with batch norm, as in
BIGBALLON/cifar-10-cnn ``NIN_keras``: three mlpconv blocks (a k x k conv then two 1x1 convs,
each conv -> BN -> ReLU, :class:`ConvBnAct`), 3x3 stride-2 max-pool + dropout between
blocks, the last 1x1 conv to the classes (also BN + ReLU), global average pooling.
"""
from __future__ import annotations

from torch import nn

from ..layers import MaxPool2d, ConvBnAct, GlobalAvgPool2d
from ..layers.weight_init import init_he
from ..registry import register_model


class NIN(nn.Module):
    def __init__(self, num_classes: int = 10, in_chans: int = 3, act="relu", drop_rate: float = 0.5):
        super().__init__()

        def cbr(i, o, k):
            return ConvBnAct(i, o, k, bias=True, act=act)

        self.features = nn.Sequential(
            cbr(in_chans, 192, 5), cbr(192, 160, 1), cbr(160, 96, 1),
            MaxPool2d(3, 2, padding=1), nn.Dropout(drop_rate),
            cbr(96, 192, 5), cbr(192, 192, 1), cbr(192, 192, 1),
            MaxPool2d(3, 2, padding=1), nn.Dropout(drop_rate),
            cbr(192, 192, 3), cbr(192, 192, 1), cbr(192, num_classes, 1),
        )
        self.pool = GlobalAvgPool2d()
        init_he(self, mode="fan_in")

    def forward(self, x):
        return self.pool(self.features(x)).flatten(1)


@register_model(params=969_822, aliases=("network_in_network",),
                reported="CIFAR-10 91.63% (BIGBALLON/cifar-10-cnn)",
                source="Lin et al., arXiv 1312.4400; BIGBALLON/cifar-10-cnn NIN_keras")
def nin(num_classes=10, in_chans=3, act="relu", drop_rate=0.5):
    return NIN(num_classes, in_chans, act, drop_rate)
