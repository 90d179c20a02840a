"""``python -m fastcnn.export CHECKPOINT --onnx [OUT]``: an inference graph of a trained model,
with BatchNorm folded into the convolution before it.

Folding: for ``y = BN(conv(x))`` in eval mode, ``BN`` is the per-channel affine map
``(z - mean) * gamma / sqrt(var + eps) + beta``, so it is absorbed by scaling the conv's
weights and adding a bias. This covers every post-activation unit (:class:`ConvBnAct`) and
any ``Conv2d`` directly followed by ``BatchNorm2d`` in an ``nn.Sequential``. A BN that
feeds an activation before its conv (pre-activation nets: ResNet-164, WRN, DenseNet) cannot
be folded that way and stays in the graph; the tool says how many were folded and how many
remain, and checks that the folded model computes what the original did.

ONNX needs the ``onnx`` package (and ``onnxscript`` for torch's default exporter); without
them the tool says what to install.
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import sys

import torch
from torch import nn

from .cli import OneLineParser, prog_name
from .layers import ConvBnAct, set_fused


def _fold_pair(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    """Absorb ``bn`` (eval mode) into ``conv`` in place."""
    if not bn.track_running_stats or bn.running_mean is None:
        raise ValueError("cannot fold a BatchNorm without running statistics")
    with torch.no_grad():
        scale = torch.rsqrt(bn.running_var.double() + bn.eps)
        if bn.affine:
            scale = scale * bn.weight.double()
        shift = -bn.running_mean.double() * scale
        if bn.affine:
            shift = shift + bn.bias.double()
        w = conv.weight.double() * scale.view(-1, 1, 1, 1)
        b = shift if conv.bias is None else conv.bias.double() * scale + shift
        conv.weight.copy_(w.to(conv.weight.dtype))
        if conv.bias is None:
            conv.bias = nn.Parameter(b.to(conv.weight.dtype))
        else:
            conv.bias.copy_(b.to(conv.bias.dtype))


def fold_batchnorm(model: nn.Module) -> tuple[nn.Module, int, int]:
    """A copy of ``model`` in eval mode, reference path, with every foldable BN folded.
    Returns ``(folded_model, folded, remaining)``."""
    model = copy.deepcopy(model).eval()
    set_fused(model, False)
    folded = 0
    for m in model.modules():
        if isinstance(m, ConvBnAct) and isinstance(m.bn, nn.BatchNorm2d):
            _fold_pair(m.conv, m.bn)
            m.bn = nn.Identity()
            folded += 1
        elif isinstance(m, nn.Sequential):
            names = list(m._modules)
            for a, b in zip(names, names[1:]):
                conv, bn = m._modules[a], m._modules[b]
                if type(conv) is nn.Conv2d and type(bn) is nn.BatchNorm2d and conv.out_channels == bn.num_features:
                    _fold_pair(conv, bn)
                    m._modules[b] = nn.Identity()
                    folded += 1
    remaining = sum(1 for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm))
    return model, folded, remaining


def check_equivalent(original: nn.Module, folded: nn.Module, input_size, batch: int = 4) -> float:
    """Max |difference| of the logits on random inputs (the original in eval mode)."""
    x = torch.randn(batch, *input_size)
    was = original.training
    original.eval()
    with torch.no_grad():
        diff = (original(x).double() - folded(x).double()).abs().max().item()
    original.train(was)
    return diff


def onnx_unavailable_reason() -> str | None:
    if importlib.util.find_spec("onnx") is None:
        return ("ONNX export needs the onnx package (and onnxscript for torch's default exporter): "
                "pip install onnx onnxscript")
    return None


def export_onnx(model: nn.Module, input_size, path: str, opset: int = 18) -> str:
    """Write ``model`` (eval mode) to ``path`` with a dynamic batch dimension; returns the exporter used."""
    reason = onnx_unavailable_reason()
    if reason:
        raise RuntimeError(reason)
    x = torch.randn(1, *input_size)
    if importlib.util.find_spec("onnxscript") is not None:
        batch = torch.export.Dim("batch", min=1, max=65536)
        torch.onnx.export(model, (x,), path, dynamo=True, input_names=["input"], output_names=["logits"],
                          dynamic_shapes=({0: batch},), opset_version=opset)
        return "torch.export"
    torch.onnx.export(model, (x,), path, dynamo=False, input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, opset_version=opset)
    return "torchscript"


def main(argv=None) -> int:
    from . import checkpoint as ckpt
    from .evaluate import build_from_checkpoint

    p = OneLineParser(prog=prog_name("python -m fastcnn.export"),
                      description="Export a trained checkpoint for inference, BatchNorm folded into convs.")
    p.add_argument("checkpoint")
    p.add_argument("--onnx", nargs="?", const="", metavar="OUT",
                   help="write ONNX (default: the checkpoint's name with .onnx)")
    p.add_argument("--opset", type=int, default=18)
    p.add_argument("--tolerance", type=float, default=1e-3,
                   help="largest allowed logit difference between folded and original model")
    args = p.parse_args(argv)
    if args.onnx is None:
        p.error("nothing to export: give --onnx [OUT]")
    prog = "fastcnn.export"
    reason = onnx_unavailable_reason()
    if reason:
        print(f"{prog}: error: {reason}", file=sys.stderr)
        return 1
    try:
        state = ckpt.load(args.checkpoint)
        model = build_from_checkpoint(state, "cpu", fused=False)
    except (ckpt.CheckpointError, ValueError, RuntimeError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 1
    input_size = tuple(state["config"]["input_size"])
    folded, n_folded, n_left = fold_batchnorm(model)
    diff = check_equivalent(model, folded, input_size)
    print(f"folded {n_folded} BatchNorm layer(s) into convolutions; {n_left} remain "
          f"(pre-activation BN cannot fold into the following conv); max logit difference {diff:.2e}")
    if not diff <= args.tolerance:
        print(f"{prog}: error: the folded model differs from the original by {diff:.3g} "
              f"(> --tolerance {args.tolerance}); not exporting", file=sys.stderr)
        return 1
    out = args.onnx or args.checkpoint.rsplit(".", 1)[0] + ".onnx"
    try:
        how = export_onnx(folded, input_size, out, args.opset)
    except Exception as e:  # the exporters raise many types; report one line
        print(f"{prog}: error: ONNX export failed ({type(e).__name__}: {str(e).splitlines()[0][:300]})",
              file=sys.stderr)
        return 1
    print(f"wrote {out} ({how} exporter, opset {args.opset}, input 'input' [batch, "
          f"{', '.join(map(str, input_size))}], output 'logits')")
    return 0


if __name__ == "__main__":
    sys.exit(main())
