"""The model zoo: every registered model against the spec table (parameter counts), forward and
backward on CPU, the ``act`` / ``num_classes`` / ``in_chans`` options, that every conv-BN-act,
pre-activation, conv+bias+act, grouped conv and SE block is a fusable layer, registry errors,
and that ``fused=True`` (reference backend) computes exactly what the unfused model does."""
from __future__ import annotations

import copy
import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastcnn
from fastcnn.layers import FUSABLE_LAYERS, BnAct, BnActConv, ConvAct, ConvBnAct, SqueezeExcite
from fastcnn.layers.activations import LambdaAct

# Trainable parameters from /work/shared/specs/architectures.md, at the default classes and
# input: (count, approximate?). Approximate ("~") entries must equal BUILT exactly and lie
# within 0.5% of the spec's figure.
SPEC = {
    "simplenet": (5_498_378, False),
    "simplenet_310k": (312_362, False),
    "simplenetv1_5m_m1": (5_752_808, False),
    "simplenetv1_5m_m2": (5_752_808, False),
    "simplenetv1_9m_m1": (9_508_968, False),
    "simplenetv1_9m_m2": (9_508_968, False),
    "simplenetv1_small_m1_05": (1_506_792, False),
    "simplenetv1_small_m2_05": (1_506_792, False),
    "simplenetv1_small_m1_075": (3_287_272, False),
    "simplenetv1_small_m2_075": (3_287_272, False),
    "allcnn_c": (1_369_738, False),
    "lenet5": (62_006, False),
    "nin": (969_822, True),
    "vgg19": (38_975_306, True),
    "resnet20": (269_722, False),
    "resnet32": (464_154, False),
    "resnet56": (853_018, False),
    "resnet110": (1_727_962, False),
    "resnet164": (1_703_258, False),
    "wrn16_8": (10_961_370, False),
    "wrn28_10": (36_479_194, False),
    "resnext29_4x64d": (17_562_442, False),
    "resnext29_8x64d": (34_426_698, False),
    "densenet_bc_100_12": (769_162, False),
    "densenet_bc_100_24": (3_020_506, False),
    "densenet_bc_160_24": (6_831_466, False),
    "se_resnext29_4x64d": (18_084_250, False),
    "shathenet_v1_0": (14_810, True),
    "shathenet_v1_1": (1_078_154, True),
    "shathenet_v1_2": (465_706, True),
}
# What this zoo builds for the "~" entries (exact).
BUILT = {"nin": 969_822, "vgg19": 38_975_306, "shathenet_v1_0": 14_810,
         "shathenet_v1_1": 1_078_154, "shathenet_v1_2": 465_706}

IMAGENET = [n for n in SPEC if n.startswith("simplenetv1_")]

# Smallest convenient input per model for the CPU forward/backward tests (default 8x8).
INPUT = {"lenet5": 32, "vgg19": 32, "allcnn_c": 16, "simplenet": 16, "simplenet_310k": 16,
         "shathenet_v1_0": 32, "shathenet_v1_1": 32, "shathenet_v1_2": 32,
         **{n: 32 for n in IMAGENET}}

# Convolutions that are deliberately not part of a fusable unit: the stems and projection
# shortcuts of pre-activation nets (nothing to fuse: a bare conv), and the first conv of a
# projection block, which follows a shared BnAct.
BARE_CONV_OK = {"resnet164", "wrn16_8", "wrn28_10", "densenet_bc_100_12", "densenet_bc_100_24",
                "densenet_bc_160_24"}

