"""Table 1 of Fedorov & Rao on Fashion-MNIST with LeNet-5-Caffe: per-weight pruning
methods from one trained dense network, at a budget of non-zero weights.

1. A dense LeNet-5-Caffe is trained once (``--dense-epochs``).
2. Each method starts from it (``train.init_from``) and gets ``--epochs`` further epochs, its
   final pruning and retraining included (``--finish-epochs`` of them): re-weighted l1, l2,
   FOCUSS (p = 0.5), DNS, LWC (the shipped ``configs/fashion_lenet_<method>.yaml``) and
   constrained per-weight L0 (``fashion_lenet_l0_constrained.yaml`` with
   ``sparsity.structure=weight``), at each budget of ``--budgets``.
3. Rows conv1, conv2, fc1, fc2, total: % non-zero weights of the returned network; its test
   error; whether the budget held before the final pruning (the constrained runs: reached by
   the game, no lambda search) and at the end; seconds per epoch against dense, timed
   interleaved on the same batches at each run's end state (``_report.interleaved_timing``,
   the methods' per-step work included).

    python benchmarks/bench_table1.py --threads 2 --dense-epochs 10 --epochs 30 --budgets 0.05 0.02

With ``--reuse`` a run already complete under ``--out`` with the same config is kept and one
that was stopped (SIGINT / SIGTERM) is resumed from its checkpoint, so the table (13 LeNet
trainings) can be built over several invocations.

Writes ``benchmarks/out/table1.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import _report
import torch

import constrained_sparsity as cs

ROOT = Path(__file__).resolve().parents[1]
METHODS = {  # column label: (config, extra overrides)
    "RW-l1": ("fashion_lenet_rw_l1.yaml", []),
    "RW-l2": ("fashion_lenet_rw_l2.yaml", []),
    "FOCUSS": ("fashion_lenet_focuss.yaml", []),
    "DNS": ("fashion_lenet_dns.yaml", []),
    "LWC": ("fashion_lenet_lwc.yaml", []),
    "L0 (constrained)": ("fashion_lenet_l0_constrained.yaml", ["sparsity.structure=weight"]),
}
LAYERS = ("conv1", "conv2", "fc1", "fc2")
# Fedorov & Rao, Table 1 (MNIST, LeNet-5): % non-zero weights, test error %
SEED_MNIST = {
    "RW-l1": (1.28, 1.16),
    "RW-l2": (1.26, 1.41),
    "FOCUSS": (1.7, 1.13),
    "DNS": (0.9, 0.91),
    "LWC": (8.0, 0.77),
    "reference": (100.0, 0.86),
}


def _layers(summary: dict) -> dict[str, tuple[int, int]]:
    """(weights, non-zero weights) per pruned layer, from a run's summary."""
    out = {}
    for row in summary["layers"]:
        out[row["name"]] = (int(row["params"]), int(row["active_params"]))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.05, 0.02])
    parser.add_argument("--methods", nargs="+", choices=sorted(METHODS), default=list(METHODS))
    parser.add_argument("--dense-epochs", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=30, help="further epochs per method, retraining included")
    parser.add_argument("--finish-epochs", type=int, default=2, help="of --epochs: the final retraining")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds")
    parser.add_argument("--steps", type=int, default=20, help="training steps per setup and round")
    parser.add_argument("--root", default=None, help="data.root: a directory with the Fashion-MNIST IDX files")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "out"))
    parser.add_argument(
        "--reuse",
        action="store_true",
        help="keep a run already complete in --out whose config is the one this command would train, "
        "resume one that was stopped (the table can then be built over several invocations)",
    )
    args = parser.parse_args(argv)
    if not 0 <= args.finish_epochs < args.epochs:
        parser.error("--finish-epochs should be in [0, --epochs)")
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs_dir = out / "table1"

    def train(config: str, name: str, epochs: int, *extra: str) -> cs.RunResult:
        overrides = [*_report.run_overrides(epochs, args.threads, runs_dir, args.root), *extra]
        cfg = cs.load_config(ROOT / "configs" / config, overrides)
        result, how = _report.train_or_reuse(cfg, runs_dir / name, args.reuse, "table1")
        print(f"[table1] {name} ({how}): test error {100 * result.test_error:.2f} %", file=sys.stderr, flush=True)
        return result

    dense = train("fashion_lenet_l0_constrained.yaml", "dense", args.dense_epochs, "sparsity.method=none")
    report = {
        **_report.header(args.threads),
        "dense": {"epochs": args.dense_epochs, "test_error": dense.test_error, "run_dir": str(dense.run_dir)},
        "epochs": args.epochs,
        "finish_epochs": args.finish_epochs,
        "budgets": {},
    }
    timing_runs = {"dense": {"run_dir": str(dense.run_dir)}}
    for eps in args.budgets:
        rows = {}
        for label in args.methods:
            config, extra = METHODS[label]
            name = f"{label.split()[0].lower()}-{eps}"
            result = train(
                config,
                name,
                args.epochs - args.finish_epochs,
                f"sparsity.targets={eps}",
                f"train.init_from={dense.run_dir}",
                "finish.enabled=true",
                f"finish.epochs={args.finish_epochs}",
                *extra,
            )
            summary = json.loads((result.run_dir / "summary.json").read_text())
            layers = _layers(summary)
            total = sum(n for n, _ in layers.values()), sum(k for _, k in layers.values())
            finish = summary.get("finish") or {}
            before = finish.get("strict_violation_before", {})
            times = [row["time/epoch_s"] for row in result.history if "time/epoch_s" in row]
            rows[label] = {
                "run_dir": str(result.run_dir),
                "nonzero": {n: k for n, (_, k) in layers.items()},
                "weights": {n: w for n, (w, _) in layers.items()},
                "density": {n: k / w for n, (w, k) in layers.items()},
                "total": total[1] / total[0],
                "test_error": result.test_error,
                "feasible_before_pruning": all(v <= 0 for v in before.values()) if before else None,
                "first_feasible_epoch": _report.first_feasible(result.history),
                "feasible": result.feasible,
                "units_closed": finish.get("units_closed"),
                "s_per_epoch_in_run": sum(times) / max(len(times), 1),
            }
            if eps == args.budgets[0]:
                timing_runs[label] = {"run_dir": str(result.run_dir)}
        report["budgets"][str(eps)] = rows
    timing = _report.interleaved_timing(timing_runs, args.rounds, args.steps)
    report["s_per_epoch"] = timing
    report["ratio_to_dense"] = {
        label: timing[f"{label}/end"] / timing["dense/end"] for label in timing_runs if label != "dense"
    }
    _report.write(out, "table1", report, _markdown(report, args))
    return 0


