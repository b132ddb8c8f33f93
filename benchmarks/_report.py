"""Shared by the benchmark scripts: what each writes (the command, the machine, a JSON record and a
Markdown table), the overrides of its trainings, a run's trainer rebuilt from its directory, its
training batches, and its dense and compact networks."""

from __future__ import annotations

import collections
import copy
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
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

    Dense is the trained architecture with the gates folded in (unit gates too: into the
    BatchNorms and layers they scale, no hook left) and ``fast_pooling``; compact is
    ``compact(..., select_inputs=True)`` with the run's methods folded in (merging layers when
    the run had layer sparsity), as ``csparse compact`` writes it.
    """
    from constrained_sparsity.compact import fast_pooling, fold
    from constrained_sparsity.methods.base import UnitPruner
    from constrained_sparsity.runs import compact_trained, load_run

    trained = load_run(run_dir)
    shape = tuple(trained.dataset.input_shape)
    units = [m for m in trained.methods if isinstance(m, UnitPruner)]  # they fold without changing the layers
    dense = fast_pooling(fold(trained.model, units)).float().eval()
    small = compact_trained(trained).module.float().eval()
    return trained.cfg, trained.dataset, shape, dense, small


def latency_ms(module: torch.nn.Module, shape: tuple[int, ...], repeats: int = 20, batch: int = 256) -> float:
    """Median milliseconds of one eval-mode forward pass of a batch of ``batch`` random examples
    of ``shape`` (after 3 warm-up passes)."""
    x = torch.rand(batch, *shape)
    module = module.eval()
    with torch.inference_mode():
        for _ in range(3):
            module(x)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            module(x)
            times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def interleaved_latency_ms(
    nets: dict[str, torch.nn.Module], shape: tuple[int, ...], repeats: int, rounds: int, batch: int = 256
) -> dict[str, float]:
    """Each network's latency (eval, a batch of ``batch``): the median over ``rounds`` rounds,
    each timing every network in turn (the median of ``repeats`` passes, after 3 warm-up passes):
    drift on a shared machine hits every network alike."""
    times: dict[str, list[float]] = {k: [] for k in nets}
    for _ in range(rounds):
        for name, net in nets.items():
            times[name].append(latency_ms(net, shape, repeats, batch))
    return {k: statistics.median(v) for k, v in times.items()}


def inference_network(net: torch.nn.Module, channels_last: bool = False) -> torch.nn.Module:
    """A copy of ``net`` in eval mode with each BatchNorm folded into the conv before it
    (``csparse compact --fold-batchnorm``); ``channels_last``: its 4-d weights stored NHWC
    (``.to(memory_format=torch.channels_last)``), so that its convolutions run in that layout
    whatever the input's."""
    from constrained_sparsity.compact import fold_batchnorm_

    folded = copy.deepcopy(net).eval()
    fold_batchnorm_(folded)
    return folded.to(memory_format=torch.channels_last) if channels_last else folded


def first_feasible(history: list[dict]) -> int | None:
    """The first epoch of a run's log at which every budget holds (None: never, or no budget)."""
    for row in history:
        violations = [v for k, v in row.items() if k.endswith("/strict_violation")]
        if violations and all(v <= 0 for v in violations):
            return row["epoch"]
    return None


def existing_run(run_dir: Path, cfg, tag: str = "bench", same_threads: bool = False) -> str | None:  # type: ignore[no-untyped-def]
    """What ``run_dir`` holds of a run trained from ``cfg``: ``"complete"`` (its summary says
    so), ``"resumable"`` (:func:`_stopped`) or ``None`` (nothing, a run that diverged, or
    another config).

    Its ``config.yaml`` must equal ``cfg`` but for the output directory (a run moved elsewhere
    trains the same) and, unless ``same_threads`` (a run continues at its own threads), the
    thread count (the scripts take their timings again, interleaved, at the end). It is read
    as a run reads it, so a key added to the configs since, at its default, is no change."""
    import yaml

    from constrained_sparsity.config import ConfigError, config_from_dict

    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        return None
    try:
        saved = config_from_dict(yaml.safe_load(config_path.read_text())).to_dict()
    except ConfigError:  # a config this version refuses: not the same run
        return None
    wanted = cfg.to_dict()
    for d in (saved, wanted):
        if not same_threads:
            d.get("train", {}).pop("threads", None)
        d.get("tracking", {}).pop("out_dir", None)
    if saved != wanted:
        print(f"[{tag}] {run_dir.name}: config changed, training again", file=sys.stderr, flush=True)
        return None
    if _status(run_dir) == "complete":
        return "complete"
    return "resumable" if _stopped(run_dir) else None


