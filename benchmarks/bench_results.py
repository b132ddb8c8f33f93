"""The results page, ``docs/results.md``: which method reaches a budget with the lowest error, at
what training cost, and what a penalty needs instead.

Every method (``l0``, ``cges``, ``rw_l1``, ``rw_l2``, ``focuss``, ``lwc``, ``dns``; the layer
method counts layers, not a density, and is compared on its own) on Fashion-MNIST:

* ``mlp``: MLP 784-300-100 at ε = 0.1, 0.33, 0.5;
* ``lenet``: LeNet-5-Caffe at ε = 0.1, and at 0.05 for L0 alone (every other method's runs at
  0.05 would double a setup of about twelve minutes a run at one thread), seed 0 alone;
* ``digits``: the 8x8 digits MLP at ε = 0.3 -- a smoke setup that checks this script in
  minutes; its numbers are not results.

Per setup and seed, ``csparse compare``'s machinery (``prepare_methods``): the constrained run
at each budget and, for a method with a penalty, the search of λ to the budgets (one joint
search over all budgets for L0 and CGES; a bisection per budget for the re-weighted methods,
whose penalised runs prune to their budget at the end; ``--max-runs`` runs per budget at
most; the row's wall time is that of all the search's runs: what hitting a budget with a
penalty costs); a method whose budget holds by construction (LWC, DNS) runs once per budget,
projected. Every run gets ``--epochs`` epochs from scratch (the shipped configs otherwise;
the per-weight methods' LeNet configs on the MLP for ``mlp``), and a dense network per seed
gives the reference error. ``--jobs N`` trains N runs at once (``--threads`` each, default
cores / N); a search's runs stay in order.

Per budget, method and mode, over the seeds: test error (mean ± standard deviation),
achieved exact density, how many seeds ended within the budget, epochs to the budget (the
first epoch whose exact measure met it), runs and wall time, FLOPs per example and latency
(batch 256, eval, median) of the compact network. The constrained-L0 paper's claim --
constrained training hits the budget without a λ search at no cost in error -- is checked
per method and budget: the constrained run is within the budget in every seed and its mean
error is at most the penalty's plus the larger of the two spreads.

    python benchmarks/bench_results.py --setups mlp --seeds 0 1 2 --jobs 2 --reuse
    python benchmarks/bench_results.py --plan          # the runs it would train, their time, and stop
    python benchmarks/bench_results.py --no-train      # the page from the results folder alone

Every finished run is kept in ``--results`` (``benchmarks/results/``, committed; see
:class:`ResultsFolder`): ``--reuse`` trains only what it does not hold, so the page is built
over several invocations, and it says which rows are still missing. Writes ``--page``
(docs/results.md), its plots into ``--img`` (docs/img/results_<setup>.png) and
``OUT/results.json``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import _report
import torch

import constrained_sparsity as cs
from constrained_sparsity.compare import prepare_methods
from constrained_sparsity.compare.outputs import mode_label
from constrained_sparsity.jobs import Runner, default_threads

ROOT = Path(__file__).resolve().parents[1]
MLP = ["model.name=mlp", "model.hidden=[300, 100]"]
PER_WEIGHT = ("rw_l1", "rw_l2", "focuss", "lwc", "dns")
SETUPS: dict[str, dict] = {
    "mlp": {
        "title": "Fashion-MNIST, MLP 784-300-100",
        "budgets": [0.1, 0.33, 0.5],
        "methods": {
            "l0": ("fashion_mlp_l0_constrained.yaml", []),
            "cges": ("fashion_mlp_cges_constrained.yaml", []),
            **{m: (f"fashion_lenet_{m}.yaml", MLP) for m in PER_WEIGHT},
        },
    },
    "lenet": {
        "title": "Fashion-MNIST, LeNet-5-Caffe",
        "budgets": [0.05, 0.1],
        "budgets_of": {m: [0.1] for m in ("cges", *PER_WEIGHT)},
        "seeds": [0],  # one seed: about 12 minutes a run at one thread
        "methods": {
            "l0": ("fashion_lenet_l0_constrained.yaml", []),
            "cges": ("fashion_lenet_cges_constrained.yaml", []),
            **{m: (f"fashion_lenet_{m}.yaml", []) for m in PER_WEIGHT},
        },
    },
    "digits": {
        "title": "digits 8x8, MLP 64-100-100 (smoke setup: checks the script; not a result)",
        "budgets": [0.3],
        "methods": {m: (f"digits_mlp_{m}.yaml", []) for m in ("l0", "cges", *PER_WEIGHT)},
    },
}


def seeds_of(setup: str, args: argparse.Namespace) -> list[int]:
    """The seeds of ``--seeds`` a setup runs (LeNet-5: seed 0 alone)."""
    return [s for s in args.seeds if s in SETUPS[setup].get("seeds", args.seeds)]


def budgets_of(setup: str, method: str) -> list[float]:
    """The budgets a method runs at in a setup: the setup's, or fewer where it says so."""
    return SETUPS[setup].get("budgets_of", {}).get(method, SETUPS[setup]["budgets"])


