"""The extension's composite ops save what can have no rebuild recipe -- tensors they have just
created, and parameters -- past fastcnn.recompute's own saved-tensor hooks (csrc/include/
saved_hooks.h): only while those hooks are the innermost ones and nobody observes them, with
the same gradients and the same in-place checks; under anyone else's hooks every tensor still
goes through them."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import fastcnn
from fastcnn import recompute
from fastcnn.layers import BnAct, BnActConv, ConvAct, ConvBnAct, set_fused
from fastcnn.memory import SavedTensorCounter

pytestmark = pytest.mark.skipif(
    fastcnn.ops.dispatch.unavailable_reason("cpu", "conv_bn_act", "cpu") is not None
    or not hasattr(fastcnn.ops.extension_backend._extension()[0], "_set_recompute_pack_hook"),
    reason="the extension (cpu backend) is not built")

# per layer, the tensors its nodes save that may be an earlier layer's rebuildable output
# (its input; BnActConv's input twice: the BN node's and the convolution's rebuild recipe)
LAYERS = {
    "ConvBnAct": (lambda: ConvBnAct(4, 4), 1, 3),
    "ConvAct": (lambda: ConvAct(4, 4), 1, 3),
    "ConvAct-silu": (lambda: ConvAct(4, 4, act="silu"), 1, 4),
    "BnActConv": (lambda: BnActConv(4, 4), 2, 3),
    "BnAct": (lambda: BnAct(4), 1, 1),
}


def _stack(make, n=3):
    torch.manual_seed(0)
    model = nn.Sequential(*[make() for _ in range(n)])
    return set_fused(model.train(), True)


@pytest.fixture
def counted_pack(monkeypatch):
    """Counts the calls of fastcnn.recompute's pack hook, registered as the real one is."""
    calls = []
    real = recompute._pack
    monkeypatch.setattr(recompute, "_pack", lambda t: (calls.append(tuple(t.shape)), real(t))[1])
    recompute._sync_pack_hook()
    yield calls
    monkeypatch.undo()
    recompute._sync_pack_hook()


@pytest.mark.parametrize("layer", list(LAYERS))
def test_only_what_may_have_a_recipe_goes_through_the_hooks(layer, counted_pack):
    make, through_hooks, _ = LAYERS[layer]
    model = _stack(make)
    with fastcnn.use_backend("cpu"):
        y = model(torch.randn(2, 4, 5, 5))
    assert len(counted_pack) == through_hooks * 3
    y.sum().backward()


@pytest.mark.parametrize("layer", list(LAYERS))
def test_gradients_identical_with_and_without_saving_past_the_hooks(layer):
    make, _, _ = LAYERS[layer]
    x = torch.randn(2, 4, 5, 5)
    grads = []
    for observed in (False, True):  # observed: every tensor through the hooks
        recompute.set_observer((lambda t: None) if observed else None)
        try:
            model = _stack(make)
            with fastcnn.use_backend("cpu"):
                (model(x) * torch.linspace(0.5, 1.5, 25).view(1, 1, 5, 5)).sum().backward()
        finally:
            recompute.set_observer(None)
        grads.append([p.grad for p in model.parameters()])
    for a, b in zip(*grads):
        assert torch.equal(a, b)


@pytest.mark.parametrize("layer", ["ConvBnAct", "ConvAct", "ConvAct-silu", "BnActConv"])
def test_observed_hooks_see_every_saved_tensor(layer, counted_pack):
    make, _, per_layer = LAYERS[layer]
    model = _stack(make)
    with fastcnn.use_backend("cpu"), SavedTensorCounter():
        y = model(torch.randn(2, 4, 5, 5))
    assert len(counted_pack) == per_layer * 3
    y.sum().backward()
    with fastcnn.use_backend("cpu"):  # and past them again once nobody observes
        model(torch.randn(2, 4, 5, 5))
    assert len(counted_pack) == per_layer * 3 + LAYERS[layer][1] * 3


@pytest.mark.parametrize("layer", ["ConvBnAct", "ConvAct", "BnActConv"])
def test_other_hooks_see_every_saved_tensor(layer):
    make, _, per_layer = LAYERS[layer]
    lone = set_fused(make().train(), True)  # a lone layer: no rebuild hooks of its own
    seen = []
    with fastcnn.use_backend("cpu"), torch.autograd.graph.saved_tensors_hooks(
            lambda t: (seen.append(t), t)[1], lambda t: t):
        y = lone(torch.randn(2, 4, 5, 5))
    assert len(seen) == per_layer
    y.sum().backward()


@pytest.mark.parametrize("layer", ["ConvBnAct", "ConvAct", "BnActConv"])
def test_weight_changed_in_place_before_backward_is_an_error(layer):
    model = _stack(LAYERS[layer][0])
    with fastcnn.use_backend("cpu"):
        y = model(torch.randn(2, 4, 5, 5))
    with torch.no_grad():
        model[1].conv.weight.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


def test_frozen_convolution_and_input_without_grad():
    """The convolution's own node with a frozen weight, an input without grad, and a bias."""
    torch.manual_seed(0)
    ref = nn.Sequential(ConvAct(3, 4), ConvBnAct(4, 4, bias=True)).train()
    fused = set_fused(nn.Sequential(ConvAct(3, 4), ConvBnAct(4, 4, bias=True)).train(), True)
    fused.load_state_dict(ref.state_dict())
    for m in (ref, fused):
        m[1].conv.weight.requires_grad_(False)
    x = torch.randn(2, 3, 6, 6)
    with fastcnn.use_backend("cpu"):
        fused(x).square().sum().backward()
    ref(x).square().sum().backward()
    for (name, a), b in zip(ref.named_parameters(), fused.parameters()):
        assert (a.grad is None) == (b.grad is None), name
        if a.grad is not None:
            # (the bias before BN gets a gradient of zero up to rounding: BN removes the mean)
            torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-4, msg=name)
