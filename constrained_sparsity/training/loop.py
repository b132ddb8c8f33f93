"""The epoch loop: one loop plays every phase of a run (the main game and the phases after it).

A phase is a :class:`Plan`: which problem and optimizers, which data, how many epochs, and
what to do at the phase's points (the learning rate at a step, after a step, at the end of an
epoch, on a stop signal). The loop owns the steps, the running sums, the checks (a loss that
is not finite, a stop signal), the progress bar and the JSONL / W&B log.
"""

from __future__ import annotations

import math
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from .. import distributed
from ..data import batches
from ..errors import TrainingDiverged, TrainingInterrupted
from ..problem import SparsityProblem, train_step
from ..tracking import Tracker

__all__ = ["CHECK_EVERY", "Hooks", "Plan", "Position", "play", "stop_on_signals"]

CHECK_EVERY = 16  # steps between read-backs of the loss's finiteness (one process)


@dataclass
class Position:
    """Where a phase stands: epochs done, steps done in the epoch in progress, steps in all,
    the data order generator's state at the start of the epoch in progress, and (when it
    stopped inside an epoch) that epoch's running sums, so that its log row comes out as
    if it had not stopped: ``{"loss", "lagrangian"}`` (tensors), ``"restarts"``, ``"steps"``
    and ``"seconds"``."""

    epoch: int
    step_in_epoch: int
    global_step: int
    data_state: torch.Tensor
    epoch_sums: dict[str, Any] | None = None


class Hooks:
    """What a phase does at the loop's points; every hook does nothing by default.

    ``start_epoch`` and ``after_step`` see the position before the step counts (``after_step``:
    the step just taken is ``position.step_in_epoch + 1``); ``metrics`` makes an epoch's log
    record and ``end_epoch`` runs after it is logged (iterate selection, checkpoint);
    ``on_stop`` writes what it can and returns the message of the interruption; ``diverged``
    says where the last good state is; ``lr`` / ``dual_lr`` give the learning rate of the
    weights / of the multipliers at a global step (None: leave it); ``postfix`` what the
    progress bar shows after an epoch (None: nothing).
    """

    def start_epoch(self, pos: Position) -> None:
        """Before an epoch's first step."""

    def after_step(self, pos: Position) -> None:
        """After each step (primal, dual and proximal steps done)."""

    def metrics(self, epoch: int, loss: float, lagrangian: float, restarts: dict[str, int], seconds: float) -> dict:
        return {"epoch": epoch, "train/loss": loss, "time/epoch_s": seconds}

    def end_epoch(self, metrics: dict[str, Any], pos: Position) -> None:
        """After an epoch's record is logged."""

    def on_stop(self, pos: Position, sig: str) -> str:
        return f"{sig}: stopped at epoch {pos.epoch + 1}, step {pos.step_in_epoch}"

    def diverged(self, pos: Position) -> str:
        return "none"

    def lr(self, step: int) -> float | None:
        return None

    def dual_lr(self, step: int) -> float | None:
        return None

    def postfix(self, metrics: dict[str, Any]) -> dict[str, str] | None:
        return None


@dataclass
class Plan:
    """One phase of training, for :func:`play`: what it trains, on which data, for how many
    epochs, and its :class:`Hooks`."""

    name: str  # the progress bar's label
    problem: SparsityProblem
    optimizers: Any
    x: torch.Tensor
    y: torch.Tensor
    batch_size: int
    generator: torch.Generator
    epochs: int
    tracker: Tracker
    hooks: Hooks = field(default_factory=Hooks)
    dual_restarts: bool = True
    progress: bool = True
    # More than one process: this rank trains on its slice of every global batch through
    # ``problem.forward_module`` (DDP); stops and divergence are agreed after every step.
    dist: distributed.Context = distributed.SINGLE
    phase: str | None = None  # a phase after the main training (its name in messages), or None


