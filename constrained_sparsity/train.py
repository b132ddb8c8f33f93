"""The training entry point: it owns data, logging, checkpoints and the console.

``run(config)`` builds everything from a :class:`~constrained_sparsity.config.Config`, plays
the game epoch by epoch, evaluates, logs (JSONL + W&B), checkpoints atomically after every
epoch, and returns a :class:`RunResult`. ``run(resume=RUN_DIR)`` continues a run.
"""

from __future__ import annotations

import json
import math
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from .checkpoint import load_checkpoint, save_checkpoint
from .config import Config, apply_overrides, config_from_dict, read_config_dict
from .data import Dataset, batches, load_dataset
from .errors import ConfigError, TrainingDiverged, TrainingInterrupted
from .hard_concrete import L0Gates, attach_l0
from .layer_sparsity import LayerSparsity, attach_layer_sparsity, merge_layers
from .models import MLP, LeNet5Caffe
from .problem import (
    DualOptimizer,
    LayerTarget,
    PrimalOptimizer,
    SparsityProblem,
    Target,
    build_optimizer,
    scheduled_lr,
    train_step,
)
from .tracking import Tracker

__all__ = ["RunResult", "build_model", "build_trainer", "build_sparsity", "error_rate", "format_report", "run"]

CHECKPOINT = "checkpoint.pt"
SELECTED = "selected_model.pt"
CHECKPOINT_VERSION = 1
# Keys that may change when a run is resumed; anything else would change the experiment.
RESUMABLE_KEYS = ("train.epochs", "tracking.")


@dataclass
class RunResult:
    """What a finished run measured (also written to ``summary.json`` in the run directory)."""

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
    # Layer sparsity: the merged network and its refit (sparsity.layers.refit_epochs).
    refit: dict[str, Any] | None = None
    # Parameters and FLOPs per example before and after compaction (csparse compact).
    compaction: dict[str, Any] | None = None
    # What the model-wise density weights each gate by (sparsity.weighting).
    weighting: str = "params"

    def summary(self) -> dict[str, Any]:
        return {
            "run_dir": str(self.run_dir),
            "epochs": self.epochs,
            "test_error": self.test_error,
            "val_error": self.val_error,
            "feasible": self.feasible,
            "density": self.density,
            "expected_density": self.expected_density,
            "targets": self.targets,
            "multipliers": self.multipliers,
            "layers": self.layers,
            "weighting": self.weighting,
            "wall_time_s": self.wall_time_s,
            "wandb_dir": self.wandb_dir,
            "selected_epoch": self.selected_epoch,
            "selected_step": self.selected_step,
            "last_iterate": self.last_iterate,
            "refit": self.refit,
            "compaction": self.compaction,
        }


# -- building blocks -------------------------------------------------------------------------
def build_model(cfg: Config, dataset: Dataset) -> nn.Module:
    shape = dataset.input_shape
    if cfg.model.name == "mlp":
        return MLP(int(math.prod(shape)), cfg.model.hidden, dataset.num_classes, cfg.model.activation)
    if shape[1:] != (28, 28):
        raise ConfigError(f"model.name='lenet5' needs 1x28x28 images; dataset {dataset.name!r} has {shape}")
    return LeNet5Caffe(shape[0], dataset.num_classes)


def input_nonnegative(cfg: Config, dataset: Dataset | None) -> bool:
    """``sparsity.layers.input_nonnegative``, or when null whether the training data are >= 0."""
    given = cfg.sparsity.layers.input_nonnegative
    if given is not None:
        return given
    return dataset is not None and bool(dataset.train_x.min() >= 0)


