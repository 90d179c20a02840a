"""Triton ``conv_bn_act`` against ``F.conv2d`` + ``F.batch_norm`` + activation: outputs,
gradients of x / weight / conv bias / BN weight and bias / residual, and the running
statistics after the step, in train and eval mode, over odd shapes, groups, layouts, dtypes."""
from __future__ import annotations

import pytest
import torch

from fastcnn import ops
from fastcnn.ops import reference

from test_triton_common import assert_matches, compare_all, device, make_input, run_three

pytestmark = pytest.mark.triton

# n, cin, h, w, cout, k, stride, pad, dil, groups, act, training, residual, dtype, layout, bias
CASES = [
    (2, 3, 7, 7, 10, 3, 1, 1, 1, 1, "relu", True, False, torch.float32, "nchw", True),
    (1, 10, 9, 9, 17, 3, 2, 1, 1, 1, "leaky_relu", True, True, torch.float32, "channels_last", False),
    (2, 17, 7, 7, 3, 1, 1, 0, 1, 1, "silu", False, True, torch.float32, "noncontig", True),
    (2, 4, 9, 9, 8, 5, 1, 2, 1, 2, "gelu", True, False, torch.float32, "nchw", False),
    (2, 8, 7, 7, 8, 3, 1, 2, 2, 4, "elu", True, True, torch.float32, "channels_last", False),
    (2, 8, 15, 15, 12, 3, 2, 1, 1, 4, "relu", True, False, torch.bfloat16, "channels_last", False),
    (2, 6, 7, 7, 10, 3, 1, 1, 1, 1, "identity", False, True, torch.bfloat16, "nchw", True),
    (1, 3, 7, 5, 5, 3, 1, 0, 1, 1, "relu", True, True, torch.float16, "nchw", True),
    (2, 8, 5, 5, 8, 3, 1, 1, 1, 8, "relu", True, False, torch.float32, "nchw", False),
    (2, 4, 6, 6, 6, 1, 2, 0, 1, 2, "identity", True, True, torch.float32, "noncontig", True),
]


def _ids(c):
    n, cin, h, w, cout, k, s, p, d, g, act, tr, res, dt, lay, b = c
    return (f"n{n}-{cin}x{h}x{w}-{cout}-k{k}s{s}p{p}d{d}g{g}-{act}-{'train' if tr else 'eval'}"
            f"{'-res' if res else ''}-{str(dt)[6:]}-{lay}{'-bias' if b else ''}")


