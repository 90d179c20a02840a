"""The compiled ``cpu`` backend's fused SE block against the reference: forward and
backward (x, fc weights and biases, residual) over odd shapes, layouts, dtypes, activations,
with and without biases."""
from __future__ import annotations

import pytest
import torch

import fastcnn
from fastcnn import ops
from fastcnn.ops import reference as ref

from extension_cases import ACTS, LAYOUTS, assert_close, leaf, make, upcast

pytestmark = pytest.mark.extension


def run_se(shape, hidden, layout, dtype, act="relu", act_param=0.0, with_residual=True, with_bias=True,
           device="cpu", backend="cpu"):
    c = shape[1]
    x = leaf(make(shape, layout, dtype, device, offset=0.5))
    r = leaf(make(shape, layout, dtype, device)) if with_residual else None
    w1 = leaf((torch.randn(hidden, c, device=device) / c ** 0.5).to(dtype))
    w2 = leaf((torch.randn(c, hidden, device=device) / hidden ** 0.5).to(dtype))
    b1 = leaf(torch.randn(hidden, device=device).to(dtype) * 0.5) if with_bias else None
    b2 = leaf(torch.randn(c, device=device).to(dtype) * 0.5) if with_bias else None
    with fastcnn.use_backend(backend):
        y = ops.se_block(x, w1, b1, w2, b2, residual=r, act=act, act_param=act_param)
    xr, rr, w1r, b1r, w2r, b2r = (upcast(t) for t in (x, r, w1, b1, w2, b2))
    y_ref = ref.se_block(xr, w1r, b1r, w2r, b2r, residual=rr, act=act, act_param=act_param)
    assert y.dtype == dtype
    if layout == "channels_last":
        assert y.is_contiguous(memory_format=torch.channels_last)
    assert_close(y, y_ref, dtype, "y")
    names = ("x", "fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias", "residual")
    pairs = [(n, a, b) for n, a, b in zip(names, (x, w1, b1, w2, b2, r), (xr, w1r, b1r, w2r, b2r, rr)) if a is not None]
    g = torch.randn_like(y_ref).to(dtype)
    grads = torch.autograd.grad(y, [a for _, a, _ in pairs], g)
    grads_ref = torch.autograd.grad(y_ref, [b for _, _, b in pairs], g.float())
    for (name, a, _), ga, ge in zip(pairs, grads, grads_ref):
        assert ga.dtype == a.dtype, name
        assert_close(ga, ge, dtype, f"grad {name}")


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape,hidden", (((1, 3, 7, 7), 1), ((2, 10, 15, 15), 3), ((3, 17, 7, 15), 4)),
                         ids=("1x3x7x7", "2x10x15x15", "3x17x7x15"))
def test_se_block_shapes_layouts(shape, hidden, layout, dtype):
    run_se(shape, hidden, layout, dtype)


@pytest.mark.parametrize("with_bias", (True, False), ids=("bias", "nobias"))
@pytest.mark.parametrize("with_residual", (True, False), ids=("residual", "plain"))
@pytest.mark.parametrize("act,act_param", ACTS, ids=[a for a, _ in ACTS])
def test_se_block_activations(act, act_param, with_residual, with_bias):
    run_se((2, 10, 7, 9), 3, "channels_last", torch.float32, act, act_param, with_residual, with_bias)
    run_se((2, 12, 5, 7), 2, "nchw", torch.bfloat16, act, act_param, with_residual, with_bias)


def test_se_block_module_fused_matches_reference():
    from fastcnn.layers.squeeze_excite import SqueezeExcite

    torch.manual_seed(1)
    m = SqueezeExcite(32, reduction=8, out_act="relu")
    x = torch.randn(2, 32, 8, 8, requires_grad=True)
    r = torch.randn(2, 32, 8, 8, requires_grad=True)
    y_ref = m(x, r)
    g = torch.randn_like(y_ref)
    grads_ref = torch.autograd.grad(y_ref, [x, r, *m.parameters()], g)
    m.fused = True
    with fastcnn.use_backend("cpu"):
        y = m(x, r)
    grads = torch.autograd.grad(y, [x, r, *m.parameters()], g)
    assert_close(y, y_ref, torch.float32)
    for a, e in zip(grads, grads_ref):
        assert_close(a, e, torch.float32)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", (torch.float32, torch.float16, torch.bfloat16), ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape,hidden", (((128, 256, 32, 32), 16), ((128, 1024, 8, 8), 64), ((3, 17, 7, 15), 4)),
                         ids=("128x256x32x32", "128x1024x8x8", "3x17x7x15"))
def test_se_block_cuda(shape, hidden, layout, dtype):
    if not fastcnn._C.has_cuda():
        pytest.fail("a GPU is present but fastcnn._C was built without CUDA kernels")
    for act, p in (("relu", 0.0), ("identity", 0.0), ("silu", 0.0)):
        run_se(shape, hidden, layout, dtype, act, p, device="cuda", backend="cuda")