def build_layer_sparsity(
    cfg: Config, model: nn.Module, dataset: Dataset | None = None
) -> tuple[LayerSparsity | None, list[LayerTarget]]:
    """The layer-sparsity declaration of the config (``sparsity.layers``), if any."""
    lc = cfg.sparsity.layers
    if not lc.enabled:
        return None, []
    try:
        layers = attach_layer_sparsity(
            model, lc.eligible, lc.weights, input_nonnegative=input_nonnegative(cfg, dataset)
        )  # type: ignore[arg-type]
    except (TypeError, ValueError) as exc:
        key = "sparsity.layers.weights" if "weights" in str(exc) else "sparsity.layers.eligible"
        raise ConfigError(f"{key}: {exc}") from None
    k = lc.max_layers
    assert k is not None
    if not layers.min_depth <= k <= layers.num_linear:
        raise ConfigError(
            f"sparsity.layers.max_layers={k}: should be between {layers.min_depth} (every regularised layer "
            f"merged) and {layers.num_linear} (the model's linear layers)"
        )
    lam = lc.lam if cfg.sparsity.mode == "penalized" else None
    return layers, [LayerTarget(k, lam=lam, restarts=lc.dual_restarts, name="layers")]


def build_sparsity(
    cfg: Config, model: nn.Module, input_shape: tuple[int, ...] | None = None
) -> tuple[L0Gates | None, list[Target]]:
    """Attach the gates the config asks for and turn its budgets into :class:`Target`s.

    ``input_shape`` (one example's) is needed for ``sparsity.weighting: flops``.
    """
    sp = cfg.sparsity
    if sp.method == "none":
        return None, []
    gates = attach_l0(
        model, structure=sp.structure, droprate_init=sp.droprate_init, beta=sp.beta, gamma=sp.gamma, zeta=sp.zeta
    )
    if sp.weighting == "flops":
        if input_shape is None:
            raise ValueError("sparsity.weighting=flops needs the input shape (build_sparsity(..., input_shape=))")
        param = next(model.parameters())
        gates.weight_by_flops(model, torch.zeros(1, *input_shape, dtype=param.dtype, device=param.device))
    eps = sp.target_list()
    lams = sp.lambda_list() or [None] * len(eps)
    measures = sp.measure_list()
    names = gates.layer_names()
    if sp.per_layer:
        if len(eps) != len(names):
            raise ConfigError(
                f"sparsity.targets={sp.targets!r}: {len(eps)} values for {len(names)} gated layers {names}"
            )
        targets = [
            Target(e, layers=(n,), measure=m, lam=lam, name=f"l0_{n}")
            for e, n, m, lam in zip(eps, names, measures, lams)
        ]
    else:
        targets = [Target(eps[0], layers=None, measure=measures[0], lam=lams[0], name="l0_model")]
    return gates, targets


def dataset_for(cfg: Config) -> Dataset:
    """The dataset a config names, with its split (downloads only if ``data.download``)."""
    d = cfg.data
    return load_dataset(
        d.name,
        root=d.root,
        download=d.download,
        cache_dir=d.cache_dir,
        mirror=d.mirror,
        val_fraction=d.val_fraction,
        seed=cfg.train.seed,
    )


def build_trainer(
    cfg: Config, dataset: Dataset, device: torch.device | str = "cpu"
) -> tuple[nn.Module, L0Gates | None, SparsityProblem, Any]:
    """Model, gates, problem and optimizers of a config, as :func:`run` builds them."""
    model = build_model(cfg, dataset).to(device)
    gates, targets = build_sparsity(cfg, model, tuple(dataset.input_shape))
    layer_sparsity, layer_targets = build_layer_sparsity(cfg, model, dataset)
    problem = SparsityProblem(
        model,
        gates,
        [*targets, *layer_targets],
        mode=cfg.sparsity.mode,
        lambda_init=cfg.sparsity.lambda_init,
        layers=layer_sparsity,
    )
    problem.to(device)
    p, d = cfg.optim.primal, cfg.optim.dual
    optimizers = build_optimizer(
        problem,
        PrimalOptimizer(p.name, p.lr, p.gate_lr, p.momentum, p.weight_decay),
        DualOptimizer(d.name, d.lr, d.momentum, d.kp, d.ki, d.ema_nu),
        scheme=cfg.optim.scheme,
    )
    return model, gates, problem, optimizers


