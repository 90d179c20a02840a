"""The ``cuda`` and ``cpu`` backends: the compiled extension ``fastcnn._C``, whose ops are
registered with the dispatcher as ``torch.ops.fastcnn.*`` (schemas in ``csrc/ops/<family>/``).

This module is the only Python code that talks to the extension. Each public op is one call of
a composite C++ op -- ``conv_bn_act``, ``bn_act``, ``conv_act``, ``se_block``, and the composed
``bn_act_conv`` (fastcnn/ops/composed.py) -- whose autograd
is written in C++ (csrc/ops/conv_layers/, csrc/ops/bn_act/, csrc/ops/se_block/): one dispatcher
call forward and one autograd node backward per fused layer,
the running statistics updated and eval-mode BN folded inside the op. The convolution runs
through ATen (cuDNN / oneDNN) inside the op; BN statistics, normalisation, residual and
activation through the extension's channel_act kernels.

What stays here: fake implementations (``torch.library.register_fake``) of every op for
``torch.compile`` and FakeTensor, autograd formulas of the primitive ops (``bn_act_forward``,
``scale_shift_act``, ``se_block_forward``, ``grouped_conv2d``) for callers that use them
directly, and marking outputs rebuildable (:mod:`fastcnn.recompute`) from what the composites
return (the convolution output and the batch statistics).

Convolution choice: the direct ``grouped_conv2d`` op (csrc/ops/grouped_conv/) is
registered and tested, but the composites use ATen's convolution for every shape; see
``GROUPED_CONV_NOTE`` for the CPU measurement behind that.
"""
from __future__ import annotations

import importlib

import torch
import torch.nn.functional as F

from .. import recompute
from ..recompute import active as _rebuild_active, mark_op_output
from .layout import kernel_format
from .names import OPS

OPS_IN_EXTENSION = OPS

#: the public ops this backend implements once ``fastcnn._C`` has loaded (empty otherwise)
IMPLEMENTED_OPS: tuple[str, ...] = ()

GROUPED_CONV_NOTE = (
    "grouped_conv2d (direct kernel) measured 12-25x slower than oneDNN's grouped convolution "
    "at the ResNeXt-29 4x64d shapes and 3x slower on a depthwise layer on CPU "
    "(bench/RESULTS.md, bench/bench_cpu_grouped_conv.py), so conv_bn_act uses F.conv2d."
)


def _extension():
    try:
        return importlib.import_module("fastcnn._C"), None
    except ImportError as e:
        return None, str(e)


def unavailable_reason(op: str, device_type: str, backend: str) -> str | None:
    ext, err = _extension()
    if ext is None:
        return f"{backend}: the extension fastcnn._C is not built ({err}); run `pip install -e .`"
    if backend != device_type:
        return f"{backend}: backend {backend!r} runs on {backend} tensors, not {device_type}"
    if backend == "cuda" and not ext.has_cuda():
        return "cuda: fastcnn._C was built without its CUDA kernels (FASTCNN_CUDA=0 or no nvcc); rebuild with `pip install -e .`"
    if op not in IMPLEMENTED_OPS:
        return f"{backend}: the extension has no {op!r} op"
    return None


# --------------------------------------------------------------------------- fake impls
def _like(x: torch.Tensor) -> torch.Tensor:
    return torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=kernel_format(x))


def _none_grad(x: torch.Tensor) -> torch.Tensor:
    return x.new_empty(0)


def _f32(x: torch.Tensor, *shape) -> torch.Tensor:
    return x.new_empty(shape, dtype=torch.float32)


