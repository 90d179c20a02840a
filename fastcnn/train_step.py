"""The training step: plain (:class:`TrainStep`) or captured in a CUDA graph and replayed
(:class:`CUDAGraphStep`, ``python -m fastcnn.train ... --cuda-graphs``).

A step is: zero the gradients, forward and loss (under autocast with ``--amp``), backward,
optional gradient-norm clipping, the optimizer step, and the epoch's loss sum and correct
count accumulated *on the device* (``step.loss_sum``, ``step.correct``): nothing is read back
to the host here, so the loop decides when to wait for the device (it reads the sums every
``--log-interval`` steps).

**CUDA graphs** (PyTorch's "whole network capture"). A training step of a small model at a
small batch is bound by the CPU launching kernels, not by the GPU running them; replaying a
captured graph launches the whole step at once. :class:`CUDAGraphStep`:

1. copies each batch into static input/target buffers (the graph reads fixed addresses);
2. runs the first ``warmup_steps`` steps eagerly on a side stream -- real training steps on
   real batches, which also make every lazy initialisation happen before capture: Triton
   autotuning and compilation, cuDNN's algorithm search, optimizer state (momentum buffers);
3. then captures one step -- forward, loss, backward, clipping, optimizer step, BatchNorm
   running-statistic updates and the loss/accuracy sums -- and replays it for every step
   after (the captured step itself runs as the first replay).

What capture needs, and how it is met:

* **learning rate**: the schedule changes it every step, but a graph replays the value it
  captured. The optimizer's param groups hold the LR as a device tensor while the step is
  captured, and before each replay that tensor is filled with the LR the schedule set (a
  device-side fill; the host does not wait). The param groups hold plain floats again
  outside capture, so checkpoints are the same as without ``--cuda-graphs``. This needs an
  optimizer that reads a tensor LR on the device: :func:`graph_optimizer_kwargs` builds SGD
  ``fused=True`` and Adam/AdamW/Adadelta ``capturable=True`` (torch >= 2.11 has both).
* **no host sync in the step**: fp16 AMP's GradScaler reads its inf check on the host each
  step, so ``--amp fp16`` is refused (bf16 and fp32 need no scaler); autocast's weight cache is
  off inside the captured step (required under capture; the values are the same).
* **one shape**: the training loader drops the last partial batch (it always has), so every
  step has the captured shape; any other shape is an error, not a silent re-capture.
* refused with a one-line usage error (:func:`check_cuda_graphs`): a non-CUDA device,
  multi-process runs (DDP), ``--amp fp16``, ``--compile`` (``torch.compile(mode=
  "reduce-overhead")`` captures graphs itself) and ``--memory-budget`` (its plan measures and
  remedies -- recomputation, micro-batches -- are made for uncaptured steps).

Not yet measured on a GPU: no session of this project has had one. ``tests/test_cuda_graphs.py``
holds the GPU check (capture, replay, same loss and weights as the plain step on resnet20).
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from .cli import UsageError

#: the optimizer flags that make ``step()`` capturable with a device-tensor LR
GRAPH_OPTIMIZER_KWARGS = {
    "sgd": {"fused": True},  # torch.optim.SGD has no `capturable`; its fused kernel takes a tensor LR
    "adam": {"capturable": True, "foreach": True},
    "adamw": {"capturable": True, "foreach": True},
    "adadelta": {"capturable": True, "foreach": True},
}
#: param-group keys that choose an optimizer's implementation, not its maths
_IMPL_FLAGS = ("foreach", "fused", "capturable")


class CaptureError(RuntimeError):
    """The training step could not be captured in a CUDA graph (the message says why)."""


def graph_optimizer_kwargs(optimizer: str) -> dict:
    """Extra keyword arguments for ``torch.optim.<optimizer>`` so its step can be captured."""
    return dict(GRAPH_OPTIMIZER_KWARGS[optimizer])


def check_cuda_graphs(device: torch.device, amp_name: str, world: int, *, amp_arg: str = "",
                      compile: bool = False, memory_budget: str | None = None) -> None:
    """Raise :class:`UsageError` (one line, naming the flags) where ``--cuda-graphs`` cannot run."""
    if device.type != "cuda":
        raise UsageError(f"--cuda-graphs needs a CUDA device, and this run is on {device.type}; "
                         "drop --cuda-graphs (or use --device cuda)")
    if world > 1:
        raise UsageError(f"--cuda-graphs is not supported with torchrun ({world} processes): capturing DDP's "
                         "gradient all-reduce is not set up; drop --cuda-graphs or run one process")
    if amp_name == "fp16":
        why = " (--amp auto chose fp16 on this GPU)" if amp_arg.lower() == "auto" else ""
        raise UsageError(f"--cuda-graphs with fp16 AMP{why}: the GradScaler reads its inf check on the host "
                         "every step, which a captured step cannot; use --amp bf16 or --amp off")
    if compile:
        raise UsageError("--cuda-graphs with --compile: pick one (torch.compile(mode='reduce-overhead') "
                         "captures CUDA graphs itself)")
    if memory_budget:
        raise UsageError("--cuda-graphs with --memory-budget: the budget's plan (recomputation, micro-batches) "
                         "is made for uncaptured steps; drop one of the two")


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """``optimizer.load_state_dict(state)``, keeping this optimizer's implementation flags
    (``foreach`` / ``fused`` / ``capturable``; loading would take the checkpoint's), so that a
    run resumes with or without ``--cuda-graphs`` whatever the checkpoint was written with;
    step counters are moved to where the kept flags want them (the parameter's device for
    ``capturable`` / ``fused``, else the CPU). Without a flag change this is exactly
    ``load_state_dict``."""
    keep = [{k: g[k] for k in _IMPL_FLAGS if k in g} for g in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, flags in zip(optimizer.param_groups, keep):
        if all(group.get(k) == v for k, v in flags.items()):
            continue
        group.update(flags)
        on_device = bool(group.get("capturable") or group.get("fused"))
        for p in group["params"]:
            st = optimizer.state.get(p)
            step = st.get("step") if st else None
            if torch.is_tensor(step):
                want = p.device if on_device else torch.device("cpu")
                if step.device != want:
                    st["step"] = step.to(want)


class TrainStep:
    """One optimizer step on a batch ``(x, y)``: ``step(x, y)``.

    ``micro_batches > 1`` (the memory plan) splits the batch and accumulates gradients (with
    DDP, gradients are all-reduced once, after the last part); ``scaler`` (fp16) scales the loss
    and unscales before clipping. ``loss_sum`` (float64) and ``correct`` accumulate the epoch's
    summed loss and correct predictions on the device; :meth:`reset` zeroes them.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, criterion, *, device: torch.device,
                 amp_dtype=None, scaler=None, grad_clip: float = 0.0, micro_batches: int = 1):
        self.model, self.optimizer, self.criterion = model, optimizer, criterion
        self.device = torch.device(device)
        self.amp_dtype, self.scaler = amp_dtype, scaler
        self.grad_clip, self.micro_batches = grad_clip, micro_batches
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        self.correct = torch.zeros((), dtype=torch.long, device=self.device)

    def reset(self) -> None:
        """Zero the epoch's sums (in place: a captured step keeps adding into the same memory)."""
        self.loss_sum.zero_()
        self.correct.zero_()

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self._forward_backward(x, y)
        self._update()

    def _forward_backward(self, x, y) -> None:
        parts = list(zip(x.chunk(self.micro_batches), y.chunk(self.micro_batches))) \
            if self.micro_batches > 1 else [(x, y)]
        for i, (xp, yp) in enumerate(parts):
            # DDP: all-reduce the gradients once, after the last micro-batch
            last = i == len(parts) - 1
            with contextlib.nullcontext() if last or not hasattr(self.model, "no_sync") else self.model.no_sync():
                with self.autocast():
                    logits = self.model(xp)
                    loss = self.criterion(logits.float(), yp)
                weighted = loss * (yp.shape[0] / y.shape[0]) if len(parts) > 1 else loss
                (self.scaler.scale(weighted) if self.scaler is not None else weighted).backward()
            self.loss_sum += loss.detach().double() * yp.shape[0]
            self.correct += (logits.detach().argmax(1) == yp).sum()

    def _update(self) -> None:
        if self.scaler is not None:
            if self.grad_clip > 0:
                self.scaler.unscale_(self.optimizer)
                nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            if self.grad_clip > 0:
                nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
            self.optimizer.step()


