"""The run directory: made atomically inside its output directory, never reused by accident,
its log cut back to the checkpoint on resume (with a copy of what was cut)."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..files import read_jsonl

__all__ = ["RUN_FILES", "cut_log", "is_phase_row", "is_run_dir", "new_run_dir", "prepare_run_dir"]

# A directory holding one of these is a run directory (written by `csparse train`).
RUN_FILES = ("config.yaml", "checkpoint.pt", "metrics.jsonl")
METRICS = "metrics.jsonl"


def is_run_dir(path: Path) -> bool:
    return any((path / name).exists() for name in RUN_FILES)


def _reason(exc: OSError) -> str:
    return exc.strerror or str(exc)


def new_run_dir(out_dir: str | Path, name: str) -> Path:
    """A new directory ``out_dir/<name>-<time>`` (a suffix ``-2``, ``-3``... when taken).

    Created with one ``mkdir`` that fails if the directory exists, so two processes starting
    in the same second each get their own.
    """
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise ConfigError(f"tracking.out_dir={str(out_dir)!r}: not a directory") from None
    except OSError as exc:
        raise ConfigError(f"tracking.out_dir={str(out_dir)!r}: cannot create it ({_reason(exc)})") from None
    if not out.is_dir():
        raise ConfigError(f"tracking.out_dir={str(out_dir)!r}: not a directory")
    base = f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    for i in range(1, 10_000):
        path = out / (base if i == 1 else f"{base}-{i}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
        except OSError as exc:
            raise ConfigError(
                f"tracking.out_dir={str(out_dir)!r}: cannot create a run directory there ({_reason(exc)})"
            ) from None
    raise ConfigError(f"tracking.out_dir={str(out_dir)!r}: no free name for {base}")


def prepare_run_dir(
    path: str | Path,
    overwrite: bool = False,
    markers: tuple[str, ...] = RUN_FILES,
    option: str = "--run-dir",
    what: str = "a run",
    hint: str = "continue it with --resume {path}, or start it over with --overwrite",
) -> Path:
    """The directory a user named for a new run: created, or empty, or (``overwrite``) one
    that holds a run (one of ``markers``) whose contents are removed. A non-empty directory
    is refused otherwise: this tool never deletes what it did not write."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{option} {path}: not a directory")
    if path.is_dir() and any(path.iterdir()):
        if not any((path / name).exists() for name in markers):
            raise ConfigError(f"{option} {path}: not empty and does not hold {what}; choose an empty or new directory")
        if not overwrite:
            raise ConfigError(f"{option} {path}: already holds {what}; " + hint.format(path=path))
        for child in path.iterdir():
            try:
                shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
            except OSError as exc:
                raise ConfigError(f"{option} {path}: cannot remove {child.name} ({_reason(exc)})") from None
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"{option} {path}: cannot write there ({_reason(exc)})") from None
    return path


def is_phase_row(row: dict[str, Any]) -> bool:
    """Rows a phase after training logged (``<phase>/epoch``), not the main game's."""
    return any(key.endswith("/epoch") for key in row)


def cut_log(run_dir: Path, epoch: int) -> tuple[list[dict[str, Any]], Path | None]:
    """Cut ``metrics.jsonl`` back to the first ``epoch`` rows of the game, for a resume.

    Rows after them -- an epoch logged after the last checkpoint was written, rows of a
    phase after training that will run again, a line cut short by a kill -- are moved to
    ``metrics.jsonl.cut-<n>`` (the copy is kept). Returns the rows kept and the copy's path
    (``None`` when nothing was cut).
    """
    path = run_dir / METRICS
    if not path.is_file():
        return [], None
    rows, _, total = read_jsonl(path)
    keep = 0
    for row in rows:
        if is_phase_row(row) or not isinstance(row.get("epoch"), int) or row["epoch"] > epoch:
            break
        keep += 1
    data = path.read_bytes()
    end = sum(len(line) for line in data.splitlines(keepends=True)[:keep])
    if end == total:
        return rows[:keep], None
    n = 1
    while (run_dir / f"{METRICS}.cut-{n}").exists():
        n += 1
    copy = run_dir / f"{METRICS}.cut-{n}"
    copy.write_bytes(data[end:])
    tmp = run_dir / f".{METRICS}.tmp"
    tmp.write_bytes(data[:end])
    os.replace(tmp, path)
    return rows[:keep], copy