@contextmanager
def stop_on_signals() -> Iterator[dict[str, int | None]]:
    """Turn SIGINT / SIGTERM into a flag checked after every step (main thread only)."""
    flag: dict[str, int | None] = {"signum": None}
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum: int, frame: Any) -> None:
        if flag["signum"] is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C stops at once
        flag["signum"] = signum

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield flag
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def play(plan: Plan, pos: Position, stop: dict[str, int | None]) -> Position:
    """Play ``plan`` from ``pos`` until ``plan.epochs`` epochs are done; return the position.

    Raises:
        TrainingDiverged: the loss became NaN or infinite.
        TrainingInterrupted: a stop signal arrived (after ``plan.hooks.on_stop``).
    """
    steps_per_epoch = math.ceil(len(plan.y) / plan.batch_size)
    total = plan.epochs * steps_per_epoch
    progress = None
    if plan.progress and plan.dist.main:
        from tqdm import tqdm

        done = min(pos.epoch * steps_per_epoch + pos.step_in_epoch, total)
        progress = tqdm(total=total, initial=done, desc=plan.name, unit="step", dynamic_ncols=True, file=sys.stderr)
    plan.problem.model.train()
    try:
        while pos.epoch < plan.epochs:
            plan.hooks.start_epoch(pos)
            plan.generator.set_state(pos.data_state)
            sums = _EpochSums(pos, plan.x.device)
            _play_epoch(plan, pos, stop, sums, progress)
            _end_epoch(plan, pos, sums, progress)
    finally:
        plan.problem.batch_weight = None
        if progress is not None:
            progress.close()
    return pos


class _EpochSums:
    """The running sums of an epoch in progress: from zero, or -- resumed inside the epoch --
    from the global sums its checkpoint kept."""

    def __init__(self, pos: Position, device: torch.device) -> None:
        sums = pos.epoch_sums if pos.step_in_epoch > 0 and pos.epoch_sums else None
        if sums is not None:
            self.loss = sums["loss"].to(device)
            self.lagrangian = sums["lagrangian"].to(device)
            self.restarts: dict[str, int] = dict(sums["restarts"])
            self.steps = int(sums["steps"])
            self.t0 = time.perf_counter() - float(sums["seconds"])
        else:
            self.loss = torch.zeros((), device=device)
            self.lagrangian = torch.zeros((), device=device)
            self.restarts = {}
            self.steps = 0
            self.t0 = time.perf_counter()

    def add(self, result: dict[str, Any]) -> None:
        self.loss += result["loss"]
        self.lagrangian += result["lagrangian"]
        for name in result["restarted"]:
            self.restarts[name] = self.restarts.get(name, 0) + 1
        self.steps += 1

    def kept(self, ctx: distributed.Context) -> dict[str, Any]:
        """What a checkpoint inside the epoch keeps (the global sums)."""
        loss_g, lagr_g = _global_sums(ctx, self.loss, self.lagrangian)
        return {
            "loss": loss_g.detach().cpu(),
            "lagrangian": lagr_g.detach().cpu(),
            "restarts": dict(self.restarts),
            "steps": self.steps,
            "seconds": time.perf_counter() - self.t0,
        }


def _play_epoch(plan: Plan, pos: Position, stop: dict[str, int | None], sums: _EpochSums, progress: Any) -> None:
    """The steps of one epoch from ``pos``: learning rates, the step, the checks, the sums."""
    ctx, device, hooks = plan.dist, plan.x.device, plan.hooks
    weights_group = plan.optimizers.cooper_optimizer.primal_optimizers[0].param_groups[0]
    watch = _LossWatch(pos.step_in_epoch)
    for xb, yb in batches(plan.x, plan.y, plan.batch_size, plan.generator, start=pos.step_in_epoch):
        if (lr := hooks.lr(pos.global_step)) is not None:
            weights_group["lr"] = lr
        if (dual_lr := hooks.dual_lr(pos.global_step)) is not None:
            for group in plan.optimizers.dual_optimizer.param_groups:
                group["lr"] = dual_lr
        if ctx.active:  # this rank's slice of the global batch, its loss weighted
            xb, yb, plan.problem.batch_weight = distributed.shard(xb, yb, ctx)
        result = train_step(plan.problem, plan.optimizers, xb, yb, plan.dual_restarts)
        watch.record(result["loss"])
        if ctx.active:  # one collective per step agrees on divergence and stop signals
            found = watch.read()
            bad, signum = distributed.agree(ctx, device, found is not None, stop["signum"])
            if bad:  # every rank stops here, whichever diverged
                _diverged(plan, pos, found, f" on rank {', '.join(map(str, bad))} of {ctx.world}")
        else:
            signum = stop["signum"]
            if signum is not None or watch.due():
                _check(plan, pos, watch)
        hooks.after_step(pos)
        sums.add(result)
        pos.step_in_epoch += 1
        pos.global_step += 1
        if progress is not None:
            progress.update(1)
        if signum is not None:  # a stop signal on any rank: every rank stops at this step
            pos.epoch_sums = sums.kept(ctx)
            raise TrainingInterrupted(hooks.on_stop(pos, signal.Signals(signum).name), signum)
    _check(plan, pos, watch)  # nothing not finite reaches the log or a checkpoint


