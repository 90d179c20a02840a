"""Run folders and what a training run writes and prints.

A run folder (``runs/MODEL-DATASET`` by default, never overwritten unless ``--overwrite``)
holds ``config.json``, ``metrics.jsonl`` (or ``.csv``) with one row per epoch,
``checkpoint_last.pt`` and ``checkpoint_best.pt`` (atomic writes), ``curves.png`` at the end,
and ``tb/`` with ``--tensorboard``. :class:`RunLog` writes them (rank 0 only) and
:class:`Progress` prints the progress bar and the per-epoch lines.
"""
from __future__ import annotations

import csv
import json
import os
import shutil
import sys

import torch

from . import checkpoint as ckpt
from .cli import UsageError

RUN_FILES = ("config.json", "metrics.jsonl", "metrics.csv", "checkpoint_last.pt", "checkpoint_best.pt",
             "curves.png")


# --------------------------------------------------------------------------- run folder

def _has_run(folder: str) -> bool:
    return os.path.isdir(folder) and any(os.path.exists(os.path.join(folder, f)) for f in RUN_FILES)


def default_run_dir(args, model_name: str) -> str:
    return os.path.join(args.out_dir, args.name or f"{model_name}-{args.dataset.lower()}")


def new_run_dir(args, model_name: str) -> str:
    """A folder for a fresh run; never one that holds another run unless --overwrite."""
    base = default_run_dir(args, model_name)
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
        target = default_run_dir(args, model_name)
    if os.path.isdir(target):
        target = os.path.join(target, "checkpoint_last.pt")
    if not os.path.isfile(target):
        raise UsageError(f"--resume: no checkpoint at {target} (give the run folder or a checkpoint file)")
    return target


# --------------------------------------------------------------------------- progress

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


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux: process peak RSS


# --------------------------------------------------------------------------- metrics and curves

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


# --------------------------------------------------------------------------- what a run writes

class RunLog:
    """Everything a run writes into its folder, on rank 0 only (on other ranks every method
    does nothing): ``config.json`` and a fresh (or, on resume, truncated) metrics file when
    opened, then per epoch the checkpoints, a metrics row and TensorBoard scalars, and
    ``curves.png`` at the end."""

    def __init__(self, run_dir: str, main_proc: bool, out: Progress, *, config: dict, metrics_format: str,
                 resumed_epoch: int | None, summary_writer=None):
        self.run_dir, self.main_proc, self.out = run_dir, main_proc, out
        self.metrics, self.writer = None, None
        if not main_proc:
            return
        os.makedirs(run_dir, exist_ok=True)
        with open(os.path.join(run_dir, "config.json"), "w") as f:
            json.dump(config, f, indent=1)
        self.metrics = MetricsFile(run_dir, metrics_format, keep_until_epoch=resumed_epoch)
        if summary_writer is not None:
            self.writer = summary_writer(os.path.join(run_dir, "tb"))

    @property
    def rows(self) -> list[dict]:
        return self.metrics.rows if self.metrics is not None else []

    def line(self, text: str) -> None:
        self.out.line(text)

    def epoch(self, row: dict, state: dict, is_best: bool) -> None:
        """Checkpoints (last, and best when it is), the metrics row, TensorBoard scalars."""
        if not self.main_proc:
            return
        ckpt.save(state, os.path.join(self.run_dir, "checkpoint_last.pt"))
        if is_best:
            ckpt.save(state, os.path.join(self.run_dir, "checkpoint_best.pt"))
        self.metrics.append(row)
        if self.writer is not None:
            for k, v in row.items():
                if k != "epoch":
                    self.writer.add_scalar(k, v, row["epoch"])

    def close(self, plot: bool, title: str) -> None:
        """Close TensorBoard and draw ``curves.png`` (a note instead when matplotlib is missing)."""
        if not self.main_proc:
            return
        if self.writer is not None:
            self.writer.close()
        if plot and self.rows:
            msg = plot_curves(self.rows, os.path.join(self.run_dir, "curves.png"), title)
            if msg:
                self.out.line(f"note: {msg}")
