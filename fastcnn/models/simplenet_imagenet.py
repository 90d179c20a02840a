"""The ImageNet-style SimpleNet v1 variants of Coderx7/SimpleNet_Pytorch (``ImageNet models``
and the full ``simplenet.py``; also in timm): 13 conv-BN-ReLU units with two 2x2 max-pools,
the two 1x1 convolutions keeping ``padding=1``, global max-pool, linear classifier. Early
layers stride 2 to shrink 224x224 inputs: mode m1 on layers 0, 1, 2; mode m2 on layers 0, 1, 3
(layer indices count the pools). ``scale`` multiplies the widths (``round``).

Default 1000 classes at 224x224; because the 1x1 convs pad, the nets also run on 32x32
CIFAR images (three stride-2 convs in both modes: 32 -> 4, pools to 2 and 1; the smallest
input is 25x25, checked by the tests).
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from ..layers import MaxPool2d, ConvBnAct
from ..registry import register_model
from .simplenet import init_simplenet

# (channels or "p", kernel); official cfgs "simplenetv1_imagenet" and "simplenetv1_imagenet_9m".
CFGS = {
    "5m": [(64, 3), (128, 3), (128, 3), (128, 3), (128, 3), (128, 3), ("p", 2), (256, 3),
           (256, 3), (256, 3), (512, 3), ("p", 2), (2048, 1), (256, 1), (256, 3)],
    "9m": [(128, 3), (192, 3), (192, 3), (192, 3), (192, 3), (192, 3), ("p", 2), (320, 3),
           (320, 3), (320, 3), (640, 3), ("p", 2), (2560, 1), (320, 1), (320, 3)],
}
STRIDES = {1: {0: 2, 1: 2, 2: 2}, 2: {0: 2, 1: 2, 2: 1, 3: 2}}


class SimpleNetImageNet(nn.Module):
    def __init__(self, cfg: str, mode: int, scale: float = 1.0, num_classes: int = 1000,
                 in_chans: int = 3, act="relu", drop_rate: float = 0.0):
        super().__init__()
        if mode not in STRIDES:
            raise ValueError(f"mode must be one of {sorted(STRIDES)}, got {mode!r}")
        layers, chs = [], in_chans
        for idx, (width, k) in enumerate(CFGS[cfg]):
            stride = STRIDES[mode].get(idx, 1 if width != "p" else 2)
            if width == "p":
                layers.append(MaxPool2d(2, stride))
            else:
                out = round(width * scale)
                layers.append(ConvBnAct(chs, out, k, stride, padding=1, bias=True, act=act,
                                        bn_momentum=0.05, bn_eps=1e-5))
                chs = out
            layers.append(nn.Dropout2d(drop_rate))
        self.features = nn.Sequential(*layers)
        self.drop_rate = drop_rate
        self.classifier = nn.Linear(chs, num_classes)
        init_simplenet(self)

    def forward(self, x):
        x = self.features(x)
        x = F.adaptive_max_pool2d(x, 1).flatten(1)
        x = F.dropout(x, self.drop_rate, self.training)
        return self.classifier(x)


_SRC = "Coderx7/SimpleNet_Pytorch ImageNet models/simplenet.py (also timm simplenet)"
_IN = dict(input_size=(3, 224, 224), num_classes=1000, source=_SRC)


def _make(cfg, mode, scale, num_classes, in_chans, act, drop_rate):
    return SimpleNetImageNet(cfg, mode, scale, num_classes, in_chans, act, drop_rate)


@register_model(params=5_752_808, reported="not reported by the seeds (m2 variant: ImageNet top-1 72.03%)", **_IN)
def simplenetv1_5m_m1(num_classes=1000, in_chans=3, act="relu", drop_rate=0.0):
    return _make("5m", 1, 1.0, num_classes, in_chans, act, drop_rate)


@register_model(params=5_752_808, reported="ImageNet top-1 72.03% / top-5 90.32%", **_IN)
def simplenetv1_5m_m2(num_classes=1000, in_chans=3, act="relu", drop_rate=0.0):
    return _make("5m", 2, 1.0, num_classes, in_chans, act, drop_rate)


@register_model(params=9_508_968, reported="not reported by the seeds (m2 variant: ImageNet top-1 74.23%)", **_IN)
def simplenetv1_9m_m1(num_classes=1000, in_chans=3, act="relu", drop_rate=0.0):
    return _make("9m", 1, 1.0, num_classes, in_chans, act, drop_rate)


@register_model(params=9_508_968, reported="ImageNet top-1 74.23% / top-5 91.75%", **_IN)
def simplenetv1_9m_m2(num_classes=1000, in_chans=3, act="relu", drop_rate=0.0):
    return _make("9m", 2, 1.0, num_classes, in_chans, act, drop_rate)


@register_model(params=1_506_792, reported="not reported by the seeds (m2 variant: ImageNet top-1 61.67%)", **_IN)
def simplenetv1_small_m1_05(num_classes=1000, in_chans=3, act="relu", drop_rate=0.0):
    return _make("5m", 1, 0.5, num_classes, in_chans, act, drop_rate)


@register_model(params=1_506_792, reported="ImageNet top-1 61.67% / top-5 83.49%", **_IN)
def simplenetv1_small_m2_05(num_classes=1000, in_chans=3, act="relu", drop_rate=0.0):
    return _make("5m", 2, 0.5, num_classes, in_chans, act, drop_rate)


@register_model(params=3_287_272, reported="not reported by the seeds (m2 variant: ImageNet top-1 68.51%)", **_IN)
def simplenetv1_small_m1_075(num_classes=1000, in_chans=3, act="relu", drop_rate=0.0):
    return _make("5m", 1, 0.75, num_classes, in_chans, act, drop_rate)


@register_model(params=3_287_272, reported="ImageNet top-1 68.51% / top-5 88.15%", **_IN)
def simplenetv1_small_m2_075(num_classes=1000, in_chans=3, act="relu", drop_rate=0.0):
    return _make("5m", 2, 0.75, num_classes, in_chans, act, drop_rate)
