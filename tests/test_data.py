"""Data: digits, IDX parsing and its failures, download against a local HTTP server."""

import contextlib
import functools
import gzip
import hashlib
import http.server
import struct
import threading

import numpy as np
import pytest
import torch

from constrained_sparsity import DataError, load_dataset
from constrained_sparsity.data import IDX_FILES, batches, download_idx, load_digits, load_idx_dir, read_idx


def _idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}i", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def _write_mnist_like(root, n_train=30, n_test=10, compress=True, seed=0):
    rng = np.random.default_rng(seed)
    arrays = {
        "train_images": rng.integers(0, 256, (n_train, 28, 28)),
        "train_labels": rng.integers(0, 10, n_train),
        "test_images": rng.integers(0, 256, (n_test, 28, 28)),
        "test_labels": rng.integers(0, 10, n_test),
    }
    root.mkdir(parents=True, exist_ok=True)
    for key, stem in IDX_FILES.items():
        data = _idx_bytes(arrays[key])
        if compress:
            (root / f"{stem}.gz").write_bytes(gzip.compress(data))
        else:
            (root / stem).write_bytes(data)
    return arrays


def test_digits_is_embedded_and_split():
    ds = load_digits()
    assert ds.train_x.shape == (1438, 1, 8, 8) and ds.test_x.shape == (359, 1, 8, 8)
    assert ds.train_x.min() >= 0 and ds.train_x.max() <= 1
    assert ds.num_classes == 10


def test_validation_split():
    ds = load_dataset("digits", val_fraction=0.1)
    assert len(ds.val_y) == 144 and len(ds.train_y) == 1438 - 144


@pytest.mark.parametrize("compress", [True, False])
def test_idx_directory_roundtrip(tmp_path, compress):
    arrays = _write_mnist_like(tmp_path, compress=compress)
    ds = load_idx_dir(tmp_path)
    assert ds.train_x.shape == (30, 1, 28, 28) and ds.test_x.shape == (10, 1, 28, 28)
    torch.testing.assert_close(ds.train_x[:, 0] * 255, torch.tensor(arrays["train_images"], dtype=torch.float32))
    assert ds.train_y.tolist() == arrays["train_labels"].tolist()


def test_missing_directory_and_file(tmp_path):
    with pytest.raises(DataError, match="data directory not found"):
        load_idx_dir(tmp_path / "absent")
    _write_mnist_like(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match="missing t10k-labels-idx1-ubyte or t10k-labels-idx1-ubyte.gz"):
        load_idx_dir(tmp_path)
    with pytest.raises(DataError, match="mnist IDX files not found in .*absent; set data.download=true"):
        load_dataset("mnist", root=str(tmp_path / "absent"))


def test_wrong_magic_number(tmp_path):
    path = tmp_path / "x-idx3-ubyte"
    path.write_bytes(b"\x08\x03\x00\x00" + b"\x00" * 20)
    with pytest.raises(DataError, match="wrong IDX magic number 0x08030000"):
        read_idx(path)


def test_truncated_files(tmp_path):
    data = _idx_bytes(np.zeros((4, 28, 28)))
    path = tmp_path / "short-idx3-ubyte"
    path.write_bytes(data[:-10])
    with pytest.raises(DataError, match=r"truncated or oversized IDX file: header says shape \(4, 28, 28\)"):
        read_idx(path)
    gz = tmp_path / "short-idx3-ubyte.gz"
    gz.write_bytes(gzip.compress(data)[:-20])
    with pytest.raises(DataError, match="cannot read IDX file"):
        read_idx(gz)
    header_only = tmp_path / "hdr-idx3-ubyte"
    header_only.write_bytes(data[:9])
    with pytest.raises(DataError, match="truncated IDX header"):
        read_idx(header_only)


def test_batches_cover_every_sample_once():
    x = torch.arange(10).float().unsqueeze(1)
    y = torch.arange(10)
    seen = torch.cat([yb for _, yb in batches(x, y, 3, torch.Generator().manual_seed(0))])
    assert sorted(seen.tolist()) == list(range(10))
    skipped = torch.cat([yb for _, yb in batches(x, y, 3, torch.Generator().manual_seed(0), start=2)])
    assert skipped.tolist() == seen[6:].tolist()


@contextlib.contextmanager
def _http_server(directory):
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(directory))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


def _md5s(directory):
    return {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in sorted(directory.glob("*.gz"))}


def test_download_from_local_server_verifies_checksums(tmp_path):
    served = tmp_path / "served"
    arrays = _write_mnist_like(served)
    with _http_server(served) as url:
        dest = download_idx("mnist", tmp_path / "cache", mirrors=(url,), checksums=_md5s(served), timeout=10)
    ds = load_idx_dir(dest)
    assert ds.test_y.tolist() == arrays["test_labels"].tolist()
    assert not list(dest.glob(".*part"))  # no temporary files left behind


def test_download_checksum_mismatch_leaves_no_file(tmp_path):
    served = tmp_path / "served"
    _write_mnist_like(served)
    checksums = _md5s(served)
    checksums["train-images-idx3-ubyte.gz"] = "0" * 32
    dest = tmp_path / "cache"
    with _http_server(served) as url:
        with pytest.raises(
            DataError, match="checksum mismatch for .*train-images-idx3-ubyte.gz: md5 [0-9a-f]{32}, expected 0{32}"
        ):
            download_idx("mnist", dest, mirrors=(url,), checksums=checksums, timeout=10)
    assert not (dest / "train-images-idx3-ubyte.gz").exists()
    assert not list(dest.glob(".*part"))


def test_load_dataset_download_uses_published_mnist_checksums(tmp_path):
    # Through the config-level API: served files are not the real MNIST, so the published
    # checksums reject them.
    served = tmp_path / "served"
    _write_mnist_like(served)
    with _http_server(served) as url:
        with pytest.raises(DataError, match="checksum mismatch .* expected f68b3c2dcbeaaa9fbdd348bbdeb94873"):
            load_dataset("mnist", root=str(tmp_path / "mnist"), download=True, mirror=url)


def test_download_unreachable_server_fails_fast(tmp_path):
    with _http_server(tmp_path) as url:
        pass  # server stopped: the port now refuses connections
    with pytest.raises(DataError, match="could not download train-images-idx3-ubyte.gz"):
        download_idx("mnist", tmp_path / "cache", mirrors=(url,), timeout=5)
