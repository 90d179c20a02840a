"""The dispatcher registrations of ``fastcnn._C``: ``torch.library.opcheck`` (schema, fake
tensor, autograd registration, AOT dispatch) on every op, CPU and CUDA kernels present, and
the ``cpu``/``cuda`` backends visible to ``fastcnn.ops.dispatch``."""
from __future__ import annotations

import pytest
import torch

import fastcnn
from fastcnn.ops import extension_backend as eb, reference

from op_cases import make

pytest.importorskip("fastcnn._C", reason="the extension fastcnn._C is not built")

pytestmark = pytest.mark.extension

OP_NAMES = ("bn_act_forward", "bn_act_apply", "bn_act_backward", "scale_shift_act", "scale_shift_act_backward",
            "se_block_forward", "se_block_backward", "grouped_conv2d", "grouped_conv2d_backward",
            # the composite layer ops (autograd in C++; CompositeExplicitAutograd below it)
            "bn_act", "conv_bn_act", "conv_act", "se_block", "bn_act_conv")


def op_cases(device="cpu", layout="nchw", dtype=torch.float32):
    """(op name, args) for every op: small odd shapes, grads required where meaningful."""
    def act(shape):
        return make(shape, layout, dtype, device)

    def vec(n, lo=0.0):
        return (torch.rand(n, device=device) + lo).requires_grad_()

    x, r, gy = act((2, 5, 7, 9)).requires_grad_(), act((2, 5, 7, 9)).requires_grad_(), act((2, 5, 7, 9))
    w, b = vec(5, 0.5), vec(5)
    mean, var = torch.randn(5, device=device), torch.rand(5, device=device) + 0.5
    fc1w = (torch.randn(3, 5, device=device) * 0.3).to(dtype).requires_grad_()
    fc1b = torch.randn(3, device=device).to(dtype).requires_grad_()
    fc2w = (torch.randn(5, 3, device=device) * 0.3).to(dtype).requires_grad_()
    fc2b = torch.randn(5, device=device).to(dtype).requires_grad_()
    pooled = torch.randn(2, 5, device=device)
    cx = act((2, 8, 9, 7)).requires_grad_()
    cw = (torch.randn(8, 2, 3, 3, device=device) * 0.3).to(dtype).requires_grad_()
    cgy = act((2, 8, 5, 4))
    conv = ([2, 2], [1, 1], [1, 1], 4)
    cases = [
        ("bn_act_forward", (x, w, b, r, 1e-5, "silu", 0.0)),
        ("bn_act_forward", (x, w, b, None, 1e-5, "leaky_relu", 0.1)),
        ("bn_act_apply", (x, w, b, r, mean, var, 1e-5, "silu", 0.0)),
        ("bn_act_apply", (x, w, b, None, mean, var, 1e-5, "relu", 0.0)),
        ("bn_act_backward", (gy, x, w, b, r, mean, var, 1e-5, "gelu", 0.0)),
        ("bn_act_backward", (gy, x, w, b, None, mean, var, 1e-5, "relu", 0.0)),
        ("scale_shift_act", (x, w, b, r, "elu", 1.0)),
        ("scale_shift_act", (x, None, b, None, "relu", 0.0)),
        ("scale_shift_act_backward", (gy, x, w, b, r, "silu", 0.0)),
        ("scale_shift_act_backward", (gy, x, None, None, None, "relu", 0.0)),
        ("se_block_forward", (x, fc1w, fc1b, fc2w, fc2b, r, "relu", 0.0)),
        ("se_block_forward", (x, fc1w, None, fc2w, None, None, "identity", 0.0)),
        ("se_block_backward", (gy, x, pooled, fc1w, fc1b, fc2w, fc2b, r, "relu", 0.0)),
        ("se_block_backward", (gy, x, pooled, fc1w, None, fc2w, None, None, "gelu", 0.0)),
        ("grouped_conv2d", (cx, cw, *conv)),
        ("grouped_conv2d_backward", (cgy, cx, cw, *conv, [True, True])),
        ("grouped_conv2d_backward", (cgy, cx, cw, *conv, [True, False])),
        # composites: running statistics are mutated in training (copies, so cases stay independent)
        ("bn_act", (x, w, b, mean.clone(), var.clone(), r, True, 0.1, 1e-5, "relu", 0.0)),
        ("bn_act", (x, w, b, mean.clone(), var.clone(), None, False, 0.0, 1e-5, "silu", 0.0)),
        ("bn_act", (x, w, b, None, None, None, True, 0.0, 1e-5, "identity", 0.0)),
        ("conv_bn_act", (cx, cw, None, vec(8, 0.5), vec(8), torch.zeros(8, device=device),
                         torch.ones(8, device=device), None, *conv, True, 0.1, 1e-5, "relu", 0.0)),
        ("conv_bn_act", (cx, cw, vec(8).to(dtype), vec(8, 0.5), vec(8), torch.zeros(8, device=device),
                         torch.ones(8, device=device), act((2, 8, 5, 4)).requires_grad_(), *conv, False, 0.0,
                         1e-5, "gelu", 0.0)),
        ("conv_act", (cx, cw, vec(8).to(dtype), act((2, 8, 5, 4)).requires_grad_(), *conv, "relu", 0.0)),
        ("conv_act", (cx, cw, None, None, *conv, "silu", 0.0)),
        ("conv_act", (cx, cw, vec(8).to(dtype), None, *conv, "identity", 0.0)),
        ("se_block", (x, fc1w, fc1b, fc2w, fc2b, r, "relu", 0.0)),
        ("se_block", (x, fc1w, None, fc2w, None, None, "gelu", 0.0)),
        # the pre-activation unit: x is cx (8 channels), the convolution 8 -> 8 in 4 groups
        ("bn_act_conv", (cx, vec(8, 0.5), vec(8), torch.zeros(8, device=device), torch.ones(8, device=device), cw,
                         None, None, *conv, True, 0.1, 1e-5, "relu", 0.0, True)),
        ("bn_act_conv", (cx, vec(8, 0.5), vec(8), torch.zeros(8, device=device), torch.ones(8, device=device), cw,
                         vec(8).to(dtype), act((2, 8, 5, 4)).requires_grad_(), *conv, False, 0.0, 1e-5, "silu",
                         0.0, True)),
        ("bn_act_conv", (cx, vec(8, 0.5), vec(8), torch.zeros(8, device=device), torch.ones(8, device=device), cw,
                         None, act((2, 8, 5, 4)).requires_grad_(), *conv, True, 0.1, 1e-5, "gelu", 0.0, False)),
    ]
    # the backward ops and bn_act_apply (used inside backward, to rebuild) are not
    # differentiable (autograd falls through them): plain inputs
    plain = lambda name: name.endswith("backward") or name == "bn_act_apply"  # noqa: E731
    return [(name, tuple(a.detach() if isinstance(a, torch.Tensor) and plain(name) else a
                         for a in args)) for name, args in cases]


