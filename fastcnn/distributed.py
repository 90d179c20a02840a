"""Multi-process training set-up (``torchrun``): the process group, rank-0 helpers and the
collectives the training loop uses. With one process (no ``WORLD_SIZE`` > 1) nothing here
touches ``torch.distributed``.

NCCL on GPUs, gloo on CPU. Each process drives one device (``cuda:LOCAL_RANK``).
"""
from __future__ import annotations

import os

import torch
from torch import nn

from .cli import UsageError, resolve_device


def world_size() -> int:
    """Processes in this run, from torchrun's environment (1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed(device_arg):
    """(rank, world_size, local_rank, device); starts the process group under torchrun."""
    world = world_size()
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


def shutdown() -> None:
    """End the process group if this is a multi-process run that started one."""
    if world_size() > 1:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def on_rank0_for_all(fn, main_proc: bool, errors: dict[str, type], fallback: type = RuntimeError):
    """Run ``fn`` on rank 0 only and hand its result, or its error, to every process, so that a
    failure there (missing data, existing run folder) ends all ranks instead of hanging them.
    The error is re-raised on every rank as ``errors[its type's name]``, else ``fallback``."""
    import torch.distributed as dist

    box = [None, None]
    if main_proc:
        try:
            box[0] = fn()
        except Exception as e:  # re-raised below, on every rank, as the same type when known
            box[1] = (type(e).__name__, str(e))
    dist.broadcast_object_list(box, src=0)
    if box[1] is not None:
        raise errors.get(box[1][0], fallback)(box[1][1])
    return box[0]


def average_buffers(model: nn.Module, world: int) -> None:
    """Average BN running statistics over the processes (DDP keeps parameters equal, but each
    process's last forward updated its own buffers), so every rank evaluates and saves the same model."""
    import torch.distributed as dist

    for b in model.buffers():
        if b.is_floating_point():
            dist.all_reduce(b)
            b.div_(world)


def all_reduce_sum(t: torch.Tensor, world: int) -> torch.Tensor:
    """``t`` summed over the processes, in place (nothing to do with one process)."""
    if world > 1:
        import torch.distributed as dist

        dist.all_reduce(t)
    return t


def all_reduce_max(t: torch.Tensor, world: int) -> torch.Tensor:
    """``t`` maxed over the processes, in place (so that every process stops together)."""
    if world > 1:
        import torch.distributed as dist

        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def gather_objects(obj, world: int) -> list:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank (``[obj]`` with one process)."""
    if world <= 1:
        return [obj]
    import torch.distributed as dist

    out = [None] * world
    dist.all_gather_object(out, obj)
    return out
