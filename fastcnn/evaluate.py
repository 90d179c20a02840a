"""``python -m fastcnn.evaluate CHECKPOINT``: test accuracy, per-class accuracy and the
confusion matrix of a trained checkpoint, optionally with horizontal-flip test-time
augmentation (the average of the logits of an image and its mirror).

The model and the data normalisation are rebuilt from what the checkpoint recorded, so the
numbers are those of the run that wrote it. :func:`evaluate` is also what the training loop
calls after every epoch.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys

import torch
import torch.nn.functional as F

from .cli import OneLineParser, prog_name, resolve_device


@torch.no_grad()
def evaluate(model, loader, num_classes: int, *, amp_dtype=None, tta: bool = False,
             distributed: bool = False) -> dict:
    """Loss (mean cross-entropy), accuracy (%), confusion matrix ``[true, predicted]`` over
    ``loader``. With ``distributed`` the sums are all-reduced, so every rank gets the totals of
    the whole (sharded) test set."""
    was_training = model.training
    model.eval()
    device = loader.device
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    confusion = torch.zeros(num_classes * num_classes, dtype=torch.long, device=device)
    ctx = (torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None
           else contextlib.nullcontext())
    for x, y in loader:
        with ctx:
            logits = model(x)
            if tta:
                logits = 0.5 * (logits.float() + model(x.flip(3)).float())
        logits = logits.float()
        loss_sum += F.cross_entropy(logits, y, reduction="sum").double()
        pred = logits.argmax(1)
        confusion += torch.bincount(y * num_classes + pred, minlength=num_classes * num_classes)
    if distributed:
        import torch.distributed as dist

        dist.all_reduce(loss_sum)
        dist.all_reduce(confusion)
    model.train(was_training)
    confusion = confusion.view(num_classes, num_classes).cpu()
    total = int(confusion.sum())
    correct = int(confusion.diag().sum())
    per_class = (confusion.diag().double() / confusion.sum(1).clamp_min(1).double() * 100).tolist()
    return {"loss": float(loss_sum) / max(total, 1), "acc": 100.0 * correct / max(total, 1),
            "correct": correct, "total": total, "per_class_acc": per_class,
            "confusion": confusion.tolist()}


def format_report(result: dict, classes) -> str:
    """Accuracy, per-class accuracy and the confusion matrix as aligned text."""
    k = len(classes)
    lines = [f"test accuracy {result['acc']:.2f}% ({result['correct']}/{result['total']}), "
             f"loss {result['loss']:.4f}"]
    if k <= 20:
        w = max(6, max(len(c) for c in classes))
        lines.append("per-class accuracy:")
        for c, a in zip(classes, result["per_class_acc"]):
            lines.append(f"  {c:<{w}} {a:6.2f}%")
        cw = max(5, len(str(max(max(r) for r in result["confusion"]))) + 1)
        lines.append("confusion matrix (rows: true class, columns: predicted):")
        lines.append(" " * (w + 2) + "".join(f"{c[:cw - 1]:>{cw}}" for c in classes))
        for c, row in zip(classes, result["confusion"]):
            lines.append(f"  {c:<{w}}" + "".join(f"{v:>{cw}}" for v in row))
    else:  # CIFAR-100: the worst and best classes; the full matrix is in --json
        order = sorted(range(k), key=lambda i: result["per_class_acc"][i])
        fmt = lambda idx: ", ".join(f"{classes[i]} {result['per_class_acc'][i]:.1f}%" for i in idx)
        lines.append(f"worst classes: {fmt(order[:5])}")
        lines.append(f"best classes:  {fmt(order[-5:][::-1])}")
        lines.append("(full per-class accuracy and confusion matrix: --json FILE)")
    return "\n".join(lines)


def build_from_checkpoint(state: dict, device, fused: bool | None = None):
    """The model a checkpoint describes, with its weights, on ``device``, in eval mode."""
    import fastcnn

    cfg = state["config"]
    kwargs = dict(cfg.get("model_kwargs") or {})
    model = fastcnn.create_model(cfg["model"], num_classes=cfg["num_classes"], in_chans=cfg["in_chans"],
                                 fused=bool(cfg.get("fused")) if fused is None else fused, **kwargs)
    model.load_state_dict(state["model"])
    return model.to(device).eval()


def _parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog=prog_name("python -m fastcnn.evaluate"),
                      description="Evaluate a fastcnn checkpoint on its dataset's test split.")
    p.add_argument("checkpoint", help="a checkpoint written by fastcnn.train (checkpoint_best.pt / _last.pt)")
    p.add_argument("--data-dir", help="data root (default: the one recorded, else $FASTCNN_DATA)")
    p.add_argument("--tta", action="store_true", help="average the logits of each image and its mirror")
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--device", help="cuda or cpu (default: cuda if available)")
    p.add_argument("--fused", action=argparse.BooleanOptionalAction, default=None,
                   help="run the fused kernels (default: as trained)")
    p.add_argument("--json", metavar="FILE", help="also write all numbers to FILE as JSON")
    return p


def main(argv=None) -> int:
    from . import checkpoint as ckpt
    from .data import DatasetError, GpuLoader, load_dataset

    args = _parser().parse_args(argv)
    try:
        state = ckpt.load(args.checkpoint)
        cfg = state["config"]
        device = resolve_device(args.device)
        ds = load_dataset(cfg["dataset"], args.data_dir or cfg.get("data_dir"), download=False)
        model = build_from_checkpoint(state, device, args.fused)
        loader = GpuLoader(ds.test_images, ds.test_labels, args.batch_size, train=False, device=device,
                           mean=cfg["mean"], std=cfg["std"], out_size=tuple(cfg["input_size"][1:]))
        result = evaluate(model, loader, ds.num_classes, tta=args.tta)
    except (ckpt.CheckpointError, DatasetError, ValueError, RuntimeError) as e:
        print(f"fastcnn.evaluate: error: {e}", file=sys.stderr)
        return 1
    print(f"{cfg['model']} on {cfg['dataset']} test split, epoch {state['epoch']}"
          + (", flip TTA" if args.tta else ""))
    print(format_report(result, ds.classes))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"checkpoint": args.checkpoint, "epoch": state["epoch"], "tta": args.tta,
                       "classes": list(ds.classes), **result}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
