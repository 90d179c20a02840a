"""Host (Python) share of the Triton ops: the work around the kernel launches, measured on
CPU with every Triton launch replaced by a no-op, against eager PyTorch's per-layer host cost.

    python -m pytest bench/bench_triton_host.py --benchmark-only --benchmark-json=triton_host.json
    python -m bench.bench_triton_host [--rounds 15] [--calls 200]     # interleaved medians, table

Why: on a GPU a CIFAR layer's kernels take tens of microseconds at batch 128, so whatever
Python work an op does per call is paid on every layer of every step; the target is that a
fused layer's Python path costs no more than eager's conv + BN + ReLU (three dispatcher calls
forward, their autograd nodes backward).

How: the op runs the code path it takes on a GPU (``interpreting()`` answers False in every
module of ``fastcnn.kernels``, 132 SMs and sm_90 limits are assumed, as in
tests/test_triton_compile.py's capture) on tiny CPU tensors (2x8x4x4), with each
``@triton.jit`` kernel's ``run`` replaced by a counter: what is timed is the Python of the op
-- argument handling, launch-parameter choice, autotuner lookups, allocations, autograd --
but not Triton's own launcher (``JITFunction.run``: argument binding, the compiled-kernel
lookup and the driver call, the same for any caller) nor any kernel. The autotuners run for
real (key, cache lookup); their one-off timing is answered by a stub during the warm-up.
The ATen ops the ops call (``sum`` of partials, dtype casts) run for real on the tiny
tensors, as eager's ops do.

Eager, the yardstick: ``F.conv2d`` + ``F.batch_norm`` + ``F.relu`` (and each op's own eager
equivalent) on the same tiny CPU tensors -- with tensors this small eager's time is its host
cost (dispatcher, autograd), a fair proxy of what it costs the CPU on a GPU run.

Variants: ``triton`` (``fastcnn.ops.triton_backend.<op>``: the ops layer and the kernels'
Python, what the fused layers reach after ``fastcnn.ops``' argument checks), ``eager-cbr``
(conv+BN+ReLU) and ``eager-op`` (the op's own unfused equivalent). Modes: ``train``
(forward + backward) and ``eval`` (forward under ``no_grad``). One thread.

These are CPU host-time figures, not GPU timings.
"""
from __future__ import annotations

import contextlib
import importlib
import pkgutil
import statistics
import time

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

N, C, H, W = 2, 8, 4, 4
CASES = ["conv_bn_act", "conv_bn_act+res", "bn_act", "conv_act", "se_block"]
MODES = ["train", "eval"]
VARIANTS = ["triton", "eager-cbr", "eager-op"]


# --------------------------------------------------------------------------- no-op launches

def _kernel_modules():
    import fastcnn.kernels as pkg
    return [importlib.import_module(f"fastcnn.kernels.{m.name}") for m in pkgutil.iter_modules(pkg.__path__)]


class _Props:
    multi_processor_count = 132


_MISSING = object()


class host_mode:
    """Context: the GPU code path of every op with no-op launches (see the module docstring).
    ``launches`` counts the launches made inside :meth:`counting`."""

    def __init__(self):
        self.saved, self.launches, self._count = [], 0, False

    def _set(self, obj, attr, value):
        self.saved.append((obj, attr, getattr(obj, attr)))
        setattr(obj, attr, value)

    def _set_dict(self, obj, key, value=_MISSING):
        """Set (or, with no value, remove) an entry of ``obj.__dict__`` -- what a
        ``cached_property`` reads first (Triton 3.6 caches ``Autotuner.do_bench`` there)."""
        d = obj.__dict__
        self.saved.append((d, key, d.get(key, _MISSING)))
        if value is _MISSING:
            d.pop(key, None)
        else:
            d[key] = value

    def _noop(self, *args, **kwargs):
        if self._count:
            self.launches += 1

    @contextlib.contextmanager
    def counting(self):
        self._count, self.launches = True, 0
        try:
            yield self
        finally:
            self._count = False

    def __enter__(self):
        from triton.runtime.autotuner import Autotuner
        from triton.runtime.jit import KernelInterface

        self._set(torch.cuda, "get_device_properties", lambda *a, **k: _Props())
        seen = set()
        for mod in _kernel_modules():
            for attr, obj in list(vars(mod).items()):
                if attr == "interpreting":
                    self._set(mod, attr, lambda: False)
                elif attr == "num_sms":
                    self._set(mod, attr, lambda device: 132)
                elif attr == "device_limits":
                    self._set(mod, attr, lambda device: (232448, (9, 0)))
                elif isinstance(obj, Autotuner) and id(obj) not in seen:
                    seen.add(id(obj))
                    # the one-off timing of a new key: every config "takes" 1 ms (no GPU here)
                    self._set_dict(obj, "_do_bench", lambda fn, quantiles=None, **kw: [1.0, 1.0, 1.0])
                    self._set_dict(obj, "do_bench")  # Triton 3.6: a cached_property over _do_bench
                    self._set(obj, "cache_results", False)
                elif isinstance(obj, KernelInterface) and not isinstance(obj, Autotuner) and id(obj) not in seen:
                    seen.add(id(obj))
                    self._set_dict(obj, "run", self._noop)
        return self

    def __exit__(self, *exc):
        for obj, attr, value in reversed(self.saved):
            if isinstance(obj, dict):
                obj.pop(attr, None)
                if value is not _MISSING:
                    obj[attr] = value
            else:
                setattr(obj, attr, value)
        self.saved = []


