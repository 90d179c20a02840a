"""Whole models on the compiled ``cpu`` backend: ``fused=True`` must match ``fused=False``
(same weights) on forward, backward and the BN running statistics, in training and eval.

Gradients deep in a BN network at batch 2 are ill-conditioned (per-channel batch variances
over few values): the fp32 reference itself is ~2e-3 (relative) away from the fp64 answer at
the stem of SE-ResNeXt-29. So logits, gradients and buffers are checked against an fp64 run
of the reference with the comparison of tests/op_cases.py: the fused error may be at most a
few times the fp32 reference's own error."""
from __future__ import annotations

import copy

import pytest
import torch

import fastcnn

from op_cases import assert_close

pytest.importorskip("fastcnn._C", reason="the extension fastcnn._C is not built")

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
        for m in (ref_model, fused_model, exact_model):
            m.train(training)
            m.zero_grad()
        mode = "train" if training else "eval"
        y_ref = ref_model(x)
        with fastcnn.use_backend("cpu"):
            y = fused_model(x)
        y_exact = exact_model(x.double())
        assert_close(y, y_exact, dtype, f"{name} logits ({mode})", y_ref)
        torch.nn.functional.cross_entropy(y_ref, target).backward()
        with fastcnn.use_backend("cpu"):
            torch.nn.functional.cross_entropy(y, target).backward()
        torch.nn.functional.cross_entropy(y_exact, target).backward()
        ref_params = dict(ref_model.named_parameters())
        exact_params = dict(exact_model.named_parameters())
        for pname, p in fused_model.named_parameters():
            assert_close(p.grad, exact_params[pname].grad, dtype, f"{name} grad {pname} ({mode})",
                         ref_params[pname].grad)
        ref_bufs, exact_bufs = dict(ref_model.named_buffers()), dict(exact_model.named_buffers())
        for bname, b in fused_model.named_buffers():
            if b.is_floating_point():
                assert_close(b, exact_bufs[bname], dtype, f"{name} buffer {bname} ({mode})", ref_bufs[bname])
            else:
                assert torch.equal(b, ref_bufs[bname]), bname


@pytest.mark.parametrize("channels_last", (False, True), ids=("nchw", "channels_last"))
def test_resnet20_fused_matches_reference(channels_last):
    compare("resnet20", channels_last=channels_last)


@pytest.mark.slow
def test_se_resnext29_fused_matches_reference():
    compare("se_resnext29_4x64d")
