"""The direct grouped convolution op ``torch.ops.fastcnn.grouped_conv2d`` against
``F.conv2d``: forward, input and weight gradients, for depthwise and few-channels-per-group
shapes with stride, padding and dilation, in both layouts and dtypes."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fastcnn  # noqa: F401  (loads the extension and its autograd registrations)

from extension_cases import assert_close, leaf, make, upcast

pytestmark = pytest.mark.extension

# (x shape, out channels, groups, kernel, stride, padding, dilation)
CASES = (
    ((2, 8, 9, 9), 8, 8, 3, 1, 1, 1),      # depthwise
    ((1, 12, 15, 7), 6, 3, 3, 2, 1, 1),    # 4 -> 2 channels per group, stride 2
    ((3, 10, 7, 15), 10, 5, (3, 1), 1, (2, 0), 2),  # dilated, rectangular kernel
    ((2, 16, 8, 8), 16, 4, 1, 1, 0, 1),    # grouped 1x1
)


def run_case(case, layout, dtype, device="cpu"):
    shape, k, groups, ks, stride, padding, dilation = case
    ks = (ks, ks) if isinstance(ks, int) else ks
    pair = lambda v: [v, v] if isinstance(v, int) else list(v)  # noqa: E731
    x = leaf(make(shape, layout, dtype, device))
    w = leaf((torch.randn(k, shape[1] // groups, *ks, device=device) * 0.3).to(dtype))
    y = torch.ops.fastcnn.grouped_conv2d(x, w, pair(stride), pair(padding), pair(dilation), groups)
    xr, wr = upcast(x), upcast(w)
    y_ref = F.conv2d(xr, wr, None, stride, padding, dilation, groups)
    assert y.dtype == dtype
    assert_close(y, y_ref, dtype, "y")
    g = torch.randn_like(y_ref)
    gx, gw = torch.autograd.grad(y, (x, w), g.to(dtype))
    gx_ref, gw_ref = torch.autograd.grad(y_ref, (xr, wr), g.to(dtype).float())
    assert_close(gx, gx_ref, dtype, "grad x")
    assert_close(gw, gw_ref, dtype, "grad weight")


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
@pytest.mark.parametrize("layout", ("nchw", "channels_last", "strided"))
@pytest.mark.parametrize("case", CASES, ids=("depthwise", "g3_s2", "dilated", "g4_1x1"))
def test_grouped_conv2d(case, layout, dtype):
    run_case(case, layout, dtype)


def test_grouped_conv2d_bad_groups_is_an_error():
    with pytest.raises(ValueError, match="groups"):
        torch.ops.fastcnn.grouped_conv2d(torch.randn(1, 6, 5, 5), torch.randn(6, 4, 3, 3), [1, 1], [1, 1], [1, 1], 4)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", (torch.float32, torch.float16, torch.bfloat16), ids=str)
@pytest.mark.parametrize("layout", ("nchw", "channels_last"))
@pytest.mark.parametrize("case", CASES + (((16, 256, 32, 32), 256, 4, 3, 1, 1, 1),),
                         ids=("depthwise", "g3_s2", "dilated", "g4_1x1", "resnext29_stage1"))
def test_grouped_conv2d_cuda(case, layout, dtype):
    if not fastcnn._C.has_cuda():
        pytest.fail("a GPU is present but fastcnn._C was built without CUDA kernels")
    run_case(case, layout, dtype, device="cuda")
