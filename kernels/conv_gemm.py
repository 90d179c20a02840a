"""Implicit-GEMM convolution kernels shared by the fused ops: forward (with a fused
epilogue), input gradient and weight gradient. NHWC activations, fp32 accumulation,
fp32 / fp16 / bf16 operands, any kernel size, stride, padding, dilation and ``groups``.

Design
------
* **Forward** ``z = conv(x, w) + bias`` as a GEMM per group ``g`` (third grid axis):
  rows = output pixels ``N*OH*OW`` (BLOCK_M), columns = the group's output channels
  (BLOCK_N), reduction = ``KH*KW*CIN_G`` walked as one flat loop over (tap, channel block)
  of BLOCK_K. The A tile is gathered straight from NHWC ``x`` (one row = the BLOCK_K
  contiguous channels of one input pixel; out-of-image taps are masked to 0, so padding
  costs nothing); the B tile comes from the weight repacked once per call as
  ``[G, KH, KW, CIN_G, COUT_G]``. Groups are never densified or looped over in Python.
  The epilogue, all in fp32 registers, can in one launch: add the conv bias; store ``z``;
  reduce per-channel batch statistics of ``z`` for the tile (count, mean and centred sum of
  squares ``M2`` -- combined later with Chan's parallel formula, so no ``E[z^2]-E[z]^2``
  cancellation); apply eval-mode BN from the running statistics; add a residual; apply the
  activation and store ``y``.
* **Input gradient** ``dx = conv_transpose(dz, w)``: rows = input pixels ``N*H*W``, columns
  = the group's input channels, reduction over (tap, output-channel block) with the weight
  repacked as ``[G, KH, KW, COUT_G, CIN_G]``. A tap contributes where
  ``(ih + pad - kh*dil)`` is a non-negative multiple of the stride inside the output; for
  stride 2 three quarters of the gathered rows are masked (simple, correct; only the few
  downsampling layers pay it).
* **Weight gradient** ``dw[co, ci, kh, kw] = sum_p dz[p, co] * x[tap(p, kh, kw), ci]``: one
  GEMM per (group, tap) over all output pixels ``p``; the pixel reduction is split
  ``SPLIT_K`` ways (chosen on the host from the tile count) into fp32 partial buffers that
  one ``sum`` adds up -- deterministic, no atomics.

Nothing here saves tensors for backward; the ops' autograd Functions decide that. No
cuDNN call is used: every convolution of the fused ops is one of these kernels.

Tile configs (GPU)
-----------------
* Autotuned (``triton.autotune``), keyed on the GEMM shape with the pixel count ``M`` (=
  N*OH*OW) rounded up to a power of two (``M_BUCKET``, an argument the kernels ignore): a new
  batch size (the last partial batch, evaluation, a 2-image preflight) reuses the tuned tile
  of its bucket instead of timing every config again.
* Pruned before anything is timed or launched (:func:`_prune`): tiles far larger than the
  GEMM; tiles whose pipelined operand buffers (``num_stages x (BLOCK_M*BLOCK_K +
  BLOCK_K*BLOCK_N)`` elements, :func:`smem_estimate`) exceed the device's shared memory per
  block (sm_75: 64 KiB, sm_86/89: 99 KiB), so no launch fails for lack of shared memory; and
  below sm_80, where ``tl.dot`` runs on FMA units with whole operand rows in registers, the
  tiles that spill registers there (:func:`fits_fma`).
* Timed with :func:`~.utils.bench_l2_flush` (L2-sized flush buffer, not Triton's 256 MB) and
  cached on disk (``cache_results=True``: Triton's cache directory, keyed by the Triton
  version, the GPU architecture, the kernel source and the tuning key), so later processes
  and the other DDP ranks on the machine skip the timing.
* Under ``torch.use_deterministic_algorithms(True)`` (``--deterministic``): no timing, one
  fixed config per kernel (``*_FIXED``, or the smallest kept one where that is pruned), so
  runs repeat exactly (the BN statistics' summation order follows ``BLOCK_M``).

Under ``TRITON_INTERPRET=1`` one config sized to the problem is used (the interpreter's
timings mean nothing).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .activations import act_code, apply_act
from .utils import (bench_l2_flush, deterministic, device_limits, dot_precision, interpreting, num_sms, pow2,
                    upcast_dot)


@dataclass(frozen=True)
class ConvGeom:
    n: int
    h: int
    w: int
    c: int
    cout: int
    kh: int
    kw: int
    oh: int
    ow: int
    groups: int
    stride: tuple
    padding: tuple
    dilation: tuple

    @property
    def cin_g(self) -> int:
        return self.c // self.groups

    @property
    def cout_g(self) -> int:
        return self.cout // self.groups

    @property
    def m(self) -> int:
        return self.n * self.oh * self.ow


def conv_geom(x_shape, w_shape, stride, padding, dilation, groups) -> ConvGeom:
    n, c, h, w = x_shape
    cout, _, kh, kw = w_shape
    oh = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    ow = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    return ConvGeom(n, h, w, c, cout, kh, kw, oh, ow, groups, tuple(stride), tuple(padding), tuple(dilation))


# --------------------------------------------------------------------------- configs

def _cfg(bm, bn, bk, warps, stages):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=warps, num_stages=stages)


_GPU_CONFIGS = [
    _cfg(128, 128, 32, 8, 3),
    # 8 warps: with 4, Triton 3.6 spills 8 B of stack on sm_86 (bf16; forward with statistics,
    # input gradient) at ~255 registers per thread (AOT compile check)
    _cfg(128, 64, 32, 8, 4),
    _cfg(64, 128, 32, 4, 4),
    _cfg(64, 64, 32, 4, 4),
    _cfg(128, 32, 32, 4, 4),
    _cfg(64, 32, 32, 4, 4),
    _cfg(128, 64, 64, 8, 3),
    _cfg(64, 64, 64, 4, 3),
    _cfg(64, 16, 16, 2, 4),
]
_MIN_BLOCK_M = min(c.kwargs["BLOCK_M"] for c in _GPU_CONFIGS)
#: the config launched under deterministic mode when the pruning keeps it (a mid-size tile
#: that fits every target's shared memory in every dtype)
_FWD_FIXED = _GPU_CONFIGS[3]


def m_bucket(m: int) -> int:
    """The autotuning key's stand-in for the pixel count: ``m`` rounded up to a power of two."""
    return triton.next_power_of_2(max(1, int(m)))


