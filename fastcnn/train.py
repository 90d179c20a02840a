"""``python -m fastcnn.train MODEL [options]``: train a model of the zoo with its seed recipe.

    python -m fastcnn.train resnet20 --fused                      # the seed's recipe, CIFAR-10
    python -m fastcnn.train lenet5 --subset 5000 --epochs 10       # a quick run
    python -m fastcnn.train simplenet --print-recipe               # show the recipe, then exit
    python -m fastcnn.train resnet20 --resume                      # continue runs/resnet20-cifar10
    python -m fastcnn.train resnet20 --fused --cuda-graphs         # replay the step as a CUDA graph
    torchrun --nproc_per_node=2 -m fastcnn.train resnet20 --sync-bn

Each run gets a folder (``runs/MODEL-DATASET`` by default, never overwritten unless
``--overwrite``): ``config.json``, ``metrics.jsonl`` (or ``.csv``) with one row per epoch,
``checkpoint_last.pt`` and ``checkpoint_best.pt`` (atomic writes), ``curves.png`` at the end.
Bad arguments end with one ``error:`` line and a non-zero exit status.

:func:`train` reads top to bottom: build (device, data, model, optimizer, run folder), loop
(train an epoch, evaluate, save), finish. Its parts live beside it: the command line in
:mod:`fastcnn.cli`, run folders, metrics and progress in :mod:`fastcnn.runs`, processes in
:mod:`fastcnn.distributed`, the step itself (plain or a CUDA graph) in :mod:`fastcnn.train_step`.
"""
from __future__ import annotations

import contextlib
import inspect
import json
import os
import sys
import time
from dataclasses import dataclass

import torch
from torch import nn

from . import checkpoint as ckpt
from . import cpu_memory, memory, memory_plan, recompute
from . import BackendUnavailableError
# the command line; re-exported here for the callers that have always imported them from fastcnn.train
from .cli import (FROZEN_ON_RESUME, OPTIMIZERS, OneLineParser, UsageError, _amp_dtype,  # noqa: F401
                  _check_recipe, _native_bf16, _tuple_if_list, build_parser, keep_resumed_settings,
                  parse_size, parse_train_args, resolve_device, resolve_recipe)
from .data import DatasetError, GpuLoader, channel_stats, load_dataset
from .distributed import (all_reduce_max, all_reduce_sum, average_buffers, gather_objects,  # noqa: F401
                          init_distributed, on_rank0_for_all, shutdown)
from .evaluate import evaluate
from .recipes import Recipe, format_recipe
from .runs import (RUN_FILES, MetricsFile, Progress, RunLog, _fmt_time, _has_run, new_run_dir,  # noqa: F401
                   peak_memory_mb, plot_curves, resume_path)