@torch.no_grad()
def error_rate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 4096) -> float:
    """Classification error of ``model`` in eval mode (test-time gates).

    Also takes a ``torch.export`` program's module, which stays in the mode it was traced in.
    """
    was_training = model.training
    set_training(model, False)
    wrong = 0
    for xb, yb in batches(x, y, batch_size):
        wrong += int((model(xb).argmax(dim=1) != yb).sum())
    set_training(model, was_training)
    return wrong / max(len(y), 1)


def set_training(model: nn.Module, mode: bool) -> None:
    """``model.train(mode)``; a no-op for a ``torch.export`` program, which refuses mode changes."""
    try:
        model.train(mode)
    except NotImplementedError:
        pass


@contextmanager
def _stop_on_signals() -> Iterator[dict[str, int | None]]:
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


def _new_run_dir(cfg: Config) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = Path(cfg.tracking.out_dir) / f"{cfg.tracking.run_name or cfg.name}-{stamp}"
    path, i = base, 1
    while path.exists():
        i += 1
        path = base.with_name(f"{base.name}-{i}")
    path.mkdir(parents=True)
    return path


def _resume_config(run_dir: Path, overrides: list[str]) -> Config:
    for text in overrides:
        key = text.split("=", 1)[0]
        if not any(key == k or (k.endswith(".") and key.startswith(k)) for k in RESUMABLE_KEYS):
            raise ConfigError(f"override {key!r} cannot change on --resume; only train.epochs and tracking.* can")
    data = read_config_dict(run_dir / "config.yaml")
    return config_from_dict(apply_overrides(data, overrides))


