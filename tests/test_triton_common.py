"""Shared helpers of the Triton op tests (``test_triton_*.py``), and the checks that bad
arguments to ``fastcnn.ops.*`` with the triton backend fail before any kernel runs.

Comparisons: each op runs through ``fastcnn.ops`` with the ``triton`` backend; the reference
(:mod:`fastcnn.ops.reference`) runs twice on copies of the same data -- in float64 (the
truth) and in the test dtype (what PyTorch itself achieves in that precision). A result
passes when its max error against float64 is at most ``4 x`` PyTorch's own error in that
dtype plus a dtype-sized slack relative to the tensor's scale.
"""
from __future__ import annotations

import pytest
import torch

import fastcnn
from fastcnn import ops

pytest.importorskip("triton")

#: relative slack (times max |reference|) on top of PyTorch's own error, per dtype
REL = {torch.float32: 2e-5, torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7}


def device():
    return "cuda" if torch.cuda.is_available() else "cpu"


def assert_matches(ours, ref64, ref_lp, dtype, what):
    """max|ours - ref64| <= 4 * max|ref_lp - ref64| + REL[dtype] * max|ref64| + 1e-6."""
    assert ours.shape == ref64.shape, f"{what}: shape {tuple(ours.shape)} != {tuple(ref64.shape)}"
    ours, ref64, ref_lp = ours.detach().double(), ref64.detach().double(), ref_lp.detach().double()
    assert torch.isfinite(ours).all(), f"{what}: non-finite values"
    scale = ref64.abs().max().item()
    err = (ours - ref64).abs().max().item()
    err_ref = (ref_lp - ref64).abs().max().item()
    tol = 4 * err_ref + REL[dtype] * scale + 1e-6
    assert err <= tol, f"{what}: max error {err:.3g} > tolerance {tol:.3g} (torch {dtype} error {err_ref:.3g}, scale {scale:.3g})"


def make_input(shape, dtype, layout, dev=None, scale=1.0, shift=0.0):
    """Random tensor in the given memory layout: 'nchw', 'channels_last' or 'noncontig'."""
    dev = dev or device()
    if layout == "noncontig":
        n, c, h, w = shape
        t = (torch.randn(n, c, h, 2 * w, device=dev) * scale + shift).to(dtype)[..., ::2]
        assert not t.is_contiguous()
        return t
    t = (torch.randn(shape, device=dev) * scale + shift).to(dtype)
    if layout == "channels_last":
        t = t.contiguous(memory_format=torch.channels_last)
    return t


def leaf_copies(tensors, dtype):
    """Fresh leaf copies of ``tensors`` (None kept) in ``dtype``, requiring grad if the
    original does; BN running stats are passed separately."""
    out = []
    for t in tensors:
        if t is None:
            out.append(None)
            continue
        c = t.detach().to(dtype).clone()
        if t.dtype != dtype and t.dtype == torch.float32 and dtype != torch.float64:
            c = t.detach().clone()  # fp32 params stay fp32 next to fp16/bf16 activations
        out.append(c.requires_grad_(t.requires_grad))
    return out


def run_three(fn_ours, fn_ref, inputs, dtype, grad_seed_shape_like=True):
    """Run ours (triton backend) on ``inputs``, then the reference in float64 and in ``dtype``
    on copies; backprop the same random cotangent. Returns (ours, ref64, reflp) each as
    (output, [grads of inputs])."""
    ours_in = inputs
    with fastcnn.use_backend("triton"):
        y = fn_ours(*ours_in)
    gy = torch.randn(y.shape, device=y.device).to(y.dtype)
    y.backward(gy)
    results = []
    for dt in (torch.float64, dtype):
        ins = leaf_copies(inputs, dt)
        yr = fn_ref(*ins)
        yr.backward(gy.to(yr.dtype))
        results.append((yr, [None if t is None else t.grad for t in ins]))
    ours = (y, [None if t is None else t.grad for t in inputs])
    return ours, results[0], results[1]


def compare_all(names, ours, ref64, reflp, dtype, what=""):
    assert_matches(ours[0], ref64[0], reflp[0], dtype, f"{what} output")
    for name, g, g64, glp in zip(names, ours[1], ref64[1], reflp[1]):
        if g64 is None:
            continue
        assert g is not None, f"{what} grad of {name} missing"
        assert_matches(g, g64, glp, dtype, f"{what} grad of {name}")


