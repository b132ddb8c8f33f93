"""Constrained runs (with the finishing phase) against penalties bisected to the same budget.

For each config, budget and seed, ``csparse compare`` runs the constrained config once and a
penalised bisection over λ (finishing off, the classic penalty) until the achieved density is
within the tolerance or ``--max-runs`` runs are spent. The table gives, per budget, the
constrained runs' exact density, feasibility and test error (mean and spread over seeds),
the bisected penalty's error and how many runs it took, and the finishing phase's share of
the training time.

    python benchmarks/bench_finish.py --threads 2 --seeds 0 1 2 \\
        --config configs/digits_mlp_l0.yaml 0.05 0.1 0.2 0.3 0.5 0.7 0.5,0.3,0.8 \\
        --config configs/fashion_mlp_l0_constrained.yaml 0.1 0.33 0.5

Goals (issue 16): every constrained run ends feasible; its mean error is at most the
penalised mean error + 0.3 points at every budget; finishing costs at most 10 % of the
training time. Writes ``benchmarks/out/finish.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import _report
import torch

import constrained_sparsity as cs
from constrained_sparsity.compare import compare, parse_budget

ROOT = Path(__file__).resolve().parents[1]


def _summary(run_dir: str) -> dict:
    return json.loads((Path(run_dir) / "summary.json").read_text())


def _spread(values: list[float]) -> str:
    mean = statistics.mean(values)
    half = (max(values) - min(values)) / 2
    return f"{100 * mean:.2f} ± {100 * half:.2f} %"


def _saved_rows(cmp_dir: Path, budgets: list) -> list[dict] | None:
    """The rows of a comparison already written to ``cmp_dir`` (``None`` if it is not complete),
    feasibility read again by the training step's rule (float32)."""
    import csv

    from constrained_sparsity.lambda_search import within as _within

    path = cmp_dir / "results.csv"
    if not path.is_file():
        return None
    rows = []
    with path.open() as fh:
        for row in csv.DictReader(fh):
            target, achieved = json.loads(row["target"]), json.loads(row["achieved"])
            pairs = zip(achieved, target) if isinstance(target, list) else [(achieved, target)]
            rows.append(
                {
                    "method": row["mode"],
                    "target": target,
                    "achieved": achieved,
                    "feasible": all(_within(a, b) for a, b in pairs),
                    "test_error": float(row["test_error"]),
                    "runs_used": int(row["runs_used"]),
                    "run_dir": row["run_dir"],
                }
            )
    found = {json.dumps(r["target"]) for r in rows if r["mode"] == "constrained"}
    return rows if found >= {json.dumps(b) for b in budgets} else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", nargs="+", action="append", required=True, metavar=("CONFIG", "BUDGET"))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-runs", type=int, default=6, help="bisection runs per budget")
    parser.add_argument("--extra", nargs="*", default=[], help="overrides for every run")
    parser.add_argument(
        "--reuse",
        action="store_true",
        help="read the comparisons already in --out (a seed without one is left out) instead of training",
    )
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "out"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {**_report.header(args.threads), "results": []}
    lines = [
        *_report.markdown_header(report, f", seeds {args.seeds}, bisection at most {args.max_runs} runs"),
        "| config | budget | constrained: exact density | feasible | test error | penalised (bisected): "
        "test error | its density | its runs (mean) | error goal met | finishing / training time |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for config_path, *budgets in args.config:
        cfg_name = Path(config_path).stem
        per_budget: dict[str, dict[str, list]] = {}
        for seed in args.seeds:
            overrides = [*_report.run_overrides(0, args.threads)[1:], f"train.seed={seed}", *args.extra]
            cfg = cs.load_config(config_path, overrides)
            cmp_dir = out / "finish" / f"{cfg_name}-seed{seed}"
            if args.reuse:
                rows = _saved_rows(cmp_dir, [parse_budget(b) for b in budgets])
                if rows is None:
                    continue
            else:
                rows = compare(
                    cfg,
                    [parse_budget(b) for b in budgets],
                    bisect=True,
                    max_runs=args.max_runs,
                    out_dir=cmp_dir,
                    overwrite=True,
                    progress=lambda msg: print(msg, file=sys.stderr, flush=True),
                ).rows
            for row in rows:
                key = json.dumps(row["target"])
                slot = per_budget.setdefault(key, {"constrained": [], "penalized": []})
                summary = _summary(row["run_dir"])
                finish = summary.get("finish") or {}
                slot[row["mode"]].append(
                    {
                        "seed": seed,
                        "achieved": row["achieved"],
                        "density": summary["density"].get("model"),
                        "feasible": row["feasible"],
                        "test_error": row["test_error"],
                        "runs": row["runs_used"],
                        "wall_time_s": summary["wall_time_s"],
                        "finish_s": finish.get("seconds", 0.0),
                        "units_closed": finish.get("units_closed", 0),
                        "run_dir": row["run_dir"],
                    }
                )
        for budget, slot in per_budget.items():
            con, pen = slot["constrained"], slot["penalized"]
            report["results"].append({"config": cfg_name, "budget": json.loads(budget), **slot})
            con_err = statistics.mean(r["test_error"] for r in con)
            pen_err = statistics.mean(r["test_error"] for r in pen)
            share = max(r["finish_s"] / max(r["wall_time_s"] - r["finish_s"], 1e-9) for r in con)
            lines.append(
                f"| {cfg_name} | {json.loads(budget)} | "
                + ", ".join(f"{r['density']:.4f}" for r in con)
                + f" | {sum(bool(r['feasible']) for r in con)}/{len(con)} | "
                + f"{_spread([r['test_error'] for r in con])} | "
                + f"{_spread([r['test_error'] for r in pen])} | "
                + ", ".join(f"{r['density']:.4f}" for r in pen)
                + f" | {statistics.mean(r['runs'] for r in pen):.1f} | "
                + f"{'yes' if con_err <= pen_err + 0.003 else 'NO'} | {100 * share:.1f} % |"
            )
        _report.write(out, "finish", report, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
