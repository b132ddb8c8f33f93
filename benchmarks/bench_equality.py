"""Budgets as inequalities (the default) against equalities (``sparsity.equality=true``).

For each config, budget and seed, the constrained config trained twice, the same in all but
``sparsity.equality``. Per run: the exact measure at the last training epoch (before the
finishing phase) and the mean of the last quarter of the epochs, the measure the run ends at
(after finishing), whether it ends feasible, the units the finishing phase closed, and the
test error. The question: does an equality end nearer its budget, and does the spent budget
buy accuracy?

    python benchmarks/bench_equality.py --jobs 2 --threads 1 --seeds 0 1 2 \\
        --config configs/fashion_mlp_l0_constrained.yaml 0.33 0.5

Writes ``OUT/equality.{json,md}``; the runs go to ``OUT/equality/``, and ``--reuse`` keeps a
finished run of the same config (``_report.KeptRuns``) instead of training it again.
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
from constrained_sparsity.jobs import Runner

ROOT = Path(__file__).resolve().parents[1]


def _say(msg: str) -> None:
    print(f"[equality] {msg}", file=sys.stderr, flush=True)


def _row(result, budget: float) -> dict:  # type: ignore[no-untyped-def]
    """The measures of one run, read from its log and summary."""
    summary = json.loads((Path(result.run_dir) / "summary.json").read_text())
    (target,) = summary["targets"]
    key = target["metric"]
    measures = [row[key] for row in result.history if key in row]
    tail = measures[-max(1, len(measures) // 4) :]
    finish = summary.get("finish") or {}
    return {
        "budget": budget,
        "last_epoch": measures[-1],
        "last_quarter": statistics.mean(tail),
        "end": float(target["exact"]),
        "feasible": bool(result.feasible),
        "units_closed": finish.get("units_closed", 0),
        "test_error": result.test_error,
        "run_dir": str(result.run_dir),
    }


def _mean(rows: list[dict], key: str) -> str:
    values = [r[key] for r in rows]
    return (
        f"{statistics.mean(values):.4f}"
        if len(values) == 1
        else f"{statistics.mean(values):.4f} ({min(values):.4f}–{max(values):.4f})"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", nargs="+", action="append", required=True, metavar=("CONFIG", "BUDGET"))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=None, help="train.epochs (default: the config's)")
    parser.add_argument("--reuse", action="store_true", help="keep the finished runs of OUT/equality")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "out"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    runs = out / "equality"
    report = {**_report.header(args.threads), "jobs": args.jobs, "rows": []}
    plans = []
    for config_path, *budgets in args.config:
        for budget in map(float, budgets):
            for seed in args.seeds:
                for equality in (False, True):
                    overrides = _report.run_overrides(args.epochs or 0, args.threads)
                    if args.epochs is None:  # the config's own
                        overrides = [o for o in overrides if not o.startswith("train.epochs=")]
                    overrides += [f"train.seed={seed}", f"sparsity.targets={budget}"]
                    overrides.append(f"sparsity.equality={str(equality).lower()}")
                    cfg = cs.load_config(config_path, overrides)
                    name = f"{cfg.name}-{budget:g}-seed{seed}-{'equality' if equality else 'inequality'}"
                    plans.append((cfg, runs / name, {"config": cfg.name, "seed": seed, "equality": equality}))
    store = _report.KeptRuns(runs, out / "kept-equality", args.reuse, "equality")
    with Runner(args.jobs, args.threads, store=store, say=_say) as runner:
        runner.progress.plan(len(plans))
        made = runner.play([lambda p=p: runner.train(p[0], p[1]) for p in plans])
    for (cfg, _, info), result in zip(plans, made):
        report["rows"].append({**info, **_row(result, cfg.sparsity.target_list()[0])})
    lines = [
        *_report.markdown_header(report, f", {args.jobs} trainings at once, seeds {args.seeds}"),
        "Exact measure (mean over seeds, range in brackets); test error mean ± half the range.",
        "",
        "| config | budget | budget as | last epoch | last quarter of the epochs | end (after finishing) "
        "| feasible | units closed by finishing | test error |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    groups: dict[tuple, list[dict]] = {}
    for row in report["rows"]:
        groups.setdefault((row["config"], row["budget"], row["equality"]), []).append(row)
    for (config, budget, equality), rows in groups.items():
        errors = [r["test_error"] for r in rows]
        spread = (max(errors) - min(errors)) / 2
        lines.append(
            f"| {config} | {budget:g} | {'equality' if equality else 'inequality'} | {_mean(rows, 'last_epoch')} "
            f"| {_mean(rows, 'last_quarter')} | {_mean(rows, 'end')} | {sum(r['feasible'] for r in rows)}/{len(rows)} "
            f"| {sum(r['units_closed'] for r in rows)} | {100 * statistics.mean(errors):.2f} ± {100 * spread:.2f} % |"
        )
    out.mkdir(parents=True, exist_ok=True)
    _report.write(out, "equality", report, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
