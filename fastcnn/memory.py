"""How many bytes of tensors a forward pass leaves saved for backward, measured on any device.

Peak GPU memory needs a GPU; what autograd keeps between forward and backward does not. This
counts the distinct storages the autograd graph holds after a forward (parameters excluded:
they exist anyway), seen through saved-tensor hooks -- including the rebuild hooks of fused
models (:mod:`fastcnn.recompute`), so a tensor kept as a recipe counts nothing. It is what the
"one activation per layer" goal is about, and what the memory tests and benchmarks report.
"""
from __future__ import annotations

import torch
from torch import nn

from . import recompute
from .backend import check_backend


class SavedTensorCounter:
    """Context manager; ``.bytes`` and ``.tensors`` after (or during) the block."""

    def __init__(self, exclude: nn.Module | None = None):
        self._exclude = set()
        if exclude is not None:
            self._exclude = {p.untyped_storage().data_ptr() for p in exclude.parameters()}
            self._exclude |= {b.untyped_storage().data_ptr() for b in exclude.buffers()}
        self._storages: dict[int, int] = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._record, lambda t: t)

    def _record(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in self._exclude and storage.nbytes() > 0:
            self._storages[ptr] = storage.nbytes()
        return t

    @property
    def bytes(self) -> int:
        return sum(self._storages.values())

    @property
    def tensors(self) -> int:
        return len(self._storages)

    def __enter__(self):
        self._hooks.__enter__()
        recompute.set_observer(self._record)
        return self

    def __exit__(self, *exc):
        recompute.set_observer(None)
        return self._hooks.__exit__(*exc)


def saved_bytes(model: nn.Module, *inputs, backward: bool = True) -> int:
    """Bytes of non-parameter tensors that ``model(*inputs)`` keeps for backward. Runs the
    backward too (``backward=True``) so that buffers are freed and the step is complete."""
    with SavedTensorCounter(exclude=model) as counter:
        out = model(*inputs)
    if backward:
        out.float().sum().backward()
    return counter.bytes


def compare_models(names, batch: int = 4, backend: str = "auto"):
    """Yield ``(name, unfused_bytes_per_image, fused_bytes_per_image)`` for zoo models in
    training mode (fp32 inputs at the model's default size)."""
    from .backend import use_backend
    from .registry import create_model, model_info

    for name in names:
        info = model_info(name)
        x = torch.randn(batch, *info.input_size)
        torch.manual_seed(0)
        plain = saved_bytes(create_model(name).train(), x)
        torch.manual_seed(0)
        with use_backend(backend):
            fused = saved_bytes(create_model(name, fused=True).train(), x)
        yield name, plain / batch, fused / batch


def main(argv=None) -> None:
    """``python -m fastcnn.memory [MODEL ...] [--batch N] [--backend B]``: bytes per image
    that a training forward keeps for backward, unfused vs fused."""
    import argparse

    from .registry import list_models, model_info

    parser = argparse.ArgumentParser(prog="python -m fastcnn.memory", description=main.__doc__)
    parser.add_argument("models", nargs="*", help="model names (default: the whole zoo)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--backend", default="auto", help="backend of the fused models")
    args = parser.parse_args(argv)
    if args.batch < 2:
        parser.exit(2, "error: --batch must be at least 2 (training-mode BatchNorm needs it)\n")
    names = args.models or list_models()
    try:
        for name in names:
            model_info(name)
        check_backend(args.backend)
    except ValueError as e:  # unknown model or backend, before any work
        parser.exit(2, f"error: {e}\n")
    print("| model | saved / image, unfused | saved / image, fused | fused / unfused |")
    print("|---|---:|---:|---:|")
    for name, plain, fused in compare_models(names, args.batch, args.backend):
        print(f"| `{name}` | {plain / 2**20:,.2f} MiB | {fused / 2**20:,.2f} MiB | {fused / plain:.2f} |",
              flush=True)


if __name__ == "__main__":
    main()
