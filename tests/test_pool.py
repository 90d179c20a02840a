"""The pools of fastcnn.layers.pool and the other layout-keeping parts: fused, MaxPool2d
recomputes its indices in backward instead of keeping them (gradients identical to
nn.MaxPool2d, ties included, no int64 tensor kept); GlobalAvgPool2d and ResNet's option-A
shortcut give their input gradient in the input's memory format, with the values autograd's
own backward gives."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from fastcnn.layers import GlobalAvgPool2d, MaxPool2d, set_fused
from fastcnn.models.resnet import ShortcutA
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
    net = nn.Sequential(nn.Conv2d(3, 4, 3), MaxPool2d(2), GlobalAvgPool2d(), ShortcutA(4, 8, 2))
    assert all(m.fused for m in set_fused(net, True)[1:])
    assert not any(m.fused for m in set_fused(net, False)[1:])


@pytest.mark.parametrize("make", [GlobalAvgPool2d, lambda: ShortcutA(4, 8, 2), lambda: ShortcutA(4, 4, 1),
                                  lambda: ShortcutA(4, 7, 2)], ids=["global_avg", "shortcut_a", "shortcut_id",
                                                                   "shortcut_odd_pad"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_fused_layout_keeping_backward(make, channels_last):
    """Same output and input gradient as the unfused module (autograd's own backward), and
    the gradient in the input's memory format -- channels_last in, channels_last out -- which
    autograd's backward of these ops does not give (it builds NCHW)."""
    torch.manual_seed(0)
    x = torch.randn(2, 4, 6, 6)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    outs = []
    for fused in (False, True):
        m = make()
        m.fused = fused
        xi = x.clone().requires_grad_(True)
        y = m(xi)
        y.backward(torch.arange(y.numel(), dtype=y.dtype).reshape(y.shape).contiguous(
            memory_format=torch.channels_last if y.shape[-1] > 1 else torch.contiguous_format))
        outs.append((y, xi.grad))
    torch.testing.assert_close(outs[1][0], outs[0][0], rtol=0, atol=0)
    torch.testing.assert_close(outs[1][1], outs[0][1], rtol=1e-6, atol=1e-6)
    if channels_last:
        assert outs[1][1].is_contiguous(memory_format=torch.channels_last)
    else:
        assert outs[1][1].is_contiguous()
