"""The convolution GEMMs of kernels/conv_gemm.py and the BN finalize of kernels/bn_act.py
directly (interpreter on CPU, small shapes): the input gradient's stride phases over odd
geometries, the weight read in place or through its cached pack (and repacked after an
in-place update), the weight gradient in the weight's own layout (split or not), and the
two-level (parallel) merge of many BN statistics partials against float64. Through the public
ops: tests/test_op_conv_bn_act.py (the merge end to end) and tests/test_op_conv_act.py (a
channels_last weight's gradient), in their Triton sections."""
from __future__ import annotations

import gc
import weakref

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")
from fastcnn.kernels import bn_act as ba  # noqa: E402
from fastcnn.kernels import conv_gemm as cg  # noqa: E402

pytestmark = pytest.mark.triton

CL = torch.channels_last


def _geom(x, w, s, p, d, g):
    return cg.conv_geom(x.shape, w.shape, s, p, d, g)


# n, cin, h, w, cout, k, stride, pad, dilation, groups
DGRAD_CASES = [
    (2, 6, 9, 9, 4, 3, (2, 2), (1, 1), (1, 1), 1),
    (1, 4, 8, 7, 6, 3, (2, 2), (0, 0), (1, 1), 2),
    (2, 8, 10, 10, 8, 1, (2, 2), (0, 0), (1, 1), 1),   # shortcut: 3 of 4 phases get no tap
    (1, 3, 11, 9, 5, 5, (2, 2), (2, 2), (1, 1), 1),
    (1, 4, 10, 11, 4, 3, (3, 3), (1, 1), (1, 1), 4),   # stride 3, depthwise
    (2, 4, 7, 9, 6, 3, (2, 1), (1, 0), (1, 1), 2),     # mixed strides
    (1, 5, 9, 8, 3, 4, (1, 2), (2, 1), (1, 1), 1),     # even kernel
    (1, 4, 9, 9, 4, 3, (2, 2), (2, 2), (2, 2), 1),     # dilation: the masked (non-phase) path
    (2, 4, 6, 6, 4, 3, (1, 1), (1, 1), (1, 1), 1),     # stride 1
    (2, 4, 24, 23, 4, 3, (2, 2), (1, 1), (1, 1), 1),   # several row tiles per phase
]


