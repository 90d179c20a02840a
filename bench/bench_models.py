"""Whole-model training-step throughput and peak memory: fused backends against plain PyTorch
and torch.compile.

    python -m pytest bench/bench_models.py --benchmark-only --benchmark-json=models.json

On CUDA every zoo model runs at batch 128, bf16 autocast, channels_last (the goal: every model
trains in under 3 GB); peak memory per step is stored in each result's ``extra_info``. On CPU
a few small models run at batch 32 (eager vs the ``cpu`` extension backend), since that is
what a CPU can answer in reasonable time.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fastcnn

CUDA = torch.cuda.is_available()
GPU_MODELS = ["simplenet", "simplenet_310k", "allcnn_c", "lenet5", "nin", "vgg19", "resnet20",
              "resnet56", "resnet110", "resnet164", "wrn16_8", "wrn28_10", "resnext29_4x64d",
              "resnext29_8x64d", "se_resnext29_4x64d", "densenet_bc_100_12", "densenet_bc_100_24",
              "densenet_bc_160_24", "shathenet_v1_1"]
CPU_MODELS = ["lenet5", "simplenet_310k", "resnet20"]
GPU_VARIANTS = ["eager", "fused-triton", "fused-cuda", "compile"]
CPU_VARIANTS = ["eager", "fused-cpu"]


def _cases():
    if CUDA:
        return [("cuda", m, v) for m in GPU_MODELS for v in GPU_VARIANTS]
    return [("cpu", m, v) for m in CPU_MODELS for v in CPU_VARIANTS]


def _build(name: str, variant: str, device: str):
    fused = variant.startswith("fused")
    backend = variant.split("-", 1)[1] if fused else "reference"
    if fused and backend not in fastcnn.backend.available_backends("conv_bn_act", device):
        pytest.skip(f"backend {backend} not available on {device}")
    model = fastcnn.create_model(name, fused=fused).to(device)
    if device == "cuda":
        model = model.to(memory_format=torch.channels_last)
    step_model = torch.compile(model) if variant == "compile" else model
    return model, step_model, backend


@pytest.mark.parametrize("device,name,variant", _cases())
def test_train_step(benchmark, device, name, variant):
    model, step_model, backend = _build(name, variant, device)
    batch = 128 if device == "cuda" else 32
    info = fastcnn.model_info(name)
    x = torch.randn(batch, *info.input_size, device=device)
    if device == "cuda":
        x = x.to(memory_format=torch.channels_last)
    y = torch.randint(0, info.num_classes, (batch,), device=device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step():
        with fastcnn.use_backend(backend), torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            loss = F.cross_entropy(step_model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if device == "cuda":
            torch.cuda.synchronize()

    for _ in range(3):  # warm-up: compilation, autotuning, allocator
        step()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    benchmark.pedantic(step, rounds=10 if device == "cuda" else 3, iterations=1)
    benchmark.extra_info["images_per_s"] = batch / benchmark.stats.stats.median
    benchmark.extra_info["batch"] = batch
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated()
        benchmark.extra_info["peak_mem_MiB"] = peak / 2**20
        benchmark.extra_info["under_3GB"] = peak < 3 * 2**30
        benchmark.extra_info["device"] = torch.cuda.get_device_name()
