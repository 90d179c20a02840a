"""Squeeze-and-excitation (Hu et al., arXiv 1709.01507), with the residual add and the
activation that close an SE-ResNeXt block, so the fused path covers the whole block tail:
``act(x * sigmoid(fc2(relu(fc1(avgpool(x))))) [+ residual])``."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .activations import ActSpec, create_act
from .conv_bn_act import _Fusable, _hooked, _weight_bias


class SqueezeExcite(_Fusable):
    def __init__(self, channels: int, reduction: int = 16, out_act: ActSpec = None, fused: bool = False):
        super().__init__()
        hidden = max(1, channels // reduction)
        self.fc1 = nn.Linear(channels, hidden)
        self.fc2 = nn.Linear(hidden, channels)
        self.act = create_act(out_act)
        self.fused = fused

    def forward(self, x, residual=None):
        if not self.fused or _hooked(self, self._modules):
            s = x.mean(dim=(2, 3))
            s = torch.sigmoid(self.fc2(F.relu(self.fc1(s))))
            y = x * s[:, :, None, None]
            if residual is not None:
                y = y + residual
            return self.act(y)
        mods = self._modules
        return self._fused("se_block", mods["act"], x,
                           (*_weight_bias(mods["fc1"], nn.Linear), *_weight_bias(mods["fc2"], nn.Linear)), {},
                           residual)
