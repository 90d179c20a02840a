"""Shared pieces of the CPU benchmarks of the compiled ``cpu`` backend (bench/bench_cpu_*.py):
the zoo's layer shapes at a CPU-sized batch and a train-step helper. Figures: bench/RESULTS.md."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("fastcnn._C", reason="the extension fastcnn._C is not built")

#: CPU batch: the zoo's per-sample shapes, batch reduced so a 2-core machine runs the set in minutes
BATCH = 32
#: BN+ReLU inputs of ResNet-20 (C, H, W) per stage
BN_SHAPES = ((16, 32, 32), (32, 16, 16), (64, 8, 8))
#: SE inputs of SE-ResNeXt-29 4x64d (C, H, W) per stage (reduction 16)
SE_SHAPES = ((256, 32, 32), (512, 16, 16), (1024, 8, 8))
SE_BATCH = 8


def shape_id(shape) -> str:
    return "x".join(map(str, shape))


def cpu_capability() -> str:
    """The build of the extension's CPU kernels in use ('avx2' or 'default'), for extra_info."""
    import fastcnn._C

    return fastcnn._C.cpu_capability()


def train_step(fn, inputs, grad):
    """Forward + backward to every input that requires grad."""
    y = fn()
    torch.autograd.grad(y, [t for t in inputs if t.requires_grad], grad)
