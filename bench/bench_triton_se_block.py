"""SE-ResNeXt-29 block tail (SE scale + residual + ReLU) at its three stage shapes: Triton
(three launches) vs the plain PyTorch SE block vs torch.compile; bf16, channels_last, batch
128; peak memory in ``extra_info``.

    python -m pytest bench/bench_triton_se_block.py --benchmark-only --benchmark-json=se_block.json
"""
from __future__ import annotations

import pytest
import torch

from fastcnn import ops
from fastcnn.ops import reference

from bench.bench_triton_common import BATCH, VARIANTS, cl, needs_cuda, pick, run

SHAPES = {"se-s1": (256, 32), "se-s2": (512, 16), "se-s3": (1024, 8)}


@needs_cuda
@pytest.mark.parametrize("mode", ["eval_fwd", "train_fwd_bwd"])
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("shape", list(SHAPES))
def test_se_block(benchmark, shape, variant, mode):
    c, hw = SHAPES[shape]
    hid = c // 16
    x, r = cl(torch.randn(BATCH, c, hw, hw)), cl(torch.randn(BATCH, c, hw, hw))
    w1 = (torch.randn(hid, c, device="cuda") / c ** 0.5).to(torch.bfloat16)
    w2 = (torch.randn(c, hid, device="cuda") / hid ** 0.5).to(torch.bfloat16)
    b1 = torch.zeros(hid, device="cuda", dtype=torch.bfloat16)
    b2 = torch.zeros(c, device="cuda", dtype=torch.bfloat16)
    fn = pick(variant, ops.se_block, reference.se_block)

    def call(training):
        return fn(x, w1, b1, w2, b2, residual=r, act="relu", act_param=0.0)

    run(benchmark, variant, mode, call, [x, w1, w2, r])
