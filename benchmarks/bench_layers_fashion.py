"""Benchmark: layer sparsity on Fashion-MNIST with a deep ReLU MLP 784 -> 6 x 256 -> 10.

Reports linear layers, parameters and test error of (a) the dense network, (b) the network
after constrained training with at most k = 2 layers, (c) after merging, (d) after refitting;
and the penalised method at the first lambda of an increasing grid that gives the same count
of layers (every lambda tried is listed). The merged and unmerged outputs are compared on the
whole test set; the largest absolute difference is reported.

    python benchmarks/bench_layers_fashion.py --epochs 10 --refit 10 --threads 2

Writes benchmarks/out/layers_fashion.json and .md. Needs Fashion-MNIST
(apt-get install dataset-fashion-mnist, or --root DIR).
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


def _row(name: str, layers: int, params: int, error: float, note: str = "") -> dict:
    return {"network": name, "linear layers": layers, "parameters": params, "test error": error, "note": note}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--refit", type=int, default=10)
    parser.add_argument("--k", type=int, default=2)
    parser.add_argument("--lambdas", type=float, nargs="*", default=[10.0, 30.0, 100.0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--root", default=None)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "out"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    common = [
        *_report.run_overrides(args.epochs, args.threads, out / "runs", args.root),
        f"sparsity.layers.max_layers={args.k}",
        f"sparsity.layers.refit_epochs={args.refit}",
    ]

    def run(config: str, extra: list[str]) -> cs.RunResult:
        return cs.run(cs.load_config(ROOT / "configs" / config, [*common, *extra]))

    rows = []
    dense = run(
        "fashion_deep_mlp_layers_constrained.yaml",
        [
            "sparsity.layers.max_layers=null",
            "sparsity.layers.refit_epochs=0",
            "train.select=last",
            "name=fashion_deep_mlp_dense",
        ],
    )
    n_layers, n_params = 7, 784 * 256 + 5 * 256 * 256 + 256 * 10 + 6 * 256 + 10
    rows.append(_row("(a) dense", n_layers, n_params, dense.test_error))
    con = run("fashion_deep_mlp_layers_constrained.yaml", [])
    r = con.phases["refit"]
    assert r is not None
    depth = con.targets[0]["depth"]
    rows.append(
        _row(
            f"(b) constrained k={args.k}",
            r["depth_before"],
            r["params_before"],
            r["test_error_before"],
            f"selected epoch {con.selected_epoch}, active layers {depth}, feasible {con.feasible}",
        )
    )
    rows.append(
        _row(
            "(c) merged",
            r["depth_after"],
            r["params_after"],
            r["test_error_merged"],
            f"widths {r['widths']}, max |output diff| {r['max_abs_diff_merged']:.2e}",
        )
    )
    rows.append(_row(f"(d) refit ({args.refit} epochs)", r["depth_after"], r["params_after"], r["test_error_refit"]))
    penalized = []
    for lam in args.lambdas:
        pen = run("fashion_deep_mlp_layers_penalized.yaml", [f"sparsity.layers.lam={lam}"])
        pr = pen.phases["refit"]
        assert pr is not None
        penalized.append(
            {
                "lambda": lam,
                "depth": pen.targets[0]["depth"],
                "test_error": pen.test_error,
                "merged": pr["test_error_merged"],
                "refit": pr.get("test_error_refit"),
                "max_abs_diff": pr["max_abs_diff_merged"],
                "widths": pr["widths"],
            }
        )
        print("penalized", json.dumps(penalized[-1]), flush=True)
        if pen.targets[0]["depth"] <= depth:
            rows.append(
                _row(
                    f"penalized λ={lam:g}",
                    pr["depth_before"],
                    pr["params_before"],
                    pen.test_error,
                    f"active layers {pen.targets[0]['depth']}",
                )
            )
            rows.append(
                _row(
                    f"penalized λ={lam:g}, merged",
                    pr["depth_after"],
                    pr["params_after"],
                    pr["test_error_merged"],
                    f"max |output diff| {pr['max_abs_diff_merged']:.2e}",
                )
            )
            rows.append(
                _row(f"penalized λ={lam:g}, refit", pr["depth_after"], pr["params_after"], pr["test_error_refit"])
            )
            break
    report = {
        **_report.header(torch.get_num_threads()),
        "epochs": args.epochs,
        "rows": rows,
        "penalized_search": penalized,
    }
    lines = [
        *_report.markdown_header(report, f", training epochs: {args.epochs}, refit epochs: {args.refit}"),
        "| network | linear layers | parameters | test error | note |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['network']} | {row['linear layers']} | {row['parameters']} | "
            f"{100 * row['test error']:.2f} % | {row['note']} |"
        )
    lines += [
        "",
        "Penalised λ tried (increasing, stopped at the first with the constrained run's count):",
        "",
        "| λ | active layers | test error | merged | refit |",
        "|---|---|---|---|---|",
    ]
    for p in penalized:
        refit = "-" if p["refit"] is None else f"{100 * p['refit']:.2f} %"
        lines.append(
            f"| {p['lambda']:g} | {p['depth']} | {100 * p['test_error']:.2f} % | {100 * p['merged']:.2f} % | {refit} |"
        )
    _report.write(out, "layers_fashion", report, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
