"""Shared pieces of the model and host-overhead benchmarks: the device and dtype a run uses,
the variants compared, the selection options, and the ``extra_info`` every result carries
(the report tool, ``python -m bench.report``, reads them back).

Variants: ``eager`` (plain PyTorch modules, ``fused=False``), ``compile``
(``torch.compile`` of the eager model), ``fused-<backend>`` (``fused=True`` with that backend:
every backend built for the device; the Triton interpreter is not timed) and
``fused-<backend>+compile``. Everything runs channels_last; under autocast to bf16 on GPUs of
compute capability >= 8.0, fp16 below, fp32 (no autocast) on CPU.
"""
from __future__ import annotations

import datetime
import os
import platform
import sys
import time

import pytest
import torch

import fastcnn
from fastcnn import cpu_memory

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"

# CPU runs measure with malloc keeping freed memory, as `python -m fastcnn.train` trains on the
# CPU (fastcnn.cpu_memory: no page faults re-mapping each step's activations), for every
# variant alike; FASTCNN_BENCH_MALLOC=default measures with the C library's defaults.
if not CUDA and os.environ.get("FASTCNN_BENCH_MALLOC", "keep") != "default":
    cpu_memory.retain_freed_memory()


def amp_dtype() -> torch.dtype | None:
    """bf16 on GPUs with bf16 units (cc >= 8.0), fp16 on older GPUs, None (fp32) on CPU."""
    if not CUDA:
        return None
    return torch.bfloat16 if torch.cuda.get_device_capability()[0] >= 8 else torch.float16


def dtype_name() -> str:
    return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[amp_dtype()]


def autocast():
    dtype = amp_dtype()
    return torch.autocast(DEVICE, dtype=dtype, enabled=dtype is not None)


def fused_backends() -> list[str]:
    """Backends timed on this device: every built one that runs natively (on CPU the Triton
    interpreter is excluded: it is a test tool, its timings mean nothing)."""
    names = fastcnn.ops.dispatch.available_backends("conv_bn_act", DEVICE)
    return [b for b in names if b != "reference" and not (DEVICE == "cpu" and b == "triton")]


def all_variants() -> list[str]:
    """``eager``, ``compile``, ``fused-<backend>``, ``fused-<backend>+keep`` (the fused kernels
    without the activation rebuilds: ``fastcnn.recompute.disable``, ``train --keep-activations``)
    and ``fused-<backend>+compile`` for every backend timed here."""
    fused = [f"fused-{b}" for b in fused_backends()]
    return ["eager", "compile"] + fused + [f"{v}+keep" for v in fused] + [f"{v}+compile" for v in fused]


def parse_variant(variant: str) -> tuple[bool, str, bool]:
    """``(fused, backend, compiled)`` of a variant name."""
    compiled = variant.endswith("+compile") or variant == "compile"
    base = variant.removesuffix("+compile").removesuffix("+keep")
    fused = base.startswith("fused-")
    return fused, base.split("-", 1)[1] if fused else "reference", compiled


def keeps_activations(variant: str) -> bool:
    """Whether a fused variant runs without the activation rebuilds (``+keep``)."""
    return variant.endswith("+keep")


def selected(option: str, default: list[str]) -> list[str]:
    """The comma-separated list given with ``--bench-<option>`` or
    ``$FASTCNN_BENCH_<OPTION>`` (the root conftest.py turns the first into the second), or
    ``default``."""
    value = os.environ.get(f"FASTCNN_BENCH_{option.upper()}", "")
    return [v for v in value.split(",") if v] if value else list(default)


def sync():
    if CUDA:
        torch.cuda.synchronize()


def environment() -> dict:
    """Device, versions, threads and date of this run (stored in every result)."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    if CUDA:
        device = torch.cuda.get_device_name()
        cc = ".".join(map(str, torch.cuda.get_device_capability()))
    else:
        device = _cpu_name()
        cc = None
    return {
        "device": device, "device_type": DEVICE, "compute_capability": cc,
        "torch": torch.__version__, "triton": triton_version, "fastcnn": fastcnn.__version__,
        "python": platform.python_version(), "threads": torch.get_num_threads(),
        "dtype": dtype_name(), "date": datetime.date.today().isoformat(), "command": command(),
        "malloc": None if CUDA else cpu_memory.status(),
    }


def command() -> str:
    """The command line that ran the benchmarks (pytest's own arguments)."""
    args = [os.path.basename(sys.argv[0])] + sys.argv[1:]
    if args[0] in ("__main__.py", "pytest"):
        args[0] = "pytest" if args[0] == "pytest" else "python -m pytest"
    return " ".join(args)


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


def skip_unavailable(variant: str) -> None:
    fused, backend, _ = parse_variant(variant)
    if fused and backend not in fused_backends():
        pytest.skip(f"backend {backend} is not built for {DEVICE} (or not timed there)")


def timed(fn) -> float:
    """Seconds one call of ``fn`` takes, device work included."""
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0
