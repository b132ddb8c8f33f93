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

import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import Config, apply_overrides, config_from_dict
from ..errors import ConfigError
from ..jobs import Runner
from ..lambda_search import BisectResult, JointSearchResult, bisect_lambda, joint_search
from ..training.rundir import new_run_dir, prepare_run_dir
from .method import ComparedMethod, method_of, parse_budget, parse_lambda
from .outputs import Comparison, joint_plot, write_tables
from .search import (
    SEARCHES,
    Made,
    SearchOptions,
    SearchPlan,
    check_options,
    check_penalty,
    check_runs,
    shared_runner,
)

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
    "parse_lambda",
    "prepare_methods",
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
    check_options(targets, lambdas, tol, max_runs, lambda_range, search, jobs, threads)
    method = method_of(cfg)
    check_penalty(method, lambdas, bisect)
    check_runs(cfg, method, targets, lambdas, bisect)
    if out_dir is not None:
        out = prepare_run_dir(
            out_dir, overwrite, ("results.csv", "runs"), "--out", "a comparison", "start it over with --overwrite"
        )
        name = f"compare-{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    else:
        out = new_run_dir(cfg.tracking.out_dir, f"compare-{cfg.name}")
        name = out.name
    options = SearchOptions(targets, lambdas, bisect, search, tol, max_runs, lambda_range)
    with shared_runner(runner, jobs, threads, progress) as active:
        plan = SearchPlan(cfg, method, options, out, cfg.tracking.group or name, active)
        return plan.finish(active.play(plan.tasks()))


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
    with shared_runner(runner, jobs, threads, progress) as active:
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
    methods: list[ComparedMethod]
    labels: list[str]
    options: SearchOptions

    def plans(self, runner: Runner) -> list[SearchPlan]:
        out = []
        for label, cfg, method in zip(self.labels, self.cfgs, self.methods):
            penalty = method.has_penalty
            o = self.options
            note = "" if penalty or not (o.lambdas or o.bisect) else f"; no penalty: {method.own_mode} runs only"
            runner.progress.say(f"[compare] method {label} ({cfg.name}{note})")
            grouped = config_from_dict(apply_overrides(cfg.to_dict(), [f"tracking.group={self.group}"]))
            own = dataclasses.replace(o, lambdas=o.lambdas if penalty else (), bisect=o.bisect and penalty)
            (self.out / label).mkdir(parents=True, exist_ok=True)
            out.append(SearchPlan(grouped, method, own, self.out / label, self.group, runner))
        return out

    def finish(self, plans: list[SearchPlan], made: list[Made]) -> MethodsComparison:
        comparisons: dict[str, Comparison] = {}
        rows: list[dict[str, Any]] = []
        start = 0
        for label, cfg, plan in zip(self.labels, self.cfgs, plans):
            n = len(plan.kinds)  # the tasks this plan gave
            comparisons[label] = comparison = plan.finish(made[start : start + n])
            start += n
            rows += [{**r, "label": label, "config": cfg.name} for r in comparison.rows]
        write_tables(self.out, rows, self.methods[0].label, methods=True)
        plot = joint_plot(self.out, rows, self.methods[0].label, self.options.targets)
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
    methods = [method_of(c) for c in cfgs]
    if len({m.cls.spec.count_budget for m in methods}) > 1:
        raise ConfigError("compare: layer counts and densities cannot share budgets; compare them separately")
    specs = [m.spec for m in methods]
    labels = [s if specs.count(s) == 1 else f"{c.name}" for s, c in zip(specs, cfgs)]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"compare: the configs {labels} repeat; give each method once")
    check_options(targets, lambdas, tol, max_runs, lambda_range, search, jobs, threads)
    if (lambdas or bisect) and not any(m.has_penalty for m in methods):
        check_penalty(methods[0], lambdas, bisect)
    for cfg, method in zip(cfgs, methods):  # a method without a penalty gets its budget runs only
        check_runs(cfg, method, targets, lambdas if method.has_penalty else (), bisect and method.has_penalty)
    if out_dir is not None:
        out = prepare_run_dir(
            out_dir, overwrite, ("results.csv", *labels), "--out", "a comparison", "start it over with --overwrite"
        )
    else:
        out = new_run_dir(cfgs[0].tracking.out_dir, "compare-methods")
    options = SearchOptions(targets, lambdas, bisect, search, tol, max_runs, lambda_range)
    return PreparedComparison(out, cfgs[0].tracking.group or out.name, list(cfgs), methods, labels, options)
