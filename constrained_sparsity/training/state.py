"""What every part of a run shares: its config, objects, files and the counts so far."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import distributed
from ..config import Config
from ..data import Dataset
from ..methods import SparsityMethod, report_of
from ..problem import OptimizerSet, SparsityProblem
from ..tracking import Tracker

__all__ = ["RunState"]


@dataclass
class RunState:
    """One run's objects (built from ``cfg``), where it writes (``out``, ``tracker``), and what
    it has done: the log rows of the game (``history``), its epochs, the epoch count of the
    log (the game's, then the phases'), and what the phases after the game measured."""

    cfg: Config
    ctx: distributed.Context
    out: Path
    dataset: Dataset
    model: nn.Module
    methods: list[SparsityMethod]
    problem: SparsityProblem
    optimizers: OptimizerSet
    tracker: Tracker
    history: list[dict[str, Any]] = field(default_factory=list)
    epoch: int = 0
    logged_epochs: int = 0
    finish: dict[str, Any] | None = None  # what the finishing phase measured
    phases: dict[str, dict[str, Any]] = field(default_factory=dict)  # the methods' phases after training
    compaction: dict[str, Any] | None = None  # parameters and FLOPs before / after compaction
    distributed: dict[str, Any] | None = None  # more than one process: whether the ranks agree

    def error(self, model: nn.Module, split: str = "test") -> float:
        """Classification error of ``model`` on the test or validation split, each rank
        counting its part when there are several."""
        ds = self.dataset
        x, y = (ds.test_x, ds.test_y) if split == "test" else (ds.val_x, ds.val_y)
        return distributed.error_rate(model, x, y, self.cfg.data.eval_batch_size, self.ctx)

    @torch.no_grad()
    def measures(self) -> dict[str, Any]:
        """Every method's metrics, and per constraint its violation, strict violation,
        multiplier and feasibility (by the rule the training step uses)."""
        metrics: dict[str, Any] = {}
        for method in self.methods:
            metrics.update(report_of(method).metrics())
        multipliers = self.problem.multiplier_values()
        for name, (violation, strict) in self.problem.violations().items():
            prefix = f"constraint/{name}"
            metrics[f"{prefix}/violation"] = violation
            metrics[f"{prefix}/strict_violation"] = strict
            metrics[f"{prefix}/multiplier"] = multipliers[name]
            metrics[f"{prefix}/feasible"] = strict <= 0
        return metrics
