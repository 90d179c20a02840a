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


def rebuild_nchw_res(fn, xh, vectors, residual, act, act_param) -> torch.Tensor:
    """``nchw_output(fn(xh, *vectors, to_nhwc(residual), act, act_param))``: the recipe the
    elementwise epilogues (``bn_apply``, the SE apply) give :mod:`fastcnn.recompute` for an
    output they returned through :func:`nchw_output`. The recipe holds the residual as the
    op received it (NCHW, usually itself a recipe in a fused model), not its NHWC copy, which
    may be a temporary the op does not keep."""
    return nchw_output(fn(xh, *vectors, to_nhwc(residual), act, act_param))


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


_LIMITS: dict[int, tuple[int, tuple[int, int]]] = {}


def device_limits(device: torch.device) -> tuple[int, tuple[int, int]]:
    """``(shared memory per block in bytes, compute capability)`` of ``device``, for the
    autotuners' pruning: the opt-in per-block limit (sm_75: 64 KiB, sm_86/89: 99 KiB, sm_80:
    163 KiB, sm_90: 227 KiB). Non-CUDA devices (the interpreter) have no such limits."""
    if device.type != "cuda":
        return 1 << 30, (99, 0)
    index = device.index if device.index is not None else torch.cuda.current_device()
    lim = _LIMITS.get(index)
    if lim is None:
        props = torch.cuda.get_device_properties(index)
        smem = int(getattr(props, "shared_memory_per_block_optin", 0) or props.shared_memory_per_block)
        lim = _LIMITS[index] = (smem, (props.major, props.minor))
    return lim


def deterministic() -> bool:
    """``torch.use_deterministic_algorithms(True)`` (``--deterministic``) is on: the ops then
    launch one fixed tile config instead of the fastest measured one, whose choice depends on
    timing noise (and the tile height changes the BN statistics' summation order)."""
    return torch.are_deterministic_algorithms_enabled()


def bench_l2_flush(kernel_call, quantiles=None, warmup_ms: float = 25, rep_ms: float = 100):
    """Time ``kernel_call`` for the autotuner as ``triton.testing.do_bench`` does (median and
    ``quantiles`` of CUDA-event timings, L2 flushed before each run), but with a flush buffer
    of twice the GPU's L2 size instead of Triton's fixed 256 MB: on a 2-4 GB card that runs
    under a memory budget, 256 MB for a benchmark can itself run out of memory."""
    dev = torch.cuda.current_device()
    l2 = torch.cuda.get_device_properties(dev).L2_cache_size or (8 << 20)
    flush = torch.empty(2 * l2 // 4, dtype=torch.int32, device="cuda")
    kernel_call()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        flush.zero_()
        kernel_call()
    end.record()
    torch.cuda.synchronize()
    estimate = max(start.elapsed_time(end) / 5, 1e-3)
    n_warmup, n_rep = max(1, int(warmup_ms / estimate)), max(1, int(rep_ms / estimate))
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n_rep)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n_rep)]
    for _ in range(n_warmup):
        kernel_call()
    for i in range(n_rep):
        flush.zero_()
        starts[i].record()
        kernel_call()
        ends[i].record()
    torch.cuda.synchronize()
    times = torch.tensor([a.elapsed_time(b) for a, b in zip(starts, ends)], dtype=torch.float)
    if quantiles is not None:
        out = torch.quantile(times, torch.tensor(quantiles, dtype=torch.float)).tolist()
        return out[0] if len(out) == 1 else out
    return float(times.mean())


def num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1
