"""Shared building blocks of the zoo; each has a reference and a fused path (``fused=True``)."""
from torch import nn

from .. import recompute

from .activations import create_act, fused_act_name, list_activations, FUSED_ACTIVATIONS
from .conv_bn_act import BnAct, BnActConv, ConvAct, ConvBnAct
from .pool import GlobalAvgPool2d, MaxPool2d
from .squeeze_excite import SqueezeExcite
from .weight_init import init_he

#: layers with a fused kernel path (each has an activation ``act``)
FUSABLE_LAYERS = (ConvBnAct, BnAct, BnActConv, ConvAct, SqueezeExcite)


def set_fused(model: nn.Module, fused: bool = True) -> nn.Module:
    """Switch every fusable layer of ``model`` to the fused (or reference) path, in place.
    Parameters and buffers are untouched, so the state_dict stays the same. Fused, the
    model's forward also keeps BN+activation outputs as recipes rather than tensors for
    backward (:mod:`fastcnn.recompute`): one saved activation per conv layer; its max-pools
    recompute their indices in backward instead of keeping them.

    Switched is every module whose class declares ``fused: bool`` (the fusable layers, the
    pools of :mod:`fastcnn.layers.pool`, and model parts with a fused path of their own, such
    as ResNet's option-A shortcut).

    A lone layer that is one fused op (a ConvBnAct, BnAct, ConvAct or SqueezeExcite whose
    activation the kernels apply, or a pool) gets no rebuild hooks: nothing inside it consumes
    what it marks rebuildable, so they could only cost host time.
    """
    for m in model.modules():
        if isinstance(getattr(type(m), "fused", None), bool):
            m.fused = bool(fused)
    if fused and not _lone_op(model):
        return recompute.enable(model)
    return recompute.disable(model)


def _lone_op(model: nn.Module) -> bool:
    """Whether ``model``'s fused forward is a single op on its input (see :func:`set_fused`):
    its class says so (``single_op``) and the kernels apply its activation, if it has one."""
    act = getattr(model, "act", None)
    return getattr(type(model), "single_op", False) and (act is None or fused_act_name(act) is not None)


__all__ = ["create_act", "fused_act_name", "list_activations", "FUSED_ACTIVATIONS", "ConvBnAct",
           "BnAct", "BnActConv", "ConvAct", "SqueezeExcite", "MaxPool2d", "GlobalAvgPool2d", "set_fused", "FUSABLE_LAYERS", "init_he"]
