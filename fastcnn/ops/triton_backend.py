"""The ``triton`` backend: the Triton kernels of ``kernels/`` (installed as
``fastcnn.kernels``), each an autograd Function behind the signature of
:mod:`fastcnn.ops.reference`.

Device: a Triton kernel launches on the *current* CUDA device, whatever device its tensors
live on (the extension's ops have device guards; Triton's launcher has none). Each op here
therefore runs its forward under ``torch.cuda.device(x.device)`` when ``x`` is on another
GPU than the current one; the backward needs no guard, since autograd's engine runs each
backward on a thread whose current device is that of the op's tensors.

Rebuildable outputs: marking an output for :mod:`fastcnn.recompute` is this layer's job
(``fastcnn.kernels`` imports nothing from the rest of the package). While the recompute
hooks are active, ``bn_act``, ``conv_bn_act`` and ``se_block`` ask their kernels for the recipe
of the output (``rebuild=``: the apply launch and its inputs, which recompute it bit for bit)
and mark the output with :func:`fastcnn.recompute.mark_rebuildable` when it requires grad --
as :mod:`fastcnn.ops.extension_backend` does for the extension's ops. ``conv_act`` marks
nothing (its backward keeps what it needs, see ``kernels/conv_act.py``)."""
from __future__ import annotations

import contextlib
import importlib
import os

import torch

from ..recompute import active as _rebuild_active, mark_rebuildable

#: op name -> module of ``fastcnn.kernels`` that implements it (a function of the same name)
KERNEL_MODULES: dict[str, str] = {
    "conv_act": "conv_act",
    "bn_act": "bn_act",
    "conv_bn_act": "conv_bn_act",
    "se_block": "se_block",
}


def interpreter_mode() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def unavailable_reason(op: str, device_type: str, backend: str = "triton") -> str | None:
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton: Triton is not installed (pip install triton)"
    if device_type == "cpu" and not interpreter_mode():
        return "triton: CPU tensors run Triton kernels only under TRITON_INTERPRET=1 (slow; for testing)"
    if device_type == "cuda" and interpreter_mode():
        return "triton: TRITON_INTERPRET=1 is set, which runs kernels on the CPU; unset it for CUDA tensors"
    if device_type not in ("cpu", "cuda"):
        return f"triton: device type {device_type!r} is not supported"
    if op not in KERNEL_MODULES:
        return f"triton: no Triton kernel for {op!r}"
    return None


_IMPLS: dict = {}


def _impl(op):
    fn = _IMPLS.get(op)
    if fn is None:
        fn = _IMPLS[op] = getattr(importlib.import_module(f"fastcnn.kernels.{KERNEL_MODULES[op]}"), op)
    return fn


def device_guard(device: torch.device):
    """``torch.cuda.device(device)`` when ``device`` is a GPU other than the current one, else a
    no-op context: the check is one comparison, so same-device launches pay nothing more."""
    if device.type != "cuda" or device.index is None or device.index == torch.cuda.current_device():
        return contextlib.nullcontext()
    return torch.cuda.device(device)


def _run(op, x, *args, **kwargs):
    with device_guard(x.device):
        return _impl(op)(x, *args, **kwargs)


def _run_marked(op, x, args, kwargs):
    """``_run``, and while the recompute hooks are active, the output marked rebuildable with
    the recipe the kernels hand back (only filled when a recipe applies, e.g. in training)."""
    if not _rebuild_active():
        return _run(op, x, *args, **kwargs)
    recipe = []
    y = _run(op, x, *args, rebuild=recipe, **kwargs)
    if recipe and y.requires_grad:
        mark_rebuildable(y, *recipe)
    return y


def conv_bn_act(x, *args, **kwargs):
    return _run_marked("conv_bn_act", x, args, kwargs)


def bn_act(x, *args, **kwargs):
    return _run_marked("bn_act", x, args, kwargs)


def conv_act(x, *args, **kwargs):
    return _run("conv_act", x, *args, **kwargs)


def se_block(x, *args, **kwargs):
    return _run_marked("se_block", x, args, kwargs)


#: this backend's ops (dispatch looks them up here)
IMPLEMENTATIONS = {"conv_bn_act": conv_bn_act, "bn_act": bn_act, "conv_act": conv_act, "se_block": se_block}
