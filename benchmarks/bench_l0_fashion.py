"""Benchmark: dense vs penalised L0 vs constrained L0 on Fashion-MNIST, MLP 784-300-100.

Runs the three trainings one after another in this process, with the library's own configs
and trainer, and reports the first epoch at which the exact (test-time) density meets
epsilon, the final density and the test errors.

Speed: the machine is shared and its speed drifts by 2-5x over minutes, so per-epoch times of
runs made one after another do not compare. The script therefore also rebuilds the three
trainers, at their initial state and at their final state (from each run's checkpoint), and
times training steps on the same Fashion-MNIST batches in interleaved rounds (dense,
penalised, constrained, dense, ...). Seconds per epoch = median step time x steps per epoch;
the ratios come from these interleaved timings.

    python benchmarks/bench_l0_fashion.py --epochs 30 --threads 2

Writes benchmarks/out/l0_fashion.json and .md (the numbers quoted in docs/benchmarks.md).
Needs Fashion-MNIST: apt-get install dataset-fashion-mnist (or --root DIR with IDX files).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import _report
import torch

import constrained_sparsity as cs

ROOT = Path(__file__).resolve().parents[1]


def _run(config: str, overrides: list[str]) -> cs.RunResult:
    cfg = cs.load_config(ROOT / "configs" / config, overrides)
    return cs.run(cfg)


def _ratios(timing: dict) -> dict:
    """Constrained / dense and constrained / penalised seconds per epoch, per state."""
    ratios = {}
    for phase in ("start", "end"):
        a, b, c = (timing[f"{k}/{phase}"] for k in ("dense", "penalized", "constrained"))
        ratios[phase] = {"constrained_dense": c / a, "constrained_penalized": c / b}
    return ratios


def _by_batch_size(results: dict, args: argparse.Namespace) -> dict:
    """The interleaved timing again on each of ``--batch-sizes``: seconds per epoch and ratios."""
    out = {}
    for bs in args.batch_sizes:
        timing = _report.interleaved_timing(results, args.rounds, args.steps, bs)
        out[bs] = {"s_per_epoch": timing, "ratios": _ratios(timing)}
        for phase, r in out[bs]["ratios"].items():
            print(
                f"batch {bs}, {phase}: constrained/dense {r['constrained_dense']:.3f}, "
                f"constrained/penalized {r['constrained_penalized']:.3f}",
                flush=True,
            )
    return out


def _returned(r: dict, epochs: int) -> str:
    last = r["last_iterate"]
    if r.get("selected_step") is not None:
        return (
            f"epoch {r['selected_epoch']}, step {r['selected_step']} "
            f"(end of epoch: density {last['density']:.4f}, error {100 * last['test_error']:.2f} %)"
        )
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
    parser.add_argument("--rounds", type=int, default=12, help="interleaved timing rounds")
    parser.add_argument("--steps", type=int, default=40, help="training steps per setup and round")
    parser.add_argument(
        "--batch-sizes",
        type=int,
        nargs="*",
        default=[],
        help="also time the trained states on batches of these sizes (the per-step overhead amortises)",
    )
    parser.add_argument(
        "--timing-only",
        action="store_true",
        help="skip the trainings: re-time the runs recorded in OUT/l0_fashion.json (after a code change)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    common = _report.run_overrides(args.epochs, args.threads, out / "runs", args.root)
    runs = {
        "dense": ("fashion_mlp_l0_constrained.yaml", [*common, "sparsity.method=none", "name=fashion_mlp_dense"]),
        "penalized": ("fashion_mlp_l0_penalized.yaml", [*common, *args.extra]),
        "constrained": ("fashion_mlp_l0_constrained.yaml", [*common, *args.extra]),
    }
    results = {}
    if args.timing_only:
        previous = json.loads((out / "l0_fashion.json").read_text())
        timing = _report.interleaved_timing(previous["runs"], args.rounds, args.steps)
        previous["interleaved_s_per_epoch"] = timing
        previous["ratios"] = _ratios(timing)
        previous["by_batch_size"] = _by_batch_size(previous["runs"], args)
        for phase, r in previous["ratios"].items():
            print(
                f"{phase}: dense {timing[f'dense/{phase}']:.2f} penalized {timing[f'penalized/{phase}']:.2f} "
                f"constrained {timing[f'constrained/{phase}']:.2f} s/epoch; constrained/dense "
                f"{r['constrained_dense']:.3f}, constrained/penalized {r['constrained_penalized']:.3f}"
            )
        previous["timing_command"] = " ".join(["python", *sys.argv])
        (out / "l0_fashion.json").write_text(json.dumps(previous, indent=2))
        return 0
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
            "selected_step": result.selected_step,
            "last_iterate": result.last_iterate,
            "run_dir": str(result.run_dir),
        }
        print(key, json.dumps(results[key]), flush=True)
    timing = _report.interleaved_timing(results, args.rounds, args.steps)
    print("interleaved s/epoch", json.dumps(timing), flush=True)
    ratios = _ratios(timing)
    by_batch_size = _by_batch_size(results, args)
    report = {
        **_report.header(torch.get_num_threads()),
        "epochs": args.epochs,
        "interleaved_s_per_epoch": timing,
        "ratios": ratios,
        "by_batch_size": by_batch_size,
        "runs": results,
    }
    lines = [
        *_report.markdown_header(report, f", epochs: {args.epochs}"),
        "| run | s/epoch (in its run) | test error | exact density | expected density | first epoch ≤ ε | "
        "feasible epochs | feasible at end | returned iterate | active gates |",
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
        f"Interleaved timing ({args.rounds} rounds x {args.steps} steps per setup), seconds per epoch:",
        "",
        "| state | dense | penalized | constrained | constrained / dense (goal ≤ 1.3) | "
        "constrained / penalized (goal ≤ 1.05) |",
        "|---|---|---|---|---|---|",
    ]
    for phase in ("start", "end"):
        lines.append(
            f"| {phase} of training | {timing[f'dense/{phase}']:.2f} | {timing[f'penalized/{phase}']:.2f} | "
            f"{timing[f'constrained/{phase}']:.2f} | {ratios[phase]['constrained_dense']:.3f} | "
            f"{ratios[phase]['constrained_penalized']:.3f} |"
        )
    if by_batch_size:
        lines += [
            "",
            "The same trained states timed on other batch sizes (seconds per epoch of that batch size):",
            "",
            "| batch | state | dense | penalized | constrained | constrained / dense | constrained / penalized |",
            "|---|---|---|---|---|---|---|",
        ]
        for bs, entry in by_batch_size.items():
            t, rat = entry["s_per_epoch"], entry["ratios"]
            for phase in ("start", "end"):
                lines.append(
                    f"| {bs} | {phase} | {t[f'dense/{phase}']:.2f} | {t[f'penalized/{phase}']:.2f} | "
                    f"{t[f'constrained/{phase}']:.2f} | {rat[phase]['constrained_dense']:.3f} | "
                    f"{rat[phase]['constrained_penalized']:.3f} |"
                )
    _report.write(out, "l0_fashion", report, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
