"""``python -m fastcnn.train MODEL [options]``: train a model of the zoo with its seed recipe.

    python -m fastcnn.train resnet20 --fused                      # the seed's recipe, CIFAR-10
    python -m fastcnn.train lenet5 --subset 5000 --epochs 10       # a quick run
    python -m fastcnn.train simplenet --print-recipe               # show the recipe, then exit
    python -m fastcnn.train resnet20 --resume                      # continue runs/resnet20-cifar10
    torchrun --nproc_per_node=2 -m fastcnn.train resnet20 --sync-bn

Each run gets a folder (``runs/MODEL-DATASET`` by default, never overwritten unless
``--overwrite``): ``config.json``, ``metrics.jsonl`` (or ``.csv``) with one row per epoch,
``checkpoint_last.pt`` and ``checkpoint_best.pt`` (atomic writes), ``curves.png`` at the end.
Bad arguments end with one ``error:`` line and a non-zero exit status.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import json
import math
import os
import re
import shutil
import sys
import time

import torch
from torch import nn

from . import checkpoint as ckpt
from . import memory, memory_plan
from .recipes import RECIPES, Recipe, format_recipe, get_recipe
from .schedules import SCHEDULES, LRScheduler, ScheduleConfig

RUN_FILES = ("config.json", "metrics.jsonl", "metrics.csv", "checkpoint_last.pt", "checkpoint_best.pt",
             "curves.png")
OPTIMIZERS = ("sgd", "adam", "adamw", "adadelta")
#: settings that change the maths of a run: on --resume the checkpoint's values are kept
FROZEN_ON_RESUME = ("dataset", "subset", "seed", "batch_size", "optimizer", "lr", "momentum", "nesterov",
                    "weight_decay", "no_decay_bn_bias", "schedule", "milestones", "gamma",
                    "warmup_epochs", "label_smoothing", "drop_rate", "crop_padding", "flip", "cutout",
                    "min_lr_ratio", "grad_clip")


class UsageError(Exception):
    """A bad command line: reported as one line, exit status 2."""


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite."""


class TrainError(RuntimeError):
    """Training cannot go on (e.g. out of memory within the budget); the message says why."""


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad argument is one ``prog: error: ...`` line, not the usage block."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


# --------------------------------------------------------------------------- arguments

def _recipe_epilog() -> str:
    rows = ["default recipes (from the seeds; every value can be overridden, --print-recipe shows all):"]
    for pattern, r in RECIPES:
        sched = r.schedule if r.schedule != "multistep" else f"x{r.gamma:g} @{'/'.join(f'{m:g}' for m in r.milestones)}"
        rows.append(f"  {pattern:<15} {r.epochs:>3} ep, batch {r.batch_size:>3}, {r.optimizer} lr {r.lr:g} "
                    f"{sched}, wd {r.weight_decay:g}")
    rows.append("  (others)        200 ep, batch 128, sgd lr 0.1 cosine, wd 5e-4")
    return "\n".join(rows)


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m fastcnn.train", description=__doc__.split("\n\n")[0],
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
    s.add_argument("--amp", default="auto", help="auto | bf16 | fp16 | off (default auto: bf16 on GPUs of compute capability "
                        ">= 8.0, fp16 with loss scaling below 8.0, off on CPU)")
    s.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="channels-last memory format (default: on for CUDA)")
    s.add_argument("--compile", action="store_true", help="torch.compile the model")
    s.add_argument("--device", help="cuda | cuda:N | cpu (default: cuda if available)")
    s.add_argument("--memory-budget", help="fit a training step into this much memory, e.g. 3GB, 2.5GiB, "
                   "800MB: before the first step the peak is predicted and, if needed, block "
                   "recomputation and then micro-batches are turned on; on CUDA the allocator is capped")
    s.add_argument("--sync-bn", action="store_true", help="SyncBatchNorm across DDP processes")
    s.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice)")
    s.add_argument("--deterministic", action="store_true", help="deterministic algorithms (slower on GPU)")
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


# --------------------------------------------------------------------------- run folder

def _has_run(folder: str) -> bool:
    return os.path.isdir(folder) and any(os.path.exists(os.path.join(folder, f)) for f in RUN_FILES)


