"""The compiled ``cpu`` backend's BN+activation family against the reference: ``bn_act``
(training and eval, running statistics), ``conv_bn_act`` and ``conv_act`` (bias + residual +
act epilogue), forward and backward, over odd shapes, layouts, dtypes and activations."""
from __future__ import annotations

import pytest
import torch

import fastcnn
from fastcnn import ops
from fastcnn.ops import reference as ref

from extension_cases import ACTS, LAYOUTS, assert_close, leaf, make, upcast

pytestmark = pytest.mark.extension

SHAPES = ((1, 3, 7, 7), (2, 10, 15, 15), (3, 17, 7, 15))
DTYPES = (torch.float32, torch.bfloat16)


def bn_params(c, dtype=torch.float32):
    w = (torch.rand(c) + 0.5).to(dtype).requires_grad_()
    b = torch.randn(c).to(dtype).requires_grad_()
    return w, b, torch.randn(c) * 0.1, torch.rand(c) + 0.5


def run_bn_act(shape, layout, dtype, act, act_param, training, with_residual, device="cpu",
               backend="cpu", offset=0.0):
    x = leaf(make(shape, layout, dtype, device, scale=2.0, offset=offset))
    r = leaf(make(shape, layout, dtype, device)) if with_residual else None
    w, b, rm, rv = bn_params(shape[1])
    w, b = leaf(w.to(device)), leaf(b.to(device))
    rm, rv = rm.to(device), rv.to(device)
    rm_ref, rv_ref = rm.clone(), rv.clone()
    with fastcnn.use_backend(backend):
        y = ops.bn_act(x, w, b, rm, rv, training=training, momentum=0.3, eps=1e-5, act=act,
                       act_param=act_param, residual=r)
    xr, rr, wr, br = upcast(x), upcast(r), upcast(w), upcast(b)
    y_ref = ref.bn_act(xr, wr, br, rm_ref, rv_ref, training=training, momentum=0.3, eps=1e-5,
                       act=act, act_param=act_param, residual=rr)
    assert y.dtype == dtype and y.shape == x.shape
    if layout == "channels_last":
        assert y.is_contiguous(memory_format=torch.channels_last)
    assert_close(y, y_ref, dtype, "y")
    g = torch.randn_like(y_ref)
    inputs = [t for t in (x, w, b, r) if t is not None]
    inputs_ref = [t for t in (xr, wr, br, rr) if t is not None]
    grads = torch.autograd.grad(y, inputs, g.to(dtype))
    grads_ref = torch.autograd.grad(y_ref, inputs_ref, g.to(dtype).float())
    for name, a, e in zip(("x", "bn_weight", "bn_bias", "residual"), grads, grads_ref):
        assert a.dtype == e.dtype or a.dtype == dtype
        assert_close(a, e, dtype, f"grad {name}")
    assert_close(rm, rm_ref, torch.float32 if dtype == torch.float32 else dtype, "running_mean")
    assert_close(rv, rv_ref, torch.float32 if dtype == torch.float32 else dtype, "running_var")


@pytest.mark.parametrize("training", (True, False), ids=("train", "eval"))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_bn_act_shapes_layouts(shape, layout, dtype, training):
    run_bn_act(shape, layout, dtype, "relu", 0.0, training, with_residual=True)


@pytest.mark.parametrize("with_residual", (False, True), ids=("plain", "residual"))
@pytest.mark.parametrize("training", (True, False), ids=("train", "eval"))
@pytest.mark.parametrize("act,act_param", ACTS, ids=[a for a, _ in ACTS])
def test_bn_act_activations(act, act_param, training, with_residual):
    run_bn_act((2, 10, 7, 15), "channels_last", torch.float32, act, act_param, training, with_residual)
    run_bn_act((3, 5, 15, 7), "nchw", torch.bfloat16, act, act_param, training, with_residual)


def test_bn_act_large_mean_is_stable():
    """A channel mean far above its spread must not lose the variance (shifted sums)."""
    run_bn_act((4, 6, 15, 15), "nchw", torch.float32, "identity", 0.0, True, False, offset=1000.0)
    run_bn_act((4, 6, 15, 15), "channels_last", torch.float32, "identity", 0.0, True, False, offset=1000.0)


def test_bn_act_without_running_stats():
    x = make((2, 3, 7, 7))
    w, b, _, _ = bn_params(3)
    with fastcnn.use_backend("cpu"):
        y = ops.bn_act(x, w, b, None, None, training=True, act="relu")
    assert_close(y, ref.bn_act(x, w, b, None, None, training=True, act="relu"), torch.float32)


def test_bn_act_single_value_per_channel_is_an_error():
    w, b, rm, rv = bn_params(4)
    with fastcnn.use_backend("cpu"), pytest.raises(ValueError, match="more than one value per channel"):
        ops.bn_act(torch.randn(1, 4, 1, 1), w, b, rm, rv, training=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ("nchw", "channels_last"))
