"""A fused training step never waits for the device: no op that copies a device value to the
host (``.item()``, data-dependent shapes, comparisons read on the host) runs in forward,
backward or the optimizer step. On a GPU such an op stalls the CPU until every queued kernel
has finished, and it makes the step impossible to capture in a CUDA graph. Checked on CPU
through the dispatcher, which sees the same ops a GPU run would issue."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import fastcnn
from fastcnn.layers import ConvBnAct, BnActConv, set_fused
from fastcnn.layers.squeeze_excite import SqueezeExcite

#: ops that read a tensor's value on the host or produce a data-dependent shape
SYNCING = {"aten::_local_scalar_dense", "aten::item", "aten::is_nonzero", "aten::equal", "aten::allclose",
           "aten::nonzero", "aten::masked_select", "aten::_unique2", "aten::unique_consecutive",
           "aten::unique_dim"}


class FailOnHostSync(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func._schema.name in SYNCING:
            raise AssertionError(f"{func._schema.name} in a fused training step: it waits for the device")
        return func(*args, **(kwargs or {}))


def _step(model, x, y, opt):
    loss = F.cross_entropy(model(x), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def _check(model, x, y, backend):
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with fastcnn.use_backend(backend):
        _step(model, x, y, opt)  # first step: lazily created state is allowed to differ
        with FailOnHostSync():
            _step(model, x, y, opt)
            model.eval()
            with torch.no_grad():
                model(x)
            model.train()


def test_the_detector_catches_item():
    with pytest.raises(AssertionError, match="_local_scalar_dense"):
        with FailOnHostSync():
            torch.ones(2).sum().item()


@pytest.mark.parametrize("name", ["resnet20", "resnet164", "densenet_bc_100_12", "se_resnext29_4x64d", "simplenet_310k"])
def test_fused_step_has_no_host_sync_cpu_backend(name):
    if fastcnn.ops.dispatch.unavailable_reason("cpu", "conv_bn_act", "cpu") is not None:
        pytest.skip("the cpu backend (extension) is not built")
    torch.manual_seed(0)
    model = fastcnn.create_model(name, fused=True)
    _check(model, torch.randn(2, 3, 32, 32), torch.randint(0, 10, (2,)), "cpu")


@pytest.mark.triton
def test_fused_step_has_no_host_sync_triton_backend():
    """Every fusable layer kind on the Triton path (interpreter on CPU), in one small net."""
    if fastcnn.ops.dispatch.unavailable_reason("triton", "conv_bn_act", "cpu") is not None:
        pytest.skip("Triton is not available")
    torch.manual_seed(0)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = ConvBnAct(3, 8), ConvBnAct(8, 8)
            self.se, self.pre = SqueezeExcite(8, reduction=4, out_act="relu"), BnActConv(8, 8)
            self.head = torch.nn.Linear(8, 10)

        def forward(self, x):
            h = self.a(x)
            h = self.b(h, residual=h)
            h = self.pre(self.se(h, residual=h))
            return self.head(h.mean((2, 3)))

    _check(set_fused(Net(), True), torch.randn(2, 3, 6, 6), torch.randint(0, 10, (2,)), "triton")
