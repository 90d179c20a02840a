"""``fastcnn.ops.bn_act`` -- act(BN(x) [+ residual]) -- on every backend against the reference
(tests/op_cases.py): output, gradients of x / BN weight and bias / residual, running
statistics (training) or none touched (eval), activations, layouts, dtypes and argument
errors; then what one backend does its own way (the extension's primitives), and GPU shapes."""
from __future__ import annotations

import pytest
import torch

import fastcnn
from fastcnn import ops

from op_cases import ACT_PARAM, ACTS, GRID, LAYOUTS, backend, backends, check_op, make, tensor  # noqa: F401

OP = "bn_act"


def check_bn_act(backend, shape, layout, dtype, act, training, residual, *, act_param=None, track=True,
                 momentum=0.1, scale=2.0, offset=3.0, running=(1.0, 4.0), device=None):
    """One bn_act call on ``backend`` against the reference. ``running``: spread of the initial
    running mean and of the running variance (above 0.5)."""
    dev = device or backend.device
    c = shape[1]
    tensors = dict(
        x=make(shape, layout, dtype, dev, scale=scale, offset=offset, requires_grad=True),
        bn_weight=tensor(c, device=dev, uniform=True, offset=0.5, requires_grad=True),
        bn_bias=tensor(c, device=dev, requires_grad=True),
        running_mean=tensor(c, device=dev, scale=running[0]) if track else None,
        running_var=tensor(c, device=dev, uniform=True, scale=running[1], offset=0.5) if track else None,
        residual=make(shape, layout, dtype, dev, requires_grad=True) if residual else None,
    )
    check_op(backend, OP, tensors, training=training, momentum=momentum, eps=1e-5, act=act,
             act_param=ACT_PARAM[act] if act_param is None else act_param)


# =========================================================================== every backend

# n, c, h, w, act, training, residual, dtype, layout: small enough for the Triton interpreter
CASES = [
    (2, 3, 7, 7, "relu", True, False, torch.float32, "nchw"),
    (1, 17, 5, 5, "silu", True, True, torch.float32, "channels_last"),
    (2, 10, 7, 7, "gelu", False, True, torch.float32, "strided"),
    (2, 10, 15, 15, "leaky_relu", True, True, torch.bfloat16, "nchw"),
    (2, 16, 9, 9, "elu", True, False, torch.float32, "strided"),
    (2, 6, 7, 7, "identity", True, True, torch.bfloat16, "channels_last"),
    (1, 5, 3, 5, "relu", False, False, torch.float16, "nchw"),
    (2, 7, 5, 5, "relu", True, True, torch.float16, "nchw"),
]


def _case_id(c):
    n, ch, h, w, act, training, res, dtype, layout = c
    return f"n{n}-{ch}x{h}x{w}-{act}-{'train' if training else 'eval'}{'-res' if res else ''}-{str(dtype)[6:]}-{layout}"


@backends()
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_bn_act(backend, case):
    n, c, h, w, act, training, res, dtype, layout = case
    check_bn_act(backend, (n, c, h, w), layout, dtype, act, training, res)


@backends()
def test_bn_act_without_running_stats(backend):
    """track_running_stats=False: no running statistics, batch statistics only."""
    check_bn_act(backend, (2, 6, 5, 5), "nchw", torch.float32, "relu", True, False, track=False)


# --------------------------------------------------------------------------- dense grids
# The grids below run on op_cases.GRID (see there: the extension on the CPU, where a case costs
# milliseconds); the other backends cover the same features with CASES above. (The cuda backend
# has its own grid, at GPU sizes, below.)

SHAPES = ((1, 3, 7, 7), (2, 10, 15, 15), (3, 17, 7, 15))


def _grid_bn_act(backend, shape, layout, dtype, act, training, residual, **kw):
    kw = dict(dict(offset=0.0, momentum=0.3, running=(0.1, 1.0)), **kw)
    check_bn_act(backend, shape, layout, dtype, act, training, residual, **kw)


@backends(*GRID)
@pytest.mark.parametrize("training", (True, False), ids=("train", "eval"))
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_bn_act_shapes_layouts(backend, shape, layout, dtype, training):
    _grid_bn_act(backend, shape, layout, dtype, "relu", training, True)