# Which fusable layers each family must use.
EXPECTED_LAYERS = {
    "simplenet": {ConvBnAct}, "allcnn": {ConvAct}, "lenet": {ConvAct}, "nin": {ConvBnAct},
    "vgg": {ConvBnAct}, "resnet": {ConvBnAct}, "preact_resnet": {BnAct, BnActConv},
    "wide_resnet": {BnAct, BnActConv}, "resnext": {ConvBnAct}, "densenet": {BnAct, BnActConv},
    "shathenet": {ConvAct}, "simplenet_imagenet": {ConvBnAct},
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Small-tensor CPU work on a shared, busy machine: intra-op threads only add contention
    (measured 10-30x slower with 2 threads under load), so this module runs on one."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
    default_model.cache_clear()


@functools.lru_cache(maxsize=None)
def default_model(name: str) -> nn.Module:
    """One default build per model for the read-only tests (building the big ones dominates)."""
    return fastcnn.create_model(name)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def input_for(name, batch=2, chans=3):
    s = INPUT.get(name, 8)
    return torch.randn(batch, chans, s, s)


def test_registry_has_every_spec_model():
    assert set(SPEC) <= set(fastcnn.list_models())
    assert fastcnn.list_models("resnext*") == ["resnext29_4x64d", "resnext29_8x64d"]


@pytest.mark.parametrize("alias,name", [("allcnn", "allcnn_c"), ("lenet", "lenet5"),
                                        ("resnext29", "resnext29_4x64d"),
                                        ("se_resnext29", "se_resnext29_4x64d"),
                                        ("densenet100", "densenet_bc_100_12"),
                                        ("simplenet_5m", "simplenet"), ("SimpleNet-5M", "simplenet")])
def test_aliases(alias, name):
    assert fastcnn.model_info(alias).name == name


@pytest.mark.parametrize("name", sorted(SPEC))
def test_param_count(name):
    model = default_model(name)
    count, approx = SPEC[name]
    built = n_params(model)
    info = fastcnn.model_info(name)
    assert info.params == built, "registry's params= must be the count the model builds"
    if approx:
        assert built == BUILT[name]
        assert abs(built - count) <= 0.005 * count
    else:
        assert built == count
    assert info.reported and info.source
    assert model.model_name == name


@pytest.mark.parametrize("name", sorted(SPEC))
def test_forward_backward(name):
    model = fastcnn.create_model(name).train()
    x = input_for(name)
    out = model(x)
    nc = 1000 if name in IMAGENET else 10
    assert out.shape == (2, nc)
    loss = F.cross_entropy(out, torch.tensor([1, 7]))
    assert torch.isfinite(loss)
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"no gradient for {missing[:5]}"
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("name", sorted(SPEC))
def test_num_classes_in_chans(name):
    model = fastcnn.create_model(name, num_classes=100, in_chans=1).eval()
    first = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    assert first.in_channels == 1
    with torch.no_grad():
        out = model(input_for(name, chans=1))
    assert out.shape == (2, 100) and torch.isfinite(out).all()
    assert model.input_size[0] == 1


@pytest.mark.parametrize("name", sorted(SPEC))
def test_act_replaces_every_relu(name):
    model = fastcnn.create_model(name, act="silu")
    assert not any(isinstance(m, nn.ReLU) for m in model.modules())
    assert any(isinstance(m, nn.SiLU) for m in model.modules())
    for m in model.modules():
        if isinstance(m, FUSABLE_LAYERS) and not isinstance(m.act, nn.Identity):
            assert isinstance(m.act, nn.SiLU), f"{type(m).__name__} kept {m.act}"


def _custom(x):
    return 1.3 * torch.sigmoid(x) * x


@pytest.mark.parametrize("act,act_type", [
    ("silu", nn.SiLU), ("leaky_relu", nn.LeakyReLU), ("elu", nn.ELU), ("gelu", nn.GELU),
    ("mish", nn.Mish), (lambda x: 1.3 * torch.sigmoid(x) * x, LambdaAct), (nn.Hardswish, nn.Hardswish),
])
@pytest.mark.parametrize("name", ["simplenet_310k", "resnet20", "densenet_bc_100_12", "lenet5"])
def test_act_variants(name, act, act_type):
    model = fastcnn.create_model(name, act=act).train()
    acts = [m.act for m in model.modules() if isinstance(m, FUSABLE_LAYERS)]
    assert acts and all(isinstance(a, act_type) for a in acts)
    out = model(input_for(name))
    out.square().mean().backward()
    assert torch.isfinite(out).all()
    assert all(p.grad is not None for p in model.parameters())


def test_custom_act_changes_output():
    """The act really is applied: same weights, relu vs 1.3*sigmoid(x)*x differ."""
    a = fastcnn.create_model("resnet20")
    b = fastcnn.create_model("resnet20", act=_custom)
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 3, 8, 8)
    a.eval(), b.eval()
    with torch.no_grad():
        assert not torch.allclose(a(x), b(x))


