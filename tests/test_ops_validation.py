"""fastcnn.ops reject bad arguments with errors that name the argument, before any kernel."""
import pytest
import torch

import fastcnn
from fastcnn import ops


def bn(c, dtype=torch.float32):
    return dict(bn_weight=torch.rand(c, dtype=dtype) + 0.5, bn_bias=torch.randn(c, dtype=dtype),
                running_mean=torch.randn(c, dtype=dtype), running_var=torch.rand(c, dtype=dtype) + 0.5)


def cba(x, w, **kw):
    p = bn(w.shape[0])
    return ops.conv_bn_act(x, w, None, p["bn_weight"], p["bn_bias"], p["running_mean"], p["running_var"], **kw)


@pytest.fixture(autouse=True)
def _reference():
    with fastcnn.use_backend("reference"):
        yield


def test_wrong_rank():
    with pytest.raises(ValueError, match="x must have 4 dimensions"):
        cba(torch.randn(3, 8, 8), torch.randn(4, 3, 3, 3))
    with pytest.raises(ValueError, match="weight must have 4 dimensions"):
        cba(torch.randn(1, 3, 8, 8), torch.randn(4, 3, 3))


def test_integer_input():
    with pytest.raises(TypeError, match="x must be a floating-point tensor"):
        cba(torch.ones(1, 3, 8, 8, dtype=torch.int64), torch.randn(4, 3, 3, 3))


def test_dtype_mix():
    with pytest.raises(TypeError, match="weight has dtype torch.float64 but x has torch.float32"):
        cba(torch.randn(1, 3, 8, 8), torch.randn(4, 3, 3, 3, dtype=torch.float64))


def test_channel_mismatch():
    with pytest.raises(ValueError, match="x has 5 channels but weight expects 3"):
        cba(torch.randn(1, 5, 8, 8), torch.randn(4, 3, 3, 3))
    with pytest.raises(ValueError, match="groups=3 must divide"):
        cba(torch.randn(1, 4, 8, 8), torch.randn(4, 2, 3, 3), groups=3)


def test_bn_size_mismatch():
    p = bn(5)
    with pytest.raises(ValueError, match="bn_weight has 5 elements but the BN input has 4 channels"):
        ops.conv_bn_act(torch.randn(1, 3, 8, 8), torch.randn(4, 3, 3, 3), None, p["bn_weight"], p["bn_bias"],
                        p["running_mean"], p["running_var"])


def test_eval_needs_running_stats():
    with pytest.raises(TypeError, match="running_mean must be a tensor"):
        ops.bn_act(torch.randn(1, 3, 4, 4), torch.ones(3), torch.zeros(3), None, None, training=False)


def test_residual_shape():
    with pytest.raises(ValueError, match=r"residual has shape \(1, 4, 8, 8\) but the output has shape \(1, 4, 4, 4\)"):
        cba(torch.randn(1, 3, 8, 8), torch.randn(4, 3, 3, 3), stride=2, padding=1, residual=torch.randn(1, 4, 8, 8))


def test_unknown_activation():
    with pytest.raises(ValueError, match="act 'swish2' has no fused implementation"):
        cba(torch.randn(1, 3, 8, 8), torch.randn(4, 3, 3, 3), act="swish2")


def test_input_too_small():
    with pytest.raises(ValueError, match="too small for a 5x5 kernel"):
        cba(torch.randn(1, 3, 3, 3), torch.randn(4, 3, 5, 5))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="device mix needs a CUDA device")
def test_device_mix():
    with pytest.raises(ValueError, match="weight is on cuda"):
        cba(torch.randn(1, 3, 8, 8), torch.randn(4, 3, 3, 3, device="cuda"))


def test_device_mix_meta():
    # A second device type that exists everywhere: the check runs before dispatch.
    with pytest.raises(ValueError, match="weight is on meta:?0? but x is on cpu|weight is on meta"):
        cba(torch.randn(1, 3, 8, 8), torch.randn(4, 3, 3, 3, device="meta"))


def test_se_shapes():
    x = torch.randn(2, 8, 4, 4)
    with pytest.raises(ValueError, match="fc1_weight has shape \\(2, 6\\) but x has 8 channels"):
        ops.se_block(x, torch.randn(2, 6), None, torch.randn(8, 2), None)
    with pytest.raises(ValueError, match="fc2_weight has shape"):
        ops.se_block(x, torch.randn(2, 8), None, torch.randn(8, 3), None)


def test_bad_stride_type():
    with pytest.raises(TypeError, match="stride must be an int or a pair of ints"):
        cba(torch.randn(1, 3, 8, 8), torch.randn(4, 3, 3, 3), stride=(1, 1, 1))
