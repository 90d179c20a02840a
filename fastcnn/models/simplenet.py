"""SimpleNet v1 for CIFAR (Hasanpour et al., arXiv 1608.06037), following the official PyTorch
port Coderx7/SimpleNet_Pytorch ``Cifar/models/simplenet.py`` (cfgs ``simplenet_cifar_5m`` and
``simplenet_cifar_310k``) detail for detail:

* 13 conv -> BN -> ReLU units (:class:`ConvBnAct`), conv with bias, BN momentum 0.05 (PyTorch
  sense) and eps 1e-5; four 2x2 max-pools;
* the two 1x1 convolutions keep ``padding=1`` like the official code (each grows the feature
  map by 2 pixels; the parameter count does not change, the MACs do);
* global max-pool, then a linear classifier;
* Xavier-uniform conv weights with the ReLU gain.

Dropout2d sits where the official cfg puts it (after every pool and after the convs marked
0.0 there); the official default rate is 0.0, ``drop_rate`` sets it.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from ..layers import MaxPool2d, ConvBnAct
from ..registry import register_model

# (channels or "p", kernel, dropout after it?) as in the official cfgs; "p" = 2x2 max-pool.
CFGS = {
    "simplenet_cifar_5m": [
        (64, 3, True), (128, 3, True), (128, 3, True), (128, 3, False), ("p", 2, True),
        (128, 3, True), (128, 3, True), (256, 3, False), ("p", 2, True),
        (256, 3, True), (256, 3, False), ("p", 2, True),
        (512, 3, True), (2048, 1, True), (256, 1, False), ("p", 2, True),
        (256, 3, False),
    ],
    "simplenet_cifar_310k": [
        (64, 3, True), (32, 3, True), (32, 3, True), (32, 3, False), ("p", 2, True),
        (32, 3, True), (32, 3, True), (64, 3, False), ("p", 2, True),
        (64, 3, True), (64, 3, False), ("p", 2, True),
        (128, 3, True), (256, 1, True), (64, 1, False), ("p", 2, True),
        (64, 3, False),
    ],
}


def init_simplenet(model: nn.Module) -> None:
    """Official init: Xavier-uniform conv weights with gain ``calculate_gain('relu')``."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.xavier_uniform_(m.weight, gain=nn.init.calculate_gain("relu"))


class SimpleNetCifar(nn.Module):
    def __init__(self, cfg: str, num_classes: int = 10, in_chans: int = 3, act="relu",
                 drop_rate: float = 0.0):
        super().__init__()
        layers, chs = [], in_chans
        for width, k, drop in CFGS[cfg]:
            if width == "p":
                layers.append(MaxPool2d(2, 2))
            else:
                # padding=1 for the 1x1 convs too: the official quirk.
                layers.append(ConvBnAct(chs, width, k, 1, padding=1, bias=True, act=act,
                                        bn_momentum=0.05, bn_eps=1e-5))
                chs = width
            if drop:
                layers.append(nn.Dropout2d(drop_rate))
        self.features = nn.Sequential(*layers)
        self.drop_rate = drop_rate
        self.classifier = nn.Linear(chs, num_classes)
        init_simplenet(self)

    def forward(self, x):
        x = self.features(x)
        x = F.adaptive_max_pool2d(x, 1).flatten(1)  # global max-pool
        return self.classifier(x)


_SRC = "Coderx7/SimpleNet_Pytorch Cifar/models/simplenet.py; arXiv 1608.06037"


@register_model(params=5_498_378, aliases=("simplenet_5m", "simplenet_cifar_5m", "simplenetv1"),
                reported="CIFAR-10 94.75% (no augmentation) / 95.51% (crop+flip), CIFAR-100 78.37% "
                         "(official); 94% in 125 epochs (SimpleNet-Keras)",
                source=_SRC + " (cfg simplenet_cifar_5m)")
def simplenet(num_classes=10, in_chans=3, act="relu", drop_rate=0.0):
    return SimpleNetCifar("simplenet_cifar_5m", num_classes, in_chans, act, drop_rate)


@register_model(params=312_362, aliases=("simplenet_cifar_310k",),
                reported="CIFAR-10 91.98%, CIFAR-100 64.68% (official, slim 310K)",
                source=_SRC + " (cfg simplenet_cifar_310k)")
def simplenet_310k(num_classes=10, in_chans=3, act="relu", drop_rate=0.0):
    return SimpleNetCifar("simplenet_cifar_310k", num_classes, in_chans, act, drop_rate)
