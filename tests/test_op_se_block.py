"""``fastcnn.ops.se_block`` -- act(x * sigmoid(fc2(relu(fc1(mean(x))))) [+ residual]) -- on every
backend against the reference (tests/op_cases.py): output and gradients of x, both FC weights
and biases and the residual, over odd shapes, hidden sizes, activations, layouts and dtypes,
the fused SqueezeExcite layer, and argument errors; then GPU shapes."""
from __future__ import annotations

import copy

import pytest
import torch

import fastcnn
from fastcnn import ops

from op_cases import (ACT_PARAM, ACTS, GRID, LAYOUTS, assert_close, backend, backends, check_op,  # noqa: F401
                      make, tensor)

OP = "se_block"


def check_se_block(backend, shape, hidden, act, res, dtype, layout, biases, *, act_param=None, scale=2.0,
                   offset=0.0, bias_scale=1.0, device=None):
    """One se_block call on ``backend`` against the reference (x: ``randn * scale + offset``)."""
    dev = device or backend.device
    c = shape[1]
    tensors = dict(
        x=make(shape, layout, dtype, dev, scale=scale, offset=offset, requires_grad=True),
        fc1_weight=tensor(hidden, c, dtype=dtype, device=dev, scale=c ** -0.5, requires_grad=True),
        fc1_bias=tensor(hidden, dtype=dtype, device=dev, scale=bias_scale, requires_grad=True) if biases else None,
        fc2_weight=tensor(c, hidden, dtype=dtype, device=dev, scale=hidden ** -0.5, requires_grad=True),
        fc2_bias=tensor(c, dtype=dtype, device=dev, scale=bias_scale, requires_grad=True) if biases else None,
        residual=make(shape, layout, dtype, dev, requires_grad=True) if res else None,
    )
    check_op(backend, OP, tensors, act=act, act_param=ACT_PARAM[act] if act_param is None else act_param)


# =========================================================================== every backend

# n, c, h, w, hidden, act, residual, dtype, layout, biases: small enough for the Triton interpreter
CASES = [
    (2, 16, 5, 5, 4, "relu", True, torch.float32, "nchw", True),
    (1, 17, 7, 7, 3, "silu", False, torch.float32, "channels_last", True),
    (2, 10, 9, 9, 1, "identity", True, torch.float32, "strided", False),
    (2, 32, 5, 5, 2, "relu", True, torch.bfloat16, "channels_last", True),
    (2, 12, 7, 7, 3, "gelu", True, torch.float16, "nchw", True),
    (2, 24, 15, 15, 6, "elu", False, torch.float32, "nchw", True),
]


def _case_id(c):
    n, ch, h, w, hid, act, res, dt, lay, b = c
    return f"n{n}-{ch}x{h}x{w}-h{hid}-{act}{'-res' if res else ''}-{str(dt)[6:]}-{lay}{'' if b else '-nobias'}"


@backends()
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_se_block(backend, case):
    n, c, h, w, hidden, act, res, dtype, layout, biases = case
    check_se_block(backend, (n, c, h, w), hidden, act, res, dtype, layout, biases)


@backends()
def test_se_block_module_fused_matches_reference(backend):
    """The SqueezeExcite layer with fused=True (this backend) against the same layer unfused:
    output and the gradients of x, residual and every parameter."""
    from fastcnn.layers.squeeze_excite import SqueezeExcite

    torch.manual_seed(1)
    dev = backend.device
    m = SqueezeExcite(32, reduction=8, out_act="relu").to(dev)
    exact = copy.deepcopy(m).double()
    x = torch.randn(2, 32, 8, 8, device=dev, requires_grad=True)
    r = torch.randn(2, 32, 8, 8, device=dev, requires_grad=True)
    y_ref = m(x, r)
    g = torch.randn_like(y_ref)
    grads_ref = torch.autograd.grad(y_ref, [x, r, *m.parameters()], g)
    x64, r64 = (t.detach().double().requires_grad_() for t in (x, r))
    y64 = exact(x64, r64)
    grads64 = torch.autograd.grad(y64, [x64, r64, *exact.parameters()], g.double())
    m.fused = True
    with fastcnn.use_backend(backend.name):
        y = m(x, r)
    grads = torch.autograd.grad(y, [x, r, *m.parameters()], g)
    assert_close(y, y64, torch.float32, "output", y_ref)
    names = ["x", "residual", *(n for n, _ in m.named_parameters())]
    for name, a, e, t in zip(names, grads, grads64, grads_ref):
        assert_close(a, e, torch.float32, f"grad of {name}", t)


