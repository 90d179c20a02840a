"""Command-line pieces shared by the tools (``fastcnn.train``, ``fastcnn.evaluate``,
``fastcnn.export``, ...): the one-line error convention, the training command's parser and
argument checks, sizes, devices and the ``--amp`` choice.

Convention: a bad command line is a :class:`UsageError` (or argparse's own error), reported
as one ``prog: error: ...`` line with exit status 2; nothing has been written by then.

This module imports no other tool, so that each tool can import it (``fastcnn.train`` imports
``fastcnn.evaluate``; neither imports the other's command line).
"""
from __future__ import annotations

import argparse
import math
import os
import re
import sys

import torch

from .recipes import RECIPES, Recipe, get_recipe
from .schedules import SCHEDULES

OPTIMIZERS = ("sgd", "adam", "adamw", "adadelta")
DATASETS = ("cifar10", "cifar100", "svhn", "mnist")
#: settings that change the maths of a run: on --resume the checkpoint's values are kept
FROZEN_ON_RESUME = ("dataset", "subset", "seed", "batch_size", "optimizer", "lr", "momentum", "nesterov",
                    "weight_decay", "no_decay_bn_bias", "schedule", "milestones", "gamma",
                    "warmup_epochs", "label_smoothing", "drop_rate", "crop_padding", "flip", "cutout",
                    "min_lr_ratio", "grad_clip")
TRAIN_DESCRIPTION = "``python -m fastcnn.train MODEL [options]``: train a model of the zoo with its seed recipe."


class UsageError(Exception):
    """A bad command line: reported as one line, exit status 2."""


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad argument is one ``prog: error: ...`` line, not the usage block."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def prog_name(module_form: str) -> str:
    """The name a tool reports itself by: its console script (``fastcnn-train``) when started
    as one, else the ``python -m`` form it is documented with."""
    script = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    return script if script.startswith("fastcnn-") else module_form


# --------------------------------------------------------------------------- the training command

