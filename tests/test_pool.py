"""fastcnn.layers.MaxPool2d: fused, it recomputes its indices in backward instead of keeping
them; gradients identical to nn.MaxPool2d (ties included), no int64 tensor kept."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from fastcnn.layers import MaxPool2d, set_fused
from fastcnn.memory import MemoryTracker


@pytest.mark.parametrize("kernel, stride, padding, ceil", [(2, 2, 0, False), (3, 2, 1, False), (3, 2, 0, True)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_fused_pool_gradients_equal_eager(kernel, stride, padding, ceil, channels_last):
    torch.manual_seed(0)
    x = torch.randint(0, 4, (2, 3, 9, 9)).float()  # few distinct values: many ties
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    g = torch.randn_like(nn.MaxPool2d(kernel, stride, padding, ceil_mode=ceil)(x))
    outs = []
    for fused in (False, True):
        xi = x.clone().requires_grad_(True)
        pool = MaxPool2d(kernel, stride, padding, ceil_mode=ceil)
        pool.fused = fused
        y = pool(xi)
        y.backward(g)
        outs.append((y, xi.grad))
    assert torch.equal(outs[0][0], outs[1][0])
    assert torch.equal(outs[0][1], outs[1][1])


def test_fused_pool_keeps_no_indices():
    x = torch.randn(4, 8, 16, 16, requires_grad=True)
    kept = {}
    for fused in (False, True):
        pool = MaxPool2d(2)
        pool.fused = fused
        with MemoryTracker() as mt:
            y = pool(x * 1.0)  # x * 1.0: the pool's input is created (and counted) inside
            kept[fused] = mt.live - y.untyped_storage().nbytes()
        del y
    input_bytes = x.numel() * 4
    assert kept[False] == input_bytes + x.numel() // 4 * 8  # input + int64 indices
    assert kept[True] == input_bytes


def test_set_fused_reaches_the_pools():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), MaxPool2d(2))
    assert set_fused(net, True)[1].fused
    assert not set_fused(net, False)[1].fused