class CUDAGraphStep(TrainStep):
    """:class:`TrainStep` captured in a CUDA graph after ``warmup_steps`` eager steps, then
    replayed (see the module's docstring). The optimizer must be built with
    :func:`graph_optimizer_kwargs`; one process, no GradScaler, no micro-batches.

    ``capture=False`` runs the very same code without capturing -- static buffers, the LR
    read from device tensors, the captured part run eagerly after the warm-up -- so that it can
    be compared with :class:`TrainStep` where there is no GPU.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, criterion, *, device: torch.device,
                 amp_dtype=None, grad_clip: float = 0.0, warmup_steps: int = 3, capture: bool | None = None):
        super().__init__(model, optimizer, criterion, device=device, amp_dtype=amp_dtype, grad_clip=grad_clip)
        self.capture = self.device.type == "cuda" if capture is None else bool(capture)
        if self.capture and self.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, got {self.device}")
        if warmup_steps < 1:
            raise ValueError("CUDA graphs need at least one warm-up step (lazy state, autotuning)")
        self.warmup_steps = int(warmup_steps)
        self.steps = 0
        self.graph = None
        self.static_x = self.static_y = None
        # the LR of each param group, read by the captured optimizer step
        self.lrs = [torch.tensor(float(g["lr"]), dtype=torch.float32, device=self.device)
                    for g in optimizer.param_groups]
        self._stream = torch.cuda.Stream(self.device) if self.capture else None

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype, cache_enabled=False)

    @property
    def captured(self) -> bool:
        return self.graph is not None

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        if self.static_x is None:
            self.static_x, self.static_y = torch.empty_like(x), torch.empty_like(y)
        if x.shape != self.static_x.shape or y.shape != self.static_y.shape:
            raise RuntimeError(f"a CUDA-graph step takes batches of one shape: captured {list(self.static_x.shape)}, "
                               f"got {list(x.shape)} (the training loader drops the last partial batch)")
        self.static_x.copy_(x)
        self.static_y.copy_(y)
        if self.steps < self.warmup_steps:
            self._warmup_step()
        elif not self.capture:
            self._uncaptured_step()
        else:
            if self.graph is None:
                self._capture()
            self._replay()
        self.steps += 1

    # ------------------------------------------------------------------ the parts
    def _captured_part(self) -> None:
        """What the graph holds: forward, backward, clipping, optimizer step, the epoch's sums.
        (No zero_grad: the gradients are None at capture, so the captured backward writes them
        instead of adding to them, and every replay overwrites them.)"""
        self._forward_backward(self.static_x, self.static_y)
        self._update()

    def _warmup_step(self) -> None:
        """An eager step on the static buffers (on a side stream when capturing, as PyTorch's
        docs do, so that lazy per-stream state is made off the default stream)."""
        if self._stream is None:
            TrainStep.__call__(self, self.static_x, self.static_y)
            return
        current = torch.cuda.current_stream(self.device)
        self._stream.wait_stream(current)
        with torch.cuda.stream(self._stream):
            TrainStep.__call__(self, self.static_x, self.static_y)
        current.wait_stream(self._stream)

    @contextlib.contextmanager
    def _tensor_lr(self):
        """The param groups hold the LR tensors (filled with the scheduled LR) inside the block,
        and their plain float LRs again after it."""
        groups = self.optimizer.param_groups
        floats = [g["lr"] for g in groups]
        self._fill_lrs()
        for g, t in zip(groups, self.lrs):
            g["lr"] = t
        try:
            yield
        finally:
            for g, lr in zip(groups, floats):
                g["lr"] = lr

    def _fill_lrs(self) -> None:
        for g, t in zip(self.optimizer.param_groups, self.lrs):
            if g["lr"] is not t:
                t.fill_(float(g["lr"]))

    def _capture(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)  # the graph's backward allocates them from its pool
        graph = torch.cuda.CUDAGraph()
        try:
            with self._tensor_lr(), torch.cuda.graph(graph):
                self._captured_part()
        except RuntimeError as e:
            first = (str(e).strip().splitlines() or [""])[0][:300]
            raise CaptureError(f"capturing the training step in a CUDA graph failed ({type(e).__name__}: "
                               f"{first}); run without --cuda-graphs") from e
        self.graph = graph  # only once captured: nothing replays a half-captured graph

    def _replay(self) -> None:
        self._fill_lrs()
        self.graph.replay()

    def _uncaptured_step(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)  # what a replay's overwrite of the gradients amounts to
        with self._tensor_lr():
            self._captured_part()
