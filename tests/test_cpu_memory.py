"""fastcnn.cpu_memory: malloc keeps what a CPU training step frees (no page faults next step)."""
from __future__ import annotations

import os
import platform
import statistics
import subprocess
import sys
import textwrap

import pytest

from fastcnn import cpu_memory

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

# A few ResNet-20 training steps in a fresh process (the malloc settings are process-wide);
# prints the minor page faults of each step after two warm-up steps.
_STEPS = textwrap.dedent("""
    import resource, sys, torch
    import fastcnn
    from fastcnn import cpu_memory
    if sys.argv[1] == "keep":
        print("applied", cpu_memory.retain_freed_memory())
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = fastcnn.set_fused(fastcnn.create_model("resnet20"), sys.argv[2] == "fused")
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x, y = torch.randn(32, 3, 32, 32), torch.randint(0, 10, (32,))
    for i in range(int(sys.argv[3])):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        if i >= 2:
            print("faults", resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
""")


def _faults(mode: str, variant: str) -> tuple[list[int], str]:
    out = subprocess.run([sys.executable, "-c", _STEPS, mode, variant, "10"], capture_output=True, text=True,
                         check=True).stdout
    return [int(line.split()[1]) for line in out.splitlines() if line.startswith("faults")], out


@pytest.mark.skipif(not GLIBC, reason="the settings are glibc's mallopt")
@pytest.mark.parametrize("variant", ["eager", "fused"])
def test_kept_memory_steps_take_no_page_faults(variant):
    kept, out = _faults("keep", variant)
    assert "applied (True, '')" in out
    default, _ = _faults("default", variant)
    # a step allocates every activation anew (MiBs at batch 32): with the heap kept, a typical
    # step faults none of it in again (now and then the heap grows by a few hundred pages);
    # with glibc's defaults every step faults thousands of pages
    assert statistics.median(kept) < 64, f"page faults per step with freed memory kept: {kept}"
    if not any(k.startswith("MALLOC_") for k in os.environ):
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