# -- the run ---------------------------------------------------------------------------------
def run(
    config: Config | None = None,
    resume: str | Path | None = None,
    overrides: list[str] | None = None,
    run_dir: str | Path | None = None,
) -> RunResult:
    """Train a sparse network as the config declares, or resume the run in ``resume``.

    Raises:
        ConfigError / DataError: bad input (nothing is trained).
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
        checkpoint = load_checkpoint(out / CHECKPOINT)
    else:
        if config is None:
            raise ValueError("run() needs a config or resume=RUN_DIR")
        cfg = config_from_dict(apply_overrides(config.to_dict(), list(overrides or []))) if overrides else config

    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    if cfg.train.flush_denormal:
        torch.set_flush_denormal(True)  # returns False where the CPU cannot; harmless then
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True)
    device = torch.device(cfg.train.device)
    torch.manual_seed(cfg.train.seed)

    dataset = dataset_for(cfg).to(device)
    model, gates, problem, optimizers = build_trainer(cfg, dataset, device)
    data_gen = torch.Generator().manual_seed(cfg.train.seed + 1)
    if checkpoint is None:  # everything validated: only now create the run directory
        out = Path(run_dir) if run_dir is not None else _new_run_dir(cfg)
        out.mkdir(parents=True, exist_ok=True)

    epoch, step_in_epoch, global_step = 0, 0, 0
    epoch_data_state = data_gen.get_state()
    wandb_id = None
    history: list[dict[str, Any]] = []
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
        problem.load_state_dict(checkpoint["cmp"])
        optimizers.cooper_optimizer.load_state_dict(checkpoint["optimizer"])
        torch.set_rng_state(checkpoint["rng_torch"])
        epoch_data_state = checkpoint["epoch_data_rng"]
        epoch, step_in_epoch, global_step = checkpoint["epoch"], checkpoint["step_in_epoch"], checkpoint["global_step"]
        wandb_id = checkpoint.get("wandb_id") or None
        selected = checkpoint.get("selected") or None
        history = _read_history(out / "metrics.jsonl")
    else:
        (out / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))

    tracker = Tracker(
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
    state = _Loop(cfg, out, dataset, model, gates, problem, optimizers, data_gen, tracker, history)
    refit: dict[str, Any] | None = None
    compaction: dict[str, Any] | None = None
    if checkpoint is not None:
        state.selected = selected
    exit_code = 1
    try:
        with _stop_on_signals() as stop:
            state.train(epoch, step_in_epoch, global_step, epoch_data_state, stop)
        exit_code = 0
        state.finish_selection()
        if cfg.sparsity.layers.enabled:
            refit = merge_and_refit(state.model, cfg, dataset, tracker, out, first_epoch=state.epoch + 1)
        compaction = _compaction_counts(state.model, cfg, dataset)
    except TrainingInterrupted:
        exit_code = 0  # a clean stop: the run can be resumed
        raise
    finally:
        result = state.result(time.perf_counter() - start)
        result.refit = refit
        result.compaction = compaction
        tracker.summary(_wandb_summary(result))
        tracker.finish(exit_code=exit_code)
        (out / "summary.json").write_text(json.dumps(result.summary(), indent=2))
    return result


def _state_copy(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _read_history(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [row for row in rows if "refit/epoch" not in row]


def _compaction_counts(model: nn.Module, cfg: Config, dataset: Dataset) -> dict[str, Any] | None:
    """Parameters and FLOPs per example of the trained network before and after compaction."""
    from .compact import compact_trained, size_summary
    from .hard_concrete import fold_l0

    if cfg.sparsity.method == "none" and not cfg.sparsity.layers.enabled:
        return None
    small = compact_trained(model, cfg, dataset)
    return size_summary(fold_l0(model), small.module, tuple(dataset.input_shape))


def _count_linear(model: nn.Module) -> int:
    return sum(isinstance(m, nn.Linear) for m in model.modules())


def merge_and_refit(
    model: nn.Module, cfg: Config, dataset: Dataset, tracker: Tracker | None, out: Path, first_epoch: int = 1
) -> dict[str, Any]:
    """Merge the mergeable layers of the trained ``model`` and refit the shallower network.

    L0 gates are folded in first, and their zeros are kept through the refit (a fixed
    ``torch.nn.utils.prune`` mask). Writes ``merged_model.pt`` (before refitting) and
    ``refit_model.pt`` into ``out``: ``{"layers": [...], "state_dict": ...}``, plain
    ``nn.Linear`` / ``nn.ReLU`` / ``nn.Flatten`` layers. Returns what it measured.
    """
    from torch.nn.utils import prune

    from .compact import count_params
    from .hard_concrete import fold_l0

    lc = cfg.sparsity.layers
    folded = fold_l0(model)
    merged = merge_layers(folded, input_nonnegative=input_nonnegative(cfg, dataset))  # type: ignore[arg-type]
    bs = cfg.data.eval_batch_size
    with torch.no_grad():
        diff = 0.0
        for xb, _ in batches(dataset.test_x, dataset.test_y, bs):
            diff = max(diff, float((folded(xb) - merged(xb)).abs().max()))
    info: dict[str, Any] = {
        "depth_before": _count_linear(folded),
        "depth_after": _count_linear(merged),
        "params_before": count_params(folded),
        "params_after": count_params(merged),
        "test_error_before": error_rate(folded, dataset.test_x, dataset.test_y, bs),
        "test_error_merged": error_rate(merged, dataset.test_x, dataset.test_y, bs),
        "max_abs_diff_merged": diff,
        "widths": [m.out_features for m in merged.modules() if isinstance(m, nn.Linear)],
    }
    _save_sequential(merged, out / "merged_model.pt")
    info["refit_epochs"] = lc.refit_epochs
    if lc.refit_epochs == 0:
        return info
    keep_zeros = cfg.sparsity.method != "none"
    linears = [m for m in merged.modules() if isinstance(m, nn.Linear)]
    if keep_zeros:
        for m in linears:
            prune.custom_from_mask(m, "weight", mask=(m.weight != 0))
    merged.train()
    opt = torch.optim.Adam(merged.parameters(), lr=cfg.optim.primal.lr)
    gen = torch.Generator().manual_seed(cfg.train.seed + 2)
    for epoch in range(1, lc.refit_epochs + 1):
        t0 = time.perf_counter()
        loss_sum, steps = torch.zeros(()), 0
        for xb, yb in batches(dataset.train_x, dataset.train_y, cfg.data.batch_size, gen):
            opt.zero_grad(set_to_none=True)
            loss = nn.functional.cross_entropy(merged(xb), yb)
            loss.backward()
            opt.step()
            loss_sum += loss.detach()
            steps += 1
        row = {
            "epoch": first_epoch - 1 + epoch,
            "refit/epoch": epoch,
            "refit/train_loss": float(loss_sum) / max(steps, 1),
            "refit/test_error": error_rate(merged, dataset.test_x, dataset.test_y, bs),
            "time/epoch_s": time.perf_counter() - t0,
        }
        if tracker is not None:
            tracker.log(row)
    if keep_zeros:
        for m in linears:
            prune.remove(m, "weight")
    info["test_error_refit"] = error_rate(merged, dataset.test_x, dataset.test_y, bs)
    _save_sequential(merged, out / "refit_model.pt")
    return info


def _save_sequential(model: nn.Sequential, path: Path) -> None:
    """``{"architecture": [...], "state_dict": ...}``, readable by :func:`compact.load_compact`."""
    from .compact import _architecture

    save_checkpoint({"architecture": _architecture(model), "sparse": [], "state_dict": model.state_dict()}, path)


def _wandb_summary(result: RunResult) -> dict[str, Any]:
    summary: dict[str, Any] = {"final/test_error": result.test_error, "final/epochs": result.epochs}
    if result.feasible is not None:
        summary["final/feasible"] = result.feasible
    if result.selected_epoch is not None:
        summary["final/selected_epoch"] = result.selected_epoch
        if result.selected_step is not None:
            summary["final/selected_step"] = result.selected_step
    for key, value in (result.refit or {}).items():
        if isinstance(value, (int, float)):
            summary[f"final/refit/{key}"] = value
    for key, value in (result.compaction or {}).items():
        summary[f"final/{key}"] = value
    for key, value in result.density.items():
        summary[f"final/density/{key}"] = value
    if result.layers:
        summary["final/params_gated"] = sum(r["params"] for r in result.layers)
        summary["final/params_active"] = sum(r["active_params"] for r in result.layers)
    return summary


class _Loop:
    """The epoch loop and its bookkeeping (kept out of :func:`run` for readability)."""

    def __init__(self, cfg, out, dataset, model, gates, problem, optimizers, data_gen, tracker, history):  # type: ignore[no-untyped-def]
        self.cfg: Config = cfg
        self.out: Path = out
        self.dataset: Dataset = dataset
        self.model: nn.Module = model
        self.gates: L0Gates | None = gates
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

    # -- checkpoints --
    def _save(self, epoch: int, step_in_epoch: int, global_step: int, epoch_data_state: torch.Tensor) -> None:
        save_checkpoint(
            {
                "version": CHECKPOINT_VERSION,
                "config": self.cfg.to_dict(),
                "model": self.model.state_dict(),
                "cmp": self.problem.state_dict(),
                "optimizer": dict(self.optimizers.cooper_optimizer.state_dict()),
                "rng_torch": torch.get_rng_state(),
                "epoch_data_rng": epoch_data_state,
                "epoch": epoch,
                "step_in_epoch": step_in_epoch,
                "global_step": global_step,
                "wandb_id": self.tracker.wandb_id or "",
                "selected": self.selected or {},
            },
            self.out / CHECKPOINT,
        )

    # -- training --
    def train(self, epoch: int, step_in_epoch: int, global_step: int, epoch_data_state: torch.Tensor, stop) -> None:  # type: ignore[no-untyped-def]
        cfg = self.cfg
        n_train = len(self.dataset.train_y)
        steps_per_epoch = math.ceil(n_train / cfg.data.batch_size)
        total_steps = cfg.train.epochs * steps_per_epoch
        primal = cfg.optim.primal
        weights_group = self.optimizers.cooper_optimizer.primal_optimizers[0].param_groups[0]
        self.epoch = epoch
        progress = None
        if cfg.tracking.progress:
            from tqdm import tqdm

            progress = tqdm(
                total=cfg.train.epochs * steps_per_epoch,
                initial=min(epoch * steps_per_epoch + step_in_epoch, cfg.train.epochs * steps_per_epoch),
                desc=cfg.name,
                unit="step",
                dynamic_ncols=True,
                file=sys.stderr,
            )
        self.model.train()
        try:
            while epoch < cfg.train.epochs:
                # last_feasible, last epoch: keep the weights of its last step that meets every
                # budget, in case the epoch ends just over one (restarts make it hover at ε)
                track_steps = (
                    cfg.train.select == "last_feasible" and self.problem.targets and (epoch == cfg.train.epochs - 1)
                )
                self._step_snapshot = None
                t0 = time.perf_counter()
                self.data_gen.set_state(epoch_data_state)
                loss_sum = torch.zeros(())
                lagr_sum = torch.zeros(())
                restarts: dict[str, int] = {}
                steps = 0
                for xb, yb in batches(
                    self.dataset.train_x, self.dataset.train_y, cfg.data.batch_size, self.data_gen, start=step_in_epoch
                ):
                    if primal.schedule != "constant":  # the weights' group; the gates keep gate_lr
                        weights_group["lr"] = scheduled_lr(
                            primal.lr, global_step, total_steps, primal.schedule, primal.final_lr_factor
                        )
                    result = train_step(self.problem, self.optimizers, xb, yb, cfg.sparsity.dual_restarts)
                    loss = result["loss"]
                    if not math.isfinite(float(loss)):
                        last = (
                            f"{self.out / CHECKPOINT} (epoch {epoch})" if (self.out / CHECKPOINT).exists() else "none"
                        )
                        raise TrainingDiverged(
                            f"loss became {float(loss)} at epoch {epoch + 1}, step {step_in_epoch + 1}; "
                            f"training stopped; last good checkpoint: {last}"
                        )
                    if track_steps and self.problem.feasible():
                        self._step_snapshot = (step_in_epoch + 1, _state_copy(self.model))
                    loss_sum += loss
                    lagr_sum += result["lagrangian"]
                    for name in result["restarted"]:
                        restarts[name] = restarts.get(name, 0) + 1
                    steps += 1
                    step_in_epoch += 1
                    global_step += 1
                    if progress is not None:
                        progress.update(1)
                    if stop["signum"] is not None:
                        self._save(epoch, step_in_epoch, global_step, epoch_data_state)
                        sig = signal.Signals(stop["signum"]).name
                        raise TrainingInterrupted(
                            f"{sig}: stopped at epoch {epoch + 1}, step {step_in_epoch}; checkpoint written. "
                            f"Continue with: csparse train --resume {self.out}",
                            stop["signum"],
                        )
                epoch += 1
                self.epoch = epoch
                step_in_epoch = 0
                epoch_data_state = self.data_gen.get_state()
                metrics = self._epoch_metrics(epoch, loss_sum, lagr_sum, steps, restarts, time.perf_counter() - t0)
                self.tracker.log(metrics)
                self.history.append(metrics)
                self._maybe_select(metrics)
                self._save(epoch, 0, global_step, epoch_data_state)
                if progress is not None:
                    progress.set_postfix(self._postfix(metrics), refresh=False)
        finally:
            if progress is not None:
                progress.close()

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
                save_checkpoint({"epoch": metrics["epoch"], "step": step, "model": state}, self.out / SELECTED)
                self.selected = {"epoch": metrics["epoch"], "step": step, "val_error": None}
            return
        val_error = metrics["val/error"]
        if mode == "best_feasible" and self.selected is not None and val_error >= self.selected["val_error"]:
            return
        save_checkpoint({"epoch": metrics["epoch"], "model": self.model.state_dict()}, self.out / SELECTED)
        self.selected = {"epoch": metrics["epoch"], "val_error": val_error}

    def finish_selection(self) -> None:
        """After the last epoch: swap in the selected iterate's weights, noting the last one's."""
        self.selected_epoch: int | None = self.epoch if self.history else None
        self.last_iterate: dict[str, Any] | None = None
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
            self.model.load_state_dict(load_checkpoint(self.out / SELECTED)["model"])

    def _epoch_metrics(self, epoch, loss_sum, lagr_sum, steps, restarts, seconds) -> dict[str, Any]:  # type: ignore[no-untyped-def]
        ds = self.dataset
        bs = self.cfg.data.eval_batch_size
        metrics: dict[str, Any] = {"epoch": epoch}
        metrics["train/loss"] = float(loss_sum) / max(steps, 1)
        metrics["train/lagrangian"] = float(lagr_sum) / max(steps, 1)
        test_error = error_rate(self.model, ds.test_x, ds.test_y, bs)
        if ds.val_x is not None:
            metrics["val/error"] = error_rate(self.model, ds.val_x, ds.val_y, bs)
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
        if self.gates is not None:
            for row in self.gates.report():
                metrics[f"density/{row.name}"] = row.exact_density
                metrics[f"density_expected/{row.name}"] = row.expected_density
            expected, exact = self.gates.densities()
            metrics["density/model"] = float(exact)
            metrics["density_expected/model"] = float(expected)
        layers = self.problem.layers
        if layers is not None:
            metrics["layers/active"] = layers.depth()
            metrics["layers/surrogate"] = float(layers.surrogate())
            for name, norm in layers.negative_norms().items():
                metrics[f"layers/neg_norm/{name}"] = float(norm)
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
        if "layers/active" in m:
            post["layers"] = str(m["layers/active"])
        if "density/model" in m:
            post["dens"] = f"{m['density/model']:.3f}"
        for target, _ in self.problem.ordered_constraints()[:2]:
            post[f"λ[{target.name}]"] = f"{m[f'constraint/{target.name}/multiplier']:.3g}"
        return post

    def result(self, wall: float) -> RunResult:
        selected_epoch = getattr(self, "selected_epoch", None)
        selected_step = getattr(self, "selected_step", None)
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
        if test_error is None:  # an iterate no epoch row describes: measure it
            test_error = error_rate(self.model, ds.test_x, ds.test_y, bs)
            if ds.val_x is not None:
                val_error = error_rate(self.model, ds.val_x, ds.val_y, bs)
        targets = []
        for target, _ in self.problem.ordered_constraints():
            if isinstance(target, LayerTarget):
                targets.append(
                    {
                        "name": target.name,
                        "layers": "depth",
                        "max_layers": target.max_layers,
                        "depth": measures["layers/active"],
                        "feasible": measures[f"constraint/{target.name}/feasible"],
                        "multiplier": measures[f"constraint/{target.name}/multiplier"],
                    }
                )
                continue
            with torch.no_grad():
                expected, exact = self.gates.densities(target.layers)  # type: ignore[union-attr]
            targets.append(
                {
                    "name": target.name,
                    "layers": list(target.layers) if target.layers else "model",
                    "epsilon": target.epsilon,
                    "measure": target.measure,
                    "exact_density": float(exact),
                    "expected_density": float(expected),
                    "feasible": measures[f"constraint/{target.name}/feasible"],
                    "multiplier": measures[f"constraint/{target.name}/multiplier"],
                }
            )
        layers = []
        if self.gates is not None:
            for row in self.gates.report():
                layers.append(
                    {
                        "name": row.name,
                        "structure": row.structure,
                        "gates": row.gates,
                        "active_gates": row.active_gates,
                        "params": row.params,
                        "active_params": row.active_params,
                        "exact_density": row.exact_density,
                        "expected_density": row.expected_density,
                    }
                )
        density = {k.split("/", 1)[1]: v for k, v in measures.items() if k.startswith("density/")}
        expected = {k.split("/", 1)[1]: v for k, v in measures.items() if k.startswith("density_expected/")}
        return RunResult(
            weighting=self.cfg.sparsity.weighting,
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
            last_iterate=getattr(self, "last_iterate", None),
        )


def format_report(result: RunResult) -> str:
    """A short human-readable report: densities per layer and model-wise, feasibility, error."""
    lines = [f"run directory: {result.run_dir}", f"epochs: {result.epochs}   wall time: {result.wall_time_s:.1f} s"]
    by_layer = {t["layers"][0]: t for t in result.targets if isinstance(t["layers"], list) and len(t["layers"]) == 1}
    if result.layers:
        lines.append(f"{'layer':<12}{'gates':>8}{'active':>8}{'density':>10}{'expected':>10}{'target':>8}")
        for row in result.layers:
            target = by_layer.get(row["name"])
            eps = f"{target['epsilon']:.3f}" if target else "-"
            lines.append(
                f"{row['name']:<12}{row['gates']:>8}{row['active_gates']:>8}"
                f"{row['exact_density']:>10.3f}{row['expected_density']:>10.3f}{eps:>8}"
            )
        model_target = next((t for t in result.targets if t["layers"] == "model"), None)
        eps = f"{model_target['epsilon']:.3f}" if model_target else "-"
        params = sum(r["params"] for r in result.layers)
        active = sum(r["active_params"] for r in result.layers)
        lines.append(
            f"{'model':<12}{params:>8}{active:>8}"
            f"{result.density['model']:>10.3f}{result.expected_density['model']:>10.3f}{eps:>8}   "
            + (
                "(parameters)"
                if result.weighting == "params"
                else "(densities weighted by FLOPs, counts in parameters)"
            )
        )
    for t in result.targets:
        if t["layers"] == "depth":
            lines.append(
                f"constraint {t['name']}: active layers {t['depth']} <= {t['max_layers']}? "
                f"{'yes' if t['feasible'] else 'NO'}   (multiplier {t['multiplier']:.4g})"
            )
            continue
        measured = t["exact_density"] if t["measure"] == "exact" else t["expected_density"]
        verdict = "yes" if t["feasible"] else "NO"
        lines.append(
            f"constraint {t['name']}: {t['measure']} density {measured:.4f} <= {t['epsilon']:.4f}? {verdict}"
            f"   (multiplier {t['multiplier']:.4g})"
        )
    if result.feasible is not None:
        lines.append(f"feasible: {'yes' if result.feasible else 'NO'}")
    if result.last_iterate is not None:
        li = result.last_iterate
        if result.selected_epoch is None:
            lines.append("selected iterate: none met every budget; this is the last iterate")
        elif result.selected_epoch != li["epoch"] or result.selected_step is not None:
            density = "" if li["density"] is None else f"had density {li['density']:.4f}, "
            where = f"epoch {result.selected_epoch}"
            if result.selected_step is not None:
                where += f", step {result.selected_step} of that epoch"
            lines.append(
                f"selected iterate: {where} (the last iterate, end of epoch {li['epoch']}, "
                f"{density}feasible {'yes' if li['feasible'] else 'no'}, test error {100 * li['test_error']:.2f} %)"
            )
    lines.append(f"test error: {100 * result.test_error:.2f} %")
    if result.compaction is not None:
        c = result.compaction
        lines.append(
            f"compact network: {c['architecture_before']} -> {c['architecture_after']}, parameters "
            f"{c['params_before']} -> {c['params_after']}, FLOPs per example {c['flops_before']} -> "
            f"{c['flops_after']}   (csparse compact {result.run_dir})"
        )
    if result.refit is not None:
        r = result.refit
        lines.append(
            f"merged: {r['depth_before']} -> {r['depth_after']} linear layers, {r['params_before']} -> "
            f"{r['params_after']} parameters, widths {r['widths']}, max |output difference| "
            f"{r['max_abs_diff_merged']:.2e}, test error {100 * r['test_error_merged']:.2f} %"
        )
        if "test_error_refit" in r:
            lines.append(f"refit ({r['refit_epochs']} epochs): test error {100 * r['test_error_refit']:.2f} %")
    if result.wandb_dir:
        lines.append(f"W&B files: {Path(result.wandb_dir).parent}")
    return "\n".join(lines)
