"""The conv / BatchNorm / activation building blocks every model of the zoo is made of.

Each class has a reference path (plain ``nn.Conv2d`` / ``nn.BatchNorm2d`` / activation
modules) and a fused path (``fused=True``) that calls :mod:`fastcnn.ops`. Both paths own the
same submodules (``conv``, ``bn``, ``act``), so ``state_dict`` keys are identical and a
checkpoint trained one way loads the other way.

* :class:`ConvBnAct` -- post-activation ``act(BN(conv(x)) [+ residual])`` (SimpleNet, VGG,
  NIN, ResNet, ResNeXt; grouped with ``groups > 1``)
* :class:`BnAct`     -- ``act(BN(x) [+ residual])`` (pre-activation nets, final BN-ReLU)
* :class:`BnActConv` -- pre-activation ``conv(act(BN(x)))`` (ResNet-164, WRN, DenseNet)
* :class:`ConvAct`   -- ``act(conv(x) + bias)`` without BN (All-CNN-C, LeNet, ShatheNet)
"""
from __future__ import annotations

import warnings

import torch
from torch import nn

from .. import ops
from .activations import ActSpec, create_act, fused_act_name

_warned_custom_acts: set[str] = set()


def _kernel_act(act: nn.Module):
    """(name, param, leftover module): the activation the kernel applies, and the module to
    apply afterwards when the kernels do not implement ``act`` (warned about once)."""
    spec = fused_act_name(act)
    if spec is not None:
        return spec[0], spec[1], None
    key = type(act).__name__ if not hasattr(act, "fn") else repr(act)
    if key not in _warned_custom_acts:
        _warned_custom_acts.add(key)
        warnings.warn(
            f"activation {key} has no fused kernel; fused layers apply it as a separate op "
            "(the conv+BN part stays fused).",
            stacklevel=3,
        )
    return "identity", 0.0, act


def _bn_factor(bn: nn.BatchNorm2d) -> float:
    """The running-statistics factor ``nn.BatchNorm2d.forward`` would use this step
    (also counts the step in ``num_batches_tracked``)."""
    if not (bn.training and bn.track_running_stats):
        return 0.0
    bn.num_batches_tracked.add_(1)
    if bn.momentum is None:
        return 1.0 / float(bn.num_batches_tracked)
    return float(bn.momentum)


def _bn_uses_batch_stats(bn: nn.BatchNorm2d) -> bool:
    return bn.training or not bn.track_running_stats


def _autocast_dtype(x: torch.Tensor):
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return x.dtype


def _cast(t, dtype):
    return None if t is None else t.to(dtype)


def _fused_bn_act(bn: nn.BatchNorm2d, act: nn.Module, x, residual=None):
    """``act(bn(x) [+ residual])`` through :func:`fastcnn.ops.bn_act` (x already in the compute
    dtype); an activation without a kernel runs afterwards."""
    name, param, leftover = _kernel_act(act)
    y = ops.bn_act(x, bn.weight, bn.bias, bn.running_mean, bn.running_var,
                   training=_bn_uses_batch_stats(bn), momentum=_bn_factor(bn), eps=bn.eps,
                   act=name, act_param=param, residual=residual)
    return y if leftover is None else leftover(y)


class _Fusable(nn.Module):
    """Holds the ``fused`` switch; :func:`fastcnn.layers.set_fused` flips it model-wide."""

    fused: bool = False

    def extra_repr(self) -> str:
        return "fused=True" if self.fused else ""


