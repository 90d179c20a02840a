"""VGG-19 with batch norm for CIFAR (Simonyan & Zisserman, arXiv 1409.1556), as in
BIGBALLON/cifar-10-cnn ``Vgg19_keras``: 16 conv(bias) -> BN -> ReLU units (:class:`ConvBnAct`)
in five stages closed by 2x2 max-pools, then FC 4096 -> BN -> ReLU -> dropout twice and the
classifier. On 32x32 inputs the last pool leaves 1x1x512 features.
"""
from __future__ import annotations

from torch import nn

from ..layers import MaxPool2d, ConvBnAct, create_act
from ..layers.weight_init import init_he
from ..registry import register_model

CFG19 = [64, 64, "p", 128, 128, "p", 256, 256, 256, 256, "p", 512, 512, 512, 512, "p",
         512, 512, 512, 512, "p"]


class VGG(nn.Module):
    def __init__(self, cfg=CFG19, num_classes: int = 10, in_chans: int = 3, act="relu",
                 drop_rate: float = 0.5, img_size: int = 32):
        super().__init__()
        layers, chs, side = [], in_chans, img_size
        for v in cfg:
            if v == "p":
                layers.append(MaxPool2d(2, 2))
                side //= 2
            else:
                layers.append(ConvBnAct(chs, v, 3, bias=True, act=act))
                chs = v
        if side < 1:
            raise ValueError(f"vgg needs inputs of at least 32x32, got img_size={img_size}")
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(chs * side * side, 4096), nn.BatchNorm1d(4096), create_act(act), nn.Dropout(drop_rate),
            nn.Linear(4096, 4096), nn.BatchNorm1d(4096), create_act(act), nn.Dropout(drop_rate),
            nn.Linear(4096, num_classes),
        )
        init_he(self, mode="fan_in", layers=(nn.Conv2d, nn.Linear))

    def forward(self, x):
        return self.classifier(self.features(x))


@register_model(params=38_975_306, aliases=("vgg19_bn", "vgg"),
                reported="CIFAR-10 93.53% (BIGBALLON/cifar-10-cnn)",
                source="Simonyan & Zisserman, arXiv 1409.1556; BIGBALLON/cifar-10-cnn Vgg19_keras")
def vgg19(num_classes=10, in_chans=3, act="relu", drop_rate=0.5, img_size=32):
    return VGG(CFG19, num_classes, in_chans, act, drop_rate, img_size)
