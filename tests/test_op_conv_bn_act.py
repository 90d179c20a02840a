"""``fastcnn.ops.conv_bn_act`` -- act(BN(conv(x)) [+ residual]) -- on every backend against the
reference (tests/op_cases.py): output, gradients of x / weight / conv bias / BN weight and
bias / residual, running statistics after the step (training) or untouched (eval), over odd
shapes, strides, dilations, groups, activations, layouts and dtypes, and argument errors;
then what one backend does its own way (Triton's statistics merge), and GPU shapes."""
from __future__ import annotations

import pytest
import torch

import fastcnn
from fastcnn import ops
from fastcnn.ops import reference

from op_cases import ACT_PARAM, ACTS, GRID, backend, backends, check_op, make, tensor  # noqa: F401

OP = "conv_bn_act"


def check_conv_bn_act(backend, n, cin, h, w, cout, k, s, p, d, g, act, training, res, dtype, layout, bias,
                      *, act_param=None, momentum=0.1, track=True, w_scale=None, device=None):
    """One conv_bn_act call on ``backend`` against the reference: a k x k convolution (stride
    s, padding p, dilation d, groups g), BN with fp32 parameters, optional conv bias and
    residual. ``w_scale``: the weight's spread (default 1/sqrt(fan-in))."""
    dev = device or backend.device
    oh = (h + 2 * p - d * (k - 1) - 1) // s + 1
    ow = (w + 2 * p - d * (k - 1) - 1) // s + 1
    fan_in = cin // g * k * k
    tensors = dict(
        x=make((n, cin, h, w), layout, dtype, dev, requires_grad=True),
        weight=tensor(cout, cin // g, k, k, dtype=dtype, device=dev, scale=w_scale or fan_in ** -0.5,
                      requires_grad=True),
        bias=tensor(cout, dtype=dtype, device=dev, scale=2.0, requires_grad=True) if bias else None,
        bn_weight=tensor(cout, device=dev, uniform=True, offset=0.5, requires_grad=True),
        bn_bias=tensor(cout, device=dev, requires_grad=True),
        running_mean=tensor(cout, device=dev, scale=0.1) if track else None,
        running_var=tensor(cout, device=dev, uniform=True, offset=0.5) if track else None,
        residual=make((n, cout, oh, ow), layout, dtype, dev, requires_grad=True) if res else None,
    )
    check_op(backend, OP, tensors, stride=s, padding=p, dilation=d, groups=g, training=training,
             momentum=momentum, eps=1e-5, act=act, act_param=ACT_PARAM[act] if act_param is None else act_param)


# =========================================================================== every backend

# n, cin, h, w, cout, k, stride, pad, dil, groups, act, training, residual, dtype, layout, bias:
# small enough for the Triton interpreter (about a second each there)
CASES = [
    (2, 3, 7, 7, 10, 3, 1, 1, 1, 1, "relu", True, False, torch.float32, "nchw", True),
    (1, 10, 9, 9, 17, 3, 2, 1, 1, 1, "leaky_relu", True, True, torch.float32, "channels_last", False),
    (2, 17, 7, 7, 3, 1, 1, 0, 1, 1, "silu", False, True, torch.float32, "strided", True),
    (2, 4, 9, 9, 8, 5, 1, 2, 1, 2, "gelu", True, False, torch.float32, "nchw", False),
    (2, 8, 7, 7, 8, 3, 1, 2, 2, 4, "elu", True, True, torch.float32, "channels_last", False),
    (2, 8, 15, 15, 12, 3, 2, 1, 1, 4, "relu", True, False, torch.bfloat16, "channels_last", False),
    (2, 6, 7, 7, 10, 3, 1, 1, 1, 1, "identity", False, True, torch.bfloat16, "nchw", True),
    (1, 3, 7, 5, 5, 3, 1, 0, 1, 1, "relu", True, True, torch.float16, "nchw", True),
    (2, 8, 5, 5, 8, 3, 1, 1, 1, 8, "relu", True, False, torch.float32, "nchw", False),
    (2, 4, 6, 6, 6, 1, 2, 0, 1, 2, "identity", True, True, torch.float32, "strided", True),
]