def new_run_dir(args, model_name: str) -> str:
    """A folder for a fresh run; never one that holds another run unless --overwrite."""
    base = os.path.join(args.out_dir, args.name or f"{model_name}-{args.dataset.lower()}")
    if not _has_run(base):
        return base
    if args.overwrite:
        for f in RUN_FILES:
            path = os.path.join(base, f)
            if os.path.exists(path):
                os.remove(path)
        shutil.rmtree(os.path.join(base, "tb"), ignore_errors=True)
        return base
    if args.name:
        raise UsageError(f"run folder {base} already holds a run; use --resume to continue it, "
                         "--overwrite to replace it, or another --name")
    i = 2
    while _has_run(f"{base}-{i}"):
        i += 1
    return f"{base}-{i}"


def resume_path(args, model_name: str) -> str:
    target = args.resume
    if target == "auto":
        target = os.path.join(args.out_dir, args.name or f"{model_name}-{args.dataset.lower()}")
    if os.path.isdir(target):
        target = os.path.join(target, "checkpoint_last.pt")
    if not os.path.isfile(target):
        raise UsageError(f"--resume: no checkpoint at {target} (give the run folder or a checkpoint file)")
    return target


# --------------------------------------------------------------------------- distributed

def init_distributed(device_arg):
    """(rank, world_size, local_rank, device); starts the process group under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, 0, resolve_device(device_arg)
    import torch.distributed as dist

    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    want_cuda = (device_arg or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    if want_cuda:
        if not torch.cuda.is_available():
            raise UsageError("--device cuda: CUDA is not available on this machine")
        if local >= torch.cuda.device_count():
            raise UsageError(f"local rank {local} but only {torch.cuda.device_count()} GPU(s) visible")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, local, device


# --------------------------------------------------------------------------- model and optimiser

def build_model(model_name: str, info, ds, rec: Recipe, fused: bool):
    import fastcnn

    kwargs = {}
    accepted = __import__("inspect").signature(info.fn).parameters
    if rec.drop_rate is not None:
        if "drop_rate" in accepted:
            kwargs["drop_rate"] = rec.drop_rate
        elif rec.drop_rate > 0:
            print(f"note: {model_name} takes no drop_rate; the recipe's dropout {rec.drop_rate} is not applied",
                  file=sys.stderr)
    model = fastcnn.create_model(model_name, num_classes=ds.num_classes, in_chans=ds.in_chans,
                                 fused=fused, **kwargs)
    return model, kwargs


def param_groups(model: nn.Module, weight_decay: float, no_decay_bn_bias: bool):
    if not no_decay_bn_bias or weight_decay == 0:
        return [{"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": weight_decay}]
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)  # BN weight/bias and all biases are 1-D
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model, rec: Recipe, no_decay_bn_bias: bool):
    groups = param_groups(model, rec.weight_decay, no_decay_bn_bias)
    if rec.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=rec.lr, momentum=rec.momentum,
                               nesterov=rec.nesterov and rec.momentum > 0)
    if rec.optimizer == "adam":
        return torch.optim.Adam(groups, lr=rec.lr)
    if rec.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=rec.lr)
    return torch.optim.Adadelta(groups, lr=rec.lr, rho=0.9, eps=1e-3)  # SimpleNet's settings


# --------------------------------------------------------------------------- progress and logging

def _fmt_time(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Progress:
    """A one-line progress bar on a terminal; plain lines (one per epoch) otherwise."""

    def __init__(self, enabled: bool, stream=None):
        self.stream = stream or sys.stdout
        self.enabled = enabled
        self.tty = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()

    def update(self, epoch, epochs, step, steps, loss, acc, img_s, eta):
        if not self.tty:
            return
        width = 24
        done = int(width * step / max(steps, 1))
        bar = "#" * done + "-" * (width - done)
        self.stream.write(f"\repoch {epoch}/{epochs} [{bar}] {step}/{steps} loss {loss:.4f} "
                          f"acc {acc:5.2f}% {img_s:,.0f} img/s ETA {_fmt_time(eta)}  ")
        self.stream.flush()

    def line(self, text: str):
        if not self.enabled:
            return
        if self.tty:
            self.stream.write("\r\033[K")
        print(text, file=self.stream, flush=True)


class MetricsFile:
    """One row per epoch in ``metrics.jsonl`` or ``metrics.csv``; on resume, rows after the
    checkpoint's epoch are dropped so the file matches the continued run."""

    FIELDS = ("epoch", "lr", "train_loss", "train_acc", "test_loss", "test_acc", "epoch_time_s",
              "images_per_s", "peak_mem_mb")

    def __init__(self, folder: str, fmt: str, keep_until_epoch: int | None = None):
        self.fmt = fmt
        self.path = os.path.join(folder, f"metrics.{fmt}")
        rows = self.read(self.path) if keep_until_epoch is not None and os.path.exists(self.path) else []
        rows = [r for r in rows if r["epoch"] <= (keep_until_epoch or 0)]
        with open(self.path, "w", newline="") as f:
            if fmt == "csv":
                w = csv.DictWriter(f, self.FIELDS)
                w.writeheader()
                w.writerows(rows)
            else:
                f.writelines(json.dumps(r) + "\n" for r in rows)
        self.rows = rows

    @staticmethod
    def read(path: str) -> list[dict]:
        with open(path, newline="") as f:
            if path.endswith(".csv"):
                return [{k: (int(v) if k == "epoch" else float(v)) for k, v in r.items()} for r in csv.DictReader(f)]
            return [json.loads(line) for line in f if line.strip()]

    def append(self, row: dict) -> None:
        self.rows.append(row)
        with open(self.path, "a", newline="") as f:
            if self.fmt == "csv":
                csv.DictWriter(f, self.FIELDS).writerow({k: row.get(k) for k in self.FIELDS})
            else:
                f.write(json.dumps(row) + "\n")


