"""Which iterate a run keeps (``train.select``): the last one, the last feasible epoch (or, in
the last epoch, its last feasible step), or the feasible epoch of lowest validation error."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .checkpoint import SELECTED, load_checkpoint, save_checkpoint
from .state import RunState

__all__ = ["IterateSelection"]


def _state_copy(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


class IterateSelection:
    """``train.select`` through a run: the iterate kept so far (``selected``: ``{"epoch",
    "val_error"}`` and, for a step, ``"step"``; its weights in ``SELECTED``), and at the end,
    which one the model holds (:meth:`finish`)."""

    def __init__(self, run: RunState, selected: dict[str, Any] | None = None) -> None:
        self.run = run
        self.mode = run.cfg.train.select
        self.selected = selected
        # last_feasible, in the last epoch: (step, weights) of its last step that met every budget
        self._snapshot: tuple[int, dict[str, torch.Tensor]] | None = None
        self._track_steps = False
        self.selected_epoch: int | None = None
        self.selected_step: int | None = None
        self.last_iterate: dict[str, Any] | None = None

    def start_epoch(self, epoch: int) -> None:
        """last_feasible, last epoch: keep the weights of its last step that meets every budget,
        in case the epoch ends just over one (restarts make it hover at ε)."""
        run = self.run
        self._track_steps = bool(
            self.mode == "last_feasible" and run.problem.targets and epoch == run.cfg.train.epochs - 1
        )
        self._snapshot = None

    def after_step(self, step_in_epoch: int) -> None:
        if self._track_steps and self.run.problem.feasible():
            self._snapshot = (step_in_epoch + 1, _state_copy(self.run.model))

    def end_epoch(self, metrics: dict[str, Any]) -> None:
        """Keep this epoch's weights if ``train.select`` prefers them to the kept ones."""
        run = self.run
        if self.mode == "last" or not run.problem.targets:
            return
        path = run.out / SELECTED
        if not all(metrics[f"constraint/{t.name}/feasible"] for t in run.problem.targets):
            if self.mode == "last_feasible" and self._snapshot is not None:  # a feasible step of this (last) epoch
                step, state = self._snapshot
                if run.ctx.main:
                    save_checkpoint({"epoch": metrics["epoch"], "step": step, "model": state}, path)
                self.selected = {"epoch": metrics["epoch"], "step": step, "val_error": None}
            return
        val_error = metrics["val/error"]
        if self.mode == "best_feasible" and self.selected is not None and val_error >= self.selected["val_error"]:
            return
        if run.ctx.main:
            save_checkpoint({"epoch": metrics["epoch"], "model": run.model.state_dict()}, path)
        self.selected = {"epoch": metrics["epoch"], "val_error": val_error}

    def finish(self) -> None:
        """After the last epoch: swap in the selected iterate's weights, noting the last one's."""
        run = self.run
        self.selected_epoch = run.epoch if run.history else None
        self.last_iterate = None
        if self.mode == "last" or not run.problem.targets or not run.history:
            return
        last = run.history[-1]
        self.last_iterate = {
            "epoch": last["epoch"],
            "test_error": last["test/error"],
            "density": last.get("density/model"),
            "feasible": all(last[f"constraint/{t.name}/feasible"] for t in run.problem.targets),
        }
        if self.selected is None:  # no feasible iterate: keep the last one and say so
            self.selected_epoch = None
            return
        self.selected_epoch = self.selected["epoch"]
        self.selected_step = self.selected.get("step")
        if self.selected_epoch != run.epoch or self.selected_step is not None:
            run.ctx.barrier()  # rank 0 has written the file
            run.model.load_state_dict(load_checkpoint(run.out / SELECTED)["model"])
