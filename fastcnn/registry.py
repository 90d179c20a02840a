"""The model registry: ``@register_model`` on each variant function, ``create_model`` and
``list_models`` as the front door (the timm pattern)."""
from __future__ import annotations

import difflib
import fnmatch
import importlib
import inspect
from dataclasses import dataclass, field
from typing import Callable

from torch import nn

from .layers import set_fused
from .layers.activations import create_act


@dataclass(frozen=True)
class ModelInfo:
    """What the zoo knows of a model besides how to build it."""

    name: str
    family: str
    fn: Callable[..., nn.Module]
    input_size: tuple[int, int, int] = (3, 32, 32)
    num_classes: int = 10
    params: int | None = None  # trainable parameters at the default num_classes / input
    reported: str = ""  # accuracy the seeds report, with dataset
    source: str = ""
    aliases: tuple[str, ...] = field(default_factory=tuple)


_REGISTRY: dict[str, ModelInfo] = {}
_ALIASES: dict[str, str] = {}
_FAMILIES = ("simplenet", "simplenet_imagenet", "allcnn", "lenet", "nin", "vgg", "resnet",
             "preact_resnet", "wide_resnet", "resnext", "densenet", "shathenet")
_loaded = False


def register_model(*, input_size=(3, 32, 32), num_classes=10, params=None, reported="",
                   source="", aliases=()):
    """Decorator for a variant function ``fn(num_classes, in_chans, act, **kwargs) -> nn.Module``."""

    def wrap(fn):
        name = fn.__name__
        if name in _REGISTRY:
            raise RuntimeError(f"model {name!r} registered twice")
        family = fn.__module__.rsplit(".", 1)[-1]
        _REGISTRY[name] = ModelInfo(name, family, fn, tuple(input_size), num_classes, params,
                                    reported, source, tuple(aliases))
        for alias in aliases:
            _ALIASES[alias] = name
        return fn

    return wrap


def _load_families():
    global _loaded
    if not _loaded:
        for family in _FAMILIES:
            importlib.import_module(f"fastcnn.models.{family}")
        _loaded = True


def list_models(pattern: str = "*") -> list[str]:
    """Registered model names matching a shell-style ``pattern`` (e.g. ``"resnet*"``)."""
    _load_families()
    return sorted(n for n in _REGISTRY if fnmatch.fnmatch(n, pattern))


def model_info(name: str) -> ModelInfo:
    _load_families()
    key = name.lower().replace("-", "_")
    key = _ALIASES.get(key, key)
    if key not in _REGISTRY:
        close = difflib.get_close_matches(key, list(_REGISTRY) + list(_ALIASES), n=5, cutoff=0.5)
        hint = f" Close names: {', '.join(close)}." if close else ""
        raise ValueError(f"unknown model {name!r}.{hint} See fastcnn.list_models() for all {len(_REGISTRY)}.")
    return _REGISTRY[key]


def create_model(name: str, num_classes: int | None = None, in_chans: int = 3, fused: bool = False,
                 act="relu", **kwargs) -> nn.Module:
    """Build a model of the zoo.

    Args:
        name: a registry name (``fastcnn.list_models()``) or alias.
        num_classes: classifier outputs; default the model's own (10, or 1000 for ImageNet nets).
        in_chans: input channels (3 for RGB, 1 for MNIST).
        fused: build with the fused kernels (see ``fastcnn.set_backend``).
        act: activation name, ``nn.Module`` class/factory or callable, used everywhere the
            architecture has its main activation.
        **kwargs: family-specific options (e.g. ``drop_rate``); unknown ones are an error.
    """
    info = model_info(name)
    if num_classes is None:
        num_classes = info.num_classes
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    if not isinstance(in_chans, int) or isinstance(in_chans, bool) or in_chans < 1:
        raise ValueError(f"in_chans must be a positive int, got {in_chans!r}")
    create_act(act)  # validate early, with the activation factory's message
    accepted = inspect.signature(info.fn).parameters
    has_var_kw = any(p.kind is p.VAR_KEYWORD for p in accepted.values())
    unknown = [k for k in kwargs if k not in accepted] if not has_var_kw else []
    if unknown:
        options = [p for p in accepted if p not in ("num_classes", "in_chans", "act")]
        raise TypeError(f"{info.name} got unknown argument(s) {', '.join(unknown)}; it accepts "
                        f"{', '.join(options) or 'no extra arguments'}")
    model = info.fn(num_classes=num_classes, in_chans=in_chans, act=act, **kwargs)
    model.model_name = info.name
    model.input_size = (in_chans,) + tuple(info.input_size[1:])
    return set_fused(model, fused)