from .schedules import LRScheduler, ScheduleConfig
from .train_step import (CaptureError, CUDAGraphStep, TrainStep, check_cuda_graphs, graph_optimizer_kwargs,
                         load_optimizer_state)


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite."""


class TrainError(RuntimeError):
    """Training cannot go on (e.g. out of memory within the budget); the message says why."""


#: errors that rank 0 hands to every process (distributed.on_rank0_for_all), by type name
_SHARED_ERRORS = {"UsageError": UsageError, "DatasetError": DatasetError}


# --------------------------------------------------------------------------- the run

def train(argv=None) -> dict:
    """Run training from command-line ``argv``; returns the final summary dict (rank 0)."""
    args, info = parse_train_args(argv)
    model_name = info.name
    rec, resume_state = _recipe(args, model_name)
    if args.print_recipe:
        print(format_recipe(model_name, rec, args.dataset))
        return {}

    # build: device, data, model, optimizer, run folder
    env = _environment(args, rec)
    data = _dataset(args, env, info)
    raw_model, model_kwargs = _model(args, rec, env, info, data)
    train_loader, test_loader = _loaders(args, rec, env, data)
    _preflight(raw_model, test_loader, env.amp_dtype)
    micro_batches = _plan_memory(args, rec, env, data, raw_model, train_loader.batch_size)
    model, optimizer, sched, step = _optimization(args, rec, env, raw_model, len(train_loader), micro_batches)
    start_epoch, best_acc, best_epoch, run_dir = _start(args, model_name, env, raw_model, optimizer, sched,
                                                       step.scaler, resume_state)
    config = _config(args, model_name, model_kwargs, rec, env, data)
    log = RunLog(run_dir, env.main_proc, env.out, config=config, metrics_format=args.metrics_format,
                 resumed_epoch=start_epoch - 1 if resume_state is not None else None,
                 summary_writer=env.summary_writer)
    _announce(log, args, rec, env, data, raw_model, model_name, run_dir, start_epoch, resume_state is not None)

    # loop: train an epoch, evaluate, save
    last_epoch = rec.epochs if args.stop_after_epoch is None else min(rec.epochs, args.stop_after_epoch)
    t_run = time.perf_counter()
    result = {}
    for epoch in range(start_epoch, last_epoch + 1):
        tr, ev, dt = _epoch(args, rec, env, model, raw_model, step, sched, train_loader, test_loader, data, epoch)
        row = {"epoch": epoch, "lr": sched.get_last_lr()[0], "train_loss": tr["loss"], "train_acc": tr["acc"],
               "test_loss": ev["loss"], "test_acc": ev["acc"], "epoch_time_s": round(dt, 3),
               "images_per_s": round(tr["images"] * env.world / tr["time"], 1),
               "peak_mem_mb": round(peak_memory_mb(env.device), 1)}
        is_best = ev["acc"] > best_acc
        if is_best:
            best_acc, best_epoch = ev["acc"], epoch
        rngs = gather_objects(ckpt.rng_state(), env.world)
        if env.main_proc:
            state = {"epoch": epoch, "model": raw_model.state_dict(), "optimizer": optimizer.state_dict(),
                     "scheduler": sched.state_dict(), "scaler": step.scaler.state_dict() if step.scaler else None,
                     "rng": rngs, "best_acc": best_acc, "best_epoch": best_epoch, "config": config,
                     "metrics": row}
            log.epoch(row, state, is_best)
            log.line(_epoch_line(row, tr, ev, rec, env, is_best, dt))
        result = {"run_dir": run_dir, "epoch": epoch, "test_acc": ev["acc"], "best_acc": best_acc,
                  "best_epoch": best_epoch, "train_loss": tr["loss"]}

    # finish: curves and the summary line
    if env.main_proc:
        total = time.perf_counter() - t_run
        log.close(plot=not args.no_plot, title=f"{model_name} on {args.dataset}")
        if result:
            stopped = " (stopped early: --stop-after-epoch)" if last_epoch < rec.epochs else ""
            log.line(f"done{stopped}: test accuracy {result['test_acc']:.2f}% at epoch {result['epoch']}, "
                     f"best {best_acc:.2f}% (epoch {best_epoch}), {_fmt_time(total)} this session; {run_dir}")
        else:
            log.line(f"nothing to do: the run is already at epoch {start_epoch - 1} of {rec.epochs}; {run_dir}")
        result["time_s"] = total
    result["model"] = raw_model  # for callers of train() (tests, notebooks); not printed
    return result


# --------------------------------------------------------------------------- build

@dataclass
class Env:
    """Where and how the run computes."""

    rank: int
    world: int
    device: torch.device
    amp_name: str
    amp_dtype: torch.dtype | None
    budget: int | None
    channels_last: bool
    out: Progress
    summary_writer: type | None = None
    #: a fused model keeps its activations for backward (else rebuilds them: fastcnn.recompute)
    keep_activations: bool = False
    #: ``--keep-activations``/``--rebuild-activations`` given (else the device's default, which
    #: a ``--memory-budget`` plan may change)
    activations_given: bool = False

    @property
    def main_proc(self) -> bool:
        return self.rank == 0


@dataclass
class Data:
    ds: object  # fastcnn.data.Dataset
    train_images: torch.Tensor
    mean: list
    std: list
    input_size: tuple


def _recipe(args, model_name: str) -> tuple[Recipe, dict | None]:
    """The recipe and, with ``--resume``, the checkpoint to continue (whose settings win)."""
    if not args.resume:
        return resolve_recipe(args, model_name), None
    state = ckpt.load(resume_path(args, model_name))
    saved = state["config"]
    if saved["model"] != model_name:
        raise UsageError(f"--resume: the checkpoint is of {saved['model']}, not {model_name}")
    return keep_resumed_settings(args, saved), state


def _environment(args, rec: Recipe) -> Env:
    """Backend, processes and device, AMP, and every check that needs them (before anything is
    written); then threads, determinism and the CUDA memory cap."""
    import fastcnn

    if args.backend is not None:
        try:
            fastcnn.set_backend(args.backend)
        except ValueError as e:
            raise UsageError(f"--backend: {e}") from None
    rank, world, _, device = init_distributed(args.device)
    amp_name, amp_dtype = _amp_dtype(args.amp, device)
    budget = parse_size(args.memory_budget) if args.memory_budget else None
    for given, flag in ((args.keep_activations, "--keep-activations"),
                        (args.rebuild_activations, "--rebuild-activations")):
        if given and not args.fused:
            raise UsageError(f"{flag} is an option of --fused (unfused models always keep their activations)")
    if args.sync_bn and args.fused:
        raise UsageError("--sync-bn with --fused: the fused kernels compute per-process batch statistics; "
                         "drop one of the two")
    if args.sync_bn and device.type != "cuda":
        raise UsageError("--sync-bn needs CUDA devices (PyTorch's SyncBatchNorm runs on GPUs only)")
    if rec.batch_size % world:
        raise UsageError(f"--batch-size {rec.batch_size} is not divisible by the {world} processes")
    if args.cuda_graphs:
        check_cuda_graphs(device, amp_name, world, amp_arg=args.amp, compile=args.compile,
                          memory_budget=args.memory_budget)
    summary_writer = None
    if args.tensorboard:
        try:
            from torch.utils.tensorboard import SummaryWriter as summary_writer
        except ImportError:
            raise UsageError("--tensorboard needs the tensorboard package: pip install tensorboard") from None
    activations_given = args.keep_activations or args.rebuild_activations
    env = Env(rank, world, device, amp_name, amp_dtype, budget,
              channels_last=device.type == "cuda" if args.channels_last is None else args.channels_last,
              out=Progress(rank == 0), summary_writer=summary_writer,
              keep_activations=args.keep_activations if activations_given else keeps_activations_by_default(device),
              activations_given=activations_given)

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
    if device.type == "cpu" and args.keep_cpu_memory:
        cpu_memory.retain_freed_memory()
    if args.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    return env


def keeps_activations_by_default(device: torch.device) -> bool:
    """Whether ``--fused`` keeps each layer's activation for backward unless told otherwise.

    The rebuilds (fastcnn.recompute) trade one elementwise pass per layer in backward for one
    activation per layer less: the trade small GPUs need (every CIFAR model at batch 128 in
    under 3 GB), so CUDA rebuilds. A CPU has the memory and lacks the bandwidth: the pass
    costs a fused resnet20 step 3-5% and densenet_bc_100_12 (whose concatenated inputs are
    rebuilt as well) about 17-22% (bench/RESULTS.md, Intel Xeon), so the CPU keeps them."""
    return device.type != "cuda"


def _plan_chooses_activations(env: Env) -> bool:
    """Whether a ``--memory-budget`` plan decides if a fused run keeps its activations: neither
    option given, on a device that keeps them by default (the rebuilds are then its first remedy)."""
    return env.budget is not None and not env.activations_given and keeps_activations_by_default(env.device)


def _dataset(args, env: Env, info) -> Data:
    """The dataset (rank 0 downloads if needed, the others wait and read) and its statistics."""
    if env.world > 1:
        on_rank0_for_all(lambda: load_dataset(args.dataset, args.data_dir, download=not args.no_download)
                         and None, env.main_proc, _SHARED_ERRORS, TrainError)
    ds = load_dataset(args.dataset, args.data_dir, download=not args.no_download and env.world == 1,
                      subset=args.subset, seed=args.seed)
    train_x = torch.from_numpy(ds.train_images)
    mean, std = channel_stats(train_x)
    return Data(ds, train_x, mean, std, input_size=(ds.in_chans,) + tuple(info.input_size[1:]))


def build_model(model_name: str, info, ds, rec: Recipe, fused: bool):
    import fastcnn

    kwargs = {}
    accepted = inspect.signature(info.fn).parameters
    if rec.drop_rate is not None:
        if "drop_rate" in accepted:
            kwargs["drop_rate"] = rec.drop_rate
        elif rec.drop_rate > 0:
            print(f"note: {model_name} takes no drop_rate; the recipe's dropout {rec.drop_rate} is not applied",
                  file=sys.stderr)
    model = fastcnn.create_model(model_name, num_classes=ds.num_classes, in_chans=ds.in_chans,
                                 fused=fused, **kwargs)
    return model, kwargs


def _model(args, rec: Recipe, env: Env, info, data: Data):
    """The model (seeded with ``--seed``) on the device, in its memory format."""
    torch.manual_seed(args.seed)
    model, model_kwargs = build_model(info.name, info, data.ds, rec, args.fused)
    if env.keep_activations:
        recompute.disable(model)
    model = model.to(env.device)
    if env.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if args.sync_bn and env.world > 1:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model, model_kwargs


def _loaders(args, rec: Recipe, env: Env, data: Data):
    """The on-device training loader (augmented, this rank's shard, last partial batch dropped)
    and the test loader."""
    per_rank_batch = rec.batch_size // env.world
    size = data.input_size[1:]
    try:
        train_loader = GpuLoader(data.train_images, data.ds.train_labels, per_rank_batch, train=True,
                                 device=env.device, mean=data.mean, std=data.std, crop_padding=rec.crop_padding,
                                 flip=rec.flip, cutout=rec.cutout, seed=args.seed, rank=env.rank,
                                 world_size=env.world, out_size=size, channels_last=env.channels_last)
        test_loader = GpuLoader(data.ds.test_images, data.ds.test_labels, max(per_rank_batch, 256), train=False,
                                device=env.device, mean=data.mean, std=data.std, rank=env.rank,
                                world_size=env.world, out_size=size, channels_last=env.channels_last)
    except torch.OutOfMemoryError:
        mb = (data.ds.train_images.nbytes + data.ds.test_images.nbytes) / 2 ** 20
        raise TrainError(f"the {args.dataset} images ({mb:,.0f} MB as uint8) do not fit in GPU memory"
                         + (f" within --memory-budget {args.memory_budget}" if env.budget else "")) from None
    if len(train_loader) == 0:
        raise UsageError(f"the training set ({train_loader.num_samples} images per process) is smaller than "
                         f"one batch of {per_rank_batch}; lower --batch-size or raise --subset")
    return train_loader, test_loader


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


def _plan_memory(args, rec: Recipe, env: Env, data: Data, raw_model, batch: int) -> int:
    """With ``--memory-budget``: plan before the first step (activation rebuilds where the
    fused model keeps its activations by default, block recomputation, then micro-batches);
    returns the number of micro-batches per step."""
    if env.budget is None:
        return 1
    margin = min(memory.MARGIN, env.budget // 6) if env.device.type == "cuda" else 0
    rebuild_remedy = args.fused and _plan_chooses_activations(env)
    try:
        mplan = memory_plan.plan(raw_model, lambda m: build_optimizer(m, rec, args.no_decay_bn_bias),
                                 batch, env.budget, data.input_size, data.ds.num_classes, env.device,
                                 env.amp_dtype, margin, env.channels_last,
                                 rebuild_remedy=rebuild_remedy)
    except memory_plan.BudgetError as e:
        raise UsageError(f"--memory-budget {args.memory_budget}: {e}") from None
    if mplan.rebuild_activations:
        recompute.enable(raw_model)
        env.keep_activations = False
    if mplan.recompute:
        memory_plan.enable_recomputation(raw_model)
    env.out.line(mplan.describe() + ("" if env.device.type == "cuda" else
                                     f" (planned on {env.device.type}; the cap itself is enforced on CUDA only)"))
    return mplan.micro_batches


def param_groups(model: nn.Module, weight_decay: float, no_decay_bn_bias: bool):
    if not no_decay_bn_bias or weight_decay == 0:
        return [{"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": weight_decay}]
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)  # BN weight/bias and all biases are 1-D
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


#: On CUDA, optimizers whose fused kernel does the step without temporaries: the default
#: (foreach) implementation of SGD with weight decay adds ``weight_decay * param`` into a new
#: copy of every gradient -- one more copy of the parameters at the step (+149 MiB for VGG-19,
#: where the step then becomes the peak) -- and takes several launches per tensor list.
FUSED_ON_CUDA = {"sgd": {"fused": True}, "adam": {"fused": True}, "adamw": {"fused": True}}


def build_optimizer(model, rec: Recipe, no_decay_bn_bias: bool, cuda_graphs: bool = False):
    """The recipe's optimizer; ``cuda_graphs``: an implementation whose step can be captured
    with the LR as a device tensor (same maths; see fastcnn.train_step); otherwise on CUDA the
    fused implementation where there is one (:data:`FUSED_ON_CUDA`, same maths)."""
    groups = param_groups(model, rec.weight_decay, no_decay_bn_bias)
    on_cuda = all(p.is_cuda for g in groups for p in g["params"]) and any(g["params"] for g in groups)
    if cuda_graphs:
        extra = graph_optimizer_kwargs(rec.optimizer)
    else:
        extra = dict(FUSED_ON_CUDA.get(rec.optimizer, {})) if on_cuda else {}
    if rec.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=rec.lr, momentum=rec.momentum,
                               nesterov=rec.nesterov and rec.momentum > 0, **extra)
    if rec.optimizer == "adam":
        return torch.optim.Adam(groups, lr=rec.lr, **extra)
    if rec.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=rec.lr, **extra)
    return torch.optim.Adadelta(groups, lr=rec.lr, rho=0.9, eps=1e-3, **extra)  # SimpleNet's settings


def _optimization(args, rec: Recipe, env: Env, raw_model, steps_per_epoch: int, micro_batches: int):
    """``(model, optimizer, scheduler, step)``: the model as trained (DDP, compiled), the
    optimizer and LR schedule, and the training step (plain, or a CUDA graph)."""
    model = raw_model
    if env.world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(model, device_ids=[env.device.index] if env.device.type == "cuda" else None)
    if args.compile:
        model = torch.compile(model)
    optimizer = build_optimizer(raw_model, rec, args.no_decay_bn_bias, cuda_graphs=args.cuda_graphs)
    sched = LRScheduler(optimizer, ScheduleConfig(
        rec.schedule, rec.epochs, rec.milestones, rec.gamma, args.min_lr_ratio, rec.warmup_epochs),
        steps_per_epoch)
    criterion = nn.CrossEntropyLoss(label_smoothing=rec.label_smoothing)
    if args.cuda_graphs:
        step = CUDAGraphStep(model, optimizer, criterion, device=env.device, amp_dtype=env.amp_dtype,
                             grad_clip=args.grad_clip)
    else:
        scaler = torch.amp.GradScaler(env.device.type) if env.amp_name == "fp16" else None
        step = TrainStep(model, optimizer, criterion, device=env.device, amp_dtype=env.amp_dtype, scaler=scaler,
                         grad_clip=args.grad_clip, micro_batches=micro_batches)
    return model, optimizer, sched, step


def _start(args, model_name: str, env: Env, raw_model, optimizer, sched, scaler, resume_state):
    """``(start_epoch, best_acc, best_epoch, run_dir)``: the checkpoint's state restored on
    ``--resume``, else a new run folder."""
    if resume_state is None:
        run_dir = (on_rank0_for_all(lambda: new_run_dir(args, model_name), env.main_proc, _SHARED_ERRORS,
                                    TrainError) if env.world > 1 else new_run_dir(args, model_name))
        return 1, -1.0, 0, run_dir
    raw_model.load_state_dict(resume_state["model"])
    load_optimizer_state(optimizer, resume_state["optimizer"])
    try:
        sched.load_state_dict(resume_state["scheduler"])
    except ValueError as e:
        raise UsageError(f"--resume: {e}") from None
    if scaler is not None and resume_state.get("scaler"):
        scaler.load_state_dict(resume_state["scaler"])
    rngs = resume_state["rng"]
    ckpt.set_rng_state(rngs[env.rank] if env.rank < len(rngs) else rngs[0])
    run_dir = os.path.dirname(os.path.abspath(resume_path(args, model_name)))
    return int(resume_state["epoch"]) + 1, float(resume_state["best_acc"]), int(resume_state["best_epoch"]), run_dir


def _config(args, model_name: str, model_kwargs: dict, rec: Recipe, env: Env, data: Data) -> dict:
    """What ``config.json`` and every checkpoint record about the run (plain types only:
    loadable with ``weights_only=True``)."""
    import fastcnn

    ds = data.ds
    config = {"model": model_name, "model_kwargs": model_kwargs, "num_classes": ds.num_classes,
              "in_chans": ds.in_chans, "input_size": list(data.input_size), "dataset": args.dataset,
              "data_dir": ds.root, "classes": list(ds.classes), "mean": data.mean, "std": data.std,
              "fused": bool(args.fused), "keep_activations": bool(args.fused and env.keep_activations),
              "backend": fastcnn.get_backend(), "amp": env.amp_name,
              "world_size": env.world, "device": str(env.device), "recipe": rec.as_dict(),
              "args": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()},
              "train_images": int(ds.train_labels.shape[0]), "fastcnn": fastcnn.__version__,
              "torch": str(torch.__version__)}
    return json.loads(json.dumps(config))


def _activations_note(env: Env) -> str:
    how = "kept" if env.keep_activations else "rebuilt"
    why = ("" if env.activations_given else " (the memory plan's choice)" if _plan_chooses_activations(env)
           else f" (the {env.device.type} default)")
    return f" activations {how}{why}"


def _announce(log: RunLog, args, rec: Recipe, env: Env, data: Data, raw_model, model_name: str, run_dir: str,
              start_epoch: int, resumed: bool) -> None:
    import fastcnn

    ds = data.ds
    where = "resuming " + run_dir + f" at epoch {start_epoch}" if resumed else "run folder " + run_dir
    log.line(f"{model_name} ({sum(p.numel() for p in raw_model.parameters()):,} params) on {args.dataset} "
             f"({ds.train_labels.shape[0]} train / {ds.test_labels.shape[0]} test images), {env.device}"
             f"{f' x{env.world}' if env.world > 1 else ''}, fused={args.fused} backend={fastcnn.get_backend()} "
             f"amp={env.amp_name}{' cuda-graphs' if args.cuda_graphs else ''}"
             f"{_activations_note(env) if args.fused else ''}; {where}")
    if env.device.type == "cpu":
        log.line(cpu_memory.status())
    log.line(f"recipe: {rec.epochs} epochs, batch {rec.batch_size}, {rec.optimizer} lr {rec.lr:g}, "
             f"{rec.schedule}, wd {rec.weight_decay:g}, crop {rec.crop_padding} flip {rec.flip} "
             f"cutout {rec.cutout} ({rec.source})")


# --------------------------------------------------------------------------- loop

def _epoch(args, rec: Recipe, env: Env, model, raw_model, step, sched, train_loader, test_loader, data: Data,
           epoch: int):
    """Train one epoch, average BN statistics over the processes, evaluate: ``(train, eval, seconds)``."""
    if env.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(env.device)
    train_loader.set_epoch(epoch)
    t0 = time.perf_counter()
    try:
        tr = _train_epoch(model, step, train_loader, sched, epoch, rec.epochs, args.log_interval, env.out, env.world)
        if env.world > 1:
            average_buffers(raw_model, env.world)
        ev = evaluate(raw_model, test_loader, data.ds.num_classes, amp_dtype=env.amp_dtype, distributed=env.world > 1)
    except torch.OutOfMemoryError:
        raise TrainError(f"out of GPU memory at batch {train_loader.batch_size} per process"
                         + (f" within the --memory-budget {args.memory_budget}" if env.budget else "")
                         + "; lower --batch-size" + (" or raise the budget" if env.budget else "")) from None
    return tr, ev, time.perf_counter() - t0


def _train_epoch(model, step, loader, sched, epoch, epochs, log_interval, out: Progress, world: int) -> dict:
    """Every batch of the epoch through ``step``, the LR schedule after each; the device-side
    sums are read (a host sync) only every ``log_interval`` steps, for the NaN check and the
    progress bar, and at the end."""
    model.train()
    step.reset()
    device = loader.device
    seen = 0
    steps = len(loader)
    t0 = time.perf_counter()
    for i, (x, y) in enumerate(loader, 1):
        step(x, y)
        sched.step()
        seen += y.shape[0]
        if i % log_interval == 0 or i == steps:
            _check_finite(step.loss_sum, epoch, i, sched, world)
            elapsed = time.perf_counter() - t0
            out.update(epoch, epochs, i, steps, float(step.loss_sum) / seen, 100.0 * int(step.correct) / seen,
                       seen * world / elapsed, elapsed / i * (steps - i))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - t0
    stats = torch.stack([step.loss_sum, step.correct.double(),
                         torch.tensor(float(seen), dtype=torch.float64, device=device)])
    all_reduce_sum(stats, world)
    return {"loss": float(stats[0] / stats[2]), "acc": 100.0 * float(stats[1] / stats[2]), "images": seen,
            "time": elapsed}


def _check_finite(loss_sum, epoch, step, sched, world):
    bad = all_reduce_max((~torch.isfinite(loss_sum)).to(torch.float32), world)  # every process stops together
    if bad.item() > 0:
        raise NonFiniteLossError(
            f"training loss became NaN/inf by epoch {epoch} step {step} (lr {sched.get_last_lr()[0]:.4g}); "
            "stopped without saving this epoch. Try a lower --lr, --warmup-epochs, --grad-clip, or --amp off/bf16; "
            "the last good checkpoint (if any) is checkpoint_last.pt")


def _epoch_line(row: dict, tr: dict, ev: dict, rec: Recipe, env: Env, is_best: bool, dt: float) -> str:
    mem = "peak GPU" if env.device.type == "cuda" else "peak RSS"
    return (f"epoch {row['epoch']:>3}/{rec.epochs}  lr {row['lr']:.4g}  train loss {tr['loss']:.4f} "
            f"acc {tr['acc']:5.2f}%  test loss {ev['loss']:.4f} acc {ev['acc']:5.2f}%"
            f"{' *' if is_best else '  '}  {row['images_per_s']:,.0f} img/s  {dt:.1f}s  "
            f"{mem} {row['peak_mem_mb']:,.0f} MB")


# --------------------------------------------------------------------------- command line

def main(argv=None) -> int:
    prog = "fastcnn.train"
    try:
        train(argv)
        return 0
    except UsageError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except (DatasetError, ckpt.CheckpointError, NonFiniteLossError, TrainError, BackendUnavailableError,
            CaptureError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"\n{prog}: interrupted; the last finished epoch is in checkpoint_last.pt (--resume continues)",
              file=sys.stderr)
        return 130
    finally:
        shutdown()


if __name__ == "__main__":
    sys.exit(main())
