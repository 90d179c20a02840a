"""The direct Python entry points of ``fastcnn._C`` (csrc/python_calls.cpp): each gives what
its ``torch.ops.fastcnn.<op>.default`` overload gives -- outputs, gradients and running
statistics bit for bit -- and the public ops fall back to the overload exactly when the
``__torch_function__`` protocol has something to do."""
from __future__ import annotations

import pytest
import torch
from torch.overrides import TorchFunctionMode

from fastcnn.ops import extension_backend as eb

from test_extension_registration import op_cases

ext = pytest.importorskip("fastcnn._C", reason="the extension fastcnn._C is not built")

pytestmark = pytest.mark.extension

DIRECT = sorted(name for name in eb._CALL if hasattr(ext, f"call_{name}"))
CASES = [(name, args) for name, args in op_cases() if name in DIRECT]


def _fresh(args):
    """The case's arguments with fresh leaves (own gradients) and copies of mutable buffers."""
    out = []
    for a in args:
        if isinstance(a, torch.Tensor):
            b = a.detach().clone()
            out.append(b.requires_grad_() if a.requires_grad else b)
        else:
            out.append(a)
    return out


def _run(fn, args):
    outs = fn(*args)
    outs = outs if isinstance(outs, tuple) else (outs,)
    diff = [o for o in outs if o.requires_grad]
    if diff:
        torch.autograd.backward(diff[0], torch.ones_like(diff[0]))
    return outs, [a.grad if isinstance(a, torch.Tensor) and a.requires_grad else None for a in args], args


def test_every_composite_and_rebuild_has_an_entry_point():
    assert set(DIRECT) == set(eb._CALL), f"missing fastcnn._C.call_*: {set(eb._CALL) - set(DIRECT)}"
    assert all(eb._CALL[name] is getattr(ext, f"call_{name}") for name in DIRECT)


@pytest.mark.parametrize("case", range(len(CASES)), ids=[f"{n}-{i}" for i, (n, _) in enumerate(CASES)])
def test_entry_point_matches_op_overload(case):
    name, args = CASES[case]
    torch.manual_seed(0)
    ref_out, ref_grads, ref_args = _run(getattr(torch.ops.fastcnn, name).default, _fresh(args))
    out, grads, new_args = _run(getattr(ext, f"call_{name}"), _fresh(args))
    assert len(out) == len(ref_out)
    for a, b in zip(out, ref_out):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        assert a.requires_grad == b.requires_grad
    for a, b in zip(grads, ref_grads):
        if b is None:
            assert a is None
        else:
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    for a, b in zip(new_args, ref_args):  # running statistics updated alike
        if isinstance(b, torch.Tensor) and not b.requires_grad:
            torch.testing.assert_close(a, b, rtol=0, atol=0)


class _Recorder(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.seen.append(str(func))
        return func(*args, **(kwargs or {}))


def _layer_args():
    x = torch.randn(2, 4, 5, 5, requires_grad=True)
    w = torch.randn(4, 4, 3, 3, requires_grad=True)
    bw, bb = torch.rand(4, requires_grad=True), torch.rand(4, requires_grad=True)
    return x, w, bw, bb, torch.zeros(4), torch.ones(4)


def test_torch_function_mode_sees_the_op():
    """Under a TorchFunctionMode the public op goes through the overload, so the mode sees it."""
    x, w, bw, bb, rm, rv = _layer_args()
    with _Recorder() as rec:
        eb.conv_bn_act(x, w, None, bw, bb, rm, rv, padding=1)
        eb.bn_act(x, bw, bb, rm, rv)
    assert "fastcnn.conv_bn_act.default" in rec.seen
    assert "fastcnn.bn_act.default" in rec.seen


class _Tagged(torch.Tensor):
    """A subclass with its own __torch_function__ (it records every op it takes part in)."""
    calls: list = []

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        cls.calls.append(str(func))
        return super().__torch_function__(func, types, args, kwargs or {})


def test_torch_function_subclass_sees_the_op():
    x, w, bw, bb, rm, rv = _layer_args()
    _Tagged.calls.clear()
    eb.conv_bn_act(x.detach().as_subclass(_Tagged), w, None, bw, bb, rm, rv, padding=1)
    assert "fastcnn.conv_bn_act.default" in _Tagged.calls


def test_direct_path_taken_without_overrides(monkeypatch):
    """Plain tensors and parameters take the entry point (the overload is not called)."""
    x, w, bw, bb, rm, rv = _layer_args()
    calls = []
    direct = eb._CALL["conv_bn_act"]
    monkeypatch.setitem(eb._CALL, "conv_bn_act", lambda *a: calls.append(1) or direct(*a))
    eb.conv_bn_act(x, torch.nn.Parameter(w.detach()), None, bw, bb, rm, rv, padding=1)
    assert calls == [1]


def test_bad_argument_is_a_clear_error():
    x, w, bw, bb, rm, rv = _layer_args()
    with pytest.raises(TypeError, match="incompatible function arguments"):
        ext.call_conv_bn_act(x, "not a tensor", None, bw, bb, rm, rv, None, (1, 1), (1, 1), (1, 1), 1, True, 0.1,
                             1e-5, "relu", 0.0)
