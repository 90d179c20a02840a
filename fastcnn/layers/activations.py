"""Activation factory: turn a name, an ``nn.Module`` class/factory or a plain callable into a
fresh ``nn.Module``, and tell the fused kernels which activations they implement natively.

Models take ``act=`` as SimpleNet-Keras's ``create_model(act=custom_act)`` does: a name
("relu", "leaky_relu", "elu", "silu", "gelu", "mish", ...), an ``nn.Module`` subclass, a
zero-argument factory returning a module, or any tensor -> tensor callable.
"""
from __future__ import annotations

import difflib
from typing import Callable, Union

import torch
from torch import nn

from ..ops.names import ACTIVATIONS

ActSpec = Union[str, Callable, type, None]

_ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": lambda: nn.ReLU(inplace=False),
    "relu6": lambda: nn.ReLU6(),
    "leaky_relu": lambda: nn.LeakyReLU(0.01),
    "elu": lambda: nn.ELU(1.0),
    "selu": lambda: nn.SELU(),
    "silu": lambda: nn.SiLU(),
    "swish": lambda: nn.SiLU(),
    "gelu": lambda: nn.GELU(),
    "mish": lambda: nn.Mish(),
    "sigmoid": lambda: nn.Sigmoid(),
    "tanh": lambda: nn.Tanh(),
    "hardswish": lambda: nn.Hardswish(),
    "identity": lambda: nn.Identity(),
}

#: Activations that every fused backend implements inside its kernels, by the name the
#: kernels use; the value is the extra scalar parameter (negative slope / alpha).
FUSED_ACTIVATIONS = ACTIVATIONS


class LambdaAct(nn.Module):
    """Wraps a plain callable (e.g. ``lambda x: 1.3 * torch.sigmoid(x) * x``) as a module."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor]):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)

    def extra_repr(self) -> str:
        return getattr(self.fn, "__name__", repr(self.fn))


def list_activations() -> list[str]:
    return sorted(_ACTIVATIONS)


def create_act(act: ActSpec) -> nn.Module:
    """Return a new activation module for ``act`` (see module docstring)."""
    if act is None:
        return nn.Identity()
    if isinstance(act, str):
        key = act.lower().replace("-", "_")
        if key not in _ACTIVATIONS:
            close = difflib.get_close_matches(key, _ACTIVATIONS, n=3)
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            raise ValueError(
                f"unknown activation {act!r}.{hint} Known: {', '.join(list_activations())}; "
                "or pass an nn.Module class, a module factory or a callable."
            )
        return _ACTIVATIONS[key]()
    if isinstance(act, nn.Module):
        raise TypeError(
            "act must be a name, a module class/factory or a callable, not a module instance "
            f"({type(act).__name__}): one instance would be shared by every layer. "
            f"Pass {type(act).__name__} (the class) or a lambda returning a new one."
        )
    if isinstance(act, type) and issubclass(act, nn.Module):
        return act()
    if callable(act):
        try:
            probe = act()
        except TypeError:
            probe = None
        if isinstance(probe, nn.Module):
            return probe
        return LambdaAct(act)
    raise TypeError(f"act must be a string, an nn.Module class, a factory or a callable; got {type(act).__name__}")


def fused_act_name(module: nn.Module) -> tuple[str, float] | None:
    """The (kernel name, parameter) a fused kernel uses for ``module``, or None if the
    kernels do not implement it (the caller then applies the module unfused)."""
    if isinstance(module, nn.Identity):
        return ("identity", 0.0)
    if type(module) is nn.ReLU:
        return ("relu", 0.0)
    if type(module) is nn.LeakyReLU:
        return ("leaky_relu", float(module.negative_slope))
    if type(module) is nn.ELU:
        return ("elu", float(module.alpha))
    if type(module) is nn.SiLU:
        return ("silu", 0.0)
    if type(module) is nn.GELU and module.approximate == "none":
        return ("gelu", 0.0)
    return None