class ConvBnAct(_Fusable):
    def __init__(self, in_chs: int, out_chs: int, kernel_size=3, stride=1, padding=None,
                 dilation=1, groups=1, bias=False, act: ActSpec = "relu",
                 bn_momentum: float | None = 0.1, bn_eps: float = 1e-5, fused: bool = False):
        super().__init__()
        if padding is None:
            padding = ((kernel_size - 1) // 2) * dilation
        self.conv = nn.Conv2d(in_chs, out_chs, kernel_size, stride, padding, dilation, groups, bias=bias)
        self.bn = nn.BatchNorm2d(out_chs, eps=bn_eps, momentum=bn_momentum)
        self.act = create_act(act)
        self.fused = fused

    def forward(self, x, residual=None):
        if not self.fused:
            y = self.bn(self.conv(x))
            if residual is not None:
                y = y + residual
            return self.act(y)
        conv, bn = self.conv, self.bn
        name, param, leftover = _kernel_act(self.act)
        dtype = _autocast_dtype(x)
        training = _bn_uses_batch_stats(bn)
        with torch.autocast(x.device.type, enabled=False):
            y = ops.conv_bn_act(
                x.to(dtype), conv.weight.to(dtype), _cast(conv.bias, dtype), bn.weight, bn.bias,
                bn.running_mean, bn.running_var, stride=conv.stride, padding=conv.padding,
                dilation=conv.dilation, groups=conv.groups, training=training,
                momentum=_bn_factor(bn), eps=bn.eps, act=name, act_param=param,
                residual=_cast(residual, dtype),
            )
        return y if leftover is None else leftover(y)


class BnAct(_Fusable):
    def __init__(self, chs: int, act: ActSpec = "relu", bn_momentum: float | None = 0.1,
                 bn_eps: float = 1e-5, fused: bool = False):
        super().__init__()
        self.bn = nn.BatchNorm2d(chs, eps=bn_eps, momentum=bn_momentum)
        self.act = create_act(act)
        self.fused = fused

    def forward(self, x, residual=None):
        if not self.fused:
            y = self.bn(x)
            if residual is not None:
                y = y + residual
            return self.act(y)
        dtype = _autocast_dtype(x)
        with torch.autocast(x.device.type, enabled=False):
            return _fused_bn_act(self.bn, self.act, x.to(dtype), _cast(residual, dtype))


class BnActConv(_Fusable):
    """Pre-activation unit. Fused, the BN+activation runs as one kernel that saves only its
    input for backward; the convolution follows (``conv_act`` with no activation)."""

    def __init__(self, in_chs: int, out_chs: int, kernel_size=3, stride=1, padding=None,
                 dilation=1, groups=1, bias=False, act: ActSpec = "relu",
                 bn_momentum: float | None = 0.1, bn_eps: float = 1e-5, fused: bool = False):
        super().__init__()
        if padding is None:
            padding = ((kernel_size - 1) // 2) * dilation
        self.bn = nn.BatchNorm2d(in_chs, eps=bn_eps, momentum=bn_momentum)
        self.act = create_act(act)
        self.conv = nn.Conv2d(in_chs, out_chs, kernel_size, stride, padding, dilation, groups, bias=bias)
        self.fused = fused

    def forward(self, x, residual=None):
        if not self.fused:
            y = self.conv(self.act(self.bn(x)))
            return y if residual is None else y + residual
        conv = self.conv
        dtype = _autocast_dtype(x)
        with torch.autocast(x.device.type, enabled=False):
            h = _fused_bn_act(self.bn, self.act, x.to(dtype))
            return ops.conv_act(h, conv.weight.to(dtype), _cast(conv.bias, dtype), stride=conv.stride,
                                padding=conv.padding, dilation=conv.dilation, groups=conv.groups,
                                act="identity", residual=_cast(residual, dtype))


class ConvAct(_Fusable):
    def __init__(self, in_chs: int, out_chs: int, kernel_size=3, stride=1, padding=None,
                 dilation=1, groups=1, bias=True, act: ActSpec = "relu", fused: bool = False):
        super().__init__()
        if padding is None:
            padding = ((kernel_size - 1) // 2) * dilation
        self.conv = nn.Conv2d(in_chs, out_chs, kernel_size, stride, padding, dilation, groups, bias=bias)
        self.act = create_act(act)
        self.fused = fused

    def forward(self, x, residual=None):
        if not self.fused:
            y = self.conv(x)
            if residual is not None:
                y = y + residual
            return self.act(y)
        conv = self.conv
        name, param, leftover = _kernel_act(self.act)
        dtype = _autocast_dtype(x)
        with torch.autocast(x.device.type, enabled=False):
            y = ops.conv_act(x.to(dtype), conv.weight.to(dtype), _cast(conv.bias, dtype),
                             stride=conv.stride, padding=conv.padding, dilation=conv.dilation,
                             groups=conv.groups, act=name, act_param=param,
                             residual=_cast(residual, dtype))
        return y if leftover is None else leftover(y)