def _register_fakes() -> None:
    lib = "fastcnn::"

    @torch.library.register_fake(lib + "bn_act_forward")
    def _(x, weight, bias, residual, eps, act, act_param):
        return _like(x), _f32(x, x.shape[1]), _f32(x, x.shape[1])

    @torch.library.register_fake(lib + "bn_act_apply")
    def _(x, weight, bias, residual, mean, var, eps, act, act_param):
        return _like(x)

    @torch.library.register_fake(lib + "bn_act_backward")
    def _(grad_y, x, weight, bias, residual, mean, var, eps, act, act_param):
        gr = _like(x) if residual is not None else _none_grad(x)
        return _like(x), gr, torch.empty_like(weight), torch.empty_like(bias)

    @torch.library.register_fake(lib + "scale_shift_act")
    def _(x, scale, shift, residual, act, act_param):
        return _like(x)

    @torch.library.register_fake(lib + "scale_shift_act_backward")
    def _(grad_y, x, scale, shift, residual, act, act_param):
        gr = _like(x) if residual is not None else _none_grad(x)
        gs = torch.empty_like(scale) if scale is not None else _none_grad(x)
        gt = torch.empty_like(shift) if shift is not None else _none_grad(x)
        return _like(x), gr, gs, gt

    @torch.library.register_fake(lib + "se_block_forward")
    def _(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, residual, act, act_param):
        return _like(x), _f32(x, x.shape[0], x.shape[1])

    @torch.library.register_fake(lib + "se_block_backward")
    def _(grad_y, x, pooled, fc1_weight, fc1_bias, fc2_weight, fc2_bias, residual, act, act_param):
        gr = _like(x) if residual is not None else _none_grad(x)
        gb1 = (fc1_bias if fc1_bias is not None else fc1_weight).new_empty(fc1_weight.shape[0])
        gb2 = (fc2_bias if fc2_bias is not None else fc2_weight).new_empty(fc2_weight.shape[0])
        return (_like(x), gr, torch.empty_like(fc1_weight), gb1, torch.empty_like(fc2_weight), gb2)

    def _stats(x, training):
        c = x.shape[1] if training else 0
        return _f32(x, c), _f32(x, c)

    def _conv_out(x, weight, stride, padding, dilation):
        n, _c, h, w = x.shape
        k, _ci, kh, kw = weight.shape
        oh = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
        ow = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
        return torch.empty((n, k, oh, ow), dtype=x.dtype, device=x.device, memory_format=kernel_format(x))

    @torch.library.register_fake(lib + "bn_act")
    def _(x, weight, bias, running_mean, running_var, residual, training, momentum, eps, act, act_param):
        return (_like(x), *_stats(x, training))

    @torch.library.register_fake(lib + "conv_bn_act")
    def _(x, weight, bias, bn_weight, bn_bias, running_mean, running_var, residual, stride, padding,
          dilation, groups, training, momentum, eps, act, act_param):
        z = _conv_out(x, weight, stride, padding, dilation)
        return (_like(z), z, *_stats(z, training))

    @torch.library.register_fake(lib + "conv_act")
    def _(x, weight, bias, residual, stride, padding, dilation, groups, act, act_param):
        z = _conv_out(x, weight, stride, padding, dilation)
        # mirror of what_to_keep in the conv_act op: the pre-activation unless act' follows from y
        from_output = act in ("identity", "relu") or (act == "leaky_relu" and act_param >= 0) or \
            (act == "elu" and act_param > 0)
        return _like(z), (x.new_empty(0) if from_output else z)

    if hasattr(torch.ops.fastcnn, "bn_act_conv"):
        @torch.library.register_fake(lib + "bn_act_conv")
        def _(x, bn_weight, bn_bias, running_mean, running_var, weight, bias, residual, stride, padding,
              dilation, groups, training, momentum, eps, act, act_param, rebuild=True):
            return _conv_out(x, weight, stride, padding, dilation)

    @torch.library.register_fake(lib + "se_block")
    def _(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, residual, act, act_param):
        return _like(x)

    @torch.library.register_fake(lib + "grouped_conv2d")
    def _(x, weight, stride, padding, dilation, groups):
        return _conv_out(x, weight, stride, padding, dilation)

    @torch.library.register_fake(lib + "grouped_conv2d_backward")
    def _(grad_y, x, weight, stride, padding, dilation, groups, output_mask):
        gx = _like(x) if output_mask[0] else _none_grad(x)
        gw = torch.empty_like(weight, memory_format=torch.contiguous_format) if output_mask[1] else _none_grad(weight)
        return gx, gw


