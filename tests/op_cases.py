"""Shared pieces of the op tests (``tests/test_op_*.py``, one file per fused op) and of the
backend tests that compare with a reference (``test_triton_models.py``,
``test_extension_*.py``): input makers, the one comparison with :mod:`fastcnn.ops.reference`
and its tolerance table, and the backend parametrisation. Nothing else lives here.

Inputs (:func:`make`, :func:`tensor`)
    Values are drawn in fp32 and rounded to the test dtype *before* anything runs, so the
    backend, the truth and PyTorch's own low-precision run all see the very same numbers.
    Activation layouts (:data:`LAYOUTS`): ``nchw`` (contiguous), ``channels_last``, and
    ``strided`` -- a view taking every other column of a wider tensor and dropping its first
    channel: not dense in any layout, with a storage offset (the view itself is the leaf that
    receives the gradient, so the kernels really see it).

The comparison (:func:`assert_close`, :func:`check_op`)
    The *truth* is the reference op evaluated in float64 on those same (already rounded)
    inputs. The low-precision kernels compute in fp32 on the rounded values, so this is the
    answer they approximate (the former ``extension_cases`` compared with the reference in
    fp32 on rounded inputs; float64 makes that answer exact), and the fp32 kernels are held
    to it too. Next to it the reference also runs in the test dtype itself, as PyTorch
    would compute the unfused layers in that precision (the former ``test_triton_common``).
    A result passes when

        max|ours - truth| <= 4 * max|torch - truth| + REL[dtype] * max|truth| + 1e-6

    * ``4 x`` PyTorch's own error: some quantities are ill-conditioned -- BN input gradients
      at batch 1-2, a channel mean far above its spread, long reductions in bf16 -- and lose
      digits in any implementation of that precision; PyTorch's loss measures how many, and a
      fused kernel (different summation order, one rounding instead of several) may lose a
      few times that much.
    * ``REL``: the slack for well-conditioned results, relative to the tensor's largest
      magnitude. fp16/bf16: one unit in the last place at that magnitude (2**-10, 2**-7):
      the kernels round once when they store, PyTorch's own error already covers rounding
      inside the reference, and a wrong result is off by far more. fp32: 2e-5 (~170 ulp):
      reductions over up to ~10^4 terms in another order, and TF32 on GPUs where PyTorch
      uses it too. float64: for code that runs the reference itself in float64.
    * ``1e-6``: tensors that are (nearly) zero everywhere, e.g. the gradient of a dead unit.

    One backend stores an intermediate by design: the extension's ``conv_act`` runs ATen's
    convolution *without* the bias in x's dtype and adds bias, residual and activation in its
    fp32 epilogue (:data:`ROUNDED_CONV`; with identity it is ATen's conv and add). Its truth
    rounds the convolution output (and the gradient flowing back into it) to x's dtype the
    same way, as the inputs are rounded: otherwise a relu kink within one bf16 ulp of z
    flips sides and moves one gradient element by a whole ``gy * w`` -- neither side wrong,
    but no tolerance fits (PyTorch adds the bias inside the convolution's fp32 accumulator,
    so its own run has no such flips).

    Without ``torch_result`` (two implementations that must agree to rounding, e.g. the two
    CPU builds of one kernel) the bound is the ``REL`` and ``1e-6`` terms alone.
    :func:`check_op` runs one public op ``fastcnn.ops.<op>`` under a backend and applies
    this comparison to the output, every input gradient and the running statistics.

Backends (:data:`BACKENDS`, :func:`backends`, the ``backend`` fixture)
    ``@backends()`` parametrises a test over ``triton``, ``cpu``, ``cuda`` and ``reference``,
    ``@backends(*names)`` over some (:data:`GRID`: where the dense grids run); the test takes
    the ``backend`` fixture (import it from here), a :class:`Backend` with the name
    ``fastcnn.use_backend`` takes and the device its tensors go on. Triton runs on the GPU
    when there is one and in its interpreter otherwise (the root conftest.py sets
    ``TRITON_INTERPRET=1`` without CUDA), and is marked ``triton``; the extension's ``cpu``
    and ``cuda`` are marked ``extension``, ``cuda`` also ``gpu`` (skipped without a GPU). A
    backend that is not available here -- Triton not installed, ``fastcnn._C`` not built --
    skips its cases with the dispatcher's reason; a GPU machine whose extension was built
    without (runnable) CUDA kernels fails the ``cuda`` cases instead, since that is a broken
    build. ``reference`` runs the small case tables and argument errors too: through the
    public op it must reproduce its own dtype run exactly, which checks the harness and the
    dispatch to it.
"""
from __future__ import annotations

import contextlib
import importlib.util
from dataclasses import dataclass

import pytest
import torch

import fastcnn
from fastcnn import ops
from fastcnn.ops import dispatch, reference

# --------------------------------------------------------------------------- inputs

