"""Triton ``conv_act`` against ``F.conv2d`` (+ bias, residual, activation): outputs and
gradients of x, weight, bias and residual over odd shapes, groups, layouts and dtypes,
including the activations whose backward needs the saved pre-activation (silu, gelu,
leaky_relu with a negative slope)."""
from __future__ import annotations

import pytest
import torch

from fastcnn import ops
from fastcnn.ops import reference

from test_triton_common import compare_all, device, make_input, run_three

pytestmark = pytest.mark.triton

# n, cin, h, w, cout, k, stride, pad, dil, groups, act, act_param, residual, dtype, layout, bias
CASES = [
    (2, 3, 7, 7, 10, 3, 1, 1, 1, 1, "relu", 0.0, False, torch.float32, "nchw", True),
    (1, 17, 9, 9, 10, 3, 2, 1, 1, 1, "leaky_relu", 0.2, True, torch.float32, "channels_last", True),
    (2, 10, 7, 7, 3, 1, 1, 0, 1, 1, "silu", 0.0, True, torch.float32, "noncontig", False),
    (2, 4, 9, 9, 6, 5, 1, 2, 1, 2, "gelu", 0.0, False, torch.float32, "nchw", True),
    (2, 8, 7, 7, 8, 3, 1, 2, 2, 4, "elu", 1.0, True, torch.float32, "channels_last", True),
    (2, 6, 15, 15, 8, 3, 2, 0, 1, 2, "leaky_relu", -0.5, False, torch.float32, "nchw", True),
    (2, 8, 7, 7, 12, 3, 1, 1, 1, 4, "relu", 0.0, True, torch.bfloat16, "channels_last", True),
    (2, 5, 7, 7, 7, 3, 1, 1, 1, 1, "identity", 0.0, True, torch.bfloat16, "nchw", False),
    (1, 3, 5, 7, 5, 3, 1, 2, 1, 1, "gelu", 0.0, False, torch.float16, "nchw", True),
]


def _ids(c):
    n, cin, h, w, cout, k, s, p, d, g, act, ap, res, dt, lay, b = c
    return (f"n{n}-{cin}x{h}x{w}-{cout}-k{k}s{s}p{p}d{d}g{g}-{act}{ap}"
            f"{'-res' if res else ''}-{str(dt)[6:]}-{lay}{'-bias' if b else ''}")


def check_conv_act(n, cin, h, w, cout, k, s, p, d, g, act, act_param, res, dtype, layout, bias, dev=None):
    dev = dev or device()
    oh = (h + 2 * p - d * (k - 1) - 1) // s + 1
    ow = (w + 2 * p - d * (k - 1) - 1) // s + 1
    x = make_input((n, cin, h, w), dtype, layout, dev).requires_grad_()
    wt = (torch.randn(cout, cin // g, k, k, device=dev) / (cin // g * k * k) ** 0.5).to(dtype).requires_grad_()
    b = torch.randn(cout, device=dev).to(dtype).requires_grad_() if bias else None
    r = make_input((n, cout, oh, ow), dtype, layout, dev).requires_grad_() if res else None

    def make_fn(fn):
        def run(x, wt, b, r):
            return fn(x, wt, b, stride=(s, s), padding=(p, p), dilation=(d, d), groups=g, act=act,
                      act_param=act_param, residual=r)
        return run

    ours, r64, rlp = run_three(make_fn(ops.conv_act), make_fn(reference.conv_act), [x, wt, b, r], dtype)
    compare_all(["x", "weight", "bias", "residual"], ours, r64, rlp, dtype, "conv_act")


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_conv_act(case):
    check_conv_act(*case)


def test_conv_act_input_without_grad():
    """First-layer style: x does not require grad (no input-gradient GEMM runs)."""
    x = torch.randn(2, 3, 7, 7, device=device())
    w = torch.randn(4, 3, 3, 3, device=device(), requires_grad=True)
    import fastcnn
    with fastcnn.use_backend("triton"):
        y = ops.conv_act(x, w, None, padding=1)
    y.sum().backward()
    wr = w.detach().clone().requires_grad_()
    reference.conv_act(x, wr, None, padding=(1, 1)).sum().backward()
    torch.testing.assert_close(w.grad, wr.grad, rtol=1e-4, atol=1e-4)


GPU_CASES = [
    # All-CNN-C / NIN style layers, and a ResNeXt grouped conv without BN
    (128, 3, 32, 32, 96, 3, 1, 1, 1, 1, "relu", 0.0, False),
    (128, 96, 32, 32, 96, 3, 2, 1, 1, 1, "relu", 0.0, False),
    (128, 192, 8, 8, 192, 1, 1, 0, 1, 1, "relu", 0.0, True),
    (128, 256, 32, 32, 256, 3, 1, 1, 1, 4, "silu", 0.0, True),
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: f"n{c[0]}-{c[1]}x{c[2]}-{c[4]}-k{c[5]}s{c[6]}g{c[9]}")
def test_conv_act_gpu_zoo_shapes(case, dtype):
    check_conv_act(*case, dtype, "channels_last", True, dev="cuda")
