"""Shared machinery of the Triton op benchmarks (``bench_triton_*.py``): the three
variants compared, the three modes timed, and peak-memory bookkeeping.

Variants: ``triton`` (``fastcnn.ops`` with the triton backend), ``cudnn`` (the unfused
reference ops: ``F.conv2d`` + ``F.batch_norm`` + activation, i.e. cuDNN / ATen kernels) and
``compile`` (``torch.compile`` of the reference). Every input is bf16 and channels_last at the
zoo's layer shapes, batch 128. Modes: ``eval_fwd`` (no_grad, BN from running stats),
``train_fwd`` (batch statistics, autograd recording) and ``train_fwd_bwd``.

Each result's ``extra_info`` holds ``peak_mem_mb``: the peak CUDA memory of one call above
what the inputs already occupy. CUDA only: interpreter timings are meaningless.
"""
from __future__ import annotations

import pytest
import torch

import fastcnn

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="Triton benchmarks need a CUDA GPU (interpreter timings are meaningless)")
VARIANTS = ["triton", "cudnn", "compile"]
MODES = ["eval_fwd", "train_fwd", "train_fwd_bwd"]
BATCH = 128
DTYPE = torch.bfloat16


def cl(t: torch.Tensor) -> torch.Tensor:
    return t.to(device="cuda", dtype=DTYPE).contiguous(memory_format=torch.channels_last)


_compiled = {}


def pick(variant: str, triton_fn, ref_fn):
    """The callable for ``variant`` (compiled reference functions are cached)."""
    if variant == "triton":
        return triton_fn
    if variant == "cudnn":
        return ref_fn
    if ref_fn not in _compiled:
        _compiled[ref_fn] = torch.compile(ref_fn)
    return _compiled[ref_fn]


def run(benchmark, variant, mode, call, leaves):
    """Time ``call()`` (which returns the op's output) in ``mode``; ``leaves`` are the
    tensors whose grads backward produces (reset each round)."""
    training = mode != "eval_fwd"
    for t in leaves:
        t.requires_grad_(training)
    gy = None

    def once():
        nonlocal gy
        for t in leaves:
            t.grad = None
        backend = "triton" if variant == "triton" else "reference"
        with fastcnn.use_backend(backend), torch.set_grad_enabled(training):
            y = call(training)
            if mode == "train_fwd_bwd":
                if gy is None:
                    gy = torch.randn_like(y)
                y.backward(gy)
        torch.cuda.synchronize()

    for _ in range(3):  # warm-up: autotuning, compilation
        once()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    once()
    benchmark.extra_info["peak_mem_mb"] = round((torch.cuda.max_memory_allocated() - base) / 2**20, 2)
    benchmark.extra_info.update(variant=variant, mode=mode, dtype=str(DTYPE), device=torch.cuda.get_device_name())
    benchmark.pedantic(once, rounds=20, iterations=5, warmup_rounds=1)
