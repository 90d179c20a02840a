"""Readers for the four datasets the seeds report (CIFAR-10, CIFAR-100, SVHN, MNIST) in their
standard distributed formats, plus checksum-verified download.

Every reader returns a :class:`Dataset` of uint8 images in ``[N, C, H, W]`` layout and int64
labels, validated for shape, dtype, count and label range: a corrupt or truncated file raises
:class:`DatasetError` naming the file, so nothing broken is ever trained on.

Where the files live: ``--data-dir`` if given, else ``$FASTCNN_DATA``, else
``~/.cache/fastcnn/data``. A missing dataset is downloaded (archives are MD5-verified, as
published by the dataset authors and used by torchvision) when ``download=True`` and the
network allows; otherwise :class:`DatasetError` says which files to put where.
"""
from __future__ import annotations

import gzip
import hashlib
import os
import pickle
import shutil
import struct
import tarfile
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass, field

import numpy as np

DATA_ENV = "FASTCNN_DATA"
DEFAULT_ROOT = os.path.join("~", ".cache", "fastcnn", "data")

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                   "ship", "truck")


class DatasetError(RuntimeError):
    """A dataset is missing, corrupt or truncated; the message says what to do."""


@dataclass
class Dataset:
    name: str
    train_images: np.ndarray  # uint8 [N, C, H, W]
    train_labels: np.ndarray  # int64 [N]
    test_images: np.ndarray
    test_labels: np.ndarray
    classes: tuple[str, ...]
    root: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def in_chans(self) -> int:
        return int(self.train_images.shape[1])

    @property
    def image_size(self) -> tuple[int, int]:
        return int(self.train_images.shape[2]), int(self.train_images.shape[3])


@dataclass(frozen=True)
class Resource:
    """One file to download: where from, its MD5, and what it becomes."""

    url: str
    filename: str
    md5: str
    extract: bool = False  # a .tar.gz unpacked into the dataset root


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    folder: str  # where the readable files live, relative to the data root
    files: tuple[str, ...]  # what must exist in ``folder`` for the reader
    resources: tuple[Resource, ...]
    download_to_folder: bool  # download into ``folder`` (True) or into the root (archives)


SPECS = {
    "cifar10": DatasetSpec(
        "cifar10", "cifar-10-batches-py",
        ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5",
         "test_batch", "batches.meta"),
        (Resource("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
                  "cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a", extract=True),),
        False),
    "cifar100": DatasetSpec(
        "cifar100", "cifar-100-python", ("train", "test", "meta"),
        (Resource("https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
                  "cifar-100-python.tar.gz", "eb9058c3a382ffc7106e4002c42a8d85", extract=True),),
        False),
    "svhn": DatasetSpec(
        "svhn", "svhn", ("train_32x32.mat", "test_32x32.mat"),
        (Resource("http://ufldl.stanford.edu/housenumbers/train_32x32.mat", "train_32x32.mat",
                  "e26dedcc434d2e4c54c9b2d4a06d8373"),
         Resource("http://ufldl.stanford.edu/housenumbers/test_32x32.mat", "test_32x32.mat",
                  "eb5a983be6a315427106f1b164d9cef3")),
        True),
    "mnist": DatasetSpec(
        "mnist", "mnist",
        ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
         "t10k-labels-idx1-ubyte"),
        tuple(Resource(f"https://ossci-datasets.s3.amazonaws.com/mnist/{f}.gz", f"{f}.gz", md5)
              for f, md5 in (("train-images-idx3-ubyte", "f68b3c2dcbeaaa9fbdd348bbdeb94873"),
                             ("train-labels-idx1-ubyte", "d53e105ee54ea40749a09fcbcd1e9432"),
                             ("t10k-images-idx3-ubyte", "9fb629c4189551a2d022fa330f9573f3"),
                             ("t10k-labels-idx1-ubyte", "ec29112dd5afa0611ce80d1b7f02629c"))),
        True),
}
DATASETS = tuple(SPECS)


def data_root(data_dir: str | None = None) -> str:
    """The data root: ``data_dir``, else ``$FASTCNN_DATA``, else ``~/.cache/fastcnn/data``."""
    root = data_dir or os.environ.get(DATA_ENV) or DEFAULT_ROOT
    return os.path.abspath(os.path.expanduser(root))


