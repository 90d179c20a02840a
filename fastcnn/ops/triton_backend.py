"""The ``triton`` backend: the Triton kernels of ``kernels/`` (installed as
``fastcnn.kernels``), each an autograd Function behind the signature of
:mod:`fastcnn.ops.reference`."""
from __future__ import annotations

import importlib
import os

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


def conv_bn_act(*args, **kwargs):
    return _impl("conv_bn_act")(*args, **kwargs)


def bn_act(*args, **kwargs):
    return _impl("bn_act")(*args, **kwargs)


def conv_act(*args, **kwargs):
    return _impl("conv_act")(*args, **kwargs)


def se_block(*args, **kwargs):
    return _impl("se_block")(*args, **kwargs)
