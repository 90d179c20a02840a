"""Shared layers: the fused path (run here on the reference backend, so only the plumbing is
tested: BN step counting, momentum, autocast, residual, custom activations) equals the
reference path, and both paths share one state_dict."""
import copy
import warnings

import pytest
import torch
from torch import nn

import fastcnn
from fastcnn.layers import BnAct, BnActConv, ConvAct, ConvBnAct, SqueezeExcite, create_act, set_fused


def _pair(layer):
    ref = layer
    fused = set_fused(copy.deepcopy(layer), True)
    return ref, fused


def _randomise_bn(m):
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.weight.data.uniform_(0.5, 1.5)
            mod.bias.data.normal_()
            mod.running_mean.normal_()
            mod.running_var.uniform_(0.5, 2.0)


LAYERS = [
    lambda: ConvBnAct(3, 6, 3, stride=2),
    lambda: ConvBnAct(4, 8, 3, groups=2, act="silu"),
    lambda: ConvBnAct(3, 5, 1, bias=True, act="leaky_relu", bn_momentum=None),
    lambda: BnAct(5, act="elu"),
    lambda: BnActConv(5, 7, 3, stride=1),
    lambda: ConvAct(3, 6, 5, padding=2, act="gelu"),
    lambda: SqueezeExcite(8, reduction=4, out_act="relu"),
]


def _in_chs(layer):
    first = next(m for m in layer.modules() if isinstance(m, (nn.Conv2d, nn.BatchNorm2d, nn.Linear)))
    return getattr(first, "in_channels", None) or getattr(first, "num_features", None) or first.in_features


@pytest.mark.parametrize("make", LAYERS)
@pytest.mark.parametrize("train", [True, False])
def test_fused_plumbing_matches_reference(make, train):
    ref, fused = _pair(make())
    _randomise_bn(ref)
    fused.load_state_dict(ref.state_dict())
    ref.train(train)
    fused.train(train)
    x = torch.randn(2, _in_chs(ref), 9, 9)
    xr, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
    with fastcnn.use_backend("reference"):
        for _ in range(2):  # two steps: running stats and num_batches_tracked accumulate
            yr, yf = ref(xr), fused(xf)
    torch.testing.assert_close(yf, yr)
    g = torch.randn_like(yr)
    yr.backward(g)
    yf.backward(g)
    torch.testing.assert_close(xf.grad, xr.grad)
    for (n, pr), (_, pf) in zip(ref.named_parameters(), fused.named_parameters()):
        torch.testing.assert_close(pf.grad, pr.grad, msg=n)
    for (n, br), (_, bf) in zip(ref.named_buffers(), fused.named_buffers()):
        torch.testing.assert_close(bf, br, msg=n)


