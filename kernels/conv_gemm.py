"""Implicit-GEMM convolution kernels shared by the fused ops: forward (with a fused
epilogue), input gradient and weight gradient. Channels_last (NHWC) activations, fp32
accumulation, fp32 / fp16 / bf16 operands, any kernel size, stride, padding, dilation and
``groups``.

Design
------
* **Forward** ``z = conv(x, w) + bias`` as a GEMM per group ``g`` (third grid axis):
  rows = output pixels ``N*OH*OW`` (BLOCK_M), columns = the group's output channels
  (BLOCK_N), reduction = ``KH*KW*CIN_G`` walked as one flat loop over (tap, channel block)
  of BLOCK_K. The A tile is gathered straight from NHWC ``x`` (one row = the BLOCK_K
  contiguous channels of one input pixel; out-of-image taps are masked to 0, so padding
  costs nothing); the B tile is read from the weight through its strides (below). Groups
  are never densified or looped over in Python. The epilogue, all in fp32 registers, can in
  one launch: add the conv bias; store ``z``; reduce per-channel batch statistics of ``z``
  for the tile (mean and centred sum of squares ``M2`` -- combined later with Chan's
  parallel formula, so no ``E[z^2]-E[z]^2`` cancellation; written as ``[tiles, 2, COUT]``
  fp32 partials); apply eval-mode BN from the running statistics; add a residual; apply the
  activation and store ``y``.
* **Input gradient** ``dx = conv_transpose(dz, w)``: rows = input pixels, columns = the
  group's input channels, reduction over (tap, output-channel block). Stride 1 (or any
  dilation > 1): every input pixel takes every tap, masked where ``ih + pad - kh*dil`` falls
  outside the output. **Stride > 1 (dilation 1): sub-pixel phases.** An input pixel with
  ``ih % SH == ph`` receives exactly the taps ``kh = (ph + PH) % SH + j*SH``; the grid's third
  axis runs over (group, phase), each program gathers only pixels of its phase and loops over
  only their taps. Gathering all pixels and masking (what this kernel did before) fed the
  tensor cores ``SH*SW`` times the useful work -- 4x at stride 2, where three quarters of the
  rows of every A tile were zeros (a 1x1 stride-2 shortcut: 3 of 4 pixels get no tap at all;
  their programs now just store zeros).
* **Weight gradient** ``dw[co, ci, kh, kw] = sum_p dz[p, co] * x[tap(p, kh, kw), ci]``: one
  GEMM per (group, tap) over all output pixels ``p``; the pixel reduction is split
  ``SPLIT`` ways (chosen on the host from the tile count) into fp32 partial buffers that one
  ``sum`` adds up -- deterministic, no atomics. ``dw`` is written in the weight's own memory
  layout (channels_last weights get a channels_last gradient), so autograd's gradient
  accumulation keeps it as is instead of copying it to the parameter's strides.

Weight operand: read in place, or one cached pack
-------------------------------------------------
The GEMMs read the weight ``[COUT, CIN_G, KH, KW]`` through its four strides. What makes a
tile load coalesced is that the *input-channel* stride is 1: per tap, the forward's B tile
``[ci, co]`` is then K-contiguous and dgrad's ``[co, ci]`` N-contiguous, both layouts
``tl.dot`` takes directly. That holds, with no copy at all, for

* channels_last weights -- ``model.to(memory_format=torch.channels_last)``, which
  ``fastcnn.train`` does on GPUs (and the bf16 copies autocast makes keep the layout);
* every 1x1 convolution and every depthwise one (``CIN_G == 1``), in any layout.

An NCHW-contiguous KxK weight has input-channel stride ``KH*KW``: read in place, each tile
element would be its own memory transaction (and Triton's asynchronous copies need contiguous
runs), so such a weight is packed into channels_last (:func:`weight_operand`). The pack a
training forward makes is handed to the input-gradient GEMM of the same step (a weak-keyed
table, entry taken by the backward and checked against the weight's ``_version``,
``data_ptr``, dtype, shape and strides): one weight pass per step instead of two. The forward
never reads a pack made earlier, so a weight changed between steps -- by an optimizer, by
``copy_``, even through ``p.data`` (which the version counter does not see) -- is always
packed afresh; the one window is forward to backward of one step, where autograd's own
saved tensors have the same semantics.

Memory: a pack lives from its forward to its backward, like the weight copies before (one per
layer and step), never across steps: nothing weight-sized stays cached. With channels_last
weights (the training path on GPUs: ``fastcnn.train`` converts the model) there is no pack at
all, and on inference there is one transient copy per call.

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
* Host cost: the first call of a launch shape goes through the autotuner (or the fixed
  config); its choice, the grid and the integer arguments are then kept in a per-launcher
  :class:`~.utils.PlanCache` keyed on the shape, dtype, device, flags and modes, and later
  calls launch the kernel with them directly -- the autotuner would pick the same config
  (its key is coarser than the plan's), but building its key costs ~15 us per launch.

Under ``TRITON_INTERPRET=1`` one config sized to the problem is used (the interpreter's
timings mean nothing).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch.utils.weak import WeakIdKeyDictionary

from .activations import act_code, apply_act
from .utils import (CL, PlanCache, bench_l2_flush, cdiv, deterministic, device_limits, dot_precision, empty_cl,
                    interpreting, next_pow2, num_sms, pow2, upcast_dot)


class ConvGeom(NamedTuple):
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
    cin_g: int
    cout_g: int
    m: int  # output pixels N*OH*OW


_GEOMS = PlanCache()


def conv_geom(x_shape, w_shape, stride, padding, dilation, groups) -> ConvGeom:
    """The convolution's geometry (cached per argument tuple: it is hashed by every launch-plan
    lookup of the call)."""
    key = (x_shape, w_shape, stride, padding, dilation, groups)
    gm = _GEOMS.get(key)
    if gm is None:
        n, c, h, w = x_shape
        cout, _, kh, kw = w_shape
        oh = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
        ow = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
        gm = _GEOMS.put(key, ConvGeom(n, h, w, c, cout, kh, kw, oh, ow, groups, tuple(stride), tuple(padding),
                                      tuple(dilation), c // groups, cout // groups, n * oh * ow))
    return gm


# --------------------------------------------------------------------------- weight operand

_PACKS = WeakIdKeyDictionary()


def _pack_key(weight):
    return (weight._version, weight.data_ptr(), weight.dtype, weight.shape, weight.stride())


def weight_operand(weight: torch.Tensor, *, for_backward: bool = False, taken: bool = False) -> torch.Tensor:
    """The tensor the GEMMs read the weight from (through its strides): ``weight`` itself when
    its input-channel stride is 1 (channels_last, 1x1, depthwise), else a channels_last pack
    (see the module docstring). ``for_backward``: a training forward's pack, left for this
    step's backward; ``taken``: the backward takes that pack (or packs afresh)."""
    if weight.stride(1) == 1 or weight.shape[1] == 1:
        return weight
    if taken:
        hit = _PACKS.pop(weight, None)
        if hit is not None and hit[0] == _pack_key(weight):
            return hit[1]
    pack = weight.detach().contiguous(memory_format=CL)
    if for_backward:
        _PACKS[weight] = (_pack_key(weight), pack)
    return pack


