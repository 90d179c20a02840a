"""Fused BN + residual + ReLU on the compiled ``cpu`` backend against eager PyTorch
(``F.batch_norm`` + add + ``F.relu``) at ResNet-20's BN shapes, channels_last fp32:
training forward+backward and eval forward. Run:
``python -m pytest bench/bench_cpu_bn_act.py --benchmark-only``; figures in bench/RESULTS.md."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fastcnn
from fastcnn.ops import reference as ref

from bench.bench_cpu_common import BATCH, BN_SHAPES, cpu_capability, shape_id, train_step


def make(shape, residual):
    c = shape[0]
    x = torch.randn(BATCH, *shape).contiguous(memory_format=torch.channels_last).requires_grad_()
    r = torch.randn_like(x).requires_grad_() if residual else None
    w = (torch.rand(c) + 0.5).requires_grad_()
    b = torch.randn(c).requires_grad_()
    return x, r, w, b, torch.zeros(c), torch.ones(c)


def bn_act_fn(impl, x, r, w, b, rm, rv, training):
    if impl == "eager":
        return lambda: ref.bn_act(x, w, b, rm, rv, training=training, momentum=0.1, act="relu", residual=r)

    def fused():
        with fastcnn.use_backend("cpu"):
            return fastcnn.ops.bn_act(x, w, b, rm, rv, training=training, momentum=0.1, act="relu", residual=r)
    return fused


@pytest.mark.parametrize("impl", ("eager", "fused"))
@pytest.mark.parametrize("residual", (False, True), ids=("bn_relu", "bn_add_relu"))
@pytest.mark.parametrize("shape", BN_SHAPES, ids=shape_id)
def test_bn_act_train_step(benchmark, shape, residual, impl):
    x, r, w, b, rm, rv = make(shape, residual)
    benchmark.extra_info.update(threads=torch.get_num_threads(), cpu_capability=cpu_capability())
    benchmark.group = f"bn_act train fwd+bwd {BATCH}x{shape_id(shape)} {'+res' if residual else ''}"
    fn = bn_act_fn(impl, x, r, w, b, rm, rv, True)
    grad = torch.randn_like(x)
    benchmark(train_step, fn, [x, w, b] + ([r] if r is not None else []), grad)


@pytest.mark.parametrize("impl", ("eager", "fused"))
@pytest.mark.parametrize("shape", BN_SHAPES, ids=shape_id)
def test_bn_act_eval_forward(benchmark, shape, impl):
    x, r, w, b, rm, rv = make(shape, False)
    benchmark.extra_info.update(threads=torch.get_num_threads(), cpu_capability=cpu_capability())
    benchmark.group = f"bn_act eval fwd {BATCH}x{shape_id(shape)}"
    fn = bn_act_fn(impl, x.detach(), None, w.detach(), b.detach(), rm, rv, False)
    with torch.no_grad():
        benchmark(fn)
