"""Activation functions and their derivatives as Triton device functions, shared by every
fused kernel of ``fastcnn.kernels``.

``ACT`` is a compile-time code (see :data:`ACT_CODES`); ``p`` is the activation's scalar
parameter (negative slope of leaky_relu, alpha of elu). All math runs in fp32.

Derivatives come in two forms:

* :func:`act_grad` from the pre-activation ``v`` -- used wherever ``v`` is recomputed in
  backward (BN+act, SE block);
* :func:`act_grad_from_out` from the output ``y`` -- used by ``conv_act``, which saves only its
  output when the activation is invertible on its sign (identity, relu, leaky_relu with slope
  >= 0, elu with alpha > 0; see :func:`grad_from_output`).
"""
from __future__ import annotations

import triton
import triton.language as tl

ACT_CODES = {"identity": 0, "relu": 1, "leaky_relu": 2, "elu": 3, "silu": 4, "gelu": 5}


def act_code(act: str) -> int:
    return ACT_CODES[act]


def grad_from_output(act: str, act_param: float) -> bool:
    """Whether act'(v) can be computed from y = act(v) alone (so v need not be kept)."""
    if act in ("identity", "relu"):
        return True
    if act == "leaky_relu":
        return act_param >= 0.0
    if act == "elu":
        return act_param > 0.0
    return False


@triton.jit
def apply_act(v, p, ACT: tl.constexpr):
    """act(v) for fp32 ``v``."""
    if ACT == 1:
        v = tl.maximum(v, 0.0)
    elif ACT == 2:
        v = tl.where(v > 0, v, v * p)
    elif ACT == 3:
        v = tl.where(v > 0, v, p * (tl.exp(tl.minimum(v, 0.0)) - 1.0))
    elif ACT == 4:
        v = v / (1.0 + tl.exp(-v))
    elif ACT == 5:
        v = 0.5 * v * (1.0 + tl.math.erf(v * 0.7071067811865476))
    return v


@triton.jit
def act_grad(v, p, ACT: tl.constexpr):
    """d act(v) / dv for fp32 ``v`` (same conventions as PyTorch's backward kernels:
    relu and leaky_relu use v > 0, elu uses v <= 0 -> alpha * exp(v))."""
    if ACT == 0:
        d = tl.full(v.shape, 1.0, tl.float32)
    elif ACT == 1:
        d = tl.where(v > 0, 1.0, 0.0)
    elif ACT == 2:
        d = tl.where(v > 0, 1.0, p)
    elif ACT == 3:
        d = tl.where(v > 0, 1.0, p * tl.exp(tl.minimum(v, 0.0)))
    elif ACT == 4:
        s = 1.0 / (1.0 + tl.exp(-v))
        d = s * (1.0 + v * (1.0 - s))
    else:
        cdf = 0.5 * (1.0 + tl.math.erf(v * 0.7071067811865476))
        pdf = tl.exp(-0.5 * v * v) * 0.3989422804014327
        d = cdf + v * pdf
    return d


@triton.jit
def act_grad_from_out(y, p, ACT: tl.constexpr):
    """d act(v) / dv from the output y = act(v); only for :func:`grad_from_output` acts."""
    if ACT == 0:
        d = tl.full(y.shape, 1.0, tl.float32)
    elif ACT == 1:
        d = tl.where(y > 0, 1.0, 0.0)
    elif ACT == 2:
        d = tl.where(y > 0, 1.0, p)
    else:
        d = tl.where(y > 0, 1.0, y + p)
    return d


@triton.jit
def grad_through_act(g, v, p, ACT: tl.constexpr):
    """``g * act'(v)``, with the masked branch exactly 0 (relu) or ``g * p`` (leaky_relu, elu:
    ``g * p * exp(v)``) as PyTorch's backward kernels select it: a non-finite ``g`` where the
    activation cuts stays out of the gradient (``inf * 0`` would be NaN)."""
    if ACT == 1:
        r = tl.where(v > 0, g, 0.0)
    elif ACT == 2:
        r = tl.where(v > 0, g, g * p)
    elif ACT == 3:
        r = tl.where(v > 0, g, g * (p * tl.exp(tl.minimum(v, 0.0))))
    else:
        r = g * act_grad(v, p, ACT)
    return r


@triton.jit
def grad_through_act_from_out(g, y, p, ACT: tl.constexpr):
    """:func:`grad_through_act` from the output ``y = act(v)`` (:func:`grad_from_output` acts)."""
    if ACT == 1:
        r = tl.where(y > 0, g, 0.0)
    elif ACT == 2:
        r = tl.where(y > 0, g, g * p)
    else:
        r = g * act_grad_from_out(y, p, ACT)
    return r