@backends(*GRID)
@pytest.mark.parametrize("with_residual", (False, True), ids=("plain", "residual"))
@pytest.mark.parametrize("training", (True, False), ids=("train", "eval"))
@pytest.mark.parametrize("act,act_param", ACTS, ids=[a for a, _ in ACTS])
def test_bn_act_activations(backend, act, act_param, training, with_residual):
    _grid_bn_act(backend, (2, 10, 7, 15), "channels_last", torch.float32, act, training, with_residual,
                 act_param=act_param)
    _grid_bn_act(backend, (3, 5, 15, 7), "nchw", torch.bfloat16, act, training, with_residual,
                 act_param=act_param)


@backends(*GRID)
def test_bn_act_large_mean_is_stable(backend):
    """A channel mean far above its spread must not lose the variance (shifted sums rather
    than sum and sum of squares). Not on Triton: its apply pass computes x * scale + shift
    (BN folded), whose output error is a few ulp of |x| -- here ~12x PyTorch's, which computes
    (x - mean) * rstd; its statistics are checked by test_conv_bn_act_large_mean_variance_is_stable."""
    for layout in ("nchw", "channels_last"):
        _grid_bn_act(backend, (4, 6, 15, 15), layout, torch.float32, "identity", True, False, offset=1000.0)


@backends(*GRID)
@pytest.mark.parametrize("training", (True, False), ids=("train", "eval"))
def test_bn_act_fp16(backend, training):
    """fp16 storage (with fp32 math) on the CPU too."""
    _grid_bn_act(backend, (2, 10, 7, 7), "nchw", torch.float16, "relu", training, True)


# --------------------------------------------------------------------------- argument errors
# fastcnn.ops checks its arguments before dispatch: the same errors on every backend.

def _bn(c, device):
    return torch.randn(c, device=device), torch.randn(c, device=device), torch.zeros(c, device=device), \
        torch.ones(c, device=device)


@backends()
def test_bn_act_rejects_wrong_rank(backend):
    x = torch.randn(2, 4, 6, 6, device=backend.device)
    with fastcnn.use_backend(backend.name), pytest.raises(ValueError, match="bn_weight"):
        ops.bn_act(x, torch.randn(4, 1, device=backend.device), torch.randn(4, device=backend.device), None, None)


@backends()
def test_bn_act_rejects_dtype_mix(backend):
    dev = backend.device
    x = torch.randn(2, 4, 6, 6, device=dev).half()
    with fastcnn.use_backend(backend.name), pytest.raises(TypeError, match="bn_weight has dtype"):
        ops.bn_act(x, torch.randn(4, dtype=torch.float64, device=dev), *_bn(4, dev)[1:])


@backends()
def test_bn_act_rejects_device_mix_meta(backend):
    """A meta tensor stands in for 'another device' (no second device needed)."""
    dev = backend.device
    w, b, _, rv = _bn(4, dev)
    with fastcnn.use_backend(backend.name), pytest.raises(ValueError, match="running_mean is on meta"):
        ops.bn_act(torch.randn(2, 4, 6, 6, device=dev), w, b, torch.zeros(4, device="meta"), rv)


@backends()
def test_bn_act_rejects_single_value_per_channel_in_training(backend):
    """Like nn.BatchNorm2d: batch statistics of one value are undefined."""
    dev = backend.device
    with fastcnn.use_backend(backend.name), pytest.raises(ValueError, match="more than one value per channel"):
        ops.bn_act(torch.randn(1, 4, 1, 1, device=dev), *_bn(4, dev), training=True)


@backends()
def test_bn_act_eval_needs_running_stats(backend):
    dev = backend.device
    with fastcnn.use_backend(backend.name), pytest.raises(TypeError, match="running_mean must be a tensor"):
        ops.bn_act(torch.randn(1, 3, 4, 4, device=dev), torch.ones(3, device=dev), torch.zeros(3, device=dev),
                   None, None, training=False)


