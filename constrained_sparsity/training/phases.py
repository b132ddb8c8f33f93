"""The phases after the game: the finishing phase (every budget met exactly, then fine-tuned
with the pattern fixed) and the methods' own phases (merge and refit, ...), each trained
through the game's epoch loop on the task loss alone."""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable
from typing import Any

import cooper
import torch

from .. import distributed
from ..evaluation import max_output_difference
from ..export import save_sequential
from ..graph import keep_zeros
from ..methods import HasPhase, Phase, PhaseContext, SparsityMethod, method_spec
from ..problem import OptimizerSet, SparsityProblem, scheduled_lr
from .checkpoint import CHECKPOINT, FINISHED, save_checkpoint
from .loop import Hooks, Plan, Position, play
from .state import RunState

__all__ = ["run_finish", "run_phases", "train_phase"]


def run_finish(run: RunState, stop: dict[str, int | None]) -> None:
    """Project every method onto its budgets (``problem.project_``), then fine-tune with the
    zero weights kept at zero; what it measured goes to ``run.finish``."""
    cfg = run.cfg
    enabled, epochs, lr = cfg.finishing(any(m.spec.finishes for m in run.methods))
    if not enabled or not run.problem.targets:
        return
    start = time.perf_counter()
    info: dict[str, Any] = {"test_error_before": run.error(run.model)}
    before = run.problem.violations()
    closed, unprojected = run.problem.project_()
    if unprojected:
        warnings.warn(
            f"finishing: the methods of {unprojected} cannot close units (no project_); "
            "those budgets stay as training left them",
            stacklevel=2,
        )
    info["test_error_closed"] = run.error(run.model)
    if epochs > 0:  # the weights that are exactly 0 stay 0: a method whose pattern is its zeros
        primal = cfg.optim.primal  # the training's kind of optimizer, from a fresh state
        train_phase(
            run,
            Phase("finish", run.model, epochs, lr, keep_zeros=True),
            cfg.train.seed + 3,
            stop,
            run.methods,
            cfg.finish.schedule,
            primal.name,
            primal.momentum,
        )
    after = run.problem.violations()
    info.update(
        {
            "closed": closed,
            "units_closed": sum(n for per_layer in closed.values() for n in per_layer.values()),
            "unprojected": unprojected,
            "strict_violation_before": {name: v[1] for name, v in before.items()},
            "strict_violation_after": {name: v[1] for name, v in after.items()},
            "epochs": epochs,
            "lr": lr,
            "test_error_after": run.error(run.model),
            "seconds": time.perf_counter() - start,
            "model_file": FINISHED,
        }
    )
    if run.dataset.val_x is not None:
        info["val_error_after"] = run.error(run.model, "val")
    if run.ctx.main:
        save_checkpoint({"epoch": run.epoch, "model": run.model.state_dict()}, run.out / FINISHED)
    run.finish = info


def run_phases(run: RunState, stop: dict[str, int | None]) -> None:
    """The phases the methods ask for after training (:meth:`HasPhase.after_training`)."""
    cfg, ds = run.cfg, run.dataset
    for method in run.methods:
        if not isinstance(method, HasPhase):
            continue
        context = PhaseContext(
            primal_lr=cfg.optim.primal.lr,
            others=len(run.methods) > 1,
            error=run.error,
            max_output_difference=lambda a, b: max_output_difference(a, b, ds.test_x, cfg.data.eval_batch_size),
        )
        phase = method.after_training(run.model, context)
        if phase is None:
            continue
        info = {"method": method_spec(method), **phase.info}
        for filename, network in phase.files.items():
            if run.ctx.main:
                save_sequential(network, run.out / filename)
        if phase.epochs > 0:
            train_phase(run, phase, seed=cfg.train.seed + 2 + len(run.phases), stop=stop)
            info[f"test_error_{phase.name}"] = run.error(phase.model)
            if run.ctx.main:
                save_sequential(phase.model, run.out / f"{phase.name}_model.pt")
            info["model_file"] = f"{phase.name}_model.pt"
        run.phases[phase.name] = info


