"""Run directories: load a trained run, compact it, evaluate it.

A run directory holds ``config.yaml``, ``checkpoint.pt`` (and ``selected_model.pt`` when
``train.select`` kept an earlier iterate), ``summary.json``, ``metrics.jsonl`` and the files of
the phases after training (``<phase>_model.pt``). These functions read it; ``csparse compact``
and ``csparse eval`` call them.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .compact import (
    CompactModel,
    active_inputs,
    compact,
    count_flops,
    count_params,
    describe,
    fast_pooling,
    size_summary,
)
from .config import Config, config_from_dict, read_config_dict
from .data import Dataset, load_dataset
from .errors import CheckpointError, ConfigError
from .evaluation import error_rate, max_output_difference, measure_latency
from .export import build_architecture, check_architecture, load_compact, load_units, save_compact
from .files import first_line, read_json, read_pt2_weights
from .graph import bake
from .methods import SparsityMethod
from .training import CHECKPOINT, FINISHED, SELECTED, build_trainer, dataset_for, load_checkpoint

__all__ = [
    "TrainedRun",
    "compact_run",
    "compact_trained",
    "evaluate",
    "format_compact_report",
    "format_eval",
    "load_run",
    "load_trained",
]


@dataclass
class TrainedRun:
    """A finished run, loaded: its config, the returned network (methods attached), its data."""

    run_dir: Path
    cfg: Config
    model: nn.Module
    methods: list[SparsityMethod]
    dataset: Dataset
    summary: dict[str, Any] = field(default_factory=dict)

    def phase_models(self) -> list[tuple[str, Path]]:
        """``(phase, file)`` of every phase after training that saved its network, in order."""
        out = []
        phases = self.summary.get("phases")
        for name, info in (phases if isinstance(phases, dict) else {}).items():
            file = info.get("model_file") if isinstance(info, dict) else None
            # a file name the run wrote into its own directory, never a path elsewhere
            if isinstance(file, str) and file == Path(file).name and (self.run_dir / file).is_file():
                out.append((name, self.run_dir / file))
        return out


def load_run(run_dir: str | Path) -> TrainedRun:
    """Load a finished run: the returned iterate, with its methods attached, in eval mode.

    The weights are those the run reported: ``finished_model.pt`` after the finishing phase,
    else ``selected_model.pt`` when ``train.select`` kept an earlier iterate, else the last
    checkpoint.
    """
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file() or not (run_dir / CHECKPOINT).is_file():
        raise ConfigError(f"{run_dir}: not a run directory (needs config.yaml and {CHECKPOINT})")
    cfg = config_from_dict(read_config_dict(run_dir / "config.yaml"))
    dataset = dataset_for(cfg)
    model, methods, _, _ = build_trainer(cfg, dataset)
    summary_path = run_dir / "summary.json"
    summary = read_json(summary_path, "run summary") if summary_path.is_file() else {}
    selected = summary.get("selected_epoch") if isinstance(summary, dict) else "?"
    if not isinstance(summary, dict) or not (selected is None or isinstance(selected, int)):
        raise CheckpointError(f"{summary_path}: not a run summary of csparse")
    finish = summary.get("finish")
    if isinstance(finish, dict) and finish.get("model_file") == FINISHED and (run_dir / FINISHED).is_file():
        source = run_dir / FINISHED  # the finishing phase's network: the one the run returned
    elif selected is not None and (run_dir / SELECTED).is_file():
        source = run_dir / SELECTED
    else:
        source = run_dir / CHECKPOINT
    checkpoint = load_checkpoint(run_dir / CHECKPOINT, ("model", "methods"))
    weights = checkpoint if source.name == CHECKPOINT else load_checkpoint(source)
    try:
        model.load_state_dict(weights["model"])
        if not isinstance(checkpoint["methods"], list) or len(checkpoint["methods"]) != len(methods):
            raise ValueError(f"{len(methods)} methods, but the checkpoint holds other method states")
        for method, state in zip(methods, checkpoint["methods"]):
            method.load_state_dict(state)
    except (RuntimeError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{source}: does not fit the run's config ({first_line(exc)})") from None
    return TrainedRun(run_dir, cfg, model.eval(), methods, dataset, summary)


def load_trained(run_dir: str | Path) -> tuple[Config, nn.Module, Dataset]:
    """``(config, model, dataset)`` of a finished run (see :func:`load_run`)."""
    trained = load_run(run_dir)
    return trained.cfg, trained.model, trained.dataset


def compact_trained(
    trained: TrainedRun, model: nn.Module | None = None, select_inputs: bool = True, fold_batchnorm: bool = False
) -> CompactModel:
    """:func:`~constrained_sparsity.compact.compact` of a run's network (or ``model``) with the run's
    methods; a network that is not a chain, or a model class of the user's, carries how to build
    its model again (``rebuild``)."""
    compacted = compact(
        trained.model if model is None else model,
        tuple(trained.dataset.input_shape),
        select_inputs=select_inputs,
        methods=trained.methods,
        fold_batchnorm=fold_batchnorm,
    )
    if not isinstance(compacted.module, nn.Sequential) or ":" in trained.cfg.model.name:
        m = trained.cfg.model
        compacted.rebuild = {
            "name": m.name,
            "kwargs": dict(m.kwargs),
            "input_shape": list(trained.dataset.input_shape),
            "num_classes": trained.dataset.num_classes,
        }
    return compacted


def compact_run(
    run_dir: str | Path, out_dir: str | Path | None = None, select_inputs: bool = True, fold_batchnorm: bool = False
) -> dict[str, Any]:
    """Compact the network of a run directory into ``out_dir`` (default ``RUN_DIR/compact``).

    The network is the run's returned one, or the one its last phase after training saved;
    ``fold_batchnorm``: an inference network, its BatchNorms folded into the layers before them.
    """
    run_dir = Path(run_dir)
    trained = load_run(run_dir)
    cfg, model, dataset = trained.cfg, trained.model, trained.dataset
    shape = tuple(dataset.input_shape)
    source = "trained network"
    phase_models = trained.phase_models()
    if phase_models:  # the network of the last phase after training (e.g. merged and refitted)
        phase, file = phase_models[-1]
        model, _ = load_compact(file)
        source = f"{file.name} (after the {phase} phase)"
    compacted = compact_trained(trained, model, select_inputs, fold_batchnorm)
    folded = bake(model)
    diff = max_output_difference(model.eval(), compacted.module, dataset.test_x[:512])
    meta = {"run_dir": str(run_dir), "dataset": cfg.data.name, "root": cfg.data.root}
    target = Path(out_dir) if out_dir else run_dir / "compact"
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"--out {target}: cannot write there ({exc.strerror or exc})") from None
    paths = save_compact(compacted, target, shape, meta)
    bs = cfg.data.eval_batch_size
    report = {
        "source": source,
        "paths": {k: str(v) for k, v in paths.items()},
        **size_summary(folded, compacted.module, shape),  # type: ignore[arg-type]
        "active_inputs_before": active_inputs(folded, shape),
        "nonzero_params_after": count_params(compacted.module, nonzero=True),
        "test_error_gated": error_rate(model, dataset.test_x, dataset.test_y, bs),  # the source network
        "test_error_compact": error_rate(compacted.module, dataset.test_x, dataset.test_y, bs),
        "max_abs_diff": diff,
        "removed_units": compacted.removed,
        "folded_batchnorm": compacted.folded_batchnorm,
        "unstructured_layers": compacted.sparse_weights,
    }
    (Path(paths["model"]).parent / "report.json").write_text(json.dumps(report, indent=2))
    return report


def format_compact_report(r: dict[str, Any]) -> str:
    lines = [
        f"compacted: {r['source']}",
        f"architecture: {r['architecture_before']}  ->  {r['architecture_after']}",
        *(
            [
                "active inputs per linear layer (features that can vary, the L0 paper's widths): "
                + "-".join(map(str, r["active_inputs_before"]))
            ]
            if r["active_inputs_before"]
            else []  # a network that is not a chain
        ),
        f"parameters: {r['params_before']} -> {r['params_after']} ({r['nonzero_params_after']} non-zero)",
        f"FLOPs per example: {r['flops_before']} -> {r['flops_after']} "
        f"(ratio {r['flops_after'] / max(r['flops_before'], 1):.3f})",
        f"test error: gated {100 * r['test_error_gated']:.2f} %, compact {100 * r['test_error_compact']:.2f} % "
        f"(max |output difference| {r['max_abs_diff']:.2e})",
    ]
    if r.get("folded_batchnorm"):
        lines.append(f"BatchNorm folded into the layer before it: {len(r['folded_batchnorm'])} (an inference network)")
    if r["unstructured_layers"]:
        lines.append(
            f"layers {r['unstructured_layers']} keep per-weight zeros: stored as CSR where smaller, but dense "
            "kernels multiply the zeros, so they gain no speed from them"
        )
    program = r["paths"].get("program")
    exported = f"{program} (torch.export)" if program else "no model.pt2 (torch.export cannot export this network)"
    lines.append(f"written: {r['paths']['model']} (state_dict + architecture), {exported}")
    return "\n".join(lines)


def evaluate(
    path: str | Path, batches: Sequence[int] = (1, 256), threads: Sequence[int] = (1, 2), repeats: int = 30
) -> list[dict[str, Any]]:
    """Test error, parameters, FLOPs per example and latency of the networks at ``path``.

    ``path`` is a run directory (the original network with its gates folded in, and its
    compact version: ``RUN_DIR/compact/model.pt`` if written, else compacted now) or a
    compact model written by :func:`~constrained_sparsity.export.save_compact` (``model.pt``
    or the ``model.pt2`` program).

    A ``model.pt2`` is not loaded with ``torch.export.load`` (which may unpickle and
    evaluate what the file holds): its weights are read as raw tensors
    (:func:`~constrained_sparsity.files.read_pt2_weights`) into the layers that the
    ``architecture.json`` beside it describes, and that network is evaluated.
    """
    path = Path(path)
    networks: list[tuple[str, nn.Module]] = []
    if path.is_dir():
        trained = load_run(path)
        dataset = trained.dataset
        shape = tuple(dataset.input_shape)
        networks.append(("original (folded)", fast_pooling(bake(trained.model))))  # pooled as the compact one
        for phase, file in trained.phase_models():
            networks.append((f"after {phase} ({file.name})", load_compact(file)[0]))
        saved = path / "compact" / "model.pt"
        if saved.is_file():
            networks.append(("compact", load_compact(saved)[0]))
        else:
            networks.append(("compact", compact_trained(trained).module))
    elif path.suffix in (".pt", ".pt2") and path.is_file():
        if path.suffix == ".pt":
            module, info = load_compact(path)
        else:
            module, info = _program_network(path)
        meta = info.get("meta")
        if not isinstance(meta, dict) or not isinstance(meta.get("dataset"), str):
            raise ConfigError(f"{path}: the description names no dataset")
        root = meta.get("root")
        dataset = load_dataset(meta["dataset"], root=root if isinstance(root, str) else None)
        shape = info.get("input_shape")
        if not (isinstance(shape, list) and shape and all(isinstance(v, int) and v > 0 for v in shape)):
            raise CheckpointError(f"{path}: its description has no valid input_shape")
        shape = tuple(shape)
        if shape != tuple(dataset.input_shape):
            raise CheckpointError(f"{path}: takes inputs of shape {shape}, {meta['dataset']} has {dataset.input_shape}")
        _check_runs(module, dataset, path)
        networks.append((f"compact ({path.name})", module))
    else:
        raise ConfigError(f"{path}: expected a run directory or a compact model (model.pt / model.pt2)")
    rows = []
    for name, module in networks:
        module = module.float()
        row: dict[str, Any] = {"network": name}
        row["architecture"] = describe(module, shape)
        row["params"] = count_params(module)
        row["nonzero_params"] = count_params(module, nonzero=True)
        row["flops"] = count_flops(module, shape)
        row["test_error"] = error_rate(module, dataset.test_x, dataset.test_y, 1024)
        for b in batches:
            for t in threads:
                row[f"latency_ms/b{b}/t{t}"] = 1e3 * measure_latency(module, shape, b, t, repeats=repeats)
        rows.append(row)
    return rows


def format_eval(rows: list[dict[str, Any]]) -> str:
    keys = [k for k in rows[0] if k.startswith("latency_ms/")]
    head = "| network | architecture | params (non-zero) | FLOPs/example | test error | " + " | ".join(
        k.replace("latency_ms/", "ms ").replace("/", " ") for k in keys
    )
    lines = [head + " |", "|" + "---|" * (5 + len(keys))]
    for r in rows:
        flops = "-" if r["flops"] is None else str(r["flops"])
        lat = " | ".join(f"{r[k]:.3f}" for k in keys)
        lines.append(
            f"| {r['network']} | {r['architecture']} | {r['params']} ({r['nonzero_params']}) | {flops} | "
            f"{100 * r['test_error']:.2f} % | {lat} |"
        )
    return "\n".join(lines)


def _program_network(path: Path) -> tuple[nn.Module, dict[str, Any]]:
    """The network a ``torch.export`` archive holds, rebuilt without running the archive:
    the layers of ``architecture.json`` beside it, the weights read as raw tensors."""
    description = path.with_name("architecture.json")
    if not description.is_file():
        raise ConfigError(f"{path}: no architecture.json beside it to say which layers and data it holds")
    info = read_json(description, "network description")
    if not isinstance(info, dict):
        raise CheckpointError(f"{description}: not a network description of csparse")
    if info.get("format") == "units":  # a network compacted through its unit graph: its model, resized
        try:
            return load_units({**info, "state_dict": read_pt2_weights(path)})
        except ValueError as exc:
            raise CheckpointError(f"{path}: {exc}") from None
    try:
        check_architecture(info.get("architecture"))
        with torch.device("meta"):  # shapes only
            expected = {k: tuple(v.shape) for k, v in build_architecture(info["architecture"]).state_dict().items()}
    except ValueError as exc:
        raise CheckpointError(f"{description}: {exc}") from None
    weights = read_pt2_weights(path)
    shapes = {k: tuple(v.shape) for k, v in weights.items()}
    if shapes != expected:
        raise CheckpointError(f"{path}: its weights do not match the layers of {description.name}")
    module = build_architecture(info["architecture"])
    module.load_state_dict(weights)
    return module.eval(), info


def _check_runs(module: nn.Module, dataset: Dataset, path: Path) -> None:
    """Refuse a saved network that cannot run on its data (a description that lies)."""
    try:
        with torch.no_grad():
            out = module(dataset.test_x[:2].float())
    except (RuntimeError, IndexError, ValueError) as exc:
        raise CheckpointError(
            f"{path}: the network does not run on {dataset.name} ({str(exc).splitlines()[0]})"
        ) from None
    if out.dim() != 2 or out.shape[1] < dataset.num_classes:
        raise CheckpointError(
            f"{path}: the network gives {tuple(out.shape[1:])} outputs for {dataset.num_classes} classes"
        )
