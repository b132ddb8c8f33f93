"""The results page, ``docs/results.md``: which method reaches a budget with the lowest error, at
what training cost, and what a penalty needs instead.

Every method (``l0``, ``cges``, ``rw_l1``, ``rw_l2``, ``focuss``, ``lwc``, ``dns``; the layer
method counts layers, not a density, and is compared on its own) on Fashion-MNIST:

* ``mlp``: MLP 784-300-100 at ε = 0.1, 0.33, 0.5;
* ``lenet``: LeNet-5-Caffe at ε = 0.05, 0.1;
* ``digits``: the 8x8 digits MLP at ε = 0.3 -- a smoke setup that checks this script in
  minutes; its numbers are not results.

Per setup, seed and method, ``csparse compare``'s machinery (``compare_methods``): the
constrained run at each budget and, for a method with a penalty, the bisection of λ to the
budget (``--max-runs`` runs at most; the row's wall time is that of all its runs: what
hitting a budget with a penalty costs); a method whose budget holds by construction (LWC,
DNS) runs once per budget, projected. Every run gets ``--epochs`` epochs from scratch (the
shipped configs otherwise; the per-weight methods' LeNet configs on the MLP for ``mlp``), and
a dense network per seed gives the reference error. All runs of a setup and seed share one
W&B group (``tracking.wandb`` of the configs: disabled here unless ``--wandb offline``).

Per budget, method and mode, over the seeds: test error (mean ± standard deviation),
achieved exact density, how many seeds ended within the budget, epochs to the budget (the
first epoch whose exact measure met it), runs and wall time, FLOPs per example and latency
(batch 256, eval, median) of the compact network. The constrained-L0 paper's claim --
constrained training hits the budget without a λ search at no cost in error -- is checked
per method and budget: the constrained run is within the budget in every seed and its mean
error is at most the bisected penalty's plus the larger of the two spreads.

    python benchmarks/bench_results.py --threads 2 --epochs 30 --seeds 0 1 2 --max-runs 5
    python benchmarks/bench_results.py --plan          # the runs it would train, and stop

``--reuse`` keeps each comparison (setup, seed, method) already complete under ``--out``,
so the page can be built over several invocations. Writes ``--page`` (docs/results.md),
its plots into ``--img`` (docs/img/results_<setup>.png) and ``benchmarks/out/results.json``.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
import sys
import time
from pathlib import Path

import _report
import torch

import constrained_sparsity as cs
from constrained_sparsity.compare import compare_methods

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


def _overrides(args: argparse.Namespace) -> list[str]:
    extra = _report.run_overrides(args.epochs, args.threads, root=args.root)
    if args.wandb != "disabled":
        extra = [o for o in extra if not o.startswith("tracking.wandb=")] + [f"tracking.wandb={args.wandb}"]
    return extra


def _config(setup: str, method: str, seed: int, args: argparse.Namespace, group: str, *more: str) -> cs.Config:
    path, extra = SETUPS[setup]["methods"][method]
    overrides = [*extra, *_overrides(args), f"train.seed={seed}", f"tracking.group={group}", *more]
    return cs.load_config(ROOT / "configs" / path, overrides)


def _planned_runs(setup: str, methods: list[str], args: argparse.Namespace) -> int:
    """Trainings one seed of a setup needs at most: dense, then per method and budget one
    constrained (or projected) run and, with a penalty, a bisection of up to --max-runs."""
    n = 1
    for method in methods:
        penalised = cs.methods.get_method(method).has_penalty()
        n += len(SETUPS[setup]["budgets"]) * (1 + (args.max_runs if penalised else 0))
    return n


def _complete(run_dir: Path) -> bool:
    path = run_dir / "summary.json"
    return path.is_file() and json.loads(path.read_text()).get("status") == "complete"


def _saved_rows(cmp_dir: Path) -> list[dict] | None:
    """The rows of a comparison already complete in ``cmp_dir`` (``None``: none, or a run of it
    did not finish)."""
    path = cmp_dir / "results.csv"
    if not path.is_file():
        return None
    rows = list(csv.DictReader(path.open()))
    if not rows or not all(_complete(Path(r["run_dir"])) for r in rows):
        return None
    return rows


def _compare(setup: str, method: str, seed: int, args: argparse.Namespace, out: Path) -> list[dict]:
    cmp_dir = out / setup / f"seed{seed}" / method
    if args.reuse and (rows := _saved_rows(cmp_dir)) is not None:
        _say(f"{setup} seed {seed} {method}: kept ({len(rows)} rows)")
        return rows
    cfg = _config(setup, method, seed, args, f"results-{setup}-seed{seed}")
    compare_methods(
        [cfg],
        SETUPS[setup]["budgets"],
        bisect=cs.methods.get_method(method).has_penalty(),
        max_runs=args.max_runs,
        tol=args.tol,
        out_dir=cmp_dir,
        overwrite=True,
        progress=_say,
    )
    rows = _saved_rows(cmp_dir)
    assert rows is not None, cmp_dir
    return rows


def _dense(setup: str, seed: int, args: argparse.Namespace, out: Path) -> dict:
    run_dir = out / setup / f"seed{seed}" / "dense"
    if not (args.reuse and _complete(run_dir)):
        cfg = _config(setup, "l0", seed, args, f"results-{setup}-seed{seed}", "sparsity.method=none")
        cs.run(cfg, run_dir=run_dir, overwrite=True)
    summary = json.loads((run_dir / "summary.json").read_text())
    return {"test_error": summary["test_error"], "wall_time_s": summary["wall_time_s"], "run_dir": str(run_dir)}


def _say(msg: str) -> None:
    print(f"[results] {msg}", file=sys.stderr, flush=True)


# -- what each row's run measured ----------------------------------------------------------------
def _epochs_to_budget(run_dir: Path) -> int | None:
    """The first epoch whose every exact measure was within its budget (``None``: never)."""
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        violations = [v for k, v in row.items() if k.endswith("/strict_violation")]
        if "finish/epoch" not in row and violations and all(v <= 0 for v in violations):
            return int(row["epoch"])
    return None


def _latency_ms(module: torch.nn.Module, shape: tuple[int, ...], repeats: int = 20) -> float:
    x = torch.rand(256, *shape)
    with torch.inference_mode():
        for _ in range(3):
            module(x)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            module(x)
            times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def _measured(row: dict) -> dict:
    run_dir = Path(row["run_dir"])
    summary = json.loads((run_dir / "summary.json").read_text())
    _, _, shape, _, compact = _report.dense_and_compact(run_dir)
    return {
        "method": row["label"],
        "mode": row["method"] if row["method"] != "penalized" else f"penalized ({row['search'].split()[0]})",
        "budget": float(row["target"]),
        "lambda": row["lambda"],
        "achieved": float(row["achieved"]),
        "test_error": float(row["test_error"]),
        "feasible": row["feasible"] == "True",
        "runs": int(row["runs_used"]),
        "wall_time_s": float(row["wall_time_s"]),
        "epochs_to_budget": _epochs_to_budget(run_dir),
        "flops": (summary.get("compaction") or {}).get("flops_after"),
        "latency_ms": _latency_ms(compact, shape),
        "run_dir": str(run_dir),
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
        p = by_key.get((budget, method, "penalized (bisect)"))
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
    styles = {"constrained": ("o", "-"), "projected": ("D", "-"), "penalized (bisect)": ("^", "--")}
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
        "Every method, constrained and penalised (λ bisected to the budget), at the same budgets,",
        f"{args.epochs} epochs per run from scratch, seeds {args.seeds}; a method whose budget holds",
        "by construction (LWC, DNS) runs projected, with no λ to search. Test error: mean ± standard",
        "deviation over the seeds; wall time: one run, or for a bisection all of its runs (the cost",
        "of hitting a budget with a penalty); FLOPs and latency (batch 256, eval, median): the",
        "compact network. Produced by `benchmarks/bench_results.py`:",
        "",
        *_report.markdown_header(report),
    ]
    for setup, data in report["setups"].items():
        dense = data["dense"]
        lines += [
            f"## {SETUPS[setup]['title']}",
            "",
            f"Dense reference: test error {100 * dense['test_error']:.2f} % (mean over {len(data['seeds'])} seeds).",
            "",
        ]
        if setup in plots:
            lines += [f"![{setup}]({Path(plots[setup]).relative_to(page.parent).as_posix()})", ""]
        for budget in SETUPS[setup]["budgets"]:
            entries = [e for e in data["entries"] if e["budget"] == budget]
            if not entries:
                continue
            lines += [
                f"### ε = {budget}",
                "",
                "| method | mode | test error | density | within ε | epochs to ε | runs | wall s | FLOPs | ms |",
                "|---|---|---|---|---|---|---|---|---|---|",
            ]
            for e in sorted(entries, key=lambda e: e["test_error"]):
                epochs = _fmt(e["epochs_to_budget"], ".1f") if not e["never_met"] else f"never in {e['never_met']}"
                lines.append(
                    f"| {e['method']} | {e['mode']} | {100 * e['test_error']:.2f} ± {100 * e['test_error_sd']:.2f} % "
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
                    f"{c['penalty_feasible']}/{c['seeds']} seeds."
                )
            lines.append("")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setups", nargs="+", choices=list(SETUPS), default=["mlp", "lenet"])
    parser.add_argument("--methods", nargs="+", default=None, help="default: every method of the setup")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--max-runs", type=int, default=5, help="bisection runs per budget and method")
    parser.add_argument("--tol", type=float, default=None, help="bisection tolerance (default: the method's)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--root", default=None, help="data.root: a directory with the Fashion-MNIST IDX files")
    parser.add_argument("--wandb", choices=["disabled", "offline", "online"], default="disabled")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "out" / "results"))
    parser.add_argument("--page", default=str(ROOT / "docs" / "results.md"))
    parser.add_argument("--img", default=str(ROOT / "docs" / "img"))
    parser.add_argument("--reuse", action="store_true", help="keep each comparison already complete in --out")
    parser.add_argument("--plan", action="store_true", help="print the trainings it would run, and stop")
    args = parser.parse_args(argv)
    for setup in args.setups:
        unknown = set(args.methods or []) - set(SETUPS[setup]["methods"])
        if unknown:
            parser.error(f"--methods {sorted(unknown)}: not in setup {setup} ({', '.join(SETUPS[setup]['methods'])})")
    if args.epochs < 1 or args.max_runs < 1:
        parser.error("--epochs and --max-runs should be >= 1")
    plan = {s: _planned_runs(s, args.methods or list(SETUPS[s]["methods"]), args) for s in args.setups}
    for setup, n in plan.items():
        _say(f"{setup}: at most {n} trainings of {args.epochs} epochs per seed, {n * len(args.seeds)} in all")
    if args.plan:
        return 0
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {**_report.header(args.threads), "epochs": args.epochs, "seeds": args.seeds, "setups": {}}
    plots: dict[str, Path] = {}
    page = Path(args.page)
    for setup in args.setups:
        methods = args.methods or list(SETUPS[setup]["methods"])
        measured, dense = [], []
        for seed in args.seeds:
            dense.append(_dense(setup, seed, args, out))
            for method in methods:
                measured += [_measured(row) for row in _compare(setup, method, seed, args, out)]
        entries = aggregate(measured)
        report["setups"][setup] = {
            "seeds": args.seeds,
            "dense": {"test_error": _mean_std([d["test_error"] for d in dense])[0], "runs": dense},
            "entries": entries,
            "claim": claim(entries),
            "runs": measured,
        }
        plots[setup] = Path(args.img) / f"results_{setup}.png"
        _plot(setup, entries, plots[setup])
        (out / "results.json").write_text(json.dumps(report, indent=2))  # what is done so far
    lines = _page(report, args, plots, page)
    page.parent.mkdir(parents=True, exist_ok=True)
    page.write_text("\n".join(lines) + "\n")
    (out / "results.json").write_text(json.dumps(report, indent=2))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
