"""A comparison's runs as tasks for a :class:`~constrained_sparsity.jobs.Runner`: the budget runs,
the λ grid and the λ searches (joint, or a bisection per budget), checked before any runs."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import Config, apply_overrides, config_from_dict
from ..errors import ConfigError, TrainingDiverged
from ..jobs import Runner
from ..lambda_search import BisectResult, JointSearchResult, bisect_lambda, joint_search
from ..lambda_search import within as _within
from ..numbers import within
from ..training import RunResult, build_trainer, dataset_for
from .method import ComparedMethod, slug
from .outputs import Comparison, log_table, plots, write_tables

__all__ = [
    "SEARCHES",
    "Made",
    "SearchOptions",
    "SearchPlan",
    "check_options",
    "check_penalty",
    "check_runs",
    "shared_runner",
]

SEARCHES = ("joint", "per-budget")


class shared_runner:
    """The runner given, or one of ``jobs`` made (and closed) for one comparison."""

    def __init__(self, given: Runner | None, jobs: int, threads: int | None, say: Callable[[str], None] | None):
        self.given = given
        self.made = None if given is not None else Runner(jobs, threads, say=say)

    def __enter__(self) -> Runner:
        return self.given or self.made  # type: ignore[return-value]

    def __exit__(self, *exc: object) -> None:
        if self.made is not None:
            self.made.close()


def check_options(
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


def check_penalty(method: ComparedMethod, lambdas: Sequence[float], bisect: bool) -> None:
    if (lambdas or bisect) and not method.has_penalty:
        raise ConfigError(
            f"compare: {method.spec} meets its budget by construction (mode {method.own_mode}) and has no "
            "penalty; compare it without --lambdas / --bisect"
        )


@dataclass(frozen=True)
class SearchOptions:
    """What a comparison runs, besides the config and method."""

    targets: Sequence[Any]
    lambdas: Sequence[float]
    bisect: bool
    search: str
    tol: float | None
    max_runs: int
    lambda_range: tuple[float, float] | None


# A task's output: the table's rows (row, result, budget) and every run it made (for the plots).
Made = tuple[list[tuple[dict[str, Any], RunResult, Any]], list[tuple[dict[str, Any], RunResult, Any]]]


class SearchPlan:
    """One method's comparison as tasks (each a sequence of runs, see :class:`Runner`), then
    its files from what the tasks made."""

    def __init__(
        self, cfg: Config, method: ComparedMethod, options: SearchOptions, out: Path, group: str, runner: Runner
    ):
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
            "mode": method.own_mode if search == "-" else "penalized",
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

    def _budget_run(self, budget: Any) -> Made:
        label = f"{self.method.own_mode}-{slug(budget)}"
        result = self._run(label, self.method.own_mode, self.method.constrained(budget))
        row = self._row(label, "-", result, budget, None, 1, result.wall_time_s)
        return [(row, result, budget)], [(row, result, budget)]

    def _grid_run(self, lam: float) -> Made:
        reference = self.options.targets[0]
        label = f"penalized-grid-{lam:g}"
        lam_vec = [float(lam)] * len(self.method.budgets(reference))
        result = self._run(label, "penalized", self.method.penalized(reference, lam_vec))
        row = self._row(label, "grid", result, None, lam, 1, result.wall_time_s)
        return [(row, result, None)], [(row, result, None)]

    def _bisection(self, budget: Any) -> Made:
        method, every_run = self.method, []
        seen: dict[tuple[float, ...], tuple[RunResult, str]] = {}

        def evaluate(lam: list[float]) -> list[float] | None:
            label = f"penalized-bisect-{slug(budget)}-{len(seen) + 1}"
            result = self._try_run(label, method.penalized(budget, lam))
            seen[tuple(lam)] = (result, label)
            if result is None:
                return None
            every_run.append(({"label": label, "lambda": lam[0] if len(lam) == 1 else lam}, result, budget))
            return method.measure(result, budget)

        bracket = self.options.lambda_range or method.cls.spec.lambda_range
        found = bisect_lambda(evaluate, method.budgets(budget), *bracket, tol=self.tol, max_runs=self.options.max_runs)
        self.bisections[slug(budget)] = found
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

    def _joint(self) -> Made:
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

        bracket = self.options.lambda_range or method.cls.spec.lambda_range
        cap = self.options.max_runs * len(targets)
        found = joint_search(evaluate, [float(t) for t in targets], *bracket, tol=self.tol, max_runs=cap)
        self.runner.progress.drop(cap - found.runs)
        wall = sum(r.wall_time_s for r, _ in made if r is not None)
        rows = []
        for budget, i, converged in zip(targets, found.chosen, found.converged):
            self.bisections[slug(budget)] = found
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
        return not penalised.finishing(self.method.cls.spec.finishes)[0]

    def tasks(self) -> list[Callable[[], Made]]:
        """Searches first (the longest tasks), then the budget runs, then the λ grid."""
        o = self.options
        searches: list[Callable[[], Made]] = []
        if o.bisect:  # at most max_runs runs per budget either way
            searches = [self._joint] if self.joint() else [lambda b=b: self._bisection(b) for b in o.targets]
            self.runner.progress.plan(o.max_runs * len(o.targets))
        self.runner.progress.plan(len(o.targets) + len(o.lambdas))
        budget_runs = [lambda b=b: self._budget_run(b) for b in o.targets]
        grid = [lambda lam=lam: self._grid_run(lam) for lam in o.lambdas]
        self.kinds = ["search"] * len(searches) + ["budget"] * len(budget_runs) + ["grid"] * len(grid)
        return [*searches, *budget_runs, *grid]

    # -- the files
    def finish(self, made: list[Made | None]) -> Comparison:
        """The table (budget runs, grid, searches: as a reader scans it), plots and W&B table,
        from what each task made (in the order of :meth:`tasks`; ``None``: a task that made
        nothing, as a run that failed, left out)."""
        kinds = ("budget", "grid", "search")
        ordered = [m for kind in kinds for m, k in zip(made, self.kinds) if k == kind and m is not None]
        results = [entry for rows, _ in ordered for entry in rows]
        every_run = [entry for _, runs in ordered for entry in runs]
        rows = [row for row, _, _ in results]
        drawn = plots(self.out, results, every_run, self.method, self.options.targets)
        write_tables(self.out, rows, self.method.label)
        log_table(self.cfg, self.group, self.out, rows)
        return Comparison(self.out, rows, dict(self.bisections), drawn)


def check_runs(
    cfg: Config, method: ComparedMethod, targets: Sequence[Any], lambdas: Sequence[float], bisect: bool
) -> None:
    """Build every run the comparison will start (model, methods, budgets), so that a bad
    budget is refused before the first run, not after the others."""
    dataset = dataset_for(cfg)
    overrides = [method.constrained(b) for b in targets]
    overrides += [method.penalized(targets[0], [lam] * len(method.budgets(targets[0]))) for lam in lambdas]
    if bisect:
        overrides += [method.penalized(b, [1.0] * len(method.budgets(b))) for b in targets]
    for extra in overrides:
        build_trainer(config_from_dict(apply_overrides(cfg.to_dict(), extra)), dataset)
