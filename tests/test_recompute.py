"""Fused models keep one activation per conv+BN+act layer for backward (fastcnn.recompute):
outputs and gradients identical with and without the rebuild hooks, the bytes kept measured
(fastcnn.memory), and the safety rules (in-place changes, no marks outside fused models)."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import fastcnn
from fastcnn import recompute
from fastcnn.layers import BnActConv, ConvBnAct, set_fused
from fastcnn.memory import SavedTensorCounter, saved_bytes


def _available(backend):
    op_ok = fastcnn.ops.dispatch.unavailable_reason(backend, "conv_bn_act", "cpu") is None
    return pytest.param(backend, marks=pytest.mark.skipif(not op_ok, reason=f"{backend} backend not available"))


BACKENDS = [_available("cpu"), _available("triton")]


def _small_net():
    return nn.Sequential(
        ConvBnAct(3, 8), ConvBnAct(8, 8, act="leaky_relu"), nn.MaxPool2d(2),
        ConvBnAct(8, 12, stride=2), BnActConv(12, 6, 1), ConvBnAct(6, 5, 1, act="silu"),
    )


def _run(state, x, backend, rebuild, make=_small_net):
    """Forward and backward of a fused ``make()`` net with the rebuild hooks on or off."""
    model = make()
    model.load_state_dict(state)
    set_fused(model.train(), True)
    if not rebuild:
        recompute.disable(model)
    with fastcnn.use_backend(backend):
        y = model(x)
        (y.square() * torch.linspace(0.5, 1.5, y.numel()).view_as(y)).sum().backward()
    return y, [p.grad for p in model.parameters()], model


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("channels_last", [False, True])
def test_rebuilt_activations_give_identical_gradients(backend, channels_last, monkeypatch):
    state = _small_net().state_dict()
    x = torch.randn(2, 3, 9, 9)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    rebuilds = []
    real_unpack = recompute._unpack
    monkeypatch.setattr(recompute, "_unpack", lambda p: (rebuilds.append(type(p)), real_unpack(p))[1])
    y_plain, g_plain, _ = _run(state, x, backend, rebuild=False)
    assert not rebuilds
    y, g, model = _run(state, x, backend, rebuild=True)
    # conv2, max-pool, the BN of the BnActConv and its conv read rebuilt inputs
    assert sum(1 for t in rebuilds if t is recompute._Rebuild) == 4
    assert torch.equal(y, y_plain)
    for (name, _), a, b in zip(model.named_parameters(), g, g_plain):
        assert torch.equal(a, b), f"gradient of {name} differs when activations are rebuilt"


@pytest.mark.parametrize("backend", BACKENDS)
def test_chain_keeps_one_activation_per_layer(backend):
    depth, c, hw, n = 4, 8, 8, 2
    act_bytes = n * c * hw * hw * 4
    x = torch.randn(n, c, hw, hw)

    def chain(fused):
        torch.manual_seed(0)
        return set_fused(nn.Sequential(*[ConvBnAct(c, c) for _ in range(depth)]).train(), fused)

    plain = saved_bytes(chain(False), x)
    with fastcnn.use_backend(backend):
        fused = saved_bytes(chain(True), x)
    # plain PyTorch: the conv input (= previous ReLU output), BN input and ReLU output
    assert plain >= 2 * depth * act_bytes
    # fused: each layer's conv output z, plus the network input; the rest are C-sized vectors
    assert (depth + 1) * act_bytes <= fused <= (depth + 1) * act_bytes + 64 * depth * c * 4


@pytest.mark.parametrize("name, at_most", [("simplenet_310k", 0.6), ("vgg19", 0.65), ("resnet20", 0.8),
                                           ("densenet_bc_100_12", 0.2), ("allcnn_c", 1.0)])
def test_zoo_models_keep_less(name, at_most):
    """Measured on the compiled cpu backend: the fraction of the unfused model's saved bytes
    that the fused model keeps (SimpleNet ~0.55, VGG-19 ~0.59, ResNet-20 ~0.75, DenseNet-BC-100 ~0.14, All-CNN-C ~1)."""
    if fastcnn.ops.dispatch.unavailable_reason("cpu", "conv_bn_act", "cpu") is not None:
        pytest.skip("cpu backend (compiled extension) not built")
    x = torch.randn(4, 3, 32, 32)
    torch.manual_seed(0)
    plain = saved_bytes(fastcnn.create_model(name).train(), x)
    torch.manual_seed(0)
    with fastcnn.use_backend("cpu"):
        fused = saved_bytes(fastcnn.create_model(name, fused=True).train(), x)
    assert fused <= at_most * plain, f"{name}: fused keeps {fused} bytes, unfused {plain}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_tensor_changed_in_place_is_saved_not_rebuilt(backend):
    """y.mul_(2) after the layer: the consumer must see (and differentiate through) the
    changed values, so the hook keeps the tensor itself."""
    torch.manual_seed(0)
    first, second = ConvBnAct(3, 4), ConvBnAct(4, 4, act="identity")

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.first, self.second = first, second

        def forward(self, x):
            y = self.first(x)
            y.mul_(2)
            return self.second(y)

    net = Net().train()
    ref = Net().train()
    ref.load_state_dict(net.state_dict())
    x = torch.randn(2, 3, 6, 6)
    set_fused(net, True)
    with fastcnn.use_backend(backend):
        out = net(x)
        out.pow(2).sum().backward()
    out_ref = ref(x)
    out_ref.pow(2).sum().backward()
    torch.testing.assert_close(out, out_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(net.second.conv.weight.grad, ref.second.conv.weight.grad, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nothing_marked_outside_a_fused_model_or_without_grad(backend):
    layer = ConvBnAct(3, 4, fused=True).train()  # a standalone layer: no model-level hooks
    x = torch.randn(2, 3, 5, 5)
    with fastcnn.use_backend(backend):
        y = layer(x)
        assert not hasattr(y, "_fastcnn_rebuild") and not hasattr(y._base, "_fastcnn_rebuild")
        model = set_fused(nn.Sequential(ConvBnAct(3, 4)).train(), True)
        with torch.no_grad():
            y = model(x)
        root = y if y._base is None else y._base
        assert not hasattr(root, "_fastcnn_rebuild")
    assert not recompute.active()


def test_lone_one_op_layers_get_no_hooks():
    """set_fused on a lone layer that is one fused op installs no rebuild hooks (nothing inside
    it could keep a recipe) -- the pre-activation unit BnActConv included, one composed op; a
    layer whose fused path is two ops (an activation applied after the kernel) and any
    container get them."""
    from fastcnn.layers import BnAct, ConvAct, GlobalAvgPool2d, MaxPool2d, SqueezeExcite

    def hooked(m):
        return getattr(set_fused(m, True), recompute._HANDLES, None) is not None

    for lone in (ConvBnAct(4, 4), BnAct(4), ConvAct(4, 4), SqueezeExcite(8, reduction=4), MaxPool2d(2),
                 GlobalAvgPool2d(), BnActConv(4, 4)):
        assert not hooked(lone), type(lone).__name__
    assert hooked(BnActConv(4, 4, act="tanh"))
    assert hooked(ConvBnAct(4, 4, act="tanh"))  # tanh runs after the kernel and saves its input
    assert hooked(nn.Sequential(ConvBnAct(4, 4)))
    layer = set_fused(nn.Sequential(ConvBnAct(4, 4)), True)[0]
    assert not hooked(layer)  # a layer inside a model: the model holds the hooks, not the layer


def test_hooks_are_removed_and_released_after_an_error():
    model = set_fused(nn.Sequential(ConvBnAct(3, 4)).train(), True)
    with pytest.raises(ValueError, match="5 channels"):
        model(torch.randn(2, 5, 4, 4))  # wrong channel count: fails inside the forward
    assert not recompute.active()
    set_fused(model, False)
    assert not model._forward_pre_hooks and not model._forward_hooks


def test_counter_counts_distinct_storages():
    x = torch.randn(3, 4, requires_grad=True)
    with SavedTensorCounter() as counter:
        y = x.exp()  # exp saves its result
        z = x * x    # mul saves x (twice, one storage)
    (y.sum() + z.sum()).backward()
    assert counter.tensors == 2 and counter.bytes == 2 * 3 * 4 * 4


def test_fused_model_still_pickles_and_copies(tmp_path):
    import copy

    model = fastcnn.create_model("resnet20", fused=True)
    clone = copy.deepcopy(model)
    torch.save(model, tmp_path / "model.pt")
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)
    x = torch.randn(2, 3, 32, 32)
    for m in (clone, loaded):
        assert m._forward_pre_hooks and m._forward_hooks  # the rebuild hooks came along
        torch.testing.assert_close(m.eval()(x), model.eval()(x))
        set_fused(m, False)
        assert not m._forward_pre_hooks and not m._forward_hooks
    assert model._forward_pre_hooks  # the original keeps its own


@pytest.mark.parametrize("name", ["densenet_bc_100_12", "simplenet_310k", "wrn16_8", "resnet20"])
def test_zoo_model_gradients_identical_with_rebuilds(name):
    if fastcnn.ops.dispatch.unavailable_reason("cpu", "conv_bn_act", "cpu") is not None:
        pytest.skip("cpu backend (compiled extension) not built")
    x = torch.randn(2, 3, 32, 32)
    grads = []
    for rebuild in (True, False):
        torch.manual_seed(0)
        model = fastcnn.create_model(name, fused=True).train()
        if not rebuild:
            recompute.disable(model)
        with fastcnn.use_backend("cpu"):
            (model(x) * torch.arange(10.0)).sum().backward()
        grads.append([p.grad for p in model.parameters()])
    for a, b in zip(*grads):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layer", ["ConvBnAct", "ConvAct", "BnAct"])
def test_fused_outputs_can_be_changed_in_place(backend, layer):
    """Fused outputs own their storage: ``relu_`` / ``mul_`` on them work as on unfused
    outputs, and gradients stay right (or autograd refuses, never silently wrong)."""
    from fastcnn.layers import BnAct, ConvAct

    torch.manual_seed(0)
    make = {"ConvBnAct": lambda: ConvBnAct(3, 4), "ConvAct": lambda: ConvAct(3, 4),
            "BnAct": lambda: BnAct(3)}[layer]
    fused, ref = make().train(), make().train()
    ref.load_state_dict(fused.state_dict())
    fused.fused = True
    x = torch.randn(2, 3, 5, 5)
    y_ref = ref(x) * -2.0  # a sign flip: a stale activation mask would show
    y_ref.sum().backward()
    with fastcnn.use_backend(backend):
        y = fused(x)
        y.mul_(-2.0)
        try:
            y.sum().backward()
        except RuntimeError as e:  # refusing is right when the op saved its output
            assert "modified by an inplace operation" in str(e)
            return
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-4)
    for p, p_ref in zip(fused.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-3, atol=1e-3)


class _ResidualNet(nn.Module):
    """Three post-activation residual units, a max-pool and an SE tail with a residual: every
    output but the first unit's input is marked rebuildable, most with a residual recipe."""

    def __init__(self):
        super().__init__()
        from fastcnn.layers import SqueezeExcite

        self.stem = ConvBnAct(3, 8)
        self.units = nn.ModuleList([ConvBnAct(8, 8) for _ in range(3)])
        self.last = ConvBnAct(8, 8, act=None)
        self.se = SqueezeExcite(8, reduction=4, out_act="relu")

    def forward(self, x):
        x = self.stem(x)
        for unit in self.units:
            x = unit(x, residual=x)
        return self.se(self.last(x), residual=x)


