"""Shared inputs and comparisons for the tests of the compiled backends (tests/test_extension_*.py):
random tensors in NCHW, channels_last or non-contiguous layout, and tolerances by dtype.

Low-precision runs are compared with the reference evaluated in fp32 on the same (already
rounded) inputs: the kernels compute in fp32, so that is the exact answer they approximate,
and the tolerance covers the final rounding to the storage dtype."""
from __future__ import annotations

import pytest
import torch

ext = pytest.importorskip("fastcnn._C", reason="the extension fastcnn._C is not built")

LAYOUTS = ("nchw", "channels_last", "strided")
ACTS = (("identity", 0.0), ("relu", 0.0), ("leaky_relu", 0.2), ("elu", 0.7), ("silu", 0.0), ("gelu", 0.0))
# (atol, rtol) relative to the reference's largest magnitude
TOL = {torch.float32: (1e-5, 1e-4), torch.bfloat16: (2e-2, 2e-2), torch.float16: (3e-3, 3e-3)}


def make(shape, layout="nchw", dtype=torch.float32, device="cpu", scale=1.0, offset=0.0):
    """Random activations in the given layout (values drawn in fp32, then rounded)."""
    n, c, h, w = shape
    if layout == "strided":  # every other column of a wider tensor, channel-sliced as well
        base = torch.randn(n, c + 1, h, 2 * w, device=device) * scale + offset
        t = base[:, 1:, :, ::2]
    else:
        t = torch.randn(n, c, h, w, device=device) * scale + offset
        if layout == "channels_last":
            t = t.contiguous(memory_format=torch.channels_last)
    t = t.to(dtype)
    assert t.shape == shape
    return t


def leaf(t, requires_grad=True):
    return t.detach().clone().requires_grad_(requires_grad) if t is not None else None


def upcast(t):
    return None if t is None else t.detach().float().requires_grad_(t.requires_grad)


def assert_close(actual, expected, dtype, what=""):
    atol, rtol = TOL[dtype]
    actual, expected = actual.detach().float(), expected.detach().float()
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    err = (actual - expected).abs().max().item() if actual.numel() else 0.0
    bound = atol + rtol * (expected.abs().max().item() if expected.numel() else 0.0)
    assert err <= bound, f"{what}: max abs error {err:.3g} > {bound:.3g} ({dtype})"