@pytest.mark.parametrize("case", DGRAD_CASES, ids=lambda c: f"{c[1]}x{c[2]}x{c[3]}-k{c[5]}s{c[6]}p{c[7]}d{c[8]}g{c[9]}")
def test_input_gradient_matches_torch(case):
    n, cin, h, w, cout, k, s, p, d, g = case
    x = torch.randn(n, cin, h, w)
    wt = torch.randn(cout, cin // g, k, k)
    gm = _geom(x, wt, s, p, d, g)
    dz = torch.randn(n, cout, gm.oh, gm.ow).contiguous(memory_format=CL)
    dx = cg.conv_dgrad(dz, wt, gm)
    plan = cg._DGRAD_PLANS[(gm, dz.dtype, dz.device, cg.dot_precision(dz.dtype), cg.deterministic(), cg.interpreting())]
    assert plan.kw["PHASES"] == (s != (1, 1) and d == (1, 1))
    ref = torch.nn.grad.conv2d_input(x.shape, wt.double(), dz.double(), s, p, d, g)
    assert dx.is_contiguous(memory_format=CL)
    torch.testing.assert_close(dx.double(), ref, rtol=1e-4, atol=1e-4)


def test_weight_read_in_place_when_input_channels_are_contiguous():
    cl = torch.randn(8, 4, 3, 3).contiguous(memory_format=CL)
    one = torch.randn(8, 4, 1, 1)
    depthwise = torch.randn(8, 1, 3, 3)
    for w in (cl, one, depthwise):
        assert cg.weight_operand(w) is w
    nchw = torch.randn(8, 4, 3, 3)
    pack = cg.weight_operand(nchw)
    assert pack is not nchw and pack.is_contiguous(memory_format=CL) and torch.equal(pack, nchw)


def test_pack_is_handed_from_forward_to_its_backward_only():
    """A training forward's pack goes to the same step's backward (one copy per step); a
    forward never reuses an earlier pack -- so an update between steps, even through ``.data``
    (invisible to the version counter), is always seen -- and nothing stays cached."""
    nchw = torch.randn(8, 4, 3, 3)
    pack = cg.weight_operand(nchw, for_backward=True)
    assert cg.weight_operand(nchw, taken=True) is pack   # the backward takes the forward's pack
    assert cg.weight_operand(nchw, taken=True) is not pack  # taken once: nothing left cached
    assert len(cg._PACKS) == 0

    x = torch.randn(2, 4, 6, 6).contiguous(memory_format=CL)
    w = torch.nn.Parameter(torch.randn(8, 4, 3, 3))  # NCHW 3x3: the packed path
    gm = _geom(x, w, (1, 1), (1, 1), (1, 1), 1)

    def conv():
        return cg.conv_fwd(x, w, None, gm, backward_follows=True)[0]

    torch.testing.assert_close(conv(), F.conv2d(x, w.detach(), padding=1), rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        w.add_(1.0)
    torch.testing.assert_close(conv(), F.conv2d(x, w.detach(), padding=1), rtol=1e-4, atol=1e-4)
    w.data.mul_(0.5)  # no version bump
    torch.testing.assert_close(conv(), F.conv2d(x, w.detach(), padding=1), rtol=1e-4, atol=1e-4)
    left = weakref.ref(cg._PACKS[w][1])  # the last forward's pack, waiting for a backward
    del w, conv
    gc.collect()
    assert left() is None, "a freed weight's pending pack must be freed with it"


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("split", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_weight_gradient_in_the_weights_layout(monkeypatch, layout, split, dtype):
    """dw comes back with the weight's strides (autograd then accumulates it without a copy);
    a split pixel reduction (as on a GPU) sums to the same gradient."""
    n, cin, hw, cout, g = 2, 8, 9, 6, 2
    x = torch.randn(n, cin, hw, hw).to(dtype).contiguous(memory_format=CL)
    w = torch.randn(cout, cin // g, 3, 3).to(dtype)
    if layout == "channels_last":
        w = w.contiguous(memory_format=CL)
    gm = _geom(x, w, (1, 1), (1, 1), (1, 1), g)
    dz = torch.randn(n, cout, gm.oh, gm.ow).to(dtype).contiguous(memory_format=CL)
    if split > 1:  # k_per_split: a multiple of 64 pixels, as the GPU path chooses
        kps = (-(-gm.m // split) + 63) // 64 * 64
        monkeypatch.setattr(cg, "_wgrad_split", lambda gm_, dev: (-(-gm_.m // kps), kps))
        cg._WGRAD_PLANS.clear()
    dw = cg.conv_wgrad(x, dz, gm, w)
    cg._WGRAD_PLANS.clear()
    ref = torch.nn.grad.conv2d_weight(x.double(), w.shape, dz.double(), 1, 1, 1, g)
    assert dw.dtype == dtype and dw.shape == w.shape and dw.stride() == w.stride()
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(dw.double(), ref, rtol=tol, atol=tol * ref.abs().max().item())


def _partials(v: torch.Tensor, rows: int):
    """[T, 2, C] (mean, M2) partials of the [M, C] matrix ``v`` in slabs of ``rows`` rows, in a
    buffer with room for the merged rows (as the ops allocate it)."""
    m, c = v.shape
    t = -(-m // rows)
    part = torch.empty(ba.stats_scratch_numel(t, c))
    p = part[: t * 2 * c].view(t, 2, c)
    for i in range(t):
        slab = v[i * rows:(i + 1) * rows].double()
        p[i, 0] = slab.mean(0).float()
        p[i, 1] = ((slab - slab.mean(0)) ** 2).sum(0).float()
    return part, t


@pytest.mark.parametrize("offset", [0.0, 1000.0])
@pytest.mark.parametrize("t_rows", [ba.DIRECT_ROWS - 5, 3 * ba.MERGE_ROWS + 17])
def test_finalize_merges_many_partials(t_rows, offset):
    """Above DIRECT_ROWS partial rows the merge kernel reduces them in parallel first; mean,
    variance, the folded scale and the running statistics match float64 either way. With a
    mean 1000x the spread the variance keeps ~2 digits (the fp32 slab means limit it; no
    E[x^2]-E[x]^2 cancellation, which would leave none)."""
    rows, c = 7, 5
    m = t_rows * rows - 3  # a partial last slab
    v = torch.randn(m, c) * (0.01 if offset else 1.0) + offset
    part, t = _partials(v, rows)
    assert t == t_rows
    gamma, beta = torch.rand(c) + 0.5, torch.randn(c)
    rm, rv = torch.zeros(c), torch.ones(c)
    stats = ba.bn_finalize(part, t, rows, m, c, gamma, beta, rm, rv, training=True, momentum=0.5,
                           eps=1e-5, device=v.device)
    merged = ba._FIN[(t, rows, m, c, True, v.device, cg.interpreting())][0] is not None
    assert merged == (t > ba.DIRECT_ROWS)
    v64 = v.double()
    mean, var = v64.mean(0), v64.var(0, unbiased=False)
    rtol = 1e-2 if offset else 1e-5
    torch.testing.assert_close(stats[0].double(), mean, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(1 / stats[1].double() ** 2 - 1e-5, var, rtol=rtol, atol=0)
    torch.testing.assert_close(stats[2].double(), gamma.double() * stats[1].double(), rtol=1e-6, atol=0)
    torch.testing.assert_close(rm.double(), 0.5 * mean, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(rv.double(), 0.5 + 0.5 * v64.var(0, unbiased=True), rtol=rtol, atol=0)
