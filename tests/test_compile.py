"""``torch.compile`` traces fused models whole (``fullgraph=True``): the extension ops have fake
implementations and autograd formulas, and the backend choice is resolved outside the traced
region. ``aot_eager`` runs the traced forward and backward graphs without code generation, so
this checks tracing, fake shapes and the autograd formulas quickly; the numbers must match the
unfused model."""
from __future__ import annotations

import pytest
import torch

import fastcnn

pytestmark = pytest.mark.extension


def _cpu_backend_built():
    return fastcnn.ops.dispatch.unavailable_reason("cpu", "conv_bn_act", "cpu") is None


@pytest.mark.skipif(not _cpu_backend_built(), reason="cpu backend (compiled extension) not built")
@pytest.mark.parametrize("name", ["resnet20", "densenet_bc_100_12"])
def test_fused_model_compiles_fullgraph_and_matches(name):
    torch._dynamo.reset()
    fused = fastcnn.create_model(name, fused=True).train()
    ref = fastcnn.create_model(name).train()
    ref.load_state_dict(fused.state_dict())
    x = torch.randn(2, 3, 32, 32)
    compiled = torch.compile(fused, backend="aot_eager", fullgraph=True)
    with fastcnn.use_backend("cpu"):
        y = compiled(x)
    (y * torch.arange(10.0)).sum().backward()
    y_ref = ref(x)
    (y_ref * torch.arange(10.0)).sum().backward()
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-4)
    for (n, p), p_ref in zip(fused.named_parameters(), ref.parameters()):
        # norm-relative: single elements of deep BN-net gradients at batch 2 are ill-conditioned
        err = ((p.grad - p_ref.grad).norm() / p_ref.grad.norm().clamp_min(1e-12)).item()
        assert err < 1e-3, f"gradient of {n}: relative error {err:.2e}"
    for b, b_ref in zip(fused.buffers(), ref.buffers()):
        torch.testing.assert_close(b, b_ref, rtol=1e-5, atol=1e-6)
