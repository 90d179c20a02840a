"""Keep one activation per fused layer for backward: rebuild BN+activation outputs on demand.

Why: in training, a fused conv+BN+act layer keeps its conv output ``z`` (the BN input) and two
per-channel vectors for its own backward. Its output ``y = act(z*scale + shift)`` is a second
full-size tensor, and whatever consumes ``y`` (the next convolution, a max-pool) saves it for
*its* backward -- so a plain stack keeps about two (unfused: three) activations per layer.
``y`` is a cheap elementwise function of tensors that are kept anyway, so it need not be kept.

How: a fused op that produces such a ``y`` in training calls :func:`mark_rebuildable` with a
function and its inputs that recompute it bit for bit (the same elementwise kernel on the same
``z``, ``scale`` and ``shift``). While a fused model runs its forward (:func:`enable` installs the
hooks on the model; :func:`fastcnn.set_fused` does it for you), a saved-tensor hook
(``torch.autograd.graph.saved_tensors_hooks``) replaces every saved ``y`` -- or view of it, such
as the NCHW view of an NHWC buffer -- by its :class:`Recipe`, and backward rebuilds ``y`` when it
needs it. Any op can be the consumer: Triton kernels, cuDNN/oneDNN convolutions, pooling.

Recipes compose: a recipe holds each of its inputs as that input's own recipe when it has one
(:func:`capture`), never as the tensor, and rebuilds it lazily. So a BN+ReLU output whose input
is a DenseNet concatenation holds the concatenation's recipe (its parts), and a post-activation
ResNet block output ``act(bn(z) + residual)`` holds ``z`` and the residual's recipe. A rebuilt
tensor is cached on its recipe until nothing needs it any more, so a chain of recipes is rebuilt
once, not once per use; :data:`MAX_DEPTH` bounds how long a chain may grow.

Safety: a tensor changed in place after it was produced (its version counter moved) is saved
as usual; a tensor a recipe holds as is (no recipe of its own) that is changed in place before
the rebuild is a clear error at rebuild time, and so is any tensor the graph keeps as is that is
changed in place before backward (:func:`_changed_in_place`: autograd's own check of saved
tensors, which it skips for tensors saved through hooks). Nothing is marked unless the hooks
are active and the op records a backward, so inference and standalone layers keep no extra
references. Under ``torch.compile`` the hooks stay off (the compiler plans memory itself).
"""
from __future__ import annotations

import threading
import weakref
from typing import Callable

import torch
from torch import nn

_ATTR = "_fastcnn_rebuild"


class _ThreadState(threading.local):
    """Per thread (saved-tensor hooks are per thread): how deep in hooked forwards
    (:func:`active`), the measuring observer (and ``contexts``, the hook contexts of the models'
    forwards, set on first use: :func:`_contexts`). Class defaults rather than
    ``getattr(local, name, default)``, which raises and catches an AttributeError for a missing
    name (1.3 us; this is read on every fused layer call)."""

    depth = 0
    observer = None


_state = _ThreadState()


def active() -> bool:
    """True while a fused model's forward runs with the rebuild hooks installed."""
    return _state.depth > 0 and not torch.compiler.is_compiling()


#: Longest chain of recipes built on recipes (see :func:`mark_rebuildable`). A post-activation
#: ResNet block's output is rebuilt from its block input, itself rebuilt from the block before:
#: rebuilding the last of ``d`` chained outputs in backward materialises all ``d`` (each is then
#: reused, not rebuilt again), so the chain length bounds the extra activations alive at that
#: moment. A tensor whose recipe would exceed it is kept instead, which starts a new chain.
MAX_DEPTH = 8


