"""Probes behind the analysis of the compaction benchmark (docs/benchmarks.md, issue 5).

    python benchmarks/probe_latency.py layers RUN_DIR [--threads 2]   # per-layer ms, dense vs compact
    python benchmarks/probe_latency.py pool [--threads 2]             # max-pooling implementations
    python benchmarks/probe_latency.py lenet-widths [--threads 2]     # synthetic LeNet-5 widths

All at batch 256, eval mode, no autograd; medians. ``layers`` times each child of the dense
network (gates folded in, ``fast_pooling``) and of the compact one, as ``bench_compact``
builds them. ``lenet-widths`` times LeNet-5 shapes with random weights (``MaxPool2x2``, ReLU
after the pool), dense and pruned alternately, and prints latency ratio / FLOP ratio.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from constrained_sparsity.compact import (
    MaxPool2x2,
    compact,
    count_flops,
    fast_pooling,
    fold_l0,
    load_trained,
)


def _median_ms(fn: Callable[[], object], repeats: int, warmup: int = 3) -> float:
    with torch.inference_mode():
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def layers(run_dir: str, repeats: int) -> None:
    cfg, model, dataset = load_trained(run_dir)
    shape = tuple(dataset.input_shape)
    dense = fast_pooling(fold_l0(model)).float().eval()
    small = compact(model, shape, merge=cfg.sparsity.layers.enabled, select_inputs=True).module.float().eval()
    x = torch.rand(256, *shape)
    for name, net in (("dense", dense), ("compact", small)):
        times: dict[str, list[float]] = {}
        with torch.inference_mode():
            for _ in range(repeats):
                h = x
                for child, layer in net.named_children():
                    t0 = time.perf_counter()
                    h = layer(h)
                    times.setdefault(child, []).append(time.perf_counter() - t0)
        ms = {k: 1e3 * statistics.median(v) for k, v in times.items()}
        print(f"{name}: total {sum(ms.values()):.3f} ms  " + " ".join(f"{k}:{v:.3f}" for k, v in ms.items()))


def pool(repeats: int) -> None:
    x = torch.randn(256, 1, 28, 28)
    for channels in (20, 10):
        conv = nn.Conv2d(1, channels, 5).eval()
        with torch.inference_mode():
            h = conv(x)
        print(f"{channels} channels, 256 x {channels} x 24 x 24:")
        fast = MaxPool2x2()
        for label, fn, arg in (
            ("conv1", conv, x),
            ("nn.MaxPool2d(2)", nn.MaxPool2d(2), h),
            ("MaxPool2x2", fast, h),
            ("relu", F.relu, h),
        ):
            print(f"  {label:16s} {_median_ms(lambda fn=fn, arg=arg: fn(arg), repeats):7.3f} ms")


def _lenet(c1: int, c2: int, f1: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, c1, 5), MaxPool2x2(), nn.ReLU(), nn.Conv2d(c1, c2, 5), MaxPool2x2(), nn.ReLU(),
        nn.Flatten(), nn.Linear(c2 * 16, f1), nn.ReLU(), nn.Linear(f1, 10),
    ).eval()  # fmt: skip


def lenet_widths(repeats: int, rounds: int = 5) -> None:
    widths = {"dense": (20, 50, 500), "20-17-416": (20, 17, 416), "10-17-416": (10, 17, 416),
              "8-15-200": (8, 15, 200), "5-15-200": (5, 15, 200), "10-16-400": (10, 16, 400),
              "10-24-300": (10, 24, 300)}  # fmt: skip
    nets = {k: _lenet(*v) for k, v in widths.items()}
    x = torch.rand(256, 1, 28, 28)
    times: dict[str, list[float]] = {k: [] for k in nets}
    for _ in range(rounds):
        for k, net in nets.items():
            times[k].append(_median_ms(lambda net=net: net(x), repeats))
    dense_ms, dense_flops = statistics.median(times["dense"]), count_flops(nets["dense"], (1, 28, 28))
    for k, net in nets.items():
        ms = statistics.median(times[k])
        flop_ratio = count_flops(net, (1, 28, 28)) / dense_flops
        print(
            f"conv-conv-fc {k:10s} {ms:7.2f} ms  latency ratio {ms / dense_ms:.3f}  FLOP ratio {flop_ratio:.3f}  "
            f"latency / FLOP ratio {ms / dense_ms / flop_ratio:.2f}"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("probe", choices=["layers", "pool", "lenet-widths"])
    parser.add_argument("run_dir", nargs="?")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=25)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.probe == "layers":
        if not args.run_dir:
            parser.error("layers needs RUN_DIR")
        layers(args.run_dir, args.repeats)
    elif args.probe == "pool":
        pool(args.repeats)
    else:
        lenet_widths(args.repeats)
    return 0


if __name__ == "__main__":
    sys.exit(main())