def _status(run_dir: Path) -> str | None:
    summary = run_dir / "summary.json"
    return json.loads(summary.read_text()).get("status") if summary.is_file() else None


def _stopped(run_dir: Path) -> bool:
    """A run that stopped before its end with a checkpoint: killed (no summary yet) or
    interrupted; not one that failed (it diverged, and would again)."""
    return _status(run_dir) in (None, "interrupted") and (run_dir / "checkpoint.pt").is_file()


def load_result(run_dir: str | Path):  # type: ignore[no-untyped-def]
    """The ``RunResult`` of a finished run, rebuilt from its directory's summary and log."""
    import constrained_sparsity as cs

    run_dir = Path(run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    history = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    history = [h for h in history if not any(k.endswith("/epoch") for k in h)]
    return cs.RunResult(
        run_dir=run_dir,
        epochs=summary["epochs"],
        test_error=summary["test_error"],
        val_error=summary["val_error"],
        feasible=summary["feasible"],
        density=summary["density"],
        expected_density=summary["expected_density"],
        targets=summary["targets"],
        multipliers=summary["multipliers"],
        wall_time_s=summary["wall_time_s"],
        history=history,
        finish=summary.get("finish"),
    )


class KeptRuns:
    """A store of runs for a :class:`constrained_sparsity.jobs.Runner` (``store=``): each run
    trained under ``out`` is copied whole into ``keep`` (the same relative path), and a kept run
    of the same config (:func:`existing_run`) is copied back instead of trained again -- so a
    ``csparse compare`` that starts its directory over keeps its runs across invocations.

    With ``reuse``, a run that stopped under ``out`` (a checkpoint, no complete summary: the
    script was killed) is moved into ``keep`` when the store is made, before anything starts
    ``out`` over, and continued from its checkpoint when the same config (threads included) is
    asked for again. Whatever else a run's directory under ``out`` holds (a run of another
    config) is cleared before the run is trained there or put back."""

    def __init__(self, out: Path, keep: Path, reuse: bool, tag: str = "bench") -> None:
        self.out, self.keep, self.reuse, self.tag = Path(out), Path(keep), reuse, tag
        if reuse:
            self._stash_stopped()

    def _kept(self, run_dir: Path) -> Path:
        return self.keep / Path(run_dir).resolve().relative_to(self.out.resolve())

    def _stash_stopped(self) -> None:
        import shutil

        if not self.out.is_dir():
            return
        keep = self.keep.resolve()
        for checkpoint in sorted(self.out.rglob("checkpoint.pt")):
            run_dir = checkpoint.parent
            if not (run_dir / "config.yaml").is_file() or run_dir.resolve().is_relative_to(keep):
                continue  # not a run's directory, or kept already
            if not _stopped(run_dir):
                continue
            kept = self._kept(run_dir)
            if _status(kept) == "complete":
                continue  # a finished run of that name is worth more than a stopped one
            shutil.rmtree(kept, ignore_errors=True)
            kept.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(run_dir), str(kept))
            print(f"[{self.tag}] {run_dir.name}: stopped at its checkpoint, kept to continue", file=sys.stderr)

    def get(self, cfg, run_dir: Path):  # type: ignore[no-untyped-def]
        import shutil

        kept = self._kept(run_dir)
        shutil.rmtree(run_dir, ignore_errors=True)  # what is there is not this run: trained anew, or put back
        if not (self.reuse and existing_run(kept, cfg, self.tag) == "complete"):
            return None
        shutil.copytree(kept, run_dir)
        return load_result(run_dir)

    def resume(self, cfg, run_dir: Path) -> bool:  # type: ignore[no-untyped-def]
        import shutil

        kept = self._kept(run_dir)
        # its threads cannot change on resume: at other threads it is trained anew
        if not (self.reuse and existing_run(kept, cfg, self.tag, same_threads=True) == "resumable"):
            return False
        shutil.rmtree(run_dir, ignore_errors=True)
        shutil.copytree(kept, run_dir)
        return True

    def put(self, cfg, run_dir: Path, result):  # type: ignore[no-untyped-def]
        import shutil

        kept = self._kept(run_dir)
        shutil.rmtree(kept, ignore_errors=True)
        shutil.copytree(run_dir, kept)
        return result

    def fail(self, cfg, run_dir: Path, message: str) -> None:  # type: ignore[no-untyped-def]
        return None


