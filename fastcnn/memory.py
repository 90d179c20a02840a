"""Memory of a training step, measured independently of fastcnn's own machinery.

:class:`MemoryTracker` sees every tensor storage that any op creates, through the dispatcher
(a ``TorchDispatchMode``), and follows each storage's lifetime with a ``weakref.finalize`` on
it (PyTorch keeps one Python object per live storage, so the finalizer runs exactly when the
storage is freed). Summing the sizes of the live storages gives, at every moment, the bytes of
tensors alive -- parameters, gradients, optimizer state, activations saved for backward,
whatever a rebuild recipe keeps alive through its closure, temporaries -- and its maximum is
the step's peak, the figure ``torch.cuda.max_memory_allocated`` reports on a GPU (which adds
allocator rounding to 512-byte blocks, and cuDNN/cuBLAS workspaces allocated inside a kernel
call, that the dispatcher does not show). It does not rely on saved-tensor hooks, so it cannot
be blind to what they hide.

``python -m fastcnn.memory`` reports, per model, eager against fused: the peak of one whole
training step (forward, backward, SGD-momentum step) and the bytes still alive after the
forward beyond the parameters and optimizer state (what backward needs).

:class:`SavedTensorCounter` is the older, narrower count of what the autograd graph's
saved-tensor hooks hand back as tensors; it misses whatever rebuild recipes keep alive, so it
is a debugging aid for :mod:`fastcnn.recompute`, not a memory figure.
"""
from __future__ import annotations

import contextlib
import dataclasses
import gc
import threading
import weakref

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from . import recompute
from .backend import check_backend

MiB = 2**20


class MemoryTracker(TorchDispatchMode):
    """Live tensor bytes over time, from storage lifetimes seen through the dispatcher.

    ``with MemoryTracker() as mt:`` -- storages that ops create inside the block are counted
    until they are freed; :meth:`track` adds tensors that already exist (parameters, optimizer
    state, the input). ``mt.live`` is the bytes alive now, ``mt.peak`` the maximum so far,
    :meth:`reset_peak` starts a new maximum -- and a new ``mt.timeline``: the live bytes after
    each allocation since (the moments a peak can happen at; frees only lower the count).
    Storages are told apart by identity, so views and in-place results cost nothing extra; a
    storage whose size changes (``resize_``) is re-read. Thread-safe (backward may run on
    autograd's device threads).
    """

    def __init__(self, device: str | torch.device | None = None):
        super().__init__()
        self.device_type = torch.device(device).type if device is not None else None
        self.live = 0
        self.peak = 0
        self.timeline: list[int] = []
        self._sizes: dict[int, int] = {}
        self._lock = threading.Lock()

    def track(self, *objects) -> "MemoryTracker":
        """Count tensors that exist already: tensors, modules (parameters, gradients, buffers),
        optimizers (their state) or nested lists/dicts of them."""
        for obj in objects:
            if isinstance(obj, nn.Module):
                for p in obj.parameters():
                    self._add(p)
                    if p.grad is not None:
                        self._add(p.grad)
                for b in obj.buffers():
                    self._add(b)
            elif isinstance(obj, torch.optim.Optimizer):
                for leaf in tree_leaves(list(obj.state.values())):
                    if isinstance(leaf, torch.Tensor):
                        self._add(leaf)
            else:
                for leaf in tree_leaves(obj):
                    if isinstance(leaf, torch.Tensor):
                        self._add(leaf)
        return self

    def reset_peak(self) -> None:
        self.peak = self.live
        self.timeline = []

    def _add(self, t: torch.Tensor) -> None:
        if self.device_type is not None and t.device.type != self.device_type:
            return
        storage = t.untyped_storage()
        nbytes = storage.nbytes()
        key = id(storage)
        with self._lock:
            known = self._sizes.get(key)
            if known is None:
                self._sizes[key] = nbytes
                weakref.finalize(storage, self._free, key)
                self.live += nbytes
            elif known != nbytes:  # resized in place
                self._sizes[key] = nbytes
                self.live += nbytes - known
            else:
                return
            self.timeline.append(self.live)
            if self.live > self.peak:
                self.peak = self.live

    def _free(self, key: int) -> None:
        with self._lock:
            self.live -= self._sizes.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor):
                self._add(leaf)
        return out