# --------------------------------------------------------------------------- bad input

def _conv_args(dtype=torch.float32, dev="cpu"):
    x = torch.randn(2, 4, 6, 6, dtype=dtype, device=dev)
    w = torch.randn(8, 4, 3, 3, dtype=dtype, device=dev)
    bn = [torch.randn(8, device=dev), torch.randn(8, device=dev), torch.zeros(8, device=dev), torch.ones(8, device=dev)]
    return x, w, bn


@pytest.fixture
def triton_backend():
    with fastcnn.use_backend("triton"):
        yield


def test_rejects_wrong_rank(triton_backend):
    x, w, bn = _conv_args()
    with pytest.raises(ValueError, match="x must have 4 dimensions"):
        ops.conv_bn_act(x[0], w, None, *bn)
    with pytest.raises(ValueError, match="weight must have 4 dimensions"):
        ops.conv_act(x, w[:, :, 0], None)
    with pytest.raises(ValueError, match="bn_weight"):
        ops.bn_act(x, torch.randn(4, 1), torch.randn(4), None, None)
    with pytest.raises(ValueError, match="fc1_weight"):
        ops.se_block(x, torch.randn(2, 4, 1), None, torch.randn(4, 2), None)


def test_rejects_dtype_mix(triton_backend):
    x, w, bn = _conv_args()
    with pytest.raises(TypeError, match="weight has dtype"):
        ops.conv_bn_act(x, w.double(), None, *bn)
    with pytest.raises(TypeError, match="residual has dtype"):
        ops.conv_act(x, w, None, padding=1, residual=torch.randn(2, 8, 6, 6, dtype=torch.float64))
    with pytest.raises(TypeError, match="bn_weight has dtype"):
        ops.bn_act(x.half(), torch.randn(4, dtype=torch.float64), torch.randn(4), torch.zeros(4), torch.ones(4))
    with pytest.raises(TypeError, match="x must be a floating-point"):
        ops.conv_act(x.long(), w, None)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="device mix needs a CUDA device next to the CPU")
def test_rejects_device_mix(triton_backend):
    x, w, bn = _conv_args()
    with pytest.raises(ValueError, match="weight is on"):
        ops.conv_act(x, w.cuda(), None)


def test_rejects_device_mix_meta(triton_backend):
    """Without a GPU, a meta tensor stands in for 'another device'."""
    x, w, bn = _conv_args()
    with pytest.raises(ValueError, match="weight is on meta"):
        ops.conv_bn_act(x, w.to("meta"), None, *bn)
    with pytest.raises(ValueError, match="running_mean is on meta"):
        ops.bn_act(x, torch.randn(4), torch.randn(4), torch.zeros(4, device="meta"), torch.ones(4))


def test_rejects_channel_mismatch(triton_backend):
    x, w, bn = _conv_args()
    with pytest.raises(ValueError, match="x has 4 channels but weight expects 6"):
        ops.conv_act(x, torch.randn(8, 6, 3, 3), None)
    with pytest.raises(ValueError, match="bn_weight has 5 elements"):
        ops.conv_bn_act(x, w, None, torch.randn(5), *bn[1:])
    with pytest.raises(ValueError, match="groups=3"):
        ops.conv_act(x, torch.randn(8, 4, 3, 3), None, groups=3)
    with pytest.raises(ValueError, match="residual has shape"):
        ops.conv_act(x, w, None, residual=torch.randn(2, 8, 6, 6))
    with pytest.raises(ValueError, match="fc2_weight has shape"):
        ops.se_block(x, torch.randn(2, 4), None, torch.randn(5, 2), None)


def test_rejects_single_value_per_channel_in_training(triton_backend):
    """Like nn.BatchNorm2d: batch statistics of one value are undefined."""
    x = torch.randn(1, 4, 1, 1)
    with pytest.raises(ValueError, match="more than (1|one) value per channel"):
        ops.bn_act(x, torch.randn(4), torch.randn(4), torch.zeros(4), torch.ones(4))
    with pytest.raises(ValueError, match="more than (1|one) value per channel"):
        ops.conv_bn_act(torch.randn(1, 4, 3, 3), torch.randn(8, 4, 3, 3), None, *_conv_args()[2])