def smem_estimate(cfg, elem_size: int) -> int:
    """Shared memory (bytes) a config's pipelined ``tl.dot`` operand buffers take:
    ``num_stages`` copies of the A (BLOCK_M x BLOCK_K) and B (BLOCK_K x BLOCK_N) tiles. The
    AOT compile check (tests/test_triton_compile.py) compares it with what the compiler
    allocates for every config on sm_75/sm_86/sm_80/sm_90."""
    kw = cfg.kwargs
    return max(1, cfg.num_stages) * (kw["BLOCK_M"] * kw["BLOCK_K"] + kw["BLOCK_K"] * kw["BLOCK_N"]) * elem_size


def fits_fma(cfg) -> bool:
    """Whether a tile compiles without register spills where ``tl.dot`` has no tensor-core
    path (below sm_80: FMA, each thread holding whole BLOCK_K rows of its operands). Measured
    with the AOT compile check for sm_75 (Triton 3.6 and 3.8): 64x32x32/4 warps, 64x16x16 and
    16x16x64 are clean; 64x64x32, 128x32x32 and 32x32x64 (BLOCK_K 64 at 32x32) spill with
    16-bit operands. Rule: at most 64 Ki multiply-adds per K step, and BLOCK_K <= 32 unless
    the output tile is at most 16x16."""
    kw = cfg.kwargs
    bm, bn, bk = kw["BLOCK_M"], kw["BLOCK_N"], kw["BLOCK_K"]
    return bm * bn * bk <= 65536 and (bk <= 32 or bm * bn <= 256)


def _prune(n_name, k_name, ptr_name):
    """The configs the autotuner may time and launch for these arguments: those whose N and K
    tiles are at most twice the (padded) GEMM dimensions, that fit the device's shared memory
    per block (operands of ``ptr_name``'s dtype) and, below sm_80, :func:`fits_fma`. If the
    shape rule leaves nothing that fits the device, the device rules win."""

    def prune(configs, nargs, **kwargs):
        args = {**nargs, **kwargs}
        t = args[ptr_name]
        smem, cap = device_limits(t.device)
        esize = t.element_size()

        def fits(c):
            return smem_estimate(c, esize) <= smem and (cap >= (8, 0) or fits_fma(c))

        n_max, k_max = pow2(args[n_name], 16, 128), pow2(args[k_name], 16, 64)
        by_shape = [c for c in configs if c.kwargs["BLOCK_N"] <= n_max and c.kwargs["BLOCK_K"] <= k_max]
        kept = [c for c in by_shape or configs[-1:] if fits(c)]
        if not kept:  # the device rules win: the smallest config that fits
            kept = sorted((c for c in configs if fits(c)), key=lambda c: smem_estimate(c, esize))[:1]
        return kept or [min(configs, key=lambda c: smem_estimate(c, esize))]

    return prune