def train_or_reuse(cfg, run_dir: Path, reuse: bool, tag: str = "bench"):  # type: ignore[no-untyped-def]
    """Train ``cfg`` into ``run_dir``; with ``reuse``, keep a complete run of the same config
    there, or resume a stopped one. Returns ``(RunResult, "kept" | "resumed" | "trained")``."""
    import constrained_sparsity as cs

    how = (existing_run(run_dir, cfg, tag) if reuse else None) or "new"
    if how == "complete":
        return load_result(run_dir), "kept"
    if how == "resumable":
        return cs.run(resume=run_dir), "resumed"
    return cs.run(cfg, run_dir=run_dir, overwrite=True), "trained"


def config_of(path: Path, overrides: list[str], dense: bool = False):  # type: ignore[no-untyped-def]
    """The config at ``path`` with ``overrides``; ``dense``: without its sparsity section."""
    from constrained_sparsity.config import apply_overrides, config_from_dict, read_config_dict

    data = read_config_dict(path)
    if dense:
        data["sparsity"] = {"method": "none"}
    return config_from_dict(apply_overrides(data, overrides))


def unit_counts(run_dir: str | Path) -> dict[str, int] | None:
    """The parameters and FLOPs per example that a finished run's unit method counts for its
    end state (``count(weighting)`` of ``l0_units`` / ``cges_units``: what compaction should
    leave), or None for a run without one."""
    from constrained_sparsity.methods.base import UnitPruner
    from constrained_sparsity.runs import load_run

    counting = [m for m in load_run(run_dir).methods if isinstance(m, UnitPruner)]  # as dense_and_compact
    if not counting:
        return None
    return {w: sum(m.count(w) for m in counting) for w in ("params", "flops")}


