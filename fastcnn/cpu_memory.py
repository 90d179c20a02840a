"""Keep the memory a CPU training step frees in the process, so the next step does not fault it in again.

Why: PyTorch's CPU allocator is the C library's ``malloc``. With glibc's defaults a block of
more than 128 KiB -- every activation and gradient of a CIFAR model at a useful batch -- is
mapped fresh from the kernel (``mmap``) or handed back when the top of the heap is free
(``trim``), and each 4 KiB page of it is faulted in and zeroed again by the kernel on first
touch in the next step. glibc raises its mmap threshold as it sees blocks freed, but not far
enough: measured on the 2-core CPU of bench/RESULTS.md (2026-12-02), a ResNet-20 training step
at batch 64 took 13,700 minor page faults eager and 7,800 fused, several milliseconds of a
60 ms step, and none at all with the two settings below. A GPU's caching allocator does the
same for device memory; jemalloc or tcmalloc (``LD_PRELOAD``) do it for the CPU too.

What :func:`retain_freed_memory` sets (glibc's ``mallopt``, process-wide, from then on):

* ``M_MMAP_THRESHOLD`` = 1 GiB: blocks up to that size come from the heap, not from ``mmap``;
* ``M_TRIM_THRESHOLD`` = 2 GiB - 1: free memory at the top of the heap is kept, not returned.

The cost: the process's resident memory stays near its peak instead of falling between steps
(as on a GPU). Setting either also turns glibc's own threshold adjustment off. Other C
libraries (musl, macOS, Windows) are left alone, and the function says why.

Whether it pays on a given machine: ``python -m fastcnn.cpu_memory resnet20 --batch 64
[--fused]`` runs a few training steps with the C library's defaults and with the settings,
each in a fresh process, and prints the page faults and the time per step.
"""
from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import platform
import statistics
import subprocess
import sys

# mallopt parameters (glibc's malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

#: heap blocks up to this size are not mmapped (glibc accepts up to INT_MAX)
MMAP_THRESHOLD = 1 << 30
#: free memory at the top of the heap up to this size is kept
TRIM_THRESHOLD = (1 << 31) - 1

_applied: bool | None = None
_reason = ""


def retain_freed_memory() -> tuple[bool, str]:
    """Apply the settings above once per process; returns ``(applied, why not)``.

    Idempotent. Not applied (``False`` and the reason) where the C library is not glibc or
    ``mallopt`` refuses a value."""
    global _applied, _reason
    if _applied is not None:
        return _applied, _reason
    libc_name, _version = platform.libc_ver()
    if platform.system() != "Linux" or libc_name != "glibc":
        _applied, _reason = False, f"the C library is not glibc ({platform.system()}, {libc_name or 'unknown'})"
        return _applied, _reason
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    libc.mallopt.restype = ctypes.c_int
    for param, value, name in ((_M_MMAP_THRESHOLD, MMAP_THRESHOLD, "M_MMAP_THRESHOLD"),
                               (_M_TRIM_THRESHOLD, TRIM_THRESHOLD, "M_TRIM_THRESHOLD")):
        if libc.mallopt(param, value) != 1:
            _applied, _reason = False, f"glibc's mallopt refused {name}={value}"
            return _applied, _reason
    _applied, _reason = True, ""
    return _applied, _reason


def status() -> str:
    """One line for logs and benchmark records: whether the settings are in force."""
    if _applied is None:
        return "malloc defaults"
    return (f"malloc keeps freed memory (mmap threshold {MMAP_THRESHOLD >> 20} MiB, trim threshold "
            f"{TRIM_THRESHOLD >> 20} MiB)") if _applied else f"malloc defaults ({_reason})"


# ------------------------------------------------------------------ measuring it (the CLI)
# A few training steps of a zoo model in a fresh process (the malloc settings are process-wide
# and permanent): one line per step after the warm-up, "<minor page faults> <seconds>".
_STEPS = """
import resource, sys, time, torch
import fastcnn
from fastcnn import cpu_memory
name, batch, fused, keep, threads, steps = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1", sys.argv[4] == "1", \
    int(sys.argv[5]), int(sys.argv[6])
if keep and not cpu_memory.retain_freed_memory()[0]:
    sys.exit("not applied: " + cpu_memory.retain_freed_memory()[1])
torch.set_num_threads(threads)
torch.manual_seed(0)
model = fastcnn.set_fused(fastcnn.create_model(name), fused).to(memory_format=torch.channels_last).train()
opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
x = torch.randn(batch, *fastcnn.model_info(name).input_size).contiguous(memory_format=torch.channels_last)
y = torch.randint(0, 10, (batch,))
for i in range(steps + 2):
    faults, t = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
    opt.zero_grad(set_to_none=True)
    torch.nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    if i >= 2:
        print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults, time.perf_counter() - t)
"""


def measure_steps(model: str, batch: int, *, fused: bool, keep: bool, threads: int = 1,
                  steps: int = 8) -> list[tuple[int, float]]:
    """``(minor page faults, seconds)`` of each of ``steps`` training steps of ``model`` (after
    two warm-up steps) in a fresh process, with freed memory kept (``keep``) or malloc's
    defaults."""
    out = subprocess.run([sys.executable, "-c", _STEPS, model, str(batch), str(int(fused)), str(int(keep)),
                          str(threads), str(steps)], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"the measuring process failed: {out.stderr.strip().splitlines()[-1:]}")
    return [(int(f), float(t)) for f, t in (line.split() for line in out.stdout.splitlines())]


def main(argv=None) -> int:
    from .cli import prog_name

    p = argparse.ArgumentParser(prog=prog_name("python -m fastcnn.cpu_memory"),
                                description="Page faults and time per CPU training step, with malloc's defaults "
                                            "and with freed memory kept (what fastcnn.train does on the CPU).")
    p.add_argument("model", nargs="?", default="resnet20")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--fused", action="store_true")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--rounds", type=int, default=2, help="alternate the two settings this many times")
    args = p.parse_args(argv)
    results: dict[bool, list[tuple[int, float]]] = {False: [], True: []}
    for _ in range(args.rounds):  # alternated: both settings see the same machine load
        for keep in (False, True):
            results[keep] += measure_steps(args.model, args.batch, fused=args.fused, keep=keep,
                                           threads=args.threads, steps=args.steps)
    print(f"{args.model} batch {args.batch} {'fused' if args.fused else 'eager'}, {args.threads} thread(s), "
          f"median of {args.steps * args.rounds} steps:")
    for keep, label in ((False, "malloc defaults"), (True, "freed memory kept")):
        faults = statistics.median(f for f, _ in results[keep])
        ms = statistics.median(t for _, t in results[keep]) * 1e3
        print(f"  {label:18s} {faults:8.0f} page faults/step  {ms:8.1f} ms/step")
    return 0


if __name__ == "__main__":
    sys.exit(main())
