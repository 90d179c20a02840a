"""BN + ReLU (pre-activation prologue: ResNet-164, WRN, DenseNet) at the zoo's shapes:
Triton vs F.batch_norm + F.relu vs torch.compile; bf16, channels_last, batch 128; peak
memory in ``extra_info``.

    python -m pytest bench/bench_triton_bn_act.py --benchmark-only --benchmark-json=bn_act.json
"""
from __future__ import annotations

import pytest
import torch

from fastcnn import ops
from fastcnn.ops import reference

from bench.bench_triton_common import BATCH, MODES, VARIANTS, cl, needs_cuda, pick, run

# name: (channels, hw)
SHAPES = {"wrn28_10-s1": (160, 32), "wrn28_10-s2": (320, 16), "wrn28_10-s3": (640, 8),
          "resnet164-s1": (64, 32), "densenet-bc-trans": (342, 16)}


@needs_cuda
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("shape", list(SHAPES))
def test_bn_act(benchmark, shape, variant, mode):
    c, hw = SHAPES[shape]
    x = cl(torch.randn(BATCH, c, hw, hw))
    gamma, beta = torch.ones(c, device="cuda"), torch.zeros(c, device="cuda")
    rm, rv = torch.zeros(c, device="cuda"), torch.ones(c, device="cuda")
    fn = pick(variant, ops.bn_act, reference.bn_act)

    def call(training):
        return fn(x, gamma, beta, rm, rv, training=training, momentum=0.1, eps=1e-5, act="relu",
                  act_param=0.0, residual=None)

    run(benchmark, variant, mode, call, [x, gamma, beta])
