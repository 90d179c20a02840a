"""``se_block``: ``act(x * sigmoid(fc2(relu(fc1(mean_hw(x))))) [+ residual])`` -- the
squeeze-and-excitation tail of an SE-ResNeXt block (scale, residual add, final ReLU).

Design
------
``x`` is a channels_last tensor, i.e. NHWC ``[N, HW, C]``; the squeeze vectors are fp32
``[N, C]`` / ``[N, HID]``.

* **Forward, three launches**: (1) ``_se_pool_kernel``, grid (N, channel blocks), loops over
  HW in BLOCK_HW rows and writes the fp32 channel means ``s``; (2) ``_se_fc_kernel``, one
  program per sample: ``h = relu(W1 s + b1)`` then ``g = sigmoid(W2 h + b2)``, looping over
  channel blocks (the hidden width lives in one register block); (3) ``_se_apply_kernel``:
  ``y = act(x * g[n, c] [+ residual])``, elementwise over (rows, channel blocks).
* **Saved for backward**: ``x`` (channels_last), the small fp32 vectors ``s``, ``h``, ``g``, the FC
  weights, and a reference to the residual only when a non-identity activation follows it.
  The forward hands its caller a recipe that rebuilds the output from ``x``, ``g`` and the
  residual (``rebuild=``); the ops layer marks the output rebuildable with it
  (:mod:`fastcnn.recompute`), so the next block keeps a recipe, not a second activation.
* **Backward**: (1) ``_se_bwd_reduce_kernel`` recomputes ``du = dy * act'(x*g + r)``, writes
  ``dresidual = du`` if wanted and reduces ``dg[n, c] = sum_hw du*x``; (2)
  ``_se_fc_bwd_kernel``, one program per sample, backpropagates through sigmoid, fc2, relu
  and fc1 to ``ds`` (and the pre-activation grads ``dl2``, ``dh``); (3)
  ``_se_bwd_apply_kernel``: ``dx = du*g + ds/HW``. The FC weight/bias gradients are four
  tiny ``[N, C] x [N, HID]`` products done with ``torch.mm`` / ``sum`` (cuBLAS): a batch
  of 128 against a 64 x 1024 matrix is far below where a custom kernel would pay off.

Design notes: launches and passes over memory (``N x C x H x W`` tensors; the squeeze
vectors are ``[N, C]``)
-------------------------------------------------------------------------------------
* forward: 3 launches -- pool (reads x), fc (vectors only), apply (reads x [+ residual],
  writes y): 2 reads of x, 1 write.
* backward: 3 launches + 4 small ATen products / sums for the FC weight and bias gradients --
  reduce (reads dy, x [+ residual], writes dresidual when wanted), fc backward (vectors
  only), apply (reads dy, x [+ residual], writes dx). A rebuilt output costs one apply launch
  in the consumer's backward.
* host: launch parameters per shape are cached.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .activations import act_code, apply_act, grad_through_act
from .utils import PlanCache, as_cl, cdiv, interpreting, pow2, rebuild_apply


# --------------------------------------------------------------------------- shared pieces

@triton.jit
def _cblock(c0, C, BLOCK_C: tl.constexpr):
    """Channel offsets starting at ``c0`` and their in-range mask."""
    cols = c0 + tl.arange(0, BLOCK_C)
    return cols, cols < C


@triton.jit
def _hw_chunk(n, r0, HW, C, cols, c_ok, BLOCK_HW: tl.constexpr):
    """Offsets and mask of rows ``r0 ..`` of sample ``n``'s ``[HW, C]`` slab (channels ``cols``)."""
    rows = r0 + tl.arange(0, BLOCK_HW)
    return (n.to(tl.int64) * HW + rows)[:, None] * C + cols[None, :], (rows < HW)[:, None] & c_ok[None, :]