@pytest.mark.parametrize("backend", BACKENDS)
def test_residual_outputs_rebuilt_give_identical_gradients(backend, monkeypatch):
    torch.manual_seed(0)
    state = _ResidualNet().state_dict()
    x = torch.randn(2, 3, 6, 6)
    rebuilt = []
    real_get = recompute.Recipe.get
    monkeypatch.setattr(recompute.Recipe, "get", lambda self: (rebuilt.append(self.depth), real_get(self))[1])
    results = []
    for rebuild in (False, True):
        y, grads, model = _run(state, x, backend, rebuild, make=_ResidualNet)
        results.append((y, grads))
        if not rebuild:
            assert not rebuilt
    # the residual units chain: a recipe of depth >= 4 (stem, 3 units) was rebuilt
    assert rebuilt and max(rebuilt) >= 4
    (y0, g0), (y1, g1) = results
    assert torch.equal(y0, y1)
    for (name, _), a, b in zip(model.named_parameters(), g1, g0):
        assert torch.equal(a, b), f"gradient of {name} differs when activations are rebuilt"


def _marked(t):
    root = t if t._base is None else t._base
    return getattr(root, "_fastcnn_rebuild", None)


def test_recipes_hold_recipes_of_their_inputs_not_the_tensors():
    """A recipe whose input is rebuildable holds the input's recipe: once the forward drops
    its references, a concatenation that a BN+act recipe needs is freed (the DenseNet case)."""
    from fastcnn.memory import MemoryTracker

    model = set_fused(nn.Sequential(BnActConv(8, 4, 1)).train(), True)
    parts = [torch.randn(2, 4, 8, 8, requires_grad=True) for _ in range(2)]
    with MemoryTracker() as mt:
        with recompute.rebuild_saved_activations():
            cat = recompute.cat(parts)
            assert _marked(cat) is not None
            cat_bytes = cat.untyped_storage().nbytes()
            out = model[0](cat)
        before = mt.live
        del cat
        assert before - mt.live == cat_bytes  # nothing but the graph's recipes referred to it
    out.sum().backward()
    ref = [p.detach().clone().requires_grad_() for p in parts]
    model_ref = set_fused(nn.Sequential(BnActConv(8, 4, 1)).train(), True)
    model_ref.load_state_dict(model.state_dict())  # BN in training uses batch statistics
    recompute.disable(model_ref)
    model_ref(torch.cat(ref, 1)).sum().backward()
    for p, q in zip(parts, ref):
        assert torch.equal(p.grad, q.grad)


