"""Benchmark: dense vs penalised L0 vs constrained L0 on Fashion-MNIST, MLP 784-300-100.

Runs the three trainings one after another in this process, with the library's own configs
and trainer, and reports seconds per epoch (median over epochs, training steps only), the
ratios constrained/dense and constrained/penalised measured in this same run, the first epoch
at which the exact (test-time) density meets epsilon, the final density and the test errors.

    python benchmarks/bench_l0_fashion.py --epochs 30 --threads 2

Writes benchmarks/out/l0_fashion.json and .md (the numbers quoted in docs/benchmarks.md).
Needs Fashion-MNIST: apt-get install dataset-fashion-mnist (or --root DIR with IDX files).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

import constrained_sparsity as cs

ROOT = Path(__file__).resolve().parents[1]


def _run(config: str, overrides: list[str]) -> cs.RunResult:
    cfg = cs.load_config(ROOT / "configs" / config, overrides)
    return cs.run(cfg)


def _returned(r: dict, epochs: int) -> str:
    last = r["last_iterate"]
    if last is None or r["selected_epoch"] in (None, epochs):
        return "last" if last is None or r["selected_epoch"] == epochs else "last (none feasible)"
    return f"epoch {r['selected_epoch']} (last: density {last['density']:.4f}, error {100 * last['test_error']:.2f} %)"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--root", default=None, help="directory with the Fashion-MNIST IDX files")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "out"))
    parser.add_argument("--extra", nargs="*", default=[], help="key=value overrides for the L0 runs (tuning)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    common = [
        f"train.epochs={args.epochs}",
        f"train.threads={args.threads}",
        "tracking.wandb=disabled",
        "tracking.progress=false",
        f"tracking.out_dir={out / 'runs'}",
    ]
    if args.root:
        common.append(f"data.root={args.root}")
    runs = {
        "dense": ("fashion_mlp_l0_constrained.yaml", [*common, "sparsity.method=none", "name=fashion_mlp_dense"]),
        "penalized": ("fashion_mlp_l0_penalized.yaml", [*common, *args.extra]),
        "constrained": ("fashion_mlp_l0_constrained.yaml", [*common, *args.extra]),
    }
    results = {}
    for key, (config, overrides) in runs.items():
        t0 = time.perf_counter()
        result = _run(config, overrides)
        epoch_s = [row["time/epoch_s"] for row in result.history]
        eps = 0.33
        first = next((row["epoch"] for row in result.history if row.get("density/model", 1.0) <= eps), None)
        results[key] = {
            "s_per_epoch": statistics.median(epoch_s),
            "wall_s": time.perf_counter() - t0,
            "test_error": result.test_error,
            "density": result.density.get("model"),
            "expected_density": result.expected_density.get("model"),
            "feasible": result.feasible,
            "first_epoch_meeting_eps": first,
            "feasible_epochs": sum(bool(row.get("constraint/l0_model/feasible")) for row in result.history),
            "layers": {row["name"]: f"{row['active_gates']}/{row['gates']}" for row in result.layers},
            "multiplier_final": result.multipliers.get("l0_model"),
            "selected_epoch": result.selected_epoch,
            "last_iterate": result.last_iterate,
            "run_dir": str(result.run_dir),
        }
        print(key, json.dumps(results[key]), flush=True)
    a, b, c = (results[k]["s_per_epoch"] for k in ("dense", "penalized", "constrained"))
    report = {
        "command": " ".join([sys.executable.rsplit("/", 1)[-1], *sys.argv]),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "epochs": args.epochs,
        "ratio_constrained_dense": c / a,
        "ratio_constrained_penalized": c / b,
        "runs": results,
    }
    (out / "l0_fashion.json").write_text(json.dumps(report, indent=2))
    lines = [
        f"command: `{report['command']}`  ",
        f"machine: {report['machine']}, epochs: {args.epochs}",
        "",
        "| run | s/epoch | test error | exact density | expected density | first epoch ≤ ε | feasible epochs | "
        "feasible at end | returned iterate | active gates |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key, r in results.items():
        dens = "-" if r["density"] is None else f"{r['density']:.4f}"
        exp = "-" if r["expected_density"] is None else f"{r['expected_density']:.4f}"
        lines.append(
            f"| {key} | {r['s_per_epoch']:.2f} | {100 * r['test_error']:.2f} % | {dens} | {exp} | "
            f"{r['first_epoch_meeting_eps'] or '-'} | {r['feasible_epochs']}/{args.epochs} | {r['feasible']} | "
            f"{_returned(r, args.epochs)} | "
            f"{' '.join(f'{k}:{v}' for k, v in r['layers'].items()) or '-'} |"
        )
    lines += [
        "",
        f"ratio constrained / dense s/epoch: {report['ratio_constrained_dense']:.3f} (goal ≤ 1.3)  ",
        f"ratio constrained / penalized s/epoch: {report['ratio_constrained_penalized']:.3f} (goal ≤ 1.05)",
    ]
    (out / "l0_fashion.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
