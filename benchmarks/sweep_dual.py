"""Dual-side settings across budgets: which multiplier dynamics leave the least for the
finishing phase to close, and the lowest error after it.

Each setting is a set of overrides on one config; each runs at every budget (model-wise) and
seed. For every run: the last iterate's exact density (before finishing), the units the
finishing phase closed, the test error before and after finishing, feasible at the end.

    python benchmarks/sweep_dual.py configs/digits_mlp_l0.yaml --targets 0.05 0.1 0.2 0.3 0.5 0.7 \\
        --setting "sgd 0.05=optim.dual.name=sgd optim.dual.lr=0.05" \\
        --setting "adam 1e-2=optim.dual.name=adam optim.dual.lr=0.01"

A setting is ``LABEL=OVERRIDES`` (space-separated ``key=value``; the first ``=`` ends the
label). Writes ``benchmarks/out/sweep_dual-<config>.{json,md}``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import _report
import torch

import constrained_sparsity as cs

ROOT = Path(__file__).resolve().parents[1]


def _one(config: Path, overrides: list[str]) -> dict:
    t0 = time.perf_counter()
    result = cs.run(cs.load_config(config, overrides))
    last = result.history[-1] if result.history else {}
    finish = result.finish or {}
    return {
        "density_last": last.get("density/model"),
        "error_last": last.get("test/error"),
        "units_closed": finish.get("units_closed", 0),
        "error_closed": finish.get("test_error_closed"),
        "error": result.test_error,
        "density": result.density.get("model"),
        "feasible": result.feasible,
        "seconds": time.perf_counter() - t0,
        "finish_seconds": finish.get("seconds", 0.0),
        "run_dir": str(result.run_dir),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("--targets", nargs="+", type=float, required=True)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--setting", action="append", required=True, metavar="LABEL=OVERRIDES")
    parser.add_argument("--extra", nargs="*", default=[], help="overrides for every run")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "out"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    config = Path(args.config)
    base = _report.run_overrides(0, args.threads, out / "runs")[1:]  # threads, no W&B, no progress bar
    report = {**_report.header(args.threads), "config": str(config), "settings": {}}
    lines = [
        *_report.markdown_header(report),
        "| setting | " + " | ".join(f"ε = {t:g}" for t in args.targets) + " | mean error | all feasible |",
        "|---|" + "---|" * (len(args.targets) + 2),
    ]
    for setting in args.setting:
        label, _, overrides = setting.partition("=")
        cells, errors, feasible = [], [], True
        runs = report["settings"].setdefault(label, {"overrides": overrides, "runs": []})
        for eps in args.targets:
            per_seed = []
            for seed in args.seeds:
                extra = [*base, *args.extra, *overrides.split(), f"sparsity.targets={eps}", f"train.seed={seed}"]
                row = {"target": eps, "seed": seed, **_one(config, extra)}
                runs["runs"].append(row)
                per_seed.append(row)
                print(f"{label} ε={eps:g} seed={seed}: {row}", file=sys.stderr, flush=True)
            error = statistics.mean(r["error"] for r in per_seed)
            errors.append(error)
            feasible &= all(r["feasible"] for r in per_seed)
            last = statistics.mean(r["density_last"] or 0 for r in per_seed)
            closed = sum(r["units_closed"] for r in per_seed)
            cells.append(f"{100 * error:.2f} % (last {last:.3f}, closed {closed})")
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {100 * statistics.mean(errors):.2f} % | {feasible} |")
        _report.write(out, f"sweep_dual-{config.stem}", report, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