def _end_epoch(plan: Plan, pos: Position, sums: _EpochSums, progress: Any) -> None:
    """After an epoch's steps: the ranks checked, its record made, logged and handed on."""
    ctx = plan.dist
    if ctx.active:
        distributed.average_norm_statistics(ctx, plan.problem.model)
        difference = distributed.check_agreement(
            ctx, distributed.state_tensors(plan.problem.model, plan.optimizers), plan.x.device
        )
        if difference != 0.0:
            raise TrainingDiverged(
                f"the {ctx.world} ranks disagree after epoch {pos.epoch + 1} (largest difference "
                f"{difference:g} in the model, multiplier or dual optimizer state); training stopped; "
                f"last good checkpoint: {plan.hooks.diverged(pos)}"
            )
    loss_g, lagr_g = _global_sums(ctx, sums.loss, sums.lagrangian)
    pos.epoch += 1
    pos.step_in_epoch = 0
    pos.epoch_sums = None
    pos.data_state = plan.generator.get_state()
    metrics = plan.hooks.metrics(
        pos.epoch,
        float(loss_g) / max(sums.steps, 1),
        float(lagr_g) / max(sums.steps, 1),
        sums.restarts,
        time.perf_counter() - sums.t0,
    )
    plan.tracker.log(metrics)
    plan.hooks.end_epoch(metrics, pos)
    postfix = plan.hooks.postfix(metrics)
    if progress is not None and postfix is not None:
        progress.set_postfix(postfix, refresh=False)


class _LossWatch:
    """The steps' losses, kept where they are (on the device) until read: checking them adds no
    synchronisation to a step. They are read back every ``CHECK_EVERY`` steps, at the end of an
    epoch and before a stop (:func:`_check`); a read names the first step whose loss was not
    finite."""

    def __init__(self, step_in_epoch: int) -> None:
        self.start = step_in_epoch  # the index in the epoch of the first pending loss
        self.pending: list[torch.Tensor] = []

    def record(self, loss: torch.Tensor) -> None:
        self.pending.append(loss.detach())

    def due(self) -> bool:
        return len(self.pending) >= CHECK_EVERY

    def read(self) -> tuple[int, float] | None:
        """``(step index in the epoch, loss)`` of the first pending step whose loss was not
        finite, or None; one read-back for all of them."""
        if not self.pending:
            return None
        losses = torch.stack(self.pending)
        self.start, count = self.start + len(self.pending), len(self.pending)
        self.pending = []
        bad = ~torch.isfinite(losses)
        if not bool(bad.any()):
            return None
        first = int(bad.nonzero()[0, 0])
        return self.start - count + first, float(losses[first])


def _check(plan: Plan, pos: Position, watch: _LossWatch) -> None:
    """Raise :class:`TrainingDiverged` if a step's loss was not finite (one process)."""
    found = watch.read()
    if found is not None:
        _diverged(plan, pos, found, "")


def _diverged(plan: Plan, pos: Position, found: tuple[int, float] | None, where: str) -> None:
    step, value = found if found is not None else (pos.step_in_epoch, "not finite")
    raise TrainingDiverged(
        f"loss became {value}{where} at epoch {pos.epoch + 1}, step {step + 1}"
        f"{'' if plan.phase is None else f' of the {plan.phase} phase'}; training stopped; "
        f"last good checkpoint: {plan.hooks.diverged(pos)}"
    )


def _global_sums(
    ctx: distributed.Context, loss_sum: torch.Tensor, lagr_sum: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The running sums of the step losses as one process would have them: the ranks' weighted
    slice losses averaged over the ranks (they average to the global batch's mean loss). A
    resumed epoch starts every rank from these global sums, which the average keeps."""
    if not ctx.active:
        return loss_sum, lagr_sum
    both = torch.stack([loss_sum.detach(), lagr_sum.detach()]).to(torch.float64)
    torch.distributed.all_reduce(both)
    both = (both / ctx.world).to(loss_sum.dtype)
    return both[0], both[1]
