"""Which implementation runs the fused ops: backend selection and availability.

Backends:
  * ``triton``    -- Triton kernels in ``kernels/`` (GPU, or CPU under ``TRITON_INTERPRET=1``)
  * ``cuda``      -- the C++/CUDA extension ``fastcnn._C`` on CUDA tensors
  * ``cpu``       -- the C++ extension ``fastcnn._C`` on CPU tensors
  * ``reference`` -- plain PyTorch ops (what ``fused=False`` computes), for checking
  * ``auto``      -- per op and device, the fastest built backend (``AUTO_ORDER``); never
                     ``reference``: asking for fused ops that nothing implements is an error.

``set_backend(name)`` sets it process-wide, ``use_backend(name)`` for a ``with`` block.
Under ``torch.compile`` the choice is made once, when the graph is traced.
"""
from __future__ import annotations

import contextlib
import importlib
import os
import threading

import torch

BACKENDS = ("auto", "triton", "cuda", "cpu", "reference")

OPS = ("conv_bn_act", "bn_act", "conv_act", "se_block")

#: Order ``auto`` tries, per (device type, op), and why (the README's backend table is this).
#: CPU: Triton runs there only in its interpreter (orders of magnitude slower), so the compiled
#: extension is first; its speed against eager PyTorch is measured in bench/RESULTS.md.
#: CUDA: not measured yet (no GPU has been lent to this project); Triton is first because its
#: convolution fuses the BN statistics / folded BN, residual and activation into the conv
#: epilogue (one launch, one write), where the extension runs cuDNN's conv and then a separate
#: BN+activation pass. bench/bench_triton_*.py and bench_cuda_ext_fused.py measure both.
AUTO_ORDER: dict[tuple[str, str], tuple[str, ...]] = {
    **{("cpu", op): ("cpu", "triton") for op in OPS},
    **{("cuda", op): ("triton", "cuda") for op in OPS},
}

#: Python module implementing each op for each non-reference backend.
BACKEND_MODULES = {
    "triton": "fastcnn.ops.triton_backend",
    "cuda": "fastcnn.ops.extension_backend",
    "cpu": "fastcnn.ops.extension_backend",
    "reference": "fastcnn.ops.reference",
}

_state = threading.local()
_default = os.environ.get("FASTCNN_BACKEND", "auto")


class BackendUnavailableError(RuntimeError):
    """A fused op was asked of a backend that is not built or cannot run on this device."""


def check_backend(name: str) -> str:
    """``name`` if it is a backend name, else a ``ValueError`` listing the names."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    return name


def set_backend(name: str) -> None:
    """Set the process-wide backend for fused ops."""
    global _default
    _default = check_backend(name)


def get_backend() -> str:
    return getattr(_state, "override", None) or _default


@contextlib.contextmanager
def use_backend(name: str):
    """``with fastcnn.use_backend("cpu"): ...`` -- temporarily choose the backend."""
    check_backend(name)
    previous = getattr(_state, "override", None)
    _state.override = name
    try:
        yield
    finally:
        _state.override = previous


_MODULES: dict = {}


def _module(backend: str):
    mod = _MODULES.get(backend)
    if mod is None:
        mod = _MODULES[backend] = importlib.import_module(BACKEND_MODULES[backend])
    return mod


def unavailable_reason(backend: str, op: str, device_type: str) -> str | None:
    """None if ``backend`` can run ``op`` on ``device_type``, else a one-line reason."""
    try:
        mod = _module(backend)
    except ImportError as e:  # the backend's own dependency is missing
        return f"{backend}: {e}"
    reason = mod.unavailable_reason(op, device_type, backend)
    return reason


def available_backends(op: str, device_type: str) -> list[str]:
    return [b for b in BACKENDS[1:] if unavailable_reason(b, op, device_type) is None]


@torch.compiler.assume_constant_result
def resolve_name(op: str, device_type: str) -> str:
    """The backend that runs ``op`` on ``device_type`` now (see :func:`resolve`). Under
    ``torch.compile`` this is evaluated once, when the graph is traced: the compiled model
    keeps the backend that was chosen then."""
    return resolve(op, device_type)[0]


def implementation(op: str, device_type: str):
    """The function implementing ``op`` on ``device_type``; traceable by ``torch.compile``
    (no import or thread-local lookup inside the traced region)."""
    return getattr(_MODULES[resolve_name(op, device_type)], op)


def resolve(op: str, device_type: str):
    """Return ``(backend_name, implementation)`` for ``op`` on ``device_type`` or raise a
    ``BackendUnavailableError`` that says what is missing and what is available."""
    wanted = get_backend()
    candidates = AUTO_ORDER.get((device_type, op), ()) if wanted == "auto" else (wanted,)
    reasons = []
    for backend in candidates:
        reason = unavailable_reason(backend, op, device_type)
        if reason is None:
            return backend, getattr(_module(backend), op)
        reasons.append(reason)
    avail = available_backends(op, device_type)
    raise BackendUnavailableError(
        f"fused op {op!r} on {device_type} with backend {wanted!r} is not available: "
        + "; ".join(reasons or [f"no backend is known for device type {device_type!r}"])
        + f". Available for this op and device: {', '.join(avail) or 'none'}. "
        "Build the extension with `pip install -e .`, install Triton (CPU runs need "
        "TRITON_INTERPRET=1), pick another with fastcnn.set_backend(...), or use fused=False."
    )