LAYOUTS = ("nchw", "channels_last", "strided")
#: every activation the fused kernels implement, each with a parameter that matters
ACTS = (("identity", 0.0), ("relu", 0.0), ("leaky_relu", 0.2), ("elu", 0.7), ("silu", 0.0), ("gelu", 0.0))
#: the default parameter of each activation in the op tests' case tables
ACT_PARAM = dict(ACTS)


def make(shape, layout="nchw", dtype=torch.float32, device="cpu", *, scale=1.0, offset=0.0,
         requires_grad=False):
    """An activation tensor of ``shape`` (N, C, H, W) in ``layout`` (see :data:`LAYOUTS`):
    ``randn * scale + offset`` drawn in fp32, rounded to ``dtype``; a leaf."""
    n, c, h, w = shape
    if layout == "strided":
        base = (torch.randn(n, c + 1, h, 2 * w, device=device) * scale + offset).to(dtype)
        t = base[:, 1:, :, ::2]
        assert not t.is_contiguous() and not t.is_contiguous(memory_format=torch.channels_last)
    else:
        t = (torch.randn(n, c, h, w, device=device) * scale + offset).to(dtype)
        if layout == "channels_last":
            t = t.contiguous(memory_format=torch.channels_last)
        elif layout != "nchw":
            raise ValueError(f"unknown layout {layout!r}; choose one of {LAYOUTS}")
    assert t.shape == shape
    return t.requires_grad_(requires_grad)


def tensor(*shape, dtype=torch.float32, device="cpu", scale=1.0, offset=0.0, uniform=False,
           requires_grad=False):
    """A parameter-like tensor: ``randn`` (or ``rand`` if ``uniform``) ``* scale + offset``,
    drawn in fp32 and rounded to ``dtype``; a leaf."""
    draw = torch.rand if uniform else torch.randn
    return (draw(*shape, device=device) * scale + offset).to(dtype).requires_grad_(requires_grad)


# --------------------------------------------------------------------------- the comparison

#: slack relative to the compared tensor's largest |truth|, by the dtype the op ran in
REL = {torch.float32: 2e-5, torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7, torch.float64: 1e-12}
#: how many times PyTorch's own error in the same dtype a backend may make
TORCH_ERROR_FACTOR = 4
ATOL = 1e-6


def assert_close(actual, truth, dtype, what="", torch_result=None):
    """``max|actual - truth| <= 4 * max|torch_result - truth| + REL[dtype] * max|truth| + 1e-6``
    (the module docstring says why); ``dtype``: the precision the computation ran in."""
    assert tuple(actual.shape) == tuple(truth.shape), (
        f"{what}: shape {tuple(actual.shape)} != {tuple(truth.shape)}")
    actual, truth = actual.detach().double(), truth.detach().double()
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    if not truth.numel():
        return
    scale = truth.abs().max().item()
    err = (actual - truth).abs().max().item()
    err_torch = 0.0
    if torch_result is not None:
        err_torch = (torch_result.detach().double() - truth).abs().max().item()
    bound = TORCH_ERROR_FACTOR * err_torch + REL[dtype] * scale + ATOL
    assert err <= bound, (f"{what}: max error {err:.3g} > tolerance {bound:.3g} "
                          f"(torch's own {dtype} error {err_torch:.3g}, scale {scale:.3g})")


#: tensor arguments the ops update in place
STATE = ("running_mean", "running_var")


def _copy(t, dtype=None):
    """A fresh leaf with ``t``'s values (in ``dtype``), requiring grad as ``t`` does."""
    if t is None:
        return None
    c = t.detach().to(dtype) if dtype is not None else t.detach()
    return c.clone().requires_grad_(t.requires_grad)


#: (backend, op): the convolution's output is stored in x's dtype before the bias is added
#: (every activation but identity, for which the extension's conv_act is ATen's conv and add)
ROUNDED_CONV = {("cpu", "conv_act"), ("cuda", "conv_act")}


def _conv_act_rounded_z(dtype):
    """reference.conv_act with conv(x) (no bias) rounded to ``dtype``, forward and backward."""
    def conv_act(x, weight, bias, *, stride, padding, dilation, groups, act, act_param, residual):
        z = torch.nn.functional.conv2d(x, weight, None, stride, padding, dilation, groups)
        z = z.to(dtype).to(z.dtype)
        if bias is not None:
            z = z + bias[:, None, None]
        return reference.activation(z if residual is None else z + residual, act, act_param)
    return conv_act


def _call(fn, op, tensors, options):
    """``fn`` (a backend's op or the reference) with the options the public op normalises."""
    checked = getattr(ops, f"check_{op}")(**tensors, **options)
    residual = checked.pop("residual")
    args = {k: v for k, v in tensors.items() if k != "residual"}
    return fn(**args, residual=residual, **checked)


