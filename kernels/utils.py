"""Host-side helpers shared by the Triton ops: layout conversion (NCHW <-> NHWC), block-size
choice, interpreter detection and the dot-product precision that matches cuDNN's."""
from __future__ import annotations

import os

import torch
import triton


def interpreting() -> bool:
    """True when kernels run in the Triton interpreter (CPU, ``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _fix_interpreter_scalar_index() -> bool:
    """Make Triton 3.6's interpreter accept runtime scalars as ``range`` bounds with NumPy >= 2.4.

    Why: the interpreter holds every scalar kernel argument as a 1-element 1-D NumPy array and
    converts it for ``range(...)`` with ``int(array)``, which NumPy 2.4 rejects ("only
    0-dimensional arrays can be converted to Python scalars"), so every kernel whose loop bound
    is a runtime value (the convolutions' reduction loops) fails on the Triton 3.6 + NumPy 2.4
    that GPU images ship. Triton 3.8 converts with ``int(array.squeeze())``; this installs that
    same conversion into 3.6's per-launch patching of ``tl.tensor``. Nothing changes for the
    compiler (GPU) path or on a Triton whose interpreter already squeezes.
    Returns whether the fix was installed.
    """
    import inspect

    try:
        from triton.runtime import interpreter
    except ImportError:
        return False
    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None or getattr(original, "_fastcnn_fixed", False):
        return False
    try:
        src = inspect.getsource(original)
    except (OSError, TypeError):
        return False
    if "int(self.handle.data)" not in src:  # already converts safely (Triton >= 3.7)
        return False

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    patched._fastcnn_fixed = True
    interpreter._patch_lang_tensor = patched
    return True


_fix_interpreter_scalar_index()  # only the interpreter's patching changes: harmless when compiling


def to_nhwc(t: torch.Tensor | None) -> torch.Tensor | None:
    """(N, C, H, W) tensor -> contiguous (N, H, W, C) tensor. A channels_last input is a
    free view; any other layout (NCHW, non-contiguous) is copied once."""
    if t is None:
        return None
    return t.permute(0, 2, 3, 1).contiguous()


def from_nhwc(t: torch.Tensor) -> torch.Tensor:
    """Contiguous (N, H, W, C) buffer -> (N, C, H, W) view in channels_last memory format."""
    return t.permute(0, 3, 1, 2)


def nchw_output(yh: torch.Tensor) -> torch.Tensor:
    """The (N, C, H, W) channels_last tensor an op returns for its NHWC result buffer ``yh``.
    Unlike ``from_nhwc`` (a view) it owns the storage, so callers may change it in place
    (``relu_``, ``+=``): autograd forbids in-place changes to views made in a custom Function."""
    n, h, w, c = yh.shape
    out = yh.new_empty(0)
    return out.set_(yh.untyped_storage(), yh.storage_offset(), (n, c, h, w), (h * w * c, 1, w * c, c))


def rebuild_nchw(fn, *args) -> torch.Tensor:
    """``nchw_output(fn(*args))``: the recipe the ops give :mod:`fastcnn.recompute` for an
    output they returned through :func:`nchw_output`."""
    return nchw_output(fn(*args))


def pow2(n: int, lo: int = 16, hi: int = 128) -> int:
    """The next power of two >= n, clamped to [lo, hi]."""
    return max(lo, min(hi, triton.next_power_of_2(max(1, int(n)))))


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 GEMMs use TF32 exactly when cuDNN's convolutions would (``torch.backends.cudnn.
    allow_tf32``, on by default), so the fused ops match the unfused ones on the same GPU."""
    if dtype == torch.float32 and not torch.backends.cudnn.allow_tf32:
        return "ieee"
    return "tf32"


def upcast_dot(dtype: torch.dtype) -> bool:
    """The interpreter's bf16 ``tl.dot`` returns garbage (Triton 3.8): feed it fp32 operands
    there (exact: bf16 -> fp32 is lossless). On GPUs bf16 goes to the tensor cores."""
    return interpreting() and dtype == torch.bfloat16


def num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1
