"""The training entry point: it owns data, logging, checkpoints and the console.

``run(config)`` builds everything from a :class:`~constrained_sparsity.config.Config`, plays
the game epoch by epoch, evaluates, logs (JSONL + W&B), checkpoints atomically after every
epoch, runs the phases the methods ask for after training (through the same loop), and
returns a :class:`RunResult`. ``run(resume=RUN_DIR)`` continues a run.
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cooper
import torch
import yaml
from torch import nn

from .. import distributed
from ..compact import compact, size_summary
from ..config import Config, apply_overrides, config_from_dict, read_config_dict
from ..data import Dataset
from ..errors import CheckpointError, ConfigError, TrainingInterrupted
from ..evaluation import max_output_difference
from ..export import save_sequential
from ..files import first_line
from ..graph import bake, keep_zeros
from ..methods import Phase, PhaseContext, SparsityMethod, method_spec
from ..problem import OptimizerSet, SparsityProblem, scheduled_lr
from ..tracking import NullTracker, Tracker
from .build import build_trainer, dataset_for
from .checkpoint import CHECKPOINT, FINISHED, RUN_KEYS, SELECTED, load_checkpoint, save_checkpoint
from .loop import Plan, Position, play, stop_on_signals
from .plots import write_dynamics
from .rundir import cut_log, new_run_dir, prepare_run_dir

__all__ = ["RunResult", "check_device", "run"]

# Keys that may change when a run is resumed; anything else would change the experiment.
RESUMABLE_KEYS = ("train.epochs", "tracking.", "finish.")


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


def _resume_config(run_dir: Path, overrides: list[str]) -> Config:
    for text in overrides:
        key = text.split("=", 1)[0]
        if not any(key == k or (k.endswith(".") and key.startswith(k)) for k in RESUMABLE_KEYS):
            raise ConfigError(
                f"override {key!r} cannot change on --resume; only train.epochs, tracking.* and finish.* can"
            )
    data = read_config_dict(run_dir / "config.yaml")
    return config_from_dict(apply_overrides(data, overrides))


def _state_copy(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# -- the run ---------------------------------------------------------------------------------
def run(
    config: Config | None = None,
    resume: str | Path | None = None,
    overrides: list[str] | None = None,
    run_dir: str | Path | None = None,
    overwrite: bool = False,
) -> RunResult:
    """Train a sparse network as the config declares, or resume the run in ``resume``.

    A new run goes into ``run_dir`` (created; refused when it already holds a run, unless
    ``overwrite``) or a new directory ``tracking.out_dir/<name>-<time>``. On resume, the log
    is cut back to the checkpoint (what is cut is kept in ``metrics.jsonl.cut-<n>``).

    Raises:
        ConfigError / DataError / CheckpointError: bad input (nothing is trained, no file is
            changed).
        TrainingDiverged: the loss became NaN or infinite (the last checkpoint is kept).
        TrainingInterrupted: SIGINT / SIGTERM; a checkpoint of the current step was written.
    """
    start = time.perf_counter()
    checkpoint = None
    if resume is not None:
        out = Path(resume)
        if not (out / CHECKPOINT).is_file():
            raise ConfigError(f"--resume {out}: no {CHECKPOINT} there")
        cfg = _resume_config(out, list(overrides or []))
        checkpoint = load_checkpoint(out / CHECKPOINT, RUN_KEYS)
    else:
        if config is None:
            raise ValueError("run() needs a config or resume=RUN_DIR")
        cfg = config_from_dict(apply_overrides(config.to_dict(), list(overrides or []))) if overrides else config

    device = check_device(cfg.train.device)
    ctx, device = distributed.from_environment(device)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    if cfg.train.flush_denormal:
        torch.set_flush_denormal(True)  # returns False where the CPU cannot; harmless then
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True)
    torch.manual_seed(cfg.train.seed)

    loaded: dict[str, Dataset] = {}  # rank 0 loads (downloads) first, then the others read its files
    ctx.on_main(lambda: loaded.setdefault("data", dataset_for(cfg)) and None)
    dataset = (loaded.get("data") or dataset_for(cfg)).to(device)
    model, methods, problem, optimizers = build_trainer(cfg, dataset, device)
    data_gen = torch.Generator().manual_seed(cfg.train.seed + 1)
    pos = Position(0, 0, 0, data_gen.get_state())
    wandb_id = None
    history: list[dict[str, Any]] = []
    selected = None
    if checkpoint is not None:
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
            steps_per_epoch = math.ceil(len(dataset.train_y) / cfg.data.batch_size)
            if not (
                pos.epoch >= 0
                and 0 <= pos.step_in_epoch < steps_per_epoch
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
            raise CheckpointError(f"{out / CHECKPOINT}: does not fit the run's config ({first_line(exc)})") from None
        wandb_id = checkpoint.get("wandb_id") or None
        selected = checkpoint.get("selected") or None
        # everything validated: only now change the run directory
        history = ctx.on_main(lambda: cut_log(out, pos.epoch)[0])
    else:  # everything validated: only now create the run directory

        def create() -> Path:
            made = (
                prepare_run_dir(run_dir, overwrite)
                if run_dir is not None
                else new_run_dir(cfg.tracking.out_dir, cfg.tracking.run_name or cfg.name)
            )
            write_text_atomic(made / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
            return made

        out = ctx.on_main(create)

    problem.forward_module = distributed.wrap(model, ctx) if ctx.active else None
    tracker_cls = Tracker if ctx.main else NullTracker  # rank 0 alone logs
    tracker = tracker_cls(
        out,
        cfg.to_dict(),
        wandb_mode=cfg.tracking.wandb,
        project=cfg.tracking.project,
        entity=cfg.tracking.entity,
        group=cfg.tracking.group,
        job_type=cfg.tracking.job_type or cfg.sparsity.mode,
        name=cfg.tracking.run_name or out.name,
        run_id=wandb_id,
    )
    state = _Run(cfg, out, dataset, model, methods, problem, optimizers, data_gen, tracker, history, ctx)
    state.selected = selected
    exit_code = 1
    status = "failed"
    try:
        with stop_on_signals() as stop:
            state.train(pos, stop)
            problem.forward_module = None  # the phases after training wrap their own networks
            exit_code = 0
            state.finish_selection()
            state.run_finish(stop)
            state.run_phases(stop)
        state.compaction = state.compaction_counts()
        state.check_ranks()
        status = "complete"
    except TrainingInterrupted:
        exit_code = 0  # a clean stop: the run can be resumed
        status = "interrupted"
        raise
    finally:
        problem.forward_module = None
        result = state.result(time.perf_counter() - start)
        result.status = status
        tracker.summary(_wandb_summary(result))
        tracker.finish(exit_code=exit_code)
        if ctx.main:
            write_text_atomic(out / "summary.json", json.dumps(result.summary(), indent=2))
            _plot_dynamics(result)
    return result


def _plot_dynamics(result: RunResult) -> None:
    """``dynamics.png`` in the run directory (a failure to draw is a warning, never an error)."""
    try:
        write_dynamics(result)
    except Exception as exc:  # noqa: BLE001 - a plot must not fail a trained run
        warnings.warn(f"could not draw {result.run_dir}/dynamics.png ({type(exc).__name__}: {exc})", stacklevel=2)


def check_device(name: str) -> torch.device:
    """``train.device`` as a device this machine has (:class:`ConfigError` otherwise)."""
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ConfigError(f"train.device={name!r}: not a device name (cpu, cuda, cuda:1, mps, ...)") from None
    available = {
        "cpu": lambda: True,
        "cuda": lambda: torch.cuda.is_available() and (device.index or 0) < torch.cuda.device_count(),
        "mps": lambda: torch.backends.mps.is_available(),
    }
    if not available.get(device.type, lambda: False)():
        raise ConfigError(f"train.device={name!r}: this machine has no such device")
    return device


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file, so a kill leaves the old or the new."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _wandb_summary(result: RunResult) -> dict[str, Any]:
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


class _Run:
    """The state of one run and what its phases do at each point (kept out of :func:`run`)."""

    def __init__(self, cfg, out, dataset, model, methods, problem, optimizers, data_gen, tracker, history, ctx):  # type: ignore[no-untyped-def]
        self.cfg: Config = cfg
        self.ctx: distributed.Context = ctx
        # More than one process: what the end-of-run check of the ranks' states found.
        self.distributed: dict[str, Any] | None = None
        self.out: Path = out
        self.dataset: Dataset = dataset
        self.model: nn.Module = model
        self.methods: list[SparsityMethod] = methods
        self.problem: SparsityProblem = problem
        self.optimizers = optimizers
        self.data_gen: torch.Generator = data_gen
        self.tracker: Tracker = tracker
        self.history: list[dict[str, Any]] = history
        self.epoch = 0
        # The iterate kept by train.select: {"epoch", "val_error"}; its weights are in SELECTED.
        self.selected: dict[str, Any] | None = None
        # last_feasible, in the last epoch: (step, weights) of its last step that met every budget
        self._step_snapshot: tuple[int, dict[str, torch.Tensor]] | None = None
        self._track_steps = False
        self.selected_epoch: int | None = None
        self.selected_step: int | None = None
        self.last_iterate: dict[str, Any] | None = None
        self.phases: dict[str, dict[str, Any]] = {}
        self.finish: dict[str, Any] | None = None
        self.compaction: dict[str, Any] | None = None
        self.logged_epochs = 0  # the epoch count of the log: the game's epochs, then the phases'

    def _error(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> float:
        """Classification error, each rank counting its part when there are several."""
        return distributed.error_rate(model, x, y, batch_size, self.ctx)

    def check_ranks(self) -> None:
        """More than one process: gather the ranks' final states and record whether they agree."""
        ctx = self.ctx
        if not ctx.active:
            return
        device = self.dataset.train_x.device
        difference = distributed.check_agreement(ctx, distributed.state_tensors(self.model, self.optimizers), device)
        self.distributed = {
            "world_size": ctx.world,
            "backend": torch.distributed.get_backend(),
            "global_batch_size": self.cfg.data.batch_size,
            "batch_size_per_rank": math.ceil(self.cfg.data.batch_size / ctx.world),
            "ranks_agree": difference == 0.0,
            "max_difference": difference,
        }
        if difference != 0.0:
            warnings.warn(
                f"the {ctx.world} ranks' final states differ by up to {difference:g}; rank 0's is saved",
                stacklevel=2,
            )

    # -- checkpoints --
    def _save(self, pos: Position) -> None:
        if not self.ctx.main:
            return
        save_checkpoint(
            {
                "config": self.cfg.to_dict(),
                "model": self.model.state_dict(),
                "cmp": self.problem.state_dict(),
                "optimizer": dict(self.optimizers.cooper_optimizer.state_dict()),
                "methods": [m.state_dict() for m in self.methods],
                "rng_torch": torch.get_rng_state(),
                "epoch_data_rng": pos.data_state,
                "epoch_sums": pos.epoch_sums or {},
                "epoch": pos.epoch,
                "step_in_epoch": pos.step_in_epoch,
                "global_step": pos.global_step,
                "wandb_id": self.tracker.wandb_id or "",
                "selected": self.selected or {},
            },
            self.out / CHECKPOINT,
        )

    # -- the main phase: the game --
    def train(self, pos: Position, stop: dict[str, int | None]) -> None:
        cfg = self.cfg
        primal = cfg.optim.primal
        steps_per_epoch = math.ceil(len(self.dataset.train_y) / cfg.data.batch_size)
        total_steps = cfg.train.epochs * steps_per_epoch
        self.epoch = self.logged_epochs = pos.epoch

        def lr(step: int) -> float:  # the weights' group; the methods' own parameters keep gate_lr
            return scheduled_lr(primal.lr, step, total_steps, primal.schedule, primal.final_lr_factor)

        dual = cfg.optim.dual
        warmup_steps = dual.warmup_epochs * steps_per_epoch

        def dual_lr(step: int) -> float:  # a linear warm-up of the multipliers' steps
            return dual.lr * min(1.0, (step + 1) / warmup_steps)

        def start_epoch(p: Position) -> None:
            # last_feasible, last epoch: keep the weights of its last step that meets every
            # budget, in case the epoch ends just over one (restarts make it hover at ε)
            self._track_steps = bool(
                cfg.train.select == "last_feasible" and self.problem.targets and p.epoch == cfg.train.epochs - 1
            )
            self._step_snapshot = None

        def after_step(p: Position) -> None:
            if self._track_steps and self.problem.feasible():
                self._step_snapshot = (p.step_in_epoch + 1, _state_copy(self.model))

        def end_epoch(metrics: dict[str, Any], p: Position) -> None:
            self.epoch = self.logged_epochs = p.epoch
            self.history.append(metrics)
            self._maybe_select(metrics)
            self._save(p)

        def on_stop(p: Position, sig: str) -> str:
            self._save(p)
            return (
                f"{sig}: stopped at epoch {p.epoch + 1}, step {p.step_in_epoch}; checkpoint written. "
                f"Continue with: csparse train --resume {self.out}"
            )

        def diverged(p: Position) -> str:
            return f"{self.out / CHECKPOINT} (epoch {p.epoch})" if (self.out / CHECKPOINT).exists() else "none"

        plan = Plan(
            name=cfg.name,
            problem=self.problem,
            optimizers=self.optimizers,
            x=self.dataset.train_x,
            y=self.dataset.train_y,
            batch_size=cfg.data.batch_size,
            generator=self.data_gen,
            epochs=cfg.train.epochs,
            tracker=self.tracker,
            metrics=self._epoch_metrics,
            end_epoch=end_epoch,
            on_stop=on_stop,
            diverged=diverged,
            lr=lr if primal.schedule != "constant" else None,
            dual_lr=dual_lr if warmup_steps > 0 and self.optimizers.dual_optimizer is not None else None,
            dual_restarts=cfg.sparsity.dual_restarts,
            start_epoch=start_epoch,
            after_step=after_step,
            postfix=self._postfix,
            progress=cfg.tracking.progress,
            dist=self.ctx,
        )
        play(plan, pos, stop)

    def _maybe_select(self, metrics: dict[str, Any]) -> None:
        """Keep this epoch's weights if train.select prefers them to the kept ones."""
        mode = self.cfg.train.select
        if mode == "last" or not self.problem.targets:
            return
        names = [t.name for t in self.problem.targets]
        if not all(metrics[f"constraint/{n}/feasible"] for n in names):
            snapshot = self._step_snapshot
            if mode == "last_feasible" and snapshot is not None:  # a feasible step of this (last) epoch
                step, state = snapshot
                if self.ctx.main:
                    save_checkpoint({"epoch": metrics["epoch"], "step": step, "model": state}, self.out / SELECTED)
                self.selected = {"epoch": metrics["epoch"], "step": step, "val_error": None}
            return
        val_error = metrics["val/error"]
        if mode == "best_feasible" and self.selected is not None and val_error >= self.selected["val_error"]:
            return
        if self.ctx.main:
            save_checkpoint({"epoch": metrics["epoch"], "model": self.model.state_dict()}, self.out / SELECTED)
        self.selected = {"epoch": metrics["epoch"], "val_error": val_error}

    def finish_selection(self) -> None:
        """After the last epoch: swap in the selected iterate's weights, noting the last one's."""
        self.selected_epoch = self.epoch if self.history else None
        self.last_iterate = None
        if self.cfg.train.select == "last" or not self.problem.targets or not self.history:
            return
        last = self.history[-1]
        self.last_iterate = {
            "epoch": last["epoch"],
            "test_error": last["test/error"],
            "density": last.get("density/model"),
            "feasible": all(last[f"constraint/{t.name}/feasible"] for t in self.problem.targets),
        }
        if self.selected is None:  # no feasible iterate: keep the last one and say so
            self.selected_epoch = None
            return
        self.selected_epoch = self.selected["epoch"]
        self.selected_step = self.selected.get("step")
        if self.selected_epoch != self.epoch or self.selected_step is not None:
            self.ctx.barrier()  # rank 0 has written the file
            self.model.load_state_dict(load_checkpoint(self.out / SELECTED)["model"])

    def _epoch_metrics(
        self, epoch: int, loss: float, lagrangian: float, restarts: dict[str, int], seconds: float
    ) -> dict[str, Any]:
        ds = self.dataset
        bs = self.cfg.data.eval_batch_size
        metrics: dict[str, Any] = {"epoch": epoch, "train/loss": loss, "train/lagrangian": lagrangian}
        test_error = self._error(self.model, ds.test_x, ds.test_y, bs)
        if ds.val_x is not None:
            metrics["val/error"] = self._error(self.model, ds.val_x, ds.val_y, bs)
        else:
            metrics["val/error"] = test_error  # no validation split: the test set stands in
        metrics["test/error"] = test_error
        metrics.update(self._measures())
        for name, count in restarts.items():
            metrics[f"constraint/{name}/restarts"] = count
        metrics["time/epoch_s"] = seconds
        return metrics

    @torch.no_grad()
    def _measures(self) -> dict[str, Any]:
        metrics: dict[str, Any] = {}
        for method in self.methods:
            metrics.update(method.metrics())
        # violation, strict violation and feasibility by the rule the training step uses
        multipliers = self.problem.multiplier_values()
        for name, (violation, strict) in self.problem.violations().items():
            prefix = f"constraint/{name}"
            metrics[f"{prefix}/violation"] = violation
            metrics[f"{prefix}/strict_violation"] = strict
            metrics[f"{prefix}/multiplier"] = multipliers[name]
            metrics[f"{prefix}/feasible"] = strict <= 0
        return metrics

    def _postfix(self, m: dict[str, Any]) -> dict[str, str]:
        post = {"loss": f"{m['train/loss']:.3f}", "err": f"{100 * m['test/error']:.1f}%"}
        for target in self.problem.targets[:2]:
            key = target.method.measure_key(target)
            if key is not None and key in m:
                post[target.name] = f"{m[key]:.4g}"
            post[f"λ[{target.name}]"] = f"{m[f'constraint/{target.name}/multiplier']:.3g}"
        return post

    # -- the finishing phase: every budget met exactly, then fine-tuned with the pattern frozen --
    def run_finish(self, stop: dict[str, int | None]) -> None:
        enabled, epochs, lr = self.cfg.finishing(any(m.finishes for m in self.methods))
        if not enabled or not self.problem.targets:
            return
        ds, bs = self.dataset, self.cfg.data.eval_batch_size
        start = time.perf_counter()
        info: dict[str, Any] = {"test_error_before": self._error(self.model, ds.test_x, ds.test_y, bs)}
        before = self.problem.violations()
        closed, unprojected = self.problem.project_()
        if unprojected:
            warnings.warn(
                f"finishing: the methods of {unprojected} cannot close units (no project_); "
                "those budgets stay as training left them",
                stacklevel=2,
            )
        info["test_error_closed"] = self._error(self.model, ds.test_x, ds.test_y, bs)
        phase = Phase("finish", self.model, epochs, lr)
        if epochs > 0:  # the weights that are exactly 0 stay 0: a method whose pattern is its zeros
            schedule = self.cfg.finish.schedule
            primal = self.cfg.optim.primal  # the training's kind of optimizer, from a fresh state
            self._train_phase(
                phase,
                self.cfg.train.seed + 3,
                stop,
                self.methods,
                keep_zeros(self.model),
                schedule,
                primal.name,
                primal.momentum,
            )
        after = self.problem.violations()
        info.update(
            {
                "closed": closed,
                "units_closed": sum(n for per_layer in closed.values() for n in per_layer.values()),
                "unprojected": unprojected,
                "strict_violation_before": {name: v[1] for name, v in before.items()},
                "strict_violation_after": {name: v[1] for name, v in after.items()},
                "epochs": epochs,
                "lr": lr,
                "test_error_after": self._error(self.model, ds.test_x, ds.test_y, bs),
                "seconds": time.perf_counter() - start,
                "model_file": FINISHED,
            }
        )
        if ds.val_x is not None:
            info["val_error_after"] = self._error(self.model, ds.val_x, ds.val_y, bs)
        if self.ctx.main:
            save_checkpoint({"epoch": self.epoch, "model": self.model.state_dict()}, self.out / FINISHED)
        self.finish = info

    # -- phases after training: the methods' (merge and refit, ...) --
    def run_phases(self, stop: dict[str, int | None]) -> None:
        cfg, ds = self.cfg, self.dataset
        bs = cfg.data.eval_batch_size
        for method in self.methods:
            context = PhaseContext(
                primal_lr=cfg.optim.primal.lr,
                others=len(self.methods) > 1,
                error=lambda m: self._error(m, ds.test_x, ds.test_y, bs),
                max_output_difference=lambda a, b: max_output_difference(a, b, ds.test_x, bs),
            )
            phase = method.after_training(self.model, context)
            if phase is None:
                continue
            info = {"method": method_spec(method), **phase.info}
            for filename, network in phase.files.items():
                if self.ctx.main:
                    save_sequential(network, self.out / filename)
            if phase.epochs > 0:
                self._train_phase(phase, seed=cfg.train.seed + 2 + len(self.phases), stop=stop)
                info[f"test_error_{phase.name}"] = self._error(phase.model, ds.test_x, ds.test_y, bs)
                if self.ctx.main:
                    save_sequential(phase.model, self.out / f"{phase.name}_model.pt")
                info["model_file"] = f"{phase.name}_model.pt"
            self.phases[phase.name] = info

    def _train_phase(
        self,
        phase: Phase,
        seed: int,
        stop: dict[str, int | None],
        methods: list[SparsityMethod] | None = None,
        after_step: Callable[[Position], None] | None = None,
        schedule: str = "constant",
        optimizer: str = "adam",
        momentum: float = 0.0,
    ) -> None:
        """Train ``phase.model`` on the task loss alone, through the same loop as the game,
        with Adam or SGD (``optimizer``, ``momentum``) from a fresh state at ``phase.lr``.

        ``methods`` (their ``after_step`` runs after each step) are the model's own, frozen,
        in the finishing phase; the parameters that do not require gradients stay as they are.
        """
        cfg, ds = self.cfg, self.dataset
        model = phase.model
        if phase.keep_zeros:  # the same rule as the finishing phase: the zero weights stay 0
            after_step = keep_zeros(model)
        problem = SparsityProblem(model, methods)
        problem.forward_module = distributed.wrap(model, self.ctx) if self.ctx.active else None
        trained = [p for p in model.parameters() if p.requires_grad]
        if optimizer == "sgd":
            step: torch.optim.Optimizer = torch.optim.SGD(trained, lr=phase.lr, momentum=momentum)
        else:
            step = torch.optim.Adam(trained, lr=phase.lr)
        optimizers = OptimizerSet(cooper.optim.UnconstrainedOptimizer(problem, step), None, "alternating")
        first = self.logged_epochs  # phase rows continue the run's epoch count
        self.logged_epochs += phase.epochs
        bs = cfg.data.eval_batch_size

        def metrics(epoch: int, loss: float, lagrangian: float, restarts: dict[str, int], seconds: float) -> dict:
            return {
                "epoch": first + epoch,
                f"{phase.name}/epoch": epoch,
                f"{phase.name}/train_loss": loss,
                f"{phase.name}/test_error": self._error(model, ds.test_x, ds.test_y, bs),
                "time/epoch_s": seconds,
            }

        def on_stop(p: Position, sig: str) -> str:
            return (
                f"{sig}: stopped in epoch {p.epoch + 1} of the {phase.name} phase after training; the trained "
                f"network's checkpoint is kept. Run the phase again with: csparse train --resume {self.out}"
            )

        generator = torch.Generator().manual_seed(seed)
        total = phase.epochs * math.ceil(len(ds.train_y) / cfg.data.batch_size)

        def lr(step: int) -> float:
            return scheduled_lr(phase.lr, step, total, schedule)

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
            tracker=self.tracker,
            metrics=metrics,
            end_epoch=lambda _metrics, _pos: None,
            on_stop=on_stop,
            diverged=lambda _pos: f"{self.out / CHECKPOINT} (the trained network; the {phase.name} phase diverged)",
            dual_restarts=False,
            after_step=after_step,
            lr=lr if schedule != "constant" else None,
            progress=cfg.tracking.progress,
            dist=self.ctx,
        )
        try:
            play(plan, Position(0, 0, 0, generator.get_state()), stop)
        finally:
            problem.forward_module = None

    # -- after training --
    def compaction_counts(self) -> dict[str, Any] | None:
        """Parameters and FLOPs per example of the trained network before and after compaction."""
        if not self.methods:
            return None
        shape = tuple(self.dataset.input_shape)
        small = compact(self.model, shape, select_inputs=True, methods=self.methods)
        return size_summary(bake(self.model), small.module, shape)  # type: ignore[arg-type]

    def result(self, wall: float) -> RunResult:
        selected_epoch = self.selected_epoch
        selected_step = self.selected_step
        last = self.history[-1] if self.history else {}
        epoch = self.epoch
        if selected_epoch is not None:  # the row of the iterate whose weights the model holds
            last = next((row for row in self.history if row["epoch"] == selected_epoch), last)
            epoch = selected_epoch
        measures = self._measures()
        ds = self.dataset
        bs = self.cfg.data.eval_batch_size
        test_error = last.get("test/error") if last.get("epoch") == epoch and selected_step is None else None
        val_error = last.get("val/error") if ds.val_x is not None else None
        if self.finish is not None:  # the finished network: measured after its fine-tuning
            test_error = self.finish["test_error_after"]
            val_error = self.finish.get("val_error_after")
        if test_error is None:  # an iterate no epoch row describes: measure it
            test_error = self._error(self.model, ds.test_x, ds.test_y, bs)
            if ds.val_x is not None:
                val_error = self._error(self.model, ds.val_x, ds.val_y, bs)
        targets = []
        for target, _ in self.problem.ordered_constraints():
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
                    "metric": method.measure_key(target),
                    "feasible": measures[f"constraint/{target.name}/feasible"],
                    "multiplier": measures[f"constraint/{target.name}/multiplier"],
                    **method.describe_target(target, surrogate, exact),
                }
            )
        layers = [{"method": method_spec(m), **row} for m in self.methods for row in m.report_rows()]
        density = {k.split("/", 1)[1]: v for k, v in measures.items() if k.startswith("density/")}
        expected = {k.split("/", 1)[1]: v for k, v in measures.items() if k.startswith("density_expected/")}
        return RunResult(
            run_dir=self.out,
            epochs=self.epoch,
            test_error=float(test_error),
            val_error=val_error,
            feasible=all(t["feasible"] for t in targets) if targets else None,
            density=density,
            expected_density=expected,
            targets=targets,
            multipliers=self.problem.multiplier_values(),
            wall_time_s=wall,
            history=list(self.history),
            layers=layers,
            wandb_dir=self.tracker.wandb_dir,
            selected_epoch=selected_epoch if self.cfg.train.select != "last" else None,
            selected_step=selected_step,
            last_iterate=self.last_iterate,
            phases=dict(self.phases),
            finish=self.finish,
            compaction=self.compaction,
            methods=[method_spec(m) for m in self.methods],
            measures=measures,
            distributed=self.distributed,
        )
