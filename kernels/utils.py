"""Host-side helpers shared by the Triton ops: the channels_last layout the kernels read and
write, block-size arithmetic, the per-shape launch-plan cache, reusable scratch buffers,
interpreter detection and the dot-product precision that matches cuDNN's.

Layout: every activation a kernel reads or writes is an ``(N, C, H, W)`` tensor in
channels_last memory, which *is* the NHWC matrix ``[N*H*W, C]`` the kernels index (a Triton
kernel sees a base pointer only). A channels_last input is therefore read in place, any other
layout is copied once (:func:`as_cl`), and outputs are allocated channels_last
(:func:`empty_cl`): no permuted views, no ``set_`` tricks, and an output owns its storage
(what :func:`fastcnn.recompute.mark_rebuildable` needs).

Host cost: everything here runs on every op call, so it avoids Triton's ``constexpr_function``
helpers (``triton.cdiv`` / ``triton.next_power_of_2`` cost ~2 us per call from Python) and
PyTorch property lookups that go through Python (``torch.backends.cudnn.allow_tf32``)."""
from __future__ import annotations

import os
import threading

import torch

#: Triton decides at import (``@triton.jit`` builds interpreter or compiler objects), so the
#: ops read the variable once too (an environment lookup per launch is ~0.6 us).
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def interpreting() -> bool:
    """True when kernels run in the Triton interpreter (CPU, ``TRITON_INTERPRET=1``)."""
    return _INTERPRET


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


CL = torch.channels_last


def as_cl(t: torch.Tensor | None) -> torch.Tensor | None:
    """``t`` in channels_last memory: ``t`` itself when it already is (no copy, no view),
    else one copy. ``None`` stays ``None``."""
    return None if t is None else t.contiguous(memory_format=CL)


def empty_cl(shape, ref: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A new ``(N, C, H, W)`` channels_last tensor on ``ref``'s device (``ref``'s dtype unless
    given): the NHWC buffer a kernel writes, and the tensor the op returns."""
    return torch.empty(shape, dtype=dtype or ref.dtype, device=ref.device, memory_format=CL)


def rebuild_apply(fn, x, vectors, residual, act, act_param) -> torch.Tensor:
    """``fn(x, *vectors, as_cl(residual), act, act_param)``: the recipe the elementwise epilogues
    (``bn_apply``, the SE apply) hand their caller for :mod:`fastcnn.recompute` -- the same
    launch on the same inputs, so the rebuilt output is bit for bit the original. The recipe
    holds the residual as the op received it (usually itself a recipe in a fused model), not
    its channels_last copy, which may be a temporary the op does not keep."""
    return fn(x, *vectors, as_cl(residual), act, act_param)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def pow2(n: int, lo: int = 16, hi: int = 128) -> int:
    """The next power of two >= n, clamped to [lo, hi]."""
    return max(lo, min(hi, next_pow2(n)))


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 GEMMs use TF32 exactly when cuDNN's convolutions would (``torch.backends.cudnn.
    allow_tf32``, on by default), so the fused ops match the unfused ones on the same GPU.
    (Read through ``torch._C`` -- what the ``torch.backends`` property calls -- at ~1/10 the
    cost.)"""
    if dtype == torch.float32 and not torch._C._get_cudnn_allow_tf32():
        return "ieee"
    return "tf32"


class PlanCache(dict):
    """Launch plans of one launcher, keyed on everything they depend on (shapes, dtypes,
    device, flags, interpreter / deterministic mode): grid, block sizes and the config the
    autotuner chose, computed on the first call of a key and reused after, so a call costs a
    dict lookup instead of the arithmetic and the autotuner's own key building. Cleared when
    it reaches ``limit`` entries (a process sees a handful of shapes per layer; a workload
    with ever-new shapes must not grow it without bound)."""

    def __init__(self, limit: int = 4096):
        super().__init__()
        self.limit = limit

    def put(self, key, plan):
        if len(self) >= self.limit:
            self.clear()
        self[key] = plan
        return plan


_SCRATCH = threading.local()


def scratch(numel: int, device: torch.device) -> torch.Tensor:
    """A flat fp32 buffer of at least ``numel`` elements on ``device``, for partial results that
    the launches of *one* op call write and then read (the BN statistics partials), reused from
    call to call instead of allocated each time. One buffer per (thread, device, CUDA stream):
    launches on one stream run in order, so the next call's writes come after this call's
    reads; another stream or thread (autograd's backward thread) has its own. It must never
    outlive the call: not returned, not saved for backward, not held by a recipe."""
    bufs = _SCRATCH.__dict__
    key = (device.index, torch._C._cuda_getCurrentRawStream(device.index)) if device.type == "cuda" else device
    buf = bufs.get(key)
    if buf is None or buf.numel() < numel:
        buf = bufs[key] = torch.empty(max(int(numel), 1 << 12), dtype=torch.float32, device=device)
    return buf


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


_SMS: dict = {}


def num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    n = _SMS.get(device.index)
    if n is None:
        n = _SMS[device.index] = torch.cuda.get_device_properties(device).multi_processor_count
    return n