def clear_weight_packs() -> None:
    """Drop the packs forwards left for their backward (a backward that finds none packs
    again); for tests."""
    _PACKS.clear()


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
    return next_pow2(m)


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


class _Plan(NamedTuple):
    src: object  # the kernel object the plan was made with (a swapped-in object re-plans)
    grid: tuple
    static: tuple  # the integer arguments after the per-call ones
    kw: dict  # constexprs + the config's block sizes, warps and stages
    block_m: int


def _planned(plans, key, tuned, kernel, dynamic, build, fixed):
    """Launch ``kernel(*dynamic, *static)``. The first call of ``key`` runs ``build()`` ->
    ``(static, meta, grid_fn, interp_blocks)``, picks the config (the interpreter's
    ``interp_blocks``, else :func:`_launch`: the autotuner, or ``fixed`` under deterministic
    mode) and keeps it with the grid and ``static`` in ``plans``; later calls launch the kernel
    with them directly. Returns the plan."""
    interp = interpreting()
    src = kernel if interp else tuned
    plan = plans.get(key)
    if plan is not None and plan.src is src:
        kernel[plan.grid](*dynamic, *plan.static, **plan.kw)
        return plan
    static, meta, grid_fn, interp_blocks = build()
    if interp:
        kernel[grid_fn(interp_blocks)](*dynamic, *static, **meta, **interp_blocks)
        cfg_kw = interp_blocks
    else:
        cfg_kw = _launch(tuned, kernel, grid_fn, dynamic + static, meta, fixed).all_kwargs()
    return plans.put(key, _Plan(src, grid_fn(cfg_kw), static, {**meta, **cfg_kw}, cfg_kw["BLOCK_M"]))


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
    blocks per tap -> (kh, kw, the block's channel offsets)."""
    r = it // n_cb
    kh = r // KW
    return kh, r - kh * KW, (it - r * n_cb) * BLOCK_K + tl.arange(0, BLOCK_K)


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
    rm_ptr, rv_ptr, gamma_ptr, beta_ptr, part_ptr,
    eps, act_param,
    WS_CO, WS_CI, WS_KH, WS_KW,  # the weight's strides (WS_CI == 1: see weight_operand)
    M, H, W, C, OH, OW, COUT, CIN_G, COUT_G,
    SH, SW, PH, PW, DH, DW,
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

    w_co = w_ptr + ((g * COUT_G + offs_co) * WS_CO)[None, :]
    n_cb = tl.cdiv(CIN_G, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for it in range(0, KH * KW * n_cb):
        kh, kw, ci = _tap_chunk(it, n_cb, KW, BLOCK_K)
        x_row, row_ok = _input_rows(n64, oh, ow, kh, kw, H, W, C, SH, SW, PH, PW, DH, DW)
        k_ok = ci < CIN_G
        acc = _mma(acc, x_ptr + (x_row + g * CIN_G)[:, None] + ci[None, :],
                   (m_mask & row_ok)[:, None] & k_ok[None, :],
                   w_co + (kh * WS_KH + kw * WS_KW + ci * WS_CI)[:, None],
                   k_ok[:, None] & co_mask[None, :], DOT_PREC, UPCAST)

    co = g * COUT_G + offs_co
    mask = m_mask[:, None] & co_mask[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + co, mask=co_mask, other=0.0).to(tl.float32)[None, :]
    out_off = offs_m.to(tl.int64)[:, None] * COUT + co[None, :]
    if STORE_Z:
        tl.store(z_ptr + out_off, acc.to(z_ptr.dtype.element_ty), mask=mask)
    if STATS:
        # statistics of z as stored (rounded to its dtype), like BN applied to conv's output;
        # partials laid out [tiles, 2, COUT]: the tile's mean, then its centred sum of squares
        zr = acc.to(z_ptr.dtype.element_ty).to(tl.float32)
        cnt = tl.minimum(M - pid_m * BLOCK_M, BLOCK_M).to(tl.float32)
        t_mean = tl.sum(tl.where(mask, zr, 0.0), axis=0) / cnt
        d = tl.where(mask, zr - t_mean[None, :], 0.0)
        t_m2 = tl.sum(d * d, axis=0)
        tl.store(part_ptr + (pid_m * 2) * COUT + co, t_mean, mask=co_mask)
        tl.store(part_ptr + (pid_m * 2 + 1) * COUT + co, t_m2, mask=co_mask)
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

_FWD_PLANS = PlanCache()


def stats_rows(m: int) -> int:
    """Upper bound of the statistics partial rows :func:`conv_fwd` writes for ``m`` output
    pixels (the tile count of the smallest BLOCK_M any config may pick)."""
    return cdiv(m, 16 if interpreting() else _MIN_BLOCK_M)


def conv_fwd(x, weight, bias, gm: ConvGeom, *, residual=None, act="identity", act_param=0.0,
             bn_eval=None, store_y=True, store_z=False, part=None, backward_follows=False):
    """One launch of the forward kernel; returns ``(y, z, tiles, block_m)``: ``y`` / ``z``
    channels_last ``(N, COUT, OH, OW)`` (None when not stored). ``x`` / ``residual``
    channels_last. ``bn_eval`` = (running_mean, running_var, bn_weight, bn_bias, eps) folds
    eval-mode BN in. ``part``: an fp32 buffer of at least ``stats_rows(M) * 2 * COUT`` elements
    that receives the statistics partials of ``z`` (``z`` is then stored too): ``tiles`` rows of
    ``[mean, M2]`` per channel, row ``t`` covering output pixels ``[t*block_m, (t+1)*block_m)``."""
    stats = part is not None
    store_z = store_z or stats
    key = (gm, x.dtype, x.device, bias is not None, bn_eval is not None, residual is not None, store_z,
           store_y, stats, act, dot_precision(x.dtype), deterministic(), interpreting())
    out_shape = (gm.n, gm.cout, gm.oh, gm.ow)
    y = empty_cl(out_shape, x) if store_y else None
    z = empty_cl(out_shape, x) if store_z else None
    wk = weight_operand(weight, for_backward=backward_follows)
    rm, rv, gam, bet, eps = bn_eval if bn_eval is not None else (x, x, x, x, 0.0)
    dynamic = (x, wk, x if bias is None else bias, x if residual is None else residual,
               x if z is None else z, x if y is None else y, rm, rv, gam, bet,
               part if stats else x, float(eps), float(act_param), *wk.stride())

    def build():
        static = (gm.m, gm.h, gm.w, gm.c, gm.oh, gm.ow, gm.cout, gm.cin_g, gm.cout_g,
                  gm.stride[0], gm.stride[1], gm.padding[0], gm.padding[1], gm.dilation[0],
                  gm.dilation[1], m_bucket(gm.m))
        meta = dict(KH=gm.kh, KW=gm.kw, HAS_BIAS=bias is not None, BN_EVAL=bn_eval is not None,
                    HAS_RES=residual is not None, STORE_Z=store_z, STORE_Y=store_y, STATS=stats,
                    ACT=act_code(act), DOT_PREC=dot_precision(x.dtype), UPCAST=upcast_dot(x.dtype))

        def grid(meta_):
            return (cdiv(gm.m, meta_["BLOCK_M"]), cdiv(gm.cout_g, meta_["BLOCK_N"]), gm.groups)

        return static, meta, grid, _interp_blocks(gm.m, gm.cout_g, gm.cin_g)

    plan = _planned(_FWD_PLANS, key, _conv_fwd_tuned, _conv_fwd_kernel, dynamic, build, _FWD_FIXED)
    return y, z, plan.grid[0], plan.block_m


# --------------------------------------------------------------------------- input grad

@triton.jit
def _conv_dgrad_kernel(
    dz_ptr, w_ptr, dx_ptr,
    WS_CO, WS_CI, WS_KH, WS_KW,
    NB, MX, H, W, C, OH, OW, COUT, CIN_G, COUT_G,
    SH, SW, PH, PW, DH, DW,
    M_BUCKET,  # unused: the autotuning key (m_bucket(MX))
    KH: tl.constexpr, KW: tl.constexpr, PHASES: tl.constexpr,
    DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if PHASES:
        # stride > 1, dilation 1: this program's pixels all have (ih % SH, iw % SW) == (ph, pw),
        # so they take the same taps: kh = kh0 + j*SH reaching output row oh = ihp + q_h - j
        # (ih = ihp*SH + ph), likewise along w
        g = tl.program_id(2) // (SH * SW)
        phase = tl.program_id(2) - g * (SH * SW)
        ph = phase // SW
        pw = phase - ph * SW
        HP = (H - ph + SH - 1) // SH
        WP = (W - pw + SW - 1) // SW
        offs_m, m_mask, offs_ci, ci_mask = _out_tile(NB * HP * WP, CIN_G, BLOCK_M, BLOCK_N)
        kh0 = (ph + PH) % SH
        kw0 = (pw + PW) % SW
        n_kw = (KW - kw0 + SW - 1) // SW
        n64, ihp, iwp = _pixels(offs_m, HP, WP)
        # the output pixel of tap (j, i) = 0 is (oh0, ow0); tap (j, i) reads (oh0 - j, ow0 - i)
        oh0 = ihp + (ph + PH - kh0) // SH
        ow0 = iwp + (pw + PW - kw0) // SW
        z0 = ((n64 * OH + oh0) * OW + ow0) * COUT + g * COUT_G
        w_ci = w_ptr + (offs_ci * WS_CI)[None, :]
        n_cb = tl.cdiv(COUT_G, BLOCK_K)
        for it in range(0, ((KH - kh0 + SH - 1) // SH) * n_kw * n_cb):
            t = it // n_cb
            j = t // n_kw
            i = t - j * n_kw
            co = (it - t * n_cb) * BLOCK_K + tl.arange(0, BLOCK_K)
            oh = oh0 - j
            ow = ow0 - i
            ok = m_mask & (oh >= 0) & (oh < OH) & (ow >= 0) & (ow < OW)
            k_ok = co < COUT_G
            tap = (kh0 + j * SH) * WS_KH + (kw0 + i * SW) * WS_KW
            acc = _mma(acc, dz_ptr + (z0 - (j * OW + i) * COUT)[:, None] + co[None, :], ok[:, None] & k_ok[None, :],
                       w_ci + (tap + (g * COUT_G + co) * WS_CO)[:, None],
                       k_ok[:, None] & ci_mask[None, :], DOT_PREC, UPCAST)
        n64, ihp, iwp = _pixels(offs_m, HP, WP)
        row = (n64 * H + ihp * SH + ph) * W + iwp * SW + pw
    else:
        g = tl.program_id(2)
        offs_m, m_mask, offs_ci, ci_mask = _out_tile(MX, CIN_G, BLOCK_M, BLOCK_N)
        n64, ih, iw = _pixels(offs_m, H, W)
        w_ci = w_ptr + (offs_ci * WS_CI)[None, :]
        n_cb = tl.cdiv(COUT_G, BLOCK_K)
        for it in range(0, KH * KW * n_cb):
            kh, kw, co = _tap_chunk(it, n_cb, KW, BLOCK_K)
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
                       w_ci + (kh * WS_KH + kw * WS_KW + (g * COUT_G + co) * WS_CO)[:, None],
                       k_ok[:, None] & ci_mask[None, :], DOT_PREC, UPCAST)
        row = (n64 * H + ih) * W + iw

    out_off = row[:, None] * C + (g * CIN_G + offs_ci)[None, :]
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

_DGRAD_PLANS = PlanCache()


def conv_dgrad(dz, weight, gm: ConvGeom) -> torch.Tensor:
    """dL/dx (channels_last ``(N, C, H, W)``, dtype of ``dz``) from channels_last dL/dz."""
    key = (gm, dz.dtype, dz.device, dot_precision(dz.dtype), deterministic(), interpreting())
    dx = empty_cl((gm.n, gm.c, gm.h, gm.w), dz)
    wk = weight_operand(weight, taken=True)
    dynamic = (dz, wk, dx, *wk.stride())

    def build():
        sh, sw = gm.stride
        phases = (sh > 1 or sw > 1) and gm.dilation == (1, 1)
        # GEMM rows: every input pixel, or those of one phase (at most those of phase 0)
        rows = gm.n * (cdiv(gm.h, sh) * cdiv(gm.w, sw) if phases else gm.h * gm.w)
        mx = gm.n * gm.h * gm.w
        static = (gm.n, mx, gm.h, gm.w, gm.c, gm.oh, gm.ow, gm.cout, gm.cin_g, gm.cout_g,
                  sh, sw, gm.padding[0], gm.padding[1], gm.dilation[0], gm.dilation[1], m_bucket(mx))
        meta = dict(KH=gm.kh, KW=gm.kw, PHASES=phases, DOT_PREC=dot_precision(dz.dtype),
                    UPCAST=upcast_dot(dz.dtype))
        z_axis = gm.groups * (sh * sw if phases else 1)

        def grid(meta_):
            return (cdiv(rows, meta_["BLOCK_M"]), cdiv(gm.cin_g, meta_["BLOCK_N"]), z_axis)

        return static, meta, grid, _interp_blocks(rows, gm.cin_g, gm.cout_g)

    _planned(_DGRAD_PLANS, key, _conv_dgrad_tuned, _conv_dgrad_kernel, dynamic, build, _DGRAD_FIXED)
    return dx


# --------------------------------------------------------------------------- weight grad

@triton.jit
def _conv_wgrad_kernel(
    dz_ptr, x_ptr, part_ptr,
    M, H, W, C, OH, OW, COUT, CIN_G, COUT_G,
    SH, SW, PH, PW, DH, DW, K_PER_SPLIT,
    M_BUCKET,  # unused: the autotuning key (m_bucket(M))
    KH: tl.constexpr, KW: tl.constexpr, OUT_CL: tl.constexpr,
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

    # split s of dw in the weight's layout: [SPLIT, COUT, CIN_G, KH, KW], contiguous or (OUT_CL)
    # channels_last, i.e. [SPLIT, COUT, KH, KW, CIN_G] in memory
    co = split * COUT + g * COUT_G + offs_co
    if OUT_CL:
        out_off = (co[:, None] * (KH * KW) + r) * CIN_G + offs_ci[None, :]
    else:
        out_off = (co[:, None] * CIN_G + offs_ci[None, :]) * (KH * KW) + r
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

_WGRAD_PLANS = PlanCache()


def _wgrad_split(gm: ConvGeom, device) -> tuple[int, int]:
    """``(split, pixels per split)``: the pixel reduction is split so that small layers still
    fill the GPU."""
    tiles = gm.groups * gm.kh * gm.kw * cdiv(gm.cout_g, 64) * cdiv(gm.cin_g, 64)
    split = 1 if interpreting() else max(1, min(2 * num_sms(device) // max(tiles, 1), cdiv(gm.m, 512), 64))
    k_per_split = cdiv(cdiv(gm.m, split), 64) * 64
    return cdiv(gm.m, k_per_split), k_per_split


def conv_wgrad(x, dz, gm: ConvGeom, weight: torch.Tensor) -> torch.Tensor:
    """dL/dweight (shape, dtype and memory layout of ``weight``) from channels_last ``x`` and
    dL/dz."""
    cl = weight.is_contiguous(memory_format=CL) and not weight.is_contiguous()
    key = (gm, x.dtype, x.device, cl, dot_precision(x.dtype), deterministic(), interpreting())
    plan = _WGRAD_PLANS.get(key)
    split = plan.grid[1] if plan is not None else _wgrad_split(gm, x.device)[0]
    wshape = (gm.cout, gm.cin_g, gm.kh, gm.kw)
    # fp32 partials, one weight-shaped block per split, in the weight's layout (the result
    # itself when that is one fp32 block)
    part = torch.empty((split * gm.cout, gm.cin_g, gm.kh, gm.kw), device=x.device, dtype=torch.float32,
                       memory_format=CL if cl else torch.contiguous_format)
    dynamic = (dz, x, part)

    def build():
        k_per_split = _wgrad_split(gm, x.device)[1]
        static = (gm.m, gm.h, gm.w, gm.c, gm.oh, gm.ow, gm.cout, gm.cin_g, gm.cout_g,
                  gm.stride[0], gm.stride[1], gm.padding[0], gm.padding[1], gm.dilation[0], gm.dilation[1],
                  k_per_split, m_bucket(gm.m))
        meta = dict(KH=gm.kh, KW=gm.kw, OUT_CL=cl, DOT_PREC=dot_precision(x.dtype), UPCAST=upcast_dot(x.dtype))

        def grid(meta_):
            per_tap = cdiv(gm.cout_g, meta_["BLOCK_M"]) * cdiv(gm.cin_g, meta_["BLOCK_N"])
            return (gm.kh * gm.kw * per_tap, split, gm.groups)

        blocks = {"BLOCK_M": pow2(gm.cout_g, 16, 64), "BLOCK_N": pow2(gm.cin_g, 16, 64), "BLOCK_K": pow2(gm.m, 16, 128)}
        return static, meta, grid, blocks

    _planned(_WGRAD_PLANS, key, _conv_wgrad_tuned, _conv_wgrad_kernel, dynamic, build, _WGRAD_FIXED)
    if split > 1:
        dw = torch.empty(wshape, device=x.device, dtype=torch.float32, memory_format=CL if cl else torch.contiguous_format)
        part = torch.sum(part.view(split, *wshape), 0, out=dw)
    return part if weight.dtype == torch.float32 else part.to(weight.dtype)