def _recipe_epilog() -> str:
    rows = ["default recipes (from the seeds; every value can be overridden, --print-recipe shows all):"]
    for pattern, r in RECIPES:
        sched = r.schedule if r.schedule != "multistep" else f"x{r.gamma:g} @{'/'.join(f'{m:g}' for m in r.milestones)}"
        rows.append(f"  {pattern:<15} {r.epochs:>3} ep, batch {r.batch_size:>3}, {r.optimizer} lr {r.lr:g} "
                    f"{sched}, wd {r.weight_decay:g}")
    rows.append("  (others)        200 ep, batch 128, sgd lr 0.1 cosine, wd 5e-4")
    return "\n".join(rows)


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``python -m fastcnn.train``."""
    p = OneLineParser(prog=prog_name("python -m fastcnn.train"), description=TRAIN_DESCRIPTION,
                      epilog=_recipe_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="a model name (python -c 'import fastcnn; print(fastcnn.list_models())')")
    d = p.add_argument_group("data")
    d.add_argument("--dataset", default="cifar10", help="cifar10 | cifar100 | svhn | mnist (default cifar10)")
    d.add_argument("--data-dir", help="data root (default $FASTCNN_DATA, else ~/.cache/fastcnn/data)")
    d.add_argument("--no-download", action="store_true", help="never download; fail if the data is missing")
    d.add_argument("--subset", type=int, help="train on a class-balanced random subset of N images")
    d.add_argument("--crop-padding", type=int, help="random-crop padding in pixels (0: no crop)")
    d.add_argument("--flip", action=argparse.BooleanOptionalAction, default=None,
                   help="random horizontal flips (default: on, off for digits: mnist, svhn)")
    d.add_argument("--cutout", type=int, help="cutout square side in pixels (0: off)")
    r = p.add_argument_group("recipe (defaults: the model's seed recipe)")
    r.add_argument("--print-recipe", action="store_true", help="print the resolved recipe and exit")
    r.add_argument("--epochs", type=int)
    r.add_argument("--batch-size", type=int, help="global batch size (split across DDP processes)")
    r.add_argument("--optimizer", help=" | ".join(OPTIMIZERS))
    r.add_argument("--lr", type=float, help="base learning rate")
    r.add_argument("--momentum", type=float)
    r.add_argument("--nesterov", action=argparse.BooleanOptionalAction, default=None)
    r.add_argument("--weight-decay", type=float)
    r.add_argument("--no-decay-bn-bias", action="store_true",
                   help="no weight decay on BatchNorm parameters and biases")
    r.add_argument("--schedule", help=" | ".join(SCHEDULES))
    r.add_argument("--milestones", type=float, nargs="+", help="multistep: epochs where LR *= gamma")
    r.add_argument("--gamma", type=float)
    r.add_argument("--warmup-epochs", type=float, help="linear warm-up before the schedule")
    r.add_argument("--min-lr-ratio", type=float, default=0.0, help="cosine: final LR / base LR")
    r.add_argument("--label-smoothing", type=float)
    r.add_argument("--drop-rate", type=float, help="dropout rate passed to the model")
    r.add_argument("--grad-clip", type=float, default=0.0, help="clip the gradient norm (0: off)")
    s = p.add_argument_group("speed and device")
    s.add_argument("--fused", action="store_true", help="use the fused kernels")
    s.add_argument("--backend", help="fused backend: auto | triton | cuda | cpu | reference")
    acts = s.add_mutually_exclusive_group()
    acts.add_argument("--keep-activations", action="store_true",
                      help="with --fused: keep each layer's activation for backward, as unfused PyTorch does "
                           "(the default on CPU, where compute rather than memory is scarce): one elementwise "
                           "pass less per layer in backward, unfused PyTorch's activation memory")
    acts.add_argument("--rebuild-activations", action="store_true",
                      help="with --fused: keep one activation per conv+BN+activation layer and rebuild the "
                           "layer's output in backward (fastcnn.recompute; the default on CUDA, for small GPUs). "
                           "Without either option, a --memory-budget turns the rebuilds on only if the kept "
                           "activations do not fit")
    s.add_argument("--amp", default="auto", help="auto | bf16 | fp16 | off (default auto: bf16 on GPUs of compute capability "
                        ">= 8.0, fp16 with loss scaling below 8.0, off on CPU)")
    s.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="channels-last memory format (default: on for CUDA)")
    s.add_argument("--compile", action="store_true", help="torch.compile the model")
    s.add_argument("--cuda-graphs", action="store_true",
                   help="capture the whole training step (forward, backward, optimizer step) in a CUDA "
                        "graph after a few warm-up steps and replay it: less CPU time per step, for "
                        "host-bound runs (small models, small batches). CUDA only, one process; not with "
                        "--amp fp16, --compile or --memory-budget")
    s.add_argument("--device", help="cuda | cuda:N | cpu (default: cuda if available)")
    s.add_argument("--memory-budget", help="fit a training step into this much memory, e.g. 3GB, 2.5GiB, "
                   "800MB: before the first step the peak is predicted and, if needed, block "
                   "recomputation and then micro-batches are turned on; on CUDA the allocator is capped")
    s.add_argument("--sync-bn", action="store_true", help="SyncBatchNorm across DDP processes")
    s.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice)")
    s.add_argument("--deterministic", action="store_true", help="deterministic algorithms (slower on GPU)")
    s.add_argument("--keep-cpu-memory", action=argparse.BooleanOptionalAction, default=True,
                   help="CPU runs: have malloc keep the memory a step frees instead of returning it to the "
                        "system and faulting it in again next step (fastcnn.cpu_memory; glibc only; default on)")
    o = p.add_argument_group("run and output")
    o.add_argument("--out-dir", default="runs", help="parent of the run folders (default runs/)")
    o.add_argument("--name", help="run folder name (default MODEL-DATASET, made unique)")
    o.add_argument("--resume", nargs="?", const="auto", metavar="RUN_OR_CHECKPOINT",
                   help="continue a run (its folder or checkpoint; alone: the default run folder)")
    o.add_argument("--overwrite", action="store_true", help="replace an existing run's files")
    o.add_argument("--seed", type=int, default=0)
    o.add_argument("--stop-after-epoch", type=int, help="stop after this epoch (continue later with --resume)")
    o.add_argument("--log-interval", type=int, default=10,
                   help="steps between progress updates and NaN checks (default 10)")
    o.add_argument("--metrics-format", default="jsonl", help="jsonl | csv")
    o.add_argument("--no-plot", action="store_true", help="do not draw curves.png")
    o.add_argument("--tensorboard", action="store_true", help="also log to TensorBoard (run folder/tb)")
    return p


def parse_train_args(argv=None):
    """``(args, model_info)`` for the training command, with every check that needs nothing
    but the command line done (``args.dataset`` is normalised: ``CIFAR-10`` -> ``cifar10``)."""
    import fastcnn

    args = build_parser().parse_args(argv)
    try:
        info = fastcnn.model_info(args.model)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if args.dataset.lower().replace("-", "") not in DATASETS:
        raise UsageError(f"--dataset {args.dataset!r} is unknown; choose cifar10, cifar100, svhn or mnist")
    args.dataset = args.dataset.lower().replace("-", "")
    if args.metrics_format not in ("jsonl", "csv"):
        raise UsageError(f"--metrics-format {args.metrics_format!r}: choose jsonl or csv")
    if args.log_interval < 1:
        raise UsageError("--log-interval must be >= 1")
    if args.subset is not None and args.subset < 1:
        raise UsageError(f"--subset must be >= 1, got {args.subset}")
    if args.resume and args.overwrite:
        raise UsageError("--resume and --overwrite contradict each other; pick one")
    return args, info


def _tuple_if_list(v):
    return tuple(v) if isinstance(v, list) else v


def keep_resumed_settings(args, saved: dict) -> Recipe:
    """On ``--resume``: the checkpoint's settings (``saved`` is its config) replace those of
    the command line that change the maths of the run (:data:`FROZEN_ON_RESUME`); a note says
    which given options are ignored. Returns the checkpoint's recipe (``--epochs`` may extend it)."""
    parser, ignored = build_parser(), []
    for key in FROZEN_ON_RESUME:
        if key in saved["args"]:
            given, kept = getattr(args, key), _tuple_if_list(saved["args"][key])
            given = _tuple_if_list(list(given)) if isinstance(given, list) else given
            if given is not None and given != parser.get_default(key) and given != kept:
                ignored.append(f"--{key.replace('_', '-')}")
            setattr(args, key, kept)
    if ignored and int(os.environ.get("RANK", "0")) == 0:
        print(f"note: resuming keeps the checkpoint's settings; ignored: {', '.join(ignored)} "
              "(start a new run to change them)", file=sys.stderr)
    rec = Recipe(**{k: _tuple_if_list(v) for k, v in saved["recipe"].items()})
    if args.epochs is not None:
        rec = rec.replace(epochs=args.epochs)
    return rec


