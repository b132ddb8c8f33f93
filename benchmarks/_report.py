"""Shared by the benchmark scripts: what each writes (the command, the machine, a JSON record and a
Markdown table), the overrides of its trainings, a run's trainer rebuilt from its directory, its
training batches, and its dense and compact networks."""

from __future__ import annotations

import collections
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch


def header(threads: int | None = None) -> dict:
    """``command`` (as run) and ``machine`` (with the thread count when the script fixes one)."""
    threads_part = f", {threads} threads" if threads else ""
    return {
        "command": " ".join(["python", *sys.argv]),
        "machine": f"{platform.machine()}{threads_part}, torch {torch.__version__}",
    }


def run_overrides(epochs: int, threads: int, out_dir: Path | None = None, root: str | None = None) -> list[str]:
    """Config overrides of every benchmark training: its epochs and threads, no W&B, no progress bar."""
    overrides = [f"train.epochs={epochs}", f"train.threads={threads}"]
    overrides += ["tracking.wandb=disabled", "tracking.progress=false"]
    if out_dir is not None:
        overrides.append(f"tracking.out_dir={out_dir}")
    if root:
        overrides.append(f"data.root={root}")
    return overrides


def rebuild_trainer(run_dir: str | Path, end_state: bool = True, dataset=None):  # type: ignore[no-untyped-def]
    """A run's trainer rebuilt from its config, at its final checkpoint (or at its start), in training mode.

    Returns ``(cfg, dataset, model, gates, problem, optimizers)`` (``gates``: the run's first
    sparsity method, its L0 gates in the L0 runs these scripts time); sets
    ``torch.set_flush_denormal`` as the run's config does. ``dataset``: reuse one already loaded.
    """
    import constrained_sparsity as cs

    run_dir = Path(run_dir)
    cfg = cs.config.config_from_dict(cs.config.read_config_dict(run_dir / "config.yaml"))
    torch.set_flush_denormal(cfg.train.flush_denormal)
    if dataset is None:
        dataset = cs.load_dataset(cfg.data.name, root=cfg.data.root, seed=cfg.train.seed)
    torch.manual_seed(0)
    model, methods, problem, optimizers = cs.training.build_trainer(cfg, dataset)
    gates = methods[0] if methods else None
    if end_state:
        ck = cs.training.load_checkpoint(run_dir / "checkpoint.pt")
        model.load_state_dict(ck["model"])
        problem.load_state_dict(ck["cmp"])
        optimizers.cooper_optimizer.load_state_dict(ck["optimizer"])
        for method, state in zip(methods, ck.get("methods", [])):  # step counters, generators
            method.load_state_dict(state)
    model.train()
    return cfg, dataset, model, gates, problem, optimizers


def train_batches(dataset, batch_size: int) -> list:  # type: ignore[no-untyped-def]
    """The training set as one epoch's list of ``(inputs, labels)`` batches, shuffled with seed 0."""
    import constrained_sparsity as cs

    gen = torch.Generator().manual_seed(0)
    return list(cs.data.batches(dataset.train_x, dataset.train_y, batch_size, gen))


def dense_and_compact(run_dir: str | Path):  # type: ignore[no-untyped-def]
    """``(cfg, dataset, input_shape, dense, compact)`` of a finished run, both in eval mode.

    Dense is the trained architecture with the gates folded in and ``fast_pooling``;
    compact is ``compact(..., select_inputs=True)`` with the run's methods folded in
    (merging layers when the run had layer sparsity), as ``csparse compact`` writes it.
    """
    from constrained_sparsity.compact import fast_pooling
    from constrained_sparsity.graph import bake
    from constrained_sparsity.runs import compact_trained, load_run

    trained = load_run(run_dir)
    shape = tuple(trained.dataset.input_shape)
    dense = fast_pooling(bake(trained.model)).float().eval()
    small = compact_trained(trained).module.float().eval()
    return trained.cfg, trained.dataset, shape, dense, small


def markdown_header(report: dict, details: str = "") -> list[str]:
    return [f"command: `{report['command']}`  ", f"machine: {report['machine']}{details}", ""]


def write(out: Path, stem: str, report: dict, lines: list[str]) -> None:
    """``OUT/STEM.json`` and ``OUT/STEM.md``; the Markdown is printed too."""
    (out / f"{stem}.json").write_text(json.dumps(report, indent=2))
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def interleaved_timing(results: dict, rounds: int, steps: int, batch_size: int | None = None) -> dict:
    """Median seconds per training epoch of each run, at its start and end state, interleaved.

    ``results`` maps a name to a dict with the ``run_dir`` of a finished run.

    On batches of ``batch_size`` (default: the runs' own); an epoch is as many steps as
    that batch size needs to cover the training set.
    """
    import constrained_sparsity as cs

    setups = {}
    dataset = None
    flush = set()
    for key, r in results.items():
        for phase in ("start", "end"):
            cfg, dataset, _, _, problem, optimizers = rebuild_trainer(r["run_dir"], phase == "end", dataset)
            flush.add(cfg.train.flush_denormal)
            setups[(key, phase)] = (problem, optimizers, cfg.sparsity.dual_restarts, cfg.data.batch_size)
    assert dataset is not None
    # as in training (train.flush_denormal, on in every config): Adam's moments of pruned
    # columns decay into denormal floats, which are 10-100x slower on this CPU otherwise
    if len(flush) != 1:
        raise SystemExit(f"the runs disagree on train.flush_denormal: {flush}")
    torch.set_flush_denormal(flush.pop())
    data = train_batches(dataset, batch_size or next(iter(setups.values()))[3])
    steps_per_epoch = len(data)
    times: dict = collections.defaultdict(list)
    for r in range(rounds):
        for k, (problem, optimizers, restarts, _) in setups.items():
            t0 = time.perf_counter()
            for i in range(steps):
                x, y = data[(r * steps + i) % len(data)]
                cs.train_step(problem, optimizers, x, y, restarts)
            times[k].append((time.perf_counter() - t0) / steps)
    return {f"{k[0]}/{k[1]}": statistics.median(v) * steps_per_epoch for k, v in times.items()}
