"""Checkpoints: state_dicts only, written atomically, loaded with ``weights_only=True``.

Every file carries ``version``; a file of another version is refused with one line
(:class:`~constrained_sparsity.errors.CheckpointError`, exit code 2 at the command line).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from cooper.optim import nuPIInitType

from ..errors import CheckpointError

__all__ = ["CHECKPOINT", "CHECKPOINT_VERSION", "SELECTED", "load_checkpoint", "save_checkpoint"]

CHECKPOINT = "checkpoint.pt"
SELECTED = "selected_model.pt"
# 2: sparsity methods behind one interface (state dict keys "methods", "phase"); 1: before.
CHECKPOINT_VERSION = 2

# nuPI keeps its init type (an Enum) in its param groups; allow it through weights_only.
torch.serialization.add_safe_globals([nuPIInitType])


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    """Write ``state`` (with ``version`` added) to ``path`` atomically: a crash leaves the previous file intact."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save({**state, "version": CHECKPOINT_VERSION}, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` (tensors on the CPU).

    Raises:
        CheckpointError: the file is of another format version.
    """
    state = torch.load(path, map_location="cpu", weights_only=True)
    version = state.get("version") if isinstance(state, dict) else None
    if version != CHECKPOINT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format version {version}, but this version of constrained_sparsity reads "
            f"version {CHECKPOINT_VERSION}; train the run again with this version"
        )
    return state