@pytest.mark.parametrize("groups,stride", ((1, 1), (2, 2)), ids=("dense", "grouped_s2"))
def test_conv_bn_act(layout, dtype, groups, stride):
    x = leaf(make((2, 4, 15, 15), layout, dtype))
    wc = leaf(torch.randn(10, 4 // groups, 3, 3).to(dtype) * 0.3)
    r = leaf(make((2, 10, (15 - 1) // stride + 1, (15 - 1) // stride + 1), layout, dtype))
    w, b, rm, rv = bn_params(10)
    rm_ref, rv_ref = rm.clone(), rv.clone()
    kw = dict(stride=stride, padding=1, groups=groups, training=True, momentum=0.1, act="silu", residual=r)
    with fastcnn.use_backend("cpu"):
        y = ops.conv_bn_act(x, wc, None, w, b, rm, rv, **kw)
    # reference: the same convolution (in x's dtype, as the fused path runs it), then the
    # reference BN + act in fp32; bf16 rounding of the conv output is common to both
    x2, wc2 = leaf(x), leaf(wc)
    wr, br, rr = upcast(w), upcast(b), upcast(r)
    z = torch.nn.functional.conv2d(x2, wc2, None, stride, 1, 1, groups).float()
    y_ref = ref.bn_act(z, wr, br, rm_ref, rv_ref, training=True, momentum=0.1, act="silu", residual=rr)
    assert_close(y, y_ref, dtype, "y")
    g = torch.randn_like(y_ref)
    grads = torch.autograd.grad(y, (x, wc, w, b, r), g.to(dtype))
    grads_ref = torch.autograd.grad(y_ref, (x2, wc2, wr, br, rr), g.to(dtype).float())
    for name, a, e in zip(("x", "weight", "bn_weight", "bn_bias", "residual"), grads, grads_ref):
        assert_close(a, e, dtype, f"grad {name}")
    assert_close(rm, rm_ref, torch.float32 if dtype == torch.float32 else dtype, "running_mean")
    assert_close(rv, rv_ref, torch.float32 if dtype == torch.float32 else dtype, "running_var")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("with_bias,with_residual,act,act_param",
                         ((True, False, "relu", 0.0), (True, True, "leaky_relu", 0.1),
                          (False, True, "gelu", 0.0), (False, False, "identity", 0.0)))
def test_conv_act(layout, dtype, with_bias, with_residual, act, act_param):
    x = leaf(make((2, 3, 15, 7), layout, dtype))
    wc = leaf(torch.randn(17, 3, 3, 3).to(dtype) * 0.3)
    bias = leaf(torch.randn(17).to(dtype)) if with_bias else None
    r = leaf(make((2, 17, 15, 7), layout, dtype)) if with_residual else None
    kw = dict(stride=1, padding=1, act=act, act_param=act_param)
    with fastcnn.use_backend("cpu"):
        y = ops.conv_act(x, wc, bias, residual=r, **kw)
    # reference: the same convolution in x's dtype, then bias + residual + act in fp32
    x2, wc2, biasr, rr = leaf(x), leaf(wc), upcast(bias), upcast(r)
    z = torch.nn.functional.conv2d(x2, wc2, None, 1, 1).float()
    z = z if biasr is None else z + biasr[:, None, None]
    y_ref = ref.activation(z if rr is None else z + rr, act, act_param)
    assert_close(y, y_ref, dtype, "y")
    inputs = [t for t in (x, wc, bias, r) if t is not None]
    inputs_ref = [t for t in (x2, wc2, biasr, rr) if t is not None]
    g = torch.randn_like(y_ref)
    for a, e in zip(torch.autograd.grad(y, inputs, g.to(dtype)),
                    torch.autograd.grad(y_ref, inputs_ref, g.to(dtype).float())):
        assert_close(a, e, dtype, "grad")


@pytest.mark.parametrize("training", (True, False), ids=("train", "eval"))
def test_bn_act_fp16(training):
    """fp16 storage works on CPU too (at:: makes it easy), with fp32 math."""
    run_bn_act((2, 10, 7, 7), "nchw", torch.float16, "relu", 0.0, training, True)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", (torch.float32, torch.float16, torch.bfloat16), ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", ((128, 16, 32, 32), (128, 64, 8, 8), (3, 17, 7, 15)),
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("training", (True, False), ids=("train", "eval"))
def test_bn_act_cuda(shape, layout, dtype, training):
    if not fastcnn._C.has_cuda():
        pytest.fail("a GPU is present but fastcnn._C was built without CUDA kernels")
    for act, p in ACTS:
        run_bn_act(shape, layout, dtype, act, p, training, True, device="cuda", backend="cuda")


@pytest.mark.parametrize("with_residual", (False, True), ids=("plain", "residual"))
@pytest.mark.parametrize("act,act_param", ACTS, ids=[a for a, _ in ACTS])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_bn_act_apply_rebuilds_forward_bit_for_bit(layout, dtype, act, act_param, with_residual):
    """The rebuild op: bn_act_forward's y again from its own statistics, identical bits."""
    if fastcnn.ops.dispatch.unavailable_reason("cpu", "bn_act", "cpu") is not None:
        pytest.skip("the cpu backend (extension) is not built")
    x = make((2, 10, 7, 9), layout, dtype, scale=2.0, offset=0.5)
    r = make((2, 10, 7, 9), layout, dtype) if with_residual else None
    w, b = torch.rand(10) + 0.5, torch.randn(10)
    y, mean, var = torch.ops.fastcnn.bn_act_forward(x, w, b, r, 1e-5, act, act_param)
    again = torch.ops.fastcnn.bn_act_apply(x, w, b, r, mean, var, 1e-5, act, act_param)
    assert again.stride() == y.stride()
    assert torch.equal(again, y)