def _launch(tuned, kernel, grid, args, meta, fixed):
    """Launch ``kernel``: through its autotuner, or -- under deterministic mode -- with the
    ``fixed`` config (the smallest kept one if pruning drops it), timing nothing. Returns the
    config that ran."""
    if not deterministic():
        tuned[grid](*args, **meta)
        return tuned.best_config
    kept = tuned.early_config_prune(tuned.configs, dict(zip(kernel.arg_names, args)), **meta)
    cfg = fixed if any(c is fixed for c in kept) else kept[-1]
    kernel[grid](*args, **meta, **cfg.all_kwargs())
    return cfg


def _interp_blocks(m, n, k):
    """The one config used under the interpreter: large tiles = few (slow) programs."""
    return {"BLOCK_M": pow2(m, 16, 128), "BLOCK_N": pow2(n, 16, 64), "BLOCK_K": pow2(k, 16, 64)}


# --------------------------------------------------------------------------- shared pieces

@triton.jit
def _out_tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Row / column offsets and in-range masks of this program's output tile (grid axes 0, 1)."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    return offs_m, offs_m < M, offs_n, offs_n < N


@triton.jit
def _pixels(offs, H, W):
    """(n as int64, h, w) of flat indices into an N x H x W pixel grid."""
    w = offs % W
    t = offs // W
    return (t // H).to(tl.int64), t % H, w


@triton.jit
def _tap_chunk(it, n_cb, KW, BLOCK_K: tl.constexpr):
    """Step ``it`` of the flat (filter tap, channel block) reduction loop, ``n_cb`` channel
    blocks per tap -> (tap index, kh, kw, the block's channel offsets)."""
    r = it // n_cb
    kh = r // KW
    return r, kh, r - kh * KW, (it - r * n_cb) * BLOCK_K + tl.arange(0, BLOCK_K)


@triton.jit
def _input_rows(n64, oh, ow, kh, kw, H, W, C, SH, SW, PH, PW, DH, DW):
    """For output pixels (n, oh, ow) and filter tap (kh, kw): the offset of the NHWC row of
    the input pixel the tap reads, and whether that pixel lies inside the image (padding)."""
    ih = oh * SH - PH + kh * DH
    iw = ow * SW - PW + kw * DW
    return ((n64 * H + ih) * W + iw) * C, (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)


@triton.jit
def _mma(acc, a_ptrs, a_mask, b_ptrs, b_mask, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr):
    """``acc + A @ B`` for the masked tiles at ``a_ptrs`` / ``b_ptrs`` (masked-out = 0)."""
    a = tl.load(a_ptrs, mask=a_mask, other=0.0)
    b = tl.load(b_ptrs, mask=b_mask, other=0.0)
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=DOT_PREC)


# --------------------------------------------------------------------------- forward