def test_chains_are_cut_at_max_depth(monkeypatch):
    monkeypatch.setattr(recompute, "MAX_DEPTH", 3)
    x = torch.randn(4, requires_grad=True)
    depths = []
    with recompute.rebuild_saved_activations():
        y = x * 1.0
        for _ in range(5):
            z = y * 2.0
            depths.append(recompute.mark_rebuildable(z, torch.mul, y, 2.0) and _marked(z).depth)
            y = z
    # x is a plain tensor: depth 1, 2, 3, then the chain is cut (kept), then a new chain starts
    assert depths == [1, 2, 3, False, 1]


def test_input_changed_in_place_after_capture_is_a_clear_error():
    x = torch.randn(3, 4, requires_grad=True)
    with recompute.rebuild_saved_activations():
        base = x * 1.0
        y = base * 3.0
        recompute.mark_rebuildable(y, torch.mul, base, 3.0)
        out = (y * x).sum()  # mul saves y: kept as a recipe that holds base as is
    del y  # while y itself is alive (and unchanged) the recipe returns it instead
    with torch.no_grad():
        base.add_(1.0)
    with pytest.raises(RuntimeError, match="changed in place between forward and backward"):
        out.backward()


def test_kept_tensor_changed_in_place_before_backward_is_an_error():
    """Saved-tensor hooks turn off autograd's check of saved tensors; the hooks make it
    themselves for what they keep as is: a unit's input changed in place after the unit (and
    before backward) is the error unfused PyTorch gives, not silently wrong gradients."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.u, self.v = BnActConv(4, 4, 3), BnActConv(4, 4, 3)

        def forward(self, x):
            h = x * 1.0
            y = self.u(h)
            h.mul_(2.0)
            return self.v(y) + h.sum()

    for fused in (False, True):
        model = set_fused(Net().train(), fused)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            model(torch.randn(2, 4, 8, 8, requires_grad=True)).sum().backward()


def test_eval_forward_then_training_forward_then_backward():
    """In eval the pre-activation unit keeps its BN+activation output (rebuilding it would read
    running statistics that a training forward before backward changes): the convolution's
    weight gradient is the unfused one."""
    torch.manual_seed(0)
    ref = nn.Sequential(BnActConv(4, 4, 3), BnActConv(4, 4, 3))
    fused = set_fused(copy.deepcopy(ref), True)
    x = torch.randn(2, 4, 8, 8, requires_grad=True)
    for model in (ref, fused):
        model.eval()
        loss = model(x).sum()
        model.train()
        model(x * 3 + 1)
        loss.backward()
    torch.testing.assert_close(fused[1].conv.weight.grad, ref[1].conv.weight.grad, rtol=1e-4, atol=1e-4)
