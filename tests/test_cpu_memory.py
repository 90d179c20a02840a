"""fastcnn.cpu_memory: malloc keeps what a CPU training step frees (no page faults next step)."""
from __future__ import annotations

import os
import platform
import statistics
import subprocess
import sys

import pytest

from fastcnn import cpu_memory

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


@pytest.mark.skipif(not GLIBC, reason="the settings are glibc's mallopt")
@pytest.mark.parametrize("fused", [False, True], ids=["eager", "fused"])
def test_kept_memory_steps_take_no_page_faults(fused):
    """ResNet-20 at batch 32 allocates MiBs of activations anew each step: with the heap kept a
    typical step faults few or none of its pages in again (while the heap still grows, a step
    faults a few hundred: measured on CI's machine, [513, 640, 256, 0, 0, 0, 769, 0]); with
    glibc's defaults every step faults thousands (here 2,500-10,600)."""
    kept = [f for f, _ in cpu_memory.measure_steps("resnet20", 32, fused=fused, keep=True)]
    default = [f for f, _ in cpu_memory.measure_steps("resnet20", 32, fused=fused, keep=False)]
    assert statistics.median(kept) < 1024, f"page faults per step with freed memory kept: {kept}"
    if not any(k.startswith("MALLOC_") for k in os.environ):  # else the defaults are not glibc's
        assert 10 * statistics.median(kept) < statistics.median(default), \
            f"page faults per step: kept {kept}, malloc defaults {default}"
        assert 5 * sum(kept) < sum(default), f"page faults per step: kept {kept}, malloc defaults {default}"


@pytest.mark.skipif(not GLIBC, reason="the settings are glibc's mallopt")
def test_retain_is_idempotent_and_reported():
    code = ("from fastcnn import cpu_memory as m; print(m.status()); print(m.retain_freed_memory()); "
            "print(m.retain_freed_memory()); print(m.status())")
    lines = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           check=True).stdout.splitlines()
    assert lines == ["malloc defaults", "(True, '')", "(True, '')",
                     "malloc keeps freed memory (mmap threshold 1024 MiB, trim threshold 2047 MiB)"]


def test_other_c_libraries_are_left_alone(monkeypatch):
    monkeypatch.setattr(cpu_memory, "_applied", None)
    monkeypatch.setattr(platform, "libc_ver", lambda: ("", ""))
    applied, why = cpu_memory.retain_freed_memory()
    assert not applied and "not glibc" in why
    assert cpu_memory.status().startswith("malloc defaults (the C library is not glibc")


def test_cli_reports_both_settings(capsys):
    assert cpu_memory.main(["lenet5", "--batch", "8", "--steps", "2", "--rounds", "1"]) == 0
    out = capsys.readouterr().out
    assert "lenet5 batch 8 eager" in out and "malloc defaults" in out and "freed memory kept" in out


def test_measuring_process_errors_are_reported():
    with pytest.raises(RuntimeError, match="measuring process failed"):
        cpu_memory.measure_steps("no_such_model", 2, fused=False, keep=False, steps=1)
