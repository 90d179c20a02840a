"""``fastcnn.ops.conv_act`` -- act(conv(x) + bias [+ residual]) -- on every backend against the
reference (tests/op_cases.py): output and gradients of x, weight, bias and residual over odd
shapes, strides, dilations, groups, layouts and dtypes, including the activations whose
backward needs the saved pre-activation (silu, gelu, leaky_relu with a negative slope), and
argument errors; then what one backend does its own way (Triton's weight layout), and GPU
shapes."""
from __future__ import annotations

import pytest
import torch

import fastcnn
from fastcnn import ops

from op_cases import GRID, LAYOUTS, backend, backends, check_op, make, tensor  # noqa: F401

OP = "conv_act"


def check_conv_act(backend, n, cin, h, w, cout, k, s, p, d, g, act, act_param, res, dtype, layout, bias,
                   *, x_grad=True, w_scale=None, device=None):
    """One conv_act call on ``backend`` against the reference: a k x k convolution (stride s,
    padding p, dilation d, groups g), optional bias and residual. ``w_scale``: the weight's
    spread (default 1/sqrt(fan-in))."""
    dev = device or backend.device
    oh = (h + 2 * p - d * (k - 1) - 1) // s + 1
    ow = (w + 2 * p - d * (k - 1) - 1) // s + 1
    fan_in = cin // g * k * k
    tensors = dict(
        x=make((n, cin, h, w), layout, dtype, dev, requires_grad=x_grad),
        weight=tensor(cout, cin // g, k, k, dtype=dtype, device=dev, scale=w_scale or fan_in ** -0.5,
                      requires_grad=True),
        bias=tensor(cout, dtype=dtype, device=dev, requires_grad=True) if bias else None,
        residual=make((n, cout, oh, ow), layout, dtype, dev, requires_grad=True) if res else None,
    )
    check_op(backend, OP, tensors, stride=s, padding=p, dilation=d, groups=g, act=act, act_param=act_param)


# =========================================================================== every backend

# n, cin, h, w, cout, k, stride, pad, dil, groups, act, act_param, residual, dtype, layout, bias:
# small enough for the Triton interpreter
CASES = [
    (2, 3, 7, 7, 10, 3, 1, 1, 1, 1, "relu", 0.0, False, torch.float32, "nchw", True),
    (1, 17, 9, 9, 10, 3, 2, 1, 1, 1, "leaky_relu", 0.2, True, torch.float32, "channels_last", True),
    (2, 10, 7, 7, 3, 1, 1, 0, 1, 1, "silu", 0.0, True, torch.float32, "strided", False),
    (2, 4, 9, 9, 6, 5, 1, 2, 1, 2, "gelu", 0.0, False, torch.float32, "nchw", True),
    (2, 8, 7, 7, 8, 3, 1, 2, 2, 4, "elu", 1.0, True, torch.float32, "channels_last", True),
    (2, 6, 15, 15, 8, 3, 2, 0, 1, 2, "leaky_relu", -0.5, False, torch.float32, "nchw", True),
    (2, 8, 7, 7, 12, 3, 1, 1, 1, 4, "relu", 0.0, True, torch.bfloat16, "channels_last", True),
    (2, 5, 7, 7, 7, 3, 1, 1, 1, 1, "identity", 0.0, True, torch.bfloat16, "nchw", False),
    (1, 3, 5, 7, 5, 3, 1, 2, 1, 1, "gelu", 0.0, False, torch.float16, "nchw", True),
]


def _case_id(c):
    n, cin, h, w, cout, k, s, p, d, g, act, ap, res, dt, lay, b = c
    return (f"n{n}-{cin}x{h}x{w}-{cout}-k{k}s{s}p{p}d{d}g{g}-{act}{ap}"
            f"{'-res' if res else ''}-{str(dt)[6:]}-{lay}{'-bias' if b else ''}")


@backends()
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_conv_act(backend, case):
    check_conv_act(backend, *case)


@backends()
def test_conv_act_input_without_grad(backend):
    """First-layer style: x does not require grad (Triton: no input-gradient GEMM runs)."""
    check_conv_act(backend, 2, 3, 7, 7, 4, 3, 1, 1, 1, 1, "relu", 0.0, False, torch.float32, "nchw", False,
                   x_grad=False)


# --------------------------------------------------------------------------- dense grid
# The grid below runs on op_cases.GRID (see there: the extension on the CPU, where a case costs
# milliseconds); the other backends cover the same features with CASES above.



@backends(*GRID)
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("with_bias,with_residual,act,act_param",
                         ((True, False, "relu", 0.0), (True, True, "leaky_relu", 0.1),
                          (False, True, "gelu", 0.0), (False, False, "identity", 0.0)))
def test_conv_act_grid(backend, layout, dtype, with_bias, with_residual, act, act_param):
    check_conv_act(backend, 2, 3, 15, 7, 17, 3, 1, 1, 1, 1, act, act_param, with_residual, dtype, layout, with_bias,
                   w_scale=0.3)


# --------------------------------------------------------------------------- argument errors
# fastcnn.ops checks its arguments before dispatch: the same errors on every backend.

def _x_w(backend):
    return torch.randn(2, 4, 6, 6, device=backend.device), torch.randn(8, 4, 3, 3, device=backend.device)


@backends()
def test_conv_act_rejects_wrong_rank(backend):
    x, w = _x_w(backend)
    with fastcnn.use_backend(backend.name), pytest.raises(ValueError, match="weight must have 4 dimensions"):
        ops.conv_act(x, w[:, :, 0], None)


