"""``bn_act``: ``act(BN(x) [+ residual])`` -- the pre-activation prologue and the final
BN-ReLU -- plus the BatchNorm pieces that ``conv_bn_act`` reuses.

Design
------
Every tensor is a channels_last ``(N, C, H, W)`` tensor, i.e. the NHWC matrix
``[M = N*H*W, C]`` (see :mod:`.utils`); every kernel tiles rows x channels (BLOCK_M x BLOCK_C,
channels contiguous).

* **Batch statistics** (training): ``_bn_stats_kernel`` gives each program a slab of
  ``rows_per_tile`` rows and writes the slab's mean and centred sum of squares ``M2``
  (fp32 ``[T, 2, C]`` partials; within a slab, chunks are merged with Chan's parallel
  formula). ``conv_bn_act`` produces the same per-tile partials in its conv epilogue instead.
* **Finalize**: ``_bn_finalize_kernel`` (one program per channel block) merges the partials
  (Chan again: no ``E[x^2]-E[x]^2`` cancellation), writes the per-channel ``[4, C]`` fp32
  vector block ``stats = (mean, invstd, scale = gamma*invstd, shift = beta - mean*scale)`` and
  updates ``running_mean`` / ``running_var`` in place exactly as ``nn.BatchNorm2d`` (momentum;
  unbiased variance ``M2/(M-1)`` for the running var). In eval mode the same kernel folds the
  running statistics instead. **Many partial rows** (more than :data:`DIRECT_ROWS`: a conv at
  batch 128 and 32x32 has 1024-2048 tiles) are first reduced in parallel:
  ``_bn_merge_kernel`` (grid: row groups x channel blocks) merges each group of
  :data:`MERGE_ROWS` rows into one row with the same Chan formula (same numerics, one more
  tree level), so the finalize program walks a few dozen rows instead of thousands serially.
* **Apply**: ``_bn_apply_kernel`` writes ``y = act(x*scale + shift [+ residual])``; in eval
  mode without autograd it folds the running statistics itself (``BN_EVAL``), so inference is
  a single launch.
* **Saved for backward**: the BN input (its own dtype), the ``[4, C]`` stats block, and a
  reference to the residual only when a non-identity activation follows it. The normalised
  and activated values are recomputed. In training the forward hands its caller a recipe
  that rebuilds the output bit for bit (``bn_apply`` on the same input, stats and residual;
  ``rebuild=`` of :func:`bn_act`): the ops layer marks the output rebuildable with it
  (:mod:`fastcnn.recompute`), so the conv that consumes it inside a fused model keeps a
  recipe instead of a second activation.
* **Backward**, one reduction pass then one elementwise pass:
  ``_bn_bwd_reduce_kernel`` recomputes ``v = xhat*gamma + beta [+ r]`` and
  ``du = dy * act'(v)`` and reduces per-channel ``sum(du)`` and ``sum(du*xhat)`` (fp32
  partials per slab, summed once) -- these are also ``dbeta`` and ``dgamma``;
  ``_bn_bwd_apply_kernel`` writes ``dx = gamma*invstd*(du - (sum(du) + xhat*sum(du*xhat))/M)``
  (eval: ``du*gamma*invstd``) and, if wanted, ``dresidual = du``.

Design notes: launches and passes over memory (``M x C`` tensors; the ``[T, 2, C]`` partials
and ``[4, C]`` vectors are small)
--------------------------------------------------------------------------------------------
* forward, training: 3 launches (4 with more than :data:`DIRECT_ROWS` partial rows) --
  stats (reads x), [merge], finalize (partials -> stats, running stats), apply (reads x
  [+ residual], writes y): 2 reads of x, 1 write.
* forward, eval without autograd: 1 launch -- apply with BN folded in (reads x [+ residual],
  writes y). Eval with autograd: 2 (finalize from the running stats, apply).
* backward: 2 launches + 1 ATen ``sum`` of the partials -- reduce (reads dy, x [+ residual]),
  apply (reads dy, x [+ residual], writes dx [and dresidual]). A rebuilt output (recipe)
  costs one more apply launch in the consumer's backward.
* host: per call one stats-partials buffer is *reused* (:func:`~.utils.scratch`: the
  partials live only between the stats and finalize launches), launch parameters come from a
  per-shape cache, and the stats block is one ``[4, C]`` allocation passed as one pointer.

No cuDNN / PyTorch normalisation call is used; the only PyTorch compute is the ``sum``
over the per-slab partials of the backward reduction.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .activations import act_code, apply_act, grad_through_act
from .utils import PlanCache, as_cl, cdiv, interpreting, num_sms, pow2, rebuild_apply, scratch

#: partial rows the finalize merges itself; above, ``_bn_merge_kernel`` reduces them first
DIRECT_ROWS = 128
#: rows each program of ``_bn_merge_kernel`` merges (one tile, no loop)
MERGE_ROWS = 64


# --------------------------------------------------------------------------- kernels

@triton.jit
def _bn_stats_kernel(x_ptr, part_ptr, M, C, ROWS,
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
    # partials laid out [T, 2, C]: the slab's mean, then its centred sum of squares
    tl.store(part_ptr + (pid * 2) * C + cols, mean_a, mask=c_ok)
    tl.store(part_ptr + (pid * 2 + 1) * C + cols, m2_a, mask=c_ok)


@triton.jit
def _merge_tile(part_ptr, t, t_ok, cols, c_ok, M, C, ROWS):
    """(count, mean, M2) of the partial rows ``t`` (a [BLOCK_T] block; row ``t`` covers values
    ``[t*ROWS, min(M, (t+1)*ROWS))``) for channels ``cols``, merged with Chan's formula."""
    cnt = tl.where(t_ok, tl.minimum(M - t * ROWS, ROWS), 0).to(tl.float32)
    mask = t_ok[:, None] & c_ok[None, :]
    pm = tl.load(part_ptr + (t * 2)[:, None] * C + cols[None, :], mask=mask, other=0.0)
    p2 = tl.load(part_ptr + (t * 2 + 1)[:, None] * C + cols[None, :], mask=mask, other=0.0)
    n_b = tl.sum(cnt, axis=0)
    mean_b = tl.sum(cnt[:, None] * pm, axis=0) / n_b
    dm = pm - mean_b[None, :]
    return n_b, mean_b, tl.sum(p2 + cnt[:, None] * dm * dm, axis=0)