@pytest.mark.parametrize("make", LAYERS)
def test_fused_layer_reads_parametrized_weights(make):
    """The fused path reads plain submodules' parameters from their dicts (cheaper than
    attributes); a parametrized submodule (weight norm here: its class is swapped) must still
    give its computed weight, as the unfused path does."""
    from torch.nn.utils.parametrizations import weight_norm

    ref = make()
    for m in list(ref.modules()):
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            weight_norm(m)
    ref, fused = _pair(ref)
    x = torch.randn(2, _in_chs(ref), 9, 9)
    with fastcnn.use_backend("cpu"):
        torch.testing.assert_close(fused(x), ref(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("make", [LAYERS[0], LAYERS[4]], ids=["ConvBnAct", "BnActConv"])
def test_hooked_submodules_run_unfused(make, monkeypatch):
    """A submodule with forward hooks -- pruning computes the weight in one, a feature extractor
    reads an activation in one -- cannot be bypassed by the fused kernels: the layer runs
    unfused (with one warning), so the hooks run and the result is the unfused one."""
    from torch.nn.utils import prune

    from fastcnn.layers import conv_bn_act

    monkeypatch.setattr(conv_bn_act, "_warned_hooks", set())  # warned once per process otherwise
    seen = []
    pair = []
    for _ in range(2):  # the same layer twice (a pruned module cannot be deep-copied)
        torch.manual_seed(0)
        layer = make()
        prune.l1_unstructured(layer.conv, "weight", amount=0.5)
        layer.act.register_forward_hook(lambda m, i, o: seen.append(o.shape))
        pair.append(layer)
    ref, fused = pair[0], set_fused(pair[1], True)
    x = torch.randn(2, _in_chs(ref), 9, 9)
    with pytest.warns(UserWarning, match="has module hooks"):
        y = fused(x)
    torch.testing.assert_close(y, ref(x))
    assert len(seen) == 2  # the fused copy's hook ran as well as the reference's
    with torch.no_grad():
        fused.conv.weight_orig.mul_(2.0)  # the pruned weight follows its original
        ref.conv.weight_orig.mul_(2.0)
    torch.testing.assert_close(fused(x), ref(x))


def test_backward_hooked_submodule_runs_unfused(monkeypatch):
    from fastcnn.layers import conv_bn_act

    monkeypatch.setattr(conv_bn_act, "_warned_hooks", set())
    ref = ConvBnAct(3, 6, 3)
    fused = set_fused(copy.deepcopy(ref), True)
    grads = []
    fused.bn.register_full_backward_hook(lambda m, gi, go: grads.append(go[0].shape))
    x = torch.randn(2, 3, 9, 9)
    with pytest.warns(UserWarning, match="ConvBnAct.bn has module hooks"):
        fused(x).sum().backward()
    assert grads == [torch.Size([2, 6, 9, 9])]


def test_residual_goes_before_activation():
    layer = ConvBnAct(4, 4, 3)
    x, res = torch.randn(2, 4, 6, 6), torch.randn(2, 4, 6, 6)
    expect = torch.relu(layer.bn(layer.conv(x)) + res)
    torch.testing.assert_close(layer(x, residual=res), expect)
    set_fused(layer, True)
    with fastcnn.use_backend("reference"):
        torch.testing.assert_close(layer(x, residual=res), torch.relu(layer.bn(layer.conv(x)) + res), rtol=1e-5, atol=1e-5)


def test_state_dict_keys_identical():
    a = ConvBnAct(3, 4)
    b = ConvBnAct(3, 4, fused=True)
    assert list(a.state_dict()) == list(b.state_dict())
    b.load_state_dict(a.state_dict())


def test_custom_activation_falls_back_with_one_warning():
    custom = lambda x: 1.3 * torch.sigmoid(x) * x  # noqa: E731  (SimpleNet-Keras example)
    ref = ConvBnAct(3, 4, act=custom)
    fused = set_fused(copy.deepcopy(ref), True)
    x = torch.randn(2, 3, 5, 5)
    with fastcnn.use_backend("reference"), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y1 = fused(x)
        fused(x)
    msgs = [str(w.message) for w in caught if "no fused kernel" in str(w.message)]
    assert len(msgs) == 1, msgs
    torch.testing.assert_close(y1, ref(x))


def test_autocast_bf16_fused_path_runs_in_bf16():
    layer = ConvBnAct(3, 4, fused=True)
    x = torch.randn(2, 3, 6, 6)
    with fastcnn.use_backend("reference"), torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    ref = ConvBnAct(3, 4)
    ref.load_state_dict(layer.state_dict())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        yr = ref(x)
    torch.testing.assert_close(y.float(), yr.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("model", ["resnet20", "densenet_bc_100_12", "lenet5", "se_resnext29_4x64d"])
def test_autocast_bf16_fused_model_trains(backend, model):
    """A whole fused model under bf16 autocast: after the first layer the activations already
    are bf16 (a layer must pass them on, not drop them), and every op kind of the zoo runs
    (conv+BN+act, pre-activation BN+act+conv, conv+act, SE block); the loss and the gradients
    agree with the unfused model under the same autocast."""
    if backend == "cpu":
        pytest.importorskip("fastcnn._C")
    torch.manual_seed(0)
    eager = fastcnn.create_model(model)
    fused = fastcnn.create_model(model, fused=True)
    fused.load_state_dict(eager.state_dict())
    size = fastcnn.model_info(model).input_size
    x = torch.randn(2, *size)
    y = torch.tensor([1, 3])
    losses = []
    for m in (eager, fused):
        with fastcnn.use_backend(backend), torch.autocast("cpu", dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(m(x), y)
        loss.backward()
        losses.append(loss.float())
    assert torch.isfinite(losses[1])
    torch.testing.assert_close(losses[1], losses[0], rtol=5e-2, atol=5e-2)
    for (name, p), q in zip(eager.named_parameters(), fused.parameters()):
        assert q.grad is not None and q.grad.dtype == p.dtype, name
        assert torch.isfinite(q.grad).all(), name


@pytest.mark.parametrize("name", ["relu", "leaky_relu", "elu", "silu", "gelu", "mish", "tanh", "identity"])
def test_activation_names(name):
    act = create_act(name)
    x = torch.randn(10)
    assert act(x).shape == x.shape


def test_activation_errors():
    with pytest.raises(ValueError, match="unknown activation 'rellu'. Did you mean relu"):
        create_act("rellu")
    with pytest.raises(TypeError, match="not a module instance"):
        create_act(nn.ReLU())
    with pytest.raises(TypeError, match="act must be a string"):
        create_act(3)


def test_activation_class_and_factory():
    assert isinstance(create_act(nn.SiLU), nn.SiLU)
    assert isinstance(create_act(lambda: nn.Hardswish()), nn.Hardswish)