def _overrides(args: argparse.Namespace) -> list[str]:
    extra = _report.run_overrides(args.epochs, args.threads, root=args.root)
    if args.wandb != "disabled":
        extra = [o for o in extra if not o.startswith("tracking.wandb=")] + [f"tracking.wandb={args.wandb}"]
    return extra


def _config(setup: str, method: str, seed: int, args: argparse.Namespace, group: str, *more: str) -> cs.Config:
    path, extra = SETUPS[setup]["methods"][method]
    overrides = [*extra, *_overrides(args), f"train.seed={seed}", f"tracking.group={group}", *more]
    return cs.load_config(ROOT / "configs" / path, overrides)


def _planned_runs(setup: str, methods: list[str], args: argparse.Namespace) -> tuple[int, int]:
    """Trainings one seed of a setup needs, at least and at most: dense, then per method and
    budget one constrained (or projected) run and, with a penalty, a λ search that lands each
    budget in one run at best and spends ``--max-runs`` per budget at worst."""
    least = most = 1
    for method in methods:
        budgets = len(budgets_of(setup, method))
        penalised = cs.methods.get_method(method).spec.has_penalty
        least += budgets * (1 + penalised)
        most += budgets * (1 + (args.max_runs if penalised else 0))
    return least, most


# -- the results folder ----------------------------------------------------------------------
def config_key(cfg: cs.Config) -> str:
    """What makes two runs the same run: the resolved config but for its name, where it logs
    to, its thread count and where its data files lie. Empty sections (``model.kwargs: {}``)
    are left out, so that a config field added later with an empty default keeps the keys of
    the runs recorded before it."""

    def pruned(value):  # type: ignore[no-untyped-def]
        if isinstance(value, dict):
            return {k: pruned(v) for k, v in value.items() if v != {}}
        return value

    data = cfg.to_dict()
    data.pop("name", None)
    data.pop("tracking", None)
    data["train"].pop("threads", None)
    data["data"].pop("root", None)
    return hashlib.sha256(json.dumps(pruned(data), sort_keys=True).encode()).hexdigest()[:16]


