"""ShatheNet v1.0 / v1.1 / v1.2 (Shathe/DeepLearning ``ShatheNet/models/ShatheNet.py``, Keras):
small plain nets of conv+bias+ReLU (no BN; :class:`ConvAct`) with 'same' padding, 2x2 max-pools,
flatten and two dense layers. The source trains on images upsampled from CIFAR's 32x32, so the
models take 32x32 input and resize it inside (bilinear) to ``img_size`` (default 64, where the
parameter counts of the spec hold; the flatten size depends on it). ``img_size=None`` feeds the
input as is. As in the source, v1.2's second conv has no activation.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from ..layers import MaxPool2d, ConvAct, create_act
from ..layers.weight_init import init_he
from ..registry import register_model

# (out, kernel, stride, activated?) or "p" (2x2 max-pool, floor like Keras 'valid').
CFGS = {
    "v1_0": [(16, 7, 6, True), (16, 5, 4, True), (32, 3, 2, True), "p"],
    "v1_1": [(32, 5, 1, True)] * 3 + ["p"] + [(64, 3, 1, True)] * 3 + ["p", (64, 3, 1, True), "p"]
            + [(64, 5, 1, True)] * 2 + ["p", (64, 5, 1, True), (128, 3, 1, True), "p"]
            + [(128, 3, 1, True)] * 3 + ["p"],
    "v1_2": [(32, 7, 2, True), (32, 7, 1, False), "p", (64, 5, 2, True), (64, 5, 1, True), "p",
             (128, 3, 2, True), (128, 3, 1, True), "p"],
}
HIDDEN = {"v1_0": 32, "v1_1": 512, "v1_2": 256}


class ShatheNet(nn.Module):
    def __init__(self, version: str, num_classes: int = 10, in_chans: int = 3, act="relu",
                 img_size: int | None = 64, input_size: int = 32):
        super().__init__()
        self.img_size = img_size
        side = img_size if img_size is not None else input_size
        layers, chs = [], in_chans
        for spec in CFGS[version]:
            if spec == "p":
                layers.append(MaxPool2d(2))
                side //= 2
            else:
                out, k, s, activated = spec
                # Keras 'same' with stride s gives ceil(n / s); padding k//2 gives the same size
                # for these odd kernels.
                layers.append(ConvAct(chs, out, k, s, padding=k // 2, act=act if activated else None))
                side = (side + 2 * (k // 2) - k) // s + 1
                chs = out
        if side < 1:
            raise ValueError(f"shathenet_{version}: input {img_size or input_size} is too small")
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(chs * side * side, HIDDEN[version]),
                                        create_act(act), nn.Linear(HIDDEN[version], num_classes))
        init_he(self, mode="fan_in", layers=(nn.Conv2d, nn.Linear))

    def forward(self, x):
        if self.img_size is not None and tuple(x.shape[-2:]) != (self.img_size, self.img_size):
            x = F.interpolate(x, size=(self.img_size, self.img_size), mode="bilinear", align_corners=False)
        return self.classifier(self.features(x))


_SRC = "Shathe/DeepLearning ShatheNet/models/ShatheNet.py (Keras)"


@register_model(params=14_810, reported="CIFAR-10 59% (60 epochs)", source=_SRC, aliases=("shathenet",))
def shathenet_v1_0(num_classes=10, in_chans=3, act="relu", img_size=64):
    return ShatheNet("v1_0", num_classes, in_chans, act, img_size)


@register_model(params=1_078_154, reported="CIFAR-10 74% (augmentation, 70 epochs)", source=_SRC)
def shathenet_v1_1(num_classes=10, in_chans=3, act="relu", img_size=64):
    return ShatheNet("v1_1", num_classes, in_chans, act, img_size)


@register_model(params=465_706, reported="not reported (the seed's table leaves it blank)", source=_SRC)
def shathenet_v1_2(num_classes=10, in_chans=3, act="relu", img_size=64):
    return ShatheNet("v1_2", num_classes, in_chans, act, img_size)
