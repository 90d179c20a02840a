"""Host overhead counted in instructions: each fusable layer's CPU instructions per call, fused
and eager, counted by valgrind's callgrind -- a figure this noisy shared machine cannot move.

    python -m bench.host_instructions --json bench/runs/host-instr-cpu.json [--layers ConvBnAct BnAct]

Why a second measure beside ``bench/bench_host_overhead.py``: that benchmark times the same
calls in microseconds, which on a 2-core shared machine moves by 10% between runs -- more
than most host-overhead changes worth making. An instruction count is deterministic to a
fraction of a percent, and it is taken by a method independent of the code under test
(valgrind executes the process on a synthetic CPU and counts every user-space instruction:
Python, the dispatcher, autograd, the allocator, the kernels). It is not time: cache misses,
branch mispredictions and page faults are not in it, so the microsecond benchmark stays the
judge of the target; instruction ratios show where the host work goes and whether a change
removed some.

How: the tool re-runs itself under ``valgrind --tool=callgrind --instr-atstart=no`` (startup
and imports uninstrumented), and the child switches counting on around each measured round
through callgrind's client requests (a five-line C shim compiled on the fly with the
valgrind headers; ``valgrind`` and its headers come from the system's package, not pip).
The calls are :mod:`bench.bench_host_overhead`'s own (the same layers, 2x8x4x4 tensors, one
thread, forward + ``.sum().backward()`` in training, forward under ``no_grad`` in eval):
two warm-up rounds, then ``--rounds`` measured rounds of 20 calls; the figure is the median
round's instructions per layer call. Run it where nothing else needs the machine for a few
minutes: valgrind runs the process about 50x slower.
"""
from __future__ import annotations

import argparse
import ctypes
import glob
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

_SHIM = r"""
#include <valgrind/callgrind.h>
void cg_start(void) { CALLGRIND_START_INSTRUMENTATION; }
void cg_stop(void) { CALLGRIND_STOP_INSTRUMENTATION; }
void cg_zero(void) { CALLGRIND_ZERO_STATS; }
void cg_dump(const char* what) { CALLGRIND_DUMP_STATS_AT(what); }
"""
_CHILD_ENV = "FASTCNN_HOST_INSTR_CHILD"


def missing_tools() -> str | None:
    """Why this machine cannot count instructions (None when it can)."""
    if shutil.which("valgrind") is None:
        return "valgrind is not installed (Debian/Ubuntu: apt install valgrind)"
    if shutil.which("gcc") is None and shutil.which("cc") is None:
        return "no C compiler (gcc or cc) to build the callgrind client-request shim"
    if not os.path.exists("/usr/include/valgrind/callgrind.h"):
        return "valgrind's headers (valgrind/callgrind.h) are missing"
    return None


def _build_shim(directory: str) -> str:
    src, lib = os.path.join(directory, "cg_shim.c"), os.path.join(directory, "libcg_shim.so")
    with open(src, "w") as f:
        f.write(_SHIM)
    cc = shutil.which("gcc") or shutil.which("cc")
    subprocess.run([cc, "-O2", "-shared", "-fPIC", "-o", lib, src], check=True)
    return lib


def _child(args) -> None:
    """Runs under callgrind: every (layer, mode, variant) round dumps its own counts."""
    import torch

    from bench import bench_host_overhead as host  # its harness keeps freed memory, as there

    cg = ctypes.CDLL(args.shim)
    torch.set_num_threads(1)
    cases = []
    for layer in args.layers:
        for mode in host.MODES:
            for fused in (False, True):
                rounds = host._rounds(layer, mode, fused)
                for _ in range(2):  # warm-up: first-call caches, checks, lazy imports
                    rounds()
                cg.cg_start()
                for r in range(args.rounds):
                    cg.cg_zero()
                    rounds()
                    cg.cg_dump(f"{layer}|{mode}|{'fused' if fused else 'eager'}|{r}".encode())
                cg.cg_stop()
                cases.append((layer, mode, fused))
    print(json.dumps({"cases": len(cases)}))