def _commit() -> str:
    def git(*argv: str) -> str:
        return subprocess.run(["git", *argv], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    head = git("rev-parse", "--short", "HEAD") or "unknown"
    return head + ("-dirty" if git("status", "--porcelain", "--untracked-files=no") else "")


class ResultsFolder:
    """The page's finished runs, kept in the repository (a :class:`constrained_sparsity.jobs.RunStore`).

    A run trained into ``OUT/<setup>/seed<k>/<method>/runs/<run>`` is recorded in
    ``RESULTS/<setup>/seed<k>/<method>/<run>``: its ``summary.json``, ``metrics.jsonl`` and
    ``config.yaml`` (no checkpoints, a few tens of kB), and ``record.json`` with the key of its
    config (:func:`config_key`), the commit it ran on and what the page measures of its
    compact network (FLOPs, latency), measured when it finished. With ``reuse``, a recorded
    run of the same key is not trained again; another key (a config changed) is.
    """

    def __init__(self, out: Path, results: Path, reuse: bool) -> None:
        self.out, self.results, self.reuse = out, results, reuse
        self.commit = _commit()

    def record_dir(self, run_dir: Path) -> Path:
        rel = run_dir.relative_to(self.out)
        parts = [p for p in rel.parts if p != "runs"]
        return self.results.joinpath(*parts)

    def get(self, cfg: cs.Config, run_dir: Path) -> cs.RunResult | None:
        record = self.record_dir(run_dir) / "record.json"
        if not (self.reuse and record.is_file()):
            return None
        saved = json.loads(record.read_text())
        if saved["key"] != config_key(cfg):
            _say(f"{record.parent.relative_to(self.results)}: config changed, training again")
            return None
        if "failed" in saved:  # a run that diverged: it would again
            raise cs.TrainingDiverged(saved["failed"])
        return _load(record.parent)

    def resume(self, cfg: cs.Config, run_dir: Path) -> bool:
        return False  # the folder keeps no checkpoints: a stopped run starts anew

    def fail(self, cfg: cs.Config, run_dir: Path, message: str) -> None:
        """Record a run that diverged (its key, commit and message): ``--reuse`` does not train it again."""
        kept = self.record_dir(run_dir)
        shutil.rmtree(kept, ignore_errors=True)
        kept.mkdir(parents=True)
        record = {"key": config_key(cfg), "commit": self.commit, "failed": message.splitlines()[0]}
        (kept / "record.json").write_text(json.dumps(record, indent=2) + "\n")

    def put(self, cfg: cs.Config, run_dir: Path, result: cs.RunResult) -> cs.RunResult:
        kept = self.record_dir(run_dir)
        shutil.rmtree(kept, ignore_errors=True)
        kept.mkdir(parents=True)
        for name in ("summary.json", "metrics.jsonl", "config.yaml"):
            shutil.copy2(run_dir / name, kept / name)
        record = {"key": config_key(cfg), "commit": self.commit, "measured": _measure_run(run_dir)}
        (kept / "record.json").write_text(json.dumps(record, indent=2) + "\n")
        return _load(kept)


def _load(kept: Path) -> cs.RunResult:
    result = _report.load_result(kept)
    result.layers = json.loads((kept / "summary.json").read_text()).get("layers", [])
    return result


def _measure_run(run_dir: Path) -> dict:
    """What the page reports of a run besides its summary and log: the compact network's
    parameters, FLOPs per example and latency (batch 256, eval, median)."""
    summary = json.loads((run_dir / "summary.json").read_text())
    _, _, shape, _, compact = _report.dense_and_compact(run_dir)
    compaction = summary.get("compaction") or {}
    return {
        "params": compaction.get("params_after"),
        "flops": compaction.get("flops_after"),
        "latency_ms": _report.latency_ms(compact, shape),
    }


def _prepared(setup: str, seed: int, methods: list[str], args: argparse.Namespace, out: Path):
    """The comparisons of every method of a setup and seed, one per set of budgets (checked;
    nothing trained; all made before any plan, as each empties the seed's directory)."""
    groups: dict[tuple[float, ...], list[str]] = {}
    for m in methods:
        groups.setdefault(tuple(budgets_of(setup, m)), []).append(m)
    prepared = []
    for budgets, group in groups.items():
        cfgs = [_config(setup, m, seed, args, f"results-{setup}-seed{seed}") for m in group]
        penalised = any(cs.methods.get_method(m).spec.has_penalty for m in group)
        prepared.append(
            prepare_methods(
                cfgs,
                list(budgets),
                bisect=penalised,
                max_runs=args.max_runs,
                tol=args.tol,
                out_dir=out / setup / f"seed{seed}",
                overwrite=True,
                search=args.search,
                jobs=args.jobs,
            )
        )
    return prepared


def _dense_task(setup: str, seed: int, args: argparse.Namespace, out: Path, runner: Runner):
    def task() -> dict:
        cfg = _config(setup, "l0", seed, args, f"results-{setup}-seed{seed}", "sparsity.method=none")
        result = runner.train(cfg, out / setup / f"seed{seed}" / "dense", label=f"{setup} seed {seed} dense")
        return {"test_error": result.test_error, "wall_time_s": result.wall_time_s, "run_dir": str(result.run_dir)}

    return task


def _say(msg: str) -> None:
    print(f"[results] {msg}", file=sys.stderr, flush=True)


# -- what each row's run measured ----------------------------------------------------------------
def _epochs_to(run_dir: Path, budget: float) -> int | None:
    """The first epoch whose exact measure was within ``budget`` (``None``: never). A joint λ
    search's run serves several budgets, so the row's own budget is read against the log,
    not the run's constraint (which holds the search's first budget)."""
    from constrained_sparsity.lambda_search import within

    summary = json.loads((run_dir / "summary.json").read_text())
    key = summary["targets"][0].get("metric") if summary.get("targets") else None
    if not key:
        return None
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        entry = json.loads(line)
        if "finish/epoch" not in entry and key in entry and within(entry[key], budget):
            return int(entry["epoch"])
    return None


def _measured(row: dict, method: str) -> dict:
    record = json.loads((Path(row["run_dir"]) / "record.json").read_text())
    budget = float(row["target"])
    return {
        "method": method,
        "mode": mode_label(row),
        "budget": budget,
        "lambda": row["lambda"],
        "achieved": float(row["achieved"]),
        "test_error": float(row["test_error"]),
        "feasible": row["feasible"] is True or row["feasible"] == "True",
        "runs": int(row["runs_used"]),
        "wall_time_s": float(row["wall_time_s"]),
        **record["measured"],
        "epochs_to_budget": _epochs_to(Path(row["run_dir"]), budget),
        "commit": record["commit"],
        "run_dir": str(Path(row["run_dir"]).relative_to(ROOT))
        if Path(row["run_dir"]).is_relative_to(ROOT)
        else row["run_dir"],
    }


# -- over the seeds ------------------------------------------------------------------------------
def _mean_std(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def aggregate(measured: list[dict]) -> list[dict]:
    """One entry per (budget, method, mode): the seeds' rows summarised."""
    groups: dict[tuple, list[dict]] = {}
    for m in measured:
        groups.setdefault((m["budget"], m["method"], m["mode"]), []).append(m)
    out = []
    for (budget, method, mode), rows in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2])):
        err, err_sd = _mean_std([r["test_error"] for r in rows])
        epochs = [r["epochs_to_budget"] for r in rows]
        out.append(
            {
                "budget": budget,
                "method": method,
                "mode": mode,
                "seeds": len(rows),
                "test_error": err,
                "test_error_sd": err_sd,
                "achieved": _mean_std([r["achieved"] for r in rows])[0],
                "feasible": sum(r["feasible"] for r in rows),
                "epochs_to_budget": None if None in epochs else _mean_std(epochs)[0],
                "never_met": sum(e is None for e in epochs),
                "runs": _mean_std([r["runs"] for r in rows])[0],
                "wall_time_s": _mean_std([r["wall_time_s"] for r in rows])[0],
                "flops": _mean_std([r["flops"] for r in rows])[0],
                "latency_ms": _mean_std([r["latency_ms"] for r in rows])[0],
            }
        )
    return out


