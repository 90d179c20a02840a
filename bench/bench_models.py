"""Whole-model throughput and peak memory: eager PyTorch, ``torch.compile``, fused (every
built backend) and fused + ``torch.compile``, side by side in one run.

    pytest --benchmark-only --benchmark-json=models.json            # from the repository root
    pytest --benchmark-only --bench-models=resnet20,wrn16_8 --bench-variants=eager,fused-cpu
    python -m bench.report models.json                              # tables and charts

Workloads: ``train`` (forward, cross-entropy, backward, SGD-momentum step) and ``infer`` (eval
mode, no grad). Variants and dtypes: see bench/harness.py (``fused-<backend>+keep``: without the
activation rebuilds, training only -- what ``--keep-activations`` trades memory for, and what ``train --fused`` runs on CPU). Compilation (and Triton autotuning)
happens in untimed warm-up steps; its time is recorded apart (``compile_s``).

Each result's ``extra_info`` has ``images_per_s`` (batch / median step time), ``peak_mem_bytes``
(GPU: ``torch.cuda.max_memory_allocated`` over the timed steps; CPU: the peak of one step
measured by ``fastcnn.memory.MemoryTracker``, parameters, gradients and optimizer state
included; None for compiled variants on CPU, which the tracker cannot see into), and the run's environment (device, versions, threads, dtype, batch, date).

Side by side (CPU): on a shared machine the load changes from one test to the next, so on CPU a
non-eager variant's test also runs the same model eager, one step before each of its own timed
rounds (pytest-benchmark's untimed ``setup``), and records that as ``eager_images_per_s``;
``python -m bench.report`` takes "over eager" ratios from the pair. Rounds: 20 on a GPU; on
CPU as many as fit about 4 s of the variant's steps, 5 to 25 (``rounds``; recorded in
``extra_info["rounds"]``). (Not on a GPU: a lent GPU is
not shared, and the eager twin's steps would enter the variant's allocator peak.)

Default selection: on a GPU every zoo model at batch 128; on CPU four models whose balance of
convolution and BN/activation/SE work differs, at batches a 2-core machine runs in about 15
minutes. ``--bench-models all`` selects the whole zoo.
"""
from __future__ import annotations

import gc
import math
import statistics
import time

import pytest
import torch
import torch.nn.functional as F

import fastcnn
from bench import harness
from fastcnn import recompute
from fastcnn.memory import MemoryTracker

#: CPU defaults: model -> batch (resnet20 and densenet: BN/activation-heavy; se_resnext: SE;
#: simplenet: convolution-bound)
CPU_MODELS = {"resnet20": 64, "densenet_bc_100_12": 16, "se_resnext29_4x64d": 4, "simplenet": 32}
GPU_BATCH = 128
WORKLOADS = ["train", "infer"]
GPU_ROUNDS = 20
#: CPU: timed rounds until about this many seconds of the variant's steps, within CPU_ROUNDS
#: (resnet20's 0.2 s step gets 20 rounds, not 5: its fused / eager ratio moved 1.16-1.24
#: between three 5-round runs on a quiet machine, 2026-12-03)
CPU_ROUND_BUDGET_S = 4.0
CPU_ROUNDS = (5, 25)
WARMUP = 3


def rounds(step_s: float) -> int:
    """Timed rounds for a step of ``step_s`` seconds: fixed on a GPU (not shared); on CPU as
    many as fit ``CPU_ROUND_BUDGET_S``, within ``CPU_ROUNDS``, so that a fast model's median
    rests on more than five noisy steps."""
    if harness.CUDA:
        return GPU_ROUNDS
    lo, hi = CPU_ROUNDS
    return max(lo, min(hi, math.ceil(CPU_ROUND_BUDGET_S / max(step_s, 1e-6))))


def _models() -> list[str]:
    chosen = harness.selected("models", [] if harness.CUDA else list(CPU_MODELS))
    if chosen == ["all"] or (harness.CUDA and not chosen):
        return [m for m in fastcnn.list_models() if fastcnn.model_info(m).input_size[-1] <= 64]
    return chosen


def _batch(name: str) -> int:
    given = harness.selected("batch", [])
    if given:
        return int(given[0])
    return GPU_BATCH if harness.CUDA else CPU_MODELS.get(name, 16)


