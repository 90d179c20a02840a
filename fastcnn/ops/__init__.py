"""The fused operations, as functions: argument checks once, then the chosen backend.

Every op computes exactly what its twin in :mod:`fastcnn.ops.reference` computes:

* ``conv_bn_act``  act(BN(conv(x)) [+ residual])            -- post-activation layers
* ``bn_act``       act(BN(x) [+ residual])                   -- pre-activation prologue
* ``conv_act``     act(conv(x) + bias [+ residual])          -- layers without BN
* ``se_block``     act(x * sigmoid(fc2(relu(fc1(mean(x))))) [+ residual])
and one composed of two of them (:mod:`.composed`), one op where the backend has it:
* ``bn_act_conv``  conv(act(BN(x))) + bias [+ residual]       -- the pre-activation unit

In training mode BN uses batch statistics and updates ``running_mean``/``running_var`` in
place with ``momentum`` (the already-resolved factor: the layer handles ``momentum=None``
and ``num_batches_tracked`` as ``nn.BatchNorm2d`` does). Bad arguments raise ``TypeError``
or ``ValueError`` naming the argument before any kernel launches.

Each op is ``check_<op>`` (the argument checks, returning the normalised arguments) followed by
the backend's implementation (:func:`implementation`, a cached lookup). The layers of
:mod:`fastcnn.layers` run the checks once per input signature and then call the implementation
directly, so a layer call pays for neither (the extension's C++ ops check again, cheaply).

This package owns dispatch: :mod:`.dispatch` (backend table and selection), :mod:`.names`
(the one list of ops and of activations), one module per backend exporting its
``IMPLEMENTATIONS`` table, and :mod:`.reference` (the ground truth).
"""
from __future__ import annotations

import torch

from . import dispatch
from .dispatch import implementation
from .names import ACTIVATIONS, OPS

__all__ = ["conv_bn_act", "bn_act", "conv_act", "se_block", "bn_act_conv", "OPS", "ACTIVATIONS",
           "implementation", "check_conv_bn_act", "check_bn_act", "check_conv_act", "check_se_block",
           "check_bn_act_conv"]


def _check_tensor(name, t, *, ndim=None, ref=None, optional=False):
    if t is None:
        if optional:
            return
        raise TypeError(f"{name} must be a tensor, got None")
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if ref is not None and t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but x is on {ref.device}; put all arguments on one device")


def _check_param_dtype(name, t, x):
    """Parameters must share x's dtype, except fp32 params with fp16/bf16 activations
    (the mixed-precision layout BN keeps)."""
    if t is not None and t.dtype != x.dtype and t.dtype != torch.float32:
        raise TypeError(f"{name} has dtype {t.dtype} but x has {x.dtype}")


def _check_act(act, act_param):
    if act not in ACTIVATIONS:
        raise ValueError(f"act {act!r} has no fused implementation; choose one of {', '.join(ACTIVATIONS)}")
    if not isinstance(act_param, (int, float)):
        raise TypeError(f"act_param must be a number, got {type(act_param).__name__}")


def _pair(name, v):
    if isinstance(v, int):
        v = (v, v)
    v = tuple(v)
    if len(v) != 2 or not all(isinstance(i, int) for i in v):
        raise TypeError(f"{name} must be an int or a pair of ints, got {v!r}")
    return v


def _check_bn(x, channels, bn_weight, bn_bias, running_mean, running_var, training):
    for name, t in (("bn_weight", bn_weight), ("bn_bias", bn_bias),
                    ("running_mean", running_mean), ("running_var", running_var)):
        _check_tensor(name, t, ndim=1, ref=x, optional=name.startswith("running") and training)
        if t is not None and t.numel() != channels:
            raise ValueError(f"{name} has {t.numel()} elements but the BN input has {channels} channels")
    if not training and (running_mean is None or running_var is None):
        raise ValueError("eval mode needs running_mean and running_var")


def _check_residual(residual, shape, x):
    if residual is None:
        return
    _check_tensor("residual", residual, ndim=4, ref=x)
    if tuple(residual.shape) != tuple(shape):
        raise ValueError(f"residual has shape {tuple(residual.shape)} but the output has shape {tuple(shape)}")
    if residual.dtype != x.dtype:
        raise TypeError(f"residual has dtype {residual.dtype} but x has {x.dtype}")