def claim(entries: list[dict]) -> list[dict]:
    """Per budget and method with a penalty: does the constrained run meet the budget in every
    seed, with a mean error no more than the bisected penalty's plus the larger spread?"""
    out = []
    by_key = {(e["budget"], e["method"], e["mode"]): e for e in entries}
    for (budget, method, mode), c in by_key.items():
        if mode != "constrained":
            continue
        p = by_key.get((budget, method, "penalized (joint)")) or by_key.get((budget, method, "penalized (bisect)"))
        if p is None:
            continue
        margin = max(c["test_error_sd"], p["test_error_sd"])
        feasible = c["feasible"] == c["seeds"]
        # a penalty that missed the budget bought its error with a denser network: no match
        comparable = p["feasible"] == p["seeds"]
        no_cost = c["test_error"] <= p["test_error"] + margin if comparable else True
        why = []
        if not feasible:
            why.append(f"over the budget in {c['seeds'] - c['feasible']} of {c['seeds']} seeds")
        if not no_cost:
            why.append(
                f"error {100 * c['test_error']:.2f} % vs the penalty's {100 * p['test_error']:.2f} % "
                f"(spread {100 * margin:.2f})"
            )
        out.append(
            {
                "budget": budget,
                "method": method,
                "holds": feasible and no_cost,
                "why": "; ".join(why),
                "comparable": comparable,
                "penalty_runs": p["runs"],
                "penalty_feasible": p["feasible"],
                "penalty_seeds": p["seeds"],
                "seeds": c["seeds"],
                "wall_ratio": p["wall_time_s"] / c["wall_time_s"] if c["wall_time_s"] else math.nan,
            }
        )
    return out