def test_every_op_has_a_case():
    assert {name for name, _ in op_cases()} == set(OP_NAMES)


@pytest.mark.parametrize("layout", ("nchw", "channels_last"))
@pytest.mark.parametrize("case", range(len(op_cases())),
                         ids=[f"{n}-{i}" for i, (n, _) in enumerate(op_cases())])
def test_opcheck(case, layout):
    name, args = op_cases(layout=layout)[case]
    torch.library.opcheck(getattr(torch.ops.fastcnn, name).default, args, test_utils=_utils(name))


#: The composites are eager-only: under torch.compile the backend traces their parts (see
#: fastcnn/ops/extension_backend.py), since their C++ reads concrete sizes; so no
#: dynamic-shape AOT dispatch check for them (schema, fake tensor, autograd registration yes).
COMPOSITES = ("bn_act", "conv_bn_act", "conv_act", "se_block", "bn_act_conv")


def _utils(name):
    base = ("test_schema", "test_autograd_registration", "test_faketensor")
    return base if name in COMPOSITES else base + ("test_aot_dispatch_dynamic",)


@pytest.mark.parametrize("name", OP_NAMES)
def test_kernels_registered(name):
    op = f"fastcnn::{name}"
    if name in COMPOSITES:  # one device-generic kernel below their C++ autograd kernel
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CompositeExplicitAutograd")
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "Autograd")
        return
    assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CPU")
    # CUDA kernels must be compiled in whenever the extension says it was built with CUDA
    assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA") == fastcnn._C.has_cuda()


def test_backends_report_availability():
    for op in eb.OPS_IN_EXTENSION:
        assert op in eb.IMPLEMENTED_OPS
        assert fastcnn.ops.dispatch.unavailable_reason("cpu", op, "cpu") is None
        reason = fastcnn.ops.dispatch.unavailable_reason("cuda", op, "cuda")
        assert (reason is None) == fastcnn._C.has_cuda(), reason
        assert "not cpu" in fastcnn.ops.dispatch.unavailable_reason("cuda", op, "cpu")


def test_compile_traces_fused_ops():
    """torch.compile (aot_eager: no C compiler needed) traces the fused op with its fake and
    autograd registrations, running-statistics update included, in one graph."""
    x = make((2, 5, 7, 9), "channels_last").requires_grad_()
    w, b = torch.rand(5, requires_grad=True), torch.randn(5, requires_grad=True)
    rm, rv = torch.zeros(5), torch.ones(5)

    def f(x):  # the backend module's op (fastcnn.ops.dispatch.resolve itself is not traced)
        return eb.bn_act(x, w, b, rm, rv, training=True, act="relu").sum()

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    out = compiled(x)
    (gx,) = torch.autograd.grad(out, x)
    rm2, rv2 = torch.zeros(5), torch.ones(5)
    x2 = x.detach().requires_grad_()
    out2 = reference.bn_act(x2, w, b, rm2, rv2, training=True).sum()
    (gx2,) = torch.autograd.grad(out2, x2)
    torch.testing.assert_close(out, out2, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gx, gx2, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(rm, rm2)


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ("nchw", "channels_last"))
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_opcheck_cuda(layout, dtype):
    for name, args in op_cases("cuda", layout, dtype):
        torch.library.opcheck(getattr(torch.ops.fastcnn, name).default, args, test_utils=_utils(name))