def _case_id(c):
    n, cin, h, w, cout, k, s, p, d, g, act, tr, res, dt, lay, b = c
    return (f"n{n}-{cin}x{h}x{w}-{cout}-k{k}s{s}p{p}d{d}g{g}-{act}-{'train' if tr else 'eval'}"
            f"{'-res' if res else ''}-{str(dt)[6:]}-{lay}{'-bias' if b else ''}")


@backends()
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_conv_bn_act(backend, case):
    check_conv_bn_act(backend, *case)


@backends()
@pytest.mark.parametrize("act", [a for a, _ in ACTS])
def test_conv_bn_act_each_activation(backend, act):
    check_conv_bn_act(backend, 2, 5, 5, 5, 7, 3, 1, 1, 1, 1, act, True, True, torch.float32, "nchw", True)


@backends()
def test_conv_bn_act_no_running_stats_and_momentum(backend):
    """track_running_stats=False (running stats None) and a cumulative-average momentum."""
    check_conv_bn_act(backend, 2, 4, 5, 5, 6, 3, 1, 1, 1, 2, "relu", True, False, torch.float32, "nchw", False,
                      track=False)
    check_conv_bn_act(backend, 2, 4, 5, 5, 6, 3, 1, 1, 1, 2, "relu", True, False, torch.float32, "nchw", False,
                      momentum=1.0)


@backends()
def test_conv_bn_act_large_mean_variance_is_stable(backend):
    """The batch variance survives a mean 1000x the spread (Triton: per-tile (mean, M2)
    partials; the extension: shifted sums), where sum / sum of squares in fp32 would lose
    most digits."""
    dev = backend.device
    x = torch.randn(2, 4, 9, 9, device=dev) * 0.01 + 1000.0
    w = torch.ones(6, 4, 1, 1, device=dev) / 4
    rm, rv = torch.zeros(6, device=dev), torch.ones(6, device=dev)
    with fastcnn.use_backend(backend.name):
        ops.conv_bn_act(x, w, None, torch.ones(6, device=dev), torch.zeros(6, device=dev), rm, rv,
                        momentum=1.0, act="identity")
    z = torch.nn.functional.conv2d(x.double(), w.double())
    torch.testing.assert_close(rv.double(), z.var(dim=(0, 2, 3)), rtol=1e-2, atol=0)


@backends()
def test_conv_bn_act_eval_no_grad(backend):
    """Eval under no_grad (Triton: the folded-BN epilogue alone, no z written), grouped,
    strided, with a residual."""
    dev = backend.device
    tensors = dict(
        x=make((2, 6, 7, 7), device=dev), weight=tensor(9, 2, 3, 3, device=dev, scale=0.2), bias=None,
        bn_weight=tensor(9, device=dev, uniform=True, offset=0.5), bn_bias=tensor(9, device=dev),
        running_mean=tensor(9, device=dev), running_var=tensor(9, device=dev, uniform=True, offset=0.5),
        residual=make((2, 9, 4, 4), device=dev))
    check_op(backend, OP, tensors, grad=False, stride=2, padding=1, groups=3, training=False, act="silu")


# --------------------------------------------------------------------------- dense grid
# The grid below runs on op_cases.GRID (see there: the extension on the CPU, where a case costs
# milliseconds); the other backends cover the same features with CASES above.



@backends(*GRID)
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
@pytest.mark.parametrize("layout", ("nchw", "channels_last"))
@pytest.mark.parametrize("groups,stride", ((1, 1), (2, 2)), ids=("dense", "grouped_s2"))
def test_conv_bn_act_grid(backend, layout, dtype, groups, stride):
    check_conv_bn_act(backend, 2, 4, 15, 15, 10, 3, stride, 1, 1, groups, "silu", True, True, dtype, layout, False,
                      w_scale=0.3)


