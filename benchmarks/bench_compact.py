"""Benchmark: inference latency of dense vs compact networks, next to their FLOP ratio.

For each run directory given (an L0 run of the MLP or of LeNet-5), compacts the trained
network and times the forward pass of the dense network (gates folded in: the architecture
as trained) and of the compact one, at batch 1 and batch 256, on one and two threads
(median of --repeats passes, eval mode, no autograd). Dense and compact are timed
alternately, in rounds, so the machine's drift hits both alike; the latency ratio is that
of the medians over rounds. Goal: at batch 256 the latency ratio compact / dense is within
1.5x of the FLOP ratio. The last column divides the fastest compact round by the fastest
dense round instead (the pair at the machine's quietest moment; noise only adds time);
every round's time is in the JSON.

Both networks pool with the same layer: ``MaxPool2x2`` (what ``compact`` writes, see
``constrained_sparsity.compact.fast_pooling``). Networks with pooling are also timed with
PyTorch's ``nn.MaxPool2d`` in both, for comparison.

    python benchmarks/bench_compact.py RUN_DIR [RUN_DIR ...] --repeats 50 --rounds 5

Writes benchmarks/out/compact.json and .md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import _report
import torch

from constrained_sparsity.compact import (
    MaxPool2x2,
    active_inputs,
    count_flops,
    count_params,
    describe,
)
from constrained_sparsity.evaluation import measure_latency

ROOT = Path(__file__).resolve().parents[1]


def _torch_pooling(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model`` with every MaxPool2x2 back to PyTorch's nn.MaxPool2d(2)."""
    import copy

    model = copy.deepcopy(model)
    for name, child in list(model.named_children()):
        if isinstance(child, MaxPool2x2):
            setattr(model, name, torch.nn.MaxPool2d(2))
    return model


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dirs", nargs="+")
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "out"))
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for run_dir in args.run_dirs:
        cfg, dataset, shape, dense, small = _report.dense_and_compact(run_dir)
        x = dataset.test_x[:1000]
        with torch.no_grad():
            diff = float((dense(x) - small(x)).abs().max())
        flops_dense, flops_small = count_flops(dense, shape), count_flops(small, shape)
        entry = {
            "run_dir": str(run_dir),
            "model": cfg.model.name,
            "dense": describe(dense, shape),
            "compact": describe(small, shape),
            "active_inputs": active_inputs(dense, shape),
            "params": [count_params(dense), count_params(small)],
            "flops": [flops_dense, flops_small],
            "flop_ratio": flops_small / flops_dense,
            "max_abs_diff": diff,
            "latency_ms": {},
        }
        pairs = {"": (dense, small)}
        if any(isinstance(m, MaxPool2x2) for m in small.modules()):
            pairs[" (nn.MaxPool2d)"] = (_torch_pooling(dense), _torch_pooling(small))
        for label, (dn, sm) in pairs.items():
            for batch in (1, 256):
                for threads in (1, 2):
                    times: dict[str, list[float]] = {"dense": [], "compact": []}
                    for _ in range(args.rounds):
                        times["dense"].append(measure_latency(dn, shape, batch, threads, args.repeats))
                        times["compact"].append(measure_latency(sm, shape, batch, threads, args.repeats))
                    d, c = statistics.median(times["dense"]), statistics.median(times["compact"])
                    entry["latency_ms"][f"b{batch}/t{threads}{label}"] = {
                        "dense": 1e3 * d,
                        "compact": 1e3 * c,
                        "ratio": c / d,
                        # the same pair at the machine's quietest moment: noise only adds time
                        "ratio_of_minima": min(times["compact"]) / min(times["dense"]),
                        "rounds": {k: [1e3 * t for t in v] for k, v in times.items()},
                    }
        results.append(entry)
        print(json.dumps(entry), flush=True)
    report = {**_report.header(), "results": results}
    lines = [
        *_report.markdown_header(report),
        "| model | dense → compact | active inputs (paper's convention) | params | FLOPs ratio | "
        "batch / threads | dense ms | compact ms | latency ratio | latency ratio / FLOP ratio | "
        "same, fastest rounds |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for e in results:
        arch = f"{e['dense']} → {e['compact']}".replace("|", "/")  # a table cell
        for key, lat in e["latency_ms"].items():
            lines.append(
                f"| {e['model']} | {arch} | {'-'.join(map(str, e['active_inputs']))} | "
                f"{e['params'][0]} → {e['params'][1]} | {e['flop_ratio']:.3f} | {key} | {lat['dense']:.3f} | "
                f"{lat['compact']:.3f} | {lat['ratio']:.3f} | {lat['ratio'] / e['flop_ratio']:.2f} | "
                f"{lat['ratio_of_minima'] / e['flop_ratio']:.2f} |"
            )
    _report.write(out, "compact", report, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