# --------------------------------------------------------------------------- cases

def _t(*shape, grad=False):
    return torch.randn(*shape).requires_grad_(grad)


def _cl(t):
    return t.detach().contiguous(memory_format=torch.channels_last).requires_grad_(t.requires_grad)


def make_case(case: str, mode: str):
    """``{variant: call}`` for one case and mode; each call runs one op forward (and backward
    in ``train``)."""
    from fastcnn.ops import triton_backend as tb

    train = mode == "train"
    x = _cl(_t(N, C, H, W, grad=train))
    w = _cl(_t(C, C, 3, 3, grad=train))  # channels_last, as fastcnn.train keeps models on a GPU
    bias = _t(C, grad=train)
    gamma, beta = _t(C, grad=train), _t(C, grad=train)
    rm, rv = torch.zeros(C), torch.ones(C)
    res = _cl(_t(N, C, H, W, grad=train)) if case.endswith("+res") else None
    hid = 2
    w1, b1, w2, b2 = _t(hid, C, grad=train), _t(hid, grad=train), _t(C, hid, grad=train), _t(C, grad=train)
    gy = torch.randn(N, C, H, W).contiguous(memory_format=torch.channels_last)

    def fused_fwd():
        if case.startswith("conv_bn_act"):
            return tb.conv_bn_act(x, w, None, gamma, beta, rm, rv, stride=(1, 1), padding=(1, 1),
                                  dilation=(1, 1), groups=1, training=train, momentum=0.1, eps=1e-5,
                                  act="relu", act_param=0.0, residual=res)
        if case == "bn_act":
            return tb.bn_act(x, gamma, beta, rm, rv, training=train, momentum=0.1, eps=1e-5, act="relu",
                             act_param=0.0, residual=None)
        if case == "conv_act":
            return tb.conv_act(x, w, bias, stride=(1, 1), padding=(1, 1), dilation=(1, 1), groups=1,
                               act="relu", act_param=0.0, residual=None)
        return tb.se_block(x, w1, b1, w2, b2, residual=None, act="relu", act_param=0.0)

    def eager_cbr():
        y = F.relu(F.batch_norm(F.conv2d(x, w, None, 1, 1), rm, rv, gamma, beta, train, 0.1, 1e-5))
        return y if res is None else y  # conv+BN+ReLU: the stated yardstick, same for every case

    def eager_op():
        if case.startswith("conv_bn_act"):
            y = F.batch_norm(F.conv2d(x, w, None, 1, 1), rm, rv, gamma, beta, train, 0.1, 1e-5)
            return F.relu(y if res is None else y + res)
        if case == "bn_act":
            return F.relu(F.batch_norm(x, rm, rv, gamma, beta, train, 0.1, 1e-5))
        if case == "conv_act":
            return F.relu(F.conv2d(x, w, bias, 1, 1))
        s = x.mean((2, 3))
        g = torch.sigmoid(F.linear(F.relu(F.linear(s, w1, b1)), w2, b2))
        return F.relu(x * g[:, :, None, None])

    def wrap(fwd):
        if train:
            def call():
                fwd().backward(gy)
        else:
            def call():
                with torch.no_grad():
                    fwd()
        return call

    calls = {"triton": wrap(fused_fwd), "eager-cbr": wrap(eager_cbr), "eager-op": wrap(eager_op)}
    return calls, fused_fwd, gy


