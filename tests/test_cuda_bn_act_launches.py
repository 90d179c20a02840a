"""The extension's fused BatchNorm + activation on a GPU (``gpu`` marker: skipped without one):

* kernel launches, counted with ``torch.profiler``: a fused BN+ReLU layer's training forward +
  backward (running statistics included) issues no more than eager ``nn.BatchNorm2d`` + ReLU
  (cuDNN), NCHW and channels_last, C = 16 and 64; and each primitive issues the number the
  design notes of csrc/channel_act/cuda/channel_act_kernel.cu list (forward 2, backward 2 --
  each reduction's last block does the finalize -- rebuild 1, eval 1);
* results: the fused layer against eager in the same dtype and a float64 truth (y, the
  gradients of x / weight / bias, the running statistics) for C in {16, 32, 64, 256},
  fp32 / fp16 / bf16 activations (fp32 BN parameters, as autocast keeps them; fp16 parameters
  too), both memory formats -- the channels_last reductions' lane layout changes with C;
* the rebuild (``bn_act_apply``) gives ``bn_act_forward``'s y bit for bit, below and above the
  channel count whose coefficients its kernel keeps in shared memory;
* the last-block finalize: results the same bits run to run (below and above the channel count
  up to which the last block finalizes), on several streams at once (one ticket counter per
  stream), and in a CUDA graph replayed several times (each captured reduction its own
  counter), with eager calls on the same stream before and after.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch.autograd import DeviceType

import fastcnn
from fastcnn.layers.conv_bn_act import BnAct

from op_cases import ATOL, REL, TORCH_ERROR_FACTOR, backend, backends, make  # noqa: F401

pytestmark = [pytest.mark.gpu, pytest.mark.extension]

OP = "bn_act"  # what the backend fixture checks availability for


def device_events(fn):
    """Names of the device activities (kernels, memsets, memcpys) that one call of ``fn``
    issues, after a warm-up call (cuDNN and the caching allocator settle there)."""
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [e.name for e in prof.events() if e.device_type == DeviceType.CUDA]


def _layer(c, fused, param_dtype=torch.float32):
    layer = BnAct(c, "relu", fused=fused).cuda().to(param_dtype).train()
    with torch.no_grad():
        layer.bn.weight.uniform_(0.5, 1.5)
        layer.bn.bias.normal_()
        layer.bn.running_mean.normal_()
        layer.bn.running_var.uniform_(0.5, 2.0)
    return layer


def _step(layer, x, g):
    """One training step of the layer: forward, backward with the cotangent g (fresh grads)."""
    def run():
        layer.zero_grad(set_to_none=True)
        x.grad = None
        layer(x).backward(g)
    return run


# =========================================================================== launches

@backends("cuda")
@pytest.mark.parametrize("layout", ("nchw", "channels_last"))
@pytest.mark.parametrize("c", (16, 64))
def test_fused_layer_launches_no_more_than_eager(backend, c, layout):
    x = make((32, c, 16, 16), layout, device="cuda", requires_grad=True)
    g = make((32, c, 16, 16), layout, device="cuda")
    eager = device_events(_step(_layer(c, fused=False), x, g))
    with fastcnn.use_backend("cuda"):
        fused = device_events(_step(_layer(c, fused=True), x, g))
    assert len(fused) <= len(eager), f"fused {len(fused)}: {fused}\neager {len(eager)}: {eager}"
    # the design: num_batches_tracked's add, forward 2 (statistics + finalize, apply), backward 2
    assert len(fused) <= 5, fused


@backends("cuda")
@pytest.mark.parametrize("layout", ("nchw", "channels_last"))
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_primitive_launches(backend, layout, dtype):
    """The launch counts listed in the design notes, per primitive (no ATen op in between)."""
    c = 64
    x = make((8, c, 8, 8), layout, dtype, "cuda")
    gy = make((8, c, 8, 8), layout, dtype, "cuda")
    w, b = torch.rand(c, device="cuda") + 0.5, torch.randn(c, device="cuda")
    rm, rv = torch.zeros(c, device="cuda"), torch.ones(c, device="cuda")
    ops = torch.ops.fastcnn
    _, mean, var = ops.bn_act_forward(x, w, b, None, 1e-5, "relu", 0.0)
    forward = device_events(lambda: ops.bn_act_forward(x, w, b, None, 1e-5, "relu", 0.0))
    assert len(forward) == 2, forward
    backward = device_events(lambda: ops.bn_act_backward(gy, x, w, b, None, mean, var, 1e-5, "relu", 0.0))
    assert len(backward) == 2, backward
    assert len(device_events(lambda: ops.bn_act_apply(x, w, b, None, mean, var, 1e-5, "relu", 0.0))) == 1
    # the composite layer op: the running statistics are updated by the statistics kernel's
    # last block
    train = device_events(lambda: ops.bn_act(x, w, b, rm, rv, None, True, 0.1, 1e-5, "relu", 0.0))
    assert len(train) == 2, train
    evaluate = device_events(lambda: ops.bn_act(x, w, b, rm, rv, None, False, 0.0, 1e-5, "relu", 0.0))
    assert len(evaluate) == 1, evaluate


# =========================================================================== results

def _run(layer, x0, g, dtype):
    x = x0.detach().to(dtype).requires_grad_()
    y = layer(x)
    y.backward(g.to(dtype))
    bn = layer.bn
    return dict(y=y, x_grad=x.grad, weight_grad=bn.weight.grad, bias_grad=bn.bias.grad,
                running_mean=bn.running_mean, running_var=bn.running_var)


def _close(what, actual, truth, eager, dtype):
    """op_cases.assert_close's rule: within 4x eager's own error in the same dtype plus a
    dtype-sized slack relative to the largest |truth|."""
    actual, truth, eager = actual.detach().double(), truth.detach().double(), eager.detach().double()
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    err, err_eager = (actual - truth).abs().max().item(), (eager - truth).abs().max().item()
    bound = TORCH_ERROR_FACTOR * err_eager + REL[dtype] * truth.abs().max().item() + ATOL
    assert err <= bound, f"{what}: max error {err:.3g} > {bound:.3g} (eager's {err_eager:.3g})"


@backends("cuda")
@pytest.mark.parametrize("param_dtype", (torch.float32, None), ids=("fp32-params", "same-params"))
@pytest.mark.parametrize("layout", ("nchw", "channels_last"))
@pytest.mark.parametrize("dtype", (torch.float32, torch.float16, torch.bfloat16), ids=str)
@pytest.mark.parametrize("c", (16, 32, 64, 256))
def test_fused_layer_matches_eager(backend, c, dtype, layout, param_dtype):
    if param_dtype is None:
        param_dtype = dtype
    n, h, w = (16, 12, 12) if c < 256 else (8, 9, 7)
    x0 = make((n, c, h, w), layout, torch.float32, "cuda", scale=2.0, offset=0.5)
    g = make((n, c, h, w), layout, torch.float32, "cuda")
    base = _layer(c, fused=False)
    truth = _run(copy.deepcopy(base).double(), x0, g, torch.float64)
    eager = _run(copy.deepcopy(base).to(param_dtype), x0, g, dtype)
    fused_layer = copy.deepcopy(base).to(param_dtype)
    fused_layer.fused = True
    with fastcnn.use_backend("cuda"):
        fused = _run(fused_layer, x0, g, dtype)
    assert fused["y"].dtype == dtype and fused["y"].stride() == eager["y"].stride()
    for name in truth:
        assert fused[name].dtype == eager[name].dtype, name
        _close(name, fused[name], truth[name], eager[name], dtype)


@backends("cuda")
@pytest.mark.parametrize("layout", ("nchw", "channels_last"))
@pytest.mark.parametrize("dtype", (torch.float32, torch.float16, torch.bfloat16), ids=str)
@pytest.mark.parametrize("c", (16, 64, 3000))  # 3000: above the shared-memory coefficient cache
def test_rebuild_is_bit_identical(backend, c, dtype, layout):
    x = make((4, c, 5, 6), layout, dtype, "cuda", scale=2.0, offset=0.5)
    r = make((4, c, 5, 6), layout, dtype, "cuda")
    for pdtype in {torch.float32, dtype}:
        w = (torch.rand(c, device="cuda") + 0.5).to(pdtype)
        b = torch.randn(c, device="cuda").to(pdtype)
        for res in (None, r):
            y, mean, var = torch.ops.fastcnn.bn_act_forward(x, w, b, res, 1e-5, "silu", 0.0)
            again = torch.ops.fastcnn.bn_act_apply(x, w, b, res, mean, var, 1e-5, "silu", 0.0)
            assert again.stride() == y.stride()
            assert torch.equal(again, y)


# =========================================================================== last-block finalize

def _fwd_bwd(x, gy, w, b, r=None):
    """bn_act_forward then bn_act_backward: every tensor they return."""
    ops = torch.ops.fastcnn
    y, mean, var = ops.bn_act_forward(x, w, b, r, 1e-5, "relu", 0.0)
    gx, gr, gw, gb = ops.bn_act_backward(gy, x, w, b, r, mean, var, 1e-5, "relu", 0.0)
    return [y, mean, var, gx, gw, gb] + ([gr] if r is not None else [])


def _inputs(c, layout, dtype=torch.float32, n=8, hw=(8, 8)):
    x = make((n, c) + hw, layout, dtype, "cuda", scale=2.0, offset=0.5)
    gy = make((n, c) + hw, layout, dtype, "cuda")
    w, b = torch.rand(c, device="cuda") + 0.5, torch.randn(c, device="cuda")
    return x, gy, w, b


def _assert_same(got, want):
    for i, (a, b) in enumerate(zip(got, want)):
        assert torch.equal(a, b), f"output {i} differs"


@backends("cuda")
@pytest.mark.parametrize("layout", ("nchw", "channels_last"))
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
@pytest.mark.parametrize("c", (1, 16, 64, 300, 2048, 3000))  # 2048: the last block's limit; 3000: finalize kernel
def test_same_bits_run_to_run(backend, c, dtype, layout):
    x, gy, w, b = _inputs(c, layout, dtype, n=4, hw=(5, 6))
    r = make(x.shape, layout, dtype, "cuda")
    for res in (None, r):
        want = _fwd_bwd(x, gy, w, b, res)
        for _ in range(3):
            _assert_same(_fwd_bwd(x, gy, w, b, res), want)


@backends("cuda")
@pytest.mark.parametrize("layout", ("nchw", "channels_last"))
def test_streams_at_once(backend, layout):
    """Reductions on four streams at once: each stream's ticket counter is its own."""
    x, gy, w, b = _inputs(64, layout)
    want = _fwd_bwd(x, gy, w, b)
    streams = [torch.cuda.Stream() for _ in range(4)]
    torch.cuda.synchronize()
    outs = []
    for _ in range(4):
        for s in streams:
            with torch.cuda.stream(s):
                outs.append(_fwd_bwd(x, gy, w, b))
    torch.cuda.synchronize()
    for got in outs:
        _assert_same(got, want)


@backends("cuda")
@pytest.mark.parametrize("layout", ("nchw", "channels_last"))
@pytest.mark.parametrize("c", (64, 3000))
def test_cuda_graph_replay(backend, c, layout):
    """Captured and replayed: the same bits as eager, replay after replay (the captured
    reductions' counters end every replay at 0), and eager calls on the capturing thread's
    stream still right afterwards."""
    x, gy, w, b = _inputs(c, layout, n=4, hw=(6, 6))
    want = _fwd_bwd(x, gy, w, b)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the default stream, as torch.cuda.graph asks
        _fwd_bwd(x, gy, w, b)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = _fwd_bwd(x, gy, w, b)
    for _ in range(3):
        graph.replay()
        torch.cuda.synchronize()
        _assert_same(out, want)
    _assert_same(_fwd_bwd(x, gy, w, b), want)