@triton.jit
def _bn_merge_kernel(part_ptr, T, M, C, ROWS, OUT_OFF,
                     BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    """Row ``j`` of the level-2 partials (at ``part_ptr + OUT_OFF``, same ``[T2, 2, C]`` layout,
    ``BLOCK_T * ROWS`` values per row): partial rows ``[j*BLOCK_T, (j+1)*BLOCK_T)`` merged."""
    j = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = cols < C
    t = j * BLOCK_T + tl.arange(0, BLOCK_T)
    _, mean_b, m2_b = _merge_tile(part_ptr, t, t < T, cols, c_ok, M, C, ROWS)
    tl.store(part_ptr + OUT_OFF + (j * 2) * C + cols, mean_b, mask=c_ok)
    tl.store(part_ptr + OUT_OFF + (j * 2 + 1) * C + cols, m2_b, mask=c_ok)


@triton.jit
def _bn_finalize_kernel(part_ptr, gamma_ptr, beta_ptr, rm_ptr, rv_ptr, stats_ptr, momentum, eps,
                        P_OFF, T, M, C, ROWS,
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
            n_b, mean_b, m2_b = _merge_tile(part_ptr + P_OFF, t, t < T, cols, c_ok, M, C, ROWS)
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
    # the [4, C] stats block: mean, invstd, scale, shift
    tl.store(stats_ptr + cols, mean, mask=c_ok)
    tl.store(stats_ptr + C + cols, invstd, mask=c_ok)
    tl.store(stats_ptr + 2 * C + cols, scale, mask=c_ok)
    tl.store(stats_ptr + 3 * C + cols, bet - mean * scale, mask=c_ok)


@triton.jit
def _bn_apply_kernel(x_ptr, stats_ptr, res_ptr, y_ptr, rm_ptr, rv_ptr, gamma_ptr, beta_ptr, act_param, eps,
                     M, C,
                     ACT: tl.constexpr, HAS_RES: tl.constexpr, BN_EVAL: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = cols < C
    mask = (rows < M)[:, None] & c_ok[None, :]
    off = rows.to(tl.int64)[:, None] * C + cols[None, :]
    if BN_EVAL:  # scale / shift from the running statistics, as the finalize's eval branch
        invstd = 1.0 / tl.sqrt(tl.load(rv_ptr + cols, mask=c_ok, other=1.0).to(tl.float32) + eps)
        scale = tl.load(gamma_ptr + cols, mask=c_ok, other=1.0).to(tl.float32) * invstd
        shift = (tl.load(beta_ptr + cols, mask=c_ok, other=0.0).to(tl.float32)
                 - tl.load(rm_ptr + cols, mask=c_ok, other=0.0).to(tl.float32) * scale)
    else:
        scale = tl.load(stats_ptr + 2 * C + cols, mask=c_ok, other=0.0)
        shift = tl.load(stats_ptr + 3 * C + cols, mask=c_ok, other=0.0)
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
        du = grad_through_act(du, v, act_param, ACT)
    du = tl.where(mask, du, 0.0)
    return du, xhat


@triton.jit
def _bn_bwd_reduce_kernel(dy_ptr, x_ptr, res_ptr, stats_ptr, gamma_ptr, beta_ptr, part_ptr, act_param,
                          M, C, ROWS,
                          ACT: tl.constexpr, HAS_RES: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = cols < C
    mean = tl.load(stats_ptr + cols, mask=c_ok, other=0.0)
    invstd = tl.load(stats_ptr + C + cols, mask=c_ok, other=0.0)
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
def _bn_bwd_apply_kernel(dy_ptr, x_ptr, res_ptr, stats_ptr, gamma_ptr, beta_ptr, sums_ptr,
                         dx_ptr, dres_ptr, act_param, M, C,
                         ACT: tl.constexpr, HAS_RES: tl.constexpr, TRAIN: tl.constexpr,
                         STORE_DX: tl.constexpr, STORE_DRES: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = cols < C
    mask = (rows < M)[:, None] & c_ok[None, :]
    off = rows.to(tl.int64)[:, None] * C + cols[None, :]
    mean = tl.load(stats_ptr + cols, mask=c_ok, other=0.0)
    invstd = tl.load(stats_ptr + C + cols, mask=c_ok, other=0.0)
    gam = tl.load(gamma_ptr + cols, mask=c_ok, other=0.0).to(tl.float32)
    bet = tl.load(beta_ptr + cols, mask=c_ok, other=0.0).to(tl.float32)
    du, xhat = _recompute_du(dy_ptr, x_ptr, res_ptr, off, mask, mean, invstd, gam, bet, act_param,
                             ACT, HAS_RES)
    if STORE_DRES:
        tl.store(dres_ptr + off, du.to(dres_ptr.dtype.element_ty), mask=mask)
    if STORE_DX:
        k = gam * invstd
        if TRAIN:
            s_du = tl.load(sums_ptr + cols, mask=c_ok, other=0.0)
            s_dux = tl.load(sums_ptr + C + cols, mask=c_ok, other=0.0)
            dx = (du - (s_du[None, :] + xhat * s_dux[None, :]) / M) * k[None, :]
        else:
            dx = du * k[None, :]
        tl.store(dx_ptr + off, dx.to(dx_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------- launchers

_GEO = PlanCache()


def _layout(m, c, device):
    """``(rows per reduction program, BLOCK_M, BLOCK_C, programs T, reduction grid,
    elementwise grid)`` for an ``[m, c]`` matrix, cached per shape and device. The reductions
    take few programs under the interpreter; on a GPU enough (~4 per SM) to fill it while
    keeping the partial buffers small."""
    interp = interpreting()
    key = (m, c, device, interp)
    lay = _GEO.get(key)
    if lay is None:
        bc = pow2(c, 16, 64)
        bm = pow2(m, 16, (8192 if interp else 4096) // bc)
        if interp:
            rows = max(bm, cdiv(m, 4))
        else:
            progs = max(1, 4 * num_sms(device) // cdiv(c, bc))
            rows = max(bm, cdiv(cdiv(m, progs), bm) * bm)
        t = cdiv(m, rows)
        lay = _GEO.put(key, (rows, bm, bc, t, (t, cdiv(c, bc)), (cdiv(m, bm), cdiv(c, bc))))
    return lay


def check_batch(m: int, c: int, training: bool):
    if training and m <= 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got {m} value(s) "
                         f"for each of {c} channels")


def stats_scratch_numel(rows: int, c: int) -> int:
    """fp32 elements of a statistics-partials buffer for ``rows`` partial rows of ``c``
    channels, with room for the merged rows :func:`bn_finalize` may add after them."""
    return (rows + cdiv(rows, MERGE_ROWS)) * 2 * c


def bn_stats(x, m, c):
    """Per-slab (mean, M2) partials of channels_last ``x`` (``[m, c]``), in a reused scratch
    buffer; returns (part, rows written, values per row)."""
    rows, bm, bc, t, grid, _ = _layout(m, c, x.device)
    part = scratch(stats_scratch_numel(t, c), x.device)
    _bn_stats_kernel[grid](x, part, m, c, rows, BLOCK_M=bm, BLOCK_C=bc)
    return part, t, rows


_FIN = PlanCache()


def bn_finalize(part, t, rows, m, c, bn_weight, bn_bias, running_mean, running_var, *, training,
                momentum, eps, device) -> torch.Tensor:
    """The ``[4, C]`` fp32 stats block (mean, invstd, scale, shift) from ``t`` partial rows of
    ``rows`` values each in ``part`` (training; the buffer needs room for the merged rows, see
    :func:`stats_scratch_numel`) or from the running statistics (eval); updates the running
    statistics in training."""
    stats = torch.empty((4, c), device=device, dtype=torch.float32)
    has_running = running_mean is not None and running_var is not None
    key = (t, rows, m, c, training, device, interpreting())
    plan = _FIN.get(key)
    if plan is None:
        merge = None
        p_off, t_fin, rows_fin = 0, t, rows
        if training and t > DIRECT_ROWS:
            bcm = pow2(c, 16, 64)
            p_off, t_fin, rows_fin = t * 2 * c, cdiv(t, MERGE_ROWS), rows * MERGE_ROWS
            merge = ((t_fin, cdiv(c, bcm)), (t, m, c, rows, p_off), dict(BLOCK_T=MERGE_ROWS, BLOCK_C=bcm))
        bc = pow2(c, 16, 128)
        plan = _FIN.put(key, (merge, (cdiv(c, bc),), (p_off, t_fin if training else 0, m, c, rows_fin),
                              dict(BLOCK_T=pow2(t_fin, 16, 64), BLOCK_C=bc)))
    merge, grid, static, blocks = plan
    if merge is not None:
        _bn_merge_kernel[merge[0]](part, *merge[1], **merge[2])
    _bn_finalize_kernel[grid](
        part if training else stats, bn_weight, bn_bias,
        running_mean if has_running else stats, running_var if has_running else stats, stats,
        float(momentum), float(eps), *static, TRAIN=training, HAS_RUNNING=has_running, **blocks)
    return stats


def bn_apply(x, stats, rx, act, act_param, bn_eval=None):
    """``act(x*scale + shift [+ rx])`` over channels_last ``x`` with scale / shift from the
    ``[4, C]`` ``stats`` block -- or, with ``bn_eval`` = (running_mean, running_var, bn_weight,
    bn_bias, eps), folded from the running statistics in the same launch (``stats`` unused)."""
    n, c, h, w = x.shape
    m = n * h * w
    _, bm, bc, _, _, grid = _layout(m, c, x.device)
    y = torch.empty_like(x)
    rm, rv, gam, bet, eps = bn_eval if bn_eval is not None else (x, x, x, x, 0.0)
    _bn_apply_kernel[grid](
        x, x if stats is None else stats, x if rx is None else rx, y, rm, rv, gam, bet, float(act_param),
        float(eps), m, c, ACT=act_code(act), HAS_RES=rx is not None, BN_EVAL=bn_eval is not None,
        BLOCK_M=bm, BLOCK_C=bc)
    return y


def bn_act_backward(dy, x, stats, bn_weight, bn_bias, rx, act, act_param, *, training,
                    need_dx=True, need_dres=False):
    """Fused act + BN backward over channels_last tensors. Returns (dx, sums, dres): ``sums``
    is the ``[2, C]`` fp32 block (sum du = dL/dbeta, sum du*xhat = dL/dgamma)."""
    n, c, h, w = x.shape
    m = n * h * w
    rows, bm, bc, t, grid_r, grid_e = _layout(m, c, x.device)
    part = torch.empty((t, 2, c), device=x.device, dtype=torch.float32)
    res = x if rx is None else rx
    code, has_res = act_code(act), rx is not None and act != "identity"
    _bn_bwd_reduce_kernel[grid_r](
        dy, x, res, stats, bn_weight, bn_bias, part, float(act_param), m, c, rows,
        ACT=code, HAS_RES=has_res, BLOCK_M=bm, BLOCK_C=bc,
        num_warps=8)  # 4 warps spill with gelu on sm_80 (tests/test_triton_compile.py)
    sums = part[0] if t == 1 else part.sum(0)
    dx = dres = None
    if need_dx or need_dres:
        dx = torch.empty_like(x) if need_dx else None
        dres = torch.empty_like(x) if need_dres else None
        _bn_bwd_apply_kernel[grid_e](
            dy, x, res, stats, bn_weight, bn_bias, sums, x if dx is None else dx, x if dres is None else dres,
            float(act_param), m, c, ACT=code, HAS_RES=has_res, TRAIN=training, STORE_DX=need_dx,
            STORE_DRES=need_dres, BLOCK_M=bm, BLOCK_C=bc, num_warps=8)
    return dx, sums, dres


# --------------------------------------------------------------------------- autograd

class _BnActFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bn_weight, bn_bias, running_mean, running_var, residual, cfg, rebuild):
        # records: grad mode was on at the call (inside Function.forward it is always off, and
        # needs_input_grad does not look at it)
        training, momentum, eps, act, act_param, records = cfg
        xc = as_cl(x)
        rc = as_cl(residual)
        n, c, h, w = x.shape
        m = n * h * w
        check_batch(m, c, training)
        need_grad = records and any(ctx.needs_input_grad[:6])
        if not training and not need_grad:  # inference: BN folded into the one apply launch
            return bn_apply(xc, None, rc, act, act_param,
                            bn_eval=(running_mean, running_var, bn_weight, bn_bias, eps))
        part, t, rows = bn_stats(xc, m, c) if training else (None, 0, 1)
        stats = bn_finalize(part, t, rows, m, c, bn_weight, bn_bias, running_mean, running_var,
                            training=training, momentum=momentum, eps=eps, device=x.device)
        y = bn_apply(xc, stats, rc, act, act_param)
        if training and rebuild is not None:
            # the recipe of y for the caller (fastcnn.recompute): the same apply launch on the
            # same input, stats and residual rebuilds it bit for bit
            rebuild.extend((rebuild_apply, bn_apply, xc, (stats,), residual, act, act_param))
        if need_grad:
            ctx.cfg = cfg
            ctx.save_for_backward(xc, stats, bn_weight, bn_bias, rc if act != "identity" else None)
        return y

    @staticmethod
    def backward(ctx, dy):
        xc, stats, bn_weight, bn_bias, rc = ctx.saved_tensors
        training, _, _, act, act_param, _ = ctx.cfg
        need_x, need_w, need_b, _, _, need_r = ctx.needs_input_grad[:6]
        dyc = as_cl(dy.to(xc.dtype))
        dx, sums, dres = bn_act_backward(dyc, xc, stats, bn_weight, bn_bias, rc, act, act_param,
                                         training=training, need_dx=need_x, need_dres=need_r)
        return (dx, sums[1].to(bn_weight.dtype) if need_w else None,
                sums[0].to(bn_bias.dtype) if need_b else None, None, None, dres, None, None)


def bn_act(x, bn_weight, bn_bias, running_mean, running_var, *, training=True, momentum=0.1,
           eps=1e-5, act="relu", act_param=0.0, residual=None, rebuild=None):
    """Same signature and result as :func:`fastcnn.ops.reference.bn_act`. ``rebuild``: a list
    that, in training, receives ``(fn, *args)`` with ``fn(*args)`` recomputing the output bit
    for bit (for :func:`fastcnn.recompute.mark_rebuildable`, which the ops layer calls)."""
    return _BnActFn.apply(x, bn_weight, bn_bias, running_mean, running_var, residual,
                          (bool(training), float(momentum), float(eps), act, float(act_param),
                           torch.is_grad_enabled()), rebuild)
