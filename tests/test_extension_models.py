"""Whole models on the compiled ``cpu`` backend: ``fused=True`` must match ``fused=False``
(same weights) on forward, backward and the BN running statistics, in training and eval.

Gradients deep in a BN network at batch 2 are ill-conditioned (per-channel batch variances
over few values): the fp32 reference itself is ~2e-3 (relative) away from the fp64 answer at
the stem of SE-ResNeXt-29. So gradients are checked against an fp64 run of the reference,
and the fused error may be at most a few times the fp32 reference's own error."""
from __future__ import annotations

import copy

import pytest
import torch

import fastcnn

from extension_cases import assert_close

pytestmark = pytest.mark.extension


def compare(name, batch=2, channels_last=False, dtype=torch.float32):
    torch.manual_seed(0)
    ref_model = fastcnn.create_model(name, fused=False)
    fused_model = fastcnn.create_model(name, fused=True)
    fused_model.load_state_dict(ref_model.state_dict())
    exact_model = copy.deepcopy(ref_model).double()
    x = torch.randn(batch, 3, 32, 32)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
        ref_model, fused_model = (m.to(memory_format=torch.channels_last) for m in (ref_model, fused_model))
    target = torch.randint(0, 10, (batch,))
    for training in (True, False):
        ref_model.train(training)
        fused_model.train(training)
        y_ref = ref_model(x)
        with fastcnn.use_backend("cpu"):
            y = fused_model(x)
        assert_close(y, y_ref, dtype, f"{name} logits ({'train' if training else 'eval'})")
        loss_ref = torch.nn.functional.cross_entropy(y_ref, target)
        with fastcnn.use_backend("cpu"):
            loss = torch.nn.functional.cross_entropy(y, target)
        exact_model.train(training)
        loss_exact = torch.nn.functional.cross_entropy(exact_model(x.double()), target)
        for m in (ref_model, fused_model, exact_model):
            m.zero_grad()
        loss_ref.backward()
        loss.backward()
        loss_exact.backward()
        ref_params = dict(ref_model.named_parameters())
        exact_params = dict(exact_model.named_parameters())
        for pname, p in fused_model.named_parameters():
            e = exact_params[pname].grad
            scale = e.abs().max().item() + 1e-12
            err = (p.grad.double() - e).abs().max().item() / scale
            ref_err = (ref_params[pname].grad.double() - e).abs().max().item() / scale
            assert err <= 4 * ref_err + 2e-5, (
                f"{name} grad {pname}: relative error {err:.2e} vs the fp32 reference's {ref_err:.2e}")
        ref_bufs = dict(ref_model.named_buffers())
        for bname, b in fused_model.named_buffers():
            if b.is_floating_point():
                assert_close(b, ref_bufs[bname], torch.float32, f"{name} buffer {bname}")
            else:
                assert torch.equal(b, ref_bufs[bname]), bname


@pytest.mark.parametrize("channels_last", (False, True), ids=("nchw", "channels_last"))
def test_resnet20_fused_matches_reference(channels_last):
    compare("resnet20", channels_last=channels_last)


@pytest.mark.slow
def test_se_resnext29_fused_matches_reference():
    compare("se_resnext29_4x64d")
