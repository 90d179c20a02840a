"""conv + bias + ReLU (no BN; All-CNN-C, NIN) at the zoo's layer shapes: Triton vs cuDNN
(F.conv2d + F.relu) vs torch.compile; bf16, channels_last, batch 128; forward and
forward+backward (``eval_fwd`` = no_grad); peak memory in ``extra_info``.

    python -m pytest bench/bench_triton_conv_act.py --benchmark-only --benchmark-json=conv_act.json
"""
from __future__ import annotations

import pytest
import torch

from fastcnn import ops
from fastcnn.ops import reference

from bench.bench_triton_common import BATCH, VARIANTS, cl, needs_cuda, pick, run

# name: (cin, hw, cout, k, stride)
SHAPES = {
    "allcnn-c1": (3, 32, 96, 3, 1),
    "allcnn-c3-s2": (96, 32, 96, 3, 2),
    "allcnn-c5": (192, 16, 192, 3, 1),
    "nin-1x1": (192, 8, 192, 1, 1),
}


@needs_cuda
@pytest.mark.parametrize("mode", ["eval_fwd", "train_fwd_bwd"])
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("shape", list(SHAPES))
def test_conv_act(benchmark, shape, variant, mode):
    cin, hw, cout, k, s = SHAPES[shape]
    x = cl(torch.randn(BATCH, cin, hw, hw))
    w = cl(torch.randn(cout, cin, k, k) / (cin * k * k) ** 0.5)
    b = torch.zeros(cout, device="cuda", dtype=torch.bfloat16)
    fn = pick(variant, ops.conv_act, reference.conv_act)

    def call(training):
        return fn(x, w, b, stride=(s, s), padding=(k // 2, k // 2), dilation=(1, 1), groups=1,
                  act="relu", act_param=0.0, residual=None)

    run(benchmark, variant, mode, call, [x, w, b])