class Recipe:
    """How to rebuild one tensor (the root that owns its storage): ``fn(*args)`` with each
    captured argument (:class:`_Kept` or :class:`_Rebuild`) materialised first.

    Why an object per root rather than a closure: every saved view of the root, and every
    later recipe that takes the root as input, shares it, so the root is rebuilt at most once
    while any of them still needs it -- the result is cached here (``_value``) and freed with
    the recipe, i.e. when the last node of the autograd graph or the last recipe that needs it
    lets go. While the original tensor is still alive (and unchanged) it is returned as is.
    """

    __slots__ = ("fn", "args", "slots", "shape", "stride", "depth", "version", "_orig", "_value",
                 "__weakref__")

    def __init__(self, fn, args, slots, root: torch.Tensor, depth: int):
        # args: fn's arguments with each captured input in place (a _Kept or _Rebuild);
        # slots: the positions of those, or None when they may be nested in tuples / lists
        self.fn, self.args, self.slots, self.depth = fn, args, slots, depth
        self.shape, self.stride = root.shape, root.stride()
        self.version = root._version
        self._orig = weakref.ref(root)
        self._value = None

    def get(self) -> torch.Tensor:
        if self._value is not None:
            return self._value
        orig = self._orig()
        if orig is not None and orig._version == self.version:
            return orig.detach()
        if self.slots is None:
            args = _materialize_all(self.args)
        else:
            args = list(self.args)
            for i in self.slots:
                args[i] = args[i].get()
        if torch.is_grad_enabled():  # backward runs without grad mode: no context to enter then
            with torch.no_grad():
                root = self.fn(*args)
        else:
            root = self.fn(*args)
        if root.stride() != self.stride or root.shape != self.shape:
            raise RuntimeError(
                f"fastcnn: rebuilt activation has shape {tuple(root.shape)} / strides {root.stride()}, "
                f"expected {tuple(self.shape)} / {self.stride}")
        self._value = root
        return root


class _Kept:
    """A tensor a recipe needs, held as is (it has no recipe, or one that was invalidated):
    checked at rebuild time against in-place changes made after the recipe was taken."""

    __slots__ = ("tensor", "version")
    depth = 0

    def __init__(self, t: torch.Tensor):
        # detached only when it carries a graph (a recipe must not keep the graph alive)
        self.tensor, self.version = (t if t.grad_fn is None else t.detach()), t._version

    def get(self) -> torch.Tensor:
        if self.tensor._version != self.version:
            raise RuntimeError(
                f"fastcnn: a tensor of shape {tuple(self.tensor.shape)} that a rebuild recipe needs was "
                "changed in place between forward and backward; the activation saved as a recipe "
                "cannot be rebuilt (change a copy instead)")
        return self.tensor


class _Rebuild:
    """What the autograd graph (or a later recipe) holds instead of a tensor: the root's
    :class:`Recipe` and the view geometry of the tensor relative to that root (None when the
    tensor is the root itself, the common case: a layer's output saved by the next layer)."""

    __slots__ = ("recipe", "view")

    def __init__(self, recipe: Recipe, t: torch.Tensor, root: torch.Tensor):
        self.recipe = recipe
        self.view = None if t is root else (tuple(t.shape), t.stride(), t.storage_offset() - root.storage_offset())

    @property
    def depth(self) -> int:
        return self.recipe.depth

    def get(self) -> torch.Tensor:
        root = self.recipe.get()
        if self.view is None:
            return root
        size, stride, offset = self.view
        return root.as_strided(size, stride, root.storage_offset() + offset)


def _recipe_of(t: torch.Tensor):
    """``_Rebuild`` for ``t`` if its storage owner carries a still-valid recipe, else None."""
    root = t._base
    if root is None:
        root = t
    recipe = getattr(root, _ATTR, None)
    if recipe is None or root._version != recipe.version:  # changed in place since: not rebuildable
        return None
    return _Rebuild(recipe, t, root)


def capture(t):
    """What a recipe should hold for its input ``t``: ``t``'s own recipe when ``t`` (or the
    tensor it is a view of) is rebuildable and unchanged since, else ``t`` itself (detached,
    with an in-place-change check). Recipes thereby compose: a BN+act output whose input is a
    DenseNet concatenation holds the concatenation's recipe (its parts), never the whole
    concatenation. Non-tensors (and None) pass through unchanged."""
    if not isinstance(t, torch.Tensor):
        return t
    return _recipe_of(t) or _Kept(t)


def materialize(c):
    """The tensor behind a :func:`capture` result (rebuilt if need be)."""
    if isinstance(c, (_Kept, _Rebuild)):
        return c.get()
    return c