@dataclasses.dataclass
class StepMemory:
    """Bytes of one training step. ``static``: parameters, buffers and optimizer state before
    the step (gradients are set to None between steps); ``after_forward``: bytes alive after
    the forward beyond ``static`` and the input (what backward needs, the loss included);
    ``peak``: the most bytes alive at any moment of forward + backward + optimizer step,
    ``static`` and the input included (comparable with ``torch.cuda.max_memory_allocated``);
    ``timeline``: the live bytes after each allocation of the step (:class:`MemoryTracker`), in
    order, from which :func:`fit_steps` predicts the peak at other batch sizes."""

    static: int
    after_forward: int
    peak: int
    batch: int
    timeline: tuple[int, ...] = ()

    @property
    def retained_per_image(self) -> float:
        return self.after_forward / self.batch


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None or dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def measure_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                 optimizer: torch.optim.Optimizer | None = None,
                 amp_dtype: torch.dtype | None = None, collect_garbage: bool = False) -> StepMemory:
    """Measure one training step of ``model`` on ``(x, y)`` (cross-entropy loss, then
    ``optimizer.step()``; an SGD-momentum optimizer whose state already exists is made if none
    is given, so the figure is that of a steady-state step, not the first one).

    ``collect_garbage``: run Python's garbage collector before reading the after-forward
    figure, for code that leaves tensors in reference cycles, which live until a collection
    happens to run (the Triton interpreter's launcher does, with copies of kernel arguments);
    without it such a figure depends on when the collector last ran."""
    import torch.nn.functional as F

    if optimizer is None:
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
        for p in model.parameters():  # steady state: momentum buffers exist
            if p.requires_grad:
                optimizer.state[p]["momentum_buffer"] = torch.zeros_like(p)
    model.train()
    optimizer.zero_grad(set_to_none=True)
    with MemoryTracker(x.device) as mt:
        mt.track(model, optimizer, x, y)
        static = mt.live - _nbytes(x) - _nbytes(y)
        mt.reset_peak()
        with _autocast(x.device, amp_dtype):
            loss = F.cross_entropy(model(x), y)
        if collect_garbage:
            gc.collect()
        after_forward = mt.live - static - _nbytes(x) - _nbytes(y)
        loss.backward()
        del loss
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        peak = mt.peak
    return StepMemory(static=static, after_forward=after_forward, peak=peak, batch=x.shape[0],
                      timeline=tuple(mt.timeline))


def _nbytes(t: torch.Tensor) -> int:
    return t.untyped_storage().nbytes()


def compare_models(names, batch: int = 4, backend: str = "auto", device: str = "cpu",
                   amp_dtype: torch.dtype | None = None):
    """Yield ``(name, eager StepMemory, fused StepMemory)`` for zoo models (random input at
    the model's default size, same weights for both)."""
    from .backend import use_backend
    from .registry import create_model, model_info

    for name in names:
        info = model_info(name)
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(batch, *info.input_size, generator=gen).to(device)
        y = torch.randint(0, info.num_classes, (batch,), generator=gen).to(device)
        results = []
        for fused in (False, True):
            torch.manual_seed(0)
            model = create_model(name, fused=fused).to(device)
            with use_backend(backend):
                results.append(measure_step(model, x, y, amp_dtype=amp_dtype))
            del model
        yield name, results[0], results[1]


@dataclasses.dataclass
class PeakModel:
    """Peak bytes of a training step as a function of the batch size: the highest of the step's
    moments, each a line in the batch, ``lines[i] = (fixed_i, per_image_i)``.

    Why moments and not one line through two peaks: every tensor alive at a given moment of
    the step (after its k-th allocation) is either batch-sized (activations, their gradients,
    temporaries) or not (parameters, gradients, optimizer state), so the bytes alive at that
    moment are exactly linear in the batch; but which moment is the highest changes with the
    batch (a weight-gradient moment late in backward at small batches, an activation moment
    early in backward at large ones), so a line through the peaks of two small batches
    underestimated the peak of a large one (by 3-7% for the eager zoo at batch 128). The
    maximum of the moments' lines is exact for any batch, provided the step allocates the same
    sequence of tensors at both measured batches (:func:`fit_steps` checks it and otherwise
    falls back to one line through the two peaks)."""

    lines: tuple[tuple[float, float], ...]

    @property
    def fixed(self) -> float:
        """The peak's batch-independent part: the prediction at batch 0."""
        return max(a for a, _ in self.lines)

    @property
    def per_image(self) -> float:
        """What each further image adds to the peak at large batches (the steepest moment)."""
        return max(c for _, c in self.lines)

    def peak(self, batch: int) -> float:
        return max(a + c * batch for a, c in self.lines)

    def largest_batch(self, budget: float) -> int:
        """The largest batch whose predicted peak fits ``budget`` (0 if none does)."""
        if self.per_image <= 0:
            raise ValueError("a peak that does not grow with the batch cannot be extrapolated")
        best = None
        for a, c in self.lines:
            if c > 0:
                fit = (budget - a) // c
                best = fit if best is None else min(best, fit)
            elif a > budget:
                return 0
        return max(0, int(best))


