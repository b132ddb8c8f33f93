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
from ..files import load_torch_file

__all__ = ["CHECKPOINT", "CHECKPOINT_VERSION", "FINISHED", "SELECTED", "load_checkpoint", "save_checkpoint"]

CHECKPOINT = "checkpoint.pt"
SELECTED = "selected_model.pt"
FINISHED = "finished_model.pt"  # the network after the finishing phase
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


# What a checkpoint of a run (checkpoint.pt) holds; a selected iterate holds "epoch" and "model".
RUN_KEYS = (
    "config",
    "model",
    "cmp",
    "optimizer",
    "methods",
    "rng_torch",
    "epoch_data_rng",
    "epoch",
    "step_in_epoch",
    "global_step",
    "wandb_id",
    "selected",
)


def load_checkpoint(path: str | Path, keys: tuple[str, ...] = ("model",)) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` (tensors on the CPU, ``weights_only``).

    Raises:
        CheckpointError: the file cannot be read, is not a checkpoint of this tool, is of
            another format version, or lacks one of ``keys``.
    """
    state = load_torch_file(path, "checkpoint")
    if not isinstance(state, dict) or "version" not in state:
        raise CheckpointError(f"{path}: not a checkpoint of constrained_sparsity")
    version = state["version"]
    if version != CHECKPOINT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format version {version}, but this version of constrained_sparsity reads "
            f"version {CHECKPOINT_VERSION}; train the run again with this version"
        )
    missing = [k for k in keys if k not in state]
    if missing:
        raise CheckpointError(f"{path}: not a complete checkpoint (no {', '.join(missing)})")
    if "model" in keys and not (
        isinstance(state["model"], dict) and all(isinstance(v, torch.Tensor) for v in state["model"].values())
    ):
        raise CheckpointError(f"{path}: its model entry is not a state_dict of tensors")
    return state
