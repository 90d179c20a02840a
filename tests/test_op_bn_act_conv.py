"""``fastcnn.ops.bn_act_conv`` -- conv(act(BN(x))) + bias [+ residual], the pre-activation unit
composed of ``bn_act`` and ``conv_act`` (fastcnn/ops/composed.py) -- on every backend against
the reference (tests/op_cases.py): output, gradients and running statistics, training and eval;
then what the extension does its own way: one composite op whose convolution node rebuilds the
BN+activation output h in backward instead of keeping it (csrc/ops/conv_layers/bn_act_conv.cpp),
bit for bit what keeping it gives; and how the composed op resolves."""
from __future__ import annotations

import pytest
import torch

import fastcnn
from fastcnn import ops
from fastcnn.ops import composed, dispatch

from op_cases import backend, backends, check_op, make, tensor  # noqa: F401

OP = "bn_act_conv"


def _tensors(dev, n, cin, h, w, cout, k, s, p, g, dtype, layout, bias, res, train):
    oh, ow = (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
    return dict(
        x=make((n, cin, h, w), layout, dtype, dev, requires_grad=True),
        bn_weight=tensor(cin, device=dev, scale=0.5, offset=1.0, requires_grad=True),
        bn_bias=tensor(cin, device=dev, requires_grad=True),
        running_mean=tensor(cin, device=dev, scale=0.1),
        running_var=tensor(cin, device=dev, uniform=True, offset=0.5),
        weight=tensor(cout, cin // g, k, k, dtype=dtype, device=dev, scale=(cin // g * k * k) ** -0.5,
                      requires_grad=True),
        bias=tensor(cout, dtype=dtype, device=dev, requires_grad=True) if bias else None,
        residual=make((n, cout, oh, ow), layout, dtype, dev, requires_grad=True) if res else None,
    ), dict(stride=s, padding=p, groups=g, training=train)


# n, cin, h, w, cout, k, stride, pad, groups, act, act_param, dtype, layout, bias, residual, training
CASES = [
    (2, 5, 7, 7, 6, 3, 1, 1, 1, "relu", 0.0, torch.float32, "nchw", False, False, True),
    (2, 8, 9, 9, 4, 1, 1, 0, 1, "relu", 0.0, torch.float32, "channels_last", False, True, True),
    (1, 6, 9, 7, 6, 3, 2, 1, 2, "silu", 0.0, torch.float32, "strided", True, False, True),
    (2, 4, 7, 7, 4, 3, 1, 1, 1, "leaky_relu", 0.2, torch.float32, "nchw", False, True, False),
    (2, 8, 7, 7, 12, 3, 1, 1, 4, "relu", 0.0, torch.bfloat16, "channels_last", False, True, True),
]


@backends()
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[1]}to{c[4]}-k{c[5]}s{c[6]}g{c[8]}-{c[9]}-"
                         f"{str(c[11])[6:]}-{c[12]}{'-bias' if c[13] else ''}{'-res' if c[14] else ''}-"
                         f"{'train' if c[15] else 'eval'}")
def test_matches_reference(backend, case):
    n, cin, h, w, cout, k, s, p, g, act, ap, dtype, layout, bias, res, train = case
    tensors, options = _tensors(backend.device, n, cin, h, w, cout, k, s, p, g, dtype, layout, bias, res, train)
    check_op(backend, OP, tensors, act=act, act_param=ap, **options)


def test_errors_name_the_argument():
    t, _ = _tensors("cpu", 2, 5, 7, 7, 6, 3, 1, 1, 1, torch.float32, "nchw", False, False, True)
    with pytest.raises(ValueError, match="x has 5 channels but weight expects 4"):
        ops.bn_act_conv(**{**t, "weight": torch.randn(6, 4, 3, 3)})
    with pytest.raises(ValueError, match="residual has shape"):
        ops.bn_act_conv(**{**t, "residual": torch.randn(2, 6, 5, 5)}, padding=1)
    with pytest.raises(ValueError, match="running_mean has 4 elements"):
        ops.bn_act_conv(**{**t, "running_mean": torch.zeros(4)})


# =========================================================================== the extension's composite



def _composite(x, t, rebuild, training):
    return torch.ops.fastcnn.bn_act_conv.default(
        x, t["bn_weight"], t["bn_bias"], t["running_mean"], t["running_var"], t["weight"], t["bias"],
        t["residual"], [1, 1], [1, 1], [1, 1], 1, training, 0.1, 1e-5, "relu", 0.0, rebuild)


