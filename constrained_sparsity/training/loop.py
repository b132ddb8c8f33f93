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
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from .. import distributed
from ..data import batches
from ..errors import TrainingDiverged, TrainingInterrupted
from ..problem import SparsityProblem, train_step
from ..tracking import Tracker

__all__ = ["CHECK_EVERY", "Plan", "Position", "play", "stop_on_signals"]

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


@dataclass
class Plan:
    """One phase of training, for :func:`play`.

    ``metrics(epoch, loss, lagrangian, restarts, seconds)`` makes an epoch's log record;
    ``end_epoch(metrics, position)`` runs after it is logged (iterate selection,
    checkpoint); ``start_epoch`` and ``after_step`` see the position before the step counts
    (``after_step``: the step just taken is ``position.step_in_epoch + 1``); ``on_stop``
    writes what it can and returns the message of the interruption; ``diverged`` says where
    the last good state is.
    """

    name: str  # the progress bar's label
    problem: SparsityProblem
    optimizers: Any
    x: torch.Tensor
    y: torch.Tensor
    batch_size: int
    generator: torch.Generator
    epochs: int
    tracker: Tracker
    metrics: Callable[[int, float, float, dict[str, int], float], dict[str, Any]]
    end_epoch: Callable[[dict[str, Any], Position], None]
    on_stop: Callable[[Position, str], str]
    diverged: Callable[[Position], str]
    lr: Callable[[int], float] | None = None  # learning rate of the weights at a global step
    dual_lr: Callable[[int], float] | None = None  # learning rate of the multipliers at a global step
    dual_restarts: bool = True
    start_epoch: Callable[[Position], None] | None = None
    after_step: Callable[[Position], None] | None = None
    postfix: Callable[[dict[str, Any]], dict[str, str]] | None = None
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
        TrainingInterrupted: a stop signal arrived (after ``plan.on_stop``).
    """
    steps_per_epoch = math.ceil(len(plan.y) / plan.batch_size)
    total = plan.epochs * steps_per_epoch
    weights_group = plan.optimizers.cooper_optimizer.primal_optimizers[0].param_groups[0]
    progress = None
    if plan.progress and plan.dist.main:
        from tqdm import tqdm

        done = min(pos.epoch * steps_per_epoch + pos.step_in_epoch, total)
        progress = tqdm(total=total, initial=done, desc=plan.name, unit="step", dynamic_ncols=True, file=sys.stderr)
    plan.problem.model.train()
    ctx, device = plan.dist, plan.x.device
    try:
        while pos.epoch < plan.epochs:
            if plan.start_epoch is not None:
                plan.start_epoch(pos)
            plan.generator.set_state(pos.data_state)
            sums = pos.epoch_sums if pos.step_in_epoch > 0 and pos.epoch_sums else None
            if sums is not None:  # resumed inside this epoch: its sums so far (the global ones)
                loss_sum = sums["loss"].to(device)
                lagr_sum = sums["lagrangian"].to(device)
                restarts: dict[str, int] = dict(sums["restarts"])
                steps = int(sums["steps"])
                t0 = time.perf_counter() - float(sums["seconds"])
            else:
                loss_sum = torch.zeros((), device=device)
                lagr_sum = torch.zeros((), device=device)
                restarts = {}
                steps = 0
                t0 = time.perf_counter()
            watch = _LossWatch(pos.step_in_epoch)
            for xb, yb in batches(plan.x, plan.y, plan.batch_size, plan.generator, start=pos.step_in_epoch):
                if plan.lr is not None:
                    weights_group["lr"] = plan.lr(pos.global_step)
                if plan.dual_lr is not None:
                    for group in plan.optimizers.dual_optimizer.param_groups:
                        group["lr"] = plan.dual_lr(pos.global_step)
                if ctx.active:  # this rank's slice of the global batch, its loss weighted
                    xb, yb, plan.problem.batch_weight = distributed.shard(xb, yb, ctx)
                result = train_step(plan.problem, plan.optimizers, xb, yb, plan.dual_restarts)
                loss = result["loss"]
                watch.record(loss)
                if ctx.active:  # one collective per step agrees on divergence and stop signals
                    found = watch.read()
                    bad, signum = distributed.agree(ctx, device, found is not None, stop["signum"])
                    if bad:  # every rank stops here, whichever diverged
                        _diverged(plan, pos, found, f" on rank {', '.join(map(str, bad))} of {ctx.world}")
                else:
                    signum = stop["signum"]
                    if signum is not None or watch.due():
                        _check(plan, pos, watch)
                if plan.after_step is not None:
                    plan.after_step(pos)
                loss_sum += loss
                lagr_sum += result["lagrangian"]
                for name in result["restarted"]:
                    restarts[name] = restarts.get(name, 0) + 1
                steps += 1
                pos.step_in_epoch += 1
                pos.global_step += 1
                if progress is not None:
                    progress.update(1)
                if signum is not None:  # a stop signal on any rank: every rank stops at this step
                    loss_g, lagr_g = _global_sums(ctx, loss_sum, lagr_sum)
                    pos.epoch_sums = {
                        "loss": loss_g.detach().cpu(),
                        "lagrangian": lagr_g.detach().cpu(),
                        "restarts": dict(restarts),
                        "steps": steps,
                        "seconds": time.perf_counter() - t0,
                    }
                    sig = signal.Signals(signum).name
                    raise TrainingInterrupted(plan.on_stop(pos, sig), signum)
            _check(plan, pos, watch)  # nothing not finite reaches the log or a checkpoint
            if ctx.active:
                distributed.average_norm_statistics(ctx, plan.problem.model)
                difference = distributed.check_agreement(
                    ctx, distributed.state_tensors(plan.problem.model, plan.optimizers), device
                )
                if difference != 0.0:
                    raise TrainingDiverged(
                        f"the {ctx.world} ranks disagree after epoch {pos.epoch + 1} (largest difference "
                        f"{difference:g} in the model, multiplier or dual optimizer state); training stopped; "
                        f"last good checkpoint: {plan.diverged(pos)}"
                    )
            loss_g, lagr_g = _global_sums(ctx, loss_sum, lagr_sum)
            pos.epoch += 1
            pos.step_in_epoch = 0
            pos.epoch_sums = None
            pos.data_state = plan.generator.get_state()
            metrics = plan.metrics(
                pos.epoch,
                float(loss_g) / max(steps, 1),
                float(lagr_g) / max(steps, 1),
                restarts,
                time.perf_counter() - t0,
            )
            plan.tracker.log(metrics)
            plan.end_epoch(metrics, pos)
            if progress is not None and plan.postfix is not None:
                progress.set_postfix(plan.postfix(metrics), refresh=False)
    finally:
        plan.problem.batch_weight = None
        if progress is not None:
            progress.close()
    return pos


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
        f"last good checkpoint: {plan.diverged(pos)}"
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
