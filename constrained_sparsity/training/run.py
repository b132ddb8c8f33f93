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
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from .. import distributed
from ..compact import compact, size_summary
from ..config import Config, apply_overrides, config_from_dict, read_config_dict
from ..data import Dataset
from ..errors import ConfigError, TrainingInterrupted
from ..graph import bake
from ..methods import report_of
from ..problem import scheduled_lr
from ..tracking import NullTracker, Tracker
from .build import build_trainer, dataset_for
from .checkpoint import CHECKPOINT, RUN_KEYS, load_checkpoint, restore_run, run_checkpoint, save_checkpoint
from .loop import Hooks, Plan, Position, play, stop_on_signals
from .phases import run_finish, run_phases
from .plots import write_dynamics
from .result import RunResult, build_result, wandb_summary
from .rundir import cut_log, new_run_dir, prepare_run_dir
from .selection import IterateSelection
from .state import RunState

__all__ = ["RunResult", "check_device", "run"]

# Keys that may change when a run is resumed; anything else would change the experiment.
RESUMABLE_KEYS = ("train.epochs", "tracking.", "finish.")


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
    ctx, device = _set_up(cfg)

    loaded: dict[str, Dataset] = {}  # rank 0 loads (downloads) first, then the others read its files
    ctx.on_main(lambda: loaded.setdefault("data", dataset_for(cfg)) and None)
    dataset = (loaded.get("data") or dataset_for(cfg)).to(device)
    trainer = build_trainer(cfg, dataset, device)
    model, methods, problem, optimizers = trainer
    data_gen = torch.Generator().manual_seed(cfg.train.seed + 1)
    pos = Position(0, 0, 0, data_gen.get_state())
    history: list[dict[str, Any]] = []
    if checkpoint is not None:
        steps_per_epoch = math.ceil(len(dataset.train_y) / cfg.data.batch_size)
        pos = restore_run(checkpoint, out / CHECKPOINT, trainer, data_gen, steps_per_epoch)
        # everything validated: only now change the run directory
        history = ctx.on_main(lambda: cut_log(out, pos.epoch)[0])
    else:  # everything validated: only now create the run directory
        out = ctx.on_main(lambda: _create_run_dir(cfg, run_dir, overwrite))
    problem.forward_module = distributed.wrap(model, ctx) if ctx.active else None
    tracker = _tracker(cfg, out, ctx, (checkpoint or {}).get("wandb_id") or None)
    state = RunState(cfg, ctx, out, dataset, model, methods, problem, optimizers, tracker, history)
    game = _Game(state, data_gen, (checkpoint or {}).get("selected") or None)
    exit_code, status = 1, "failed"
    try:
        with stop_on_signals() as stop:
            game.play(pos, stop)
            problem.forward_module = None  # the phases after training wrap their own networks
            exit_code = 0
            game.selection.finish()
            run_finish(state, stop)
            run_phases(state, stop)
        state.compaction = _compaction_counts(state)
        _check_ranks(state)
        status = "complete"
    except TrainingInterrupted:
        exit_code, status = 0, "interrupted"  # a clean stop: the run can be resumed
        raise
    finally:
        problem.forward_module = None
        result = build_result(state, game.selection, time.perf_counter() - start)
        result.status = status
        state.tracker.summary(wandb_summary(result))
        state.tracker.finish(exit_code=exit_code)
        if ctx.main:
            write_text_atomic(out / "summary.json", json.dumps(result.summary(), indent=2))
            _plot_dynamics(result)
    return result


def _set_up(cfg: Config) -> tuple[distributed.Context, torch.device]:
    """The device, the process group (under torchrun), threads, determinism and the seed."""
    device = check_device(cfg.train.device)
    ctx, device = distributed.from_environment(device)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    if cfg.train.flush_denormal:
        torch.set_flush_denormal(True)  # returns False where the CPU cannot; harmless then
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True)
    torch.manual_seed(cfg.train.seed)
    return ctx, device


