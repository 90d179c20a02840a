"""``bn_act``: ``act(BN(x) [+ residual])`` -- the pre-activation prologue and the final
BN-ReLU -- plus the BatchNorm pieces that ``conv_bn_act`` reuses.

Design
------
All tensors are viewed as NHWC matrices ``[M = N*H*W, C]``; every kernel tiles rows x
channels (BLOCK_M x BLOCK_C, channels contiguous).

* **Batch statistics** (training): ``_bn_stats_kernel`` gives each program a slab of
  ``rows_per_tile`` rows and writes the slab's mean and centred sum of squares ``M2``
  (fp32; within a slab, chunks are merged with Chan's parallel formula). ``conv_bn_act``
  produces the same per-tile partials in its conv epilogue instead. ``_bn_finalize_kernel``
  (one program per channel block) merges the partials (Chan again: no ``E[x^2]-E[x]^2``
  cancellation), writes mean / invstd and the folded per-channel ``scale = gamma*invstd``,
  ``shift = beta - mean*scale``, and updates ``running_mean`` / ``running_var`` in place
  exactly as ``nn.BatchNorm2d`` (momentum; unbiased variance ``M2/(M-1)`` for the running
  var). In eval mode the same kernel folds the running statistics instead.
* **Apply**: ``_bn_apply_kernel`` writes ``y = act(x*scale + shift [+ residual])``.
* **Saved for backward**: the BN input (NHWC, its own dtype), per-channel mean and invstd
  (fp32), and a reference to the residual only when a non-identity activation follows it.
  The normalised and activated values are recomputed. In training the forward hands its
  caller a recipe that rebuilds the output bit for bit (``bn_apply`` on the same input,
  scale/shift and residual; ``rebuild=`` of :func:`bn_act`): the ops layer marks the output
  rebuildable with it (:mod:`fastcnn.recompute`), so the conv that consumes it inside a
  fused model keeps a recipe instead of a second activation.
* **Backward**, one reduction pass then one elementwise pass:
  ``_bn_bwd_reduce_kernel`` recomputes ``v = xhat*gamma + beta [+ r]`` and
  ``du = dy * act'(v)`` and reduces per-channel ``sum(du)`` and ``sum(du*xhat)`` (fp32
  partials per slab, summed once) -- these are also ``dbeta`` and ``dgamma``;
  ``_bn_bwd_apply_kernel`` writes ``dx = gamma*invstd*(du - (sum(du) + xhat*sum(du*xhat))/M)``
  (eval: ``du*gamma*invstd``) and, if wanted, ``dresidual = du``.

No cuDNN / PyTorch normalisation call is used; the only PyTorch compute is the ``sum``
over the per-slab partials of the backward reduction.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .activations import act_code, act_grad, apply_act
from .utils import from_nhwc, interpreting, nchw_output, pow2, rebuild_nchw_res, to_nhwc


# --------------------------------------------------------------------------- kernels

@triton.jit
def _bn_stats_kernel(x_ptr, pmean_ptr, pm2_ptr, M, C, ROWS,
                     BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = cols < C
    n_a = tl.sum(tl.zeros((BLOCK_M,), tl.float32), axis=0)
    mean_a = tl.zeros((BLOCK_C,), tl.float32)
    m2_a = tl.zeros((BLOCK_C,), tl.float32)
    r0 = pid * ROWS
    r_end = tl.minimum(M, r0 + ROWS)
    for start in range(r0, r_end, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        r_ok = rows < r_end
        mask = r_ok[:, None] & c_ok[None, :]
        v = tl.load(x_ptr + rows.to(tl.int64)[:, None] * C + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        n_b = tl.sum(r_ok.to(tl.float32), axis=0)
        mean_b = tl.sum(v, axis=0) / n_b
        d = tl.where(mask, v - mean_b[None, :], 0.0)
        m2_b = tl.sum(d * d, axis=0)
        n = n_a + n_b
        delta = mean_b - mean_a
        mean_a += delta * (n_b / n)
        m2_a += m2_b + delta * delta * (n_a * n_b / n)
        n_a = n
    tl.store(pmean_ptr + pid * C + cols, mean_a, mask=c_ok)
    tl.store(pm2_ptr + pid * C + cols, m2_a, mask=c_ok)


@triton.jit
def _bn_finalize_kernel(pmean_ptr, pm2_ptr, gamma_ptr, beta_ptr, rm_ptr, rv_ptr,
                        mean_ptr, invstd_ptr, scale_ptr, shift_ptr,
                        T, M, C, ROWS, momentum, eps,
                        TRAIN: tl.constexpr, HAS_RUNNING: tl.constexpr,
                        BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = cols < C
    if TRAIN:
        n_a = tl.sum(tl.zeros((BLOCK_T,), tl.float32), axis=0)
        mean_a = tl.zeros((BLOCK_C,), tl.float32)
        m2_a = tl.zeros((BLOCK_C,), tl.float32)
        for t0 in range(0, T, BLOCK_T):
            t = t0 + tl.arange(0, BLOCK_T)
            t_ok = t < T
            cnt = tl.where(t_ok, tl.minimum(M - t * ROWS, ROWS), 0).to(tl.float32)
            mask = t_ok[:, None] & c_ok[None, :]
            pm = tl.load(pmean_ptr + t[:, None] * C + cols[None, :], mask=mask, other=0.0)
            p2 = tl.load(pm2_ptr + t[:, None] * C + cols[None, :], mask=mask, other=0.0)
            n_b = tl.sum(cnt, axis=0)
            mean_b = tl.sum(cnt[:, None] * pm, axis=0) / n_b
            dm = pm - mean_b[None, :]
            m2_b = tl.sum(p2 + cnt[:, None] * dm * dm, axis=0)
            n = n_a + n_b
            delta = mean_b - mean_a
            mean_a += delta * (n_b / n)
            m2_a += m2_b + delta * delta * (n_a * n_b / n)
            n_a = n
        mean = mean_a
        var = m2_a / n_a
        if HAS_RUNNING:
            rm = tl.load(rm_ptr + cols, mask=c_ok, other=0.0).to(tl.float32)
            rv = tl.load(rv_ptr + cols, mask=c_ok, other=0.0).to(tl.float32)
            rm = (1.0 - momentum) * rm + momentum * mean
            rv = (1.0 - momentum) * rv + momentum * (m2_a / (n_a - 1.0))
            tl.store(rm_ptr + cols, rm.to(rm_ptr.dtype.element_ty), mask=c_ok)
            tl.store(rv_ptr + cols, rv.to(rv_ptr.dtype.element_ty), mask=c_ok)
    else:
        mean = tl.load(rm_ptr + cols, mask=c_ok, other=0.0).to(tl.float32)
        var = tl.load(rv_ptr + cols, mask=c_ok, other=1.0).to(tl.float32)
    invstd = 1.0 / tl.sqrt(var + eps)
    gam = tl.load(gamma_ptr + cols, mask=c_ok, other=1.0).to(tl.float32)
    bet = tl.load(beta_ptr + cols, mask=c_ok, other=0.0).to(tl.float32)
    scale = gam * invstd
    tl.store(mean_ptr + cols, mean, mask=c_ok)
    tl.store(invstd_ptr + cols, invstd, mask=c_ok)
    tl.store(scale_ptr + cols, scale, mask=c_ok)
    tl.store(shift_ptr + cols, bet - mean * scale, mask=c_ok)


@triton.jit
def _bn_apply_kernel(x_ptr, scale_ptr, shift_ptr, res_ptr, y_ptr, M, C, act_param,
                     ACT: tl.constexpr, HAS_RES: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = cols < C
    mask = (rows < M)[:, None] & c_ok[None, :]
    off = rows.to(tl.int64)[:, None] * C + cols[None, :]
    scale = tl.load(scale_ptr + cols, mask=c_ok, other=0.0)
    shift = tl.load(shift_ptr + cols, mask=c_ok, other=0.0)
    v = tl.load(x_ptr + off, mask=mask, other=0.0).to(tl.float32) * scale[None, :] + shift[None, :]
    if HAS_RES:
        v += tl.load(res_ptr + off, mask=mask, other=0.0).to(tl.float32)
    v = apply_act(v, act_param, ACT)
    tl.store(y_ptr + off, v.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _recompute_du(dy_ptr, x_ptr, res_ptr, off, mask, mean, invstd, gam, bet, act_param,
                  ACT: tl.constexpr, HAS_RES: tl.constexpr):
    """(du, xhat): the activation's input recomputed from the saved BN input."""
    xhat = (tl.load(x_ptr + off, mask=mask, other=0.0).to(tl.float32) - mean[None, :]) * invstd[None, :]
    du = tl.load(dy_ptr + off, mask=mask, other=0.0).to(tl.float32)
    if ACT != 0:
        v = xhat * gam[None, :] + bet[None, :]
        if HAS_RES:
            v += tl.load(res_ptr + off, mask=mask, other=0.0).to(tl.float32)
        du = du * act_grad(v, act_param, ACT)
    du = tl.where(mask, du, 0.0)
    return du, xhat