@pytest.mark.parametrize("name", sorted(SPEC))
def test_fusable_layers_used(name):
    model = default_model(name)
    family = fastcnn.model_info(name).family
    used = {type(m) for m in model.modules() if isinstance(m, FUSABLE_LAYERS)}
    assert EXPECTED_LAYERS[family] <= used
    # Every BatchNorm2d belongs to a fusable layer (no hand-written conv-BN-act anywhere).
    owned = {id(m.bn) for m in model.modules() if isinstance(m, FUSABLE_LAYERS) and hasattr(m, "bn")}
    stray_bn = [n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d) and id(m) not in owned]
    assert not stray_bn, stray_bn
    owned_convs = {id(m.conv) for m in model.modules() if isinstance(m, FUSABLE_LAYERS) and hasattr(m, "conv")}
    bare = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and id(m) not in owned_convs]
    if name in BARE_CONV_OK:
        assert all(n.endswith(("stem", "shortcut", "conv1")) for n in bare), bare
    else:
        assert not bare, bare


@pytest.mark.parametrize("name,groups", [("resnext29_4x64d", 4), ("resnext29_8x64d", 8),
                                         ("se_resnext29_4x64d", 4)])
def test_resnext_grouped_convs(name, groups):
    model = default_model(name)
    grouped = [m for m in model.modules() if isinstance(m, ConvBnAct) and m.conv.groups > 1]
    assert len(grouped) == 9 and all(m.conv.groups == groups for m in grouped)
    # D = cardinality x 64 x 2^stage input channels per grouped conv: 64*2^s per group.
    assert sorted({m.conv.in_channels // groups for m in grouped}) == [64, 128, 256]
    se = [m for m in model.modules() if isinstance(m, SqueezeExcite)]
    assert len(se) == (9 if name.startswith("se_") else 0)
    if se:
        assert all(m.fc1.out_features == m.fc1.in_features // 16 for m in se)
        assert all(isinstance(m.act, nn.ReLU) for m in se)


def test_simplenet_official_details():
    model = fastcnn.create_model("simplenet")
    units = [m for m in model.modules() if isinstance(m, ConvBnAct)]
    assert len(units) == 13
    for u in units:
        assert u.conv.bias is not None and u.conv.padding == (1, 1)
        assert u.bn.momentum == 0.05 and u.bn.eps == 1e-5
    assert [u.conv.kernel_size[0] for u in units].count(1) == 2
    # The padded 1x1 convs grow the map: 4x4 -> 6x6 -> 8x8 on a 32x32 input.
    sizes = []
    hooks = [u.register_forward_hook(lambda m, i, o: sizes.append(o.shape[-1])) for u in units]
    model.eval()(torch.randn(1, 3, 32, 32))
    for h in hooks:
        h.remove()
    assert sizes[-4:] == [4, 6, 8, 4]


@pytest.mark.parametrize("name", ["simplenetv1_5m_m1", "simplenetv1_5m_m2"])
def test_imagenet_simplenet_224(name):
    model = fastcnn.create_model(name).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 224, 224)).shape == (1, 1000)
    strided = [i for i, m in enumerate(m for m in model.modules() if isinstance(m, ConvBnAct))
               if m.conv.stride == (2, 2)]
    assert strided == ([0, 1, 2] if name.endswith("m1") else [0, 1, 3])


@pytest.mark.parametrize("name", ["simplenetv1_small_m1_05", "simplenetv1_small_m2_05"])
def test_imagenet_simplenet_smallest_input(name):
    """Documented limit: 25x25 is the smallest input (the second pool needs a 2x2 map)."""
    model = default_model(name).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 25, 25)).shape == (1, 1000)
        with pytest.raises(RuntimeError):
            model(torch.randn(1, 3, 24, 24))


def test_shathenet_upsamples_inside():
    model = fastcnn.create_model("shathenet_v1_2").eval()
    x = torch.randn(2, 3, 32, 32)
    up = F.interpolate(x, size=(64, 64), mode="bilinear", align_corners=False)
    with torch.no_grad():
        torch.testing.assert_close(model(x), model(up))
    big = fastcnn.create_model("shathenet_v1_2", img_size=128)
    assert n_params(big) > n_params(model)  # the flatten size follows the inner size
    with pytest.raises(ValueError, match="too small"):
        fastcnn.create_model("shathenet_v1_2", img_size=None)  # 32x32 as is: 1/64 of it


