"""Penalised vs constrained training, side by side (``csparse compare``).

For one config (model, data, method) and a list of budgets, a comparison runs:

* constrained training for each budget (the multiplier is learned);
* penalised training on a grid of lambdas (the multiplier is frozen);
* with ``bisect``, a search over lambda on a log scale per budget until the achieved measure
  is within ``tol`` of the budget or ``budget`` runs are spent -- the baseline of the
  constrained-L0 paper, which counts the runs and the time a penalty needs to hit a target.

It writes ``results.csv``, ``results.md``, ``error_vs_density.png`` and one
``dynamics_<run>.png`` per run (measure and multiplier over epochs, the budget as a line)
into the comparison directory. Every run carries the W&B group of the comparison and the
job type ``constrained`` / ``penalized``; a last W&B run of the group logs the results as a
``wandb.Table``.

The compared method is the one the config declares budgets for (``sparsity.method``, or a
section such as ``sparsity.layers``); budgets are in its units -- densities for L0 (model-wise,
or one list per layer: ``"0.5,0.3,0.8"``), counts of layers for layer sparsity. The method
says where its budget and penalty live in the config (``budget_key``, ``lambda_key``), how
close a bisection must land (``compare_tolerance``) and what the budget counts.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .config import Config, DeclaredMethod, apply_overrides, config_from_dict
from .errors import ConfigError, TrainingDiverged
from .jobs import Runner
from .lambda_search import BisectResult, JointSearchResult, bisect_lambda, joint_search
from .lambda_search import within as _within
from .methods import method_spec
from .numbers import within
from .training import RunResult, build_trainer, dataset_for
from .training.rundir import new_run_dir, prepare_run_dir

__all__ = [
    "SEARCHES",
    "BisectResult",
    "Comparison",
    "JointSearchResult",
    "MethodsComparison",
    "PreparedComparison",
    "bisect_lambda",
    "compare",
    "compare_methods",
    "joint_search",
    "parse_budget",
    "prepare_methods",
]

SEARCHES = ("joint", "per-budget")


# -- the comparison -----------------------------------------------------------------------------
def parse_budget(text: str) -> float | list[float]:
    """``"0.3"`` -> 0.3 (model-wise); ``"0.5,0.3,0.8"`` -> a per-layer list."""
    try:
        values = [float(v) for v in str(text).split(",")]
    except ValueError:
        raise ConfigError(f"--targets {text!r}: expected a number or comma-separated numbers") from None
    if not all(math.isfinite(v) for v in values):
        raise ConfigError(f"--targets {text!r}: budgets should be finite numbers")
    return values[0] if len(values) == 1 and "," not in str(text) else values


def parse_lambda(text: str) -> float:
    """One value of ``--lambdas``: a finite number >= 0."""
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"--lambdas {text!r}: expected a number") from None
    if not within(value, 0):
        raise ConfigError(f"--lambdas {text!r}: every λ should be a finite number >= 0")
    return value


class _Method:
    """How a comparison talks to the compared method: overrides in, measures out.

    Everything comes from the method's class attributes and from the runs' target entries
    (``summary.json``'s ``targets``): no method is named here.
    """

    def __init__(self, declared: DeclaredMethod) -> None:
        self.cls = declared.cls
        self.prefix = declared.prefix
        self.tol = declared.cls.compare_tolerance
        self.spec = method_spec(declared.cls)
        self.names: list[str] = []  # target names, learnt from the first run
        self.label = declared.cls.measure_label if declared.cls.count_budget else f"exact {declared.cls.measure_label}"
        # the mode of its runs at a budget: constrained, or projected for a method that meets
        # its budget by construction (it has no penalty, so no lambda to search)
        self.own_mode = declared.cls.budget_mode()
        self.has_penalty = declared.cls.has_penalty()

    def _budget(self, budget: Any) -> str:
        if self.cls.count_budget:
            values = budget if isinstance(budget, list) else [budget]
            if not all(float(b).is_integer() for b in values):
                raise ConfigError(f"--targets {_slug(budget)}: {self.cls.measure_label} budgets are whole numbers")
            return json.dumps([int(b) for b in budget] if isinstance(budget, list) else int(budget))
        return json.dumps(budget)

    def constrained(self, budget: Any) -> list[str]:
        return [f"sparsity.mode={self.own_mode}", f"{self.prefix}{self.cls.budget_key}={self._budget(budget)}"]

    def penalized(self, budget: Any, lam: list[float]) -> list[str]:
        lams = json.dumps(lam if isinstance(budget, list) else lam[0])
        return [
            "sparsity.mode=penalized",
            f"{self.prefix}{self.cls.budget_key}={self._budget(budget)}",
            f"{self.prefix}{self.cls.lambda_key}={lams}",
        ]

    def _targets(self, result: RunResult) -> list[dict[str, Any]]:
        found = [t for t in result.targets if t["method"] == self.spec]
        if not self.names:
            self.names = [t["name"] for t in found]
        return found

    def measure(self, result: RunResult, budget: Any) -> list[float]:
        return [float(t["exact"]) for t in self._targets(result)]

    def history_measure(self, row: dict[str, Any], result: RunResult) -> list[float]:
        return [
            float(row.get(t["metric"], float("nan"))) if t["metric"] else float("nan") for t in self._targets(result)
        ]

    def multiplier_keys(self, result: RunResult) -> list[str]:
        return [f"constraint/{t['name']}/multiplier" for t in self._targets(result)]

    def per_layer(self, result: RunResult) -> dict[str, Any]:
        rows = [r for r in result.layers if r.get("method") == self.spec]
        return {r["name"]: round(float(r["value"]), 4) for r in rows if "value" in r}

    def budgets(self, budget: Any) -> list[float]:
        return [float(b) for b in budget] if isinstance(budget, list) else [float(budget)]


def _method_of(cfg: Config) -> _Method:
    declared = cfg.sparsity.declarations()
    if len(declared) > 1:
        names = ", ".join(d.cls.name for d in declared)
        raise ConfigError(f"compare: the config declares budgets for several methods ({names}); compare one at a time")
    if not declared:
        raise ConfigError(
            "compare: the config declares no sparsity budget (sparsity.method, or a section such as sparsity.layers)"
        )
    return _Method(declared[0])


@dataclass
class Comparison:
    """What :func:`compare` wrote and measured."""

    out_dir: Path
    rows: list[dict[str, Any]]
    bisections: dict[str, BisectResult]
    plots: list[Path]


_COLUMNS = [
    "method",
    "search",
    "target",
    "lambda",
    "achieved",
    "per_layer",
    "test_error",
    "feasible",
    "runs_used",
    "wall_time_s",
    "run_dir",
]


def compare(
    cfg: Config,
    targets: Sequence[Any],
    lambdas: Sequence[float] = (),
    bisect: bool = False,
    tol: float | None = None,
    max_runs: int = 8,
    lambda_range: tuple[float, float] | None = None,
    out_dir: str | Path | None = None,
    progress: Callable[[str], None] | None = print,
    overwrite: bool = False,
    search: str = "joint",
    jobs: int = 1,
    threads: int | None = None,
    runner: Runner | None = None,
) -> Comparison:
    """Run the comparison (see the module docstring) and write its files into ``out_dir``.

    ``search``: with ``bisect``, ``"joint"`` searches one λ for every (model-wise) budget at
    once (:func:`joint_search`, at most ``max_runs`` runs per budget in all); ``"per-budget"``
    bisects each budget on its own (:func:`bisect_lambda`, ``max_runs`` each; per-layer
    budgets always). ``jobs`` trainings run at once, ``threads`` threads each (see
    :class:`Runner`; or pass a ``runner`` to share one). Every argument and every run's
    config is checked before anything runs or is written (:class:`ConfigError` naming the
    option or key).
    """
    _check_options(targets, lambdas, tol, max_runs, lambda_range, search, jobs, threads)
    method = _method_of(cfg)
    _check_penalty(method, lambdas, bisect)
    _check_runs(cfg, method, targets, lambdas, bisect)
    if out_dir is not None:
        out = prepare_run_dir(
            out_dir, overwrite, ("results.csv", "runs"), "--out", "a comparison", "start it over with --overwrite"
        )
        name = f"compare-{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    else:
        out = new_run_dir(cfg.tracking.out_dir, f"compare-{cfg.name}")
        name = out.name
    options = _Options(targets, lambdas, bisect, search, tol, max_runs, lambda_range)
    with _runner(runner, jobs, threads, progress) as active:
        plan = _Plan(cfg, method, options, out, cfg.tracking.group or name, active)
        return plan.finish(active.play(plan.tasks()))


class _runner:
    """The runner given, or one of ``jobs`` made (and closed) for one comparison."""

    def __init__(self, given: Runner | None, jobs: int, threads: int | None, say: Callable[[str], None] | None):
        self.given = given
        self.made = None if given is not None else Runner(jobs, threads, say=say)

    def __enter__(self) -> Runner:
        return self.given or self.made  # type: ignore[return-value]

    def __exit__(self, *exc: object) -> None:
        if self.made is not None:
            self.made.close()


def _check_options(
    targets: Sequence[Any],
    lambdas: Sequence[float],
    tol: float | None,
    max_runs: int,
    lambda_range: tuple[float, float] | None,
    search: str = "joint",
    jobs: int = 1,
    threads: int | None = None,
) -> None:
    if not targets:
        raise ConfigError("compare: give at least one target (--targets)")
    if not all(within(lam, 0) for lam in lambdas):
        raise ConfigError(f"--lambdas {list(lambdas)}: every λ should be a finite number >= 0")
    if tol is not None and not within(tol, 0):
        raise ConfigError(f"--tol {tol}: should be a finite number >= 0")
    if max_runs < 1:
        raise ConfigError(f"--max-runs {max_runs}: should be >= 1")
    if search not in SEARCHES:
        raise ConfigError(f"--search {search}: should be one of {', '.join(SEARCHES)}")
    if jobs < 1:
        raise ConfigError(f"--jobs {jobs}: should be >= 1")
    if threads is not None and threads < 1:
        raise ConfigError(f"--threads {threads}: should be >= 1")
    if lambda_range is None:  # each method's own
        return
    lo, hi = lambda_range
    if not (within(lo, above=0) and within(hi, above=lo)):
        raise ConfigError(f"--lambda-range {lo} {hi}: should satisfy 0 < LO < HI (finite)")


def _check_penalty(method: _Method, lambdas: Sequence[float], bisect: bool) -> None:
    if (lambdas or bisect) and not method.has_penalty:
        raise ConfigError(
            f"compare: {method.spec} meets its budget by construction (mode {method.own_mode}) and has no "
            "penalty; compare it without --lambdas / --bisect"
        )


@dataclass(frozen=True)
class _Options:
    """What a comparison runs, besides the config and method."""

    targets: Sequence[Any]
    lambdas: Sequence[float]
    bisect: bool
    search: str
    tol: float | None
    max_runs: int
    lambda_range: tuple[float, float] | None


# A task's output: the table's rows (row, result, budget) and every run it made (for the plots).
_Made = tuple[list[tuple[dict[str, Any], RunResult, Any]], list[tuple[dict[str, Any], RunResult, Any]]]


class _Plan:
    """One method's comparison as tasks (each a sequence of runs, see :class:`Runner`), then
    its files from what the tasks made."""

    def __init__(self, cfg: Config, method: _Method, options: _Options, out: Path, group: str, runner: Runner):
        self.cfg, self.method, self.options = cfg, method, options
        self.out, self.group, self.runner = out, group, runner
        self.base = cfg.to_dict()
        self.tol = method.tol if options.tol is None else options.tol
        self.bisections: dict[str, BisectResult | JointSearchResult] = {}

    # -- the runs
    def _run(self, label: str, job_type: str, overrides: list[str]) -> RunResult:
        data = apply_overrides(json.loads(json.dumps(self.base)), overrides)
        data["name"] = f"{self.cfg.name}-{label}"
        data["tracking"].update(group=self.group, job_type=job_type, out_dir=str(self.out / "runs"))
        return self.runner.train(config_from_dict(data), self.out / "runs" / label, label=f"{self.cfg.name} {label}")

    def _try_run(self, label: str, overrides: list[str]) -> RunResult | None:
        """A penalised run of a λ search; ``None`` when it diverged (the search takes that as a
        penalty too strong and goes on)."""
        try:
            return self._run(label, "penalized", overrides)
        except TrainingDiverged as exc:
            self.runner.progress.say(f"[compare] {label}: diverged, counted as a penalty too strong ({exc})")
            return None

    def _row(self, label: str, search: str, result: RunResult, budget: Any, lam: Any, runs: int, wall: float) -> dict:
        method = self.method
        achieved = method.measure(result, budget)
        feasible: Any = "-"
        if budget is not None:
            feasible = all(_within(a, b) for a, b in zip(achieved, method.budgets(budget)))
        return {
            "label": label,
            "method": method.own_mode if search == "-" else "penalized",
            "search": search,
            "target": "-" if budget is None else budget,
            "lambda": "-" if lam is None else lam,
            "achieved": achieved[0] if len(achieved) == 1 else achieved,
            "per_layer": method.per_layer(result),
            "test_error": result.test_error,
            "feasible": feasible,
            "runs_used": runs,
            "wall_time_s": round(wall, 2),
            "run_dir": str(result.run_dir),
        }

    def _budget_run(self, budget: Any) -> _Made:
        label = f"{self.method.own_mode}-{_slug(budget)}"
        result = self._run(label, self.method.own_mode, self.method.constrained(budget))
        row = self._row(label, "-", result, budget, None, 1, result.wall_time_s)
        return [(row, result, budget)], [(row, result, budget)]

    def _grid_run(self, lam: float) -> _Made:
        reference = self.options.targets[0]
        label = f"penalized-grid-{lam:g}"
        lam_vec = [float(lam)] * len(self.method.budgets(reference))
        result = self._run(label, "penalized", self.method.penalized(reference, lam_vec))
        row = self._row(label, "grid", result, None, lam, 1, result.wall_time_s)
        return [(row, result, None)], [(row, result, None)]

    def _bisection(self, budget: Any) -> _Made:
        method, every_run = self.method, []
        seen: dict[tuple[float, ...], tuple[RunResult, str]] = {}

        def evaluate(lam: list[float]) -> list[float] | None:
            label = f"penalized-bisect-{_slug(budget)}-{len(seen) + 1}"
            result = self._try_run(label, method.penalized(budget, lam))
            seen[tuple(lam)] = (result, label)
            if result is None:
                return None
            every_run.append(({"label": label, "lambda": lam[0] if len(lam) == 1 else lam}, result, budget))
            return method.measure(result, budget)

        bracket = self.options.lambda_range or method.cls.lambda_range
        found = bisect_lambda(evaluate, method.budgets(budget), *bracket, tol=self.tol, budget=self.options.max_runs)
        self.bisections[_slug(budget)] = found
        self.runner.progress.drop(self.options.max_runs - found.runs)
        result, label = seen[tuple(found.lam)]
        if result is None:
            raise TrainingDiverged(f"every run of the λ bisection for {budget} diverged")
        lam_out: Any = found.lam[0] if len(found.lam) == 1 else [round(v, 6) for v in found.lam]
        wall = sum(r.wall_time_s for r, _ in seen.values() if r is not None)
        row = self._row(label, "bisect", result, budget, lam_out, found.runs, wall)
        row["search"] = f"bisect ({found.reason})"
        self.runner.progress.say(
            f"[compare] bisection for {budget}: lambda {lam_out}, {found.runs} runs, {found.reason}"
        )
        return [(row, result, budget)], every_run

    def _joint(self) -> _Made:
        method, targets, every_run = self.method, list(self.options.targets), []
        made: list[tuple[RunResult | None, str]] = []

        def evaluate(lam: float) -> float | None:
            label = f"penalized-search-{len(made) + 1}"
            result = self._try_run(label, method.penalized(targets[0], [lam]))
            made.append((result, label))
            if result is None:
                return None
            every_run.append(({"label": label, "lambda": lam}, result, None))
            return method.measure(result, targets[0])[0]

        bracket = self.options.lambda_range or method.cls.lambda_range
        cap = self.options.max_runs * len(targets)
        found = joint_search(evaluate, [float(t) for t in targets], *bracket, tol=self.tol, max_runs=cap)
        self.runner.progress.drop(cap - found.runs)
        wall = sum(r.wall_time_s for r, _ in made if r is not None)
        rows = []
        for budget, i, converged in zip(targets, found.chosen, found.converged):
            self.bisections[_slug(budget)] = found
            result, label = made[i]
            if result is None:
                raise TrainingDiverged(f"every run of the joint λ search ({method.spec}) diverged")
            row = self._row(label, "joint", result, budget, found.history[i][0], found.runs, wall)
            how = "within tolerance" if converged else "closest miss"
            row["search"] = f"joint ({how}; {found.runs} runs for {len(targets)} budgets)"
            rows.append((row, result, budget))
        lams = ", ".join(f"{t}: {found.history[i][0]:.4g}" for t, i in zip(targets, found.chosen))
        self.runner.progress.say(f"[compare] joint λ search: {lams}; {found.runs} runs, {found.reason}")
        return rows, every_run

    def joint(self) -> bool:
        """Whether the λ search is one joint search: ``search="joint"``, model-wise budgets, and
        penalised runs that do not depend on the budget. A run that ends with the finishing
        phase (the re-weighted methods' magnitude pruning to the budget) does, so its budgets
        are bisected one by one."""
        o = self.options
        if o.search != "joint" or any(isinstance(t, list) for t in o.targets):
            return False
        penalised = config_from_dict(apply_overrides(self.cfg.to_dict(), self.method.penalized(o.targets[0], [1.0])))
        return not penalised.finishing(self.method.cls.finishes)[0]

    def tasks(self) -> list[Callable[[], _Made]]:
        """Searches first (the longest tasks), then the budget runs, then the λ grid."""
        o = self.options
        searches: list[Callable[[], _Made]] = []
        if o.bisect:  # at most max_runs runs per budget either way
            searches = [self._joint] if self.joint() else [lambda b=b: self._bisection(b) for b in o.targets]
            self.runner.progress.plan(o.max_runs * len(o.targets))
        self.runner.progress.plan(len(o.targets) + len(o.lambdas))
        budget_runs = [lambda b=b: self._budget_run(b) for b in o.targets]
        grid = [lambda lam=lam: self._grid_run(lam) for lam in o.lambdas]
        self.kinds = ["search"] * len(searches) + ["budget"] * len(budget_runs) + ["grid"] * len(grid)
        return [*searches, *budget_runs, *grid]

    # -- the files
    def finish(self, made: list[_Made]) -> Comparison:
        """The table (budget runs, grid, searches: as a reader scans it), plots and W&B table."""
        kinds = ("budget", "grid", "search")
        ordered = [m for kind in kinds for m, k in zip(made, self.kinds) if k == kind]
        results = [entry for rows, _ in ordered for entry in rows]
        every_run = [entry for _, runs in ordered for entry in runs]
        rows = [row for row, _, _ in results]
        plots = _plots(self.out, results, every_run, self.method, self.options.targets)
        _write_tables(self.out, rows, self.method)
        _log_table(self.cfg, self.group, self.out, rows)
        return Comparison(self.out, rows, dict(self.bisections), plots)


def _check_runs(cfg: Config, method: _Method, targets: Sequence[Any], lambdas: Sequence[float], bisect: bool) -> None:
    """Build every run the comparison will start (model, methods, budgets), so that a bad
    budget is refused before the first run, not after the others."""
    dataset = dataset_for(cfg)
    overrides = [method.constrained(b) for b in targets]
    overrides += [method.penalized(targets[0], [lam] * len(method.budgets(targets[0]))) for lam in lambdas]
    if bisect:
        overrides += [method.penalized(b, [1.0] * len(method.budgets(b))) for b in targets]
    for extra in overrides:
        build_trainer(config_from_dict(apply_overrides(cfg.to_dict(), extra)), dataset)


def _slug(budget: Any) -> str:
    if isinstance(budget, list):
        return "_".join(f"{b:g}" for b in budget)
    return f"{float(budget):g}"


# -- outputs -------------------------------------------------------------------------------------
def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return str(value)


def _write_tables(out: Path, rows: list[dict[str, Any]], method: _Method) -> None:
    with (out / "results.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _cell(row[k]) if isinstance(row[k], (list, dict)) else row[k] for k in _COLUMNS})
    measure = method.label
    lines = [
        f"| method | search | target | λ | achieved {measure} | per layer | test error | feasible | runs | wall s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['search']} | {_cell(r['target'])} | {_cell(r['lambda'])} | "
            f"{_cell(r['achieved'])} | {_cell(r['per_layer'])} | {100 * r['test_error']:.2f} % | "
            f"{_cell(r['feasible'])} | {r['runs_used']} | {r['wall_time_s']:.1f} |"
        )
    (out / "results.md").write_text("\n".join(lines) + "\n")


def _plots(
    out: Path,
    results: list[tuple[dict, RunResult, Any]],
    every_run: list[tuple[dict, RunResult, Any]],
    method: _Method,
    targets: Sequence[Any],
) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    measure = method.label
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    styles = {
        "constrained": ("o", "tab:blue"),
        "projected": ("D", "tab:green"),
        "grid": ("s", "tab:orange"),
        "bisect": ("^", "tab:red"),
    }
    labels = {
        "constrained": "constrained",
        "projected": "projected (budget by construction)",
        "grid": "penalized (λ grid)",
        "bisect": "penalized (bisection)",
    }

    def kind_of(row: dict[str, Any]) -> str:
        return row["method"] if row["method"] != "penalized" else row["search"].split()[0]

    for kind, (marker, color) in styles.items():
        pts = [
            (_model_density(res) if isinstance(r["achieved"], list) else r["achieved"], 100 * r["test_error"])
            for r, res, _ in results
            if kind_of(r) == kind
        ]
        if pts:
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], marker=marker, color=color, label=labels[kind])
    for budget in targets:
        if not isinstance(budget, list):
            ax.axvline(float(budget), color="gray", linestyle="--", linewidth=1)
    ax.set_xlabel(measure)
    ax.set_ylabel("test error (%)")
    ax.set_title("test error vs sparsity (dashed: targets)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = out / "error_vs_density.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    paths.append(path)

    for row, result, budget in every_run:
        hist = result.history
        if not hist:
            continue
        epochs = [h["epoch"] for h in hist]
        ref = budget if budget is not None else targets[0]
        fig, (top, bottom) = plt.subplots(2, 1, figsize=(6.4, 5.6), sharex=True)
        series = [method.history_measure(h, result) for h in hist]
        names = [t["name"] for t in method._targets(result)]
        for i, name in enumerate(names):
            top.plot(epochs, [s[i] for s in series], marker=".", label=name)
        for i, b in enumerate(method.budgets(ref) if budget is not None else []):
            top.axhline(b, color=f"C{i}", linestyle="--", linewidth=1)
        top.set_ylabel(measure)
        title = row["label"]
        if row.get("lambda") not in (None, "-"):
            title += f", λ = {_cell(row['lambda'])}"
        if budget is not None:
            title += f", target {_cell(budget)} (dashed)"
        top.set_title(title, fontsize=10)
        top.grid(alpha=0.3)
        top.legend(fontsize=8)
        for key in method.multiplier_keys(result):
            bottom.plot(epochs, [h.get(key, float("nan")) for h in hist], marker=".", label=key.split("/")[1])
        bottom.set_ylabel("multiplier λ")
        bottom.set_xlabel("epoch")
        bottom.grid(alpha=0.3)
        bottom.legend(fontsize=8)
        fig.tight_layout()
        path = out / f"dynamics_{row['label']}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths


def _model_density(result: RunResult) -> float:
    return float(result.density.get("model", float("nan")))


def _log_table(cfg: Config, group: str, out: Path, rows: list[dict[str, Any]]) -> None:
    from .tracking import resolve_wandb_mode

    mode = resolve_wandb_mode(cfg.tracking.wandb)
    if mode == "disabled":
        return
    import wandb

    kwargs = {
        "project": cfg.tracking.project,
        "group": group,
        "job_type": "comparison",
        "name": f"{group}-results",
        "dir": str(out),
        "settings": wandb.Settings(console="off", silent=True, init_timeout=60, x_save_requirements=False),
    }
    try:
        try:
            wb = wandb.init(mode=mode, entity=cfg.tracking.entity, **kwargs)
        except Exception:  # noqa: BLE001 - the comparison's files are written; W&B is a copy
            if mode != "online":
                raise
            wb = wandb.init(mode="offline", **kwargs)
        table = wandb.Table(columns=_COLUMNS, allow_mixed_types=True)
        for r in rows:
            table.add_data(*[_cell(r[k]) if isinstance(r[k], (list, dict)) else r[k] for k in _COLUMNS])
        wb.log({"comparison/results": table})
        wb.finish()
    except Exception as exc:  # noqa: BLE001
        warnings.warn(f"W&B could not log the comparison table ({type(exc).__name__}: {exc}); see {out}", stacklevel=2)


# -- several methods on one page ----------------------------------------------------------------
@dataclass
class MethodsComparison:
    """What :func:`compare_methods` wrote: one :class:`Comparison` per method (in
    ``out_dir/<label>``) and the rows of the joint table (each with ``config`` and ``label``)."""

    out_dir: Path
    comparisons: dict[str, Comparison]
    rows: list[dict[str, Any]]
    plot: Path


def compare_methods(
    cfgs: Sequence[Config],
    targets: Sequence[Any],
    lambdas: Sequence[float] = (),
    bisect: bool = False,
    tol: float | None = None,
    max_runs: int = 8,
    lambda_range: tuple[float, float] | None = None,
    out_dir: str | Path | None = None,
    progress: Callable[[str], None] | None = print,
    overwrite: bool = False,
    search: str = "joint",
    jobs: int = 1,
    threads: int | None = None,
    runner: Runner | None = None,
) -> MethodsComparison:
    """:func:`compare` for each config (one method each, e.g. ``l0``, ``cges``, ``rw_l1``), at the
    same budgets, with one joint table (``results.csv`` / ``results.md``: method, mode, the
    achieved measure, error, feasibility, runs and wall time -- for a λ search, the time of
    all its runs: what hitting the budget with a penalty costs), one error-vs-measure plot
    with a line per method and mode (``error_vs_density.png``), and every run in one W&B
    group. Each method's own comparison is in ``out_dir/<label>``. The runs of every method
    share the ``jobs``.

    Every config and run is checked before anything runs (:class:`ConfigError`).
    """
    prepared = prepare_methods(
        cfgs, targets, lambdas, bisect, tol, max_runs, lambda_range, out_dir, overwrite, search, jobs, threads
    )
    with _runner(runner, jobs, threads, progress) as active:
        plans = prepared.plans(active)
        tasks = [task for plan in plans for task in plan.tasks()]
        return prepared.finish(plans, active.play(tasks))


@dataclass
class PreparedComparison:
    """A checked :func:`compare_methods` whose directory exists and whose runs have not
    started: :meth:`plans` gives each method's tasks for a :class:`Runner` (several
    comparisons can share one, as the results page's seeds do), :meth:`finish` writes the
    joint files from what they made."""

    out: Path
    group: str
    cfgs: list[Config]
    methods: list[_Method]
    labels: list[str]
    options: _Options

    def plans(self, runner: Runner) -> list[_Plan]:
        out = []
        for label, cfg, method in zip(self.labels, self.cfgs, self.methods):
            penalty = method.has_penalty
            o = self.options
            note = "" if penalty or not (o.lambdas or o.bisect) else f"; no penalty: {method.own_mode} runs only"
            runner.progress.say(f"[compare] method {label} ({cfg.name}{note})")
            grouped = config_from_dict(apply_overrides(cfg.to_dict(), [f"tracking.group={self.group}"]))
            own = dataclasses.replace(o, lambdas=o.lambdas if penalty else (), bisect=o.bisect and penalty)
            (self.out / label).mkdir(parents=True, exist_ok=True)
            out.append(_Plan(grouped, method, own, self.out / label, self.group, runner))
        return out

    def finish(self, plans: list[_Plan], made: list[_Made]) -> MethodsComparison:
        comparisons: dict[str, Comparison] = {}
        rows: list[dict[str, Any]] = []
        start = 0
        for label, cfg, plan in zip(self.labels, self.cfgs, plans):
            n = len(plan.kinds)  # the tasks this plan gave
            comparisons[label] = comparison = plan.finish(made[start : start + n])
            start += n
            rows += [{**r, "label": label, "config": cfg.name} for r in comparison.rows]
        _write_joint_tables(self.out, rows, self.methods[0].label)
        plot = _joint_plot(self.out, rows, self.methods[0].label, self.options.targets)
        return MethodsComparison(self.out, comparisons, rows, plot)


def prepare_methods(
    cfgs: Sequence[Config],
    targets: Sequence[Any],
    lambdas: Sequence[float] = (),
    bisect: bool = False,
    tol: float | None = None,
    max_runs: int = 8,
    lambda_range: tuple[float, float] | None = None,
    out_dir: str | Path | None = None,
    overwrite: bool = False,
    search: str = "joint",
    jobs: int = 1,
    threads: int | None = None,
) -> PreparedComparison:
    """Check a :func:`compare_methods` (its configs, options and every run) and make its
    directory; nothing is trained."""
    if not cfgs:
        raise ConfigError("compare: give at least one config")
    methods = [_method_of(c) for c in cfgs]
    if len({m.cls.count_budget for m in methods}) > 1:
        raise ConfigError("compare: layer counts and densities cannot share budgets; compare them separately")
    specs = [m.spec for m in methods]
    labels = [s if specs.count(s) == 1 else f"{c.name}" for s, c in zip(specs, cfgs)]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"compare: the configs {labels} repeat; give each method once")
    _check_options(targets, lambdas, tol, max_runs, lambda_range, search, jobs, threads)
    if (lambdas or bisect) and not any(m.has_penalty for m in methods):
        _check_penalty(methods[0], lambdas, bisect)
    for cfg, method in zip(cfgs, methods):  # a method without a penalty gets its budget runs only
        _check_runs(cfg, method, targets, lambdas if method.has_penalty else (), bisect and method.has_penalty)
    if out_dir is not None:
        out = prepare_run_dir(
            out_dir, overwrite, ("results.csv", *labels), "--out", "a comparison", "start it over with --overwrite"
        )
    else:
        out = new_run_dir(cfgs[0].tracking.out_dir, "compare-methods")
    options = _Options(targets, lambdas, bisect, search, tol, max_runs, lambda_range)
    return PreparedComparison(out, cfgs[0].tracking.group or out.name, list(cfgs), methods, labels, options)


def _mode(row: dict[str, Any]) -> str:
    return row["method"] if row["method"] != "penalized" else f"penalized ({row['search'].split()[0]})"


def _write_joint_tables(out: Path, rows: list[dict[str, Any]], measure: str) -> None:
    columns = ["label", "config", *_COLUMNS]
    with (out / "results.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _cell(row[k]) if isinstance(row[k], (list, dict)) else row[k] for k in columns})
    lines = [
        f"| method | mode | target | λ | achieved {measure} | test error | feasible | runs | wall s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: (json.dumps(r["target"]), r["label"], _mode(r))):
        lines.append(
            f"| {r['label']} | {_mode(r)} | {_cell(r['target'])} | {_cell(r['lambda'])} | {_cell(r['achieved'])} | "
            f"{100 * r['test_error']:.2f} % | {_cell(r['feasible'])} | {r['runs_used']} | {r['wall_time_s']:.1f} |"
        )
    (out / "results.md").write_text("\n".join(lines) + "\n")


def _joint_plot(out: Path, rows: list[dict[str, Any]], measure: str, targets: Sequence[Any]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.0, 4.6))
    labels = list(dict.fromkeys(r["label"] for r in rows))
    markers = {
        "constrained": ("o", "-"),
        "projected": ("D", "-"),
        "penalized (bisect)": ("^", "--"),
        "penalized (grid)": ("s", ":"),
    }
    for i, label in enumerate(labels):
        for mode, (marker, style) in markers.items():
            pts = sorted(
                (float(np.mean(r["achieved"])) if isinstance(r["achieved"], list) else float(r["achieved"]),
                 100 * r["test_error"])
                for r in rows
                if r["label"] == label and _mode(r) == mode
            )  # fmt: skip
            if pts:
                ax.plot(
                    [p[0] for p in pts], [p[1] for p in pts], marker=marker, linestyle=style, color=f"C{i}",
                    label=f"{label}, {mode}",
                )  # fmt: skip
    for budget in targets:
        if not isinstance(budget, list):
            ax.axvline(float(budget), color="gray", linestyle="--", linewidth=1)
    ax.set_xlabel(measure + " (mean over layers for per-layer budgets)")
    ax.set_ylabel("test error (%)")
    ax.set_title("test error vs sparsity, per method and mode (dashed: budgets)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = out / "error_vs_density.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