@backends()
def test_conv_act_rejects_dtype_mix(backend):
    x, w = _x_w(backend)
    r = torch.randn(2, 8, 6, 6, dtype=torch.float64, device=backend.device)
    with fastcnn.use_backend(backend.name):
        with pytest.raises(TypeError, match="residual has dtype"):
            ops.conv_act(x, w, None, padding=1, residual=r)
        with pytest.raises(TypeError, match="x must be a floating-point"):
            ops.conv_act(x.long(), w, None)


@backends()
def test_conv_act_rejects_channel_mismatch(backend):
    x, w = _x_w(backend)
    with fastcnn.use_backend(backend.name):
        with pytest.raises(ValueError, match="x has 4 channels but weight expects 6"):
            ops.conv_act(x, torch.randn(8, 6, 3, 3, device=backend.device), None)
        with pytest.raises(ValueError, match="groups=3"):
            ops.conv_act(x, w, None, groups=3)
        with pytest.raises(ValueError, match="residual has shape"):
            ops.conv_act(x, w, None, residual=torch.randn(2, 8, 6, 6, device=backend.device))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="device mix needs a CUDA device next to the CPU")
@backends()
def test_conv_act_rejects_device_mix(backend):
    with fastcnn.use_backend(backend.name), pytest.raises(ValueError, match="weight is on"):
        ops.conv_act(torch.randn(2, 4, 6, 6), torch.randn(8, 4, 3, 3, device="cuda"), None)


# =========================================================================== Triton only

@pytest.mark.triton
def test_conv_act_triton_channels_last_weight_gradient_in_place():
    """A channels_last weight is read in place and its gradient written channels_last, so
    autograd accumulates it without a relayout (the GEMMs themselves: test_triton_conv_gemm.py)."""
    pytest.importorskip("triton")
    x = torch.randn(2, 4, 6, 6).contiguous(memory_format=torch.channels_last)
    w = torch.randn(8, 4, 3, 3).contiguous(memory_format=torch.channels_last).requires_grad_()
    with fastcnn.use_backend("triton"):
        ops.conv_act(x, w, None, padding=1).sum().backward()
    assert w.grad.stride() == w.stride()


@pytest.mark.extension
@pytest.mark.parametrize("act, act_param, with_residual", [("relu", 0.0, False), ("elu", 1.0, True),
                                                           ("silu", 0.0, True)], ids=("relu", "elu-res", "silu-res"))
def test_conv_act_node_backward_twice_retain_graph_and_inplace(act, act_param, with_residual):
    """The epilogue's hand-written autograd node (csrc/ops/conv_layers/conv_act.cpp): named, a
    second backward without retain_graph is a clear error, with it the same gradients; the
    output it keeps (relu, elu) or the pre-activation (silu) changed in place before backward
    is autograd's in-place error; a bias-only gradient flows."""
    pytest.importorskip("fastcnn._C", reason="the extension fastcnn._C is not built")
    torch.manual_seed(0)
    x = torch.randn(2, 3, 6, 6, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, requires_grad=True)
    b = torch.randn(4, requires_grad=True)
    r = torch.randn(2, 4, 6, 6, requires_grad=True) if with_residual else None
    inputs = [t for t in (x, w, b, r) if t is not None]

    def run():
        return torch.ops.fastcnn.conv_act(x, w, b, r, [1, 1], [1, 1], [1, 1], 1, act, act_param)

    y, z = run()
    assert y.grad_fn.name() == "fastcnn::ConvActEpilogueBackward"
    g = torch.randn_like(y)
    y.backward(g, retain_graph=True)
    first = [t.grad.clone() for t in inputs]
    for t in inputs:
        t.grad = None
    y.backward(g)
    assert all(torch.equal(t.grad, f) for t, f in zip(inputs, first))
    with pytest.raises(RuntimeError, match="a second time"):
        y.backward(g)
    y, z = run()
    with torch.no_grad():
        (y if z.numel() == 0 else z).mul_(2.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()
    # only the bias requires grad: z does not, its edge is absent, and the bias gradient flows
    b.grad = None
    y = torch.ops.fastcnn.conv_act(x.detach(), w.detach(), b, None, [1, 1], [1, 1], [1, 1], 1, act, act_param)[0]
    y.backward(g)
    ref = torch.nn.functional.conv2d(x.detach(), w.detach(), b, padding=1)
    ref = {"relu": torch.relu, "elu": torch.nn.functional.elu, "silu": torch.nn.functional.silu}[act](ref)
    ref_b, = torch.autograd.grad(ref, b, g)
    torch.testing.assert_close(b.grad, ref_b)


# =========================================================================== GPU

# Triton at the zoo's shapes (channels_last, with bias): All-CNN-C / NIN style layers, and a
# ResNeXt grouped conv without BN
GPU_ZOO = [
    (128, 3, 32, 32, 96, 3, 1, 1, 1, 1, "relu", 0.0, False),
    (128, 96, 32, 32, 96, 3, 2, 1, 1, 1, "relu", 0.0, False),
    (128, 192, 8, 8, 192, 1, 1, 0, 1, 1, "relu", 0.0, True),
    (128, 256, 32, 32, 256, 3, 1, 1, 1, 4, "silu", 0.0, True),
]


@pytest.mark.gpu
@backends("triton")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", GPU_ZOO, ids=lambda c: f"n{c[0]}-{c[1]}x{c[2]}-{c[4]}-k{c[5]}s{c[6]}g{c[9]}")
def test_conv_act_gpu_zoo_shapes(backend, case, dtype):
    check_conv_act(backend, *case, dtype, "channels_last", True, device="cuda")