def resolve_recipe(args, model_name: str) -> Recipe:
    """The model's recipe with every option given on the command line applied."""
    rec = get_recipe(model_name)
    over = {}
    for f in ("epochs", "batch_size", "optimizer", "lr", "momentum", "nesterov", "weight_decay",
              "schedule", "gamma", "warmup_epochs", "label_smoothing", "drop_rate", "crop_padding",
              "flip", "cutout"):
        v = getattr(args, f)
        if v is not None:
            over[f] = v
    if args.milestones is not None:
        over["milestones"] = tuple(args.milestones)
    rec = rec.replace(**over)
    if args.flip is None and args.dataset.lower() in ("mnist", "svhn"):
        rec = rec.replace(flip=False)  # mirrored digits are other digits (or none)
    _check_recipe(rec)
    return rec


def _check_recipe(r: Recipe) -> None:
    if r.epochs < 1:
        raise UsageError(f"--epochs must be >= 1, got {r.epochs}")
    if r.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {r.batch_size}")
    if r.optimizer not in OPTIMIZERS:
        raise UsageError(f"--optimizer {r.optimizer!r} is unknown; choose one of {', '.join(OPTIMIZERS)}")
    if not (r.lr > 0 and math.isfinite(r.lr)):
        raise UsageError(f"--lr must be a positive number, got {r.lr}")
    if r.weight_decay < 0:
        raise UsageError(f"--weight-decay must be >= 0, got {r.weight_decay}")
    if r.schedule not in SCHEDULES:
        raise UsageError(f"--schedule {r.schedule!r} is unknown; choose one of {', '.join(SCHEDULES)}")
    if not 0 <= r.label_smoothing < 1:
        raise UsageError(f"--label-smoothing must be in [0, 1), got {r.label_smoothing}")
    if r.drop_rate is not None and not 0 <= r.drop_rate < 1:
        raise UsageError(f"--drop-rate must be in [0, 1), got {r.drop_rate}")
    if r.crop_padding < 0 or r.cutout < 0:
        raise UsageError("--crop-padding and --cutout must be >= 0")
    if r.warmup_epochs < 0 or r.warmup_epochs > r.epochs:
        raise UsageError(f"--warmup-epochs must be in 0..{r.epochs}, got {r.warmup_epochs}")


