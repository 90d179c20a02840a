"""The Triton ops launch on their tensors' GPU, not on the current one: a CPU test that the
device guard is entered exactly when needed (monkeypatched CUDA calls), and a two-GPU test."""
import contextlib

import pytest
import torch

import fastcnn
from fastcnn import ops
from fastcnn.ops import reference, triton_backend


class _Stand:
    """Stands in for a tensor on ``device`` (no GPU needed: the op itself is replaced)."""

    def __init__(self, device):
        self.device = torch.device(device)


@pytest.fixture
def guard_log(monkeypatch):
    """Current device 0; every ``torch.cuda.device(d)`` entered is logged, and each op records
    the device that was current when it ran."""
    log = {"entered": [], "ran_on": []}
    state = {"current": 0}

    @contextlib.contextmanager
    def fake_device(d):
        log["entered"].append(torch.device(d))
        before, state["current"] = state["current"], torch.device(d).index
        try:
            yield
        finally:
            state["current"] = before

    monkeypatch.setattr(torch.cuda, "current_device", lambda: state["current"])
    monkeypatch.setattr(torch.cuda, "device", fake_device)

    def fake_impl(op):
        def run(x, *args, **kwargs):
            log["ran_on"].append((op, state["current"] if x.device.type == "cuda" else "cpu"))
            return op
        return run

    monkeypatch.setattr(triton_backend, "_impl", fake_impl)
    return log


@pytest.mark.parametrize("op", ops.OPS)
def test_guard_entered_for_a_tensor_on_another_gpu(guard_log, op):
    assert getattr(triton_backend, op)(_Stand("cuda:1"), "arg", k=1) == op
    assert guard_log["entered"] == [torch.device("cuda:1")]
    assert guard_log["ran_on"] == [(op, 1)]  # launched with GPU 1 current


@pytest.mark.parametrize("device", ["cuda:0", "cpu"])
def test_guard_skipped_when_not_needed(guard_log, device):
    # already the current GPU, or not a GPU at all: no context switch, no CUDA call on CPU
    for op in ops.OPS:
        getattr(triton_backend, op)(_Stand(device))
    assert guard_log["entered"] == []
    assert [d for _, d in guard_log["ran_on"]] == [0 if device == "cuda:0" else "cpu"] * len(ops.OPS)


@pytest.mark.gpu
def test_triton_op_on_second_gpu_matches_reference():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA GPUs")
    dev = torch.device("cuda:1")
    torch.cuda.set_device(0)
    x = torch.randn(4, 16, 8, 8, device=dev, requires_grad=True)
    w = torch.randn(16, device=dev, requires_grad=True)
    b = torch.randn(16, device=dev, requires_grad=True)
    args = (torch.zeros(16, device=dev), torch.ones(16, device=dev))
    with fastcnn.use_backend("triton"):
        y = ops.bn_act(x, w, b, *args, training=True, act="relu")
    ref = reference.bn_act(x, w, b, torch.zeros(16, device=dev), torch.ones(16, device=dev),
                           training=True, momentum=0.1, eps=1e-5, act="relu", act_param=0.0, residual=None)
    assert y.device == dev and torch.cuda.current_device() == 0
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4)
    y.sum().backward()
    assert x.grad.device == dev and torch.isfinite(x.grad).all()
