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
from ..ops.dispatch import implementation
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
            stacklevel=4,
        )
    return "identity", 0.0, act


# ----------------------------------------------------------------- BatchNorm semantics, once
def bn_args(bn: nn.BatchNorm2d) -> dict:
    """The fused ops' BN arguments for this call of ``bn``, with ``nn.BatchNorm2d.forward``'s
    semantics: batch statistics in training or without running statistics; the running
    statistics (None when not tracked); the resolved momentum (``momentum=None``: cumulative
    average, 1 / num_batches_tracked) with ``num_batches_tracked`` counted; the kernels update
    the running statistics with it and fold them in eval."""
    training = bn.training or not bn.track_running_stats
    momentum = 0.0
    if bn.training and bn.track_running_stats:
        counter = bn._buffers.get("num_batches_tracked") if type(bn) is nn.BatchNorm2d else None
        if counter is None:
            counter = bn.num_batches_tracked
        counter.add_(1)
        momentum = 1.0 / float(counter) if bn.momentum is None else bn.momentum
    return dict(training=training, momentum=momentum, eps=bn.eps)


# The tensors of a layer's submodules, read on every fused call. A plain nn.Conv2d / nn.Linear /
# nn.BatchNorm2d is read from its parameter and buffer dicts: an attribute read goes through
# nn.Module.__getattr__, a Python call of about 0.5 us, and a fused layer made seven of them (a
# tenth of its host time, training forward+backward, at CIFAR sizes). Any other class -- a
# subclass, or a module torch.nn.utils.parametrize has rewritten (it swaps in a subclass whose
# property computes the weight) -- and a plain one whose tensor is not in its dict (moved out
# by torch.nn.utils.prune or the old weight_norm, which keep it as a plain attribute) is read
# by attribute.
def _weight_bias(m: nn.Module, plain: type):
    if type(m) is plain:
        p = m._parameters
        if "weight" in p and "bias" in p:
            return p["weight"], p["bias"]
    return m.weight, m.bias


def _bn_tensors(bn: nn.BatchNorm2d):
    if type(bn) is nn.BatchNorm2d:
        p, b = bn._parameters, bn._buffers
        if "weight" in p and "bias" in p and "running_mean" in b and "running_var" in b:
            return p["weight"], p["bias"], b["running_mean"], b["running_var"]
    return bn.weight, bn.bias, bn.running_mean, bn.running_var


_warned_hooks: set[str] = set()


def _hooked(layer: nn.Module, mods) -> bool:
    """Whether one of the submodules a fused layer would bypass has module hooks -- forward
    (pre-)hooks: torch.nn.utils.prune and the old weight_norm compute the weight in one, feature
    extractors read an activation in one; backward hooks: gradient inspection. The fused ops
    cannot run them, so such a layer runs unfused (warned about once per layer class and hooked
    submodule)."""
    for name, m in mods.items():
        if m._forward_pre_hooks or m._forward_hooks or m._backward_hooks or m._backward_pre_hooks:
            key = f"{type(layer).__name__}.{name}"
            if key not in _warned_hooks:
                _warned_hooks.add(key)
                warnings.warn(f"{key} has module hooks, which the fused kernels cannot run: this layer runs "
                              "unfused while they are registered", stacklevel=3)
            return True
    return False


#: whether autocast is enabled for any device type (torch.is_autocast_enabled per device type
#: costs about 1 us more)
_any_autocast = torch._C._is_any_autocast_enabled

_CHECKS = {"conv_bn_act": ops.check_conv_bn_act, "bn_act": ops.check_bn_act,
           "conv_act": ops.check_conv_act, "se_block": ops.check_se_block,
           "bn_act_conv": ops.check_bn_act_conv}


def _cast(t, dtype):
    """``t`` in ``dtype`` (None stays None; a tensor already in ``dtype`` is returned as is)."""
    return t if t is None or t.dtype == dtype else t.to(dtype)