def _capture_all(args) -> tuple[list, int]:
    """:func:`capture` of every argument (into tuples and lists), and the deepest chain among
    them. A plain loop: this runs for every fused layer's output in training, where a generic
    pytree walk cost more than the layer's kernels at CIFAR sizes."""
    out, depth = [], 0
    for a in args:
        if isinstance(a, torch.Tensor):
            a = capture(a)
            depth = max(depth, a.depth)
        elif isinstance(a, (tuple, list)):
            inner, d = _capture_all(a)
            a, depth = type(a)(inner), max(depth, d)
        out.append(a)
    return out, depth


def _materialize_all(args) -> list:
    return [type(a)(_materialize_all(a)) if isinstance(a, (tuple, list)) else materialize(a) for a in args]


def mark_rebuildable(y: torch.Tensor, fn: Callable[..., torch.Tensor], *args, inputs=None) -> bool:
    """Declare that ``fn(*args)`` recomputes ``y`` exactly (same values, shape and strides).

    Tensor arguments (also inside tuples and lists) are captured with :func:`capture` -- as
    their own recipes where they have one -- and materialised only when ``y`` is rebuilt, so a
    recipe never keeps alive a tensor that is itself rebuildable. ``inputs``, a tuple of
    positions in ``args``, narrows that to the arguments that can be rebuildable activations
    (the fused ops pass it: their weights and batch statistics are held as they are, which
    saves the capture's cost on every layer in training; such a tensor changed in place
    before backward is caught by autograd's own check of the op that saved it). ``fn`` runs
    under ``torch.no_grad()``; it must be deterministic (the same kernel on the same inputs),
    so gradients are bitwise identical with and without rebuilds. ``y`` must be the tensor
    that owns its storage (not a view).

    No-op (returns False) when the hooks are inactive, or when the recipe would chain more
    than :data:`MAX_DEPTH` recipes (``y`` is then kept, and starts a new chain). Call it only
    when autograd will record the op (inside an autograd Function's forward grad mode is off,
    so the caller decides from ``ctx.needs_input_grad``)."""
    if not active():
        return False
    if y._base is not None:
        raise ValueError("mark_rebuildable needs the tensor that owns the storage, not a view")
    if inputs is not None:
        return mark_op_output(y, fn, args, inputs)
    captured, depth = _capture_all(args)
    depth += 1
    if depth > MAX_DEPTH:
        return False
    setattr(y, _ATTR, Recipe(fn, captured, None, y, depth))
    return True


def mark_op_output(y: torch.Tensor, fn: Callable[..., torch.Tensor], args: tuple, inputs: tuple) -> bool:
    """:func:`mark_rebuildable` for a fused op's own output, on the hot path of every fused
    layer in training: the caller has checked :func:`active`, ``y`` is the op's fresh output
    (owns its storage), ``args`` are ``fn``'s arguments and ``inputs`` the positions among them
    that may be rebuildable activations (None there is skipped). The same recipe, without the
    generic argument handling."""
    captured, depth, slots = list(args), 0, []
    for i in inputs:
        a = args[i]
        if a is not None:
            c = captured[i] = _recipe_of(a) or _Kept(a)
            if c.depth > depth:
                depth = c.depth
            slots.append(i)
    if depth >= MAX_DEPTH:
        return False
    setattr(y, _ATTR, Recipe(fn, captured, slots, y, depth + 1))
    return True


def _cat(dim, *tensors):
    return torch.cat(tensors, dim)


def cat(tensors, dim: int = 1) -> torch.Tensor:
    """``torch.cat`` whose result consumers keep as a recipe (the parts, not the whole) inside
    a fused model: DenseNet's concatenated inputs then cost memory once (as their parts), not
    once per layer -- the memory-efficient DenseNet of Pleiss et al. (arXiv 1707.06990)."""
    if len(tensors) == 1:
        return tensors[0]
    y = torch.cat(tensors, dim)
    if active() and torch.is_grad_enabled() and y.requires_grad:
        mark_rebuildable(y, _cat, dim, *tensors, inputs=tuple(range(1, len(tensors) + 1)))
    return y