# --------------------------------------------------------------------------- autograd
def _register_autograd() -> None:
    ops = torch.ops.fastcnn

    # bn_act_forward -------------------------------------------------------------------
    def bn_setup(ctx, inputs, output):
        x, weight, bias, residual, eps, act, act_param = inputs
        _, mean, var = output
        ctx.save_for_backward(x, weight, bias, residual, mean, var)
        ctx.args = (eps, act, act_param)
        ctx.has_residual = residual is not None

    def bn_backward(ctx, grad_y, _grad_mean, _grad_var):
        x, weight, bias, residual, mean, var = ctx.saved_tensors
        gx, gr, gw, gb = ops.bn_act_backward(grad_y, x, weight, bias, residual if ctx.has_residual else None,
                                             mean, var, *ctx.args)
        return gx, gw, gb, (gr if ctx.has_residual else None), None, None, None

    torch.library.register_autograd("fastcnn::bn_act_forward", bn_backward, setup_context=bn_setup)

    # scale_shift_act ------------------------------------------------------------------
    def ss_setup(ctx, inputs, output):
        x, scale, shift, residual, act, act_param = inputs
        ctx.save_for_backward(x, scale, shift, residual)
        ctx.present = (scale is not None, shift is not None, residual is not None)
        ctx.args = (act, act_param)

    def ss_backward(ctx, grad_y):
        x, scale, shift, residual = ctx.saved_tensors
        has_s, has_t, has_r = ctx.present
        gx, gr, gs, gt = ops.scale_shift_act_backward(
            grad_y, x, scale if has_s else None, shift if has_t else None,
            residual if has_r else None, *ctx.args)
        return gx, (gs if has_s else None), (gt if has_t else None), (gr if has_r else None), None, None

    torch.library.register_autograd("fastcnn::scale_shift_act", ss_backward, setup_context=ss_setup)

    # se_block_forward -----------------------------------------------------------------
    def se_setup(ctx, inputs, output):
        x, w1, b1, w2, b2, residual, act, act_param = inputs
        ctx.save_for_backward(x, output[1], w1, b1, w2, b2, residual)
        ctx.present = (b1 is not None, b2 is not None, residual is not None)
        ctx.args = (act, act_param)

    def se_backward(ctx, grad_y, _grad_pooled):
        x, pooled, w1, b1, w2, b2, residual = ctx.saved_tensors
        has_b1, has_b2, has_r = ctx.present
        gx, gr, gw1, gb1, gw2, gb2 = ops.se_block_backward(
            grad_y, x, pooled, w1, b1 if has_b1 else None, w2, b2 if has_b2 else None,
            residual if has_r else None, *ctx.args)
        return (gx, gw1, (gb1 if has_b1 else None), gw2, (gb2 if has_b2 else None),
                (gr if has_r else None), None, None)

    torch.library.register_autograd("fastcnn::se_block_forward", se_backward, setup_context=se_setup)

    # grouped_conv2d -------------------------------------------------------------------
    def gc_setup(ctx, inputs, output):
        x, weight, stride, padding, dilation, groups = inputs
        ctx.save_for_backward(x, weight)
        ctx.args = (stride, padding, dilation, groups)

    def gc_backward(ctx, grad_y):
        x, weight = ctx.saved_tensors
        mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1]]
        gx, gw = ops.grouped_conv2d_backward(grad_y, x, weight, *ctx.args, mask)
        return (gx if mask[0] else None), (gw if mask[1] else None), None, None, None, None

    torch.library.register_autograd("fastcnn::grouped_conv2d", gc_backward, setup_context=gc_setup)


def _load() -> tuple[str, ...]:
    ext, _ = _extension()
    if ext is None or not all(hasattr(torch.ops.fastcnn, op) for op in ("bn_act_forward", *OPS)):
        return ()
    _register_fakes()
    _register_autograd()
    if hasattr(ext, "_set_recompute_pack_hook"):  # an extension built before it saves everything through the hooks
        recompute.use_pack_hook_setter(ext._set_recompute_pack_hook)
    return OPS_IN_EXTENSION


IMPLEMENTED_OPS = _load()


# --------------------------------------------------------------------------- public ops
def _direct(op: str):
    """``fastcnn._C.call_<op>``: the op called through its typed dispatcher handle, without the
    JIT's boxed path that ``torch.ops.fastcnn.<op>.default`` takes from Python (about 40,000
    instructions per call, counted: csrc/python_calls.cpp); the op overload itself when the
    loaded extension predates them. They skip only the ``__torch_function__`` protocol, so
    the public ops below take them only when :func:`_plain` holds."""
    ext, _ = _extension()
    fn = getattr(ext, f"call_{op}", None) if IMPLEMENTED_OPS else None
    if fn is None and IMPLEMENTED_OPS and hasattr(torch.ops.fastcnn, op):
        fn = getattr(torch.ops.fastcnn, op).default
    return fn


#: whether no argument overrides ``__torch_function__`` and no TorchFunctionMode is active
#: (then the direct entry points behave exactly as the torch.ops overloads)
_overridden = torch._C._has_torch_function_variadic

_CALL = {op: _direct(op) for op in ("bn_act", "conv_bn_act", "conv_act", "bn_act_conv", "se_block",
                                    "bn_act_apply", "scale_shift_act", "se_block_forward")}