# --------------------------------------------------------------------------- argument errors
# fastcnn.ops checks its arguments before dispatch: the same errors on every backend.

def _cba(x, w, bn_channels=None, **kw):
    """ops.conv_bn_act on x and w, with BN parameters for ``bn_channels`` (default: w's)."""
    c, dev = bn_channels or w.shape[0], x.device
    bn = (torch.rand(c, device=dev) + 0.5, torch.randn(c, device=dev), torch.randn(c, device=dev),
          torch.rand(c, device=dev) + 0.5)
    return ops.conv_bn_act(x, w, None, *bn, **kw)


def _x_w(backend, x_shape=(1, 3, 8, 8), w_shape=(4, 3, 3, 3), **kw):
    return torch.randn(x_shape, device=backend.device, **kw), torch.randn(w_shape, device=backend.device, **kw)


@backends()
def test_conv_bn_act_rejects_wrong_rank(backend):
    x, w = _x_w(backend)
    with fastcnn.use_backend(backend.name):
        with pytest.raises(ValueError, match="x must have 4 dimensions"):
            _cba(x[0], w)
        with pytest.raises(ValueError, match="weight must have 4 dimensions"):
            _cba(x, w[:, :, 0])


@backends()
def test_conv_bn_act_rejects_integer_input(backend):
    x, w = _x_w(backend)
    with fastcnn.use_backend(backend.name), pytest.raises(TypeError, match="x must be a floating-point tensor"):
        _cba(x.long(), w)


@backends()
def test_conv_bn_act_rejects_dtype_mix(backend):
    x, w = _x_w(backend)
    with fastcnn.use_backend(backend.name), pytest.raises(
            TypeError, match="weight has dtype torch.float64 but x has torch.float32"):
        _cba(x, w.double())


@backends()
def test_conv_bn_act_rejects_channel_mismatch(backend):
    with fastcnn.use_backend(backend.name):
        with pytest.raises(ValueError, match="x has 5 channels but weight expects 3"):
            _cba(*_x_w(backend, (1, 5, 8, 8)))
        with pytest.raises(ValueError, match="groups=3 must divide"):
            _cba(*_x_w(backend, (1, 4, 8, 8), (4, 2, 3, 3)), groups=3)


@backends()
def test_conv_bn_act_rejects_bn_size_mismatch(backend):
    with fastcnn.use_backend(backend.name), pytest.raises(
            ValueError, match="bn_weight has 5 elements but the BN input has 4 channels"):
        _cba(*_x_w(backend), bn_channels=5)


@backends()
def test_conv_bn_act_rejects_residual_shape(backend):
    x, w = _x_w(backend)
    r = torch.randn(1, 4, 8, 8, device=backend.device)
    with fastcnn.use_backend(backend.name), pytest.raises(
            ValueError, match=r"residual has shape \(1, 4, 8, 8\) but the output has shape \(1, 4, 4, 4\)"):
        _cba(x, w, stride=2, padding=1, residual=r)


@backends()
def test_conv_bn_act_rejects_unknown_activation(backend):
    with fastcnn.use_backend(backend.name), pytest.raises(ValueError, match="act 'swish2' has no fused implementation"):
        _cba(*_x_w(backend), act="swish2")


@backends()
def test_conv_bn_act_rejects_input_too_small(backend):
    with fastcnn.use_backend(backend.name), pytest.raises(ValueError, match="too small for a 5x5 kernel"):
        _cba(*_x_w(backend, (1, 3, 3, 3), (4, 3, 5, 5)))


@backends()
def test_conv_bn_act_rejects_bad_stride_type(backend):
    with fastcnn.use_backend(backend.name), pytest.raises(TypeError, match="stride must be an int or a pair of ints"):
        _cba(*_x_w(backend), stride=(1, 1, 1))


