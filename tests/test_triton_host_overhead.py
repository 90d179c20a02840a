"""The host (Python) side of the Triton ops, on CPU, along the code path a GPU takes (kernel
launches replaced by counters; bench/bench_triton_host.py has the timings): how many kernels
each op launches, how many ATen calls (allocations, views, small reductions) it makes next to
them, and that the autotuners are consulted once per launch shape, not on every call.

These counts are the budget the "Design notes" sections of kernels/*.py describe; a change
that adds a launch or an allocation per call shows up here. For scale, eager conv + BN + ReLU
makes 4 ATen calls in eval (3 ops + the output allocation inside BN) and 13 in a training
step on the same tensors."""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

pytest.importorskip("triton")
from bench import bench_triton_host as bth  # noqa: E402

pytestmark = pytest.mark.triton

#: (case, mode) -> (forward launches, backward launches), as in the kernels' Design notes
LAUNCHES = {
    ("conv_bn_act", "train"): (3, 4), ("conv_bn_act", "eval"): (1, 0),
    ("conv_bn_act+res", "train"): (3, 4), ("conv_bn_act+res", "eval"): (1, 0),
    ("bn_act", "train"): (3, 2), ("bn_act", "eval"): (1, 0),
    ("conv_act", "train"): (1, 3), ("conv_act", "eval"): (1, 0),
    ("se_block", "train"): (3, 3), ("se_block", "eval"): (3, 0),
}

#: (case, mode) -> most ATen calls per op call (forward and backward, gradient accumulation
#: into the leaves' .grad included -- 4-5 of the training counts, as in eager's)
ATEN_CALLS = {
    ("conv_bn_act", "train"): 14, ("conv_bn_act", "eval"): 1,
    ("conv_bn_act+res", "train"): 16, ("conv_bn_act+res", "eval"): 1,
    ("bn_act", "train"): 10, ("bn_act", "eval"): 1,
    ("conv_act", "train"): 11, ("conv_act", "eval"): 1,
    ("se_block", "train"): 20, ("se_block", "eval"): 4,
}


@pytest.fixture(scope="module")
def host():
    with bth.measuring() as hm:
        yield hm


@pytest.mark.parametrize("case, mode", list(LAUNCHES))
def test_launches_per_call(host, case, mode):
    assert bth.launch_counts(case, mode) == LAUNCHES[(case, mode)]


class _AtenCalls(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("case, mode", list(ATEN_CALLS))
def test_aten_calls_per_call(host, case, mode):
    call = bth.make_case(case, mode)[0]["triton"]
    call()
    call()
    with _AtenCalls() as seen:
        call()
    assert len(seen.calls) <= ATEN_CALLS[(case, mode)], seen.calls


def test_autotuners_consulted_once_per_launch_shape(host, monkeypatch):
    """The first call of a shape goes through the autotuner (which keys, prunes, times and
    caches); later calls launch the chosen config from the op's plan cache."""
    from triton.runtime.autotuner import Autotuner

    from fastcnn.kernels import conv_gemm as cg
    for plans in (cg._FWD_PLANS, cg._DGRAD_PLANS, cg._WGRAD_PLANS):
        plans.clear()
    runs = []
    real = Autotuner.run
    monkeypatch.setattr(Autotuner, "run", lambda self, *a, **k: (runs.append(self), real(self, *a, **k))[1])
    calls = bth.make_case("conv_bn_act+res", "train")[0]
    calls["triton"]()
    first = len(runs)
    assert first == 3  # forward, input-gradient and weight-gradient GEMMs
    for _ in range(3):
        calls["triton"]()
    assert len(runs) == first


def test_channels_last_weights_are_not_copied(host):
    """The GEMMs read a channels_last weight in place: no ATen call at all for the weight."""
    from fastcnn.ops import triton_backend as tb

    x = torch.randn(2, 8, 4, 4).contiguous(memory_format=torch.channels_last)
    w = torch.randn(8, 8, 3, 3).contiguous(memory_format=torch.channels_last)
    bn = [torch.randn(8), torch.randn(8), torch.zeros(8), torch.ones(8)]
    kw = dict(stride=(1, 1), padding=(1, 1), dilation=(1, 1), groups=1, training=False, momentum=0.1,
              eps=1e-5, act="relu", act_param=0.0, residual=None)
    with torch.no_grad():
        tb.conv_bn_act(x, w, None, *bn, **kw)
        with _AtenCalls() as seen:
            tb.conv_bn_act(x, w, None, *bn, **kw)
    assert seen.calls == ["aten.empty.memory_format"]  # the output