# The rebuilds run in every fused model's backward, where no forward-time mode applies: always
# the direct entry points, called by the recipe itself (no Python frame in between):
# scale_shift_act(x, scale, shift, residual, act, act_param) and
# bn_act_apply(x, bn_weight, bn_bias, residual, mean, var, eps, act, act_param)
_rebuild_scale_shift_act = _CALL["scale_shift_act"]
_rebuild_bn_act = _CALL["bn_act_apply"]


#: positions of the activations among a rebuild's arguments (fastcnn.recompute captures only those)
_X_AND_RESIDUAL = (0, 3)
_X_AND_RESIDUAL_SE = (0, 5)


# A BN+activation output is rebuildable (fastcnn.recompute): bn_act_apply on the same input
# with the forward's own batch statistics (kept anyway for the op's backward: [C] vectors)
# gives y again bit for bit -- the same coefficients and elementwise kernel -- in one
# elementwise pass, without a second statistics pass; nothing extra is computed in forward. The
# input and the residual are held as their own recipes where they have one (a DenseNet
# concatenation, a ResNet block input), the BN weight, bias and statistics as they are (the
# op's own backward keeps them too). conv_bn_act and bn_act call mark_op_output directly (no
# helper frame: this runs for every fused layer in training).


def _rebuild_se(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, residual, act, act_param):
    return _CALL["se_block_forward"](x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, residual, act, act_param)[0]


def _pair(v):
    return (v, v) if isinstance(v, int) else v


# Under torch.compile the ops are traced as their parts -- ATen's convolution and the primitive
# ops above, whose fakes and autograd formulas are registered here -- rather than as the
# composites: the composites' C++ reads concrete sizes (the running-statistics factor
# count / (count - 1), argument checks), which dynamic-shape tracing does not have, and a
# compiled graph has no per-call host overhead to save anyway.
def _traced_bn_act(x, bn_weight, bn_bias, running_mean, running_var, training, momentum, eps, act,
                   act_param, residual):
    if training:
        y, mean, var = torch.ops.fastcnn.bn_act_forward(x, bn_weight, bn_bias, residual, eps, act, act_param)
        if running_mean is not None and momentum != 0.0:
            count = x.numel() // x.shape[1]
            with torch.no_grad():
                running_mean.lerp_(mean.to(running_mean.dtype), momentum)
                running_var.lerp_((var * (count / (count - 1))).to(running_var.dtype), momentum)
        return y
    scale = bn_weight.float() * torch.rsqrt(running_var.float() + eps)
    shift = bn_bias.float() - running_mean.float() * scale
    return torch.ops.fastcnn.scale_shift_act(x, scale, shift, residual, act, act_param)


def _traced_conv_act(x, weight, bias, residual, stride, padding, dilation, groups, act, act_param):
    if act == "identity":
        z = F.conv2d(x, weight, bias, stride, padding, dilation, groups)
        if residual is None:
            return z
        # in place when it changes nothing but memory (the convolution does not keep its output
        # for backward): z and the sum are then never alive together
        return z.add_(residual) if residual.dtype == z.dtype and residual.shape == z.shape else z + residual
    z = F.conv2d(x, weight, None, stride, padding, dilation, groups)
    return torch.ops.fastcnn.scale_shift_act(z, None, bias, residual, act, act_param)


def bn_act(x, bn_weight, bn_bias, running_mean, running_var, *, training=True, momentum=0.1,
           eps=1e-5, act="relu", act_param=0.0, residual=None):
    if torch.compiler.is_compiling():
        return _traced_bn_act(x, bn_weight, bn_bias, running_mean, running_var, training, momentum, eps, act,
                              act_param, residual)
    call = torch.ops.fastcnn.bn_act.default if _overridden(x, bn_weight, bn_bias, running_mean, running_var,
                                                          residual) else _CALL["bn_act"]
    y, mean, var = call(x, bn_weight, bn_bias, running_mean, running_var, residual, training, momentum, eps, act,
                        act_param)
    if training and y.requires_grad and _rebuild_active():
        mark_op_output(y, _rebuild_bn_act, (x, bn_weight, bn_bias, residual, mean, var, eps, act, act_param),
                       _X_AND_RESIDUAL)
    return y