@triton.jit
def _conv_fwd_kernel(
    x_ptr, w_ptr, bias_ptr, res_ptr, z_ptr, y_ptr,
    rm_ptr, rv_ptr, gamma_ptr, beta_ptr, pmean_ptr, pm2_ptr,
    M, H, W, C, OH, OW, COUT, CIN_G, COUT_G,
    SH, SW, PH, PW, DH, DW,
    eps, act_param,
    M_BUCKET,  # unused: the autotuning key (m_bucket(M))
    KH: tl.constexpr, KW: tl.constexpr,
    HAS_BIAS: tl.constexpr, BN_EVAL: tl.constexpr, HAS_RES: tl.constexpr,
    STORE_Z: tl.constexpr, STORE_Y: tl.constexpr, STATS: tl.constexpr, ACT: tl.constexpr,
    DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    g = tl.program_id(2)
    offs_m, m_mask, offs_co, co_mask = _out_tile(M, COUT_G, BLOCK_M, BLOCK_N)
    n64, oh, ow = _pixels(offs_m, OH, OW)

    w_g = w_ptr + g * (KH * KW * CIN_G * COUT_G)
    n_cb = tl.cdiv(CIN_G, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for it in range(0, KH * KW * n_cb):
        r, kh, kw, ci = _tap_chunk(it, n_cb, KW, BLOCK_K)
        x_row, row_ok = _input_rows(n64, oh, ow, kh, kw, H, W, C, SH, SW, PH, PW, DH, DW)
        k_ok = ci < CIN_G
        acc = _mma(acc, x_ptr + (x_row + g * CIN_G)[:, None] + ci[None, :],
                   (m_mask & row_ok)[:, None] & k_ok[None, :],
                   w_g + (r * CIN_G + ci)[:, None] * COUT_G + offs_co[None, :],
                   k_ok[:, None] & co_mask[None, :], DOT_PREC, UPCAST)

    co = g * COUT_G + offs_co
    mask = m_mask[:, None] & co_mask[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + co, mask=co_mask, other=0.0).to(tl.float32)[None, :]
    out_off = offs_m.to(tl.int64)[:, None] * COUT + co[None, :]
    if STORE_Z:
        tl.store(z_ptr + out_off, acc.to(z_ptr.dtype.element_ty), mask=mask)
    if STATS:
        # statistics of z as stored (rounded to its dtype), like BN applied to conv's output
        zr = acc.to(z_ptr.dtype.element_ty).to(tl.float32)
        cnt = tl.minimum(M - pid_m * BLOCK_M, BLOCK_M).to(tl.float32)
        t_mean = tl.sum(tl.where(mask, zr, 0.0), axis=0) / cnt
        d = tl.where(mask, zr - t_mean[None, :], 0.0)
        t_m2 = tl.sum(d * d, axis=0)
        tl.store(pmean_ptr + pid_m * COUT + co, t_mean, mask=co_mask)
        tl.store(pm2_ptr + pid_m * COUT + co, t_m2, mask=co_mask)
    if STORE_Y:
        v = acc
        if BN_EVAL:
            rm = tl.load(rm_ptr + co, mask=co_mask, other=0.0).to(tl.float32)
            rv = tl.load(rv_ptr + co, mask=co_mask, other=1.0).to(tl.float32)
            gam = tl.load(gamma_ptr + co, mask=co_mask, other=1.0).to(tl.float32)
            bet = tl.load(beta_ptr + co, mask=co_mask, other=0.0).to(tl.float32)
            scale = gam / tl.sqrt(rv + eps)
            v = v * scale[None, :] + (bet - rm * scale)[None, :]
        if HAS_RES:
            v += tl.load(res_ptr + out_off, mask=mask, other=0.0).to(tl.float32)
        v = apply_act(v, act_param, ACT)
        tl.store(y_ptr + out_off, v.to(y_ptr.dtype.element_ty), mask=mask)


_conv_fwd_tuned = triton.autotune(
    configs=_GPU_CONFIGS,
    key=["M_BUCKET", "COUT_G", "CIN_G", "H", "W", "SH", "KH", "KW", "STATS", "STORE_Y", "BN_EVAL"],
    prune_configs_by={"early_config_prune": _prune("COUT_G", "CIN_G", "x_ptr")},
    do_bench=bench_l2_flush, cache_results=True,
)(_conv_fwd_kernel)


@dataclass
class FwdOut:
    y: torch.Tensor | None  # NHWC
    z: torch.Tensor | None  # NHWC, pre-BN conv output (+ bias)
    pmean: torch.Tensor | None  # [tiles, COUT] fp32 per-tile means of z
    pm2: torch.Tensor | None  # [tiles, COUT] fp32 per-tile centred sums of squares
    block_m: int = 0  # rows per tile of the partial statistics


def conv_fwd(x, weight, bias, geom: ConvGeom, *, residual=None, act="identity", act_param=0.0,
             bn_eval=None, store_y=True, store_z=False, stats=False) -> FwdOut:
    """One launch of the forward kernel. ``x``/``residual`` NHWC contiguous; ``bn_eval`` =
    (running_mean, running_var, bn_weight, bn_bias, eps) folds eval-mode BN in."""
    gm = geom
    wt = weight.view(gm.groups, gm.cout_g, gm.cin_g, gm.kh, gm.kw).permute(0, 3, 4, 2, 1).contiguous()
    out_shape = (gm.n, gm.oh, gm.ow, gm.cout)
    y = torch.empty(out_shape, device=x.device, dtype=x.dtype) if store_y else None
    z = torch.empty(out_shape, device=x.device, dtype=x.dtype) if (store_z or stats) else None
    interp = interpreting()
    blocks = _interp_blocks(gm.m, gm.cout_g, gm.cin_g) if interp else None
    min_bm = blocks["BLOCK_M"] if interp else _MIN_BLOCK_M
    tiles = triton.cdiv(gm.m, min_bm)
    pmean = torch.empty((tiles, gm.cout), device=x.device, dtype=torch.float32) if stats else None
    pm2 = torch.empty_like(pmean) if stats else None
    dummy = x
    rm, rv, gam, bet, eps = bn_eval if bn_eval is not None else (dummy, dummy, dummy, dummy, 0.0)
    args = (
        x, wt, bias if bias is not None else dummy, residual if residual is not None else dummy,
        z if z is not None else dummy, y if y is not None else dummy,
        rm, rv, gam, bet, pmean if stats else dummy, pm2 if stats else dummy,
        gm.m, gm.h, gm.w, gm.c, gm.oh, gm.ow, gm.cout, gm.cin_g, gm.cout_g,
        gm.stride[0], gm.stride[1], gm.padding[0], gm.padding[1], gm.dilation[0], gm.dilation[1],
        float(eps), float(act_param), m_bucket(gm.m),
    )
    meta = dict(
        KH=gm.kh, KW=gm.kw, HAS_BIAS=bias is not None, BN_EVAL=bn_eval is not None,
        HAS_RES=residual is not None, STORE_Z=z is not None, STORE_Y=store_y, STATS=stats,
        ACT=act_code(act), DOT_PREC=dot_precision(x.dtype), UPCAST=upcast_dot(x.dtype),
    )

    def grid(meta_):
        return (triton.cdiv(gm.m, meta_["BLOCK_M"]), triton.cdiv(gm.cout_g, meta_["BLOCK_N"]), gm.groups)

    if interp:
        _conv_fwd_kernel[grid](*args, **meta, **blocks)
        block_m = blocks["BLOCK_M"]
    else:
        block_m = _launch(_conv_fwd_tuned, _conv_fwd_kernel, grid, args, meta, _FWD_FIXED).kwargs["BLOCK_M"]
    if stats:  # only the first cdiv(M, block_m) rows were written by the chosen config
        used = triton.cdiv(gm.m, block_m)
        pmean, pm2 = pmean[:used], pm2[:used]
    return FwdOut(y, z, pmean, pm2, block_m)


# --------------------------------------------------------------------------- input grad

@triton.jit
def _conv_dgrad_kernel(
    dz_ptr, w_ptr, dx_ptr,
    MX, H, W, C, OH, OW, COUT, CIN_G, COUT_G,
    SH, SW, PH, PW, DH, DW,
    M_BUCKET,  # unused: the autotuning key (m_bucket(MX))
    KH: tl.constexpr, KW: tl.constexpr,
    DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    g = tl.program_id(2)
    offs_m, m_mask, offs_ci, ci_mask = _out_tile(MX, CIN_G, BLOCK_M, BLOCK_N)
    n64, ih, iw = _pixels(offs_m, H, W)

    w_g = w_ptr + g * (KH * KW * COUT_G * CIN_G)
    n_cb = tl.cdiv(COUT_G, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for it in range(0, KH * KW * n_cb):
        r, kh, kw, co = _tap_chunk(it, n_cb, KW, BLOCK_K)
        th = ih + PH - kh * DH
        tw = iw + PW - kw * DW
        ok = m_mask & (th >= 0) & (tw >= 0)
        th = tl.where(ok, th, 0)
        tw = tl.where(ok, tw, 0)
        oh = th // SH
        ow = tw // SW
        ok = ok & (oh * SH == th) & (ow * SW == tw) & (oh < OH) & (ow < OW)
        z_row = ((n64 * OH + oh) * OW + ow) * COUT + g * COUT_G
        k_ok = co < COUT_G
        acc = _mma(acc, dz_ptr + z_row[:, None] + co[None, :], ok[:, None] & k_ok[None, :],
                   w_g + (r * COUT_G + co)[:, None] * CIN_G + offs_ci[None, :],
                   k_ok[:, None] & ci_mask[None, :], DOT_PREC, UPCAST)

    out_off = offs_m.to(tl.int64)[:, None] * C + (g * CIN_G + offs_ci)[None, :]
    tl.store(dx_ptr + out_off, acc.to(dx_ptr.dtype.element_ty), mask=m_mask[:, None] & ci_mask[None, :])


# The forward configs, but the small tile with 4 warps: with 2 warps the stride-aware gather of
# the input gradient spills registers (AOT compile check, tests/test_triton_compile.py: 96 B per
# thread on sm_80 for a 32-group stride-2 3x3 conv in fp32; 4 warps: ~120 registers, no spill).
_DGRAD_CONFIGS = _GPU_CONFIGS[:-1] + [_cfg(64, 16, 16, 4, 4)]
_DGRAD_FIXED = _DGRAD_CONFIGS[3]

_conv_dgrad_tuned = triton.autotune(
    configs=_DGRAD_CONFIGS,
    key=["M_BUCKET", "COUT_G", "CIN_G", "H", "W", "SH", "KH", "KW"],
    prune_configs_by={"early_config_prune": _prune("CIN_G", "COUT_G", "dz_ptr")},
    do_bench=bench_l2_flush, cache_results=True,
)(_conv_dgrad_kernel)


def conv_dgrad(dz, weight, geom: ConvGeom) -> torch.Tensor:
    """dL/dx (NHWC, dtype of ``dz``) from dL/dz (NHWC contiguous)."""
    gm = geom
    wd = weight.view(gm.groups, gm.cout_g, gm.cin_g, gm.kh, gm.kw).permute(0, 3, 4, 1, 2).contiguous()
    dx = torch.empty((gm.n, gm.h, gm.w, gm.c), device=dz.device, dtype=dz.dtype)
    mx = gm.n * gm.h * gm.w
    args = (dz, wd, dx, mx, gm.h, gm.w, gm.c, gm.oh, gm.ow, gm.cout, gm.cin_g, gm.cout_g,
            gm.stride[0], gm.stride[1], gm.padding[0], gm.padding[1], gm.dilation[0], gm.dilation[1],
            m_bucket(mx))
    meta = dict(KH=gm.kh, KW=gm.kw, DOT_PREC=dot_precision(dz.dtype), UPCAST=upcast_dot(dz.dtype))

    def grid(meta_):
        return (triton.cdiv(mx, meta_["BLOCK_M"]), triton.cdiv(gm.cin_g, meta_["BLOCK_N"]), gm.groups)

    if interpreting():
        _conv_dgrad_kernel[grid](*args, **meta, **_interp_blocks(mx, gm.cin_g, gm.cout_g))
    else:
        _launch(_conv_dgrad_tuned, _conv_dgrad_kernel, grid, args, meta, _DGRAD_FIXED)
    return dx


# --------------------------------------------------------------------------- weight grad

@triton.jit
def _conv_wgrad_kernel(
    dz_ptr, x_ptr, part_ptr,
    M, H, W, C, OH, OW, COUT, CIN_G, COUT_G,
    SH, SW, PH, PW, DH, DW, K_PER_SPLIT,
    M_BUCKET,  # unused: the autotuning key (m_bucket(M))
    KH: tl.constexpr, KW: tl.constexpr,
    DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    split = tl.program_id(1)
    g = tl.program_id(2)
    n_co = tl.cdiv(COUT_G, BLOCK_M)
    n_ci = tl.cdiv(CIN_G, BLOCK_N)
    r = pid // (n_co * n_ci)
    rest = pid - r * (n_co * n_ci)
    pid_co = rest // n_ci
    pid_ci = rest - pid_co * n_ci
    kh = r // KW
    kw = r - kh * KW

    offs_co = pid_co * BLOCK_M + tl.arange(0, BLOCK_M)
    co_mask = offs_co < COUT_G
    offs_ci = pid_ci * BLOCK_N + tl.arange(0, BLOCK_N)
    ci_mask = offs_ci < CIN_G
    offs_k = tl.arange(0, BLOCK_K)

    k_start = split * K_PER_SPLIT
    k_end = tl.minimum(M, k_start + K_PER_SPLIT)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        p = k0 + offs_k
        p_ok = p < k_end
        n64, oh, ow = _pixels(p, OH, OW)
        x_row, x_ok = _input_rows(n64, oh, ow, kh, kw, H, W, C, SH, SW, PH, PW, DH, DW)
        acc = _mma(acc, dz_ptr + p.to(tl.int64)[None, :] * COUT + (g * COUT_G + offs_co)[:, None],
                   co_mask[:, None] & p_ok[None, :],
                   x_ptr + (x_row + g * CIN_G)[:, None] + offs_ci[None, :],
                   (p_ok & x_ok)[:, None] & ci_mask[None, :], DOT_PREC, UPCAST)

    # partial dw laid out as [SPLIT, COUT, CIN_G, KH, KW]
    out_off = ((split * COUT + g * COUT_G + offs_co)[:, None] * CIN_G + offs_ci[None, :]) * (KH * KW) + r
    tl.store(part_ptr + out_off, acc, mask=co_mask[:, None] & ci_mask[None, :])


_WGRAD_CONFIGS = [
    _cfg(64, 64, 64, 4, 3),
    _cfg(64, 64, 32, 4, 4),
    _cfg(128, 64, 32, 8, 3),
    _cfg(64, 128, 32, 8, 3),
    _cfg(32, 32, 64, 4, 3),
    # 4 warps, not 2: with 2 warps Triton 3.6 spills 8 B of stack per thread for the 5x5 stem
    # in fp32 (AOT compile check, tests/test_triton_compile.py); 4 warps compile spill-free.
    _cfg(16, 16, 64, 4, 3),
]
_WGRAD_FIXED = _WGRAD_CONFIGS[1]

# keyed on the bucket, not on K_PER_SPLIT: the split follows M, and would defeat the bucketing
_conv_wgrad_tuned = triton.autotune(
    configs=_WGRAD_CONFIGS,
    key=["M_BUCKET", "COUT_G", "CIN_G", "H", "W", "SH", "KH", "KW"],
    prune_configs_by={"early_config_prune": _prune("CIN_G", "M", "x_ptr")},
    do_bench=bench_l2_flush, cache_results=True,
)(_conv_wgrad_kernel)


def conv_wgrad(x, dz, geom: ConvGeom, dtype: torch.dtype) -> torch.Tensor:
    """dL/dweight (shape of the weight, ``dtype``) from NHWC ``x`` and dL/dz."""
    gm = geom
    interp = interpreting()
    # split the pixel reduction so that small layers still fill the GPU
    tiles = gm.groups * gm.kh * gm.kw * triton.cdiv(gm.cout_g, 64) * triton.cdiv(gm.cin_g, 64)
    split = 1 if interp else max(1, min(2 * num_sms(x.device) // max(tiles, 1), triton.cdiv(gm.m, 512), 64))
    k_per_split = triton.cdiv(triton.cdiv(gm.m, split), 64) * 64
    split = triton.cdiv(gm.m, k_per_split)
    part = torch.empty((split, gm.cout, gm.cin_g, gm.kh, gm.kw), device=x.device, dtype=torch.float32)
    args = (dz, x, part, gm.m, gm.h, gm.w, gm.c, gm.oh, gm.ow, gm.cout, gm.cin_g, gm.cout_g,
            gm.stride[0], gm.stride[1], gm.padding[0], gm.padding[1], gm.dilation[0], gm.dilation[1],
            k_per_split, m_bucket(gm.m))
    meta = dict(KH=gm.kh, KW=gm.kw, DOT_PREC=dot_precision(x.dtype), UPCAST=upcast_dot(x.dtype))

    def grid(meta_):
        per_tap = triton.cdiv(gm.cout_g, meta_["BLOCK_M"]) * triton.cdiv(gm.cin_g, meta_["BLOCK_N"])
        return (gm.kh * gm.kw * per_tap, split, gm.groups)

    if interp:
        blocks = {"BLOCK_M": pow2(gm.cout_g, 16, 64), "BLOCK_N": pow2(gm.cin_g, 16, 64), "BLOCK_K": pow2(gm.m, 16, 128)}
        _conv_wgrad_kernel[grid](*args, **meta, **blocks)
    else:
        _launch(_conv_wgrad_tuned, _conv_wgrad_kernel, grid, args, meta, _WGRAD_FIXED)
    dw = part[0] if split == 1 else part.sum(0)
    return dw.to(dtype)
