"""The two CPU builds of the extension's kernels (csrc/channel_act/cpu/channel_act_impl.h
compiled as DEFAULT, plain loops, and as AVX2, explicit 8-lane vectors): the run-time choice,
and that both builds compute the same results for every op, layout and activation, on shapes
whose channel and plane sizes are not multiples of the AVX2 build's 16-element step, so that
the full steps, the partial steps that end a run or a row (masked loads and stores, one or
both vectors partly filled), the channels_last row blocks and the long rows all run. The
builds are compared with tests/op_cases.py's assert_close without a PyTorch result: they
must agree to rounding."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from op_cases import ACTS, assert_close, make

ext = pytest.importorskip("fastcnn._C", reason="the extension fastcnn._C is not built")

pytestmark = pytest.mark.extension

ops = torch.ops.fastcnn


@pytest.fixture
def restore_capability():
    yield
    ext._set_cpu_capability("auto")


def test_capability_is_reported_and_settable(restore_capability):
    caps = ext.cpu_capabilities()
    assert caps[0] == "default"
    assert ext.cpu_capability() == caps[-1]  # auto picks the best usable build
    ext._set_cpu_capability("default")
    assert ext.cpu_capability() == "default"
    ext._set_cpu_capability("auto")
    assert ext.cpu_capability() == caps[-1]


def test_unknown_capability_is_an_error(restore_capability):
    with pytest.raises(ValueError, match="unknown CPU capability 'avx9'"):
        ext._set_cpu_capability("avx9")


def test_the_build_follows_pytorchs_own_choice():
    """ATEN_CPU_CAPABILITY=default makes PyTorch run its DEFAULT kernels; ours follow it, and
    asking for AVX2 then is an error that names what is available."""
    code = (
        "import torch, fastcnn._C as ext\n"
        "print(ext.cpu_capability(), ','.join(ext.cpu_capabilities()))\n"
        "try:\n    ext._set_cpu_capability('avx2')\nexcept ValueError as e:\n    print(e)\n"
    )
    env = dict(os.environ, ATEN_CPU_CAPABILITY="default")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    first, error = out.stdout.splitlines()[:2]
    assert first.split() == ["default", "default"]
    assert "CPU capability 'avx2' is not available" in error and "available: default" in error


def both_builds(fn):
    """fn() under the DEFAULT build and under the AVX2 build."""
    if "avx2" not in ext.cpu_capabilities():
        pytest.skip("this CPU (or this build) has no AVX2 kernels to compare with")
    out = {}
    for cap in ("default", "avx2"):
        ext._set_cpu_capability(cap)
        out[cap] = fn()
    ext._set_cpu_capability("auto")
    return out["default"], out["avx2"]


def assert_all_close(a, b, dtype, what):
    for i, (u, v) in enumerate(zip(a, b)):
        assert_close(v, u, dtype, f"{what} output {i}")


# channels 20, 48, 16, 3, 72 and planes 63, 25, 64, 272, 5, 9: partial steps of both vectors
# and of fewer elements than one vector; (2, 16, 16, 17) spans 3 row chunks; 72 channels are
# long rows (one row at a time)
SHAPES = ((3, 20, 7, 9), (2, 48, 5, 5), (4, 16, 8, 8), (2, 16, 16, 17), (5, 3, 5, 1), (2, 72, 3, 3))
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ("nchw", "channels_last"))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("residual", (False, True), ids=("plain", "residual"))
def test_bn_act_default_and_avx2_agree(shape, layout, dtype, residual, restore_capability):
    c = shape[1]
    x, gy = make(shape, layout, dtype, offset=0.5), make(shape, layout, dtype)
    r = make(shape, layout, dtype) if residual else None
    w, b = torch.rand(c) + 0.5, torch.randn(c)
    for act, p in ACTS:
        def run():
            y, mean, var = ops.bn_act_forward(x, w, b, r, 1e-5, act, p)
            grads = ops.bn_act_backward(gy, x, w, b, r, mean, var, 1e-5, act, p)
            ss = ops.scale_shift_act(x, w, b, r, act, p)
            ss_grads = ops.scale_shift_act_backward(gy, x, w, b, r, act, p)
            return (y, mean, var, *grads, ss, *ss_grads)
        ref, vec = both_builds(run)
        assert_all_close(ref, vec, dtype, f"bn_act/scale_shift_act {act}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ("nchw", "channels_last"))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_se_block_default_and_avx2_agree(shape, layout, dtype, restore_capability):
    c, hidden = shape[1], 4
    x, r, gy = make(shape, layout, dtype), make(shape, layout, dtype), make(shape, layout, dtype)
    w1, b1 = (torch.randn(hidden, c) * 0.3).to(dtype), torch.randn(hidden).to(dtype)
    w2, b2 = (torch.randn(c, hidden) * 0.3).to(dtype), torch.randn(c).to(dtype)
    for act, p in (("relu", 0.0), ("silu", 0.0), ("identity", 0.0)):
        def run():
            y, pooled = ops.se_block_forward(x, w1, b1, w2, b2, r, act, p)
            return (y, pooled, *ops.se_block_backward(gy, x, pooled, w1, b1, w2, b2, r, act, p))
        ref, vec = both_builds(run)
        assert_all_close(ref, vec, dtype, f"se_block {act}")


@pytest.fixture
def restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("layout", ("nchw", "channels_last"))
def test_bn_act_results_do_not_depend_on_thread_count(layout, restore_threads):
    """The kernels split work into fixed chunks with their own partial sums (not one per
    thread), so 1 and 2 threads give bit-identical results; the shape spans several chunks."""
    shape = (8, 32, 16, 16)
    x, gy, r = make(shape, layout), make(shape, layout), make(shape, layout)
    w, b = torch.rand(32) + 0.5, torch.randn(32)

    def run():
        y, mean, var = ops.bn_act_forward(x, w, b, r, 1e-5, "relu", 0.0)
        return (y, mean, var, *ops.bn_act_backward(gy, x, w, b, r, mean, var, 1e-5, "relu", 0.0))

    torch.set_num_threads(1)
    one = run()
    torch.set_num_threads(2)
    two = run()
    for i, (u, v) in enumerate(zip(one, two)):
        assert torch.equal(u, v), f"output {i} differs between 1 and 2 threads"
