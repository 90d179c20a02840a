"""Checkpoints: atomic writes, exact RNG restore, and every kind of damage reported as a
CheckpointError (empty, truncated, flipped bits, garbage, foreign file, code-carrying pickle)."""
import os
import random

import numpy as np
import pytest
import torch

from fastcnn import checkpoint as ckpt


def _state():
    return {"epoch": 3, "model": {"w": torch.randn(500), "b": torch.randn(7)},
            "config": {"model": "lenet5", "mean": [0.1, 0.2]}, "rng": [ckpt.rng_state()]}


def test_roundtrip(tmp_path):
    path = str(tmp_path / "c.pt")
    s = _state()
    ckpt.save(s, path)
    back = ckpt.load(path)
    assert back["epoch"] == 3 and back["config"] == s["config"]
    assert torch.equal(back["model"]["w"], s["model"]["w"])
    assert os.listdir(tmp_path) == ["c.pt"]  # no temporary file left behind


def test_rng_state_restores_every_generator(tmp_path):
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    torch.rand(5), np.random.rand(5), random.random()
    path = str(tmp_path / "r.pt")
    ckpt.save({"epoch": 0, "model": {}, "config": {}, "rng": ckpt.rng_state()}, path)
    expect = (torch.rand(4), np.random.rand(4), [random.random() for _ in range(4)])
    torch.manual_seed(99), np.random.seed(99), random.seed(99)
    ckpt.set_rng_state(ckpt.load(path)["rng"])  # weights_only load of the saved states
    assert torch.equal(torch.rand(4), expect[0])
    np.testing.assert_array_equal(np.random.rand(4), expect[1])
    assert [random.random() for _ in range(4)] == expect[2]


def test_failed_write_keeps_the_previous_file(tmp_path, monkeypatch):
    path = str(tmp_path / "c.pt")
    ckpt.save(_state(), path)
    before = open(path, "rb").read()

    def dies_halfway(obj, f):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(ckpt.torch, "save", dies_halfway)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save(_state(), path)
    assert open(path, "rb").read() == before
    assert os.listdir(tmp_path) == ["c.pt"]


def test_empty_file(tmp_path):
    (tmp_path / "c.pt").write_bytes(b"")
    with pytest.raises(ckpt.CheckpointError, match="empty"):
        ckpt.load(str(tmp_path / "c.pt"))


@pytest.mark.parametrize("keep", [0.1, 0.5, 0.9, 0.99])
def test_truncated_file(tmp_path, keep):
    path = str(tmp_path / "c.pt")
    ckpt.save(_state(), path)
    data = open(path, "rb").read()
    open(path, "wb").write(data[: int(len(data) * keep)])
    with pytest.raises(ckpt.CheckpointError, match="corrupt or truncated"):
        ckpt.load(path)


def test_flipped_bit_in_weights_is_caught(tmp_path):
    """torch.load alone would return the damaged tensor; the CRC check refuses it."""
    path = str(tmp_path / "c.pt")
    s = _state()
    ckpt.save(s, path)
    data = bytearray(open(path, "rb").read())
    raw = s["model"]["w"].numpy().tobytes()
    pos = bytes(data).find(raw[:64])
    assert pos > 0
    data[pos + 100] ^= 0x10
    open(path, "wb").write(bytes(data))
    with pytest.raises(ckpt.CheckpointError, match="CRC"):
        ckpt.load(path)


def test_garbage_and_foreign_files(tmp_path):
    (tmp_path / "g.pt").write_bytes(os.urandom(4096))
    with pytest.raises(ckpt.CheckpointError, match="corrupt or truncated"):
        ckpt.load(str(tmp_path / "g.pt"))
    torch.save({"state_dict": {"w": torch.ones(2)}}, tmp_path / "other.pt")
    with pytest.raises(ckpt.CheckpointError, match="not a fastcnn checkpoint"):
        ckpt.load(str(tmp_path / "other.pt"))
    with pytest.raises(ckpt.CheckpointError, match="does not exist"):
        ckpt.load(str(tmp_path / "missing.pt"))


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_pickled_code_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save({"format": ckpt.FORMAT, "version": 1, "epoch": 1, "model": {}, "config": _Evil()}, "e.pt")
    with pytest.raises(ckpt.CheckpointError, match="(?i)unsupported global"):
        ckpt.load("e.pt")
    assert not (tmp_path / "PWNED").exists()


def test_newer_format_version(tmp_path):
    path = str(tmp_path / "c.pt")
    torch.save({"format": ckpt.FORMAT, "version": 99, "epoch": 1, "model": {}, "config": {}}, path)
    with pytest.raises(ckpt.CheckpointError, match="upgrade fastcnn"):
        ckpt.load(path)