def budget_row(name: str, result, budget: float | None) -> dict:  # type: ignore[no-untyped-def]
    """A run at a deployable budget: test error, the exact measure times the dense count, the
    unit method's own parameter and FLOP counts (:func:`unit_counts`) next to the compact
    network's, the first epoch within the budget, feasible, the units the finishing phase closed."""
    run_dir = Path(result.run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    compaction = summary.get("compaction") or {}
    main = [row for row in result.history if "train/loss" in row]
    counted = unit_counts(run_dir) or {}
    return {
        "run": name,
        "budget": budget,
        "test_error": result.test_error,
        "density": result.density.get("model"),
        "measure_params": None if budget is None else result.density.get("model", 1.0) * compaction["params_before"],
        "counted_params": counted.get("params"),
        "counted_flops": counted.get("flops"),
        "params": compaction.get("params_after"),
        "flops": compaction.get("flops_after"),
        "first_feasible_epoch": first_feasible(main),
        "feasible": result.feasible,
        "finish_closed": (summary.get("finish") or {}).get("units_closed"),
        "run_dir": str(run_dir),
    }


def budget_args(doc: str, out: Path, max_runs: int, argv: list[str] | None):  # type: ignore[no-untyped-def]
    """The arguments of a benchmark at deployable budgets (:func:`budget_runs`), checked, with
    ``threads`` filled in (cores / jobs) and set for this process."""
    import argparse

    from constrained_sparsity.jobs import default_threads

    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None, help="threads per training (default: cores / jobs)")
    parser.add_argument("--jobs", type=int, default=1, help="trainings at once (the λ search's stay in order)")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--budgets", nargs="+", type=float, default=[0.5, 0.3])
    parser.add_argument("--max-runs", type=int, default=max_runs)
    parser.add_argument("--data", choices=["fashion_mnist", "digits"], default="fashion_mnist")
    parser.add_argument("--root", default=None, help="data.root: a directory with the Fashion-MNIST IDX files")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds")
    parser.add_argument("--steps", type=int, default=10, help="steps per timing round")
    parser.add_argument("--out", default=str(out))
    parser.add_argument("--reuse", action="store_true", help="keep the runs of OUT/kept, continue stopped ones")
    parser.add_argument(
        "--equality", action="store_true", help="also train each budget as an equality (sparsity.equality=true)"
    )
    args = parser.parse_args(argv)
    if args.epochs < 1 or args.max_runs < 1 or args.jobs < 1 or not all(0 < b < 1 for b in args.budgets):
        parser.error("--epochs, --max-runs and --jobs should be >= 1, --budgets in (0, 1)")
    args.threads = args.threads or default_threads(args.jobs)
    torch.set_num_threads(args.threads)  # this process times the runs and the compact networks
    return args


def budget_runs(  # type: ignore[no-untyped-def]
    runner, config: Callable, budgets: list[float], max_runs: int, out: Path, tag: str, equality: bool = False
) -> dict:
    """The runs of a benchmark at deployable budgets, played by ``runner``: the first budget as
    ``csparse compare --bisect`` runs it (its constrained run, and the penalised twin's λ search
    in ``OUT/<tag>-compare``), the dense run and the constrained runs at the later budgets (in
    ``OUT/runs/<tag>-dense``, ``OUT/runs/<tag>-constrained-<ε>``); with ``equality``, every
    budget's constrained run again with ``sparsity.equality=true`` (``OUT/runs/<tag>-equality-<ε>``).
    ``config(overrides, dense)`` makes a run's config.

    Returns ``dense`` and ``penalised`` (``RunResult``), ``constrained`` and ``equality``
    (budget: ``RunResult``), ``search`` (the search's row: ``lambda``, ``runs_used``,
    ``wall_time_s``) and ``rows`` (dense, then :func:`budget_row` of each constrained run, of
    each equality run and of the penalised one)."""
    from constrained_sparsity.compare import prepare_methods

    first, later = budgets[0], budgets[1:]
    prepared = prepare_methods(
        [config([])], [first], bisect=True, max_runs=max_runs, out_dir=out / f"{tag}-compare", overwrite=True,
        jobs=runner.jobs,
    )  # fmt: skip
    (plan,) = prepared.plans(runner)
    searched = plan.tasks()
    runs = out / "runs"
    equal = budgets if equality else []
    runner.progress.plan(1 + len(later) + len(equal))
    tasks = [*searched, lambda: runner.train(config([], dense=True), runs / f"{tag}-dense")]
    tasks += [
        lambda b=b: runner.train(config([f"sparsity.targets={b}"]), runs / f"{tag}-constrained-{b:g}") for b in later
    ]
    tasks += [
        lambda b=b: runner.train(
            config([f"sparsity.targets={b}", "sparsity.equality=true"]), runs / f"{tag}-equality-{b:g}"
        )
        for b in equal
    ]
    made = runner.play(tasks)
    found = plan.finish(made[: len(searched)])
    dense, *others = made[len(searched) : len(made) - len(equal)]
    equalities = dict(zip(equal, made[len(made) - len(equal) :]))
    (own,) = [r for r in found.rows if r["mode"] == "constrained"]
    (search,) = [r for r in found.rows if r["mode"] == "penalized"]
    constrained = {first: load_result(own["run_dir"]), **dict(zip(later, others))}
    penalised = load_result(search["run_dir"])
    rows = [{"run": "dense", "test_error": dense.test_error, "run_dir": str(dense.run_dir)}]
    rows += [budget_row(f"l0_units constrained, ε = {b:g}", result, b) for b, result in constrained.items()]
    rows += [budget_row(f"l0_units constrained, equality, ε = {b:g}", r, b) for b, r in equalities.items()]
    name = f"l0_units penalised, λ = {search['lambda']:.4g} (bisected to ε = {first:g})"
    rows.append(
        {
            **budget_row(name, penalised, first),
            "lambda": search["lambda"],
            "search_runs": search["runs_used"],
            "search_s": search["wall_time_s"],
        }
    )
    return {
        "dense": dense,
        "constrained": constrained,
        "equality": equalities,
        "penalised": penalised,
        "search": search,
        "rows": rows,
    }