@backends()
@pytest.mark.parametrize("layout", ("nchw", "channels_last"))
def test_bn_act_eval_on_an_empty_plane(backend, layout):
    """Eval mode on an input with H * W == 0 (N > 0): an empty output and zero BN gradients, as
    eager; the extension's kernels used to read rows of the empty tensor (a crash)."""
    dev = backend.device
    x = torch.randn(2, 3, 0, 4, device=dev)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    w = torch.ones(3, device=dev, requires_grad=True)
    b = torch.zeros(3, device=dev, requires_grad=True)
    rm, rv = torch.zeros(3, device=dev), torch.ones(3, device=dev)
    with fastcnn.use_backend(backend.name):
        y = ops.bn_act(x, w, b, rm, rv, training=False)
    assert y.shape == x.shape
    y.sum().backward()
    assert x.grad.shape == x.shape
    assert torch.equal(w.grad, torch.zeros(3, device=dev)) and torch.equal(b.grad, torch.zeros(3, device=dev))


@backends()
@pytest.mark.parametrize("layout", ("nchw", "channels_last"))
def test_bn_act_relu_keeps_a_non_finite_gradient_out_where_it_cuts(backend, layout):
    """relu's backward gives exactly 0 where z <= 0 whatever the incoming gradient, as eager's
    threshold_backward: an inf there (an fp16 overflow under AMP) must not become NaN. Odd
    sizes, so that the extension's scalar tails run too."""
    dev = backend.device
    x = make((2, 3, 5, 3), layout, torch.float32, dev, requires_grad=True)
    w = torch.ones(3, device=dev)
    b = torch.zeros(3, device=dev)
    rm, rv = torch.zeros(3, device=dev), torch.ones(3, device=dev)
    with fastcnn.use_backend(backend.name):
        y = ops.bn_act(x, w, b, rm, rv, training=False)
    cut = x.detach() <= 0
    assert cut.any() and (~cut).any()
    gy = torch.where(cut, torch.full_like(y, float("inf")), torch.ones_like(y))
    y.backward(gy)
    assert torch.equal(x.grad[cut], torch.zeros_like(x.grad[cut]))
    assert torch.isfinite(x.grad).all()


# =========================================================================== extension only

@pytest.mark.extension
@pytest.mark.parametrize("with_residual", (False, True), ids=("plain", "residual"))
@pytest.mark.parametrize("act,act_param", ACTS, ids=[a for a, _ in ACTS])
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_bn_act_apply_rebuilds_forward_bit_for_bit(layout, dtype, act, act_param, with_residual):
    """The primitive torch.ops.fastcnn.bn_act_apply (the rebuild op): bn_act_forward's y again
    from its own statistics, identical bits."""
    pytest.importorskip("fastcnn._C", reason="the extension fastcnn._C is not built")
    x = make((2, 10, 7, 9), layout, dtype, scale=2.0, offset=0.5)
    r = make((2, 10, 7, 9), layout, dtype) if with_residual else None
    w, b = torch.rand(10) + 0.5, torch.randn(10)
    y, mean, var = torch.ops.fastcnn.bn_act_forward(x, w, b, r, 1e-5, act, act_param)
    again = torch.ops.fastcnn.bn_act_apply(x, w, b, r, mean, var, 1e-5, act, act_param)
    assert again.stride() == y.stride()
    assert torch.equal(again, y)


