"""More than one process: ``torchrun`` with DistributedDataParallel, one game on every rank.

``torchrun --nproc_per_node=N -m constrained_sparsity train CONFIG`` starts N processes; each
finds ``WORLD_SIZE`` / ``RANK`` / ``LOCAL_RANK`` in its environment and joins one process
group (gloo on CPU, NCCL on CUDA, chosen from ``train.device``). A plain ``csparse train``
(no ``WORLD_SIZE``, or 1) sets up nothing.

How the game stays one game:

* ``data.batch_size`` is the **global** batch: every rank draws the same shuffled order (one
  generator, one seed) and takes its slice of each global batch (:func:`shard`). Its loss is
  weighted so that DDP's mean of the ranks' gradients is the gradient of the global batch's
  mean loss, also for a last batch that does not split evenly.
* The model's parameters, and with them the methods' (gates, re-weighting scales: they are
  registered in the model), are synchronised by DDP, which also starts every rank from rank
  0's state. Every rank also keeps the same torch random state (same seed, same draws), so
  gate samples, dropout-free masks and the methods' random choices agree. The sparsity
  measures are functions of those replicated parameters, not of the data, so each rank
  computes the same constraint values, the same dual step and the same dual restarts; the
  run checks this at every epoch end (:func:`check_agreement`) and stops with an error if the
  ranks ever disagree.
* Decisions that end a run are taken together (:func:`agree`): after every step the ranks
  all-reduce whether any of them saw a non-finite loss or a stop signal, and all stop at
  that same step.
* Evaluation is distributed: each rank counts the errors of its slice of the evaluation set
  and the counts are summed (:func:`error_rate`), so every rank reads the same error and
  takes the same iterate-selection decision.
* Rank 0 alone writes the run directory, checkpoints, the JSONL log, W&B and the progress
  bar. A checkpoint holds rank 0's state, which is every rank's; the batch position counts
  global batches, so a distributed checkpoint resumes in one process and the other way round.
"""

from __future__ import annotations

import datetime
import gc
import inspect
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .errors import ConfigError, CSparseError

__all__ = [
    "SINGLE",
    "Context",
    "agree",
    "check_agreement",
    "error_rate",
    "from_environment",
    "shard",
    "wrap",
]


@dataclass(frozen=True)
class Context:
    """Where this process stands: its rank and the number of processes (1: no distribution)."""

    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        """Whether this process writes files, logs and shows progress (rank 0)."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def on_main(self, fn: Callable[[], Any]) -> Any:
        """``fn()`` run by rank 0 alone, its result on every rank (as does its error, when it
        raises one of the tool's errors: no rank is left waiting)."""
        if not self.active:
            return fn()
        payload: tuple[str, Any] = ("ok", None)
        if self.main:
            try:
                payload = ("ok", fn())
            except CSparseError as exc:
                payload = ("error", exc)
        kind, value = self.broadcast_object(payload)
        if kind == "error":
            raise value
        return value

    def broadcast_object(self, value: Any) -> Any:
        """``value`` as rank 0 has it, on every rank."""
        if not self.active:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]


SINGLE = Context()