# --------------------------------------------------------------------------- sizes, devices, AMP

def parse_size(text: str) -> int:
    """'3GB' -> 3e9 bytes; GiB/MiB are powers of two; a bare number is bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([kmgt]i?b?|b)?\s*", text.lower())
    if not m:
        raise UsageError(f"--memory-budget {text!r} is not a size like 3GB, 2.5GiB or 800MB")
    num, unit = float(m.group(1)), (m.group(2) or "b")
    powers = {"k": 1, "m": 2, "g": 3, "t": 4}
    mult = 1 if unit == "b" else (1024 if "i" in unit else 1000) ** powers[unit[0]]
    size = int(num * mult)
    if size <= 0:
        raise UsageError(f"--memory-budget must be positive, got {text!r}")
    return size


def resolve_device(name: str | None) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name!r} is not a device (use cpu, cuda or cuda:N)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {name}: CUDA is not available on this machine (use --device cpu)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UsageError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type != "cpu":
        raise UsageError(f"--device {name!r}: only cpu and cuda are supported")
    return dev


def _native_bf16(device: torch.device) -> bool:
    """Whether GPU ``device`` computes bfloat16 in hardware (compute capability >= 8.0).
    ``torch.cuda.is_bf16_supported()`` alone also says yes where bf16 is only *emulated*
    (Turing, sm_75: no bf16 tensor-core or ALU path), which would make bf16 AMP slower than
    fp32 there; ``including_emulation=False`` asks about the hardware."""
    with torch.cuda.device(device):
        return bool(torch.cuda.is_bf16_supported(including_emulation=False))


def _amp_dtype(amp: str, device: torch.device):
    """``(name, autocast dtype or None)`` for ``--amp``. ``auto``: off on CPU; on a GPU bf16
    where it is native (compute capability >= 8.0: no loss scaling needed, fp32's range) and
    fp16 below (Turing's tensor cores do fp16; train() pairs fp16 with a GradScaler). An
    explicit ``bf16`` on a GPU without native bf16 is an error rather than a silent slowdown."""
    amp = amp.lower()
    if amp not in ("auto", "bf16", "fp16", "off"):
        raise UsageError(f"--amp {amp!r} is unknown; choose auto, bf16, fp16 or off")
    native_bf16 = device.type == "cuda" and _native_bf16(device)
    if amp == "auto":
        amp = "off" if device.type != "cuda" else ("bf16" if native_bf16 else "fp16")
    if amp == "bf16" and device.type == "cuda" and not native_bf16:
        major, minor = torch.cuda.get_device_capability(device)
        raise UsageError(
            f"--amp bf16: {torch.cuda.get_device_name(device)} (compute capability {major}.{minor}) has no "
            "bfloat16 hardware (it starts at 8.0, Ampere), so bf16 would only be emulated, slowly; "
            "use --amp fp16 (with loss scaling) or --amp off")
    return amp, {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[amp]


# --------------------------------------------------------------------------- console scripts

def info_main(argv=None) -> int:
    """``fastcnn-info``: what this installation can run (``python -m fastcnn.info``)."""
    argparse.ArgumentParser(prog=prog_name("python -m fastcnn.info"),
                             description="Print what this installation of fastcnn can run.").parse_args(argv)
    from .environment import info

    info()
    return 0
