"""Plain-PyTorch definitions of every fused op: the ground truth the kernels are tested
against, and the ``reference`` backend. Autograd comes from PyTorch itself."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .names import OPS


def unavailable_reason(op: str, device_type: str, backend: str = "reference") -> str | None:
    return None if op in OPS else f"reference: no op {op!r}"


def activation(y: torch.Tensor, act: str, act_param: float = 0.0) -> torch.Tensor:
    """The activations the fused kernels implement, by kernel name."""
    if act == "identity":
        return y
    if act == "relu":
        return F.relu(y)
    if act == "leaky_relu":
        return F.leaky_relu(y, act_param)
    if act == "elu":
        return F.elu(y, act_param)
    if act == "silu":
        return F.silu(y)
    if act == "gelu":
        return F.gelu(y)
    raise ValueError(f"activation {act!r} has no fused implementation")


def bn_act(x, bn_weight, bn_bias, running_mean, running_var, *, training=True,
           momentum=0.1, eps=1e-5, act="relu", act_param=0.0, residual=None):
    y = F.batch_norm(x, running_mean, running_var, bn_weight, bn_bias, training, momentum, eps)
    if residual is not None:
        y = y + residual
    return activation(y, act, act_param)


def conv_bn_act(x, weight, bias, bn_weight, bn_bias, running_mean, running_var, *,
                stride=1, padding=0, dilation=1, groups=1, training=True, momentum=0.1,
                eps=1e-5, act="relu", act_param=0.0, residual=None):
    z = F.conv2d(x, weight, bias, stride, padding, dilation, groups)
    return bn_act(z, bn_weight, bn_bias, running_mean, running_var, training=training,
                  momentum=momentum, eps=eps, act=act, act_param=act_param, residual=residual)


def conv_act(x, weight, bias, *, stride=1, padding=0, dilation=1, groups=1,
             act="relu", act_param=0.0, residual=None):
    y = F.conv2d(x, weight, bias, stride, padding, dilation, groups)
    if residual is not None:
        y = y + residual
    return activation(y, act, act_param)


def se_block(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, *, residual=None, act="relu",
             act_param=0.0):
    s = x.mean(dim=(2, 3))
    s = F.relu(F.linear(s, fc1_weight, fc1_bias))
    s = torch.sigmoid(F.linear(s, fc2_weight, fc2_bias))
    y = x * s[:, :, None, None]
    if residual is not None:
        y = y + residual
    return activation(y, act, act_param)


def bn_act_conv(x, bn_weight, bn_bias, running_mean, running_var, weight, bias, *, stride=1, padding=0,
                dilation=1, groups=1, training=True, momentum=0.1, eps=1e-5, act="relu", act_param=0.0,
                residual=None):
    """The pre-activation unit (fastcnn.ops.composed): ``bn_act`` then a convolution."""
    h = bn_act(x, bn_weight, bn_bias, running_mean, running_var, training=training, momentum=momentum, eps=eps,
               act=act, act_param=act_param)
    return conv_act(h, weight, bias, stride=stride, padding=padding, dilation=dilation, groups=groups,
                    act="identity", residual=residual)


#: this backend's ops (dispatch looks them up here)
IMPLEMENTATIONS = {"conv_bn_act": conv_bn_act, "bn_act": bn_act, "conv_act": conv_act, "se_block": se_block,
                   "bn_act_conv": bn_act_conv}
