"""Dataset readers (CIFAR-10/100 pickles, MNIST idx, SVHN .mat), corruption reports, the
offline / checksum-failing download (network mocked: these tests never touch it), and the
on-device loader (crop/flip/cutout against a per-image reference, determinism, DDP shards)."""
import gzip
import hashlib
import io
import os
import pickle
import struct
import sys
import tarfile
import urllib.error
from dataclasses import replace

import numpy as np
import pytest
import torch

from fastcnn.data import DatasetError, GpuLoader, channel_stats, data_root, load_dataset, take_subset
from fastcnn.data import datasets as D


# --------------------------------------------------------------------------- writers of the formats

def _cifar_batch(rng, n, classes, label_key):
    data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
    labels = rng.integers(0, classes, n).tolist()
    return {b"batch_label": b"x", label_key: labels, b"data": data, b"filenames": [b"f"] * n}


def write_cifar10(root, rng, per_batch=20, test=30):
    folder = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(folder, exist_ok=True)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        b = _cifar_batch(rng, test if name == "test_batch" else per_batch, 10, b"labels")
        batches[name] = b
        with open(os.path.join(folder, name), "wb") as f:
            pickle.dump(b, f, protocol=2)  # the official files are Python 2 pickles
    with open(os.path.join(folder, "batches.meta"), "wb") as f:
        pickle.dump({b"label_names": [c.encode() for c in D.CIFAR10_CLASSES]}, f, protocol=2)
    return batches


