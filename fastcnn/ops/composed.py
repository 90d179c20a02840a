"""Layer patterns made of two fused ops, run as one where a backend has that one op.

``bn_act_conv`` -- ``conv_act(bn_act(x), act="identity")``: the pre-activation unit of
ResNet-164, WRN and DenseNet (``fastcnn.layers.BnActConv``). The extension has it as one
composite op whose convolution node -- in training inside a fused model -- rebuilds the
BN+activation output in C++ in backward instead of keeping it
(csrc/ops/conv_layers/bn_act_conv.cpp): one dispatcher call and no Python rebuild bookkeeping
per unit. Any other backend -- or the two ops resolving to different
backends -- runs the two ops' own implementations one after the other (:func:`chain`), which
computes the same thing.

:func:`fastcnn.ops.implementation` resolves a composed op: the backend's own implementation when
both parts resolve to that backend and it lists the composed op, else the chain of the parts.
"""
from __future__ import annotations

#: composed op -> the ops it is made of, in order
COMPOSED: dict[str, tuple[str, str]] = {"bn_act_conv": ("bn_act", "conv_act")}


def chain(op: str, first, second):
    """``op`` as its two parts' implementations ``first`` and ``second`` one after the other."""
    if op != "bn_act_conv":
        raise ValueError(f"no composed op {op!r}; composed ops: {', '.join(COMPOSED)}")

    def bn_act_conv(x, bn_weight, bn_bias, running_mean, running_var, weight, bias, *, stride=1, padding=0,
                    dilation=1, groups=1, training=True, momentum=0.1, eps=1e-5, act="relu", act_param=0.0,
                    residual=None):
        h = first(x, bn_weight, bn_bias, running_mean, running_var, training=training, momentum=momentum,
                  eps=eps, act=act, act_param=act_param, residual=None)
        return second(h, weight, bias, stride=stride, padding=padding, dilation=dilation, groups=groups,
                      act="identity", act_param=0.0, residual=residual)

    return bn_act_conv
