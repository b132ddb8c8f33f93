"""Read back what wandb wrote to an offline run directory (``run-<id>.wandb``).

The file is a 7-byte header (``:W&B``, a 2-byte identifier, a version byte) followed by a
LevelDB-style log: 32 KiB blocks of records, each with a 7-byte header (CRC32, little-endian
length, type FULL/FIRST/MIDDLE/LAST) and a serialized ``wandb_internal_pb2.Record``. We parse
it with wandb's own protobuf classes; nothing about wandb is mocked.

``run.finish()`` can return before wandb's service has written the records: with wandb 0.31,
about one offline run in six still held only the 7-byte header right after ``finish()``,
and all of it 50 ms later. So the readers below wait, up to ``WAIT_S``, for the run's exit
record (the last one wandb writes) before they read.
"""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path

from wandb.proto import wandb_internal_pb2

_BLOCK = 32768
_HEADER = 7
WAIT_S = 30.0


def iter_records(path: Path):
    data = Path(path).read_bytes()
    if len(data) < _HEADER:
        return  # wandb has not written the file header yet
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    pos, pending = _HEADER, b""
    while pos + _HEADER <= len(data):
        left_in_block = _BLOCK - (pos % _BLOCK)
        if left_in_block < _HEADER:
            pos += left_in_block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + _HEADER])
        if pos + _HEADER + length > len(data):
            return  # a record wandb is still writing
        payload = data[pos + _HEADER : pos + _HEADER + length]
        pos += _HEADER + length
        if kind == 0 and length == 0:  # zero padding at a block's end
            pos += _BLOCK - (pos % _BLOCK) if pos % _BLOCK else 0
            continue
        if kind in (1, 4):  # FULL, LAST
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending + payload)
            pending = b""
            yield record
        else:  # FIRST, MIDDLE
            pending += payload


def offline_run_dir(root: Path) -> Path:
    runs = sorted(Path(root).glob("wandb/offline-run-*"))
    assert runs, f"no wandb/offline-run-* under {root}"
    return runs[-1]


def run_file(run_dir: Path) -> Path:
    """The run's ``.wandb`` file, once it holds the exit record (at most ``WAIT_S`` later)."""
    (wandb_file,) = Path(run_dir).glob("run-*.wandb")
    deadline = time.monotonic() + WAIT_S
    while not any(r.WhichOneof("record_type") == "exit" for r in iter_records(wandb_file)):
        assert time.monotonic() < deadline, f"no exit record after {WAIT_S} s: {describe(run_dir)}"
        time.sleep(0.05)
    return wandb_file


def history(run_dir: Path) -> list[dict]:
    """The rows logged with ``run.log`` (keys -> decoded JSON values)."""
    wandb_file = run_file(run_dir)
    rows = []
    for record in iter_records(wandb_file):
        if record.WhichOneof("record_type") == "history":
            row = {}
            for item in record.history.item:
                key = item.key or "/".join(item.nested_key)
                row[key] = json.loads(item.value_json)
            rows.append(row)
    return rows


def run_config(run_dir: Path) -> dict:
    wandb_file = run_file(run_dir)
    config: dict = {}
    for record in iter_records(wandb_file):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            for item in record.run.config.update:
                config[item.key] = json.loads(item.value_json)
        elif kind == "config":
            for item in record.config.update:
                config[item.key] = json.loads(item.value_json)
    return config


def run_record(run_dir: Path):
    """The ``RunRecord`` (group, job type, name ...) of an offline run."""
    wandb_file = run_file(run_dir)
    for record in iter_records(wandb_file):
        if record.WhichOneof("record_type") == "run":
            return record.run
    raise AssertionError(f"no run record in {wandb_file}")


def describe(run_dir: Path) -> str:
    """What the run file holds, for assertion messages: its size and record kinds."""
    (wandb_file,) = Path(run_dir).glob("run-*.wandb")
    kinds: dict[str, int] = {}
    for record in iter_records(wandb_file):
        kind = record.WhichOneof("record_type")
        kinds[kind] = kinds.get(kind, 0) + 1
    return f"{wandb_file.name}: {wandb_file.stat().st_size} bytes, records {kinds}"
