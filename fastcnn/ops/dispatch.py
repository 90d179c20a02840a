"""Which implementation runs the fused ops: backend selection, availability and the cached
lookup the layers use on every call.

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

from .composed import COMPOSED, chain
from .names import OPS

#: Compute capability from which Triton's ``tl.dot`` runs on tensor cores (mma); below it
#: (Turing sm_75, Volta sm_70) current Triton lowers ``tl.dot`` to FMA instructions.
TRITON_MMA_CAPABILITY = (8, 0)

_CPU_WHY = ("CPU: Triton runs on the CPU only in its interpreter (orders of magnitude slower), "
            "so the compiled extension is first; its speed against eager PyTorch is in bench/RESULTS.md")
_CONV_MMA_WHY = ("sm_80+: Triton's implicit-GEMM convolution uses the tensor cores (tl.dot -> mma) and "
                 "fuses the BN statistics / folded BN, residual and activation into its epilogue (one "
                 "launch, one write), where the extension runs cuDNN's conv and then a separate "
                 "BN+activation pass; not yet measured on a GPU (bench/bench_triton_*.py, "
                 "bench_cuda_ext_fused.py measure both)")
_CONV_FMA_WHY = ("below sm_80: Triton's tl.dot has no tensor-core path (it falls back to FMA) while "
                 "cuDNN's convolution uses the tensor cores (fp16 on Turing), so the convolution stays "
                 "cuDNN's (backend cuda) and the extension fuses BN / residual / activation after it")
_ELEMWISE_WHY = ("any capability: a memory-bound normalise/scale pass with no matrix product, so "
                 "tensor cores do not matter; Triton's version stays first until a GPU run compares "
                 "the two (neither has run on one): it reads NHWC tiles directly; by launches the "
                 "extension's BN+activation is now ahead (2 each way against Triton's 3)")

#: Order ``auto`` tries, per (device type, op, lowest compute capability the entry applies to),
#: each with the reason for it (the README's backend table is this). A CUDA device uses the
#: entry with the highest capability not above its own; CPU entries have capability ``None``.
AUTO_ORDER: dict[tuple[str, str, tuple[int, int] | None], tuple[tuple[str, ...], str]] = {
    **{("cpu", op, None): (("cpu", "triton"), _CPU_WHY) for op in OPS},
    ("cuda", "conv_bn_act", (0, 0)): (("cuda", "triton"), _CONV_FMA_WHY),
    ("cuda", "conv_act", (0, 0)): (("cuda", "triton"), _CONV_FMA_WHY),
    ("cuda", "conv_bn_act", TRITON_MMA_CAPABILITY): (("triton", "cuda"), _CONV_MMA_WHY),
    ("cuda", "conv_act", TRITON_MMA_CAPABILITY): (("triton", "cuda"), _CONV_MMA_WHY),
    ("cuda", "bn_act", (0, 0)): (("triton", "cuda"), _ELEMWISE_WHY),
    ("cuda", "se_block", (0, 0)): (("triton", "cuda"), _ELEMWISE_WHY),
}


def auto_entry(op: str, device_type: str, capability: tuple[int, int] | None = None):
    """``(order, reason)`` of the :data:`AUTO_ORDER` entry for ``op`` on a device of
    ``device_type`` with compute ``capability`` (CUDA); ``((), "")`` when none applies.
    An unknown CUDA capability (``None``: no GPU visible) takes the newest entry."""
    entries = [(cap, v) for (dev, o, cap), v in AUTO_ORDER.items() if dev == device_type and o == op]
    if not entries:
        return (), ""
    if device_type != "cuda":
        return entries[0][1]
    fitting = [(cap, v) for cap, v in entries if capability is None or tuple(capability) >= cap]
    return max(fitting, key=lambda e: e[0])[1] if fitting else ((), "")


#: Python module of each backend; each exports ``IMPLEMENTATIONS``, its ``{op: function}`` table,
#: and ``unavailable_reason(op, device_type, backend)``.
BACKEND_MODULES = {
    "triton": "fastcnn.ops.triton_backend",
    "cuda": "fastcnn.ops.extension_backend",
    "cpu": "fastcnn.ops.extension_backend",
    "reference": "fastcnn.ops.reference",
}

class _ThreadState(threading.local):
    """The backend chosen by :func:`use_backend` in this thread (None: the process-wide one).
    A class default rather than ``getattr(local, name, None)``: a missing attribute of a
    ``threading.local`` raises and catches an AttributeError, about 1.3 us on every fused layer
    call, where this read costs 0.15 us."""

    override: str | None = None


_state = _ThreadState()
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
    clear_cache()


def get_backend() -> str:
    return _state.override or _default


@contextlib.contextmanager
def use_backend(name: str):
    """``with fastcnn.use_backend("cpu"): ...`` -- temporarily choose the backend."""
    check_backend(name)
    previous = _state.override
    _state.override = name
    try:
        yield
    finally:
        _state.override = previous


_MODULES: dict = {}


def _split_device(device) -> tuple[str, int | None]:
    """(type, index) of a device given as ``"cuda"``, ``"cuda:1"`` or a ``torch.device``."""
    d = torch.device(device)
    return d.type, d.index


def device_capability(device) -> tuple[int, int] | None:
    """Compute capability of a CUDA ``device`` (the current one if it has no index), or None
    for other devices and when no GPU is visible."""
    dev_type, index = _split_device(device)
    if dev_type != "cuda" or not torch.cuda.is_available():
        return None
    return _capability(torch.cuda.current_device() if index is None else index)


_CAPS: dict[int, tuple[int, int]] = {}


def _capability(index: int) -> tuple[int, int]:
    cap = _CAPS.get(index)
    if cap is None:
        cap = _CAPS[index] = tuple(torch.cuda.get_device_capability(index))
    return cap


def _parse_arch(arch: str) -> tuple[str, int, int, bool]:
    """'sm_86' -> ('sm', 8, 6, False); 'compute_90a' -> ('compute', 9, 0, True)."""
    kind, _, num = arch.partition("_")
    specific = num[-1:] in ("a", "f")
    digits = num.rstrip("af")
    if kind not in ("sm", "compute") or not digits.isdigit() or len(digits) < 2:
        raise ValueError(f"not a CUDA architecture name: {arch!r}")
    return kind, int(digits[:-1]), int(digits[-1]), specific and num.endswith("a")


def arch_runs_on(arch: str, capability: tuple[int, int]) -> bool:
    """Whether code built for ``arch`` loads on a GPU of compute ``capability``:

    * machine code ``sm_XY`` runs on the same major version with a minor version >= Y
      (sm_80 runs on 8.0, 8.6, 8.9; not on 7.5 or 9.0);
    * PTX ``compute_XY`` is JIT-compiled by the driver for any capability >= X.Y;
    * arch-specific targets (``sm_90a``, ``compute_90a``) run on exactly X.Y.
    """
    kind, major, minor, exact = _parse_arch(arch)
    cap = tuple(capability)
    if exact:
        return cap == (major, minor)
    if kind == "sm":
        return cap[0] == major and cap[1] >= minor
    return cap >= (major, minor)


def cuda_arch_reason(built: list[str] | tuple[str, ...], capability: tuple[int, int],
                     device_name: str = "this GPU") -> str | None:
    """None if a library holding ``built`` architectures runs on ``capability``, else the
    one-line reason (what the GPU is, what the library holds, how to rebuild)."""
    if any(arch_runs_on(a, capability) for a in built):
        return None
    major, minor = capability
    return (f"cuda: fastcnn._C holds code for {', '.join(built) or 'no architecture'} only, which "
            f"cannot run on {device_name} (compute capability {major}.{minor}); rebuild with "
            f"`FASTCNN_CUDA_ARCH={major}.{minor} pip install --no-build-isolation -e .` "
            "(or unset FASTCNN_CUDA_ARCH to build for every target GPU)")


def built_cuda_archs() -> list[str] | None:
    """The CUDA architectures the built extension holds (``fastcnn._C.cuda_archs()``), or None
    when the extension is missing or predates that record."""
    try:
        ext = importlib.import_module("fastcnn._C")
    except ImportError:
        return None
    fn = getattr(ext, "cuda_archs", None)
    return list(fn()) if fn is not None else None


_ARCH_REASONS: dict[int, str | None] = {}


def _cuda_device_reason(index: int | None) -> str | None:
    """Why the extension's CUDA kernels cannot run on GPU ``index`` (None: they can)."""
    if not torch.cuda.is_available():
        return None  # no GPU at all: the ops are never launched on CUDA tensors
    index = torch.cuda.current_device() if index is None else index
    if index not in _ARCH_REASONS:
        built = built_cuda_archs()
        if built is None:
            reason = ("cuda: this fastcnn._C does not record its CUDA architectures (built before "
                      "they were recorded); rebuild with `pip install --no-build-isolation -e .`")
        else:
            reason = cuda_arch_reason(built, _capability(index), torch.cuda.get_device_name(index))
        _ARCH_REASONS[index] = reason
    return _ARCH_REASONS[index]