def train_phase(
    run: RunState,
    phase: Phase,
    seed: int,
    stop: dict[str, int | None],
    methods: list[SparsityMethod] | None = None,
    schedule: str = "constant",
    optimizer: str = "adam",
    momentum: float = 0.0,
) -> None:
    """Train ``phase.model`` on the task loss alone, through the same loop as the game,
    with Adam or SGD (``optimizer``, ``momentum``) from a fresh state at ``phase.lr``.

    ``methods`` (their ``after_step`` runs after each step) are the model's own, frozen,
    in the finishing phase; the parameters that do not require gradients stay as they are.
    With ``phase.keep_zeros``, the weights that are 0 now are set back to 0 after each step.
    """
    cfg, ds = run.cfg, run.dataset
    model = phase.model
    after_step = keep_zeros(model) if phase.keep_zeros else None
    problem = SparsityProblem(model, methods)
    problem.forward_module = distributed.wrap(model, run.ctx) if run.ctx.active else None
    trained = [p for p in model.parameters() if p.requires_grad]
    if optimizer == "sgd":
        step: torch.optim.Optimizer = torch.optim.SGD(trained, lr=phase.lr, momentum=momentum)
    else:
        step = torch.optim.Adam(trained, lr=phase.lr)
    optimizers = OptimizerSet(cooper.optim.UnconstrainedOptimizer(problem, step), None, "alternating")
    hooks = _PhaseHooks(run, phase, run.logged_epochs, schedule, after_step)
    run.logged_epochs += phase.epochs  # phase rows continue the run's epoch count
    generator = torch.Generator().manual_seed(seed)
    plan = Plan(
        name=f"{cfg.name} {phase.name}",
        phase=phase.name,
        problem=problem,
        optimizers=optimizers,
        x=ds.train_x,
        y=ds.train_y,
        batch_size=cfg.data.batch_size,
        generator=generator,
        epochs=phase.epochs,
        tracker=run.tracker,
        hooks=hooks,
        dual_restarts=False,
        progress=cfg.tracking.progress,
        dist=run.ctx,
    )
    try:
        play(plan, Position(0, 0, 0, generator.get_state()), stop)
    finally:
        problem.forward_module = None


class _PhaseHooks(Hooks):
    """A phase after the game: its rows continue the run's epoch count (``first``), its
    learning rate follows ``schedule``, ``after_step`` (if any) runs after each step."""

    def __init__(
        self,
        run: RunState,
        phase: Phase,
        first: int,
        schedule: str,
        after_step: Callable[[Position], None] | None,
    ) -> None:
        self.run, self.phase, self.first, self.schedule = run, phase, first, schedule
        self.total = phase.epochs * math.ceil(len(run.dataset.train_y) / run.cfg.data.batch_size)
        self._after_step = after_step

    def lr(self, step: int) -> float | None:
        return None if self.schedule == "constant" else scheduled_lr(self.phase.lr, step, self.total, self.schedule)

    def after_step(self, pos: Position) -> None:
        if self._after_step is not None:
            self._after_step(pos)

    def metrics(self, epoch: int, loss: float, lagrangian: float, restarts: dict[str, int], seconds: float) -> dict:
        name = self.phase.name
        return {
            "epoch": self.first + epoch,
            f"{name}/epoch": epoch,
            f"{name}/train_loss": loss,
            f"{name}/test_error": self.run.error(self.phase.model),
            "time/epoch_s": seconds,
        }

    def on_stop(self, pos: Position, sig: str) -> str:
        return (
            f"{sig}: stopped in epoch {pos.epoch + 1} of the {self.phase.name} phase after training; the trained "
            f"network's checkpoint is kept. Run the phase again with: csparse train --resume {self.run.out}"
        )

    def diverged(self, pos: Position) -> str:
        return f"{self.run.out / CHECKPOINT} (the trained network; the {self.phase.name} phase diverged)"
