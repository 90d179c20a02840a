"""Triton ``bn_act`` against ``F.batch_norm`` + residual + activation: outputs, gradients of
x / BN weight and bias / residual, running statistics, train and eval mode."""
from __future__ import annotations

import pytest
import torch

from fastcnn import ops
from fastcnn.ops import reference

from test_triton_common import assert_matches, compare_all, device, make_input, run_three

pytestmark = pytest.mark.triton

# n, c, h, w, act, training, residual, dtype, layout
CASES = [
    (2, 3, 7, 7, "relu", True, False, torch.float32, "nchw"),
    (1, 17, 5, 5, "silu", True, True, torch.float32, "channels_last"),
    (2, 10, 7, 7, "gelu", False, True, torch.float32, "noncontig"),
    (2, 10, 15, 15, "leaky_relu", True, True, torch.bfloat16, "nchw"),
    (2, 16, 9, 9, "elu", True, False, torch.float32, "noncontig"),
    (2, 6, 7, 7, "identity", True, True, torch.bfloat16, "channels_last"),
    (1, 5, 3, 5, "relu", False, False, torch.float16, "nchw"),
    (2, 7, 5, 5, "relu", True, True, torch.float16, "nchw"),
]


def check_bn_act(n, c, h, w, act, training, res, dtype, layout, dev=None, track=True, shift=3.0):
    dev = dev or device()
    act_param = {"leaky_relu": 0.1, "elu": 0.7}.get(act, 0.0)
    x = make_input((n, c, h, w), dtype, layout, dev, scale=2.0, shift=shift).requires_grad_()
    gamma = (torch.rand(c, device=dev) + 0.5).requires_grad_()
    beta = torch.randn(c, device=dev).requires_grad_()
    r = make_input((n, c, h, w), dtype, layout, dev).requires_grad_() if res else None
    rm0, rv0 = torch.randn(c, device=dev), torch.rand(c, device=dev) * 4 + 0.5
    stats = []

    def make_fn(fn):
        def run(x, gamma, beta, r):
            f32 = torch.float64 if x.dtype == torch.float64 else torch.float32
            rm, rv = (rm0.to(f32).clone(), rv0.to(f32).clone()) if track else (None, None)
            stats.append((rm, rv))
            return fn(x, gamma, beta, rm, rv, training=training, momentum=0.1, eps=1e-5, act=act,
                      act_param=act_param, residual=r)
        return run

    ours, r64, rlp = run_three(make_fn(ops.bn_act), make_fn(reference.bn_act), [x, gamma, beta, r], dtype)
    compare_all(["x", "bn_weight", "bn_bias", "residual"], ours, r64, rlp, dtype, "bn_act")
    if track:
        for i, name in enumerate(("running_mean", "running_var")):
            assert_matches(stats[0][i], stats[1][i], stats[2][i], dtype, f"bn_act {name}")


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"n{c[0]}-{c[1]}x{c[2]}x{c[3]}-{c[4]}-{'train' if c[5] else 'eval'}{'-res' if c[6] else ''}-{str(c[7])[6:]}-{c[8]}")
def test_bn_act(case):
    check_bn_act(*case)


def test_bn_act_without_running_stats():
    check_bn_act(2, 6, 5, 5, "relu", True, False, torch.float32, "nchw", track=False)


GPU_CASES = [(128, 16, 32, 32), (128, 64, 8, 8), (128, 256, 32, 32), (128, 1024, 8, 8), (128, 3, 32, 32)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: f"n{c[0]}-{c[1]}x{c[2]}")
def test_bn_act_gpu_zoo_shapes(case, dtype):
    check_bn_act(*case, "relu", True, True, dtype, "channels_last", dev="cuda")
