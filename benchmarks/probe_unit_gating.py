"""What a unit gate on a BatchNorm costs a training step, fused into gamma and beta or as a hook.

    python benchmarks/probe_unit_gating.py DENSE_RUN GATED_RUN [--threads 1] [--rounds 5] [--steps 10]

``GATED_RUN`` is an ``l0_units`` run (the ResNet-20 benchmark's, say) and ``DENSE_RUN`` the
dense run of the same model. Seconds per epoch, timed interleaved on the same batches at the
runs' start and end states (``_report.interleaved_timing``), of:

* ``dense``;
* ``gated``: the library's gating, ``batch_norm(x, gamma z, beta z)`` on each gated BatchNorm;
* ``gated, output hooks``: the same run with each BatchNorm's gate moved to a forward hook
  that multiplies its output by ``z`` (the gating before the fused form; the same outputs).
"""

from __future__ import annotations

import argparse
import sys

import _report
import torch

from constrained_sparsity.methods.l0_units import _GATE_ATTR, _ScaleOutput, _unfuse


def _to_output_hooks(model: torch.nn.Module) -> None:
    moved = 0
    for module in model.modules():
        if _GATE_ATTR in module.__dict__:
            gate = module.__dict__[_GATE_ATTR]
            _unfuse(module)
            module.register_forward_hook(_ScaleOutput(gate))
            moved += 1
    if not moved:
        raise SystemExit("the gated run has no gated BatchNorm (is it an l0_units run of a model with BatchNorm?)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dense_run")
    parser.add_argument("gated_run")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    runs = {
        "dense": {"run_dir": args.dense_run},
        "gated": {"run_dir": args.gated_run},
        "gated, output hooks": {"run_dir": args.gated_run, "adjust": _to_output_hooks},
    }
    timing = _report.interleaved_timing(runs, args.rounds, args.steps)
    print(f"seconds per epoch, {args.threads} threads, medians of {args.rounds} rounds of {args.steps} steps")
    for phase in ("start", "end"):
        dense = timing[f"dense/{phase}"]
        cells = [f"{name} {timing[f'{name}/{phase}']:.1f} ({timing[f'{name}/{phase}'] / dense:.3f}x)" for name in runs]
        print(f"  {phase}: " + ", ".join(cells))
    return 0


if __name__ == "__main__":
    sys.exit(main())
