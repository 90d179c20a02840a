"""``fastcnn.summary(model)``: parameters, multiply-accumulates and activation size per
image, counted by running one forward pass with hooks (so it is exact for the real graph)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class ModelSummary:
    name: str
    params: int
    trainable_params: int
    macs: int  # multiply-accumulates for one image
    activations: int  # elements written by conv/linear/BN/activation layers for one image
    input_size: tuple

    def __str__(self) -> str:
        return (f"{self.name}: {self.trainable_params:,} trainable params, "
                f"{self.macs / 1e6:,.1f} M MACs/image, {self.activations / 1e6:,.2f} M activations/image "
                f"(input {'x'.join(map(str, self.input_size))})")


def _macs(module: nn.Module, out: torch.Tensor) -> int:
    if isinstance(module, nn.Conv2d):
        k = module.kernel_size[0] * module.kernel_size[1] * (module.in_channels // module.groups)
        return out.numel() * k
    if isinstance(module, nn.Linear):
        return out.numel() * module.in_features
    return 0


def summary(model: nn.Module, input_size=None, print_out: bool = True) -> ModelSummary:
    """Count parameters, MACs and activation elements for a batch of one image."""
    input_size = tuple(input_size or getattr(model, "input_size", (3, 32, 32)))
    counts = {"macs": 0, "acts": 0}

    def hook(module, _inputs, output):
        if isinstance(output, torch.Tensor):
            counts["macs"] += _macs(module, output)
            counts["acts"] += output.numel()

    leaves = [m for m in model.modules() if not list(m.children())]
    handles = [m.register_forward_hook(hook) for m in leaves]
    # The hooks see nn.Conv2d / nn.BatchNorm2d modules, which only run on the reference path.
    fused = [m for m in model.modules() if getattr(m, "fused", False)]
    for m in fused:
        m.fused = False
    was_training = model.training
    try:
        model.eval()
        p = next(model.parameters(), None)
        x = torch.randn(1, *input_size, device=p.device if p is not None else "cpu")
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
        for m in fused:
            m.fused = True
        model.train(was_training)
    result = ModelSummary(
        name=getattr(model, "model_name", type(model).__name__),
        params=sum(p.numel() for p in model.parameters()),
        trainable_params=sum(p.numel() for p in model.parameters() if p.requires_grad),
        macs=counts["macs"], activations=counts["acts"], input_size=input_size,
    )
    if print_out:
        print(result)
    return result


def zoo_table(names=None) -> str:
    """A markdown table of the zoo: params, MACs and activations per image at the default
    input, and the accuracy the seeds report (the README's model table is made by this)."""
    from .registry import create_model, list_models, model_info

    rows = ["| model | params | MACs / image | activations / image | input | reported (seeds) |",
            "|---|---:|---:|---:|---|---|"]
    for name in names or list_models():
        info = model_info(name)
        s = summary(create_model(name), input_size=info.input_size, print_out=False)
        rows.append(f"| `{name}` | {s.trainable_params:,} | {s.macs / 1e6:,.1f} M | {s.activations / 1e6:,.2f} M "
                    f"| {'x'.join(map(str, info.input_size))} | {info.reported or '-'} |")
    return "\n".join(rows)