# -- the page ------------------------------------------------------------------------------------
def _fmt(value: float | None, spec: str, none: str = "-") -> str:
    return none if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def _plot(setup: str, entries: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.2, 4.6))
    styles = {
        "constrained": ("o", "-"),
        "projected": ("D", "-"),
        "penalized (joint)": ("^", "--"),
        "penalized (bisect)": ("v", "--"),
    }
    methods = list(dict.fromkeys(e["method"] for e in entries))
    for i, method in enumerate(methods):
        for mode, (marker, line) in styles.items():
            pts = sorted((e["achieved"], e["test_error"], e["test_error_sd"]) for e in entries
                         if e["method"] == method and e["mode"] == mode)  # fmt: skip
            if pts:
                ax.errorbar(
                    [p[0] for p in pts], [100 * p[1] for p in pts], yerr=[100 * p[2] for p in pts],
                    marker=marker, linestyle=line, color=f"C{i}", capsize=3, label=f"{method}, {mode}",
                )  # fmt: skip
    for budget in SETUPS[setup]["budgets"]:
        ax.axvline(budget, color="gray", linestyle=":", linewidth=1)
    ax.set_xlabel("achieved exact density (mean over seeds)")
    ax.set_ylabel("test error (%, mean ± sd over seeds)")
    ax.set_title(SETUPS[setup]["title"] + " (dotted: budgets)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _page(report: dict, args: argparse.Namespace, plots: dict[str, Path], page: Path) -> list[str]:
    lines = [
        "# Which method for my budget?",
        "",
        "Every method, constrained and penalised (λ searched to the budget), at the same budgets,",
        f"{args.epochs} epochs per run from scratch; a method whose budget holds by construction (LWC,",
        "DNS) runs projected, with no λ to search. The λ of L0 and CGES comes from one joint search",
        "over all budgets of a seed (each run informs every budget; its runs and wall time are those",
        "of the whole search, shared by the budgets); the re-weighted methods prune to the budget at",
        "the end of a penalised run too, so their budgets are bisected one by one. Test error: mean",
        "± standard deviation over the seeds (the `seeds` column says how many); FLOPs and latency",
        "(batch 256, eval, median, measured when the run finished, one thread, beside other runs:",
        "indicative): the compact network. Wall times: runs two at a time on a shared 2-core machine,",
        "to be compared within a setup, not across machines. Every run is kept in `benchmarks/results/` (summary,",
        "log, config and the commit it ran on). Produced by `benchmarks/bench_results.py`:",
        "",
        *_report.markdown_header(report),
    ]
    if report.get("missing"):
        lines += [
            "**Still missing** (not yet trained, or failed; the command above with `--reuse` goes on from here):",
            "",
        ]
        lines += [f"* {m}" for m in report["missing"]] + [""]
    for setup, data in report["setups"].items():
        dense = data["dense"]
        lines += [
            f"## {SETUPS[setup]['title']}",
            "",
            f"Dense reference: test error {100 * dense['test_error']:.2f} % (mean over {len(dense['runs'])} "
            f"seed{'s' if len(dense['runs']) != 1 else ''}).",
            "",
        ]
        if setup in plots:
            lines += [f"![{setup}]({Path(plots[setup]).relative_to(page.parent).as_posix()})", ""]
        for budget in SETUPS[setup]["budgets"]:
            entries = [e for e in data["entries"] if e["budget"] == budget]
            if not entries:
                continue
            skipped = [m for m in SETUPS[setup]["methods"] if budget not in budgets_of(setup, m)]
            lines += [f"### ε = {budget}", ""]
            if skipped:
                lines += [f"Not run at this budget, to fit the setup's time: {', '.join(skipped)}.", ""]
            lines += [
                "| method | mode | seeds | test error | density | within ε | epochs to ε | runs | wall s | FLOPs | ms |",  # noqa: E501
                "|---|---|---|---|---|---|---|---|---|---|---|",
            ]
            for e in sorted(entries, key=lambda e: e["test_error"]):
                epochs = _fmt(e["epochs_to_budget"], ".1f") if not e["never_met"] else f"never in {e['never_met']}"
                lines.append(
                    f"| {e['method']} | {e['mode']} | {e['seeds']} "
                    f"| {100 * e['test_error']:.2f} ± {100 * e['test_error_sd']:.2f} % "
                    f"| {e['achieved']:.4f} | {e['feasible']}/{e['seeds']} | {epochs} | {_fmt(e['runs'], '.1f')} "
                    f"| {e['wall_time_s']:.0f} | {_fmt(e['flops'], ',.0f')} | {_fmt(e['latency_ms'], '.2f')} |"
                )
            feasible = [e for e in entries if e["feasible"] == e["seeds"]]
            if feasible:
                best = min(feasible, key=lambda e: e["test_error"])
                lines += ["", f"Lowest error within ε = {budget} in every seed: **{best['method']}, {best['mode']}**."]
            lines.append("")
        checks = [c for c in data["claim"]]
        if checks:
            lines += ["**Constrained training hits the budget without a λ search at no cost in error:**", ""]
            for c in checks:
                verdict = "holds" if c["holds"] else f"**does not hold** ({c['why']})"
                if not c["comparable"]:
                    verdict += " (errors not compared: the penalty missed the budget)"
                lines.append(
                    f"* ε = {c['budget']}, {c['method']}: {verdict}; the penalty needed {c['penalty_runs']:.1f} runs "
                    f"({c['wall_ratio']:.1f}× the constrained run's time) and ended within ε in "
                    f"{c['penalty_feasible']}/{c['penalty_seeds']} seeds"
                    + (f" (the constrained row has {c['seeds']})." if c["seeds"] != c["penalty_seeds"] else ".")
                )
            lines.append("")
    return lines


class Missing(Exception):
    """A run the results folder does not hold, asked for with ``--no-train``."""


class _ReadOnly(ResultsFolder):
    def get(self, cfg: cs.Config, run_dir: Path) -> cs.RunResult | None:
        kept = super().get(cfg, run_dir)
        if kept is None:
            raise Missing(str(self.record_dir(run_dir).relative_to(self.results)))
        return kept


class Failed(Exception):
    """A run of the page that failed (diverged, or a bad config): its comparison is left out,
    the page says why, and the other runs go on."""


def _or_missing(task):  # type: ignore[no-untyped-def]
    def wrapped():  # type: ignore[no-untyped-def]
        try:
            return task()
        except Missing as exc:
            return exc
        except cs.TrainingInterrupted:
            raise
        except cs.CSparseError as exc:  # the page goes on without it
            _say(f"failed: {exc}")
            return Failed(str(exc).splitlines()[0])

    return wrapped


def _seconds_per_epoch(setup: str, args: argparse.Namespace, results: Path) -> tuple[float, str]:
    """Seconds per epoch of a setup's runs on this machine: the mean of the recorded runs'
    ``time/epoch_s``, or else one epoch of its dense network trained now."""
    times = []
    for log in (results / setup).glob("*/*/*/metrics.jsonl"):
        times += [row["time/epoch_s"] for row in map(json.loads, log.read_text().splitlines()) if "time/epoch_s" in row]
    times += [
        row["time/epoch_s"]
        for log in (results / setup).glob("*/dense/metrics.jsonl")
        for row in map(json.loads, log.read_text().splitlines())
        if "time/epoch_s" in row
    ]
    if times:
        return statistics.fmean(times), f"mean of {len(times)} recorded epochs"
    threads = args.threads or default_threads(args.jobs)
    cfg = _config(setup, "l0", 0, args, "plan", "sparsity.method=none", "train.epochs=1", f"train.threads={threads}")
    result = cs.run(cfg, run_dir=Path(args.out) / "plan" / setup, overwrite=True)
    return result.wall_time_s, f"one dense epoch measured now at {threads} thread(s)"


def _plan(args: argparse.Namespace, results: Path) -> None:
    total = 0.0
    for setup in args.setups:
        methods = args.methods or list(SETUPS[setup]["methods"])
        least, most = _planned_runs(setup, methods, args)
        seeds = seeds_of(setup, args)
        kept = sum(
            1
            for seed in seeds
            for part in ("dense", *methods)
            for _ in (results / setup / f"seed{seed}" / part).rglob("record.json")
        )
        todo = [max(0, n * len(seeds) - kept) for n in (least, most)]
        seconds, how = _seconds_per_epoch(setup, args, results)
        per_run = seconds * args.epochs * 1.05  # and the finishing phase's few epochs
        hours = [n * per_run / args.jobs / 3600 for n in todo]
        total += hours[1]
        _say(
            f"{setup}: {least}-{most} trainings of {args.epochs} epochs per seed, {least * len(seeds)}-"
            f"{most * len(seeds)} in all, {kept} of them kept in {results}; {seconds:.1f} s per epoch ({how}): "
            f"{hours[0]:.1f}-{hours[1]:.1f} h for the other {todo[0]}-{todo[1]} at --jobs {args.jobs}"
        )
    _say(f"at most {total:.1f} h in all")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setups", nargs="+", choices=list(SETUPS), default=["mlp", "lenet"])
    parser.add_argument("--methods", nargs="+", default=None, help="default: every method of the setup")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--max-runs", type=int, default=5, help="λ search runs per budget and method")
    parser.add_argument("--search", choices=["joint", "per-budget"], default="joint")
    parser.add_argument("--tol", type=float, default=None, help="search tolerance (default: the method's)")
    parser.add_argument("--jobs", type=int, default=1, help="trainings at once")
    parser.add_argument("--threads", type=int, default=None, help="threads per training (default: cores / jobs)")
    parser.add_argument("--root", default=None, help="data.root: a directory with the Fashion-MNIST IDX files")
    parser.add_argument("--wandb", choices=["disabled", "offline", "online"], default="disabled")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "out" / "results"), help="the runs' directories")
    parser.add_argument("--results", default=str(ROOT / "benchmarks" / "results"), help="the kept runs (committed)")
    parser.add_argument("--page", default=str(ROOT / "docs" / "results.md"))
    parser.add_argument("--img", default=str(ROOT / "docs" / "img"))
    parser.add_argument("--reuse", action="store_true", help="keep every run the results folder holds")
    parser.add_argument("--no-train", action="store_true", help="build the page from the results folder alone")
    parser.add_argument("--plan", action="store_true", help="print the trainings and their estimated time, and stop")
    args = parser.parse_args(argv)
    for setup in args.setups:
        unknown = set(args.methods or []) - set(SETUPS[setup]["methods"])
        if unknown:
            parser.error(f"--methods {sorted(unknown)}: not in setup {setup} ({', '.join(SETUPS[setup]['methods'])})")
    if args.epochs < 1 or args.max_runs < 1 or args.jobs < 1 or (args.threads is not None and args.threads < 1):
        parser.error("--epochs, --max-runs, --jobs and --threads should be >= 1")
    results, out = Path(args.results), Path(args.out)
    if args.plan:
        _plan(args, results)
        return 0
    args.threads = args.threads or default_threads(args.jobs)
    torch.set_num_threads(args.threads)  # this process measures the compact networks
    out.mkdir(parents=True, exist_ok=True)
    folder = (_ReadOnly if args.no_train else ResultsFolder)(out, results, reuse=args.reuse or args.no_train)
    report = {**_report.header(args.threads), "epochs": args.epochs, "jobs": args.jobs, "setups": {}, "missing": []}
    with Runner(args.jobs, args.threads, store=folder, say=_say) as runner:
        work = []  # (setup, seed, dense task index, [(plan, task indices)])
        tasks = []
        for setup in args.setups:
            methods = args.methods or list(SETUPS[setup]["methods"])
            for seed in seeds_of(setup, args):
                plans = [plan for p in _prepared(setup, seed, methods, args, out) for plan in p.plans(runner)]
                tasks.append(_or_missing(_dense_task(setup, seed, args, out, runner)))
                runner.progress.plan(1)
                spans = []
                for plan in plans:
                    own = plan.tasks()
                    spans.append((plan, list(range(len(tasks), len(tasks) + len(own)))))
                    tasks += [_or_missing(t) for t in own]
                work.append((setup, seed, len(tasks) - sum(len(i) for _, i in spans) - 1, spans))
        made = runner.play(tasks)
    plots: dict[str, Path] = {}
    for setup in args.setups:
        measured, dense, seeds = [], [], set()
        for s, seed, dense_index, spans in work:
            if s != setup:
                continue
            if isinstance(made[dense_index], (Missing, Failed)):
                how = "failed: " if isinstance(made[dense_index], Failed) else ""
                report["missing"].append(
                    f"{setup} seed {seed}: dense{' (' + how + str(made[dense_index]) + ')' if how else ''}"
                )
            else:
                dense.append(made[dense_index])
            for plan, indices in spans:
                outputs = [made[i] for i in indices]
                gone = [o for o in outputs if isinstance(o, (Missing, Failed))]
                for o in gone:  # the plan's other budgets still count
                    how = "failed: " if isinstance(o, Failed) else "from "
                    report["missing"].append(f"{setup} seed {seed}: {plan.method.spec} ({how}{o})")
                if len(gone) == len(outputs):
                    continue
                seeds.add(seed)
                kept = [None if isinstance(o, (Missing, Failed)) else o for o in outputs]
                measured += [_measured(r, plan.method.spec) for r in plan.finish(kept).rows]
        if not measured:
            continue
        entries = aggregate(measured)
        report["setups"][setup] = {
            "seeds": sorted(seeds),
            "dense": {"test_error": _mean_std([d["test_error"] for d in dense])[0], "runs": dense},
            "entries": entries,
            "claim": claim(entries),
            "runs": measured,
        }
        plots[setup] = Path(args.img) / f"results_{setup}.png"
        _plot(setup, entries, plots[setup])
    page = Path(args.page)
    lines = _page(report, args, plots, page)
    page.parent.mkdir(parents=True, exist_ok=True)
    page.write_text("\n".join(lines) + "\n")
    (out / "results.json").write_text(json.dumps(report, indent=2))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
