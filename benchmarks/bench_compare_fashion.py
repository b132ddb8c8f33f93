"""Benchmark: constrained L0 vs penalised L0 with a bisection search over lambda (Fashion-MNIST).

For each config (MLP 784-300-100 and LeNet-5-Caffe by default) and each target epsilon,
runs ``csparse compare``'s machinery: one constrained run per epsilon, and a log-scale
bisection over lambda per epsilon (tolerance --tol on the exact model-wise density, at most
--max-runs runs), every run with the same number of epochs. Reports, per method and target,
|achieved - epsilon|, feasibility, test error, runs and wall time, and writes the comparison
plots.

    python benchmarks/bench_compare_fashion.py --epochs 5 --max-runs 5

Writes benchmarks/out/compare_fashion.json and .md, and the comparison directories under
benchmarks/out/compare/.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import _report
import torch

import constrained_sparsity as cs
from constrained_sparsity.compare import compare

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--configs", nargs="+", default=["fashion_mlp_l0_constrained.yaml", "fashion_lenet_l0_constrained.yaml"]
    )
    parser.add_argument("--targets", nargs="+", type=float, default=[0.1, 0.33, 0.5])
    parser.add_argument("--epochs", nargs="+", type=int, default=[5], help="one value, or one per config")
    parser.add_argument("--max-runs", nargs="+", type=int, default=[5], help="one value, or one per config")
    parser.add_argument("--tol", type=float, default=0.01)
    parser.add_argument("--lambda-range", nargs=2, type=float, default=[0.01, 10.0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "out"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    summary = []
    for i, config in enumerate(args.configs):
        epochs = args.epochs[min(i, len(args.epochs) - 1)]
        max_runs = args.max_runs[min(i, len(args.max_runs) - 1)]
        cfg = cs.load_config(ROOT / "configs" / config, _report.run_overrides(epochs, args.threads))
        result = compare(
            cfg,
            args.targets,
            bisect=True,
            tol=args.tol,
            max_runs=max_runs,
            lambda_range=tuple(args.lambda_range),
            out_dir=out / "compare" / cfg.name,
            progress=lambda m: print(m, flush=True),
        )
        for row in result.rows:
            eps = float(row["target"])
            summary.append(
                {
                    "config": config,
                    "epochs": epochs,
                    "method": row["mode"],
                    "target": eps,
                    "lambda": row["lambda"],
                    "achieved": row["achieved"],
                    "miss": abs(row["achieved"] - eps),
                    "feasible": row["feasible"],
                    "test_error": row["test_error"],
                    "runs": row["runs_used"],
                    "wall_s": row["wall_time_s"],
                    "search": row["search"],
                    "dir": str(result.out_dir),
                }
            )
            print(json.dumps(summary[-1]), flush=True)
    report = {**_report.header(args.threads), "rows": summary}
    lines = [
        *_report.markdown_header(report, f"; tolerance {args.tol}, λ range {args.lambda_range}"),
        "| config | epochs/run | method | ε | λ | achieved density | abs(achieved − ε) | feasible | test error | "
        "runs | wall s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in summary:
        lam = "-" if r["lambda"] == "-" else f"{r['lambda']:.4g}"
        lines.append(
            f"| {r['config'].replace('.yaml', '')} | {r['epochs']} | {r['method']} | {r['target']:g} | {lam} | "
            f"{r['achieved']:.4f} | {r['miss']:.4f} | {r['feasible']} | {100 * r['test_error']:.2f} % | "
            f"{r['runs']} | {r['wall_s']:.0f} |"
        )
    _report.write(out, "compare_fashion", report, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