def budget_table(rows: list[dict]) -> list[str]:
    """The Markdown table of :func:`budget_row` rows (and the dense row)."""
    lines = [
        "| run | test error | exact measure × dense params | counted params | compact params | counted FLOPs "
        "| compact FLOPs | first epoch ≤ ε | feasible |",
        "|---|---|---|---|---|---|---|---|---|",
    ]

    def number(value: float | None) -> str:
        return "-" if value is None else f"{value:,.0f}"

    for r in rows:
        feasible = {True: "yes", False: "no", None: "-"}[r.get("feasible")]
        if r.get("finish_closed"):
            feasible += f" (the finishing phase closed {r['finish_closed']} units)"
        lines.append(
            f"| {r['run']} | {100 * r['test_error']:.2f} % | {number(r.get('measure_params'))} | "
            f"{number(r.get('counted_params'))} | {number(r.get('params'))} | {number(r.get('counted_flops'))} | "
            f"{number(r.get('flops'))} | {r.get('first_feasible_epoch') or '-'} | {feasible} |"
        )
    return lines


def markdown_header(report: dict, details: str = "") -> list[str]:
    return [f"command: `{report['command']}`  ", f"machine: {report['machine']}{details}", ""]


def write(out: Path, stem: str, report: dict, lines: list[str]) -> None:
    """``OUT/STEM.json`` and ``OUT/STEM.md``; the Markdown is printed too."""
    (out / f"{stem}.json").write_text(json.dumps(report, indent=2))
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def probe_args(doc: str, sparse_run: str, compile_help: str):  # type: ignore[no-untyped-def]
    """The arguments of a probe of a dense run against a sparse one: their directories,
    ``--threads`` (set here), ``--rounds`` and ``--steps`` of the interleaved timing, ``--compile``."""
    import argparse

    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("dense_run")
    parser.add_argument(sparse_run)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--compile", action="store_true", help=compile_help)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    return args


def interleaved_ms(fns: dict[str, Callable[[int], None]], rounds: int, steps: int) -> dict[str, float]:
    """Median milliseconds per call of each ``fn(i)`` (i: the step), after 5 warm-up calls each,
    over ``rounds`` rounds that run ``steps`` calls of every function in turn."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values():
        for i in range(5):
            fn(i)
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            for i in range(steps):
                fn(i)
            times[name].append(1e3 * (time.perf_counter() - t0) / steps)
    return {k: statistics.median(v) for k, v in times.items()}


def interleaved_timing(results: dict, rounds: int, steps: int, batch_size: int | None = None) -> dict:
    """Median seconds per training epoch of each run, at its start and end state, interleaved.

    ``results`` maps a name to a dict with the ``run_dir`` of a finished run, and optionally
    ``adjust``: a function called with the rebuilt model before it is timed (a probe's variant).

    On batches of ``batch_size`` (default: the runs' own); an epoch is as many steps as
    that batch size needs to cover the training set.
    """
    import constrained_sparsity as cs

    setups = {}
    dataset = None
    flush = set()
    for key, r in results.items():
        for phase in ("start", "end"):
            cfg, dataset, model, _, problem, optimizers = rebuild_trainer(r["run_dir"], phase == "end", dataset)
            if "adjust" in r:
                r["adjust"](model)
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