def conv_bn_act(x, weight, bias, bn_weight, bn_bias, running_mean, running_var, *,
                stride=1, padding=0, dilation=1, groups=1, training=True, momentum=0.1,
                eps=1e-5, act="relu", act_param=0.0, residual=None):
    if torch.compiler.is_compiling():
        z = F.conv2d(x, weight, bias, stride, padding, dilation, groups)
        return _traced_bn_act(z, bn_weight, bn_bias, running_mean, running_var, training, momentum, eps, act,
                              act_param, residual)
    call = torch.ops.fastcnn.conv_bn_act.default if _overridden(
        x, weight, bias, bn_weight, bn_bias, running_mean, running_var, residual) else _CALL["conv_bn_act"]
    y, z, mean, var = call(
        x, weight, bias, bn_weight, bn_bias, running_mean, running_var, residual, _pair(stride),
        _pair(padding), _pair(dilation), groups, training, momentum, eps, act, act_param)
    if training and y.requires_grad and _rebuild_active():
        mark_op_output(y, _rebuild_bn_act, (z, bn_weight, bn_bias, residual, mean, var, eps, act, act_param),
                       _X_AND_RESIDUAL)
    return y


def conv_act(x, weight, bias, *, stride=1, padding=0, dilation=1, groups=1, act="relu",
             act_param=0.0, residual=None):
    if act == "identity" or torch.compiler.is_compiling():
        # identity: ATen's convolution and add are the whole op (the composite would call them)
        return _traced_conv_act(x, weight, bias, residual, _pair(stride), _pair(padding), _pair(dilation),
                                groups, act, act_param)
    call = torch.ops.fastcnn.conv_act.default if _overridden(x, weight, bias, residual) else _CALL["conv_act"]
    y, z = call(x, weight, bias, residual, _pair(stride), _pair(padding), _pair(dilation), groups, act, act_param)
    if z.numel() and y.requires_grad and _rebuild_active():
        # the op keeps z = conv(x) (silu, gelu); consumers of y keep a recipe (fastcnn.recompute)
        mark_op_output(y, _rebuild_scale_shift_act, (z, None, bias, residual, act, act_param), _X_AND_RESIDUAL)
    return y


def bn_act_conv(x, bn_weight, bn_bias, running_mean, running_var, weight, bias, *, stride=1, padding=0,
                dilation=1, groups=1, training=True, momentum=0.1, eps=1e-5, act="relu", act_param=0.0,
                residual=None):
    """The pre-activation unit as one composite (csrc/ops/conv_layers/bn_act_conv.cpp): in
    training inside a fused model's forward (the rebuild hooks active) its convolution's node
    rebuilds the BN+activation output in C++ instead of keeping it, so nothing is marked here;
    elsewhere (a lone unit, ``--keep-activations``, and eval, where the output would be
    rebuilt from running statistics that a training forward before backward may change) it
    keeps it, as unfused PyTorch."""
    if torch.compiler.is_compiling():
        h = _traced_bn_act(x, bn_weight, bn_bias, running_mean, running_var, training, momentum, eps, act,
                           act_param, None)
        return _traced_conv_act(h, weight, bias, residual, _pair(stride), _pair(padding), _pair(dilation), groups,
                                "identity", 0.0)
    call = torch.ops.fastcnn.bn_act_conv.default if _overridden(
        x, bn_weight, bn_bias, running_mean, running_var, weight, bias, residual) else _CALL["bn_act_conv"]
    return call(x, bn_weight, bn_bias, running_mean, running_var, weight, bias, residual, _pair(stride),
                _pair(padding), _pair(dilation), groups, training, momentum, eps, act, act_param,
                training and _rebuild_active())


def se_block(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, *, residual=None, act="relu",
             act_param=0.0):
    if torch.compiler.is_compiling():
        return torch.ops.fastcnn.se_block_forward(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, residual, act,
                                                  act_param)[0]
    call = torch.ops.fastcnn.se_block.default if _overridden(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias,
                                                             residual) else _CALL["se_block"]
    y = call(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, residual, act, act_param)
    if y.requires_grad and _rebuild_active():
        # the block output (consumed by the next block's conv and shortcut) is rebuilt from x
        # and the residual -- both recipes themselves in a fused SE-ResNeXt
        mark_op_output(y, _rebuild_se, (x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, residual, act, act_param),
                       _X_AND_RESIDUAL_SE)
    return y


#: this backend's ops (dispatch looks them up here)
IMPLEMENTATIONS = {"conv_bn_act": conv_bn_act, "bn_act": bn_act, "conv_act": conv_act, "se_block": se_block,
                   "bn_act_conv": bn_act_conv}
if IMPLEMENTED_OPS and not hasattr(torch.ops.fastcnn, "bn_act_conv"):
    # an extension built before the composed op: fastcnn.ops.composed chains bn_act and conv_act
    del IMPLEMENTATIONS["bn_act_conv"]