def _module(backend: str):
    mod = _MODULES.get(backend)
    if mod is None:
        mod = _MODULES[backend] = importlib.import_module(BACKEND_MODULES[backend])
    return mod


def unavailable_reason(backend: str, op: str, device) -> str | None:
    """None if ``backend`` can run ``op`` on ``device`` (a device type such as ``"cuda"``, or
    a device such as ``"cuda:1"``), else a one-line reason. For the ``cuda`` backend this
    includes whether the extension holds code for the GPU's architecture (a plain ``"cuda"``
    means the current GPU)."""
    device_type, index = _split_device(device)
    try:
        mod = _module(backend)
    except ImportError as e:  # the backend's own dependency is missing
        return f"{backend}: {e}"
    reason = mod.unavailable_reason(op, device_type, backend)
    if reason is None and backend == "cuda" and device_type == "cuda":
        reason = _cuda_device_reason(index)
    return reason


def available_backends(op: str, device) -> list[str]:
    return [b for b in BACKENDS[1:] if unavailable_reason(b, op, device) is None]


@torch.compiler.assume_constant_result
def resolve_name(op: str, device_type: str, device_index: int | None = None) -> str:
    """The backend that runs ``op`` on the device now (see :func:`resolve`). Under
    ``torch.compile`` this is evaluated once, when the graph is traced: the compiled model
    keeps the backend that was chosen then."""
    device = device_type if device_index is None else f"{device_type}:{device_index}"
    return resolve(op, device)[0]