@backends()
def test_conv_bn_act_rejects_single_value_per_channel_in_training(backend):
    """Like nn.BatchNorm2d: batch statistics of one value are undefined."""
    with fastcnn.use_backend(backend.name), pytest.raises(ValueError, match="more than (1|one) value per channel"):
        _cba(*_x_w(backend, (1, 4, 3, 3), (8, 4, 3, 3)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="device mix needs a CUDA device next to the CPU")
@backends()
def test_conv_bn_act_rejects_device_mix(backend):
    with fastcnn.use_backend(backend.name), pytest.raises(ValueError, match="weight is on cuda"):
        _cba(torch.randn(1, 3, 8, 8), torch.randn(4, 3, 3, 3, device="cuda"))


@backends()
def test_conv_bn_act_rejects_device_mix_meta(backend):
    """A second device type that exists everywhere (meta) stands in for 'another device'."""
    x, w = _x_w(backend)
    with fastcnn.use_backend(backend.name), pytest.raises(ValueError, match="weight is on meta"):
        _cba(x, w.to("meta"))


# =========================================================================== Triton only

@pytest.mark.triton
def test_conv_bn_act_triton_many_tiles_merge_their_statistics():
    """More output tiles than the finalize reads directly (kernels/bn_act.py DIRECT_ROWS): the
    statistics partials go through the parallel merge first; output and running statistics
    still match the reference (the merge itself: test_triton_conv_gemm.py)."""
    pytest.importorskip("triton")
    from fastcnn.kernels import bn_act as ba

    x = torch.randn(2, 3, 96, 96)
    w = torch.randn(4, 3, 1, 1)
    gamma, beta = torch.rand(4) + 0.5, torch.randn(4)
    stats = [(torch.zeros(4), torch.ones(4)) for _ in range(2)]
    kw = dict(stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1, training=True, momentum=0.1, eps=1e-5,
              act="relu", act_param=0.0, residual=None)
    with torch.no_grad(), fastcnn.use_backend("triton"):
        y = ops.conv_bn_act(x, w, None, gamma, beta, *stats[0], **kw)
    assert any(k[2] == 2 * 96 * 96 and v[0] is not None for k, v in ba._FIN.items()), "merge path not taken"
    yr = reference.conv_bn_act(x, w, None, gamma, beta, *stats[1], **kw)
    torch.testing.assert_close(y, yr, rtol=1e-4, atol=1e-4)
    for ours, ref in zip(stats[0], stats[1]):
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)


# =========================================================================== GPU

# Triton at the zoo's shapes (channels_last): ResNet-20 stages 1-3, SimpleNet, ResNeXt-29
# grouped 3x3 and 1x1, stride-2 projections
GPU_ZOO = [
    (128, 16, 32, 32, 16, 3, 1, 1, 1, 1, "relu", True, True),
    (128, 32, 16, 16, 64, 3, 2, 1, 1, 1, "relu", True, False),
    (128, 128, 16, 16, 128, 3, 1, 1, 1, 1, "relu", True, False),
    (128, 256, 32, 32, 256, 3, 1, 1, 1, 4, "relu", True, False),
    (128, 512, 16, 16, 512, 3, 2, 1, 1, 4, "relu", True, False),
    (128, 256, 32, 32, 512, 1, 2, 0, 1, 1, "identity", True, False),
    (128, 1024, 8, 8, 1024, 1, 1, 0, 1, 1, "relu", False, True),
]


@pytest.mark.gpu
@backends("triton")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", GPU_ZOO, ids=lambda c: f"n{c[0]}-{c[1]}x{c[2]}-{c[4]}-k{c[5]}s{c[6]}g{c[9]}")
def test_conv_bn_act_gpu_zoo_shapes(backend, case, dtype):
    check_conv_bn_act(backend, *case, dtype, "channels_last", False, device="cuda")