class _Fusable(nn.Module):
    """Holds the ``fused`` switch (:func:`fastcnn.layers.set_fused` flips it model-wide) and
    the fused call sequence every layer uses (:meth:`_fused`):

    1. the activation the kernels apply (looked up once per activation module);
    2. under autocast, inputs cast to the autocast dtype and autocast off around the op (the
       kernels take one dtype); otherwise the tensors go as they are;
    3. the op's argument checks (:mod:`fastcnn.ops`) once per input signature -- shapes,
       dtypes, devices, mode, residual -- not on every call;
    4. the backend's implementation, a cached lookup (:func:`fastcnn.ops.implementation`);
    5. an activation the kernels lack, applied after the op.
    """

    fused: bool = False
    #: the fused forward is one op on the layer's input (a lone such layer needs no rebuild
    #: hooks: fastcnn.layers.set_fused); a layer whose fused forward chained two ops would
    #: set it False (none does: the pre-activation unit is one composed op)
    single_op: bool = True

    def extra_repr(self) -> str:
        return "fused=True" if self.fused else ""

    def _act(self, act: nn.Module):
        # keyed by the module (a layer may pass two: BnActConv's activation and the identity
        # of its convolution); the module is kept with its entry, so its id cannot be reused
        cache = self.__dict__.get("_act_cache")
        if cache is None:
            cache = self.__dict__["_act_cache"] = {}
        hit = cache.get(id(act))
        if hit is None or hit[0] is not act:
            hit = cache[id(act)] = (act, _kernel_act(act))
        return hit[1]

    def _fused(self, op: str, act: nn.Module, x, params: tuple, kw: dict, residual=None):
        """``op(x, *params, **kw, act=..., residual=residual)`` the fused way (steps above);
        ``params`` are the op's tensor arguments after ``x``."""
        name, param, leftover = self._act(act)
        dev = x.device
        # any autocast on at all (one C call) before asking about this device's (which reads
        # dev.type: together five times the cost, on every layer call)
        if _any_autocast() and torch.is_autocast_enabled(dev.type):
            dtype = torch.get_autocast_dtype(dev.type)
            with torch.autocast(dev.type, enabled=False):
                y = self._fused(op, act, _cast(x, dtype), _cast_params(op, params, dtype), kw,
                                _cast(residual, dtype))
            return y
        weight = params[_SIGNATURE_WEIGHT.get(op, 0)]
        signature = (x.shape, x.dtype, dev, None if weight is None else weight.dtype, kw.get("training"),
                     None if residual is None else (residual.shape, residual.dtype, residual.device))
        checked = self.__dict__.get("_checked")  # op -> last checked signature (a layer may run two ops)
        if checked is None:
            checked = self.__dict__["_checked"] = {}
        if checked.get(op) != signature:
            _CHECKS[op](x, *params, act=name, act_param=param, residual=residual, **kw)
            checked[op] = signature
        y = implementation(op, dev)(x, *params, act=name, act_param=param, residual=residual, **kw)
        return y if leftover is None else leftover(y)


#: which of an op's tensor arguments after x the check signature records the dtype of (default:
#: the first): the convolution weight's for bn_act_conv, whose first is BN's
_SIGNATURE_WEIGHT = {"bn_act_conv": 4}


def _cast_params(op: str, params: tuple, dtype) -> tuple:
    """Under autocast: the convolution / linear weights and biases in the compute dtype; BN's
    parameters and statistics stay fp32 (the kernels read them in fp32, as autocast's BN does)."""
    if op in ("conv_bn_act", "conv_act"):
        return (_cast(params[0], dtype), _cast(params[1], dtype), *params[2:])
    if op == "se_block":
        return tuple(_cast(p, dtype) for p in params)
    if op == "bn_act_conv":
        return (*params[:4], _cast(params[4], dtype), _cast(params[5], dtype))
    return params


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
        if not self.fused or _hooked(self, self._modules):
            y = self.bn(self.conv(x))
            if residual is not None:
                y = y + residual
            return self.act(y)
        mods = self._modules
        conv, bn = mods["conv"], mods["bn"]
        return self._fused("conv_bn_act", mods["act"], x, (*_weight_bias(conv, nn.Conv2d), *_bn_tensors(bn)),
                           dict(stride=conv.stride, padding=conv.padding, dilation=conv.dilation,
                                groups=conv.groups, **bn_args(bn)), residual)


class BnAct(_Fusable):
    def __init__(self, chs: int, act: ActSpec = "relu", bn_momentum: float | None = 0.1,
                 bn_eps: float = 1e-5, fused: bool = False):
        super().__init__()
        self.bn = nn.BatchNorm2d(chs, eps=bn_eps, momentum=bn_momentum)
        self.act = create_act(act)
        self.fused = fused

    def forward(self, x, residual=None):
        if not self.fused or _hooked(self, self._modules):
            y = self.bn(x)
            if residual is not None:
                y = y + residual
            return self.act(y)
        mods = self._modules
        bn = mods["bn"]
        return self._fused("bn_act", mods["act"], x, _bn_tensors(bn), bn_args(bn), residual)


class BnActConv(_Fusable):
    """Pre-activation unit. Fused, one op (``bn_act_conv``, :mod:`fastcnn.ops.composed`): the
    BN+activation kernel, which saves only its input for backward, then the convolution, which
    -- in the extension's composite -- rebuilds the BN+activation output in backward instead of
    keeping it. An activation the kernels lack runs as two ops with the module between."""

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
        if not self.fused or _hooked(self, self._modules):
            y = self.conv(self.act(self.bn(x)))
            return y if residual is None else y + residual
        mods = self._modules
        conv, bn, act = mods["conv"], mods["bn"], mods["act"]
        if self._act(act)[2] is None:  # the kernels apply the activation
            return self._fused("bn_act_conv", act, x, (*_bn_tensors(bn), *_weight_bias(conv, nn.Conv2d)),
                               dict(stride=conv.stride, padding=conv.padding, dilation=conv.dilation,
                                    groups=conv.groups, **bn_args(bn)), residual)
        h = self._fused("bn_act", act, x, _bn_tensors(bn), bn_args(bn))
        return self._fused("conv_act", _IDENTITY, h, _weight_bias(conv, nn.Conv2d),
                           dict(stride=conv.stride, padding=conv.padding, dilation=conv.dilation,
                                groups=conv.groups), residual)


_IDENTITY = nn.Identity()  # the pre-activation unit's convolution applies no activation


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
        if not self.fused or _hooked(self, self._modules):
            y = self.conv(x)
            if residual is not None:
                y = y + residual
            return self.act(y)
        mods = self._modules
        conv = mods["conv"]
        return self._fused("conv_act", mods["act"], x, _weight_bias(conv, nn.Conv2d),
                           dict(stride=conv.stride, padding=conv.padding, dilation=conv.dilation,
                                groups=conv.groups), residual)
