"""Same config, two versions of the code: are the logged metrics the same?

Runs each config with ``train.deterministic=true`` under the code of a git revision (checked
out into a temporary worktree) and under the working tree, then compares the two
``metrics.jsonl`` files row by row and key by key (every key except ``time/*``).

    python benchmarks/compare_metrics.py --before 2d076c2 configs/digits_mlp_l0.yaml \\
        configs/digits_deep_mlp_layers.yaml

Prints, per config, the number of rows and values compared, how many are bit-identical, the
largest absolute difference, the keys present on one side only and the median seconds per
epoch of each side (one run each, one after the other: a coarse speed check); exits 1 when a value
differs by more than ``--tol`` (default 0: exact) or a key or row is missing.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _train(code_root: Path, config: Path, run_dir: Path, threads: int, extra: list[str]) -> list[dict]:
    """One ``csparse train`` run of ``config`` with the package found at ``code_root``."""
    env = dict(os.environ, PYTHONPATH=str(code_root), WANDB_MODE="disabled")
    overrides = [
        "train.deterministic=true",
        f"train.threads={threads}",
        "tracking.wandb=disabled",
        "tracking.progress=false",
        *extra,
    ]
    cmd = [sys.executable, "-m", "constrained_sparsity", "train", str(config), *overrides, "--run-dir", str(run_dir)]
    done = subprocess.run(cmd, cwd=code_root, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} (in {code_root}) failed:\n{done.stderr[-3000:]}")
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def _compare(before: list[dict], after: list[dict], tol: float) -> dict:
    out = {"rows": (len(before), len(after)), "values": 0, "identical": 0, "max_abs_diff": 0.0, "worst": None}
    only_before: set[str] = set()
    only_after: set[str] = set()
    bad = len(before) != len(after)
    for i, (a, b) in enumerate(zip(before, after)):
        keys_a = {k for k in a if not k.startswith("time/")}
        keys_b = {k for k in b if not k.startswith("time/")}
        only_before |= keys_a - keys_b
        only_after |= keys_b - keys_a
        for key in sorted(keys_a & keys_b):
            va, vb = a[key], b[key]
            out["values"] += 1
            if va == vb:
                out["identical"] += 1
                continue
            if isinstance(va, (int, float)) and isinstance(vb, (int, float)) and not isinstance(va, bool):
                diff = abs(va - vb) if math.isfinite(va) and math.isfinite(vb) else math.inf
            else:
                diff = math.inf
            if diff > out["max_abs_diff"]:
                out["max_abs_diff"], out["worst"] = diff, f"row {i + 1} {key}: {va!r} -> {vb!r}"
            bad |= diff > tol
    out["only_before"], out["only_after"] = sorted(only_before), sorted(only_after)
    out["ok"] = not bad and not only_before and not only_after
    out["seconds"] = tuple(_median_epoch_s(rows) for rows in (before, after))
    return out


def _median_epoch_s(rows: list[dict]) -> float:
    """The median seconds per epoch of a run's rows (every phase's): its speed, beside the values."""
    times = sorted(float(r["time/epoch_s"]) for r in rows if "time/epoch_s" in r)
    return times[len(times) // 2] if times else math.nan


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("configs", nargs="+", help="config files, relative to the repository root")
    parser.add_argument("--before", required=True, help="git revision of the reference code")
    parser.add_argument("--tol", type=float, default=0.0, help="largest allowed absolute difference (default 0)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--override", action="append", default=[], help="extra key=value for both runs")
    args = parser.parse_args(argv)
    print(f"command: python {' '.join(sys.argv)}")
    ok = True
    with tempfile.TemporaryDirectory(prefix="compare_metrics-") as tmp:
        tree = Path(tmp) / "before"
        subprocess.run(
            ["git", "worktree", "add", "--detach", str(tree), args.before], cwd=ROOT, check=True, capture_output=True
        )
        try:
            for config in args.configs:
                old = _train(
                    tree, tree / config, Path(tmp) / "runs" / f"before-{Path(config).stem}", args.threads, args.override
                )
                new = _train(
                    ROOT, ROOT / config, Path(tmp) / "runs" / f"after-{Path(config).stem}", args.threads, args.override
                )
                r = _compare(old, new, args.tol)
                ok &= r["ok"]
                print(
                    f"{config}: rows {r['rows'][0]} / {r['rows'][1]}, values compared {r['values']}, "
                    f"bit-identical {r['identical']}, max |difference| {r['max_abs_diff']:.3g}"
                    + (f" ({r['worst']})" if r["worst"] else "")
                    + (f", keys only before: {r['only_before']}" if r["only_before"] else "")
                    + (f", keys only after: {r['only_after']}" if r["only_after"] else "")
                    + ("" if r["ok"] else "  <-- DIFFERS")
                    + f"; s/epoch (median) {r['seconds'][0]:.3g} -> {r['seconds'][1]:.3g}"
                )
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT, capture_output=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