# --------------------------------------------------------------------------- download

def md5sum(path: str) -> str:
    h = hashlib.md5()  # integrity check against the published checksums, not security
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _where_to_put(spec: DatasetSpec, root: str) -> str:
    folder = os.path.join(root, spec.folder)
    names = ", ".join(r.filename for r in spec.resources)
    if spec.name == "mnist":
        how = f"put {names} (gzipped or not) in {folder}/"
    elif spec.download_to_folder:
        how = f"put {names} in {folder}/"
    else:
        how = f"unpack {names} so that {folder}/ holds {', '.join(spec.files)}"
    return (f"{how}; or point --data-dir / ${DATA_ENV} at a folder that has them "
            f"(urls: {', '.join(r.url for r in spec.resources)})")


def download(spec: DatasetSpec, root: str, *, timeout: float = 60.0) -> None:
    """Fetch ``spec``'s resources into ``root``, verify each MD5, unpack archives.
    Raises :class:`DatasetError` (offline, HTTP error, checksum mismatch) with where to put the files."""
    os.makedirs(root, exist_ok=True)
    dest_dir = os.path.join(root, spec.folder) if spec.download_to_folder else root
    os.makedirs(dest_dir, exist_ok=True)
    for res in spec.resources:
        dest = os.path.join(dest_dir, res.filename)
        if not (os.path.exists(dest) and md5sum(dest) == res.md5):
            fd, tmp = tempfile.mkstemp(prefix=".download-", dir=dest_dir)
            try:
                with os.fdopen(fd, "wb") as out:
                    with urllib.request.urlopen(res.url, timeout=timeout) as resp:
                        shutil.copyfileobj(resp, out, 1 << 20)
                got = md5sum(tmp)
                if got != res.md5:
                    raise DatasetError(
                        f"{spec.name}: downloaded {res.filename} has MD5 {got}, expected {res.md5} "
                        f"(corrupt or changed download); {_where_to_put(spec, root)}")
                os.replace(tmp, dest)
            except (urllib.error.URLError, OSError, TimeoutError) as e:
                raise DatasetError(
                    f"{spec.name} is not in {root} and could not be downloaded "
                    f"({type(e).__name__}: {getattr(e, 'reason', e)}); {_where_to_put(spec, root)}"
                ) from None
            finally:
                if os.path.exists(tmp):
                    os.remove(tmp)
        if res.extract:
            _extract(dest, root, spec)


def _extract(archive: str, root: str, spec: DatasetSpec) -> None:
    try:
        with tarfile.open(archive, "r:gz") as tar:
            try:
                tar.extractall(root, filter="data")  # refuses absolute paths / links out of root
            except TypeError:  # Python without extraction filters
                tar.extractall(root)
    except (tarfile.TarError, OSError, EOFError) as e:
        raise DatasetError(f"{archive} could not be unpacked ({type(e).__name__}: {e}); "
                           f"{_where_to_put(spec, root)}") from None


def ensure(name: str, data_dir: str | None = None, download_ok: bool = True) -> str:
    """Make sure ``name``'s files are present under the data root; return the root."""
    spec = _spec(name)
    root = data_root(data_dir)
    if _missing(spec, root):
        if not download_ok:
            raise DatasetError(f"{spec.name} not found in {root} (download disabled); "
                               f"{_where_to_put(spec, root)}")
        download(spec, root)
        missing = _missing(spec, root)
        if missing:
            raise DatasetError(f"{spec.name}: after download, {', '.join(missing)} still missing "
                               f"in {os.path.join(root, spec.folder)}; {_where_to_put(spec, root)}")
    return root


def _missing(spec: DatasetSpec, root: str) -> list[str]:
    folder = os.path.join(root, spec.folder)
    out = []
    for f in spec.files:
        p = os.path.join(folder, f)
        if not (os.path.exists(p) or (spec.name == "mnist" and os.path.exists(p + ".gz"))):
            out.append(f)
    return out


def _spec(name: str) -> DatasetSpec:
    key = name.lower().replace("-", "").replace("_", "")
    if key not in SPECS:
        raise DatasetError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    return SPECS[key]


# --------------------------------------------------------------------------- readers