@pytest.mark.extension
@pytest.mark.parametrize("training", (True, False), ids=("train", "eval"))
@pytest.mark.parametrize("layout", ("nchw", "channels_last"))
def test_bn_act_layer_direct_and_dispatched_agree(layout, training):
    """The composite runs the primitive's code directly for real tensors (running statistics
    passed to the kernels) and through the dispatcher under a dispatch mode (what fake and
    functional tracing see): the same bits either way, and the same as the primitives."""
    pytest.importorskip("fastcnn._C", reason="the extension fastcnn._C is not built")
    from torch.utils._python_dispatch import TorchDispatchMode

    class Passthrough(TorchDispatchMode):
        seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.seen.append(str(func.overloadpacket))
            return func(*args, **(kwargs or {}))

    x = make((3, 6, 5, 7), layout, torch.bfloat16, scale=2.0, offset=0.5)
    r = make((3, 6, 5, 7), layout, torch.bfloat16)
    w, b = torch.rand(6) + 0.5, torch.randn(6)
    stats = torch.randn(6), torch.rand(6) + 0.5
    outs = []
    for mode in (None, Passthrough()):
        rm, rv = stats[0].clone(), stats[1].clone()
        if mode is None:
            y, mean, var = torch.ops.fastcnn.bn_act(x, w, b, rm, rv, r, training, 0.3, 1e-5, "silu", 0.0)
        else:
            with mode:
                y, mean, var = torch.ops.fastcnn.bn_act(x, w, b, rm, rv, r, training, 0.3, 1e-5, "silu", 0.0)
        outs.append((y, mean, var, rm, rv))
    for a, b_ in zip(*outs):
        assert torch.equal(a, b_)
    assert ("fastcnn.bn_act_forward" if training else "fastcnn.bn_act_apply") in Passthrough.seen
    y, mean, var, rm, rv = outs[0]
    if training:
        ref = torch.ops.fastcnn.bn_act_forward(x, w, b, r, 1e-5, "silu", 0.0)
        assert all(torch.equal(p, q) for p, q in zip(ref, (y, mean, var)))
        assert not torch.equal(rm, stats[0]) and not torch.equal(rv, stats[1])
    else:
        assert torch.equal(y, torch.ops.fastcnn.bn_act_apply(x, w, b, r, *stats, 1e-5, "silu", 0.0))
        assert torch.equal(rm, stats[0]) and torch.equal(rv, stats[1])


@pytest.mark.extension
@pytest.mark.parametrize("training", (True, False), ids=("train", "eval"))
def test_bn_act_node_backward_twice_retain_graph_and_inplace(training):
    """The composite's hand-written autograd node (csrc/ops/bn_act/bn_act.cpp): named, a second
    backward without retain_graph is a clear error, with it the same gradients, and BN
    parameters changed in place before backward are caught."""
    pytest.importorskip("fastcnn._C", reason="the extension fastcnn._C is not built")
    x = make((2, 5, 4, 3), "nchw", torch.float32, requires_grad=True)
    w, b = (torch.rand(5) + 0.5).requires_grad_(), torch.randn(5).requires_grad_()
    rm, rv = torch.zeros(5), torch.ones(5)
    y = torch.ops.fastcnn.bn_act(x, w, b, rm, rv, None, training, 0.1, 1e-5, "relu", 0.0)[0]
    assert y.grad_fn.name() == "fastcnn::BnActBackward"
    g = torch.randn_like(y)
    y.backward(g, retain_graph=True)
    first = [t.grad.clone() for t in (x, w, b)]
    for t in (x, w, b):
        t.grad = None
    y.backward(g)
    assert all(torch.equal(t.grad, f) for t, f in zip((x, w, b), first))
    with pytest.raises(RuntimeError, match="a second time"):
        y.backward(g)
    with torch.autograd.detect_anomaly(check_nan=False):  # anomaly mode records the node's forward
        y = torch.ops.fastcnn.bn_act(x, w, b, rm, rv, None, training, 0.1, 1e-5, "relu", 0.0)[0]
        with torch.no_grad():
            w.mul_(2.0)
        with pytest.raises(RuntimeError, match="modified in place between forward and backward"):
            y.sum().backward()


# =========================================================================== GPU

# Triton: the zoo's BN+activation shapes (n, c, h, w), channels_last, relu, training, residual
GPU_ZOO = [(128, 16, 32, 32), (128, 64, 8, 8), (128, 256, 32, 32), (128, 1024, 8, 8), (128, 3, 32, 32)]


@pytest.mark.gpu
@backends("triton")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", GPU_ZOO, ids=lambda c: f"n{c[0]}-{c[1]}x{c[2]}")
def test_bn_act_gpu_zoo_shapes(backend, shape, dtype):
    check_bn_act(backend, shape, "channels_last", dtype, "relu", True, True, device="cuda")


# the extension's cuda backend: shapes x layouts x dtypes x every activation
@pytest.mark.gpu
@backends("cuda")
@pytest.mark.parametrize("dtype", (torch.float32, torch.float16, torch.bfloat16), ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", ((128, 16, 32, 32), (128, 64, 8, 8), (3, 17, 7, 15)),
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("training", (True, False), ids=("train", "eval"))
def test_bn_act_gpu_grid(backend, shape, layout, dtype, training):
    for act, p in ACTS:
        _grid_bn_act(backend, shape, layout, dtype, act, training, True, act_param=p)