def launched() -> bool:
    """Whether this process was started by ``torchrun`` (or the like) with more than one rank."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1) > 1


def from_environment(device: torch.device) -> tuple[Context, torch.device]:
    """Join the process group ``torchrun`` describes (once), or stay single.

    Returns the context and the device this rank trains on: ``cuda`` becomes
    ``cuda:LOCAL_RANK`` (one GPU per process); the CPU stays the CPU.
    """
    if not launched():
        return SINGLE, device
    for key in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        if key not in os.environ:
            raise ConfigError(
                f"WORLD_SIZE={os.environ['WORLD_SIZE']} but ${key} is not set: start several processes "
                "with torchrun (torchrun --nproc_per_node=N -m constrained_sparsity train CONFIG)"
            )
    if device.type == "cuda":
        local = int(os.environ["LOCAL_RANK"])
        if local >= torch.cuda.device_count():
            raise ConfigError(
                f"LOCAL_RANK={local} but this machine has {torch.cuda.device_count()} CUDA device(s): "
                "start at most one process per GPU"
            )
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        raise ConfigError(f"train.device={device}: more than one process runs on cpu or cuda only")
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        timeout = datetime.timedelta(seconds=float(os.environ.get("CSPARSE_DIST_TIMEOUT_S", "1800")))
        dist.init_process_group(backend, timeout=timeout)
    elif dist.get_backend() != backend:
        raise ConfigError(f"the process group uses {dist.get_backend()}, but train.device={device} needs {backend}")
    return Context(dist.get_rank(), dist.get_world_size()), device


def shutdown() -> None:
    """Leave the process group (at the end of the command line's work), every rank together.

    The ranks meet at a barrier first and drop what still refers to the group (a
    DistributedDataParallel wrapper's reducer) before the group is destroyed: a rank that
    tore its gloo connections down while a peer's gloo threads still used them, or that left
    gloo work alive into interpreter teardown, aborted at exit in C++ ("terminate called
    without an active exception", exit -6), now and then on a busy machine."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    gc.collect()
    try:
        dist.barrier()
    except Exception:  # noqa: BLE001 - a peer already gone: leave all the same
        pass
    dist.destroy_process_group()
    gc.collect()


def shard(x: torch.Tensor, y: torch.Tensor, ctx: Context) -> tuple[torch.Tensor, torch.Tensor, float]:
    """This rank's slice of a global batch and the weight of its mean loss.

    The slices are contiguous and differ in size by at most one; with weight
    ``world * len(slice) / len(batch)``, the mean over ranks of the weighted slice means is
    the batch mean (a rank with an empty slice has weight 0).
    """
    if not ctx.active:
        return x, y, 1.0
    n = len(y)
    xs, ys = torch.tensor_split(x, ctx.world), torch.tensor_split(y, ctx.world)
    part_x, part_y = xs[ctx.rank], ys[ctx.rank]
    return part_x, part_y, ctx.world * len(part_y) / max(n, 1)


def wrap(model: nn.Module, ctx: Context) -> nn.Module:
    """``model`` under DistributedDataParallel (itself when single).

    Buffers are not broadcast at each forward: the methods recompute them (masks,
    re-weighting scales) from the replicated parameters on every rank, and
    :func:`check_agreement` verifies that they agree.
    """
    if not ctx.active or not any(p.requires_grad for p in model.parameters()):
        return model
    device = next(model.parameters()).device
    ids = [device.index] if device.type == "cuda" else None
    ddp = nn.parallel.DistributedDataParallel
    if "forward_sync_buffers" in inspect.signature(ddp.__init__).parameters:  # torch >= 2.12
        return ddp(model, device_ids=ids, forward_sync_buffers=False)
    return ddp(model, device_ids=ids, broadcast_buffers=False)


def agree(ctx: Context, device: torch.device, diverged: bool, signum: int | None) -> tuple[list[int], int | None]:
    """After a step: the ranks whose loss was not finite, and the stop signal any rank received.

    One all-reduce of ``world + 1`` numbers; every rank gets the same answer.
    """
    if not ctx.active:
        return ([0] if diverged else []), signum
    flags = torch.zeros(ctx.world + 1, device=device, dtype=torch.float64)
    flags[ctx.rank] = float(diverged)
    if signum is not None:
        flags[ctx.world] = float(signum)
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    values = flags.tolist()
    ranks = [r for r in range(ctx.world) if values[r] > 0]
    return ranks, (int(values[ctx.world]) or None)


def all_sum(ctx: Context, values: Sequence[float], device: torch.device) -> list[float]:
    """The sums over ranks of ``values`` (themselves when single)."""
    if not ctx.active:
        return list(values)
    t = torch.tensor(list(values), device=device, dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


@torch.no_grad()
def error_rate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int, ctx: Context) -> float:
    """Classification error over the whole ``(x, y)``, each rank counting its contiguous part."""
    from .evaluation import error_rate as local_error

    if not ctx.active:
        return local_error(model, x, y, batch_size)
    xs, ys = torch.tensor_split(x, ctx.world), torch.tensor_split(y, ctx.world)
    part = ys[ctx.rank]
    wrong = round(local_error(model, xs[ctx.rank], part, batch_size) * len(part)) if len(part) else 0
    (total,) = all_sum(ctx, [wrong], x.device)
    return total / max(len(y), 1)


def _flat(tensors: Iterable[torch.Tensor], device: torch.device) -> torch.Tensor:
    parts = [t.detach().reshape(-1).to(device=device, dtype=torch.float64) for t in tensors]
    return torch.cat(parts) if parts else torch.zeros(0, device=device, dtype=torch.float64)


def state_tensors(model: nn.Module, optimizers: Any) -> list[torch.Tensor]:
    """What must agree on every rank: the model's state (parameters, gates, masks, scales), the
    multipliers and the dual optimizer's state."""
    tensors = [v for v in model.state_dict().values() if torch.is_tensor(v) and v.is_floating_point()]
    dual = getattr(optimizers, "dual_optimizer", None)
    if dual is not None:
        for group in dual.param_groups:
            for p in group["params"]:
                tensors.append(p)
                for value in dual.state.get(p, {}).values():
                    if torch.is_tensor(value):
                        tensors.append(value)
    return tensors


@torch.no_grad()
def average_norm_statistics(ctx: Context, model: nn.Module) -> None:
    """BatchNorm running statistics averaged over the ranks, in place.

    Each rank's come from its slice of the global batch (``nn.SyncBatchNorm`` works on GPUs
    only), so without this the ranks would hold different networks at an epoch's end. Called
    before the ranks' states are compared; a network without BatchNorm is left alone.
    """
    if not ctx.active:
        return
    buffers = [
        b
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
        for b in (m.running_mean, m.running_var)
        if b is not None
    ]
    if not buffers:
        return
    flat = torch.cat([b.reshape(-1).to(torch.float64) for b in buffers])
    dist.all_reduce(flat)
    flat /= ctx.world
    start = 0
    for b in buffers:
        b.copy_(flat[start : start + b.numel()].view_as(b))
        start += b.numel()


def check_agreement(ctx: Context, tensors: Sequence[torch.Tensor], device: torch.device) -> float:
    """The largest difference between ranks over ``tensors`` (0.0 when they agree; NaN counts as
    a difference). Two all-reduces (max and min) of their concatenation; every rank gets the
    same number."""
    if not ctx.active:
        return 0.0
    flat = _flat(tensors, device)
    size = torch.tensor([float(flat.numel())], device=device, dtype=torch.float64)
    sizes = size.clone()
    dist.all_reduce(sizes, op=dist.ReduceOp.MAX)
    low = size.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    if float(sizes) != float(low):
        return float("inf")  # the ranks do not even hold the same state shapes
    nan = torch.isnan(flat)
    hi = torch.where(nan, torch.full_like(flat, float("inf")), flat)
    lo = torch.where(nan, torch.full_like(flat, float("-inf")), flat)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    if flat.numel() == 0:
        return 0.0
    diff = (hi - lo).max()
    return float(diff) if bool(torch.isfinite(diff)) else float("inf")