def _parse_dumps(directory: str) -> dict:
    """{(layer, mode, variant): [instructions of each round]} from callgrind's dump files."""
    counts: dict = {}
    for path in glob.glob(os.path.join(directory, "cg.out*")):
        desc = total = None
        with open(path) as f:
            for line in f:
                if line.startswith("desc: Trigger: Client Request: "):
                    desc = line.split("Client Request: ", 1)[1].strip()
                elif line.startswith("totals:") or line.startswith("summary:"):
                    total = int(line.split()[1])
        if desc is None or total is None:
            continue
        layer, mode, variant, _ = desc.split("|")
        counts.setdefault((layer, mode, variant), []).append(total)
    return counts


def measure(layers, rounds: int = 3, keep_dumps: str | None = None) -> list[dict]:
    """Instructions per layer call for each (layer, mode, variant) of ``layers``; with
    ``keep_dumps``, callgrind's per-round profiles are copied there (``callgrind_annotate``
    reads them: which functions the instructions went to)."""
    from bench import bench_host_overhead as host

    why = missing_tools()
    if why is not None:
        raise RuntimeError(f"cannot count instructions: {why}")
    unknown = [layer for layer in layers if layer not in host.LAYERS]
    if unknown:
        raise ValueError(f"unknown layer(s) {unknown}; choose from {list(host.LAYERS)}")
    with tempfile.TemporaryDirectory(prefix="fastcnn-instr-") as tmp:
        shim = _build_shim(tmp)
        cmd = ["valgrind", "--tool=callgrind", "--instr-atstart=no",
               f"--callgrind-out-file={os.path.join(tmp, 'cg.out')}",
               sys.executable, "-m", "bench.host_instructions", "--shim", shim, "--rounds", str(rounds),
               "--layers", *layers]
        env = dict(os.environ, **{_CHILD_ENV: "1"})
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=root)
        if proc.returncode != 0:
            raise RuntimeError(f"the callgrind run failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
        counts = _parse_dumps(tmp)
        if keep_dumps:
            os.makedirs(keep_dumps, exist_ok=True)
            for path in glob.glob(os.path.join(tmp, "cg.out*")):
                shutil.copy(path, keep_dumps)
    rows = []
    for (layer, mode, variant), per_round in sorted(counts.items()):
        if len(per_round) != rounds:
            raise RuntimeError(f"{layer} {mode} {variant}: {len(per_round)} dumps, expected {rounds}")
        per_layer = host.LAYERS[layer][2]
        rows.append(dict(layer=layer, mode=mode, variant=variant,
                         instructions_per_call=statistics.median(per_round) / host.CALLS_PER_ROUND / per_layer,
                         rounds=per_round))
    return rows


def main(argv=None) -> None:
    from bench import bench_host_overhead as host

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", nargs="+", default=list(host.LAYERS), help="layers of bench_host_overhead")
    p.add_argument("--rounds", type=int, default=3, help="measured rounds of 20 calls (median taken)")
    p.add_argument("--json", help="write the rows and the environment here")
    p.add_argument("--keep-dumps", metavar="DIR", help="copy callgrind's per-round profiles here")
    p.add_argument("--shim", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if os.environ.get(_CHILD_ENV):
        _child(args)
        return
    rows = measure(args.layers, args.rounds, args.keep_dumps)
    by_key = {(r["layer"], r["mode"], r["variant"]): r["instructions_per_call"] for r in rows}
    print(f"{'layer':22s} {'mode':5s} {'eager':>10s} {'fused':>10s} {'ratio':>6s}")
    for layer in args.layers:
        for mode in host.MODES:
            e, f = by_key.get((layer, mode, "eager")), by_key.get((layer, mode, "fused"))
            if e and f:
                print(f"{layer:22s} {mode:5s} {e:10.0f} {f:10.0f} {f / e:6.3f}")
    if args.json:
        from bench import harness

        with open(args.json, "w") as f:
            env = dict(harness.environment(), threads=1,
                       command="python -m bench.host_instructions " + " ".join(argv if argv is not None else sys.argv[1:]))
            json.dump({"kind": "host-instructions", "environment": env, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
