"""Host overhead of each fusable layer: the Python, dispatcher and launch work around the
kernels, measured on tensors so small (2x8x4x4) that the arithmetic costs almost nothing.

    pytest --benchmark-only bench/bench_host_overhead.py --benchmark-json=host.json

This is the part of a step's cost that does not shrink on a fast GPU: at batch 128 a CIFAR
layer's kernels take tens of microseconds on an H100, so a layer whose host work costs more
than eager's conv+BN+ReLU makes the fused model slower however fast its kernels are. Target
(host-overhead issue): fused <= 1.0x eager for every layer, training and eval.

Layers: ConvBnAct (with and without a residual), BnAct, BnActConv, ConvAct and the SE block
(``SqueezeExcite`` with residual and ReLU), as the zoo uses them; and ``<layer> x8``, a stack
of eight of them in an ``nn.Sequential`` with the time given per layer: that is how a model
runs them, and where fusion's memory saving costs host time -- each layer's output is kept
as a recipe and rebuilt in backward (:mod:`fastcnn.recompute`), which a lone layer, whose
output nothing inside it consumes, never does. Modes: ``train`` (forward +
backward, batch statistics) and ``eval`` (forward, no grad). Variants: ``eager`` (the same
module with ``fused=False``) and ``fused-<backend>`` for every backend built for the device
(on CPU the Triton interpreter is not timed); for the stacks in training also
``fused-<backend>+keep``, the fused stack with its outputs kept instead of rebuilt (what the
recipes cost the host is the difference). On CPU the benchmark runs on one thread (host
work is single-threaded; a second thread only adds noise); each round is 20 calls.

Side by side: a fused variant's test also times the same layer eager, in alternation with its
own rounds (eager in pytest-benchmark's untimed ``setup`` of every round), and records that
as ``eager_per_call_us``; ``python -m bench.report`` takes the fused / eager ratio from the
pair, so both halves of a ratio see the same machine load. On CPU the timer is the process's
CPU time (``time.process_time``): host work is what is measured, and time the shared machine
gives to other processes is not; on a GPU, wall time (the launches must also be issued).
"""
from __future__ import annotations

import statistics
import time

import pytest
import torch
from torch import nn

import fastcnn
from bench import harness
from fastcnn import recompute
from fastcnn.layers import BnAct, BnActConv, ConvAct, ConvBnAct, set_fused
from fastcnn.layers.squeeze_excite import SqueezeExcite

N, C, H, W = 2, 8, 4, 4
CALLS_PER_ROUND = 20
STACK = 8
LAYERS = {  # name: (module factory, with a residual argument, layers per call)
    "ConvBnAct": (lambda: ConvBnAct(C, C), False, 1),
    "ConvBnAct+residual": (lambda: ConvBnAct(C, C), True, 1),
    "BnAct": (lambda: BnAct(C), False, 1),
    "BnActConv": (lambda: BnActConv(C, C), False, 1),
    "ConvAct": (lambda: ConvAct(C, C), False, 1),
    "SE+residual": (lambda: SqueezeExcite(C, reduction=4, out_act="relu"), True, 1),
    f"ConvBnAct x{STACK}": (lambda: nn.Sequential(*[ConvBnAct(C, C) for _ in range(STACK)]), False, STACK),
    f"BnAct x{STACK}": (lambda: nn.Sequential(*[BnAct(C) for _ in range(STACK)]), False, STACK),
    f"BnActConv x{STACK}": (lambda: nn.Sequential(*[BnActConv(C, C) for _ in range(STACK)]), False, STACK),
}
MODES = ["train", "eval"]


def _cases():
    """(layer, mode, variant): every layer and mode eager and fused on each backend; and the
    stacks in training also ``fused-<backend>+keep`` (``fastcnn.recompute.disable``, as
    ``train --keep-activations``): the same fused layers with every output kept rather than
    rebuilt, so that the host cost of the rebuild recipes reads off the pair. (A lone layer,
    and any layer in eval, has no recipes: +keep would time the same calls.)"""
    fused = [f"fused-{b}" for b in harness.fused_backends()]
    cases = []
    for layer in LAYERS:
        for mode in MODES:
            variants = ["eager"] + fused
            if LAYERS[layer][2] > 1 and mode == "train":
                variants += [f"{v}+keep" for v in fused]
            cases += [(layer, mode, v) for v in variants]
    return cases


@pytest.fixture
def one_thread():
    if harness.CUDA:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _rounds(layer, mode, fused, keep=False):
    """A function running one round (CALLS_PER_ROUND calls) of ``layer`` in ``mode`` (fused:
    ``keep`` turns the rebuild recipes off)."""
    make, with_residual, _ = LAYERS[layer]
    torch.manual_seed(0)
    module = set_fused(make(), fused).to(harness.DEVICE).train(mode == "train")
    if keep:
        recompute.disable(module)
    x = torch.randn(N, C, H, W, device=harness.DEVICE).contiguous(memory_format=torch.channels_last)
    residual = torch.randn_like(x) if with_residual else None
    if mode == "train":
        x.requires_grad_(True)
    args = (x,) if residual is None else (x, residual)

    def train_call():
        module(*args).sum().backward()

    def eval_call():
        with torch.no_grad():
            module(*args)

    call = train_call if mode == "train" else eval_call

    def rounds():
        for _ in range(CALLS_PER_ROUND):
            call()
        harness.sync()

    return rounds


@pytest.mark.parametrize("layer, mode, variant", _cases(), ids=["-".join(c) for c in _cases()])
def test_host_overhead(benchmark, one_thread, layer, mode, variant):
    harness.skip_unavailable(variant)
    fused, backend, _ = harness.parse_variant(variant)
    timer = time.perf_counter if harness.CUDA else time.process_time
    benchmark._timer = timer  # pytest-benchmark's clock for this test (see the module docstring)
    rounds = _rounds(layer, mode, fused, keep=harness.keeps_activations(variant))
    eager_rounds = _rounds(layer, mode, False) if fused else None
    eager_times = []

    def time_eager():  # untimed by pytest-benchmark: runs before each of its rounds
        if eager_rounds is not None:
            t0 = timer()
            eager_rounds()
            eager_times.append(timer() - t0)

    with fastcnn.use_backend(backend):
        for _ in range(3):  # warm-up: autotuning, first-call caches
            rounds()
            time_eager()
        eager_times.clear()
        benchmark.pedantic(rounds, setup=time_eager, rounds=30 if harness.CUDA else 20, iterations=1,
                           warmup_rounds=1)
    per_layer = LAYERS[layer][2]
    per_call = benchmark.stats.stats.median / CALLS_PER_ROUND / per_layer
    benchmark.extra_info.update(harness.environment())
    benchmark.extra_info.update(layer=layer, mode=mode, variant=variant, shape=f"{N}x{C}x{H}x{W}",
                                per_call_us=per_call * 1e6, calls_per_round=CALLS_PER_ROUND, layers_per_call=per_layer,
                                timer=timer.__name__)
    if eager_times:
        benchmark.extra_info["eager_per_call_us"] = statistics.median(eager_times) / CALLS_PER_ROUND / per_layer * 1e6