@triton.jit
def _bn_bwd_reduce_kernel(dy_ptr, x_ptr, res_ptr, mean_ptr, invstd_ptr, gamma_ptr, beta_ptr, part_ptr,
                          M, C, ROWS, act_param,
                          ACT: tl.constexpr, HAS_RES: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = cols < C
    mean = tl.load(mean_ptr + cols, mask=c_ok, other=0.0)
    invstd = tl.load(invstd_ptr + cols, mask=c_ok, other=0.0)
    gam = tl.load(gamma_ptr + cols, mask=c_ok, other=0.0).to(tl.float32)
    bet = tl.load(beta_ptr + cols, mask=c_ok, other=0.0).to(tl.float32)
    s_du = tl.zeros((BLOCK_C,), tl.float32)
    s_dux = tl.zeros((BLOCK_C,), tl.float32)
    r0 = pid * ROWS
    r_end = tl.minimum(M, r0 + ROWS)
    for start in range(r0, r_end, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        mask = (rows < r_end)[:, None] & c_ok[None, :]
        off = rows.to(tl.int64)[:, None] * C + cols[None, :]
        du, xhat = _recompute_du(dy_ptr, x_ptr, res_ptr, off, mask, mean, invstd, gam, bet, act_param,
                                 ACT, HAS_RES)
        s_du += tl.sum(du, axis=0)
        s_dux += tl.sum(du * xhat, axis=0)
    # partials laid out [T, 2, C]
    tl.store(part_ptr + (pid * 2) * C + cols, s_du, mask=c_ok)
    tl.store(part_ptr + (pid * 2 + 1) * C + cols, s_dux, mask=c_ok)


@triton.jit
def _bn_bwd_apply_kernel(dy_ptr, x_ptr, res_ptr, mean_ptr, invstd_ptr, gamma_ptr, beta_ptr, sums_ptr,
                         dx_ptr, dres_ptr, M, C, act_param,
                         ACT: tl.constexpr, HAS_RES: tl.constexpr, TRAIN: tl.constexpr,
                         STORE_DRES: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = cols < C
    mask = (rows < M)[:, None] & c_ok[None, :]
    off = rows.to(tl.int64)[:, None] * C + cols[None, :]
    mean = tl.load(mean_ptr + cols, mask=c_ok, other=0.0)
    invstd = tl.load(invstd_ptr + cols, mask=c_ok, other=0.0)
    gam = tl.load(gamma_ptr + cols, mask=c_ok, other=0.0).to(tl.float32)
    bet = tl.load(beta_ptr + cols, mask=c_ok, other=0.0).to(tl.float32)
    du, xhat = _recompute_du(dy_ptr, x_ptr, res_ptr, off, mask, mean, invstd, gam, bet, act_param,
                             ACT, HAS_RES)
    if STORE_DRES:
        tl.store(dres_ptr + off, du.to(dres_ptr.dtype.element_ty), mask=mask)
    k = gam * invstd
    if TRAIN:
        s_du = tl.load(sums_ptr + cols, mask=c_ok, other=0.0)
        s_dux = tl.load(sums_ptr + C + cols, mask=c_ok, other=0.0)
        dx = (du - (s_du[None, :] + xhat * s_dux[None, :]) / M) * k[None, :]
    else:
        dx = du * k[None, :]
    tl.store(dx_ptr + off, dx.to(dx_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------- launchers

def _blocks(m, c):
    bc = pow2(c, 16, 64)
    bm = pow2(m, 16, (8192 if interpreting() else 4096) // bc)
    return bm, bc


def _rows_per_tile(m, c, device):
    """Rows each reduction program owns: few programs under the interpreter; on GPU enough
    programs (~4 per SM) to fill the machine while keeping the partial buffers small."""
    bm, bc = _blocks(m, c)
    if interpreting():
        return max(bm, triton.cdiv(m, 4)), bm, bc
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    progs = max(1, 4 * sms // triton.cdiv(c, bc))
    rows = triton.cdiv(triton.cdiv(m, progs), bm) * bm
    return max(bm, rows), bm, bc


def check_batch(m: int, c: int, training: bool):
    if training and m <= 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got {m} value(s) "
                         f"for each of {c} channels")


def bn_stats(xh):
    """Per-slab (mean, M2) partials of the NHWC matrix ``xh``; returns (pmean, pm2, rows)."""
    c = xh.shape[-1]
    m = xh.numel() // c
    rows, bm, bc = _rows_per_tile(m, c, xh.device)
    t = triton.cdiv(m, rows)
    pmean = torch.empty((t, c), device=xh.device, dtype=torch.float32)
    pm2 = torch.empty_like(pmean)
    _bn_stats_kernel[(t, triton.cdiv(c, bc))](xh, pmean, pm2, m, c, rows, BLOCK_M=bm, BLOCK_C=bc)
    return pmean, pm2, rows


def bn_finalize(pmean, pm2, rows, m, bn_weight, bn_bias, running_mean, running_var, *, training,
                momentum, eps, device):
    """(mean, invstd, scale, shift), fp32 per channel; updates the running stats in training."""
    c = bn_weight.numel()
    mean, invstd, scale, shift = torch.empty((4, c), device=device, dtype=torch.float32)
    has_running = running_mean is not None and running_var is not None
    t = pmean.shape[0] if training else 0
    bc = pow2(c, 16, 128)
    dummy = mean
    _bn_finalize_kernel[(triton.cdiv(c, bc),)](
        pmean if training else dummy, pm2 if training else dummy, bn_weight, bn_bias,
        running_mean if has_running else dummy, running_var if has_running else dummy,
        mean, invstd, scale, shift, t, m, c, rows, float(momentum), float(eps),
        TRAIN=training, HAS_RUNNING=has_running, BLOCK_T=pow2(t, 16, 64), BLOCK_C=bc)
    return mean, invstd, scale, shift


def bn_apply(xh, scale, shift, rh, act, act_param):
    c = xh.shape[-1]
    m = xh.numel() // c
    bm, bc = _blocks(m, c)
    y = torch.empty_like(xh)
    _bn_apply_kernel[(triton.cdiv(m, bm), triton.cdiv(c, bc))](
        xh, scale, shift, rh if rh is not None else xh, y, m, c, float(act_param),
        ACT=act_code(act), HAS_RES=rh is not None, BLOCK_M=bm, BLOCK_C=bc)
    return y


def bn_act_backward(dyh, xh, mean, invstd, bn_weight, bn_bias, rh, act, act_param, *, training,
                    need_dx=True, need_dres=False):
    """Fused act + BN backward over NHWC tensors. Returns (dx, sum_du, sum_du_xhat, dres);
    ``sum_du`` is dL/dbeta and ``sum_du_xhat`` dL/dgamma (fp32)."""
    c = xh.shape[-1]
    m = xh.numel() // c
    rows, bm, bc = _rows_per_tile(m, c, xh.device)
    t = triton.cdiv(m, rows)
    part = torch.empty((t, 2, c), device=xh.device, dtype=torch.float32)
    res = rh if rh is not None else xh
    meta = dict(ACT=act_code(act), HAS_RES=rh is not None and act != "identity", BLOCK_C=bc)
    _bn_bwd_reduce_kernel[(t, triton.cdiv(c, bc))](
        dyh, xh, res, mean, invstd, bn_weight, bn_bias, part, m, c, rows, float(act_param),
        BLOCK_M=bm, num_warps=8, **meta)  # 4 warps spill with gelu on sm_80 (tests/test_triton_compile.py)
    sums = part.sum(0)
    dx = dres = None
    if need_dx or need_dres:
        dx = torch.empty_like(xh) if need_dx else xh
        dres = torch.empty_like(xh) if need_dres else xh
        _bn_bwd_apply_kernel[(triton.cdiv(m, bm), triton.cdiv(c, bc))](
            dyh, xh, res, mean, invstd, bn_weight, bn_bias, sums, dx, dres, m, c, float(act_param),
            TRAIN=training, STORE_DRES=need_dres, BLOCK_M=bm, num_warps=8, **meta)
        dx = dx if need_dx else None
        dres = dres if need_dres else None
    return dx, sums[0], sums[1], dres


# --------------------------------------------------------------------------- autograd

class _BnActFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bn_weight, bn_bias, running_mean, running_var, residual, cfg, rebuild):
        training, momentum, eps, act, act_param = cfg
        xh = to_nhwc(x)
        rh = to_nhwc(residual)
        c = xh.shape[-1]
        m = xh.numel() // c
        check_batch(m, c, training)
        if training:
            pmean, pm2, rows = bn_stats(xh)
        else:
            pmean = pm2 = None
            rows = 1
        mean, invstd, scale, shift = bn_finalize(pmean, pm2, rows, m, bn_weight, bn_bias, running_mean,
                                                 running_var, training=training, momentum=momentum,
                                                 eps=eps, device=x.device)
        y = nchw_output(bn_apply(xh, scale, shift, rh, act, act_param))
        if training and rebuild is not None:
            # the recipe of y for the caller (fastcnn.recompute): the same apply launch on the
            # same input, scale/shift and residual rebuilds it bit for bit
            rebuild.extend((rebuild_nchw_res, bn_apply, xh, (scale, shift), residual, act, act_param))
        ctx.cfg = cfg
        ctx.save_for_backward(xh, mean, invstd, bn_weight, bn_bias,
                              rh if act != "identity" else None)
        return y

    @staticmethod
    def backward(ctx, dy):
        xh, mean, invstd, bn_weight, bn_bias, rh = ctx.saved_tensors
        training, _, _, act, act_param = ctx.cfg
        need_x, need_w, need_b, _, _, need_r = ctx.needs_input_grad[:6]
        dyh = to_nhwc(dy.to(xh.dtype))
        dx, s_du, s_dux, dres = bn_act_backward(dyh, xh, mean, invstd, bn_weight, bn_bias, rh, act,
                                                act_param, training=training, need_dx=need_x,
                                                need_dres=need_r)
        return (from_nhwc(dx) if dx is not None else None,
                s_dux.to(bn_weight.dtype) if need_w else None,
                s_du.to(bn_bias.dtype) if need_b else None,
                None, None,
                from_nhwc(dres) if dres is not None else None,
                None, None)


def bn_act(x, bn_weight, bn_bias, running_mean, running_var, *, training=True, momentum=0.1,
           eps=1e-5, act="relu", act_param=0.0, residual=None, rebuild=None):
    """Same signature and result as :func:`fastcnn.ops.reference.bn_act`. ``rebuild``: a list
    that, in training, receives ``(fn, *args)`` with ``fn(*args)`` recomputing the output bit
    for bit (for :func:`fastcnn.recompute.mark_rebuildable`, which the ops layer calls)."""
    return _BnActFn.apply(x, bn_weight, bn_bias, running_mean, running_var, residual,
                          (bool(training), float(momentum), float(eps), act, float(act_param)), rebuild)
