"""Training checkpoints: written atomically, read safely, restored exactly.

* :func:`save` writes to a temporary file in the destination folder, flushes it to disk and
  renames it over the target (``os.replace``), so a crash leaves either the old or the new
  file, never half of one.
* :func:`load` first checks every record's CRC-32 (``torch.load`` itself does not, so a flipped
  bit in the weights would load silently), then uses ``torch.load(weights_only=True)`` (no
  arbitrary code from a checkpoint), and turns any damage (truncation, flipped bits, garbage,
  a wrong file) into :class:`CheckpointError`.
* :func:`rng_state` / :func:`set_rng_state` capture and restore the Python, NumPy, torch CPU
  and CUDA generators in forms that ``weights_only`` loading accepts (tensors, ints, lists).
"""
from __future__ import annotations

import os
import pickle
import random
import tempfile
import zipfile

import numpy as np
import torch

FORMAT = "fastcnn-checkpoint"
VERSION = 1
REQUIRED = ("format", "version", "epoch", "model", "config")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt, truncated or not a fastcnn checkpoint."""


def save(state: dict, path: str) -> None:
    """Write ``state`` (a dict of tensors / plain values) to ``path`` atomically."""
    state = {"format": FORMAT, "version": VERSION, **state}
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def load(path: str, map_location="cpu") -> dict:
    """Read a checkpoint written by :func:`save`; raise :class:`CheckpointError` if it is unusable."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path} does not exist")
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes): the write was interrupted")
    try:
        with zipfile.ZipFile(path) as z:  # torch's format is a zip with a CRC-32 per record:
            bad = z.testzip()  # catches flipped bits that torch.load would read silently
        if bad is not None:
            raise CheckpointError(f"checkpoint {path} is corrupt: record {bad} fails its CRC check")
    except zipfile.BadZipFile as e:
        raise CheckpointError(f"checkpoint {path} is corrupt or truncated (not a complete zip archive: {e})") from None
    except (OSError, EOFError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path} is corrupt or truncated ({type(e).__name__}: {e})") from None
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError, zipfile.BadZipFile, ValueError,
            KeyError, OSError, UnicodeDecodeError, AttributeError, IndexError) as e:
        lines = [l.strip() for l in str(e).strip().splitlines() if l.strip()] or [type(e).__name__]
        first = next((l for l in lines if "global" in l.lower() and "unsupported" in l.lower()), lines[0])
        raise CheckpointError(f"checkpoint {path} is corrupt or truncated, or not a fastcnn checkpoint "
                              f"({type(e).__name__}: {first[:200]})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a fastcnn checkpoint (no '{FORMAT}' marker)")
    missing = [k for k in REQUIRED if k not in state]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {', '.join(missing)} (corrupt or from another tool)")
    if state["version"] > VERSION:
        raise CheckpointError(f"checkpoint {path} has format version {state['version']}; this fastcnn "
                              f"reads up to {VERSION}: upgrade fastcnn")
    return state


def rng_state() -> dict:
    """All random generators a training step touches, in ``weights_only``-loadable form."""
    np_state = np.random.get_state()
    state = {
        "python": _to_lists(random.getstate()),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]),
                  int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(_to_tuples(state["python"]))
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), int(n[2]), int(n[3]), float(n[4])))
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        cuda = [s.cpu() for s in state["cuda"]]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)


def _to_lists(x):
    return [_to_lists(v) for v in x] if isinstance(x, (tuple, list)) else x


def _to_tuples(x):
    return tuple(_to_tuples(v) for v in x) if isinstance(x, (tuple, list)) else x
