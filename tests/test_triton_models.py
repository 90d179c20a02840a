"""Zoo models built with ``fused=True`` (triton backend) match ``fused=False`` on one
training step at batch 2: logits, every parameter gradient and the BN running statistics.

The unfused model also runs in float64; the fused fp32 result must be as close to it as
the unfused fp32 model is (see ``assert_matches``): small-batch BN makes deep nets'
gradients sensitive to rounding, so a fixed tolerance would be either loose or flaky.

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

from test_triton_common import assert_matches, device

pytestmark = pytest.mark.triton


def _step(model, x, gy=None):
    model.train()
    torch.manual_seed(1)  # same dropout masks, if any
    y = model(x)
    if gy is None:
        gy = torch.randn(y.shape, device=y.device, generator=torch.Generator(y.device).manual_seed(2))
    y.backward(gy.to(y.dtype))
    return y, gy


def check_model(model, hw, dev=None, batch=2):
    dev = dev or device()
    model = model.to(dev)
    fused = set_fused(copy.deepcopy(model), True)
    ref64 = copy.deepcopy(model).double()
    x = torch.randn(batch, 3, hw, hw, device=dev)
    with fastcnn.use_backend("triton"):
        y, gy = _step(fused, x)
    y_ref, _ = _step(model, x, gy)
    y_64, _ = _step(ref64, x.double(), gy)
    assert_matches(y, y_64, y_ref, torch.float32, "logits")
    params = zip(fused.named_parameters(), model.parameters(), ref64.parameters())
    for (name, p), p_ref, p_64 in params:
        assert_matches(p.grad, p_64.grad, p_ref.grad, torch.float32, f"grad of {name}")
    for (name, b), b_ref, b_64 in zip(fused.named_buffers(), model.buffers(), ref64.buffers()):
        if b.is_floating_point():
            assert_matches(b, b_64, b_ref, torch.float32, f"buffer {name}")
        else:
            assert torch.equal(b, b_ref), f"buffer {name}: {b} != {b_ref}"


SMALL = {
    "simplenet_310k": lambda: fastcnn.create_model("simplenet_310k"),
    "resnet20": lambda: fastcnn.create_model("resnet20"),
    "resnext29_c4_w4_1block": lambda: ResNeXt29(cardinality=4, base_width=4, blocks_per_stage=1),
    "se_resnext29_c4_w4_1block": lambda: ResNeXt29(cardinality=4, base_width=4, se=True, blocks_per_stage=1),
}


@pytest.mark.parametrize("name", list(SMALL))
def test_fused_model_matches_unfused_small(name):
    """Same model classes as the zoo (narrow ResNeXt / SE-ResNeXt), 8x8 inputs."""
    check_model(SMALL[name](), hw=8)


ZOO = ["simplenet", "resnet20", "resnext29_4x64d", "se_resnext29_4x64d"]


@pytest.mark.slow
@pytest.mark.parametrize("name", ZOO)
def test_fused_zoo_model_matches_unfused(name):
    check_model(fastcnn.create_model(name), hw=32)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ZOO)
def test_fused_zoo_model_matches_unfused_gpu(name):
    check_model(fastcnn.create_model(name), hw=32, dev="cuda", batch=32)