def _markdown(report: dict, args: argparse.Namespace) -> list[str]:
    lines = [
        *_report.markdown_header(
            report,
            f", dense {args.dense_epochs} epochs, then {args.epochs} epochs per method "
            f"({args.finish_epochs} of them the final retraining)",
        ),
        "",
    ]
    dense_error = report["dense"]["test_error"]
    for eps, rows in report["budgets"].items():
        labels = list(rows)
        lines += [
            f"### ε = {eps} (% non-zero weights; dense reference test error {100 * dense_error:.2f} %)",
            "",
            "| layer | " + " | ".join(labels) + " |",
            "|---|" + "---|" * len(labels),
        ]
        for layer in LAYERS:
            cells = [f"{100 * rows[label]['density'].get(layer, float('nan')):.2f}" for label in labels]
            lines.append(f"| {layer} | " + " | ".join(cells) + " |")
        lines.append("| **total** | " + " | ".join(f"**{100 * rows[label]['total']:.2f}**" for label in labels) + " |")
        lines.append(
            "| test error | " + " | ".join(f"{100 * rows[label]['test_error']:.2f} %" for label in labels) + " |"
        )
        lines.append(
            "| ≤ ε at the end | " + " | ".join("yes" if rows[label]["feasible"] else "NO" for label in labels) + " |"
        )
        lines.append(
            "| ≤ ε before the final pruning | "
            + " | ".join(
                {True: "yes", False: "no", None: "-"}[rows[label]["feasible_before_pruning"]] for label in labels
            )
            + " |"
        )
        lines.append(
            "| first epoch ≤ ε | "
            + " | ".join(str(rows[label]["first_feasible_epoch"] or "-") for label in labels)
            + " |"
        )
        best = min(labels, key=lambda label: rows[label]["test_error"])
        lines += ["", f"Lowest test error at ε = {eps}: **{best}** ({100 * rows[best]['test_error']:.2f} %).", ""]
    timing, ratio = report["s_per_epoch"], report["ratio_to_dense"]
    lines += [
        f"Seconds per epoch at the end state (ε = {next(iter(report['budgets']))}), interleaved on the same batches: "
        f"dense {timing['dense/end']:.2f}; "
        + ", ".join(f"{label} {timing[f'{label}/end']:.2f} (**{r:.3f}×** dense)" for label, r in ratio.items())
        + ".",
        "",
        "Table 1 of Fedorov & Rao, **MNIST** (LeNet-5; % non-zero weights / test error %): "
        + ", ".join(f"{k} {v[0]} / {v[1]}" for k, v in SEED_MNIST.items())
        + ".",
        "",
    ]
    return lines


if __name__ == "__main__":
    sys.exit(main())
