"""Which suite a bare ``pytest`` collects, from the repository root.

``pytest`` (no paths) runs the unit tests in ``tests/`` and spends no time in ``bench/``;
``pytest --benchmark-only`` (no paths) runs the benchmarks in ``bench/`` and nothing else.
Paths given on the command line are always collected as asked
(``python -m pytest bench --benchmark-only``, ``python -m pytest tests/test_models.py``).
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent

if not torch.cuda.is_available():  # Triton kernels run in its interpreter (before Triton loads)
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _benchmark_only(config) -> bool:
    try:
        return bool(config.getoption("benchmark_only"))
    except ValueError:  # pytest-benchmark not installed
        return False


def pytest_ignore_collect(collection_path: Path, config):
    if config.args_source != pytest.Config.ArgsSource.TESTPATHS:
        return None  # explicit paths: collect what was asked
    skip = ROOT / ("tests" if _benchmark_only(config) else "bench")
    if collection_path == skip or skip in collection_path.parents:
        return True
    return None


def pytest_addoption(parser):
    group = parser.getgroup("fastcnn benchmarks (bench/)")
    group.addoption("--bench-models", default=None,
                    help="comma-separated zoo models for bench/bench_models.py (default: a "
                         "per-device set; 'all' for the whole zoo)")
    group.addoption("--bench-variants", default=None,
                    help="comma-separated variants: eager, compile, fused-<backend>, "
                         "fused-<backend>+compile (default: all built ones)")
    group.addoption("--bench-batch", default=None,
                    help="batch size for bench/bench_models.py (default: 128 on GPU, per-model on CPU)")


def pytest_configure(config):
    """Hand the ``--bench-*`` options to the benchmarks (bench/harness.py reads them from the
    environment, before collection parametrises the cases)."""
    for key in ("models", "variants", "batch"):
        value = config.getoption(f"bench_{key}")
        if value:
            os.environ[f"FASTCNN_BENCH_{key.upper()}"] = value
