"""What a run measured: :class:`RunResult` (``summary.json``) and the W&B summary."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..methods import method_spec, report_of
from .selection import IterateSelection
from .state import RunState

__all__ = ["RunResult", "build_result", "wandb_summary"]


@dataclass
class RunResult:
    """What a finished run measured (also written to ``summary.json`` in the run directory).

    ``measures`` are the metrics of the returned network's sparsity (each method's
    ``metrics()`` and the constraints); ``density`` / ``expected_density`` repeat its
    ``density/*`` / ``density_expected/*`` entries. ``layers`` holds every method's rows per
    layer (each with ``method``), ``targets`` one entry per budget, ``phases`` what each
    phase after training measured.
    """

    run_dir: Path
    epochs: int
    test_error: float
    val_error: float | None
    feasible: bool | None
    density: dict[str, float]
    expected_density: dict[str, float]
    targets: list[dict[str, Any]]
    multipliers: dict[str, float]
    wall_time_s: float
    history: list[dict[str, Any]] = field(default_factory=list)
    layers: list[dict[str, Any]] = field(default_factory=list)
    wandb_dir: str | None = None
    # Iterate selection (train.select): the epoch whose weights this result describes, and
    # what the last iterate measured when another one was selected.
    selected_epoch: int | None = None
    # ... and, when last_feasible kept a step of the last epoch (not its end), that step.
    selected_step: int | None = None
    last_iterate: dict[str, Any] | None = None
    # Phases after training (merge and refit, ...): name -> what the phase measured.
    phases: dict[str, dict[str, Any]] = field(default_factory=dict)
    # The finishing phase: what it closed, the test error before and after (None: not run).
    finish: dict[str, Any] | None = None
    # Parameters and FLOPs per example before and after compaction (csparse compact).
    compaction: dict[str, Any] | None = None
    methods: list[str] = field(default_factory=list)
    measures: dict[str, Any] = field(default_factory=dict)
    # More than one process: world size, backend, global and per-rank batch, whether the
    # ranks' final states (model, multipliers, dual optimizer) agree (None: one process).
    distributed: dict[str, Any] | None = None
    # "complete": every epoch and phase ran; "interrupted": SIGINT / SIGTERM (resumable from
    # the checkpoint); "failed": an error stopped it. The summary of a stopped run describes
    # the network at the stop.
    status: str = "complete"

    def summary(self) -> dict[str, Any]:
        return {
            "run_dir": str(self.run_dir),
            "status": self.status,
            "epochs": self.epochs,
            "test_error": self.test_error,
            "val_error": self.val_error,
            "feasible": self.feasible,
            "methods": self.methods,
            "density": self.density,
            "expected_density": self.expected_density,
            "measures": self.measures,
            "targets": self.targets,
            "multipliers": self.multipliers,
            "layers": self.layers,
            "wall_time_s": self.wall_time_s,
            "wandb_dir": self.wandb_dir,
            "selected_epoch": self.selected_epoch,
            "selected_step": self.selected_step,
            "last_iterate": self.last_iterate,
            "finish": self.finish,
            "phases": self.phases,
            "compaction": self.compaction,
            "distributed": self.distributed,
        }


def wandb_summary(result: RunResult) -> dict[str, Any]:
    summary: dict[str, Any] = {"final/test_error": result.test_error, "final/epochs": result.epochs}
    if result.feasible is not None:
        summary["final/feasible"] = result.feasible
    if result.selected_epoch is not None:
        summary["final/selected_epoch"] = result.selected_epoch
        if result.selected_step is not None:
            summary["final/selected_step"] = result.selected_step
    for phase, info in [("finish", result.finish or {}), *result.phases.items()]:
        for key, value in info.items():
            if isinstance(value, (int, float)):
                summary[f"final/{phase}/{key}"] = value
    for key, value in (result.compaction or {}).items():
        summary[f"final/{key}"] = value
    for key, value in result.density.items():
        summary[f"final/density/{key}"] = value
    counted = [r for r in result.layers if "params" in r and "active_params" in r]
    if counted:
        summary["final/params_gated"] = sum(r["params"] for r in counted)
        summary["final/params_active"] = sum(r["active_params"] for r in counted)
    return summary


def build_result(run: RunState, selection: IterateSelection, wall: float) -> RunResult:
    """What ``run`` measured, describing the network its model holds now."""
    selected_epoch = selection.selected_epoch
    selected_step = selection.selected_step
    last = run.history[-1] if run.history else {}
    epoch = run.epoch
    if selected_epoch is not None:  # the row of the iterate whose weights the model holds
        last = next((row for row in run.history if row["epoch"] == selected_epoch), last)
        epoch = selected_epoch
    measures = run.measures()
    ds = run.dataset
    test_error = last.get("test/error") if last.get("epoch") == epoch and selected_step is None else None
    val_error = last.get("val/error") if ds.val_x is not None else None
    if run.finish is not None:  # the finished network: measured after its fine-tuning
        test_error = run.finish["test_error_after"]
        val_error = run.finish.get("val_error_after")
    if test_error is None:  # an iterate no epoch row describes: measure it
        test_error = run.error(run.model)
        if ds.val_x is not None:
            val_error = run.error(run.model, "val")
    targets = []
    for target, _ in run.problem.ordered_constraints():
        method = target.method
        with torch.no_grad():
            surrogate_t, exact_t = method.measure(target)
        exact = float(exact_t)
        surrogate = None if surrogate_t is None else float(surrogate_t)
        decides = exact if target.measure == "exact" or surrogate is None else surrogate
        targets.append(
            {
                "name": target.name,
                "method": method_spec(method),
                "layers": list(target.layers) if target.layers else "model",
                "budget": target.epsilon,
                "measure": target.measure,
                "value": decides,
                "exact": exact,
                "surrogate": surrogate,
                "metric": report_of(method).measure_key(target),
                "feasible": measures[f"constraint/{target.name}/feasible"],
                "multiplier": measures[f"constraint/{target.name}/multiplier"],
                **report_of(method).describe(target, surrogate, exact),
            }
        )
    layers = [{"method": method_spec(m), **row} for m in run.methods for row in report_of(m).rows()]
    density = {k.split("/", 1)[1]: v for k, v in measures.items() if k.startswith("density/")}
    expected = {k.split("/", 1)[1]: v for k, v in measures.items() if k.startswith("density_expected/")}
    return RunResult(
        run_dir=run.out,
        epochs=run.epoch,
        test_error=float(test_error),
        val_error=val_error,
        feasible=all(t["feasible"] for t in targets) if targets else None,
        density=density,
        expected_density=expected,
        targets=targets,
        multipliers=run.problem.multiplier_values(),
        wall_time_s=wall,
        history=list(run.history),
        layers=layers,
        wandb_dir=run.tracker.wandb_dir,
        selected_epoch=selected_epoch if run.cfg.train.select != "last" else None,
        selected_step=selected_step,
        last_iterate=selection.last_iterate,
        phases=dict(run.phases),
        finish=run.finish,
        compaction=run.compaction,
        methods=[method_spec(m) for m in run.methods],
        measures=measures,
        distributed=run.distributed,
    )