#: (op, device -- a torch.device or a device type --, requested backend) -> implementation, filled by
#: :func:`implementation`; availability does not change while a process runs, except where a
#: test fakes it (tests/conftest.py clears the cache around every test).
_RESOLVED: dict = {}


def clear_cache() -> None:
    """Forget resolved implementations (after :func:`set_backend`, or a test that fakes a GPU)."""
    _RESOLVED.clear()


def implementation(op: str, device):
    """The function implementing ``op`` on ``device`` (a device type or a ``torch.device``).
    Eager calls hit a dictionary (one lookup per layer call); under ``torch.compile`` the choice
    goes through :func:`resolve_name`, a constant for the traced graph. ``op`` may also be a
    composed op (:mod:`.composed`)."""
    if torch.compiler.is_compiling():
        if op in COMPOSED:
            return _composed(op, [implementation(part, device) for part in COMPOSED[op]],
                             [_traced_name(part, device) for part in COMPOSED[op]])
        return _MODULES[_traced_name(op, device)].IMPLEMENTATIONS[op]
    # keyed by the device as given (a torch.device hashes and compares by type and index;
    # reading .type and .index for the key cost more than the lookup itself)
    key = (op, device, _state.override or _default)
    fn = _RESOLVED.get(key)
    if fn is None:
        if op in COMPOSED:
            parts = [resolve(part, device) for part in COMPOSED[op]]
            fn = _composed(op, [impl for _, impl in parts], [name for name, _ in parts])
        else:
            fn = resolve(op, device)[1]
        _RESOLVED[key] = fn
    return fn


def _traced_name(op: str, device) -> str:
    if isinstance(device, torch.device):
        return resolve_name(op, device.type, device.index)
    return resolve_name(op, device)


def _composed(op: str, impls: list, backends: list[str]):
    """A composed op: the backend's own one when every part resolves to that backend and it
    has it, else the parts' implementations chained."""
    if len(set(backends)) == 1:
        own = _module(backends[0]).IMPLEMENTATIONS.get(op)
        if own is not None:
            return own
    return chain(op, *impls)


def resolve(op: str, device):
    """Return ``(backend_name, implementation)`` for ``op`` on ``device`` (a device type or a
    device; CUDA entries of :data:`AUTO_ORDER` depend on its compute capability) or raise a
    ``BackendUnavailableError`` that says what is missing and what is available."""
    device_type, _ = _split_device(device)
    wanted = get_backend()
    if wanted == "auto":
        candidates = auto_entry(op, device_type, device_capability(device))[0]
    else:
        candidates = (wanted,)
    reasons = []
    for backend in candidates:
        reason = unavailable_reason(backend, op, device)
        if reason is None:
            return backend, _module(backend).IMPLEMENTATIONS[op]
        reasons.append(reason)
    avail = available_backends(op, device)
    raise BackendUnavailableError(
        f"fused op {op!r} on {device_type} with backend {wanted!r} is not available: "
        + "; ".join(reasons or [f"no backend is known for device type {device_type!r}"])
        + f". Available for this op and device: {', '.join(avail) or 'none'}. "
        "Build the extension with `pip install -e .`, install Triton (CPU runs need "
        "TRITON_INTERPRET=1), pick another with fastcnn.set_backend(...), or use fused=False."
    )
