"""Fused SE block tail (squeeze, excitation, scale, + residual, ReLU) on the compiled
``cpu`` backend against eager PyTorch at SE-ResNeXt-29's SE shapes, channels_last fp32:
training forward+backward and inference forward. Run:
``python -m pytest bench/bench_cpu_se_block.py --benchmark-only``; figures in bench/RESULTS.md."""
from __future__ import annotations

import pytest
import torch

import fastcnn
from fastcnn.ops import reference as ref

from bench.bench_cpu_common import SE_BATCH, SE_SHAPES, cpu_capability, shape_id, train_step


def make(shape):
    c = shape[0]
    hidden = c // 16
    x = torch.randn(SE_BATCH, *shape).contiguous(memory_format=torch.channels_last).requires_grad_()
    r = torch.randn_like(x).requires_grad_()
    params = [(torch.randn(hidden, c) / c ** 0.5).requires_grad_(), torch.zeros(hidden, requires_grad=True),
              (torch.randn(c, hidden) / hidden ** 0.5).requires_grad_(), torch.zeros(c, requires_grad=True)]
    return x, r, params


def se_fn(impl, x, r, params):
    if impl == "eager":
        return lambda: ref.se_block(x, *params, residual=r, act="relu")

    def fused():
        with fastcnn.use_backend("cpu"):
            return fastcnn.ops.se_block(x, *params, residual=r, act="relu")
    return fused


@pytest.mark.parametrize("impl", ("eager", "fused"))
@pytest.mark.parametrize("shape", SE_SHAPES, ids=shape_id)
def test_se_block_train_step(benchmark, shape, impl):
    x, r, params = make(shape)
    benchmark.extra_info.update(threads=torch.get_num_threads(), cpu_capability=cpu_capability())
    benchmark.group = f"se_block train fwd+bwd {SE_BATCH}x{shape_id(shape)}"
    benchmark(train_step, se_fn(impl, x, r, params), [x, r, *params], torch.randn_like(x))


@pytest.mark.parametrize("impl", ("eager", "fused"))
@pytest.mark.parametrize("shape", SE_SHAPES, ids=shape_id)
def test_se_block_forward(benchmark, shape, impl):
    x, r, params = make(shape)
    benchmark.extra_info.update(threads=torch.get_num_threads(), cpu_capability=cpu_capability())
    benchmark.group = f"se_block fwd {SE_BATCH}x{shape_id(shape)}"
    with torch.no_grad():
        benchmark(se_fn(impl, x, r, params))