def plot_curves(rows: list[dict], path: str, title: str) -> str | None:
    """Loss and accuracy curves to ``path``; returns a message instead when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: skipping curves.png (pip install matplotlib)"
    ep = [r["epoch"] for r in rows]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    a1.plot(ep, [r["train_loss"] for r in rows], label="train")
    a1.plot(ep, [r["test_loss"] for r in rows], label="test")
    a1.set_xlabel("epoch"), a1.set_ylabel("loss"), a1.legend()
    a2.plot(ep, [r["train_acc"] for r in rows], label="train")
    a2.plot(ep, [r["test_acc"] for r in rows], label="test")
    a2.set_xlabel("epoch"), a2.set_ylabel("accuracy (%)"), a2.legend()
    fig.suptitle(title)
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
    return None


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux: process peak RSS


# --------------------------------------------------------------------------- training

def train(argv=None) -> dict:
    """Run training from command-line ``argv``; returns the final summary dict (rank 0)."""
    import fastcnn
    from .data import GpuLoader, channel_stats, load_dataset
    from .evaluate import evaluate

    args = build_parser().parse_args(argv)
    try:
        info = fastcnn.model_info(args.model)
    except ValueError as e:
        raise UsageError(str(e)) from None
    model_name = info.name
    if args.dataset.lower().replace("-", "") not in ("cifar10", "cifar100", "svhn", "mnist"):
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

    resume_state = None
    if args.resume:
        resume_state = ckpt.load(resume_path(args, model_name))
        saved = resume_state["config"]
        if saved["model"] != model_name:
            raise UsageError(f"--resume: the checkpoint is of {saved['model']}, not {model_name}")
        # the maths of the run come from the checkpoint; say so if the command line differs
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
    else:
        rec = resolve_recipe(args, model_name)
    if args.print_recipe:
        print(format_recipe(model_name, rec, args.dataset))
        return {}

    if args.backend is not None:
        try:
            fastcnn.set_backend(args.backend)
        except ValueError as e:
            raise UsageError(f"--backend: {e}") from None
    rank, world, _, device = init_distributed(args.device)
    amp_name, amp_dtype = _amp_dtype(args.amp, device)
    budget = parse_size(args.memory_budget) if args.memory_budget else None
    if args.sync_bn and args.fused:
        raise UsageError("--sync-bn with --fused: the fused kernels compute per-process batch statistics; "
                         "drop one of the two")
    if args.sync_bn and device.type != "cuda":
        raise UsageError("--sync-bn needs CUDA devices (PyTorch's SyncBatchNorm runs on GPUs only)")
    if rec.batch_size % world:
        raise UsageError(f"--batch-size {rec.batch_size} is not divisible by the {world} processes")
    if args.tensorboard:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise UsageError("--tensorboard needs the tensorboard package: pip install tensorboard") from None
    main_proc = rank == 0
    out = Progress(main_proc)

    if budget is not None and device.type == "cuda":  # the cap; the plan comes before the first step
        total = torch.cuda.get_device_properties(device).total_memory
        if budget > total:
            raise UsageError(f"--memory-budget {args.memory_budget} exceeds the GPU's "
                             f"{total / 1e9:.1f} GB")
        torch.cuda.set_per_process_memory_fraction(budget / total, device)
    if args.threads is not None:
        if args.threads < 1:
            raise UsageError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    if args.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    channels_last = device.type == "cuda" if args.channels_last is None else args.channels_last

    # data: rank 0 downloads if needed, the others wait and read
    if world > 1:
        _on_rank0_for_all(lambda: load_dataset(args.dataset, args.data_dir, download=not args.no_download)
                          and None, main_proc)
    ds = load_dataset(args.dataset, args.data_dir, download=not args.no_download and world == 1,
                      subset=args.subset, seed=args.seed)
    train_x = torch.from_numpy(ds.train_images)
    mean, std = channel_stats(train_x)
    input_size = (ds.in_chans,) + tuple(info.input_size[1:])

    torch.manual_seed(args.seed)
    model, model_kwargs = build_model(model_name, info, ds, rec, args.fused)
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if args.sync_bn and world > 1:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    raw_model = model
    per_rank_batch = rec.batch_size // world
    try:
        train_loader = GpuLoader(train_x, ds.train_labels, per_rank_batch, train=True, device=device, mean=mean,
                                 std=std, crop_padding=rec.crop_padding, flip=rec.flip, cutout=rec.cutout,
                                 seed=args.seed, rank=rank, world_size=world, out_size=input_size[1:],
                                 channels_last=channels_last)
        test_loader = GpuLoader(ds.test_images, ds.test_labels, max(per_rank_batch, 256), train=False,
                                device=device, mean=mean, std=std, rank=rank, world_size=world,
                                out_size=input_size[1:], channels_last=channels_last)
    except torch.OutOfMemoryError:
        mb = (ds.train_images.nbytes + ds.test_images.nbytes) / 2 ** 20
        raise TrainError(f"the {args.dataset} images ({mb:,.0f} MB as uint8) do not fit in GPU memory"
                         + (f" within --memory-budget {args.memory_budget}" if budget else "")) from None
    if len(train_loader) == 0:
        raise UsageError(f"the training set ({train_loader.num_samples} images per process) is smaller than "
                         f"one batch of {per_rank_batch}; lower --batch-size or raise --subset")
    _preflight(raw_model, test_loader, amp_dtype)
    micro_batches = 1
    if budget is not None:  # plan before the first step: recomputation, then micro-batches
        margin = min(memory.MARGIN, budget // 6) if device.type == "cuda" else 0
        try:
            mplan = memory_plan.plan(raw_model, lambda m: build_optimizer(m, rec, args.no_decay_bn_bias),
                                     per_rank_batch, budget, input_size, ds.num_classes, device, amp_dtype,
                                     margin, channels_last)
        except memory_plan.BudgetError as e:
            raise UsageError(f"--memory-budget {args.memory_budget}: {e}") from None
        if mplan.recompute:
            memory_plan.enable_recomputation(raw_model)
        micro_batches = mplan.micro_batches
        out.line(mplan.describe() + ("" if device.type == "cuda" else
                                     f" (planned on {device.type}; the cap itself is enforced on CUDA only)"))

    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    if args.compile:
        model = torch.compile(model)
    optimizer = build_optimizer(raw_model, rec, args.no_decay_bn_bias)
    sched = LRScheduler(optimizer, ScheduleConfig(
        rec.schedule, rec.epochs, rec.milestones, rec.gamma, args.min_lr_ratio, rec.warmup_epochs),
        len(train_loader))
    scaler = torch.amp.GradScaler(device.type) if amp_name == "fp16" else None
    criterion = nn.CrossEntropyLoss(label_smoothing=rec.label_smoothing)

    start_epoch, best_acc, best_epoch = 1, -1.0, 0
    if resume_state is not None:
        raw_model.load_state_dict(resume_state["model"])
        optimizer.load_state_dict(resume_state["optimizer"])
        try:
            sched.load_state_dict(resume_state["scheduler"])
        except ValueError as e:
            raise UsageError(f"--resume: {e}") from None
        if scaler is not None and resume_state.get("scaler"):
            scaler.load_state_dict(resume_state["scaler"])
        rngs = resume_state["rng"]
        ckpt.set_rng_state(rngs[rank] if rank < len(rngs) else rngs[0])
        start_epoch = int(resume_state["epoch"]) + 1
        best_acc, best_epoch = float(resume_state["best_acc"]), int(resume_state["best_epoch"])
        run_dir = os.path.dirname(os.path.abspath(resume_path(args, model_name)))
    else:
        run_dir = (_on_rank0_for_all(lambda: new_run_dir(args, model_name), main_proc) if world > 1
                   else new_run_dir(args, model_name))

    config = {"model": model_name, "model_kwargs": model_kwargs, "num_classes": ds.num_classes,
              "in_chans": ds.in_chans, "input_size": list(input_size), "dataset": args.dataset,
              "data_dir": ds.root, "classes": list(ds.classes), "mean": mean, "std": std,
              "fused": bool(args.fused), "backend": fastcnn.get_backend(), "amp": amp_name,
              "world_size": world, "device": str(device), "recipe": rec.as_dict(),
              "args": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()},
              "train_images": int(ds.train_labels.shape[0]), "fastcnn": fastcnn.__version__,
              "torch": str(torch.__version__)}
    config = json.loads(json.dumps(config))  # plain types only: loadable with weights_only=True
    writer = None
    if main_proc:
        os.makedirs(run_dir, exist_ok=True)
        with open(os.path.join(run_dir, "config.json"), "w") as f:
            json.dump(config, f, indent=1)
        metrics = MetricsFile(run_dir, args.metrics_format,
                              keep_until_epoch=start_epoch - 1 if resume_state is not None else None)
        if args.tensorboard:
            writer = SummaryWriter(os.path.join(run_dir, "tb"))
        where = "resuming " + run_dir + f" at epoch {start_epoch}" if resume_state else "run folder " + run_dir
        out.line(f"{model_name} ({sum(p.numel() for p in raw_model.parameters()):,} params) on {args.dataset} "
                 f"({ds.train_labels.shape[0]} train / {ds.test_labels.shape[0]} test images), {device}"
                 f"{f' x{world}' if world > 1 else ''}, fused={args.fused} backend={fastcnn.get_backend()} "
                 f"amp={amp_name}; {where}")
        out.line(f"recipe: {rec.epochs} epochs, batch {rec.batch_size}, {rec.optimizer} lr {rec.lr:g}, "
                 f"{rec.schedule}, wd {rec.weight_decay:g}, crop {rec.crop_padding} flip {rec.flip} "
                 f"cutout {rec.cutout} ({rec.source})")

    last_epoch = rec.epochs if args.stop_after_epoch is None else min(rec.epochs, args.stop_after_epoch)
    t_run = time.perf_counter()
    result = {}
    for epoch in range(start_epoch, last_epoch + 1):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        train_loader.set_epoch(epoch)
        t0 = time.perf_counter()
        try:
            tr = _train_epoch(model, train_loader, optimizer, sched, scaler, criterion, amp_dtype,
                              args.grad_clip, epoch, rec.epochs, args.log_interval, out, world, micro_batches)
            if world > 1:
                _average_buffers(raw_model, world)
            ev = evaluate(raw_model, test_loader, ds.num_classes, amp_dtype=amp_dtype, distributed=world > 1)
        except torch.OutOfMemoryError:
            raise TrainError(f"out of GPU memory at batch {per_rank_batch} per process"
                               + (f" within the --memory-budget {args.memory_budget}" if budget else "")
                               + "; lower --batch-size" + (" or raise the budget" if budget else "")) from None
        dt = time.perf_counter() - t0
        row = {"epoch": epoch, "lr": sched.get_last_lr()[0], "train_loss": tr["loss"], "train_acc": tr["acc"],
               "test_loss": ev["loss"], "test_acc": ev["acc"], "epoch_time_s": round(dt, 3),
               "images_per_s": round(tr["images"] * world / tr["time"], 1),
               "peak_mem_mb": round(peak_memory_mb(device), 1)}
        is_best = ev["acc"] > best_acc
        if is_best:
            best_acc, best_epoch = ev["acc"], epoch
        rngs = [ckpt.rng_state()]
        if world > 1:
            import torch.distributed as dist

            rngs = [None] * world
            dist.all_gather_object(rngs, ckpt.rng_state())
        if main_proc:
            state = {"epoch": epoch, "model": raw_model.state_dict(), "optimizer": optimizer.state_dict(),
                     "scheduler": sched.state_dict(), "scaler": scaler.state_dict() if scaler else None,
                     "rng": rngs, "best_acc": best_acc, "best_epoch": best_epoch, "config": config,
                     "metrics": row}
            ckpt.save(state, os.path.join(run_dir, "checkpoint_last.pt"))
            if is_best:
                ckpt.save(state, os.path.join(run_dir, "checkpoint_best.pt"))
            metrics.append(row)
            if writer is not None:
                for k, v in row.items():
                    if k != "epoch":
                        writer.add_scalar(k, v, epoch)
            mem = "peak GPU" if device.type == "cuda" else "peak RSS"
            out.line(f"epoch {epoch:>3}/{rec.epochs}  lr {row['lr']:.4g}  train loss {tr['loss']:.4f} "
                     f"acc {tr['acc']:5.2f}%  test loss {ev['loss']:.4f} acc {ev['acc']:5.2f}%"
                     f"{' *' if is_best else '  '}  {row['images_per_s']:,.0f} img/s  {dt:.1f}s  "
                     f"{mem} {row['peak_mem_mb']:,.0f} MB")
        result = {"run_dir": run_dir, "epoch": epoch, "test_acc": ev["acc"], "best_acc": best_acc,
                  "best_epoch": best_epoch, "train_loss": tr["loss"]}
    if main_proc:
        total = time.perf_counter() - t_run
        if writer is not None:
            writer.close()
        if not args.no_plot and metrics.rows:
            msg = plot_curves(metrics.rows, os.path.join(run_dir, "curves.png"), f"{model_name} on {args.dataset}")
            if msg:
                out.line(f"note: {msg}")
        if result:
            stopped = " (stopped early: --stop-after-epoch)" if last_epoch < rec.epochs else ""
            out.line(f"done{stopped}: test accuracy {result['test_acc']:.2f}% at epoch {result['epoch']}, "
                     f"best {best_acc:.2f}% (epoch {best_epoch}), {_fmt_time(total)} this session; {run_dir}")
        else:
            out.line(f"nothing to do: the run is already at epoch {start_epoch - 1} of {rec.epochs}; {run_dir}")
        result["time_s"] = total
    result["model"] = raw_model  # for callers of train() (tests, notebooks); not printed
    return result


def _on_rank0_for_all(fn, main_proc: bool):
    """Run ``fn`` on rank 0 only and hand its result, or its error, to every process, so that a
    failure there (missing data, existing run folder) ends all ranks instead of hanging them."""
    import torch.distributed as dist

    box = [None, None]
    if main_proc:
        try:
            box[0] = fn()
        except Exception as e:  # re-raised below, on every rank, as the same type when known
            box[1] = (type(e).__name__, str(e))
    dist.broadcast_object_list(box, src=0)
    if box[1] is not None:
        from .data import DatasetError

        kinds = {"UsageError": UsageError, "DatasetError": DatasetError}
        raise kinds.get(box[1][0], TrainError)(box[1][1])
    return box[0]


def _tuple_if_list(v):
    return tuple(v) if isinstance(v, list) else v


@torch.no_grad()
def _preflight(model, loader, amp_dtype):
    """One tiny forward in eval mode (changes no state) so a missing fused backend or a wrong
    input size fails now, with its own message, instead of after the first epoch starts."""
    x, _ = next(iter(loader))
    was = model.training
    model.eval()
    try:
        with (torch.autocast(x.device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()):
            model(x[:2])
    finally:
        model.train(was)


def _train_epoch(model, loader, optimizer, sched, scaler, criterion, amp_dtype, grad_clip, epoch, epochs,
                 log_interval, out: Progress, world: int, micro_batches: int = 1) -> dict:
    model.train()
    device = loader.device
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.long, device=device)
    seen = 0
    steps = len(loader)
    t0 = time.perf_counter()
    ctx = (lambda: torch.autocast(device.type, dtype=amp_dtype)) if amp_dtype else contextlib.nullcontext
    for step, (x, y) in enumerate(loader, 1):
        optimizer.zero_grad(set_to_none=True)
        parts = list(zip(x.chunk(micro_batches), y.chunk(micro_batches))) if micro_batches > 1 else [(x, y)]
        for i, (xp, yp) in enumerate(parts):
            # DDP: all-reduce the gradients once, after the last micro-batch
            last = i == len(parts) - 1
            with contextlib.nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync():
                with ctx():
                    logits = model(xp)
                    loss = criterion(logits.float(), yp)
                weighted = loss * (yp.shape[0] / y.shape[0]) if len(parts) > 1 else loss
                (scaler.scale(weighted) if scaler is not None else weighted).backward()
            loss_sum += loss.detach().double() * yp.shape[0]
            correct += (logits.detach().argmax(1) == yp).sum()
        if scaler is not None:
            if grad_clip > 0:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            scaler.step(optimizer)
            scaler.update()
        else:
            if grad_clip > 0:
                nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            optimizer.step()
        sched.step()
        seen += y.shape[0]
        if step % log_interval == 0 or step == steps:
            _check_finite(loss_sum, epoch, step, sched, world)
            elapsed = time.perf_counter() - t0
            out.update(epoch, epochs, step, steps, float(loss_sum) / seen, 100.0 * int(correct) / seen,
                       seen * world / elapsed, elapsed / step * (steps - step))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - t0
    stats = torch.stack([loss_sum, correct.double(), torch.tensor(float(seen), dtype=torch.float64,
                                                                   device=device)])
    if world > 1:
        import torch.distributed as dist

        dist.all_reduce(stats)
    return {"loss": float(stats[0] / stats[2]), "acc": 100.0 * float(stats[1] / stats[2]), "images": seen,
            "time": elapsed}


def _average_buffers(model: nn.Module, world: int) -> None:
    """Average BN running statistics over the processes (DDP keeps parameters equal, but each
    process's last forward updated its own buffers), so every rank evaluates and saves the same model."""
    import torch.distributed as dist

    for b in model.buffers():
        if b.is_floating_point():
            dist.all_reduce(b)
            b.div_(world)


def _check_finite(loss_sum, epoch, step, sched, world):
    bad = (~torch.isfinite(loss_sum)).to(torch.float32)
    if world > 1:
        import torch.distributed as dist

        dist.all_reduce(bad, op=dist.ReduceOp.MAX)  # every process stops together
    if bad.item() > 0:
        raise NonFiniteLossError(
            f"training loss became NaN/inf by epoch {epoch} step {step} (lr {sched.get_last_lr()[0]:.4g}); "
            "stopped without saving this epoch. Try a lower --lr, --warmup-epochs, --grad-clip, or --amp off/bf16; "
            "the last good checkpoint (if any) is checkpoint_last.pt")


def main(argv=None) -> int:
    from .backend import BackendUnavailableError
    from .data import DatasetError

    prog = "fastcnn.train"
    try:
        train(argv)
        return 0
    except UsageError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except (DatasetError, ckpt.CheckpointError, NonFiniteLossError, TrainError, BackendUnavailableError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"\n{prog}: interrupted; the last finished epoch is in checkpoint_last.pt (--resume continues)",
              file=sys.stderr)
        return 130
    finally:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