def check_conv_bn_act(n, cin, h, w, cout, k, s, p, d, g, act, training, res, dtype, layout, bias,
                      momentum=0.1, track=True, dev=None):
    dev = dev or device()
    act_param = {"leaky_relu": 0.1, "elu": 0.7}.get(act, 0.0)
    oh = (h + 2 * p - d * (k - 1) - 1) // s + 1
    ow = (w + 2 * p - d * (k - 1) - 1) // s + 1
    x = make_input((n, cin, h, w), dtype, layout, dev).requires_grad_()
    wt = (torch.randn(cout, cin // g, k, k, device=dev) / (cin // g * k * k) ** 0.5).to(dtype).requires_grad_()
    b = (torch.randn(cout, device=dev) * 2).to(dtype).requires_grad_() if bias else None
    gamma = (torch.rand(cout, device=dev) + 0.5).requires_grad_()
    beta = torch.randn(cout, device=dev).requires_grad_()
    r = make_input((n, cout, oh, ow), dtype, layout, dev).requires_grad_() if res else None
    rm0, rv0 = torch.randn(cout, device=dev) * 0.1, torch.rand(cout, device=dev) + 0.5
    stats = {}

    def make_fn(tag, fn):
        def run(x, wt, b, gamma, beta, r):
            f32 = torch.float64 if x.dtype == torch.float64 else torch.float32
            rm, rv = (rm0.to(f32).clone(), rv0.to(f32).clone()) if track else (None, None)
            stats[tag] = (rm, rv)
            return fn(x, wt, b, gamma, beta, rm, rv, stride=(s, s), padding=(p, p), dilation=(d, d),
                      groups=g, training=training, momentum=momentum, eps=1e-5, act=act,
                      act_param=act_param, residual=r)
        return run

    ours_fn = make_fn("ours", ops.conv_bn_act)
    calls = []

    def ref_fn(*a):
        calls.append(None)
        return make_fn("ref64" if len(calls) == 1 else "reflp", reference.conv_bn_act)(*a)

    ours, r64, rlp = run_three(ours_fn, ref_fn, [x, wt, b, gamma, beta, r], dtype)
    what = "conv_bn_act"
    compare_all(["x", "weight", "bias", "bn_weight", "bn_bias", "residual"], ours, r64, rlp, dtype, what)
    if track:
        for i, name in enumerate(("running_mean", "running_var")):
            assert_matches(stats["ours"][i], stats["ref64"][i], stats["reflp"][i], dtype, f"{what} {name}")
            if not training:
                assert torch.equal(stats["ours"][i], (rm0, rv0)[i]), f"eval mode changed {name}"


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_conv_bn_act(case):
    check_conv_bn_act(*case)


@pytest.mark.parametrize("act", ["identity", "relu", "leaky_relu", "elu", "silu", "gelu"])
def test_conv_bn_act_each_activation(act):
    check_conv_bn_act(2, 5, 5, 5, 7, 3, 1, 1, 1, 1, act, True, True, torch.float32, "nchw", True)


def test_conv_bn_act_no_running_stats_and_momentum():
    """track_running_stats=False (running stats None) and a cumulative-average momentum."""
    check_conv_bn_act(2, 4, 5, 5, 6, 3, 1, 1, 1, 2, "relu", True, False, torch.float32, "nchw", False, track=False)
    check_conv_bn_act(2, 4, 5, 5, 6, 3, 1, 1, 1, 2, "relu", True, False, torch.float32, "nchw", False, momentum=1.0)


def test_conv_bn_act_large_mean_variance_is_stable():
    """Batch variance from per-tile (mean, M2) partials survives a mean 1000x the spread,
    where sum/sum-of-squares in fp32 would lose most digits."""
    dev = device()
    x = torch.randn(2, 4, 9, 9, device=dev) * 0.01 + 1000.0
    w = torch.ones(6, 4, 1, 1, device=dev) / 4
    rm, rv = torch.zeros(6, device=dev), torch.ones(6, device=dev)
    with __import__("fastcnn").use_backend("triton"):
        ops.conv_bn_act(x, w, None, torch.ones(6, device=dev), torch.zeros(6, device=dev), rm, rv,
                        momentum=1.0, act="identity")
    z = torch.nn.functional.conv2d(x.double(), w.double())
    torch.testing.assert_close(rv.double(), z.var(dim=(0, 2, 3)), rtol=1e-2, atol=0)


def test_conv_bn_act_eval_no_grad_single_launch_path():
    """Eval under no_grad: the folded-BN epilogue alone (no z written)."""
    dev = device()
    x = torch.randn(2, 6, 7, 7, device=dev)
    w = torch.randn(9, 2, 3, 3, device=dev) / 5
    bn = [torch.rand(9, device=dev) + 0.5, torch.randn(9, device=dev), torch.randn(9, device=dev), torch.rand(9, device=dev) + 0.5]
    r = torch.randn(2, 9, 4, 4, device=dev)
    kw = dict(stride=2, padding=1, groups=3, training=False, act="silu", residual=r)
    with torch.no_grad(), __import__("fastcnn").use_backend("triton"):
        y = ops.conv_bn_act(x, w, None, *bn, **kw)
    yr = reference.conv_bn_act(x, w, None, *bn, **{**kw, "stride": (2, 2), "padding": (1, 1)})
    torch.testing.assert_close(y, yr, rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------- GPU, zoo shapes

GPU_CASES = [
    # ResNet-20 stage 1-3, SimpleNet, ResNeXt-29 grouped 3x3 and 1x1, stride-2 projections
    (128, 16, 32, 32, 16, 3, 1, 1, 1, 1, "relu", True, True),
    (128, 32, 16, 16, 64, 3, 2, 1, 1, 1, "relu", True, False),
    (128, 128, 16, 16, 128, 3, 1, 1, 1, 1, "relu", True, False),
    (128, 256, 32, 32, 256, 3, 1, 1, 1, 4, "relu", True, False),
    (128, 512, 16, 16, 512, 3, 2, 1, 1, 4, "relu", True, False),
    (128, 256, 32, 32, 512, 1, 2, 0, 1, 1, "identity", True, False),
    (128, 1024, 8, 8, 1024, 1, 1, 0, 1, 1, "relu", False, True),
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: f"n{c[0]}-{c[1]}x{c[2]}-{c[4]}-k{c[5]}s{c[6]}g{c[9]}")
def test_conv_bn_act_gpu_zoo_shapes(case, dtype):
    n, cin, h, w, cout, k, s, p, d, g, act, training, res = case
    check_conv_bn_act(n, cin, h, w, cout, k, s, p, d, g, act, training, res, dtype, "channels_last", False, dev="cuda")