def test_resnet_option_a_shortcut():
    model = fastcnn.create_model("resnet20")
    assert not any(isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) for m in model.modules())
    from fastcnn.models.resnet import ShortcutA
    x = torch.randn(2, 16, 8, 8)
    y = ShortcutA(16, 32, 2)(x)
    assert y.shape == (2, 32, 4, 4)
    torch.testing.assert_close(y[:, 8:24], x[:, :, ::2, ::2])
    assert y[:, :8].abs().sum() == 0 and y[:, 24:].abs().sum() == 0


# --- registry errors ---------------------------------------------------------------------

def test_unknown_model_lists_close_names():
    with pytest.raises(ValueError, match=r"unknown model 'resnet21'.*Close names: .*resnet20"):
        fastcnn.create_model("resnet21")
    with pytest.raises(ValueError, match=r"Close names: .*densenet_bc_100_12"):
        fastcnn.create_model("densenet_bc_100_13")


@pytest.mark.parametrize("bad", [0, -3, 2.5, "10", True])
def test_bad_num_classes(bad):
    with pytest.raises(ValueError, match="num_classes must be a positive int"):
        fastcnn.create_model("lenet5", num_classes=bad)


def test_bad_in_chans():
    with pytest.raises(ValueError, match="in_chans must be a positive int"):
        fastcnn.create_model("lenet5", in_chans=0)


def test_unknown_kwarg():
    with pytest.raises(TypeError, match=r"simplenet got unknown argument\(s\) drop_rat; it accepts drop_rate"):
        fastcnn.create_model("simplenet", drop_rat=0.1)
    with pytest.raises(TypeError, match=r"resnet20 got unknown argument\(s\) drop_rate; it accepts no extra"):
        fastcnn.create_model("resnet20", drop_rate=0.1)


def test_bad_act():
    with pytest.raises(ValueError, match=r"unknown activation 'rellu'.*Did you mean relu"):
        fastcnn.create_model("resnet20", act="rellu")
    with pytest.raises(TypeError, match="not a module instance"):
        fastcnn.create_model("resnet20", act=nn.ReLU())
    with pytest.raises(TypeError, match="act must be"):
        fastcnn.create_model("resnet20", act=3)


# --- fused plumbing ------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["simplenet", "resnet20", "resnet164", "wrn16_8", "resnext29_4x64d",
                                  "se_resnext29_4x64d", "densenet_bc_100_12", "allcnn_c", "lenet5",
                                  "vgg19", "nin", "shathenet_v1_2", "simplenetv1_small_m2_05"])
def test_set_fused_keeps_state_dict(name):
    model = copy.deepcopy(default_model(name))
    keys = list(model.state_dict())
    fastcnn.set_fused(model, True)
    assert all(m.fused for m in model.modules() if isinstance(m, FUSABLE_LAYERS))
    assert list(model.state_dict()) == keys
    fused = fastcnn.create_model(name, fused=True)
    assert list(fused.state_dict()) == keys
    fused.load_state_dict(model.state_dict())  # strict: a checkpoint loads either way


FUSED_CASES = [("simplenet", {}), ("resnet20", {}), ("resnext29_4x64d", {}), ("se_resnext29_4x64d", {}),
               ("densenet_bc_100_12", {}), ("wrn16_8", {}), ("wrn16_8", {"drop_rate": 0.3}),
               ("allcnn_c", {}), ("resnet164", {}), ("shathenet_v1_2", {})]


@pytest.mark.parametrize("name,kwargs", FUSED_CASES, ids=[f"{n}{'-drop' if k else ''}" for n, k in FUSED_CASES])
def test_fused_matches_unfused_reference_backend(name, kwargs):
    """Same weights, train mode: fused (reference backend) == unfused for outputs, gradients
    and BN running statistics; dropout draws the same masks under the same seed."""
    ref = fastcnn.create_model(name, **kwargs).train()
    fused = fastcnn.set_fused(copy.deepcopy(ref), True)
    x = input_for(name)
    target = torch.tensor([3, 5])
    outs = []
    for model in (ref, fused):
        torch.manual_seed(1234)
        with fastcnn.use_backend("reference"):
            out = model(x)
            F.cross_entropy(out, target).backward()
        outs.append(out)
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)
    for (n, p), q in zip(ref.named_parameters(), fused.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=lambda m: f"{n}: {m}")
    for (n, b), c in zip(ref.named_buffers(), fused.buffers()):
        torch.testing.assert_close(c, b, rtol=1e-5, atol=1e-6, msg=lambda m: f"{n}: {m}")
