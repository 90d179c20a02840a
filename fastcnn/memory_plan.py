"""Plan a training run to fit a memory budget before its first step (``--memory-budget``).

The peak of a step is predicted by measuring it (``fastcnn.memory``: storage lifetimes seen
through the dispatcher, on the training device) at two small batches on a copy of the model
and its optimizer, and extrapolating linearly in the batch. If the prediction exceeds the
budget, the cheapest remedy that fits is turned on:

0. **activation rebuilds** (a fused model that keeps its activations by default, as on CPU):
   each conv+BN+activation layer's output is rebuilt in backward from what the layer keeps
   anyway (``fastcnn.recompute``; one elementwise pass per layer);
1. **block recomputation**: each block of the model's main stack (``features`` / ``blocks``)
   runs under ``torch.utils.checkpoint``; backward recomputes the block's forward instead of
   keeping its intermediate activations (about a third more forward work). BatchNorm running
   statistics are not updated a second time by the recomputation.
2. **micro-batches with gradient accumulation**: each batch is split into ``k`` equal parts,
   run forward and backward one after the other, and the optimizer steps once on the summed
   gradient, so the update equals the full batch's -- except for BatchNorm, which normalises
   each micro-batch with its own statistics (as a smaller batch would) and updates its running
   statistics once per micro-batch.

A budget that even micro-batches of one image (with recomputation) cannot meet is an error
before training starts.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
from typing import Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from . import recompute as activation_rebuilds
from .memory import MiB, PeakModel, fit_steps, measure_step, probe_batch

_BN = nn.modules.batchnorm._BatchNorm
_WRAPPED = "_fastcnn_checkpointed"


class BudgetError(RuntimeError):
    """No remedy makes a training step fit the memory budget."""


def main_stack(model: nn.Module) -> nn.Module:
    """The model's longest ``nn.Sequential``/``nn.ModuleList`` child: the stack of layers or
    blocks (``features``, ``blocks``) that holds almost all activations."""
    stacks = [m for m in model.children() if isinstance(m, (nn.Sequential, nn.ModuleList))]
    if not stacks:
        raise ValueError(f"{type(model).__name__} has no nn.Sequential/nn.ModuleList of blocks to recompute")
    return max(stacks, key=len)


class _BnStatsFrozen:
    """While a checkpointed block is recomputed in backward, its BatchNorms use the batch's
    statistics as in the forward but must not update the running statistics again:
    momentum 0 leaves them unchanged, and ``num_batches_tracked`` is put back."""

    def __init__(self, module: nn.Module):
        self.bns = [m for m in module.modules() if isinstance(m, _BN) and m.track_running_stats]

    def __enter__(self):
        self.saved = [(m, m.momentum, m.num_batches_tracked.clone()) for m in self.bns]
        for m in self.bns:
            m.momentum = 0.0
        return self

    def __exit__(self, *exc):
        for m, momentum, tracked in self.saved:
            m.momentum = momentum
            m.num_batches_tracked.copy_(tracked)
        return False


def _checkpointed_forward(module: nn.Module, forward: Callable, *args, **kwargs):
    if not (torch.is_grad_enabled() and module.training):
        return forward(*args, **kwargs)
    return checkpoint(forward, *args, use_reentrant=False,
                      context_fn=lambda: (contextlib.nullcontext(), _BnStatsFrozen(module)), **kwargs)


def enable_recomputation(model: nn.Module) -> int:
    """Run every block of the model's main stack under ``torch.utils.checkpoint`` in training
    (the state_dict is unchanged: the blocks' forward methods are wrapped in place). Returns
    the number of blocks wrapped."""
    count = 0
    for block in main_stack(model):
        if getattr(block, _WRAPPED, False) or not any(True for _ in block.parameters()):
            continue
        block.forward = functools.partial(_checkpointed_forward, block, block.forward)
        setattr(block, _WRAPPED, True)
        count += 1
    return count


@dataclasses.dataclass
class MemoryPlan:
    recompute: bool
    micro_batches: int
    predicted_peak: float
    budget: int
    #: a fused model's activation rebuilds turned on (``fastcnn.recompute.enable``)
    rebuild_activations: bool = False

    def describe(self) -> str:
        what = []
        if self.rebuild_activations:
            what.append("activation rebuilds (fastcnn.recompute)")
        if self.recompute:
            what.append("block recomputation (torch.utils.checkpoint)")
        if self.micro_batches > 1:
            what.append(f"{self.micro_batches} micro-batches with gradient accumulation")
        remedy = " + ".join(what) or "nothing needed"
        return (f"memory plan: {remedy}; predicted peak {self.predicted_peak / MiB:,.0f} MiB "
                f"of a {self.budget / MiB:,.0f} MiB budget")


def fit(model: nn.Module, make_optimizer, input_size, num_classes: int, device, amp_dtype=None,
        recompute: bool = False, probes=(8, 16), channels_last: bool = False,
        rebuild_activations: bool | None = None) -> PeakModel:
    """Fit the peak of a steady-state training step (optimizer state created by a first,
    unmeasured step) of a copy of ``model`` and a fresh optimizer made by
    ``make_optimizer(model)``, as a function of the batch size (:class:`fastcnn.memory.PeakModel`),
    on ``device``. ``rebuild_activations`` True/False turns a fused model's activation
    rebuilds on/off in the copy; None leaves them as ``model`` has them."""
    def step_at(batch):
        probe = copy.deepcopy(model).train()
        if rebuild_activations is not None:
            (activation_rebuilds.enable if rebuild_activations else activation_rebuilds.disable)(probe)
        if recompute:
            enable_recomputation(probe)
        x, y = probe_batch(batch, input_size, num_classes, device, channels_last)
        opt = make_optimizer(probe)
        measure_step(probe, x, y, opt, amp_dtype)
        return measure_step(probe, x, y, opt, amp_dtype)

    return fit_steps(step_at, probes, min_per_image=1.0)


def plan(model: nn.Module, make_optimizer, batch: int, budget: int, input_size, num_classes: int,
         device, amp_dtype=None, margin: int = 0, channels_last: bool = False,
         rebuild_remedy: bool = False) -> MemoryPlan:
    """The cheapest :class:`MemoryPlan` whose predicted peak fits ``budget - margin``: the
    remedies in the module docstring's order, the whole batch before micro-batches.
    ``rebuild_remedy``: ``model`` is a fused model keeping its activations, and turning its
    activation rebuilds on is the first remedy (block recomputation then runs with them on)."""
    usable = budget - margin
    if usable <= 0:
        raise BudgetError(f"the memory budget ({budget / MiB:,.0f} MiB) is smaller than the "
                          f"{margin / MiB:,.0f} MiB kept for what the allocator does not see")
    args = (make_optimizer, input_size, num_classes, device, amp_dtype)
    # (rebuild activations, block recomputation), cheapest first
    remedies = [(False, False)] + ([(True, False)] if rebuild_remedy else []) + [(rebuild_remedy, True)]
    fits: dict[tuple[bool, bool], PeakModel | None] = {}

    def fitted(remedy):
        if remedy not in fits:
            rebuild, recompute = remedy
            try:
                fits[remedy] = fit(model, *args, recompute=recompute, channels_last=channels_last,
                                   rebuild_activations=rebuild if rebuild_remedy else None)
            except ValueError:  # no block stack to recompute
                if not recompute:
                    raise
                fits[remedy] = None
        return fits[remedy]

    for k in range(1, batch + 1):
        if batch % k:
            continue
        for remedy in remedies:
            peak_model = fitted(remedy)
            if peak_model is not None and peak_model.peak(batch // k) <= usable:
                return MemoryPlan(remedy[1], k, peak_model.peak(batch // k), budget, rebuild_activations=remedy[0])
    plain = fitted(remedies[0])
    best = min(f.peak(1) for f in fits.values() if f is not None)
    raise BudgetError(f"the memory budget ({budget / MiB:,.0f} MiB, {usable / MiB:,.0f} MiB usable) cannot "
                      f"hold a training step: even one image at a time with block recomputation needs "
                      f"about {best / MiB:,.0f} MiB (parameters, gradients and optimizer state alone: "
                      f"about {max(0.0, plain.fixed) / MiB:,.0f} MiB)")