_ACTIVE: list = []


@contextlib.contextmanager
def measuring():
    """Everything a measurement needs: one thread, no-op launches (GPU path)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with host_mode() as hm:
        _ACTIVE.append(hm)
        try:
            yield hm
        finally:
            _ACTIVE.pop()
            torch.set_num_threads(threads)


def per_call_us(call, calls: int) -> float:
    t0 = time.perf_counter()
    for _ in range(calls):
        call()
    return (time.perf_counter() - t0) / calls * 1e6


def interleaved(rounds: int = 15, calls: int = 200, cases=CASES, modes=MODES):
    """{(case, mode): {variant: median us per call}} with the variants interleaved round by
    round (a noisy 2-core machine: drift hits every variant alike)."""
    out = {}
    for case in cases:
        for mode in modes:
            fns = make_case(case, mode)[0]
            for fn in fns.values():  # warm-up: autotuner keys, first-call caches
                for _ in range(20):
                    fn()
            samples = {v: [] for v in fns}
            for _ in range(rounds):
                for v, fn in fns.items():
                    samples[v].append(per_call_us(fn, calls))
            out[(case, mode)] = {v: statistics.median(s) for v, s in samples.items()}
    return out


# --------------------------------------------------------------------------- pytest-benchmark

@pytest.fixture(scope="module")
def host():
    with measuring() as hm:
        yield hm


CALLS_PER_ROUND = 50


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", CASES)
def test_triton_host(benchmark, host, case, mode, variant):
    from bench import harness

    call = make_case(case, mode)[0][variant]
    for _ in range(20):
        call()

    def rounds():
        for _ in range(CALLS_PER_ROUND):
            call()

    benchmark.pedantic(rounds, rounds=20, iterations=1, warmup_rounds=1)
    env = harness.environment()
    env["device"] = f"{env['device']} (CPU host time, Triton launches no-op'd)"
    benchmark.extra_info.update(env)
    benchmark.extra_info.update(case=case, mode=mode, variant=variant, shape=f"{N}x{C}x{H}x{W}",
                                per_call_us=benchmark.stats.stats.median / CALLS_PER_ROUND * 1e6)


def launch_counts(case: str, mode: str) -> tuple[int, int]:
    """(forward, backward) Triton launches of one call (inside :func:`measuring`)."""
    hm = _ACTIVE[-1]
    calls, fwd, gy = make_case(case, mode)
    calls["triton"]()  # warm
    with hm.counting(), torch.set_grad_enabled(mode == "train"):
        y = fwd()
    n_fwd = hm.launches
    if mode != "train":
        return n_fwd, 0
    with hm.counting():
        y.backward(gy)
    return n_fwd, hm.launches


def main(argv=None):
    import argparse
    import datetime
    import platform

    import triton

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--cases", default=",".join(CASES))
    a = ap.parse_args(argv)
    cases = a.cases.split(",")
    with measuring():
        counts = {(c, m): launch_counts(c, m) for c in cases for m in MODES}
        res = interleaved(a.rounds, a.calls, cases)
    print(f"# CPU host time per call (median of {a.rounds} interleaved rounds x {a.calls} calls), "
          f"Triton launches no-op'd; torch {torch.__version__}, Triton {triton.__version__}, "
          f"{datetime.date.today().isoformat()}, {platform.processor() or platform.machine()}, 1 thread")
    print("| op | mode | Triton launches (fwd+bwd) | triton us | eager conv+BN+ReLU us | ratio | eager op us | ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for (case, mode), r in res.items():
        t, cbr, op = r["triton"], r["eager-cbr"], r["eager-op"]
        print(f"| {case} | {mode} | {'+'.join(map(str, counts[(case, mode)]))} | {t:.1f} | {cbr:.1f} | {t / cbr:.2f} | {op:.1f} | {t / op:.2f} |")


if __name__ == "__main__":
    main()