def _cases():
    """Every (model, workload, variant) selected; a typo in the selection is an error at
    collection, never an empty run."""
    models = _models()
    unknown = [m for m in models if m not in fastcnn.list_models()]
    if unknown:
        raise pytest.UsageError(f"unknown model(s) in --bench-models: {', '.join(unknown)}")
    variants = harness.selected("variants", harness.all_variants())
    for v in variants:
        fused, backend, _ = harness.parse_variant(v)
        if v.removesuffix("+compile") not in ("eager", "compile") and not (fused and backend in fastcnn.BACKENDS):
            raise pytest.UsageError(f"unknown variant {v!r} in --bench-variants; "
                                    "variants: eager, compile, fused-<backend>[+keep|+compile]")
    # +keep differs from its fused variant only in training (inference rebuilds nothing)
    return [(m, w, v) for m in _models() for w in WORKLOADS for v in variants
            if not (w == "infer" and harness.keeps_activations(v))]


def build_model(name: str, variant: str, workload: str, device: str = harness.DEVICE):
    """(the model as ``variant`` builds it, channels_last, in train or eval mode; what runs it:
    the model or its ``torch.compile``; the op backend of its fused layers)."""
    fused, backend, compiled = harness.parse_variant(variant)
    torch.manual_seed(0)
    model = fastcnn.create_model(name, fused=fused).to(device)
    if harness.keeps_activations(variant):
        recompute.disable(model)
    model = model.to(memory_format=torch.channels_last).train(workload == "train")
    run = torch.compile(model) if compiled else model
    return model, run, backend


@pytest.mark.parametrize("name,workload,variant", _cases())
def test_model(benchmark, name, workload, variant):
    harness.skip_unavailable(variant)
    model, run, backend = build_model(name, variant, workload)
    batch = _batch(name)
    x, y = inputs(name, batch)
    step, opt = make_step(model, run, backend, workload, x, y)
    first = harness.timed(step)  # compilation, autotuning, allocator growth
    warm = [harness.timed(step) for _ in range(WARMUP - 1)]
    peak = None if "compile" in variant else _peak_bytes(step, model, opt, x, y)
    eager_step = _eager_twin(name, workload, x, y) if variant != "eager" and not harness.CUDA else None
    eager_times = []

    def time_eager():  # untimed by pytest-benchmark: one eager step before each timed round
        if eager_step is not None:
            eager_times.append(harness.timed(eager_step))

    if eager_step is not None:
        eager_step()
    if harness.CUDA:
        torch.cuda.reset_peak_memory_stats()
    n_rounds = rounds(statistics.median(warm))
    benchmark.pedantic(lambda: (step(), harness.sync()), setup=time_eager, rounds=n_rounds, iterations=1)
    if harness.CUDA:
        peak = torch.cuda.max_memory_allocated()
    median = benchmark.stats.stats.median
    benchmark.extra_info.update(harness.environment())
    benchmark.extra_info.update(
        model=name, workload=workload, variant=variant, batch=batch,
        images_per_s=batch / median, peak_mem_bytes=peak, rounds=n_rounds,
        first_step_s=first, compile_s=max(0.0, first - statistics.median(warm)) if "compile" in variant else 0.0,
        params=sum(p.numel() for p in model.parameters()),
    )
    if eager_times:
        benchmark.extra_info["eager_images_per_s"] = batch / statistics.median(eager_times)
    del model, run, opt, eager_step
    gc.collect()


def inputs(name: str, batch: int, device: str = harness.DEVICE):
    """A fixed random batch for ``name``: channels_last images and class labels."""
    info = fastcnn.model_info(name)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, *info.input_size, generator=gen).to(device).contiguous(memory_format=torch.channels_last)
    return x, torch.randint(0, info.num_classes, (batch,), generator=gen).to(device)


def make_step(model, run, backend, workload, x, y):
    """(one step of ``workload`` on ``run``, its optimizer): ``train`` is forward, cross-entropy,
    backward and an SGD-momentum step; ``infer`` a no-grad forward."""
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def train_step():
        with fastcnn.use_backend(backend), harness.autocast():
            loss = F.cross_entropy(run(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def infer_step():
        with fastcnn.use_backend(backend), harness.autocast(), torch.no_grad():
            run(x)

    return (train_step if workload == "train" else infer_step), opt


def _eager_twin(name, workload, x, y):
    """One step of the same model eager (for the side-by-side ratio)."""
    model, run, backend = build_model(name, "eager", workload)
    return make_step(model, run, backend, workload, x, y)[0]


def _peak_bytes(step, *held) -> int | None:
    """CPU: the peak of live tensor bytes over one step (fastcnn.memory.MemoryTracker). GPU:
    None here (the caller reads the CUDA allocator's peak over the timed steps). Not for
    compiled variants on CPU: torch.compile does not run under a dispatch mode (it falls back
    to eager, so the figure would be eager's), and the compiled code allocates its buffers
    without the dispatcher."""
    if harness.CUDA:
        return None
    with MemoryTracker("cpu") as mt:
        mt.track(*held)
        mt.reset_peak()
        step()
    return mt.peak
