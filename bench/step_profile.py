"""Where a CPU training step goes: eager and fused steps of one model, alternating in one
process, their torch.profiler self time summed by category (convolution forward / backward,
BN and activation work, adds, the rest) and their wall-clock medians.

    python -m bench.step_profile resnet20 --batch 64 --threads 2 --rounds 6

Why: the fused step's ratio over eager is bounded by the work both share (the convolutions,
which fused runs through the same oneDNN calls); this says how large that share is and what the
fused BN/activation ops cost against eager's. Rounds alternate the variants (eager, fused,
eager, ...) so both see the same machine load; each round profiles one step of each and times
one more without the profiler (the profiler's per-op cost inflates eager, which runs more ops).
The models and steps are the model benchmark's (``bench_models``: ``eager`` against
``fused-cpu+keep``, the activations kept as ``train --fused`` runs on CPU, or ``fused-cpu``
with ``--rebuild``), on the CPU whatever the machine, with malloc set as the benchmarks set it
(``bench.harness``: freed memory kept on a machine without a GPU unless
``FASTCNN_BENCH_MALLOC=default``; the first line says which).
"""
from __future__ import annotations

import argparse
import collections
import statistics
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

import fastcnn
from bench import bench_models
from fastcnn import cpu_memory

#: profiler event name -> category (fastcnn's own ops keep their names)
_CATEGORIES = {
    "aten::mkldnn_convolution": "conv forward",
    "aten::convolution_backward": "conv backward",
    "aten::native_batch_norm": "BN forward",
    "aten::native_batch_norm_backward": "BN backward",
    "aten::relu": "activation",
    "aten::relu_": "activation",
    "aten::clamp_min": "activation",
    "aten::threshold_backward": "activation",
    "aten::add": "add",
    "aten::add_": "add",
}


def category(event: str) -> str:
    if event in _CATEGORIES:
        return _CATEGORIES[event]
    return event if event.startswith("fastcnn::") else "other"


def profile_steps(name: str, batch: int, rounds: int, rebuild: bool = False):
    """{variant: (wall-clock seconds per step (median), {category: ms per step})}."""
    x, y = bench_models.inputs(name, batch, "cpu")
    variants = {"eager": "eager", "fused": "fused-cpu" if rebuild else "fused-cpu+keep"}
    steps = {}
    for k, variant in variants.items():  # the model benchmark's models and training steps
        model, run, backend = bench_models.build_model(name, variant, "train", "cpu")
        steps[k] = bench_models.make_step(model, run, backend, "train", x, y)[0]
    for step in steps.values():
        for _ in range(3):  # warm-up: allocator, oneDNN primitive caches
            step()
    ms = {k: collections.Counter() for k in steps}
    wall = {k: [] for k in steps}
    for _ in range(rounds):
        for k, step in steps.items():
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                step()
            for e in prof.key_averages():
                ms[k][category(e.key)] += e.self_cpu_time_total / 1e3 / rounds
            t0 = time.perf_counter()
            step()
            wall[k].append(time.perf_counter() - t0)
    return {k: (statistics.median(wall[k]), dict(ms[k])) for k in steps}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.step_profile", description=__doc__.split("\n\n")[0])
    p.add_argument("model", nargs="?", default="resnet20")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--rebuild", action="store_true", help="fused with the activation rebuilds")
    args = p.parse_args(argv)
    if args.model not in fastcnn.list_models():
        p.error(f"unknown model {args.model!r}; models: {', '.join(fastcnn.list_models())}")
    if args.batch < 2 or args.rounds < 1 or args.threads < 1:
        p.error("--batch must be at least 2 (BN), --rounds and --threads at least 1")
    torch.set_num_threads(args.threads)
    result = profile_steps(args.model, args.batch, args.rounds, args.rebuild)
    print(f"{args.model} batch {args.batch}, {args.threads} thread(s), {args.rounds} alternating rounds, "
          f"fused {'rebuilds' if args.rebuild else 'keeps'} activations; torch {torch.__version__}; "
          f"{cpu_memory.status()}")
    for k, (wall, ms) in result.items():
        parts = ", ".join(f"{c} {v:.1f}" for c, v in sorted(ms.items(), key=lambda kv: -kv[1]) if v >= 0.05)
        print(f"  {k:5s} {wall * 1e3:7.1f} ms/step wall; profiler self ms/step: {parts} (sum {sum(ms.values()):.1f})")
    print(f"  eager / fused wall: {result['eager'][0] / result['fused'][0]:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
