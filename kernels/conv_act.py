"""``conv_act``: ``act(conv(x, w) + bias [+ residual])`` -- the layer without BN (All-CNN-C,
LeNet, ShatheNet; ``BnActConv``'s convolution with ``act="identity"``).

Design
------
* Forward: one launch of the implicit-GEMM kernel of :mod:`.conv_gemm` whose epilogue adds
  the bias and the residual, applies the activation and writes ``y`` (the input dtype, a
  channels_last ``(N, C, H, W)`` tensor).
* Saved for backward: the input (channels_last) and the weight, plus
  - the output ``y`` alone when the activation's derivative follows from ``y``'s sign
    (identity, relu, leaky_relu with slope >= 0, elu with alpha > 0), or
  - for silu / gelu (not invertible): the pre-residual conv output ``z`` (written by the
    same launch) and a reference to the residual, so ``v = z + residual`` is recomputed.
* Backward: one elementwise kernel ``du = dy * act'(.)`` that also reduces the bias
  gradient per channel (fp32 partials per row block, summed once; skipped entirely for
  identity without bias, where ``du = dy``); then the input-gradient and weight-gradient
  implicit GEMMs of :mod:`.conv_gemm`. No cuDNN call.

Design notes: launches and passes over memory (activation-sized tensors)
-----------------------------------------------------------------------
* forward: 1 launch -- reads x [+ residual], writes y (and z for silu / gelu under autograd).
* backward: 3 launches (2 for identity without bias) + an ATen ``sum`` of the bias partials
  -- act backward (reads dy, y or z [+ residual], writes du), input-grad GEMM (reads du,
  writes dx; at stride > 1 only the taps each input pixel takes), weight-grad GEMM (reads x
  and du).
* weight: read in place when channels_last (or 1x1 / depthwise); an NCHW KxK weight is
  packed once per weight version, the pack shared by forward and backward
  (:func:`.conv_gemm.weight_operand`). Host: launch parameters and autotuner choices come
  from per-shape caches.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .activations import act_code, grad_from_output, grad_through_act, grad_through_act_from_out
from .conv_gemm import conv_dgrad, conv_fwd, conv_geom, conv_wgrad
from .utils import PlanCache, as_cl, cdiv, interpreting, pow2


@triton.jit
def _act_bwd_kernel(dy_ptr, src_ptr, res_ptr, du_ptr, psum_ptr, M, C, act_param,
                    ACT: tl.constexpr, FROM_OUT: tl.constexpr, HAS_RES: tl.constexpr,
                    STORE_DU: tl.constexpr, BIAS_GRAD: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_c = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = cols < C
    mask = (rows < M)[:, None] & c_ok[None, :]
    off = rows.to(tl.int64)[:, None] * C + cols[None, :]
    du = tl.load(dy_ptr + off, mask=mask, other=0.0).to(tl.float32)
    if ACT != 0:
        s = tl.load(src_ptr + off, mask=mask, other=0.0).to(tl.float32)
        if FROM_OUT:
            du = grad_through_act_from_out(du, s, act_param, ACT)
        else:
            if HAS_RES:
                s += tl.load(res_ptr + off, mask=mask, other=0.0).to(tl.float32)
            du = grad_through_act(du, s, act_param, ACT)
    if STORE_DU:
        tl.store(du_ptr + off, du.to(du_ptr.dtype.element_ty), mask=mask)
    if BIAS_GRAD:
        tl.store(psum_ptr + pid_m * C + cols, tl.sum(tl.where(mask, du, 0.0), axis=0), mask=c_ok)


_PLANS = PlanCache()


def act_backward(dy, src, residual, act, act_param, *, from_out, bias_grad):
    """(du, bias_grad or None) for channels_last ``dy``; ``src`` is y (``from_out``) or z."""
    store_du = act != "identity"
    if not store_du and not bias_grad:
        return dy, None
    n, c, h, w = dy.shape
    m = n * h * w
    key = (m, c, interpreting())
    lay = _PLANS.get(key)
    if lay is None:
        bc = pow2(c, 16, 64)
        bm = pow2(m, 16, 8192 // bc if interpreting() else 4096 // bc)
        lay = _PLANS.put(key, (cdiv(m, bm), (cdiv(m, bm), cdiv(c, bc)), bm, bc))
    t, grid, bm, bc = lay
    du = torch.empty_like(dy) if store_du else dy
    psum = torch.empty((t, c), device=dy.device, dtype=torch.float32) if bias_grad else dy
    _act_bwd_kernel[grid](
        dy, dy if src is None else src, dy if residual is None else residual, du, psum,
        m, c, float(act_param), ACT=act_code(act), FROM_OUT=from_out, HAS_RES=residual is not None,
        STORE_DU=store_du, BIAS_GRAD=bias_grad, BLOCK_M=bm, BLOCK_C=bc)
    return du, ((psum[0] if t == 1 else psum.sum(0)) if bias_grad else None)


class _ConvActFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, residual, cfg):
        stride, padding, dilation, groups, act, act_param, records = cfg
        gm = conv_geom(x.shape, weight.shape, stride, padding, dilation, groups)
        xc = as_cl(x)
        rc = as_cl(residual)
        need_grad = records and any(ctx.needs_input_grad[:4])
        from_out = grad_from_output(act, act_param)
        y, z, _, _ = conv_fwd(xc, weight, bias, gm, residual=rc, act=act, act_param=act_param,
                              store_z=need_grad and not from_out,
                              backward_follows=need_grad and ctx.needs_input_grad[0])
        if need_grad:
            ctx.geom, ctx.act, ctx.act_param, ctx.from_out = gm, act, act_param, from_out
            ctx.has_bias = bias is not None
            ctx.bias_dtype = bias.dtype if bias is not None else None
            if from_out:
                # the output itself: autograd then refuses a backward after the caller changed
                # it in place, instead of using changed values
                ctx.save_for_backward(xc, weight, y, None)
            else:
                ctx.save_for_backward(xc, weight, z, rc)
        return y

    @staticmethod
    def backward(ctx, dy):
        xc, weight, src, rc = ctx.saved_tensors
        gm = ctx.geom
        dyc = as_cl(dy.to(xc.dtype))
        need_x, need_w, need_b, need_r = ctx.needs_input_grad[:4]
        du, db = act_backward(dyc, src, None if ctx.from_out else rc, ctx.act, ctx.act_param,
                              from_out=ctx.from_out, bias_grad=ctx.has_bias and need_b)
        dx = conv_dgrad(du, weight, gm) if need_x else None
        dw = conv_wgrad(xc, du, gm, weight) if need_w else None
        return dx, dw, (db.to(ctx.bias_dtype) if db is not None else None), (du if need_r else None), None


def conv_act(x, weight, bias, *, stride=1, padding=0, dilation=1, groups=1, act="relu",
             act_param=0.0, residual=None):
    """Same signature and result as :func:`fastcnn.ops.reference.conv_act`."""
    return _ConvActFn.apply(x, weight, bias, residual,
                            (tuple(stride), tuple(padding), tuple(dilation), int(groups), act, float(act_param),
                             torch.is_grad_enabled()))