@triton.jit
def _rows_tile(R, HW, C, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """This program's tile of the NHWC matrix ``[R = N*HW, C]``: element offsets, offsets into
    the per-sample ``[N, C]`` vectors, and the mask."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols, c_ok = _cblock(tl.program_id(1) * BLOCK_C, C, BLOCK_C)
    mask = (rows < R)[:, None] & c_ok[None, :]
    return rows.to(tl.int64)[:, None] * C + cols[None, :], (rows // HW)[:, None] * C + cols[None, :], mask


@triton.jit
def _w1_block(w1_ptr, hid, h_ok, cols, c_ok, C):
    """fp32 ``[BLOCK_H, BLOCK_C]`` block of fc1's weight ``[HID, C]``."""
    return tl.load(w1_ptr + hid[:, None] * C + cols[None, :], mask=h_ok[:, None] & c_ok[None, :],
                   other=0.0).to(tl.float32)


@triton.jit
def _w2_block(w2_ptr, cols, c_ok, hid, h_ok, HID):
    """fp32 ``[BLOCK_C, BLOCK_H]`` block of fc2's weight ``[C, HID]``."""
    return tl.load(w2_ptr + cols[:, None] * HID + hid[None, :], mask=c_ok[:, None] & h_ok[None, :],
                   other=0.0).to(tl.float32)


@triton.jit
def _se_du(dy_ptr, x_ptr, res_ptr, off, mask, gate, act_param, ACT: tl.constexpr, HAS_RES: tl.constexpr):
    """(du, x) with du = dy * act'(x*g + r) recomputed."""
    x = tl.load(x_ptr + off, mask=mask, other=0.0).to(tl.float32)
    du = tl.load(dy_ptr + off, mask=mask, other=0.0).to(tl.float32)
    if ACT != 0:
        v = x * gate
        if HAS_RES:
            v += tl.load(res_ptr + off, mask=mask, other=0.0).to(tl.float32)
        du = grad_through_act(du, v, act_param, ACT)
    return tl.where(mask, du, 0.0), x


# --------------------------------------------------------------------------- forward

@triton.jit
def _se_pool_kernel(x_ptr, s_ptr, HW, C, BLOCK_HW: tl.constexpr, BLOCK_C: tl.constexpr):
    n = tl.program_id(0)
    cols, c_ok = _cblock(tl.program_id(1) * BLOCK_C, C, BLOCK_C)
    acc = tl.zeros((BLOCK_C,), tl.float32)
    for r0 in range(0, HW, BLOCK_HW):
        off, mask = _hw_chunk(n, r0, HW, C, cols, c_ok, BLOCK_HW)
        acc += tl.sum(tl.load(x_ptr + off, mask=mask, other=0.0).to(tl.float32), axis=0)
    tl.store(s_ptr + n * C + cols, acc / HW, mask=c_ok)


@triton.jit
def _se_fc_kernel(s_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, h_ptr, g_ptr, C, HID,
                  HAS_B1: tl.constexpr, HAS_B2: tl.constexpr,
                  BLOCK_H: tl.constexpr, BLOCK_C: tl.constexpr):
    n = tl.program_id(0)
    hid = tl.arange(0, BLOCK_H)
    h_ok = hid < HID
    acc = tl.zeros((BLOCK_H,), tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cols, c_ok = _cblock(c0, C, BLOCK_C)
        s = tl.load(s_ptr + n * C + cols, mask=c_ok, other=0.0)
        acc += tl.sum(_w1_block(w1_ptr, hid, h_ok, cols, c_ok, C) * s[None, :], axis=1)
    if HAS_B1:
        acc += tl.load(b1_ptr + hid, mask=h_ok, other=0.0).to(tl.float32)
    h = tl.where(h_ok, tl.maximum(acc, 0.0), 0.0)
    tl.store(h_ptr + n * HID + hid, h, mask=h_ok)
    for c0 in range(0, C, BLOCK_C):
        cols, c_ok = _cblock(c0, C, BLOCK_C)
        logit = tl.sum(_w2_block(w2_ptr, cols, c_ok, hid, h_ok, HID) * h[None, :], axis=1)
        if HAS_B2:
            logit += tl.load(b2_ptr + cols, mask=c_ok, other=0.0).to(tl.float32)
        tl.store(g_ptr + n * C + cols, 1.0 / (1.0 + tl.exp(-logit)), mask=c_ok)


@triton.jit
def _se_apply_kernel(x_ptr, g_ptr, res_ptr, y_ptr, R, HW, C, act_param,
                     ACT: tl.constexpr, HAS_RES: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    off, vec_off, mask = _rows_tile(R, HW, C, BLOCK_M, BLOCK_C)
    gate = tl.load(g_ptr + vec_off, mask=mask, other=0.0)
    v = tl.load(x_ptr + off, mask=mask, other=0.0).to(tl.float32) * gate
    if HAS_RES:
        v += tl.load(res_ptr + off, mask=mask, other=0.0).to(tl.float32)
    v = apply_act(v, act_param, ACT)
    tl.store(y_ptr + off, v.to(y_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------- backward

@triton.jit
def _se_bwd_reduce_kernel(dy_ptr, x_ptr, res_ptr, g_ptr, dg_ptr, dres_ptr, HW, C, act_param,
                          ACT: tl.constexpr, HAS_RES: tl.constexpr, STORE_DRES: tl.constexpr,
                          BLOCK_HW: tl.constexpr, BLOCK_C: tl.constexpr):
    n = tl.program_id(0)
    cols, c_ok = _cblock(tl.program_id(1) * BLOCK_C, C, BLOCK_C)
    gate = tl.load(g_ptr + n * C + cols, mask=c_ok, other=0.0)[None, :]
    acc = tl.zeros((BLOCK_C,), tl.float32)
    for r0 in range(0, HW, BLOCK_HW):
        off, mask = _hw_chunk(n, r0, HW, C, cols, c_ok, BLOCK_HW)
        du, x = _se_du(dy_ptr, x_ptr, res_ptr, off, mask, gate, act_param, ACT, HAS_RES)
        if STORE_DRES:
            tl.store(dres_ptr + off, du.to(dres_ptr.dtype.element_ty), mask=mask)
        acc += tl.sum(du * x, axis=0)
    tl.store(dg_ptr + n * C + cols, acc, mask=c_ok)


@triton.jit
def _se_fc_bwd_kernel(dg_ptr, g_ptr, h_ptr, w1_ptr, w2_ptr, dl2_ptr, dh_ptr, ds_ptr, C, HID,
                      BLOCK_H: tl.constexpr, BLOCK_C: tl.constexpr):
    n = tl.program_id(0)
    hid = tl.arange(0, BLOCK_H)
    h_ok = hid < HID
    dh = tl.zeros((BLOCK_H,), tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cols, c_ok = _cblock(c0, C, BLOCK_C)
        gate = tl.load(g_ptr + n * C + cols, mask=c_ok, other=0.0)
        dl2 = tl.load(dg_ptr + n * C + cols, mask=c_ok, other=0.0) * gate * (1.0 - gate)
        tl.store(dl2_ptr + n * C + cols, dl2, mask=c_ok)
        dh += tl.sum(_w2_block(w2_ptr, cols, c_ok, hid, h_ok, HID) * dl2[:, None], axis=0)
    h = tl.load(h_ptr + n * HID + hid, mask=h_ok, other=0.0)
    dh = tl.where(h > 0, dh, 0.0)
    tl.store(dh_ptr + n * HID + hid, dh, mask=h_ok)
    for c0 in range(0, C, BLOCK_C):
        cols, c_ok = _cblock(c0, C, BLOCK_C)
        ds = tl.sum(_w1_block(w1_ptr, hid, h_ok, cols, c_ok, C) * dh[:, None], axis=0)
        tl.store(ds_ptr + n * C + cols, ds, mask=c_ok)


@triton.jit
def _se_bwd_apply_kernel(dy_ptr, x_ptr, res_ptr, g_ptr, ds_ptr, dx_ptr, R, HW, C, act_param,
                         ACT: tl.constexpr, HAS_RES: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    off, vec_off, mask = _rows_tile(R, HW, C, BLOCK_M, BLOCK_C)
    gate = tl.load(g_ptr + vec_off, mask=mask, other=0.0)
    du, x = _se_du(dy_ptr, x_ptr, res_ptr, off, mask, gate, act_param, ACT, HAS_RES)
    dx = du * gate + tl.load(ds_ptr + vec_off, mask=mask, other=0.0) / HW
    tl.store(dx_ptr + off, dx.to(dx_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------- launchers

_PLANS = PlanCache()


def _layout(n, c, hw, hid):
    """Grids and block sizes of the SE launches for one shape (cached)."""
    interp = interpreting()
    key = (n, c, hw, hid, interp)
    lay = _PLANS.get(key)
    if lay is None:
        lim = 8192 if interp else 4096
        bc = pow2(c, 16, 64)
        bhw = pow2(hw, 16, lim // bc)
        bm = pow2(n * hw, 16, lim // bc)
        bh = pow2(hid, 16, 4096)
        lay = _PLANS.put(key, dict(
            per_sample=((n, cdiv(c, bc)), dict(BLOCK_HW=bhw, BLOCK_C=bc)),
            fc=((n,), dict(BLOCK_H=bh, BLOCK_C=pow2(c, 16, max(16, 4096 // bh)))),
            rows=((cdiv(n * hw, bm), cdiv(c, bc)), dict(BLOCK_M=bm, BLOCK_C=bc))))
    return lay


def _se_apply(x, g, rx, act, act_param):
    """``act(x * g[n, c] [+ residual])`` over channels_last ``x``: the forward's last launch,
    and the recipe that rebuilds the block output in backward (same kernel, same inputs: bit
    for bit)."""
    n, c, hh, ww = x.shape
    hw = hh * ww
    y = torch.empty_like(x)
    grid, blocks = _layout(n, c, hw, 0)["rows"]
    _se_apply_kernel[grid](x, g, x if rx is None else rx, y, n * hw, hw, c, float(act_param),
                           ACT=act_code(act), HAS_RES=rx is not None, **blocks)
    return y


class _SeBlockFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2, residual, cfg, rebuild):
        act, act_param, records = cfg
        n, c, hh, ww = x.shape
        hw, hid = hh * ww, w1.shape[0]
        xc = as_cl(x)
        rc = as_cl(residual)
        lay = _layout(n, c, hw, hid)
        dev = x.device
        s = torch.empty((n, c), device=dev, dtype=torch.float32)
        h = torch.empty((n, hid), device=dev, dtype=torch.float32)
        g = torch.empty((n, c), device=dev, dtype=torch.float32)
        grid, blocks = lay["per_sample"]
        _se_pool_kernel[grid](xc, s, hw, c, **blocks)
        grid, blocks = lay["fc"]
        _se_fc_kernel[grid](s, w1, w1 if b1 is None else b1, w2, w2 if b2 is None else b2, h, g,
                            c, hid, HAS_B1=b1 is not None, HAS_B2=b2 is not None, **blocks)
        y = _se_apply(xc, g, rc, act, act_param)
        if rebuild is not None:
            # the block output is rebuilt from x (a recipe itself in a fused SE-ResNeXt), the
            # gate and the residual by the same apply launch (fastcnn.recompute)
            rebuild.extend((rebuild_apply, _se_apply, xc, (g,), residual, act, act_param))
        if records and any(ctx.needs_input_grad[:6]):
            ctx.cfg = cfg
            ctx.bias_dtypes = (None if b1 is None else b1.dtype, None if b2 is None else b2.dtype)
            ctx.save_for_backward(xc, s, h, g, w1, w2, rc if act != "identity" else None)
        return y

    @staticmethod
    def backward(ctx, dy):
        xc, s, h, g, w1, w2, rc = ctx.saved_tensors
        act, act_param, _ = ctx.cfg
        n, c, hh, ww = xc.shape
        hw, hid = hh * ww, w1.shape[0]
        lay = _layout(n, c, hw, hid)
        need_x, need_w1, need_b1, need_w2, need_b2, need_r = ctx.needs_input_grad[:6]
        dyc = as_cl(dy.to(xc.dtype))
        meta = dict(ACT=act_code(act), HAS_RES=rc is not None and act != "identity")
        res = xc if rc is None else rc
        dev = xc.device
        dg = torch.empty((n, c), device=dev, dtype=torch.float32)
        dres = torch.empty_like(xc) if need_r else None
        grid, blocks = lay["per_sample"]
        _se_bwd_reduce_kernel[grid](
            dyc, xc, res, g, dg, xc if dres is None else dres, hw, c, float(act_param), STORE_DRES=need_r,
            **blocks, **meta)
        dl2 = torch.empty((n, c), device=dev, dtype=torch.float32)
        dh = torch.empty((n, hid), device=dev, dtype=torch.float32)
        ds = torch.empty((n, c), device=dev, dtype=torch.float32)
        grid, blocks = lay["fc"]
        _se_fc_bwd_kernel[grid](dg, g, h, w1, w2, dl2, dh, ds, c, hid, **blocks)
        dx = None
        if need_x:
            dx = torch.empty_like(xc)
            grid, blocks = lay["rows"]
            _se_bwd_apply_kernel[grid](
                dyc, xc, res, g, ds, dx, n * hw, hw, c, float(act_param), **blocks, **meta)
        b1_dt, b2_dt = ctx.bias_dtypes
        dw1 = (dh.t() @ s).to(w1.dtype) if need_w1 else None
        db1 = dh.sum(0).to(b1_dt) if need_b1 else None
        dw2 = (dl2.t() @ h).to(w2.dtype) if need_w2 else None
        db2 = dl2.sum(0).to(b2_dt) if need_b2 else None
        return dx, dw1, db1, dw2, db2, dres, None, None


def se_block(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, *, residual=None, act="relu", act_param=0.0,
             rebuild=None):
    """Same signature and result as :func:`fastcnn.ops.reference.se_block`. ``rebuild``: a list
    that receives ``(fn, *args)`` with ``fn(*args)`` recomputing the output bit for bit (for
    :func:`fastcnn.recompute.mark_rebuildable`, which the ops layer calls)."""
    return _SeBlockFn.apply(x, fc1_weight.contiguous(), fc1_bias, fc2_weight.contiguous(), fc2_bias,
                            residual, (act, float(act_param), torch.is_grad_enabled()), rebuild)
