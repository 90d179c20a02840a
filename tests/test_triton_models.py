"""Zoo models built with ``fused=True`` (triton backend) match ``fused=False`` on one
training step at batch 2: logits, every parameter gradient and the BN running statistics.

The unfused model also runs in float64; the fused fp32 result must be as close to it as
the unfused fp32 model is (``assert_close`` of tests/op_cases.py): small-batch BN makes deep
nets' gradients sensitive to rounding, so a fixed tolerance would be either loose or flaky.

With ReLU (and max-pool) the comparison cannot be elementwise: a pre-activation within
~1e-6 of zero (a few per million) may land on the other side of the kink in one of the two
fp32 runs -- neither is wrong -- and reroute one gradient element, whose effect spreads
through every earlier layer. So each model is checked twice: with a smooth activation
(silu: same kernels, no kinks) elementwise as above, and with its ReLU by relative
Frobenius-norm error (a wiring bug gives O(1) errors, a kink flip ~1e-3).

The normal suite uses narrow / short variants of the same classes at 8x8 inputs (the
interpreter is slow); the named zoo models at 32x32 are marked slow.
"""
from __future__ import annotations

import copy

import pytest
import torch

import fastcnn
from fastcnn.layers import set_fused
from fastcnn.models.resnext import ResNeXt29

from op_cases import BACKENDS, assert_close

pytestmark = pytest.mark.triton


def _step(model, x, gy=None):
    model.train()
    torch.manual_seed(1)  # same dropout masks, if any
    y = model(x)
    if gy is None:
        gy = torch.randn(y.shape, device=y.device, generator=torch.Generator(y.device).manual_seed(2))
    y.backward(gy.to(y.dtype))
    return y, gy


def assert_norm_close(ours, ref64, what, floor, rtol=2e-2):
    """||ours - ref64|| <= rtol * ||ref64|| + floor (``floor``: 1e-4 of the model's largest
    gradient norm, for dead units whose true gradient is ~0)."""
    ours, ref64 = ours.detach().double(), ref64.detach().double()
    err = (ours - ref64).norm().item()
    scale = ref64.norm().item()
    assert err <= rtol * scale + floor, f"{what}: norm error {err:.3g} > {rtol} x {scale:.3g} + {floor:.3g}"


def check_model(model, hw, dev=None, batch=2, elementwise=True):
    dev = dev or BACKENDS["triton"].device
    model = model.to(dev)
    fused = set_fused(copy.deepcopy(model), True)
    ref64 = copy.deepcopy(model).double()
    x = torch.randn(batch, 3, hw, hw, device=dev)
    with fastcnn.use_backend("triton"):
        y, gy = _step(fused, x)
    y_ref, _ = _step(model, x, gy)
    y_64, _ = _step(ref64, x.double(), gy)
    floor = 1e-4 * max(p.grad.norm().item() for p in ref64.parameters())

    def check(a, a64, alp, what):
        if elementwise:
            assert_close(a, a64, torch.float32, what, alp)
        else:
            assert_norm_close(a, a64, what, floor)

    check(y, y_64, y_ref, "logits")
    params = zip(fused.named_parameters(), model.parameters(), ref64.parameters())
    for (name, p), p_ref, p_64 in params:
        check(p.grad, p_64.grad, p_ref.grad, f"grad of {name}")
    for (name, b), b_ref, b_64 in zip(fused.named_buffers(), model.buffers(), ref64.buffers()):
        if b.is_floating_point():
            check(b, b_64, b_ref, f"buffer {name}")
        else:
            assert torch.equal(b, b_ref), f"buffer {name}: {b} != {b_ref}"


SMALL = {
    "simplenet_310k": lambda act: fastcnn.create_model("simplenet_310k", act=act),
    "resnet20": lambda act: fastcnn.create_model("resnet20", act=act),
    "resnext29_c4_w4_1block": lambda act: ResNeXt29(cardinality=4, base_width=4, blocks_per_stage=1, act=act),
    "se_resnext29_c4_w4_1block": lambda act: ResNeXt29(cardinality=4, base_width=4, se=True, blocks_per_stage=1, act=act),
}


@pytest.mark.parametrize("name", list(SMALL))
def test_fused_model_matches_unfused_small(name):
    """Same model classes as the zoo (narrow ResNeXt / SE-ResNeXt), 8x8 inputs."""
    check_model(SMALL[name]("silu"), hw=8)
    check_model(SMALL[name]("relu"), hw=8, elementwise=False)


ZOO = ["simplenet", "resnet20", "resnext29_4x64d", "se_resnext29_4x64d"]


@pytest.mark.slow
@pytest.mark.parametrize("name", ZOO)
@pytest.mark.parametrize("act", ["silu", "relu"])
def test_fused_zoo_model_matches_unfused(name, act):
    check_model(fastcnn.create_model(name, act=act), hw=32, elementwise=act != "relu")


@pytest.mark.gpu
@pytest.mark.parametrize("name", ZOO)
@pytest.mark.parametrize("act", ["silu", "relu"])
def test_fused_zoo_model_matches_unfused_gpu(name, act):
    check_model(fastcnn.create_model(name, act=act), hw=32, dev="cuda", batch=32, elementwise=act != "relu")
