"""Weight initialisation shared by the zoo: He (Kaiming) normal, as the papers of these
families use, so each model states only its variant (fan mode, which layer types)."""
from __future__ import annotations

from torch import nn


def init_he(model: nn.Module, mode: str = "fan_out", layers=(nn.Conv2d,)) -> None:
    """Kaiming-normal weights (ReLU gain) and zero biases for ``layers``; BN to (1, 0)."""
    for m in model.modules():
        if isinstance(m, layers):
            nn.init.kaiming_normal_(m.weight, mode=mode, nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