def _changed_in_place(t: torch.Tensor, version: int) -> RuntimeError:
    """The check autograd makes of every saved tensor -- changed in place between forward and
    backward is an error -- and skips for tensors that saved-tensor hooks pack (as these do):
    :func:`_pack` keeps a tensor it has no recipe for as ``(tensor, version)``, and
    :func:`_unpack` raises this when the version moved."""
    return RuntimeError(
        "one of the variables needed for gradient computation has been modified by an inplace "
        f"operation: [{t.type()} {list(t.shape)}] is at version {t._version}; expected version "
        f"{version} instead (fastcnn: saved inside a fused model's forward)")


def _pack(t: torch.Tensor):
    # runs for every tensor any op saves inside a fused model's forward (three per layer):
    # kept short -- _recipe_of inlined, and a tensor kept as is packed as a plain
    # (tensor, version) tuple, checked by _unpack
    root = t._base
    if root is None:
        root = t
    recipe = getattr(root, _ATTR, None)
    if recipe is not None and root._version == recipe.version:
        return _Rebuild(recipe, t, root)
    observer = _state.observer
    if observer is not None:
        observer(t)  # fastcnn.memory counts what the graph really keeps
    return (t, t._version)


def set_observer(fn: Callable[[torch.Tensor], None] | None) -> None:
    """Have ``fn`` called with every tensor the hooks keep as a tensor (for measuring). While
    any thread observes, the extension's composite ops save every tensor through the hooks
    (see :func:`use_pack_hook_setter`), so that ``fn`` sees all that the graph keeps."""
    global _observing
    previous, _state.observer = _state.observer, fn
    if (previous is None) != (fn is None):
        _observing += 1 if fn is not None else -1
        _sync_pack_hook()


# The extension's composite ops save the tensors that can have no recipe -- ones they have just
# created, and parameters -- past these hooks, which would keep them as they are anyway: a
# Python call from the autograd engine fewer on save and on unpack each (csrc/include/
# saved_hooks.h). They recognise the hooks by _pack, registered with them here; while a thread
# observes (set_observer) none is registered, and every tensor goes through the hooks.
_observing = 0  # threads with an observer set
_pack_hook_setter = None  # fastcnn._C._set_recompute_pack_hook, once the extension is loaded


def use_pack_hook_setter(setter: Callable[[object], None]) -> None:
    """Called by the extension backend when it loads: ``setter(_pack)`` registers the pack hook
    past which its ops may save, ``setter(None)`` unregisters it."""
    global _pack_hook_setter
    _pack_hook_setter = setter
    _sync_pack_hook()


def _sync_pack_hook() -> None:
    if _pack_hook_setter is not None:
        _pack_hook_setter(None if _observing else _pack)


def _unpack(packed):
    if type(packed) is tuple:
        t, version = packed
        if t._version != version:
            raise _changed_in_place(t, version)
        return t
    return packed.get()


def _push() -> None:
    # torch.autograd.graph.saved_tensors_hooks without its context-manager object: this runs
    # on every forward of a fused model in training
    torch._C._autograd._push_saved_tensors_default_hooks(_pack, _unpack)
    _state.depth += 1


def _pop() -> None:
    _state.depth -= 1
    torch._C._autograd._pop_saved_tensors_default_hooks()


class rebuild_saved_activations:
    """Context manager: inside it, saved tensors marked with :func:`mark_rebuildable` are kept
    as recipes. Re-entrant; the models' forward hooks use it."""

    def __enter__(self):
        _push()
        return self

    def __exit__(self, *exc):
        _pop()
        return False


_HANDLES = "_fastcnn_rebuild_hooks"


def _enter_hook(_module, _args):
    # nothing is saved for backward without grad mode (inference, evaluation): no hooks then
    hooked = torch.is_grad_enabled() and not torch.compiler.is_compiling()
    if hooked:
        _push()
    _contexts().append(hooked)


def _leave_hook(_module, _args, _output):
    stack = _contexts()
    if stack and stack.pop():
        _pop()


def _contexts() -> list:
    # not a class default like the others: torch.compile traces the models' forward hooks, and
    # Dynamo's guard on a class default that this very frame then shadows fails ("guard failed
    # on the same frame"); an attribute set once per thread it handles
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
