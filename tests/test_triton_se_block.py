"""Triton ``se_block`` against the plain SE block (mean, fc1, ReLU, fc2, sigmoid, scale,
residual, activation): outputs and gradients of x, both FC weights and biases, residual."""
from __future__ import annotations

import pytest
import torch

from fastcnn import ops
from fastcnn.ops import reference

from test_triton_common import compare_all, device, make_input, run_three

pytestmark = pytest.mark.triton

# n, c, h, w, hidden, act, residual, dtype, layout, biases
CASES = [
    (2, 16, 5, 5, 4, "relu", True, torch.float32, "nchw", True),
    (1, 17, 7, 7, 3, "silu", False, torch.float32, "channels_last", True),
    (2, 10, 9, 9, 1, "identity", True, torch.float32, "noncontig", False),
    (2, 32, 5, 5, 2, "relu", True, torch.bfloat16, "channels_last", True),
    (2, 12, 7, 7, 3, "gelu", True, torch.float16, "nchw", True),
    (2, 24, 15, 15, 6, "elu", False, torch.float32, "nchw", True),
]


def check_se_block(n, c, h, w, hid, act, res, dtype, layout, biases, dev=None):
    dev = dev or device()
    act_param = 0.7 if act == "elu" else 0.0
    x = make_input((n, c, h, w), dtype, layout, dev, scale=2.0).requires_grad_()
    w1 = (torch.randn(hid, c, device=dev) / c ** 0.5).to(dtype).requires_grad_()
    w2 = (torch.randn(c, hid, device=dev) / hid ** 0.5).to(dtype).requires_grad_()
    b1 = torch.randn(hid, device=dev).to(dtype).requires_grad_() if biases else None
    b2 = torch.randn(c, device=dev).to(dtype).requires_grad_() if biases else None
    r = make_input((n, c, h, w), dtype, layout, dev).requires_grad_() if res else None

    def make_fn(fn):
        def run(x, w1, b1, w2, b2, r):
            return fn(x, w1, b1, w2, b2, residual=r, act=act, act_param=act_param)
        return run

    ours, r64, rlp = run_three(make_fn(ops.se_block), make_fn(reference.se_block), [x, w1, b1, w2, b2, r], dtype)
    compare_all(["x", "fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias", "residual"], ours, r64, rlp, dtype, "se_block")


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"n{c[0]}-{c[1]}x{c[2]}x{c[3]}-h{c[4]}-{c[5]}{'-res' if c[6] else ''}-{str(c[7])[6:]}-{c[8]}")
def test_se_block(case):
    check_se_block(*case)


# SE-ResNeXt-29 block tails: (channels, spatial) = (256, 32), (512, 16), (1024, 8), reduction 16
GPU_CASES = [(128, 256, 32, 32, 16), (128, 512, 16, 16, 32), (128, 1024, 8, 8, 64)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: f"n{c[0]}-{c[1]}x{c[2]}")
def test_se_block_gpu_zoo_shapes(case, dtype):
    check_se_block(*case, "relu", True, dtype, "channels_last", True, dev="cuda")
