"""GPU benchmark of the compiled ``cuda`` backend: fused BN+ReLU (+residual) and the fused
SE block tail against eager PyTorch and the ``triton`` backend at the zoo's shapes (batch
128, channels_last, bf16), training forward+backward. Needs a GPU (skipped otherwise) and
the extension built with CUDA. Run: ``python -m pytest bench/bench_cuda_ext_fused.py
--benchmark-only``; record figures in bench/RESULTS.md under GPU with the device name."""
from __future__ import annotations

import pytest
import torch

import fastcnn
from fastcnn.ops import dispatch as _backend
from fastcnn.ops import reference as ref

pytestmark = pytest.mark.gpu
pytest.importorskip("fastcnn._C", reason="the extension fastcnn._C is not built")

BATCH = 128
BN_SHAPES = ((16, 32, 32), (32, 16, 16), (64, 8, 8), (256, 32, 32), (1024, 8, 8))
SE_SHAPES = ((256, 32, 32), (512, 16, 16), (1024, 8, 8))
IMPLS = ("eager", "cuda", "triton")


def sid(s):
    return "x".join(map(str, s))


def timed(benchmark, fn):
    def step():
        fn()
        torch.cuda.synchronize()
    for _ in range(3):
        step()
    benchmark(step)


def need(impl, op):
    if impl != "eager" and _backend.unavailable_reason(impl, op, "cuda") is not None:
        pytest.skip(_backend.unavailable_reason(impl, op, "cuda"))


def act_input(shape, batch=BATCH):
    return (torch.randn(batch, *shape, device="cuda", dtype=torch.bfloat16)
            .contiguous(memory_format=torch.channels_last).requires_grad_())


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("residual", (False, True), ids=("bn_relu", "bn_add_relu"))
@pytest.mark.parametrize("shape", BN_SHAPES, ids=sid)
def test_bn_act_train_step(benchmark, shape, residual, impl):
    need(impl, "bn_act")
    x = act_input(shape)
    r = act_input(shape) if residual else None
    c = shape[0]
    w = torch.ones(c, device="cuda", requires_grad=True)
    b = torch.zeros(c, device="cuda", requires_grad=True)
    rm, rv = torch.zeros(c, device="cuda"), torch.ones(c, device="cuda")
    g = torch.randn_like(x)
    inputs = [x, w, b] + ([r] if r is not None else [])
    benchmark.group = f"bn_act train {BATCH}x{sid(shape)} {'+res' if residual else ''}"

    def fn():
        if impl == "eager":
            y = ref.bn_act(x, w, b, rm, rv, training=True, act="relu", residual=r)
        else:
            with fastcnn.use_backend(impl):
                y = fastcnn.ops.bn_act(x, w, b, rm, rv, training=True, act="relu", residual=r)
        torch.autograd.grad(y, inputs, g)
    timed(benchmark, fn)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", SE_SHAPES, ids=sid)
def test_se_block_train_step(benchmark, shape, impl):
    need(impl, "se_block")
    c = shape[0]
    x, r = act_input(shape), act_input(shape)
    params = [(torch.randn(c // 16, c, device="cuda") / c ** 0.5).bfloat16().requires_grad_(),
              torch.zeros(c // 16, device="cuda", dtype=torch.bfloat16, requires_grad=True),
              (torch.randn(c, c // 16, device="cuda") / 4).bfloat16().requires_grad_(),
              torch.zeros(c, device="cuda", dtype=torch.bfloat16, requires_grad=True)]
    g = torch.randn_like(x)
    benchmark.group = f"se_block train {BATCH}x{sid(shape)}"

    def fn():
        if impl == "eager":
            y = ref.se_block(x, *params, residual=r, act="relu")
        else:
            with fastcnn.use_backend(impl):
                y = fastcnn.ops.se_block(x, *params, residual=r, act="relu")
        torch.autograd.grad(y, [x, r, *params], g)
    timed(benchmark, fn)
