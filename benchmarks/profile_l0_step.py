"""Where a training step's time goes: cProfile of steps at a run's end state (docs/benchmarks.md, issue 2).

    python benchmarks/profile_l0_step.py RUN_DIR [--steps 300] [--threads 2] [--ops]

Rebuilds the run's trainer from its config and checkpoint (as ``bench_l0_fashion``'s
interleaved timing does), warms up, profiles ``--steps`` calls of ``train_step`` on real
batches, and prints milliseconds per step of the parts: the model's forward, the
``backward()`` calls, the primal and dual optimizer steps, and Cooper's bookkeeping.
Profiling slows Python calls down: compare the parts with each other, not with timings.
With ``--ops``, also counts the PyTorch operator calls (``aten::``, nested ones included)
per step under ``torch.profiler``, and lists the most frequent.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
from pathlib import Path

import _report
import torch

import constrained_sparsity as cs

# (label, function name as pstats records it: (file suffix, function))
PARTS = [
    ("step (train_step)", ("constrained_sparsity/problem.py", "train_step")),
    ("CMP state: forward + loss + measures", ("constrained_sparsity/problem.py", "compute_cmp_state")),
    ("  model forward", ("torch/nn/modules/container.py", "forward")),
    ("  the one draw of all gate samples", ("constrained_sparsity/methods/l0.py", "__call__")),
    ("  constraint states (density measures)", ("constrained_sparsity/problem.py", "_constraint_states")),
    ("backward() calls", ("torch/autograd/__init__.py", "backward")),
    ("primal step", ("cooper/optim/optimizer.py", "primal_step")),
    ("  fused Adam kernel", ("~", "<built-in method torch._fused_adam_>")),
    ("dual step", ("cooper/optim/constrained_optimizers/constrained_optimizer.py", "dual_step")),
    ("Lagrangians", ("cooper/cmp.py", "_compute_primal_or_dual_lagrangian")),
    ("zero_grad", ("cooper/optim/optimizer.py", "zero_grad")),
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--ops", action="store_true", help="count PyTorch operator calls per step")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    run_dir = Path(args.run_dir)
    cfg, dataset, _, _, problem, optimizers = _report.rebuild_trainer(run_dir)
    data = _report.train_batches(dataset, cfg.data.batch_size)

    def steps(n: int) -> None:
        for i in range(n):
            cs.train_step(problem, optimizers, *data[i % len(data)], cfg.sparsity.dual_restarts)

    steps(20)
    profiler = cProfile.Profile()
    profiler.enable()
    steps(args.steps)
    profiler.disable()
    stats = pstats.Stats(profiler).stats  # {(file, line, name): (cc, nc, tt, ct, callers)}
    print(f"{args.steps} steps of {run_dir.name}, ms per step (cumulative, under cProfile):")
    for label, (suffix, name) in PARTS:
        total = sum(v[3] for (file, _, fn), v in stats.items() if fn == name and file.endswith(suffix))
        print(f"  {label:42s} {1e3 * total / args.steps:7.3f}")
    if args.ops:
        from torch.profiler import ProfilerActivity, profile

        n = 50
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            steps(n)
        counts = {e.key: e.count / n for e in prof.key_averages() if e.key.startswith("aten::")}
        print(f"PyTorch operator calls per step (nested included): {sum(counts.values()):.0f}; most frequent:")
        for name, n in sorted(counts.items(), key=lambda kv: -kv[1])[:12]:
            print(f"  {name:32s} {n:5.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
