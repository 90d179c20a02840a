"""The extension's direct grouped convolution ``torch.ops.fastcnn.grouped_conv2d`` (an extension
primitive, not a ``fastcnn.ops`` op: only the ``cpu`` and ``cuda`` backends have it) against
``F.conv2d`` with the comparison of tests/op_cases.py: forward, input and weight gradients,
for depthwise and few-channels-per-group shapes with stride, padding and dilation, in every
layout and dtype; and its argument check."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fastcnn  # noqa: F401  (loads the extension and its autograd registrations)

from op_cases import LAYOUTS, assert_close, backend, backends, make, tensor  # noqa: F401

OP = "grouped_conv2d"

# (x shape, out channels, groups, kernel, stride, padding, dilation)
CASES = (
    ((2, 8, 9, 9), 8, 8, 3, 1, 1, 1),      # depthwise
    ((1, 12, 15, 7), 6, 3, 3, 2, 1, 1),    # 4 -> 2 channels per group, stride 2
    ((3, 10, 7, 15), 10, 5, (3, 1), 1, (2, 0), 2),  # dilated, rectangular kernel
    ((2, 16, 8, 8), 16, 4, 1, 1, 0, 1),    # grouped 1x1
)
CASE_IDS = ("depthwise", "g3_s2", "dilated", "g4_1x1")


def check_grouped_conv2d(backend, case, layout, dtype):
    """One grouped_conv2d call against F.conv2d: truth in float64, PyTorch's own in ``dtype``."""
    shape, k, groups, ks, stride, padding, dilation = case
    dev = backend.device
    ks = (ks, ks) if isinstance(ks, int) else ks
    pair = lambda v: [v, v] if isinstance(v, int) else list(v)  # noqa: E731
    x = make(shape, layout, dtype, dev, requires_grad=True)
    w = tensor(k, shape[1] // groups, *ks, dtype=dtype, device=dev, scale=0.3, requires_grad=True)
    y = torch.ops.fastcnn.grouped_conv2d(x, w, pair(stride), pair(padding), pair(dilation), groups)
    assert y.dtype == dtype
    runs = {}
    for name, cast in (("truth", torch.float64), ("torch", dtype)):
        xr, wr = (t.detach().to(cast).requires_grad_() for t in (x, w))
        runs[name] = (F.conv2d(xr, wr, None, stride, padding, dilation, groups), xr, wr)
    assert_close(y, runs["truth"][0], dtype, "y", runs["torch"][0])
    g = torch.randn(y.shape, device=dev).to(dtype)
    grads = torch.autograd.grad(y, (x, w), g)
    grads_truth = torch.autograd.grad(runs["truth"][0], runs["truth"][1:], g.double())
    grads_torch = torch.autograd.grad(runs["torch"][0], runs["torch"][1:], g)
    for name, a, e, t in zip(("x", "weight"), grads, grads_truth, grads_torch):
        assert_close(a, e, dtype, f"grad {name}", t)


@backends("cpu")
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_grouped_conv2d(backend, case, layout, dtype):
    check_grouped_conv2d(backend, case, layout, dtype)


@backends("cpu")
def test_grouped_conv2d_bad_groups_is_an_error(backend):
    with pytest.raises(ValueError, match="groups"):
        torch.ops.fastcnn.grouped_conv2d(torch.randn(1, 6, 5, 5), torch.randn(6, 4, 3, 3), [1, 1], [1, 1], [1, 1], 4)


# the cuda backend: the same cases, fp16 too, and a ResNeXt-29 stage-1 layer
@pytest.mark.gpu
@backends("cuda")
@pytest.mark.parametrize("dtype", (torch.float32, torch.float16, torch.bfloat16), ids=str)
@pytest.mark.parametrize("layout", ("nchw", "channels_last"))
@pytest.mark.parametrize("case", CASES + (((16, 256, 32, 32), 256, 4, 3, 1, 1, 1),),
                         ids=CASE_IDS + ("resnext29_stage1",))
def test_grouped_conv2d_gpu(backend, case, layout, dtype):
    check_grouped_conv2d(backend, case, layout, dtype)