def write_idx(path, arr, gz=False):
    arr = np.asarray(arr, dtype=np.uint8)
    raw = struct.pack(">HBB", 0, 8, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()
    with (gzip.open(path + ".gz", "wb") if gz else open(path, "wb")) as f:
        f.write(raw)


def write_mnist(root, rng, n_train=50, n_test=20, gz=False):
    folder = os.path.join(root, "mnist")
    os.makedirs(folder, exist_ok=True)
    out = {}
    for split, n in (("train", n_train), ("t10k", n_test)):
        x = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        y = rng.integers(0, 10, n, dtype=np.uint8)
        write_idx(os.path.join(folder, f"{split}-images-idx3-ubyte"), x, gz)
        write_idx(os.path.join(folder, f"{split}-labels-idx1-ubyte"), y, gz)
        out[split] = (x, y)
    return out


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


# --------------------------------------------------------------------------- readers

def test_cifar10_reads_official_layout(tmp_path, rng):
    batches = write_cifar10(tmp_path, rng)
    ds = load_dataset("cifar10", str(tmp_path), download=False)
    assert ds.train_images.shape == (100, 3, 32, 32) and ds.train_images.dtype == np.uint8
    assert ds.test_images.shape == (30, 3, 32, 32)
    # a row of 3072 bytes is the R plane, then G, then B, each 32x32 row-major
    first = batches["data_batch_1"][b"data"][0]
    np.testing.assert_array_equal(ds.train_images[0, 1], first[1024:2048].reshape(32, 32))
    np.testing.assert_array_equal(ds.train_labels[20:40], batches["data_batch_2"][b"labels"])
    assert ds.classes == D.CIFAR10_CLASSES and ds.num_classes == 10 and ds.in_chans == 3


def test_cifar100_fine_labels(tmp_path, rng):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    tr, te = _cifar_batch(rng, 40, 100, b"fine_labels"), _cifar_batch(rng, 10, 100, b"fine_labels")
    for name, b in (("train", tr), ("test", te)):
        (folder / name).write_bytes(pickle.dumps(b, protocol=2))
    (folder / "meta").write_bytes(pickle.dumps({b"fine_label_names": [f"c{i}".encode() for i in range(100)]}))
    ds = load_dataset("cifar-100", str(tmp_path), download=False)
    assert ds.num_classes == 100 and ds.classes[7] == "c7"
    np.testing.assert_array_equal(ds.test_labels, te[b"fine_labels"])


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_idx_raw_and_gz(tmp_path, rng, gz):
    ref = write_mnist(tmp_path, rng, gz=gz)
    ds = load_dataset("mnist", str(tmp_path), download=False)
    assert ds.train_images.shape == (50, 1, 28, 28) and ds.in_chans == 1
    np.testing.assert_array_equal(ds.train_images[:, 0], ref["train"][0])
    np.testing.assert_array_equal(ds.test_labels, ref["t10k"][1])


def test_truncated_idx_is_reported(tmp_path, rng):
    write_mnist(tmp_path, rng)
    path = tmp_path / "mnist" / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(DatasetError, match="truncated or corrupt"):
        load_dataset("mnist", str(tmp_path), download=False)


def test_idx_bad_magic_is_reported(tmp_path, rng):
    write_mnist(tmp_path, rng)
    path = tmp_path / "mnist" / "t10k-labels-idx1-ubyte"
    path.write_bytes(b"\x12\x34" + path.read_bytes()[2:])
    with pytest.raises(DatasetError, match="not a uint8 idx file"):
        load_dataset("mnist", str(tmp_path), download=False)


def test_truncated_cifar_pickle_is_reported(tmp_path, rng):
    write_cifar10(tmp_path, rng)
    path = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    path.write_bytes(path.read_bytes()[: 5000])
    with pytest.raises(DatasetError, match="data_batch_3 is corrupt or truncated"):
        load_dataset("cifar10", str(tmp_path), download=False)


def test_cifar_wrong_shape_is_reported(tmp_path, rng):
    write_cifar10(tmp_path, rng)
    path = tmp_path / "cifar-10-batches-py" / "test_batch"
    b = _cifar_batch(rng, 30, 10, b"labels")
    b[b"labels"] = b[b"labels"][:-3]  # labels lost: a truncated rewrite
    path.write_bytes(pickle.dumps(b, protocol=2))
    with pytest.raises(DatasetError, match="27 labels for 30 images"):
        load_dataset("cifar10", str(tmp_path), download=False)


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_cifar_pickle_cannot_run_code(tmp_path, rng, monkeypatch):
    write_cifar10(tmp_path, rng)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_1").write_bytes(pickle.dumps({b"data": _Evil()}))
    with pytest.raises(DatasetError, match="corrupt or truncated"):
        load_dataset("cifar10", str(tmp_path), download=False)
    assert not (tmp_path / "PWNED").exists()


def test_svhn_without_scipy_says_what_to_install(tmp_path, monkeypatch):
    (tmp_path / "svhn").mkdir()
    for f in ("train_32x32.mat", "test_32x32.mat"):
        (tmp_path / "svhn" / f).write_bytes(b"MATLAB 5.0")
    monkeypatch.setitem(sys.modules, "scipy.io", None)  # import fails as if scipy were absent
    with pytest.raises(DatasetError, match="needs scipy: `pip install scipy`"):
        load_dataset("svhn", str(tmp_path), download=False)


def test_svhn_mat_with_scipy(tmp_path, rng):
    sio = pytest.importorskip("scipy.io", reason="scipy is optional; the reader is tested where it is installed")
    (tmp_path / "svhn").mkdir()
    x = rng.integers(0, 256, (32, 32, 3, 12), dtype=np.uint8)
    y = np.array([[10], [1], [2], [3], [4], [5], [6], [7], [8], [9], [10], [1]], dtype=np.uint8)
    for f in ("train_32x32.mat", "test_32x32.mat"):
        sio.savemat(str(tmp_path / "svhn" / f), {"X": x, "y": y})
    ds = load_dataset("svhn", str(tmp_path), download=False)
    assert ds.train_images.shape == (12, 3, 32, 32)
    np.testing.assert_array_equal(ds.train_images[3], x[..., 3].transpose(2, 0, 1))
    assert ds.train_labels[0] == 0 and ds.train_labels[1] == 1  # label 10 is the digit 0


def test_unknown_dataset(tmp_path):
    with pytest.raises(DatasetError, match="unknown dataset 'imagenet'.*cifar10"):
        load_dataset("imagenet", str(tmp_path))


# --------------------------------------------------------------------------- download (mocked network)

def test_data_root_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("FASTCNN_DATA", str(tmp_path / "env"))
    assert data_root(str(tmp_path / "arg")) == str(tmp_path / "arg")
    assert data_root() == str(tmp_path / "env")
    monkeypatch.delenv("FASTCNN_DATA")
    assert data_root().endswith(os.path.join(".cache", "fastcnn", "data"))


def test_missing_without_download_names_the_place(tmp_path):
    with pytest.raises(DatasetError) as e:
        load_dataset("cifar10", str(tmp_path), download=False)
    msg = str(e.value)
    assert str(tmp_path / "cifar-10-batches-py") in msg and "--data-dir" in msg and "FASTCNN_DATA" in msg
    assert "cifar-10-python.tar.gz" in msg


def test_offline_download_gives_clear_message(tmp_path, monkeypatch):
    def offline(*a, **k):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(D.urllib.request, "urlopen", offline)
    with pytest.raises(DatasetError) as e:
        load_dataset("mnist", str(tmp_path))
    msg = str(e.value)
    assert "could not be downloaded" in msg and "name resolution" in msg
    assert str(tmp_path / "mnist") in msg and "--data-dir" in msg and "FASTCNN_DATA" in msg
    assert not [f for f in os.listdir(tmp_path / "mnist") if f.startswith(".download-")]  # no leftovers


def _serve(monkeypatch, payload: bytes):
    monkeypatch.setattr(D.urllib.request, "urlopen", lambda url, timeout=None: io.BytesIO(payload))


def test_download_checksum_mismatch_is_rejected(tmp_path, monkeypatch):
    _serve(monkeypatch, b"<html>captive portal</html>")
    with pytest.raises(DatasetError, match="has MD5 .* expected c58f30108f718f92721af3b95e74349a"):
        load_dataset("cifar10", str(tmp_path))
    assert not (tmp_path / "cifar-10-python.tar.gz").exists()


def test_download_verifies_and_unpacks(tmp_path, monkeypatch, rng):
    src = tmp_path / "src"
    write_cifar10(src, rng)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        tar.add(src / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    archive = buf.getvalue()
    spec = D.SPECS["cifar10"]
    res = replace(spec.resources[0], md5=hashlib.md5(archive).hexdigest())
    monkeypatch.setitem(D.SPECS, "cifar10", replace(spec, resources=(res,)))
    _serve(monkeypatch, archive)
    root = tmp_path / "root"
    ds = load_dataset("cifar10", str(root))
    assert ds.train_images.shape[0] == 100
    assert D.md5sum(str(root / "cifar-10-python.tar.gz")) == res.md5


def test_subset_is_class_balanced(tmp_path, rng):
    write_cifar10(tmp_path, rng, per_batch=200)
    ds = load_dataset("cifar10", str(tmp_path), download=False)
    sub = take_subset(ds, 300, seed=3)
    counts = np.bincount(sub.train_labels, minlength=10)
    assert np.bincount(ds.train_labels, minlength=10).min() >= 30  # every class can give 30
    assert counts.tolist() == [30] * 10
    assert take_subset(ds, 300, seed=3).train_labels.tolist() == sub.train_labels.tolist()
    assert sub.test_images.shape == ds.test_images.shape


# --------------------------------------------------------------------------- on-device loader

def _images(n=40, c=3, h=32, w=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, c, h, w), dtype=torch.uint8, generator=g), torch.randint(0, 10, (n,), generator=g)


def test_channel_stats_match_numpy():
    x, _ = _images()
    mean, std = channel_stats(x, chunk=7)
    xf = x.numpy().astype(np.float64) / 255
    np.testing.assert_allclose(mean, xf.mean(axis=(0, 2, 3)), rtol=1e-10)
    np.testing.assert_allclose(std, xf.std(axis=(0, 2, 3)), rtol=1e-8)


def test_augmentation_matches_per_image_reference():
    x, y = _images()
    mean, std = [0.4, 0.5, 0.6], [0.2, 0.25, 0.3]
    L = GpuLoader(x, y, 16, train=True, mean=mean, std=std, crop_padding=4, flip=True, cutout=8, seed=5)
    L.set_epoch(2)
    idx, aug = L._plan()
    m, s = torch.tensor(mean).view(3, 1, 1), torch.tensor(std).view(3, 1, 1)
    for b, (xb, yb) in enumerate(L):
        for j in range(16):
            k = b * 16 + j
            img = torch.nn.functional.pad(x[idx[k]], (4, 4, 4, 4))
            dy, dx = int(aug["dy"][k]), int(aug["dx"][k])
            img = img[:, dy:dy + 32, dx:dx + 32]
            if aug["flip"][k]:
                img = img.flip(2)
            ref = (img.float() / 255 - m) / s
            cy, cx = int(aug["cy"][k]), int(aug["cx"][k])
            ref[:, max(cy - 4, 0):max(cy + 4, 0), max(cx - 4, 0):max(cx + 4, 0)] = 0
            torch.testing.assert_close(xb[j], ref, atol=1e-5, rtol=1e-5)
            assert yb[j] == y[idx[k]]
    assert len(L) == 2  # 40 images, batch 16, last partial batch dropped


def test_loader_is_deterministic_per_seed_and_epoch():
    x, y = _images()
    kw = dict(train=True, crop_padding=4, flip=True, mean=[0.5] * 3, std=[0.5] * 3)
    a, b = GpuLoader(x, y, 8, seed=1, **kw), GpuLoader(x, y, 8, seed=1, **kw)
    a.set_epoch(3), b.set_epoch(3)
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    b.set_epoch(4)
    assert not torch.equal(next(iter(a))[0], next(iter(b))[0])


def test_ddp_shards_partition_one_global_order():
    x, y = _images(n=37)
    y = torch.arange(37)  # labels = image ids, to see who got what
    kw = dict(train=True, mean=[0.5] * 3, std=[0.5] * 3, seed=9)
    single = GpuLoader(x, y, 4, world_size=1, **kw)
    ranks = [GpuLoader(x, y, 2, rank=r, world_size=2, **kw) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 9  # ceil(37/2)=19 each, 9 full batches of 2
    seen = [torch.cat([b for _, b in r]) for r in ranks]
    # step k of the two ranks together is step k of one process with the global batch
    glob = torch.cat([b for _, b in single])
    merged = torch.stack([seen[0].view(-1, 2), seen[1].view(-1, 2)], 1)  # [step, rank, item]
    merged = merged.permute(0, 2, 1).reshape(-1)  # rank r holds positions r, r+2, ...
    assert torch.equal(merged, glob[: merged.numel()])
    # evaluation shards cover every image exactly once
    ev = [GpuLoader(x, y, 5, train=False, rank=r, world_size=2, mean=[0.5] * 3, std=[0.5] * 3) for r in range(2)]
    assert sorted(torch.cat([b for L in ev for _, b in L]).tolist()) == list(range(37))


def test_eval_loader_normalises_without_augmentation():
    x, y = _images(n=10)
    L = GpuLoader(x, y, 4, train=False, mean=[0.1, 0.2, 0.3], std=[0.5, 0.6, 0.7], crop_padding=4, flip=True)
    xb = torch.cat([b for b, _ in L])
    ref = (x.float() / 255 - torch.tensor([0.1, 0.2, 0.3]).view(1, 3, 1, 1)) / torch.tensor([0.5, 0.6, 0.7]).view(1, 3, 1, 1)
    torch.testing.assert_close(xb, ref, atol=1e-5, rtol=1e-5)
    assert len(L) == 3  # evaluation keeps the partial batch


def test_small_inputs_are_padded_and_others_resized():
    x, y = _images(n=6, c=1, h=28, w=28)
    L = GpuLoader(x, y, 6, train=False, mean=[0.0], std=[1.0], out_size=(32, 32))
    xb, _ = next(iter(L))
    assert xb.shape == (6, 1, 32, 32)
    torch.testing.assert_close(xb[:, :, 2:30, 2:30], x.float() / 255)
    assert xb[:, :, :2].abs().max() == 0
    L = GpuLoader(x, y, 6, train=False, mean=[0.0], std=[1.0], out_size=(64, 64))
    assert next(iter(L))[0].shape == (6, 1, 64, 64)


def test_loader_rejects_bad_input():
    x, y = _images(n=4)
    with pytest.raises(ValueError, match="uint8"):
        GpuLoader(x.float(), y, 2, train=True)
    with pytest.raises(ValueError, match="one per channel"):
        GpuLoader(x, y, 2, train=True, mean=[0.5], std=[0.5])