class _SafeUnpickler(pickle.Unpickler):
    """Unpickles only what CIFAR batches contain (dicts, lists, bytes, numpy arrays): a
    tampered file cannot run code."""

    _ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"unexpected object {module}.{name}")


def _load_pickle(path: str) -> dict:
    try:
        with open(path, "rb") as f:
            obj = _SafeUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError,
            IndexError, KeyError, MemoryError, UnicodeDecodeError) as e:
        raise DatasetError(f"{path} is corrupt or truncated ({type(e).__name__}: {e}); "
                           "delete it and download or copy it again") from None
    if not isinstance(obj, dict):
        raise DatasetError(f"{path} is not a CIFAR batch (expected a dict, got {type(obj).__name__})")
    return {(k.decode() if isinstance(k, bytes) else k): v for k, v in obj.items()}


def _cifar_arrays(path: str, label_key: str, num_classes: int):
    d = _load_pickle(path)
    if "data" not in d or label_key not in d:
        raise DatasetError(f"{path} lacks the {'data' if 'data' not in d else label_key!r} entry: "
                           "not a CIFAR batch, or corrupt")
    data = np.asarray(d["data"])
    labels = np.asarray(d[label_key], dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise DatasetError(f"{path}: data is {data.dtype}{list(data.shape)}, expected uint8 [N, 3072]")
    if labels.shape != (data.shape[0],):
        raise DatasetError(f"{path}: {labels.shape[0]} labels for {data.shape[0]} images (truncated?)")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise DatasetError(f"{path}: labels outside 0..{num_classes - 1}")
    return data.reshape(-1, 3, 32, 32), labels


def _names(meta_path: str, key: str, fallback) -> tuple[str, ...]:
    try:
        names = _load_pickle(meta_path).get(key)
        out = tuple(n.decode() if isinstance(n, bytes) else str(n) for n in names)
        return out if len(out) == len(fallback) else tuple(fallback)
    except (DatasetError, TypeError):
        return tuple(fallback)


def load_cifar10(root: str) -> Dataset:
    folder = os.path.join(root, "cifar-10-batches-py")
    parts = [_cifar_arrays(os.path.join(folder, f"data_batch_{i}"), "labels", 10) for i in range(1, 6)]
    tx, ty = _cifar_arrays(os.path.join(folder, "test_batch"), "labels", 10)
    classes = _names(os.path.join(folder, "batches.meta"), "label_names", CIFAR10_CLASSES)
    return Dataset("cifar10", np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]),
                   tx, ty, classes, root)


def load_cifar100(root: str) -> Dataset:
    folder = os.path.join(root, "cifar-100-python")
    x, y = _cifar_arrays(os.path.join(folder, "train"), "fine_labels", 100)
    tx, ty = _cifar_arrays(os.path.join(folder, "test"), "fine_labels", 100)
    classes = _names(os.path.join(folder, "meta"), "fine_label_names", [str(i) for i in range(100)])
    return Dataset("cifar100", x, y, tx, ty, classes, root)


def _read_svhn_mat(path: str):
    try:
        from scipy.io import loadmat
    except ImportError:
        raise DatasetError("reading SVHN .mat files needs scipy: `pip install scipy` "
                           "(or `pip install fastcnn[train]`)") from None
    try:
        m = loadmat(path)
    except Exception as e:  # scipy raises ValueError/TypeError/OSError/zlib errors on damage
        raise DatasetError(f"{path} is corrupt or truncated ({type(e).__name__}: {e}); "
                           "delete it and download or copy it again") from None
    if "X" not in m or "y" not in m:
        raise DatasetError(f"{path} lacks the X / y arrays: not an SVHN file")
    x, y = np.asarray(m["X"]), np.asarray(m["y"]).reshape(-1).astype(np.int64)
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[:3] != (32, 32, 3) or x.shape[3] != y.shape[0]:
        raise DatasetError(f"{path}: X is {x.dtype}{list(x.shape)} with {y.shape[0]} labels, "
                           "expected uint8 [32, 32, 3, N] and N labels")
    y[y == 10] = 0  # SVHN stores the digit 0 as label 10
    if y.size and (y.min() < 0 or y.max() > 9):
        raise DatasetError(f"{path}: labels outside 1..10")
    return np.ascontiguousarray(x.transpose(3, 2, 0, 1)), y