def check_op(backend, op, tensors, *, grad=True, **options):
    """Runs ``fastcnn.ops.<op>(**tensors, **options)`` under ``backend`` and compares it with
    the reference in float64 (the truth) and in the test dtype (PyTorch's own error) with
    :func:`assert_close`: the output, the gradient of every tensor that requires grad (one
    random cotangent for all three runs), and the running statistics after the call (in
    eval mode: untouched, bit for bit). Also: the output keeps x's dtype and a
    channels_last x gives a channels_last output; each gradient has its input's dtype.

    ``tensors``: every tensor argument by name (``None`` where absent), created in the test
    dtype and layout on ``backend.device``; ``grad=False`` runs the op under ``no_grad``.
    Returns the backend's output."""
    x = tensors["x"]
    dtype = x.dtype
    initial = {k: _copy(tensors[k]) for k in STATE if tensors.get(k) is not None}
    truth_in = {k: _copy(v, torch.float64) for k, v in tensors.items()}
    torch_in = {k: _copy(v) for k, v in tensors.items()}
    with contextlib.ExitStack() as stack:
        if not grad:
            stack.enter_context(torch.no_grad())
        with fastcnn.use_backend(backend.name):
            y = getattr(ops, op)(**tensors, **options)
        truth = getattr(reference, op)
        if (backend.name, op) in ROUNDED_CONV and options.get("act", "relu") != "identity":
            truth = _conv_act_rounded_z(dtype)
        y_truth = _call(truth, op, truth_in, options)
        y_torch = _call(getattr(reference, op), op, torch_in, options)
    what = f"{op} [{backend.name}]"
    assert y.dtype == dtype, f"{what}: output dtype {y.dtype}, x has {dtype}"
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        assert y.is_contiguous(memory_format=torch.channels_last), f"{what}: output not channels_last"
    assert_close(y, y_truth, dtype, f"{what} output", y_torch)
    differentiable = [k for k, v in tensors.items() if v is not None and v.requires_grad]
    if grad and differentiable:
        gy = torch.randn(y.shape, device=y.device).to(y.dtype)
        grads = torch.autograd.grad(y, [tensors[k] for k in differentiable], gy)
        grads_truth = torch.autograd.grad(y_truth, [truth_in[k] for k in differentiable], gy.double())
        grads_torch = torch.autograd.grad(y_torch, [torch_in[k] for k in differentiable], gy)
        for name, g, g_truth, g_torch in zip(differentiable, grads, grads_truth, grads_torch):
            assert g.dtype == tensors[name].dtype, f"{what}: grad of {name} has dtype {g.dtype}"
            assert_close(g, g_truth, dtype, f"{what} grad of {name}", g_torch)
    for name, before in initial.items():
        if options.get("training", True):
            assert_close(tensors[name], truth_in[name], dtype, f"{what} {name}", torch_in[name])
        else:
            assert torch.equal(tensors[name], before), f"{what}: eval mode changed {name}"
    return y


# --------------------------------------------------------------------------- backends

@dataclass(frozen=True)
class Backend:
    """A backend as the tests use it: ``name`` for ``fastcnn.use_backend``, and the
    ``device`` its tensors go on."""
    name: str
    device: str


GPU = torch.cuda.is_available()
BACKENDS = {
    "triton": Backend("triton", "cuda" if GPU else "cpu"),  # without a GPU: the interpreter
    "cpu": Backend("cpu", "cpu"),
    "cuda": Backend("cuda", "cuda"),
    "reference": Backend("reference", "cpu"),
}
MARKS = {
    "triton": (pytest.mark.triton,),
    "cpu": (pytest.mark.extension,),
    "cuda": (pytest.mark.extension, pytest.mark.gpu),
    "reference": (),
}


#: where the dense grids (shapes x layouts x dtypes x activations) run: the extension on the
#: CPU, a few milliseconds a case. Not the Triton interpreter (about a second a conv case; it
#: covers the same features with each op's smaller CASES), not the reference (through the
#: public op it reproduces its own dtype run by construction: once per CASES is enough), and
#: not cuda, which has its own grid at GPU sizes.
GRID = ("cpu",)


def backends(*names):
    """Parametrises the test's ``backend`` fixture over ``names`` (default: every backend),
    each case id'd and marked with its backend."""
    names = names or tuple(BACKENDS)
    return pytest.mark.parametrize(
        "backend", [pytest.param(n, id=n, marks=MARKS[n]) for n in names], indirect=True)


def unavailable_reason(backend: Backend, op: str) -> str | None:
    """Why ``backend`` cannot run ``op`` here (None: it can). An extension primitive that is
    not a public op (``grouped_conv2d``) needs what every extension op needs."""
    return dispatch.unavailable_reason(backend.name, op if op in ops.OPS else ops.OPS[0], backend.device)


@pytest.fixture
def backend(request):
    """The :class:`Backend` of this case (see :func:`backends`), for the op named by the test
    module's ``OP``; skipped with the reason when it is not available here."""
    b = BACKENDS[request.param]
    reason = unavailable_reason(b, getattr(request.module, "OP", ops.OPS[0]))
    if reason is not None:
        if b.name == "cuda" and GPU and importlib.util.find_spec("fastcnn._C") is not None:
            pytest.fail(f"a GPU is present but the extension's cuda backend cannot run: {reason}")
        pytest.skip(reason)
    return b
