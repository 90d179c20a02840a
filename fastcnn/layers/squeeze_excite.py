"""Squeeze-and-excitation (Hu et al., arXiv 1709.01507), with the residual add and the
activation that close an SE-ResNeXt block, so the fused path covers the whole block tail:
``act(x * sigmoid(fc2(relu(fc1(avgpool(x))))) [+ residual])``."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from .activations import ActSpec, create_act
from .conv_bn_act import _Fusable, _autocast_dtype, _cast, _kernel_act


class SqueezeExcite(_Fusable):
    def __init__(self, channels: int, reduction: int = 16, out_act: ActSpec = None, fused: bool = False):
        super().__init__()
        hidden = max(1, channels // reduction)
        self.fc1 = nn.Linear(channels, hidden)
        self.fc2 = nn.Linear(hidden, channels)
        self.act = create_act(out_act)
        self.fused = fused

    def forward(self, x, residual=None):
        if not self.fused:
            s = x.mean(dim=(2, 3))
            s = torch.sigmoid(self.fc2(F.relu(self.fc1(s))))
            y = x * s[:, :, None, None]
            if residual is not None:
                y = y + residual
            return self.act(y)
        name, param, leftover = _kernel_act(self.act)
        dtype = _autocast_dtype(x)
        with torch.autocast(x.device.type, enabled=False):
            y = ops.se_block(x.to(dtype), self.fc1.weight.to(dtype), _cast(self.fc1.bias, dtype),
                             self.fc2.weight.to(dtype), _cast(self.fc2.bias, dtype),
                             residual=_cast(residual, dtype), act=name, act_param=param)
        return y if leftover is None else leftover(y)