def load_svhn(root: str) -> Dataset:
    folder = os.path.join(root, "svhn")
    x, y = _read_svhn_mat(os.path.join(folder, "train_32x32.mat"))
    tx, ty = _read_svhn_mat(os.path.join(folder, "test_32x32.mat"))
    return Dataset("svhn", x, y, tx, ty, tuple(str(i) for i in range(10)), root)


def read_idx(path: str) -> np.ndarray:
    """An MNIST idx file (raw or ``.gz``) as a uint8 array, checking magic and length."""
    gz = path + ".gz"
    src = path if os.path.exists(path) else gz
    try:
        opener = gzip.open if src.endswith(".gz") else open
        with opener(src, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise DatasetError(f"{src} is corrupt or truncated ({type(e).__name__}: {e})") from None
    if len(raw) < 4:
        raise DatasetError(f"{src} is truncated ({len(raw)} bytes)")
    zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype_code != 0x08 or not 1 <= ndim <= 4:
        raise DatasetError(f"{src} is not a uint8 idx file (magic {raw[:4].hex()})")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DatasetError(f"{src} is truncated (header)")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    expected = int(np.prod(dims))
    if len(raw) - header != expected:
        raise DatasetError(f"{src} has {len(raw) - header} data bytes, expected {expected} for shape "
                           f"{list(dims)} (truncated or corrupt)")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims).copy()  # writable


def load_mnist(root: str) -> Dataset:
    folder = os.path.join(root, "mnist")
    out = []
    for split in ("train", "t10k"):
        x = read_idx(os.path.join(folder, f"{split}-images-idx3-ubyte"))
        y = read_idx(os.path.join(folder, f"{split}-labels-idx1-ubyte")).astype(np.int64)
        if x.ndim != 3 or y.ndim != 1 or x.shape[0] != y.shape[0]:
            raise DatasetError(f"mnist {split}: {x.shape[0]} images but {y.shape[0]} labels")
        if y.size and y.max() > 9:
            raise DatasetError(f"mnist {split}: labels outside 0..9")
        out += [np.ascontiguousarray(x[:, None]), y]
    return Dataset("mnist", *out, tuple(str(i) for i in range(10)), root)


_LOADERS = {"cifar10": load_cifar10, "cifar100": load_cifar100, "svhn": load_svhn, "mnist": load_mnist}


def load_dataset(name: str, data_dir: str | None = None, download: bool = True,
                 subset: int | None = None, seed: int = 0) -> Dataset:
    """Load ``name`` from the data root (downloading if missing and allowed).

    ``subset`` keeps a class-balanced random ``subset`` images of the training split (chosen
    with ``seed``); the test split is kept whole.
    """
    spec = _spec(name)
    root = ensure(spec.name, data_dir, download)
    ds = _LOADERS[spec.name](root)
    if subset is not None:
        ds = take_subset(ds, subset, seed)
    return ds


def take_subset(ds: Dataset, n: int, seed: int = 0) -> Dataset:
    """A class-balanced random subset of ``n`` training images (as equal as ``n`` allows)."""
    total = ds.train_labels.shape[0]
    if n < 1:
        raise DatasetError(f"--subset must be at least 1, got {n}")
    if n >= total:
        return ds
    rng = np.random.default_rng(seed)
    by_class = [rng.permutation(np.flatnonzero(ds.train_labels == c)) for c in range(ds.num_classes)]
    # round-robin over classes so the subset stays balanced
    order = []
    depth = max((len(b) for b in by_class), default=0)
    for i in range(depth):
        order.extend(int(b[i]) for b in by_class if i < len(b))
    keep = np.sort(np.asarray(order[:n], dtype=np.int64))
    return Dataset(ds.name, ds.train_images[keep], ds.train_labels[keep], ds.test_images,
                   ds.test_labels, ds.classes, ds.root, ds.notes + [f"train subset {n} of {total}"])


__all__ = ["Dataset", "DatasetError", "DATASETS", "SPECS", "DATA_ENV", "data_root", "download",
           "ensure", "load_dataset", "load_cifar10", "load_cifar100", "load_svhn", "load_mnist",
           "read_idx", "take_subset", "md5sum"]
