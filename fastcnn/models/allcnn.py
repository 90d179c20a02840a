"""All-CNN-C (Springenberg et al., "Striving for Simplicity", arXiv 1412.6806, table 2):
nine convolutions with bias + ReLU and no BN, stride-2 convolutions in place of pooling, a
valid 3x3 conv, two 1x1 convs (the last one to the classes, also followed by ReLU as in the
paper), then global average pooling. Every conv is a conv+bias+act unit (:class:`ConvAct`).

Dropout as the paper trains it: 20% on the input, 50% after each stride-2 conv
(``input_drop_rate`` / ``drop_rate``; 0 disables).
"""
from __future__ import annotations

from torch import nn

from ..layers import ConvAct, GlobalAvgPool2d
from ..layers.weight_init import init_he
from ..registry import register_model


class AllCNNC(nn.Module):
    def __init__(self, num_classes: int = 10, in_chans: int = 3, act="relu",
                 drop_rate: float = 0.5, input_drop_rate: float = 0.2):
        super().__init__()
        self.features = nn.Sequential(
            nn.Dropout(input_drop_rate),
            ConvAct(in_chans, 96, 3, act=act),
            ConvAct(96, 96, 3, act=act),
            ConvAct(96, 96, 3, 2, act=act),
            nn.Dropout(drop_rate),
            ConvAct(96, 192, 3, act=act),
            ConvAct(192, 192, 3, act=act),
            ConvAct(192, 192, 3, 2, act=act),
            nn.Dropout(drop_rate),
            ConvAct(192, 192, 3, padding=0, act=act),
            ConvAct(192, 192, 1, act=act),
            ConvAct(192, num_classes, 1, act=act),
        )
        self.pool = GlobalAvgPool2d()
        init_he(self, mode="fan_in")

    def forward(self, x):
        return self.pool(self.features(x)).flatten(1)


@register_model(params=1_369_738, aliases=("allcnn", "all_cnn_c"),
                reported="CIFAR-10 92.75% (paper, as listed by SimpleNet); >90% after 350 epochs "
                         "(All-CNN-Keras)",
                source="Springenberg et al., arXiv 1412.6806 (All-CNN-C); All-CNN-Keras")
def allcnn_c(num_classes=10, in_chans=3, act="relu", drop_rate=0.5, input_drop_rate=0.2):
    return AllCNNC(num_classes, in_chans, act, drop_rate, input_drop_rate)
