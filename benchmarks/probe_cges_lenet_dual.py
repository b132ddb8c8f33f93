"""Constrained CGES on LeNet-5-Caffe (Fashion-MNIST, ε = 0.10): how the dual optimizer's setting
moves the test error, measured by a script rather than by hand.

* 30 epochs with the shipped config (``fashion_lenet_cges_constrained.yaml``: dual Adam lr 3e-6);
* 10-epoch probes: dual Adam lr 1e-5 and 3e-6, exclusive sparsity alone (``sparsity.mu=0``,
  dual lr 1e-5), dual SGD lr 1e-4.

Per run: test error, exact density at the end, the first epoch within ε, the multiplier at the
last epoch, the density's range over the last 10 epochs (the flips the docs describe), and what
the finishing phase closed.

    python benchmarks/probe_cges_lenet_dual.py --threads 2 --reuse
    python benchmarks/probe_cges_lenet_dual.py --threads 1 --runs probe-1e-5 probe-3e-6   # some of them

Writes ``OUT/cges_lenet_dual.{json,md}``; with ``--reuse`` a complete run of the same config in
``OUT/runs/<run>`` is kept (a stopped one resumed).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import _report
import torch

import constrained_sparsity as cs

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "fashion_lenet_cges_constrained.yaml"
RUNS: dict[str, tuple[int, list[str]]] = {
    "config-30": (30, []),
    "probe-1e-5": (10, ["optim.dual.lr=1e-5"]),
    "probe-3e-6": (10, ["optim.dual.lr=3e-6"]),
    "probe-mu0-1e-5": (10, ["sparsity.mu=0", "optim.dual.lr=1e-5"]),
    "probe-sgd-1e-4": (10, ["optim.dual.name=sgd", "optim.dual.lr=1e-4"]),
}


def _row(name: str, result: cs.RunResult) -> dict:
    main = [row for row in result.history if "train/loss" in row]
    tail = [row["density/model"] for row in main[-10:] if "density/model" in row]
    multipliers = [v for k, v in main[-1].items() if k.endswith("/multiplier")] if main else []
    finish = result.finish or {}
    return {
        "run": name,
        "epochs": result.epochs,
        "test_error": result.test_error,
        "density": result.density.get("model"),
        "feasible": result.feasible,
        "first_feasible_epoch": _report.first_feasible(main),
        "multiplier_last_epoch": multipliers[0] if multipliers else None,
        "density_last10": [min(tail), max(tail)] if tail else None,
        "finish_closed": finish.get("units_closed"),
        "error_before_finish": finish.get("test_error_before"),
        "run_dir": str(result.run_dir),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", nargs="+", choices=list(RUNS), default=list(RUNS))
    parser.add_argument("--root", default=None, help="data.root: a directory with the Fashion-MNIST IDX files")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "out"))
    parser.add_argument("--reuse", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    report = {**_report.header(args.threads), "config": str(CONFIG.relative_to(ROOT)), "runs": []}
    for name in args.runs:
        epochs, overrides = RUNS[name]
        cfg = cs.load_config(CONFIG, [*overrides, *_report.run_overrides(epochs, args.threads, root=args.root)])
        result, how = _report.train_or_reuse(cfg, out / "runs" / f"cges-lenet-{name}", args.reuse, "cges-dual")
        print(f"[cges-dual] {name}: {how}", file=sys.stderr, flush=True)
        report["runs"].append({**_row(name, result), "overrides": overrides})
    lines = [
        "Constrained CGES, LeNet-5-Caffe, Fashion-MNIST, ε = 0.10:",
        "",
        *_report.markdown_header(report),
        "| run | overrides | epochs | test error | density | first epoch ≤ ε | λ at the end | density, last 10 epochs "
        "| finishing closed | error before finishing |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["runs"]:
        spread = "-" if r["density_last10"] is None else f"{r['density_last10'][0]:.3f}–{r['density_last10'][1]:.3f}"
        lam = "-" if r["multiplier_last_epoch"] is None else f"{r['multiplier_last_epoch']:.2e}"
        before = "-" if r["error_before_finish"] is None else f"{100 * r['error_before_finish']:.2f} %"
        lines.append(
            f"| {r['run']} | {' '.join(r['overrides']) or '(the config)'} | {r['epochs']} | "
            f"{100 * r['test_error']:.2f} % | {r['density']:.4f} | {r['first_feasible_epoch'] or 'never'} | {lam} "
            f"| {spread} | {r['finish_closed']} | {before} |"
        )
    _report.write(out, "cges_lenet_dual", report, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