@pytest.mark.extension
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("training", [True, False])
def test_rebuilt_h_gives_the_gradients_of_kept_h_bit_for_bit(layout, training):
    """The convolution node rebuilds h = relu(BN(x)) in backward (rebuild=True) and keeps
    nothing of h's size but x; the gradients equal keeping h (rebuild=False) exactly."""
    pytest.importorskip("fastcnn._C")
    import fastcnn.ops.extension_backend  # noqa: F401  (loads the ops)

    results = {}
    for rebuild in (True, False):
        torch.manual_seed(0)
        t, _ = _tensors("cpu", 2, 6, 8, 8, 6, 3, 1, 1, 1, torch.float32, layout, True, True, training)
        x = t.pop("x")
        saved = []

        def pack(s):
            saved.append(s)
            return s

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda s: s):
            y = _composite(x, {**t, "x": x}, rebuild, training)
        # activation-sized tensors kept for backward: x alone (by both nodes) or x and h
        big = {s.untyped_storage().data_ptr() for s in saved if s.numel() == x.numel()}
        assert big == ({x.untyped_storage().data_ptr()} if rebuild else big), big
        assert len(big) == (1 if rebuild else 2), f"rebuild={rebuild}: {len(big)} activation storages kept"
        g = torch.randn_like(y)
        y.backward(g)
        results[rebuild] = [y.detach(), x.grad] + [t[k].grad for k in ("bn_weight", "bn_bias", "weight", "bias",
                                                                         "residual")]
    for a, b in zip(results[True], results[False]):
        assert torch.equal(a, b)


@pytest.mark.extension
def test_changed_input_is_caught_at_rebuild():
    pytest.importorskip("fastcnn._C")
    import fastcnn.ops.extension_backend  # noqa: F401

    t, _ = _tensors("cpu", 2, 6, 8, 8, 6, 3, 1, 1, 1, torch.float32, "nchw", False, False, True)
    x = t["x"].detach().clone().requires_grad_()
    h = x * 1.0  # a non-leaf input, changed in place after the op
    y = _composite(h, t, True, True)
    h.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


@pytest.mark.extension
def test_bn_parameters_changed_before_backward_is_an_error():
    pytest.importorskip("fastcnn._C")
    import fastcnn.ops.extension_backend  # noqa: F401

    t, _ = _tensors("cpu", 2, 6, 8, 8, 6, 3, 1, 1, 1, torch.float32, "nchw", False, False, True)
    y = _composite(t["x"], t, True, True)
    with torch.no_grad():
        t["bn_weight"].mul_(2.0)
    with pytest.raises(RuntimeError, match="modified in place between forward and backward"):
        y.sum().backward()


@pytest.mark.extension
def test_convolution_node_backward_twice_and_retain_graph():
    pytest.importorskip("fastcnn._C")
    import fastcnn.ops.extension_backend  # noqa: F401

    t, _ = _tensors("cpu", 2, 6, 8, 8, 6, 3, 1, 1, 1, torch.float32, "nchw", False, False, True)
    y = _composite(t["x"], t, True, True)
    assert y.grad_fn.name() == "fastcnn::ConvOfRebuiltBackward"
    g = torch.randn_like(y)
    y.backward(g, retain_graph=True)
    first = t["weight"].grad.clone()
    t["weight"].grad = None
    y.backward(g)
    assert torch.equal(t["weight"].grad, first)
    with pytest.raises(RuntimeError, match="a second time"):
        y.backward(g)


# =========================================================================== resolution

def test_composed_op_resolves_to_the_backends_own_or_the_chain(monkeypatch):
    """Both parts on one backend that has the composed op: its own; otherwise the parts
    chained (here: the reference's bn_act with the cpu backend's conv_act)."""
    pytest.importorskip("fastcnn._C")
    from fastcnn.ops import extension_backend as eb

    with fastcnn.use_backend("cpu"):
        assert dispatch.implementation(OP, "cpu") is eb.bn_act_conv
    real = dispatch.resolve
    mixed = lambda op, dev: ("reference", dispatch._module("reference").bn_act) if op == "bn_act" else real(op, dev)  # noqa: E731
    monkeypatch.setattr(dispatch, "resolve", mixed)
    dispatch.clear_cache()
    with fastcnn.use_backend("cpu"):
        fn = dispatch.implementation(OP, "cpu")
    dispatch.clear_cache()
    assert fn is not eb.bn_act_conv and fn.__qualname__.startswith("chain")
    t, o = _tensors("cpu", 2, 5, 7, 7, 6, 3, 1, 1, 1, torch.float32, "nchw", False, True, True)
    ref = {k: (v.detach().clone() if v is not None else None) for k, v in t.items()}
    y = fn(**{k: v for k, v in t.items() if k != "residual"}, residual=t["residual"], stride=(1, 1), padding=(1, 1),
           dilation=(1, 1), groups=1, training=True, momentum=0.1, eps=1e-5, act="relu", act_param=0.0)
    y_ref = dispatch._module("reference").bn_act_conv(**{k: v for k, v in ref.items() if k != "residual"},
                                                       residual=ref["residual"], padding=1)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)


def test_chain_refuses_unknown_ops():
    with pytest.raises(ValueError, match="no composed op 'conv_conv'"):
        composed.chain("conv_conv", None, None)
