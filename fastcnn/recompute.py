"""Keep one activation per fused layer for backward: rebuild BN+activation outputs on demand.

Why: in training, a fused conv+BN+act layer keeps its conv output ``z`` (the BN input) and two
per-channel vectors for its own backward. Its output ``y = act(z*scale + shift)`` is a second
full-size tensor, and whatever consumes ``y`` (the next convolution, a max-pool) saves it for
*its* backward -- so a plain stack keeps about two (unfused: three) activations per layer.
``y`` is a cheap elementwise function of tensors that are kept anyway, so it need not be kept.

How: a fused op that produces such a ``y`` in training calls :func:`mark_rebuildable` with a
function that recomputes it bit for bit (the same elementwise kernel on the same ``z``,
``scale`` and ``shift``). While a fused model runs its forward (:func:`enable` installs the
hooks on the model; :func:`fastcnn.set_fused` does it for you), a saved-tensor hook
(``torch.autograd.graph.saved_tensors_hooks``) replaces every saved ``y`` -- or view of it, such
as the NCHW view of an NHWC buffer -- by that recipe, and backward rebuilds ``y`` when it
needs it. Any op can be the consumer: Triton kernels, cuDNN/oneDNN convolutions, pooling.

Safety: a tensor changed in place after it was produced (its version counter moved) is saved
as usual. Outputs with a residual added are not marked (rebuilding them would keep the
residual alive: no saving). Nothing is marked unless the hooks are active and the op records a
backward, so inference and standalone layers keep no extra references. Under
``torch.compile`` the hooks stay off (the compiler plans memory itself).
"""
from __future__ import annotations

import functools
import threading
from typing import Callable

import torch
from torch import nn

_ATTR = "_fastcnn_rebuild"
_state = threading.local()


def active() -> bool:
    """True while a fused model's forward runs with the rebuild hooks installed."""
    if torch.compiler.is_compiling():
        return False
    return getattr(_state, "depth", 0) > 0


def mark_rebuildable(y: torch.Tensor, rebuild: Callable[[], torch.Tensor]) -> None:
    """Declare that ``rebuild()`` recomputes ``y`` exactly (same values, shape and strides).
    ``y`` must be the tensor that owns its storage (not a view). No-op when inactive. Call it
    only when autograd will record the op (inside an autograd Function's forward grad mode is
    off, so the caller decides from ``ctx.needs_input_grad``)."""
    if not active():
        return
    if y._base is not None:
        raise ValueError("mark_rebuildable needs the tensor that owns the storage, not a view")
    setattr(y, _ATTR, (rebuild, y._version))


def _cat(tensors, dim):
    with torch.no_grad():
        return torch.cat(tensors, dim)


def cat(tensors, dim: int = 1) -> torch.Tensor:
    """``torch.cat`` whose result consumers keep as a recipe (the parts, not the whole) inside
    a fused model: DenseNet's concatenated inputs then cost memory once (as their parts), not
    once per layer -- the memory-efficient DenseNet of Pleiss et al. (arXiv 1707.06990)."""
    if len(tensors) == 1:
        return tensors[0]
    y = torch.cat(tensors, dim)
    if active() and torch.is_grad_enabled() and y.requires_grad:
        mark_rebuildable(y, functools.partial(_cat, tuple(t.detach() for t in tensors), dim))
    return y


class _Rebuild:
    """What the autograd graph holds instead of a saved tensor: the recipe and view geometry."""

    __slots__ = ("rebuild", "size", "stride", "offset", "shape_of_root", "stride_of_root")

    def __init__(self, rebuild, t: torch.Tensor, root: torch.Tensor):
        self.rebuild = rebuild
        self.size, self.stride = tuple(t.shape), t.stride()
        self.offset = t.storage_offset() - root.storage_offset()
        self.shape_of_root, self.stride_of_root = tuple(root.shape), root.stride()


def _pack(t: torch.Tensor):
    packed = _pack_one(t)
    observer = getattr(_state, "observer", None)
    if observer is not None and packed is t:
        observer(t)  # fastcnn.memory counts what the graph really keeps
    return packed


def _pack_one(t: torch.Tensor):
    root = t if t._base is None else t._base
    entry = getattr(root, _ATTR, None)
    if entry is None:
        return t
    rebuild, version = entry
    if root._version != version:  # changed in place since it was produced: keep it as is
        return t
    return _Rebuild(rebuild, t, root)


def set_observer(fn: Callable[[torch.Tensor], None] | None) -> None:
    """Have ``fn`` called with every tensor the hooks keep as a tensor (for measuring)."""
    _state.observer = fn


def _unpack(packed):
    if isinstance(packed, torch.Tensor):
        return packed
    root = packed.rebuild()
    if tuple(root.shape) != packed.shape_of_root or root.stride() != packed.stride_of_root:
        raise RuntimeError(
            f"fastcnn: rebuilt activation has shape {tuple(root.shape)} / strides {root.stride()}, "
            f"expected {packed.shape_of_root} / {packed.stride_of_root}")
    if (packed.size, packed.stride, packed.offset) == (packed.shape_of_root, packed.stride_of_root, 0):
        return root
    return root.as_strided(packed.size, packed.stride, root.storage_offset() + packed.offset)


class rebuild_saved_activations:
    """Context manager: inside it, saved tensors marked with :func:`mark_rebuildable` are kept
    as recipes. Re-entrant; the models' forward hooks use it."""

    def __init__(self):
        self._hooks = torch.autograd.graph.saved_tensors_hooks(_pack, _unpack)

    def __enter__(self):
        self._hooks.__enter__()
        _state.depth = getattr(_state, "depth", 0) + 1
        return self

    def __exit__(self, *exc):
        _state.depth -= 1
        return self._hooks.__exit__(*exc)


_HANDLES = "_fastcnn_rebuild_hooks"


def _enter_hook(_module, _args):
    ctx = None if torch.compiler.is_compiling() else rebuild_saved_activations()
    if ctx is not None:
        ctx.__enter__()
    _contexts().append(ctx)


def _leave_hook(_module, _args, _output):
    stack = _contexts()
    ctx = stack.pop() if stack else None
    if ctx is not None:
        ctx.__exit__(None, None, None)


def _contexts() -> list:
    if not hasattr(_state, "contexts"):
        _state.contexts = []
    return _state.contexts


def enable(model: nn.Module) -> nn.Module:
    """Run ``model``'s forward inside :class:`rebuild_saved_activations` (idempotent). The
    hooks are module-level functions, so the model still pickles and deep-copies."""
    if getattr(model, _HANDLES, None) is not None:
        return model
    handles = (model.register_forward_pre_hook(_enter_hook),
               model.register_forward_hook(_leave_hook, always_call=True))
    setattr(model, _HANDLES, handles)
    return model


def disable(model: nn.Module) -> nn.Module:
    """Undo :func:`enable`."""
    handles = getattr(model, _HANDLES, None)
    if handles is not None:
        for h in handles:
            h.remove()
        setattr(model, _HANDLES, None)
    return model
