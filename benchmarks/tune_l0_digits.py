"""Probe dual-side settings of constrained L0 on digits (the tuning log in docs/benchmarks.md).

Each argument is one run: space-separated key=value overrides on configs/digits_mlp_l0.yaml.

    python benchmarks/tune_l0_digits.py "optim.primal.gate_lr=0.003" "" "sparsity.dual_restarts=false"

Prints the final exact density, feasibility, test error, the first epoch meeting epsilon, the
share of epochs that ended feasible and the largest multiplier.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

import constrained_sparsity as cs

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str]) -> int:
    torch.set_num_threads(1)
    base = ["tracking.wandb=disabled", "tracking.progress=false", f"tracking.out_dir={ROOT / 'benchmarks/out/runs'}"]
    for overrides in argv or [""]:
        cfg = cs.load_config(ROOT / "configs/digits_mlp_l0.yaml", base + overrides.split())
        result = cs.run(cfg)
        hist = result.history
        eps = cfg.sparsity.target_list()[0]
        first = next((h["epoch"] for h in hist if h["density/model"] <= eps), None)
        feasible = sum(all(v for k, v in h.items() if k.endswith("feasible")) for h in hist) / len(hist)
        max_lam = max((h.get("constraint/l0_model/multiplier", 0.0) for h in hist), default=0.0)
        print(
            f"{overrides or '(config as shipped)':60s} density={result.density['model']:.3f} "
            f"feasible={result.feasible} error={100 * result.test_error:.1f}% first={first} "
            f"feasible_epochs={feasible:.2f} max_lambda={max_lam:.2f}",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
