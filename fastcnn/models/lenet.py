"""LeNet-5 (LeCun et al. 1998) in the CIFAR form of BIGBALLON/cifar-10-cnn: two 5x5 valid
convolutions with bias + ReLU + 2x2 max-pool, then FC 120-84-classes. The smallest net of the
zoo (62K parameters); its convolutions are conv+bias+act units (:class:`ConvAct`)."""
from __future__ import annotations

from torch import nn

from ..layers import MaxPool2d, ConvAct, create_act
from ..layers.weight_init import init_he
from ..registry import register_model


class LeNet5(nn.Module):
    def __init__(self, num_classes: int = 10, in_chans: int = 3, act="relu", img_size: int = 32):
        super().__init__()
        self.features = nn.Sequential(
            ConvAct(in_chans, 6, 5, padding=0, act=act),
            MaxPool2d(2),
            ConvAct(6, 16, 5, padding=0, act=act),
            MaxPool2d(2),
        )
        side = ((img_size - 4) // 2 - 4) // 2
        if side < 1:
            raise ValueError(f"lenet5 needs inputs of at least 16x16, got img_size={img_size}")
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(16 * side * side, 120), create_act(act),
            nn.Linear(120, 84), create_act(act),
            nn.Linear(84, num_classes),
        )
        # BIGBALLON's Keras LeNet uses he_normal for every layer.
        init_he(self, mode="fan_in", layers=(nn.Conv2d, nn.Linear))

    def forward(self, x):
        return self.classifier(self.features(x))


@register_model(params=62_006, reported="CIFAR-10 76.23% (BIGBALLON/cifar-10-cnn)",
                source="LeCun et al. 1998; BIGBALLON/cifar-10-cnn LeNet_dp_da_wd_keras.py",
                aliases=("lenet",))
def lenet5(num_classes=10, in_chans=3, act="relu", img_size=32):
    """LeNet-5; ``img_size`` sets the flattened feature size (default 32x32 inputs)."""
    return LeNet5(num_classes, in_chans, act, img_size)