def _create_run_dir(cfg: Config, run_dir: str | Path | None, overwrite: bool) -> Path:
    made = (
        prepare_run_dir(run_dir, overwrite)
        if run_dir is not None
        else new_run_dir(cfg.tracking.out_dir, cfg.tracking.run_name or cfg.name)
    )
    write_text_atomic(made / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    return made


def _tracker(cfg: Config, out: Path, ctx: distributed.Context, wandb_id: str | None) -> Tracker:
    """The JSONL + W&B log of the run (rank 0 alone logs)."""
    tracker_cls = Tracker if ctx.main else NullTracker
    return tracker_cls(
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


def _check_ranks(run: RunState) -> None:
    """More than one process: gather the ranks' final states and record whether they agree."""
    ctx = run.ctx
    if not ctx.active:
        return
    device = run.dataset.train_x.device
    difference = distributed.check_agreement(ctx, distributed.state_tensors(run.model, run.optimizers), device)
    run.distributed = {
        "world_size": ctx.world,
        "backend": torch.distributed.get_backend(),
        "global_batch_size": run.cfg.data.batch_size,
        "batch_size_per_rank": math.ceil(run.cfg.data.batch_size / ctx.world),
        "ranks_agree": difference == 0.0,
        "max_difference": difference,
    }
    if difference != 0.0:
        warnings.warn(
            f"the {ctx.world} ranks' final states differ by up to {difference:g}; rank 0's is saved", stacklevel=2
        )


def _compaction_counts(run: RunState) -> dict[str, Any] | None:
    """Parameters and FLOPs per example of the trained network before and after compaction."""
    if not run.methods:
        return None
    shape = tuple(run.dataset.input_shape)
    small = compact(run.model, shape, select_inputs=True, methods=run.methods)
    return size_summary(bake(run.model), small.module, shape)  # type: ignore[arg-type]


class _Game(Hooks):
    """The main phase, the game, as the epoch loop's hooks: the learning rates, the epoch's log
    row, the checkpoint after every epoch and the iterate selection (``train.select``)."""

    def __init__(self, run: RunState, data_gen: torch.Generator, selected: dict[str, Any] | None) -> None:
        self.run = run
        self.data_gen = data_gen
        self.selection = IterateSelection(run, selected)
        cfg = run.cfg
        self.steps_per_epoch = math.ceil(len(run.dataset.train_y) / cfg.data.batch_size)
        self.warmup_steps = cfg.optim.dual.warmup_epochs * self.steps_per_epoch

    def save(self, pos: Position) -> None:
        if self.run.ctx.main:
            save_checkpoint(run_checkpoint(self.run, pos, self.selection.selected), self.run.out / CHECKPOINT)

    def play(self, pos: Position, stop: dict[str, int | None]) -> None:
        run, cfg = self.run, self.run.cfg
        run.epoch = run.logged_epochs = pos.epoch
        plan = Plan(
            name=cfg.name,
            problem=run.problem,
            optimizers=run.optimizers,
            x=run.dataset.train_x,
            y=run.dataset.train_y,
            batch_size=cfg.data.batch_size,
            generator=self.data_gen,
            epochs=cfg.train.epochs,
            tracker=run.tracker,
            hooks=self,
            dual_restarts=cfg.sparsity.dual_restarts,
            progress=cfg.tracking.progress,
            dist=run.ctx,
        )
        play(plan, pos, stop)
        if not (run.out / CHECKPOINT).is_file():  # no epoch ran (train.epochs: 0): the state the next phases start from
            self.save(pos)

    # -- the hooks ---------------------------------------------------------------------------
    def lr(self, step: int) -> float | None:  # the weights' group; the methods' own parameters keep gate_lr
        primal = self.run.cfg.optim.primal
        if primal.schedule == "constant":
            return None
        total = self.run.cfg.train.epochs * self.steps_per_epoch
        return scheduled_lr(primal.lr, step, total, primal.schedule, primal.final_lr_factor)

    def dual_lr(self, step: int) -> float | None:  # a linear warm-up of the multipliers' steps
        if self.warmup_steps <= 0 or self.run.optimizers.dual_optimizer is None:
            return None
        return self.run.cfg.optim.dual.lr * min(1.0, (step + 1) / self.warmup_steps)

    def start_epoch(self, pos: Position) -> None:
        self.selection.start_epoch(pos.epoch)

    def after_step(self, pos: Position) -> None:
        self.selection.after_step(pos.step_in_epoch)

    def end_epoch(self, metrics: dict[str, Any], pos: Position) -> None:
        self.run.epoch = self.run.logged_epochs = pos.epoch
        self.run.history.append(metrics)
        self.selection.end_epoch(metrics)
        self.save(pos)

    def on_stop(self, pos: Position, sig: str) -> str:
        self.save(pos)
        return (
            f"{sig}: stopped at epoch {pos.epoch + 1}, step {pos.step_in_epoch}; checkpoint written. "
            f"Continue with: csparse train --resume {self.run.out}"
        )

    def diverged(self, pos: Position) -> str:
        path = self.run.out / CHECKPOINT
        return f"{path} (epoch {pos.epoch})" if path.exists() else "none"

    def metrics(
        self, epoch: int, loss: float, lagrangian: float, restarts: dict[str, int], seconds: float
    ) -> dict[str, Any]:
        run = self.run
        metrics: dict[str, Any] = {"epoch": epoch, "train/loss": loss, "train/lagrangian": lagrangian}
        test_error = run.error(run.model)
        # no validation split: the test set stands in
        metrics["val/error"] = run.error(run.model, "val") if run.dataset.val_x is not None else test_error
        metrics["test/error"] = test_error
        metrics.update(run.measures())
        for name, count in restarts.items():
            metrics[f"constraint/{name}/restarts"] = count
        metrics["time/epoch_s"] = seconds
        return metrics

    def postfix(self, m: dict[str, Any]) -> dict[str, str]:
        post = {"loss": f"{m['train/loss']:.3f}", "err": f"{100 * m['test/error']:.1f}%"}
        for target in self.run.problem.targets[:2]:
            key = report_of(target.method).measure_key(target)
            if key is not None and key in m:
                post[target.name] = f"{m[key]:.4g}"
            post[f"λ[{target.name}]"] = f"{m[f'constraint/{target.name}/multiplier']:.3g}"
        return post
