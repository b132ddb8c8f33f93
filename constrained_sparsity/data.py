"""Datasets held in memory: scikit-learn's ``digits`` (embedded) and MNIST-format IDX files.

Small sets are tensors on the training device, batched by indexing a permutation: no
per-sample ``DataLoader`` overhead.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import struct
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import DataError

__all__ = [
    "DATASETS",
    "Dataset",
    "batches",
    "download_idx",
    "load_dataset",
    "load_digits",
    "load_idx_dir",
    "read_idx",
]

DATASETS = ("digits", "mnist", "fashion_mnist")
CLASSES = {"digits": 10, "mnist": 10, "fashion_mnist": 10}  # the task each name declares
IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
# MD5 of the published .gz files (the checksums torchvision verifies).
CHECKSUMS = {
    "mnist": {
        "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
        "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
        "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
        "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
    },
    "fashion_mnist": {
        "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
        "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
        "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
    },
}
MIRRORS = {
    "mnist": ("https://ossci-datasets.s3.amazonaws.com/mnist/",),
    "fashion_mnist": ("https://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
}
DEFAULT_ROOTS = {"fashion_mnist": "/usr/share/datasets/fashion-mnist"}
_IDX_DTYPES = {
    0x08: np.uint8,
    0x09: np.int8,
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "constrained_sparsity"


@dataclass
class Dataset:
    """Tensors of one dataset split into train / validation / test."""

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    val_x: torch.Tensor | None = None
    val_y: torch.Tensor | None = None
    classes: int | None = None  # the declared number of classes (labels 0 .. classes - 1)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.train_x.shape[1:])

    @property
    def num_classes(self) -> int:
        if self.classes is not None:
            return self.classes
        return int(max(self.train_y.max(), self.test_y.max())) + 1

    def check_labels(self, where: str) -> Dataset:
        """Refuse labels outside ``0 .. classes - 1`` (:class:`DataError` naming the split and the label)."""
        if self.classes is None:
            return self
        for split, y in (("train", self.train_y), ("test", self.test_y), ("validation", self.val_y)):
            if y is None or len(y) == 0:
                continue
            bad = y[(y < 0) | (y >= self.classes)]
            if len(bad):
                raise DataError(
                    f"{where}: {split} label {int(bad[0])} is outside the {self.classes} classes of {self.name} "
                    f"(0..{self.classes - 1})"
                )
        return self

    def to(self, device: torch.device | str) -> Dataset:
        for key in ("train_x", "train_y", "test_x", "test_y", "val_x", "val_y"):
            value = getattr(self, key)
            if value is not None:
                setattr(self, key, value.to(device))
        return self

    def split_validation(self, fraction: float, seed: int = 0) -> Dataset:
        """Hold out ``fraction`` of the training set (a seeded random subset) for validation."""
        if not 0.0 <= fraction < 1.0:
            raise DataError(f"val_fraction={fraction} should be in [0, 1)")
        n_val = int(round(fraction * len(self.train_y)))
        if n_val == 0:
            return self
        perm = torch.randperm(len(self.train_y), generator=torch.Generator().manual_seed(seed))
        val_idx, train_idx = perm[:n_val], perm[n_val:]
        self.val_x, self.val_y = self.train_x[val_idx], self.train_y[val_idx]
        self.train_x, self.train_y = self.train_x[train_idx], self.train_y[train_idx]
        return self


def load_digits(test_fraction: float = 0.2, seed: int = 0) -> Dataset:
    """scikit-learn's 8x8 handwritten digits (1,797 images, shipped inside its wheel).

    Pixels are scaled from 0..16 to [0, 1]; a fixed seeded split holds out ``test_fraction``.
    """
    from sklearn.datasets import load_digits as _sk_load_digits

    bunch = _sk_load_digits()
    x = torch.as_tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (N, 1, 8, 8)
    y = torch.as_tensor(bunch.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_test = int(round(test_fraction * len(y)))
    test_idx, train_idx = perm[:n_test], perm[n_test:]
    return Dataset("digits", x[train_idx], y[train_idx], x[test_idx], y[test_idx])


def read_idx(path: str | Path) -> np.ndarray:
    """Read one IDX file (plain or gzip-compressed) into a numpy array.

    Format: two zero bytes, a type code (0x08 = uint8), the number of dimensions, then each
    dimension as a big-endian int32, then the data.
    """
    path = Path(path)
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as fh:
            raw = fh.read()
    except FileNotFoundError:
        raise DataError(f"IDX file not found: {path}") from None
    except (OSError, EOFError) as exc:  # gzip raises these on corrupt or truncated archives
        raise DataError(f"cannot read IDX file {path}: {exc}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        magic = raw[:4].hex() if len(raw) >= 4 else raw.hex()
        raise DataError(f"{path}: wrong IDX magic number 0x{magic} (expected 0x0000 + type code + ndim)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated IDX header ({len(raw)} bytes, need {header})")
    shape = struct.unpack(f">{ndim}i", raw[4:header])
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(raw) - header != expected:
        raise DataError(
            f"{path}: truncated or oversized IDX file: header says shape {shape} ({expected} bytes of data), "
            f"file has {len(raw) - header}"
        )
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)


def _find_idx(root: Path, stem: str) -> Path | None:
    for candidate in (root / stem, root / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


def load_idx_dir(root: str | Path, name: str = "mnist") -> Dataset:
    """Load MNIST-format IDX files (``train-images-idx3-ubyte[.gz]`` ...) from ``root``."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data directory not found: {root}")
    arrays = {}
    for key, stem in IDX_FILES.items():
        path = _find_idx(root, stem)
        if path is None:
            raise DataError(f"{root}: missing {stem} or {stem}.gz")
        arrays[key] = read_idx(path)
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise DataError(
                f"{root}: {split} images {images.shape} and labels {labels.shape} do not match (need N x H x W and N)"
            )

    def images(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(a.astype(np.float32) / 255.0).unsqueeze(1)  # (N, 1, H, W)

    def labels(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(a.astype(np.int64))

    return Dataset(
        name,
        images(arrays["train_images"]),
        labels(arrays["train_labels"]),
        images(arrays["test_images"]),
        labels(arrays["test_labels"]),
    )


def _md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def download_idx(
    name: str,
    dest: str | Path,
    mirrors: tuple[str, ...] | None = None,
    checksums: dict[str, str] | None = None,
    timeout: float = 30.0,
) -> Path:
    """Download the four IDX ``.gz`` files of ``name`` into ``dest`` and verify their MD5.

    Files already present with the right checksum are kept. A file is written under a
    temporary name and renamed only once verified, so an interrupted or corrupt download
    never leaves a file that looks complete.
    """
    if name not in CHECKSUMS and checksums is None:
        raise DataError(f"no download source for dataset {name!r}; known: {sorted(CHECKSUMS)}")
    checksums = checksums or CHECKSUMS[name]
    mirrors = mirrors or MIRRORS[name]
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    for filename, md5 in checksums.items():
        target = dest / filename
        if target.is_file() and _md5(target) == md5:
            continue
        errors = []
        for mirror in mirrors:
            url = mirror.rstrip("/") + "/" + filename
            fd, tmp_name = tempfile.mkstemp(dir=dest, prefix=f".{filename}.", suffix=".part")
            tmp = Path(tmp_name)
            try:
                with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as response:
                    for block in iter(lambda: response.read(1 << 20), b""):
                        out.write(block)
                actual = _md5(tmp)
                if actual != md5:
                    raise DataError(f"checksum mismatch for {url}: md5 {actual}, expected {md5}")
                os.replace(tmp, target)
                break
            except (urllib.error.URLError, OSError, DataError) as exc:
                errors.append(f"{url}: {exc}")
            finally:
                tmp.unlink(missing_ok=True)
        else:
            raise DataError(f"could not download {filename}: " + "; ".join(errors))
    return dest


def load_dataset(
    name: str,
    root: str | None = None,
    download: bool = False,
    cache_dir: str | None = None,
    mirror: str | None = None,
    val_fraction: float = 0.0,
    seed: int = 0,
) -> Dataset:
    """Load a dataset by name (``digits``, ``mnist`` or ``fashion_mnist``).

    IDX datasets are read from ``root`` if given, else from the default location
    (Debian's ``/usr/share/datasets/fashion-mnist`` for Fashion-MNIST) or the cache
    directory. With ``download`` the files are fetched into ``root`` (or the cache) first.
    """
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; choose one of {DATASETS}")
    if name == "digits":
        dataset = load_digits()
        where = "digits (scikit-learn)"
    else:
        cache = Path(cache_dir) if cache_dir else default_cache_dir() / name
        candidates = [Path(root)] if root else [Path(DEFAULT_ROOTS.get(name, cache)), cache]
        found = next((p for p in candidates if p.is_dir() and _find_idx(p, IDX_FILES["train_images"])), None)
        if found is None and download:
            mirrors = (mirror,) if mirror else None
            found = download_idx(name, Path(root) if root else cache, mirrors=mirrors)
        if found is None:
            where = " or ".join(str(p) for p in dict.fromkeys(candidates))
            hint = "set data.download=true" + (
                " or apt-get install dataset-fashion-mnist" if name == "fashion_mnist" else ""
            )
            raise DataError(f"{name} IDX files not found in {where}; {hint}")
        dataset = load_idx_dir(found, name)
        where = str(found)
    dataset.classes = CLASSES[name]
    dataset.check_labels(where)
    return dataset.split_validation(val_fraction, seed=seed)


def batches(
    x: torch.Tensor, y: torch.Tensor, batch_size: int, generator: torch.Generator | None = None, start: int = 0
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Mini-batches of in-memory tensors, shuffled with ``generator`` (in order if ``None``).

    ``start`` skips the first ``start`` batches of the permutation (resuming mid-epoch).
    """
    n = len(y)
    if generator is None:
        order = None
    else:
        order = torch.randperm(n, generator=generator).to(x.device)
    for i in range(start * batch_size, n, batch_size):
        if order is None:
            yield x[i : i + batch_size], y[i : i + batch_size]
        else:
            idx = order[i : i + batch_size]
            yield x[idx], y[idx]
