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
from torch import nn

from ..errors import CheckpointError
from ..files import first_line, load_torch_file
from .loop import Position
from .state import RunState

__all__ = [
    "CHECKPOINT",
    "CHECKPOINT_VERSION",
    "FINISHED",
    "SELECTED",
    "load_checkpoint",
    "restore_run",
    "run_checkpoint",
    "save_checkpoint",
]

CHECKPOINT = "checkpoint.pt"
SELECTED = "selected_model.pt"
FINISHED = "finished_model.pt"  # the network after the finishing phase
# 3: LWC's masks are parametrizations (their state dict keys); 2: sparsity methods behind one
# interface (state dict keys "methods", "phase"); 1: before.
CHECKPOINT_VERSION = 3

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


def run_checkpoint(run: RunState, pos: Position, selected: dict[str, Any] | None) -> dict[str, Any]:
    """What ``checkpoint.pt`` holds at ``pos``: everything a resumed run needs to go on as if
    it had not stopped (model, multipliers, optimizers, methods, random states, position)."""
    return {
        "config": run.cfg.to_dict(),
        "model": run.model.state_dict(),
        "cmp": run.problem.state_dict(),
        "optimizer": dict(run.optimizers.cooper_optimizer.state_dict()),
        "methods": [m.state_dict() for m in run.methods],
        "rng_torch": torch.get_rng_state(),
        "epoch_data_rng": pos.data_state,
        "epoch_sums": pos.epoch_sums or {},
        "epoch": pos.epoch,
        "step_in_epoch": pos.step_in_epoch,
        "global_step": pos.global_step,
        "wandb_id": run.tracker.wandb_id or "",
        "selected": selected or {},
    }


def restore_run(
    checkpoint: dict[str, Any],
    path: Path,
    trainer: tuple[nn.Module, list[Any], Any, Any],
    data_gen: torch.Generator,
    steps_per_epoch: int,
) -> Position:
    """Load ``checkpoint`` (read from ``path``) into a run's objects -- ``trainer``: the model,
    methods, problem and optimizers of :func:`~constrained_sparsity.training.build_trainer` --
    and ``data_gen``; the position to go on from. Changes nothing outside those objects.

    Raises:
        CheckpointError: the checkpoint does not fit the run's config (one line).
    """
    model, methods, problem, optimizers = trainer
    try:
        model.load_state_dict(checkpoint["model"])
        problem.load_state_dict(checkpoint["cmp"])
        optimizers.cooper_optimizer.load_state_dict(checkpoint["optimizer"])
        if len(checkpoint["methods"]) != len(methods):
            raise ValueError(f"{len(checkpoint['methods'])} method states for {len(methods)} methods")
        for method, state in zip(methods, checkpoint["methods"]):
            method.load_state_dict(state)
        torch.set_rng_state(checkpoint["rng_torch"])
        data_gen.set_state(checkpoint["epoch_data_rng"])
        pos = Position(
            int(checkpoint["epoch"]),
            int(checkpoint["step_in_epoch"]),
            int(checkpoint["global_step"]),
            data_gen.get_state(),
            checkpoint.get("epoch_sums") or None,
        )
        # step_in_epoch == steps_per_epoch: stopped on an epoch's last step, before its end (its
        # log row, its checkpoint); the resumed loop plays no step and ends that epoch
        if not (
            pos.epoch >= 0
            and 0 <= pos.step_in_epoch <= steps_per_epoch
            and pos.global_step == pos.epoch * steps_per_epoch + pos.step_in_epoch
        ):
            raise ValueError(f"position epoch {pos.epoch}, step {pos.step_in_epoch}, {pos.global_step} in all")
        sums = pos.epoch_sums
        if sums is not None and not (
            isinstance(sums.get("loss"), torch.Tensor)
            and isinstance(sums.get("lagrangian"), torch.Tensor)
            and isinstance(sums.get("restarts"), dict)
            and sums.get("steps") == pos.step_in_epoch
        ):
            raise ValueError("the running sums of the epoch in progress are malformed")
    except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as exc:
        raise CheckpointError(f"{path}: does not fit the run's config ({first_line(exc)})") from None
    return pos