# --------------------------------------------------------------------------- dense grids
# The grids below run on op_cases.GRID (see there: the extension on the CPU, where a case costs
# milliseconds); the other backends cover the same features with CASES above. (The cuda backend
# has its own grid, at GPU sizes, below.)

def _grid_se(backend, shape, hidden, layout, dtype, act="relu", act_param=0.0, with_residual=True,
             with_bias=True, **kw):
    check_se_block(backend, shape, hidden, act, with_residual, dtype, layout, with_bias, act_param=act_param,
                   scale=1.0, offset=0.5, bias_scale=0.5, **kw)


@backends(*GRID)
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape,hidden", (((1, 3, 7, 7), 1), ((2, 10, 15, 15), 3), ((3, 17, 7, 15), 4)),
                         ids=("1x3x7x7", "2x10x15x15", "3x17x7x15"))
def test_se_block_shapes_layouts(backend, shape, hidden, layout, dtype):
    _grid_se(backend, shape, hidden, layout, dtype)


@backends(*GRID)
@pytest.mark.parametrize("with_bias", (True, False), ids=("bias", "nobias"))
@pytest.mark.parametrize("with_residual", (True, False), ids=("residual", "plain"))
@pytest.mark.parametrize("act,act_param", ACTS, ids=[a for a, _ in ACTS])
def test_se_block_activations(backend, act, act_param, with_residual, with_bias):
    _grid_se(backend, (2, 10, 7, 9), 3, "channels_last", torch.float32, act, act_param, with_residual, with_bias)
    _grid_se(backend, (2, 12, 5, 7), 2, "nchw", torch.bfloat16, act, act_param, with_residual, with_bias)


# --------------------------------------------------------------------------- argument errors
# fastcnn.ops checks its arguments before dispatch: the same errors on every backend.

@backends()
def test_se_block_rejects_wrong_rank(backend):
    dev = backend.device
    x = torch.randn(2, 4, 6, 6, device=dev)
    with fastcnn.use_backend(backend.name), pytest.raises(ValueError, match="fc1_weight"):
        ops.se_block(x, torch.randn(2, 4, 1, device=dev), None, torch.randn(4, 2, device=dev), None)


@backends()
def test_se_block_rejects_fc_shapes(backend):
    dev = backend.device
    with fastcnn.use_backend(backend.name):
        x = torch.randn(2, 8, 4, 4, device=dev)
        with pytest.raises(ValueError, match="fc1_weight has shape \\(2, 6\\) but x has 8 channels"):
            ops.se_block(x, torch.randn(2, 6, device=dev), None, torch.randn(8, 2, device=dev), None)
        with pytest.raises(ValueError, match="fc2_weight has shape"):
            ops.se_block(x, torch.randn(2, 8, device=dev), None, torch.randn(8, 3, device=dev), None)
        x = torch.randn(2, 4, 6, 6, device=dev)
        with pytest.raises(ValueError, match="fc2_weight has shape"):
            ops.se_block(x, torch.randn(2, 4, device=dev), None, torch.randn(5, 2, device=dev), None)


# =========================================================================== GPU

# Triton: SE-ResNeXt-29 block tails, (channels, spatial) = (256, 32), (512, 16), (1024, 8), reduction 16
GPU_ZOO = [(128, 256, 32, 32, 16), (128, 512, 16, 16, 32), (128, 1024, 8, 8, 64)]


@pytest.mark.gpu
@backends("triton")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", GPU_ZOO, ids=lambda c: f"n{c[0]}-{c[1]}x{c[2]}")
def test_se_block_gpu_zoo_shapes(backend, case, dtype):
    n, c, h, w, hidden = case
    check_se_block(backend, (n, c, h, w), hidden, "relu", True, dtype, "channels_last", True, device="cuda")


# the extension's cuda backend: shapes x layouts x dtypes x three activations
@pytest.mark.gpu
@backends("cuda")
@pytest.mark.parametrize("dtype", (torch.float32, torch.float16, torch.bfloat16), ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape,hidden", (((128, 256, 32, 32), 16), ((128, 1024, 8, 8), 64), ((3, 17, 7, 15), 4)),
                         ids=("128x256x32x32", "128x1024x8x8", "3x17x7x15"))
def test_se_block_gpu_grid(backend, shape, hidden, layout, dtype):
    for act, p in (("relu", 0.0), ("identity", 0.0), ("silu", 0.0)):
        _grid_se(backend, shape, hidden, layout, dtype, act, p)
