"""The direct grouped convolution (``torch.ops.fastcnn.grouped_conv2d``) against oneDNN
(``F.conv2d``) at ResNeXt-29 4x64d's grouped 3x3 shapes (groups 4) and at a depthwise shape,
fp32 NCHW, forward and forward+backward: the measurement behind conv_bn_act's choice of
convolution on the ``cpu`` backend. Run:
``python -m pytest bench/bench_cpu_grouped_conv.py --benchmark-only``."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fastcnn  # noqa: F401  (loads the extension)

from bench.bench_cpu_common import shape_id, train_step

BATCH = 2
# (C, H, W, groups): ResNeXt-29 4x64d stages 1-3, then a depthwise layer
SHAPES = ((256, 32, 32, 4), (512, 16, 16, 4), (1024, 8, 8, 4), (256, 16, 16, 256))


def conv_fn(impl, x, w, groups):
    if impl == "onednn":
        return lambda: F.conv2d(x, w, None, 1, 1, 1, groups)
    return lambda: torch.ops.fastcnn.grouped_conv2d(x, w, [1, 1], [1, 1], [1, 1], groups)


def make(shape):
    c, h, w, groups = shape
    x = torch.randn(BATCH, c, h, w, requires_grad=True)
    wt = (torch.randn(c, c // groups, 3, 3) * 0.05).requires_grad_()
    return x, wt, groups


@pytest.mark.parametrize("impl", ("onednn", "direct"))
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_grouped_conv_forward(benchmark, shape, impl):
    x, w, groups = make(shape)
    benchmark.group = f"grouped conv fwd {BATCH}x{shape_id(shape)}"
    with torch.no_grad():
        benchmark(conv_fn(impl, x, w, groups))


@pytest.mark.parametrize("impl", ("onednn", "direct"))
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_grouped_conv_train_step(benchmark, shape, impl):
    x, w, groups = make(shape)
    benchmark.group = f"grouped conv fwd+bwd {BATCH}x{shape_id(shape)}"
    y = conv_fn(impl, x, w, groups)()
    benchmark(train_step, conv_fn(impl, x, w, groups), [x, w], torch.randn_like(y))