def _upper_lines(lines) -> tuple[tuple[float, float], ...]:
    """The lines that can be the highest at some batch >= 0: none whose fixed part and slope
    are both at most another's (a step has tens of thousands of moments, a handful remain)."""
    kept, best_fixed = [], float("-inf")
    for a, c in sorted(lines, key=lambda ac: (-ac[1], -ac[0])):
        if a > best_fixed:
            kept.append((a, c))
            best_fixed = a
    return tuple(kept)


def probe_batch(batch: int, input_size, num_classes: int, device="cpu", channels_last: bool = False):
    """A seeded random ``(x, y)`` batch for measuring a step."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, *input_size, generator=gen).to(device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, torch.randint(0, num_classes, (batch,), generator=gen).to(device)


def fit_steps(step_at, probes: tuple[int, int] = (8, 16), min_per_image: float | None = None) -> PeakModel:
    """:class:`PeakModel` from two steps ``step_at(batch) -> StepMemory`` measured at the two
    ``probes`` batches: one line per moment of the step when both allocated the same sequence
    of tensors, else one line through the two peaks. Slopes are floored at ``min_per_image``
    if given."""
    (b1, b2) = probes
    s1, s2 = step_at(b1), step_at(b2)
    floor = float("-inf") if min_per_image is None else min_per_image
    if s1.timeline and len(s1.timeline) == len(s2.timeline):
        pairs = zip(s1.timeline, s2.timeline)
    else:
        pairs = [(s1.peak, s2.peak)]
    lines = []
    for p1, p2 in pairs:
        per_image = max(floor, (p2 - p1) / (b2 - b1))
        lines.append((p1 - per_image * b1, per_image))
    return PeakModel(_upper_lines(lines))


def fit_peak(name: str, fused: bool, backend: str = "auto", device: str = "cpu",
             amp_dtype: torch.dtype | None = None, probes: tuple[int, int] = (8, 16)) -> PeakModel:
    """Measure a training step of zoo model ``name`` at the two ``probes`` batch sizes and fit
    :class:`PeakModel` through their moments."""
    from .backend import use_backend
    from .registry import create_model, model_info

    info = model_info(name)

    def step_at(batch):
        x, y = probe_batch(batch, info.input_size, info.num_classes, device)
        torch.manual_seed(0)
        model = create_model(name, fused=fused).to(device)
        with use_backend(backend):
            return measure_step(model, x, y, amp_dtype=amp_dtype)

    return fit_steps(step_at, probes)


#: What a GPU's own memory holds that the allocator does not report: the CUDA context
#: (about 300-450 MB with cuDNN and cuBLAS loaded on small cards) and cuDNN/cuBLAS
#: workspaces. A step fits a card of B bytes when its predicted peak is under B - MARGIN.
MARGIN = 512 * MiB


class SavedTensorCounter:
    """What the autograd graph's saved-tensor hooks keep as tensors (not what rebuild recipes
    keep alive through their closures: use :class:`MemoryTracker` for memory figures).
    Context manager; ``.bytes`` and ``.tensors`` after (or during) the block."""

    def __init__(self, exclude: nn.Module | None = None):
        self._exclude = set()
        if exclude is not None:
            self._exclude = {p.untyped_storage().data_ptr() for p in exclude.parameters()}
            self._exclude |= {b.untyped_storage().data_ptr() for b in exclude.buffers()}
        self._storages: dict[int, int] = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._record, lambda t: t)

    def _record(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in self._exclude and storage.nbytes() > 0:
            self._storages[ptr] = storage.nbytes()
        return t

    @property
    def bytes(self) -> int:
        return sum(self._storages.values())

    @property
    def tensors(self) -> int:
        return len(self._storages)

    def __enter__(self):
        self._hooks.__enter__()
        recompute.set_observer(self._record)
        return self

    def __exit__(self, *exc):
        recompute.set_observer(None)
        return self._hooks.__exit__(*exc)


def saved_bytes(model: nn.Module, *inputs, backward: bool = True) -> int:
    """Bytes that the saved-tensor hooks see ``model(*inputs)`` keep (see
    :class:`SavedTensorCounter`). Runs the backward too (``backward=True``)."""
    with SavedTensorCounter(exclude=model) as counter:
        out = model(*inputs)
    if backward:
        out.float().sum().backward()
    return counter.bytes


AMP_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def main(argv=None) -> None:
    """``python -m fastcnn.memory [MODEL ...] [--batch N] [--backend B] [--dtype D]``: per
    model, eager vs fused, the peak bytes of a training step and the bytes a forward leaves
    for backward, measured through the dispatcher (fastcnn.memory.MemoryTracker)."""
    import argparse

    from .registry import list_models, model_info

    parser = argparse.ArgumentParser(prog="python -m fastcnn.memory", description=main.__doc__)
    parser.add_argument("models", nargs="*", help="model names (default: the whole zoo)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--backend", default="auto", help="backend of the fused models")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument("--dtype", default="fp32", choices=sorted(AMP_DTYPES),
                        help="autocast dtype of the forward (default fp32: no autocast)")
    parser.add_argument("--fit", type=int, metavar="BATCH", default=None,
                        help="predict the peak of a step at BATCH (eager and fused, fp32 and bf16) "
                             "and the largest batch that fits --budget")
    parser.add_argument("--budget", default="3GB", help="memory of the card for --fit (default 3GB = 3e9 bytes)")
    args = parser.parse_args(argv)
    if args.batch < 2:
        parser.exit(2, "error: --batch must be at least 2 (training-mode BatchNorm needs it)\n")
    names = args.models or list_models()
    try:
        for name in names:
            model_info(name)
        check_backend(args.backend)
        device = torch.device(args.device)
    except (ValueError, RuntimeError) as e:  # unknown model, backend or device, before any work
        parser.exit(2, f"error: {e}\n")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.exit(2, "error: --device cuda: no CUDA GPU is visible\n")
    if args.fit is not None:
        from .cli import UsageError, parse_size

        try:
            budget = parse_size(args.budget)
        except UsageError as e:
            parser.exit(2, f"error: --budget: {e}\n")
        if args.fit < 1:
            parser.exit(2, "error: --fit must be a positive batch size\n")
        print_fit_table(names, args.fit, budget, args.backend, args.device)
        return
    print(f"batch {args.batch}, {args.dtype}, device {device}, fused backend {args.backend}; "
          "peak: live tensor bytes at the worst moment of forward + backward + SGD step "
          "(parameters, gradients and optimizer state included); kept: bytes a forward "
          "leaves for backward, per image")
    print("| model | peak, eager | peak, fused | fused / eager | kept / image, eager | "
          "kept / image, fused | fused / eager |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, eager, fused in compare_models(names, args.batch, args.backend, args.device,
                                             AMP_DTYPES[args.dtype]):
        print(f"| `{name}` | {eager.peak / MiB:,.1f} MiB | {fused.peak / MiB:,.1f} MiB | "
              f"{fused.peak / eager.peak:.2f} | {eager.retained_per_image / MiB:,.2f} MiB | "
              f"{fused.retained_per_image / MiB:,.2f} MiB | "
              f"{fused.after_forward / eager.after_forward:.2f} |", flush=True)


def print_fit_table(names, batch: int, budget: int, backend: str = "auto", device: str = "cpu") -> None:
    """The small-GPU table: predicted peak of a training step at ``batch``, eager and fused,
    fp32 and bf16, and the largest batch whose peak fits ``budget - MARGIN``."""
    usable = budget - MARGIN
    print(f"predicted peak of a training step at batch {batch} (SGD-momentum; parameters, gradients, "
          f"optimizer state, activations and temporaries): the highest moment of the step, each moment "
          f"extrapolated from steps measured at batch 8 and 16 on {device}; fits: peak <= "
          f"{budget / MiB:,.0f} MiB - {MARGIN / MiB:,.0f} MiB margin (CUDA context, library workspaces)")
    print(f"| model | fp32 eager | fp32 fused | fp32 fused / eager | bf16 eager | bf16 fused | bf16 fused / eager | "
          f"largest batch in {budget / 1e9:g} GB: bf16 eager / fused |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name in names:
        fits = {(dt, fused): fit_peak(name, fused, backend, device, AMP_DTYPES[dt])
                for dt in ("fp32", "bf16") for fused in (False, True)}
        cells = []
        for dt in ("fp32", "bf16"):
            peaks = [fits[(dt, fused)].peak(batch) for fused in (False, True)]
            cells += [f"{peak / MiB:,.0f} MiB" + ("" if peak <= usable else " (over)") for peak in peaks]
            cells.append(f"{peaks[1] / peaks[0]:.2f}")
        largest = " / ".join(str(fits[("bf16", f)].largest_batch(usable)) for f in (False, True))
        print(f"| `{name}` | " + " | ".join(cells) + f" | {largest} |", flush=True)


if __name__ == "__main__":
    main()