def _conv_out_shape(x, weight, stride, padding, dilation, groups):
    n, c, h, w = x.shape
    k_out, k_in, kh, kw = weight.shape
    if groups < 1 or c % groups or k_out % groups:
        raise ValueError(f"groups={groups} must divide both x channels ({c}) and weight out-channels ({k_out})")
    if k_in * groups != c:
        raise ValueError(
            f"x has {c} channels but weight expects {k_in * groups} (weight shape {tuple(weight.shape)}, groups={groups})"
        )
    oh = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    ow = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    if oh < 1 or ow < 1:
        raise ValueError(f"input {h}x{w} is too small for a {kh}x{kw} kernel with padding {padding}")
    return (n, k_out, oh, ow)


def _dispatch(op, x, *args, **kwargs):
    return implementation(op, x.device)(x, *args, **kwargs)


def check_conv_bn_act(x, weight, bias, bn_weight, bn_bias, running_mean, running_var, *,
                      stride=1, padding=0, dilation=1, groups=1, training=True, momentum=0.1,
                      eps=1e-5, act="relu", act_param=0.0, residual=None) -> dict:
    """The checks of :func:`conv_bn_act`; returns its keyword arguments, normalised."""
    _check_tensor("x", x, ndim=4)
    _check_tensor("weight", weight, ndim=4, ref=x)
    if weight.dtype != x.dtype:
        raise TypeError(f"weight has dtype {weight.dtype} but x has {x.dtype}")
    _check_tensor("bias", bias, ndim=1, ref=x, optional=True)
    stride, padding, dilation = _pair("stride", stride), _pair("padding", padding), _pair("dilation", dilation)
    out_shape = _conv_out_shape(x, weight, stride, padding, dilation, groups)
    _check_bn(x, weight.shape[0], bn_weight, bn_bias, running_mean, running_var, training)
    for name, t in (("bias", bias), ("bn_weight", bn_weight), ("bn_bias", bn_bias)):
        _check_param_dtype(name, t, x)
    _check_act(act, act_param)
    _check_residual(residual, out_shape, x)
    return dict(stride=stride, padding=padding, dilation=dilation, groups=groups, training=training,
                momentum=float(momentum), eps=float(eps), act=act, act_param=float(act_param),
                residual=residual)


def conv_bn_act(x, weight, bias, bn_weight, bn_bias, running_mean, running_var, **kwargs):
    kw = check_conv_bn_act(x, weight, bias, bn_weight, bn_bias, running_mean, running_var, **kwargs)
    return _dispatch("conv_bn_act", x, weight, bias, bn_weight, bn_bias, running_mean, running_var, **kw)


def check_bn_act(x, bn_weight, bn_bias, running_mean, running_var, *, training=True, momentum=0.1,
                 eps=1e-5, act="relu", act_param=0.0, residual=None) -> dict:
    """The checks of :func:`bn_act`; returns its keyword arguments, normalised."""
    _check_tensor("x", x, ndim=4)
    _check_bn(x, x.shape[1], bn_weight, bn_bias, running_mean, running_var, training)
    for name, t in (("bn_weight", bn_weight), ("bn_bias", bn_bias)):
        _check_param_dtype(name, t, x)
    _check_act(act, act_param)
    _check_residual(residual, x.shape, x)
    if training and x.numel() // max(x.shape[1], 1) <= 1:
        raise ValueError(f"bn_act in training mode needs more than one value per channel, "
                         f"got x of shape {tuple(x.shape)}")
    return dict(training=training, momentum=float(momentum), eps=float(eps), act=act,
                act_param=float(act_param), residual=residual)


def bn_act(x, bn_weight, bn_bias, running_mean, running_var, **kwargs):
    kw = check_bn_act(x, bn_weight, bn_bias, running_mean, running_var, **kwargs)
    return _dispatch("bn_act", x, bn_weight, bn_bias, running_mean, running_var, **kw)


