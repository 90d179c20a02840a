"""conv + BN + ReLU at the zoo's layer shapes: Triton vs cuDNN (F.conv2d + F.batch_norm +
F.relu) vs torch.compile; bf16, channels_last, batch 128; eval forward, train forward,
train forward+backward; peak memory in ``extra_info``.

    python -m pytest bench/bench_triton_conv_bn_act.py --benchmark-only --benchmark-json=conv_bn_act.json
"""
from __future__ import annotations

import pytest
import torch

from fastcnn import ops
from fastcnn.ops import reference

from bench.bench_triton_common import BATCH, MODES, VARIANTS, cl, needs_cuda, pick, run

# name: (cin, hw, cout, k, stride, groups, residual)
SHAPES = {
    "resnet20-s1": (16, 32, 16, 3, 1, 1, True),
    "resnet20-s2-down": (16, 32, 32, 3, 2, 1, False),
    "resnet20-s3": (64, 8, 64, 3, 1, 1, True),
    "simplenet-c2": (64, 32, 128, 3, 1, 1, False),
    "simplenet-c8": (128, 16, 256, 3, 1, 1, False),
    "simplenet-1x1": (512, 4, 2048, 1, 1, 1, False),
    "resnext29-conv1-1x1": (256, 32, 256, 1, 1, 1, False),
    "resnext29-grouped-s1": (256, 32, 256, 3, 1, 4, False),
    "resnext29-grouped-s2": (512, 32, 512, 3, 2, 4, False),
    "resnext29-grouped-s3": (1024, 8, 1024, 3, 1, 4, False),
    "resnext29-conv3-res": (1024, 8, 1024, 1, 1, 1, True),
}


@needs_cuda
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("shape", list(SHAPES))
def test_conv_bn_act(benchmark, shape, variant, mode):
    cin, hw, cout, k, s, g, res = SHAPES[shape]
    x = cl(torch.randn(BATCH, cin, hw, hw))
    w = cl(torch.randn(cout, cin // g, k, k) / (cin // g * k * k) ** 0.5)
    gamma, beta = torch.ones(cout, device="cuda"), torch.zeros(cout, device="cuda")
    rm, rv = torch.zeros(cout, device="cuda"), torch.ones(cout, device="cuda")
    ohw = (hw + 2 * (k // 2) - k) // s + 1
    r = cl(torch.randn(BATCH, cout, ohw, ohw)) if res else None
    fn = pick(variant, ops.conv_bn_act, reference.conv_bn_act)

    def call(training):
        return fn(x, w, None, gamma, beta, rm, rv, stride=(s, s), padding=(k // 2, k // 2),
                  dilation=(1, 1), groups=g, training=training, momentum=0.1, eps=1e-5,
                  act="relu", act_param=0.0, residual=r)

    run(benchmark, variant, mode, call, [x, w, gamma, beta])