def check_conv_act(x, weight, bias, *, stride=1, padding=0, dilation=1, groups=1, act="relu",
                   act_param=0.0, residual=None) -> dict:
    """The checks of :func:`conv_act`; returns its keyword arguments, normalised."""
    _check_tensor("x", x, ndim=4)
    _check_tensor("weight", weight, ndim=4, ref=x)
    if weight.dtype != x.dtype:
        raise TypeError(f"weight has dtype {weight.dtype} but x has {x.dtype}")
    _check_tensor("bias", bias, ndim=1, ref=x, optional=True)
    if bias is not None and bias.numel() != weight.shape[0]:
        raise ValueError(f"bias has {bias.numel()} elements but weight has {weight.shape[0]} output channels")
    _check_param_dtype("bias", bias, x)
    stride, padding, dilation = _pair("stride", stride), _pair("padding", padding), _pair("dilation", dilation)
    out_shape = _conv_out_shape(x, weight, stride, padding, dilation, groups)
    _check_act(act, act_param)
    _check_residual(residual, out_shape, x)
    return dict(stride=stride, padding=padding, dilation=dilation, groups=groups, act=act,
                act_param=float(act_param), residual=residual)


def conv_act(x, weight, bias, **kwargs):
    kw = check_conv_act(x, weight, bias, **kwargs)
    return _dispatch("conv_act", x, weight, bias, **kw)


def check_se_block(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, *, residual=None, act="relu",
                   act_param=0.0) -> dict:
    """The checks of :func:`se_block`; returns its keyword arguments, normalised."""
    _check_tensor("x", x, ndim=4)
    c = x.shape[1]
    _check_tensor("fc1_weight", fc1_weight, ndim=2, ref=x)
    _check_tensor("fc2_weight", fc2_weight, ndim=2, ref=x)
    hidden = fc1_weight.shape[0]
    if fc1_weight.shape[1] != c:
        raise ValueError(f"fc1_weight has shape {tuple(fc1_weight.shape)} but x has {c} channels")
    if tuple(fc2_weight.shape) != (c, hidden):
        raise ValueError(f"fc2_weight has shape {tuple(fc2_weight.shape)}, expected {(c, hidden)}")
    for name, t, n in (("fc1_bias", fc1_bias, hidden), ("fc2_bias", fc2_bias, c)):
        _check_tensor(name, t, ndim=1, ref=x, optional=True)
        if t is not None and t.numel() != n:
            raise ValueError(f"{name} has {t.numel()} elements, expected {n}")
    for name, t in (("fc1_weight", fc1_weight), ("fc1_bias", fc1_bias), ("fc2_weight", fc2_weight), ("fc2_bias", fc2_bias)):
        _check_param_dtype(name, t, x)
    _check_act(act, act_param)
    _check_residual(residual, x.shape, x)
    return dict(residual=residual, act=act, act_param=float(act_param))


def se_block(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, **kwargs):
    kw = check_se_block(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, **kwargs)
    return _dispatch("se_block", x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, **kw)


def check_bn_act_conv(x, bn_weight, bn_bias, running_mean, running_var, weight, bias, *, stride=1,
                      padding=0, dilation=1, groups=1, training=True, momentum=0.1, eps=1e-5, act="relu",
                      act_param=0.0, residual=None) -> dict:
    """The checks of :func:`bn_act_conv` (those of its two parts: the convolution's input has
    x's shape, dtype and device); returns its keyword arguments, normalised."""
    bn = check_bn_act(x, bn_weight, bn_bias, running_mean, running_var, training=training, momentum=momentum,
                      eps=eps, act=act, act_param=act_param)
    conv = check_conv_act(x, weight, bias, stride=stride, padding=padding, dilation=dilation, groups=groups,
                          act="identity", residual=residual)
    return dict(stride=conv["stride"], padding=conv["padding"], dilation=conv["dilation"], groups=groups,
                training=training, momentum=bn["momentum"], eps=bn["eps"], act=act, act_param=bn["act_param"],
                residual=residual)


def bn_act_conv(x, bn_weight, bn_bias, running_mean, running_var, weight, bias, **kwargs):
    """``conv(act(BN(x))) + bias [+ residual]``: the pre-activation unit, ``bn_act`` then
    ``conv_act`` with no activation, as one op where the backend has it (:mod:`.composed`)."""
    kw = check_bn_act_conv(x, bn_weight, bn_bias, running_mean, running_var, weight, bias, **kwargs)
    return _dispatch("bn_act_conv", x, bn_weight, bn_bias, running_mean, running_var, weight, bias, **kw)
