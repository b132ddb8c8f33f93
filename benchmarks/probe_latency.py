"""Probes behind the analysis of the compaction benchmark (docs/benchmarks.md, issue 5).

    python benchmarks/probe_latency.py layers RUN_DIR [--threads 2]   # per-layer ms, dense vs compact
    python benchmarks/probe_latency.py pool [--threads 2]             # max-pooling implementations
    python benchmarks/probe_latency.py lenet-widths [--widths C1-C2-F1 ...] # synthetic LeNet-5 widths
    python benchmarks/probe_latency.py runtimes RUN_DIR [--compile]   # eager, in-place ReLU, TorchScript
    python benchmarks/probe_latency.py conv1 [--threads 2]            # implementations of LeNet's conv1
    python benchmarks/probe_latency.py ops RUN_DIR [--threads 2] [--fold-batchnorm]  # operators, dense vs compact
    python benchmarks/probe_latency.py conv-widths [--threads 2]      # conv time against channel counts
    python benchmarks/probe_latency.py latency DENSE_RUN RUN_DIR      # dense vs compact: kept, folded, channels-last
    python benchmarks/probe_latency.py rounding DENSE_RUN             # channel counts rounded to blocks, or not

All at batch 256, eval mode, no autograd; medians. ``layers`` times each child of the dense
network (gates folded in, ``fast_pooling``) and of the compact one, as ``bench_compact``
builds them. ``lenet-widths`` times LeNet-5 shapes with random weights (``MaxPool2x2``, ReLU
after the pool), dense and pruned alternately, and prints latency ratio / FLOP ratio.
``runtimes`` times the dense and compact networks of a run pass by pass, alternately, under
several ways of running them: eager (as ``bench_compact``), eager with in-place ReLUs,
TorchScript (traced, ``torch.jit.freeze``, ``torch.jit.optimize_for_inference``) and, with
``--compile``, ``torch.compile`` (inductor; needs a C++ compiler), plain and with
inductor's ``freezing`` (weights as constants, prepacked oneDNN kernels), and of the
inference networks (BatchNorm folded): plain, channels-last and ``mode="max-autotune"``. ``conv1`` times
ways of computing a 1-input-channel 5x5 convolution (LeNet's conv1) and checks they agree.
``ops`` profiles both networks (``torch.profiler``, self time of each PyTorch operator per
pass) and splits the time into the operators that do the FLOPs (matrix products,
convolutions) and all others (input selection, the bias copy of ``addmm``, ReLU, pooling:
memory passes whose size follows the layer widths, not the FLOPs). From that split it
prints a bound: the ratio compact / dense if the compact network's FLOP operators ran
exactly at the dense network's FLOP rate and its other operators took what they took.
With ``--fold-batchnorm`` both networks are first made inference networks (each BatchNorm
folded into the conv before it, ``compact(fold_batchnorm=True)``'s rule). ``conv-widths`` times
LeNet's conv2 (12 x 12 input, 5 x 5 kernel, batch 256) for a range of input and output channel
counts, next to their FLOPs relative to 20 -> 50 channels.
"""

from __future__ import annotations

import argparse
import copy
import re
import statistics
import sys
import time
from collections.abc import Callable

import _report
import torch
import torch.nn.functional as F
from torch import nn

from constrained_sparsity.compact import MaxPool2x2, count_flops
from constrained_sparsity.graph import layer_output_shapes


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
    _, _, shape, dense, small = _report.dense_and_compact(run_dir)
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


def lenet_widths(repeats: int, rounds: int = 5, chosen: list[str] | None = None) -> None:
    if chosen:
        widths = {"dense": (20, 50, 500), **{w: tuple(int(n) for n in w.split("-")) for w in chosen}}
    else:
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


def _in_place_relus(net: nn.Sequential) -> nn.Sequential:
    """A copy whose ReLUs run in place where their input is a fresh tensor (after a layer or a pool)."""
    net = copy.deepcopy(net)
    previous = None
    for child in net.children():
        if isinstance(child, nn.ReLU) and isinstance(previous, (nn.Linear, nn.Conv2d, nn.MaxPool2d)):
            child.inplace = True
        previous = child
    return net


def _torchscript(net: nn.Module, shape: tuple[int, ...]) -> nn.Module:
    with torch.no_grad():
        traced = torch.jit.trace(net, torch.rand(4, *shape))
    return torch.jit.optimize_for_inference(torch.jit.freeze(traced.eval()))


def runtimes(run_dir: str, passes: int, use_compile: bool) -> None:
    _, _, shape, dense, small = _report.dense_and_compact(run_dir)
    flop_ratio = count_flops(small, shape) / count_flops(dense, shape)
    pairs = {
        "eager": (dense, small),
        "eager, in-place ReLU": (_in_place_relus(dense), _in_place_relus(small)),
        "TorchScript, frozen, optimize_for_inference": (_torchscript(dense, shape), _torchscript(small, shape)),
    }
    if use_compile:
        import torch._dynamo.config as dynamo_config
        import torch._inductor.config as inductor_config

        # twelve compiled networks share ResNet.forward's code: past dynamo's limit of
        # recompilations per code object (8) the later ones would silently run eager
        dynamo_config.recompile_limit = 64
        pairs["torch.compile"] = (torch.compile(dense), torch.compile(small))
        with torch.inference_mode():  # compiled at the first call, under the setting
            with inductor_config.patch(freezing=True):
                frozen = (torch.compile(copy.deepcopy(dense)), torch.compile(copy.deepcopy(small)))
                for net in frozen:
                    net(torch.rand(256, *shape))
        pairs["torch.compile, freezing"] = frozen
        folded = [_report.inference_network(net) for net in (dense, small)]
        pairs["torch.compile, BatchNorm folded"] = tuple(torch.compile(net) for net in folded)
        pairs["torch.compile, folded, channels-last"] = tuple(
            torch.compile(_report.inference_network(net, channels_last=True)) for net in (dense, small)
        )
        pairs["torch.compile, folded, max-autotune"] = tuple(
            torch.compile(copy.deepcopy(net), mode="max-autotune") for net in folded
        )
    x = torch.rand(256, *shape)
    times: dict[tuple[str, int], list[float]] = {}
    with torch.inference_mode():
        for nets in pairs.values():
            for net in nets:
                for _ in range(3):
                    net(x)
        for _ in range(passes):  # every network once per pass: drift hits all alike
            for label, nets in pairs.items():
                for k, net in enumerate(nets):
                    t0 = time.perf_counter()
                    net(x)
                    times.setdefault((label, k), []).append(time.perf_counter() - t0)
    print(f"{run_dir}: batch 256, {torch.get_num_threads()} threads, FLOP ratio {flop_ratio:.3f}, median of {passes}")
    for label in pairs:
        d, s = (1e3 * statistics.median(times[(label, k)]) for k in (0, 1))
        ratios = f"ratio {s / d:.3f}  / FLOP ratio {s / d / flop_ratio:.2f}"
        print(f"  {label:44s} dense {d:8.3f} ms  compact {s:8.3f} ms  {ratios}")


def _conv1_ways(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> dict[str, Callable[[], torch.Tensor]]:
    n, c = x.shape[0], w.shape[0]
    cl = torch.channels_last
    w_groups, b_groups = w.repeat(n, 1, 1, 1), b.repeat(n)
    return {
        "conv2d, NCHW": lambda: F.conv2d(x, w, b),
        "conv2d, channels_last": lambda: F.conv2d(x.contiguous(memory_format=cl), w.contiguous(memory_format=cl), b),
        "batch as groups (depthwise)": lambda: F.conv2d(x.view(1, n, 28, 28), w_groups, b_groups, groups=n).view(
            n, c, 24, 24
        ),
        "unfold + matmul": lambda: (w.view(c, 25) @ F.unfold(x, 5)).add_(b.view(1, -1, 1)).view(n, c, 24, 24),
    }


def conv1(repeats: int) -> None:
    x = torch.rand(256, 1, 28, 28)
    for channels in (20, 10):
        w, b = torch.randn(channels, 1, 5, 5), torch.randn(channels)
        with torch.inference_mode():
            reference = F.conv2d(x, w, b)
            print(f"{channels} channels, 256 x 1 x 28 x 28 -> 256 x {channels} x 24 x 24:")
            for label, fn in _conv1_ways(x, w, b).items():
                error = float((fn() - reference).abs().max())
                print(f"  {label:30s} {_median_ms(fn, repeats):7.3f} ms  (max difference {error:.1e})")


def conv_widths(repeats: int) -> None:
    x20 = torch.rand(256, 20, 12, 12)
    ref = None
    print("conv 5x5 on 256 x C_in x 12 x 12 (LeNet's conv2), ms; FLOPs relative to 20 -> 50")
    for c_in, c_out in ((20, 50), (20, 48), (20, 33), (20, 32), (20, 17), (20, 16), (20, 8), (16, 16), (8, 8), (7, 8)):
        conv = nn.Conv2d(c_in, c_out, 5).eval()
        x = x20[:, :c_in].contiguous()
        ms = statistics.median(_median_ms(lambda conv=conv, x=x: conv(x), repeats) for _ in range(3))
        ref = ref or ms
        flop_ratio = c_in * c_out / (20 * 50)
        print(f"  {c_in:2d} -> {c_out:2d}: {ms:7.3f} ms  time ratio {ms / ref:.3f}  FLOP ratio {flop_ratio:.3f}")


# Operators that do a network's multiply-adds; what every other operator does is a memory pass.
_FLOP_OPS = {
    "aten::addmm",
    "aten::mm",
    "aten::bmm",
    "aten::mkldnn_convolution",
    "aten::_slow_conv2d_forward",
    "aten::convolution_overrideable",
}


def _op_times(net: nn.Module, x: torch.Tensor, passes: int) -> dict[str, float]:
    """Self CPU ms per pass of each PyTorch operator in ``net(x)``."""
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode():
        for _ in range(5):
            net(x)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(passes):
                net(x)
    return {e.key: e.self_cpu_time_total / 1e3 / passes for e in prof.key_averages() if e.self_cpu_time_total > 0}


def _block_conv_flops(net: nn.Module, shape: tuple[int, ...], block: int = 16) -> int:
    """Convolution FLOPs per example with output channel counts rounded up to multiples of ``block``.

    oneDNN's CPU convolutions compute output channels in blocks of 16 (one AVX-512
    register of floats), so their time follows this rather than :func:`count_flops`
    (see ``conv-widths``: 17 output channels take as long as 32).
    """
    up = lambda c: -(-c // block) * block  # noqa: E731
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    total = 0
    for m, out in layer_output_shapes(net, convs, torch.zeros(1, *shape)):
        total += 2 * out[2] * out[3] * m.in_channels * up(m.out_channels) * m.kernel_size[0] * m.kernel_size[1]
    return total


def ops(run_dir: str, passes: int, fold_batchnorm: bool = False) -> None:
    _, _, shape, dense, small = _report.dense_and_compact(run_dir)
    if fold_batchnorm:
        from constrained_sparsity.compact import fold_batchnorm_

        for net in (dense, small):
            fold_batchnorm_(net)
    flop_ratio = count_flops(small, shape) / count_flops(dense, shape)
    x = torch.rand(256, *shape)
    times = {"dense": _op_times(dense, x, passes), "compact": _op_times(small, x, passes)}
    names = sorted(set(times["dense"]) | set(times["compact"]), key=lambda k: -times["dense"].get(k, 0.0))
    folded = ", BatchNorm folded" if fold_batchnorm else ""
    print(f"{run_dir}: batch 256, {torch.get_num_threads()} threads{folded}, FLOP ratio {flop_ratio:.3f}")
    print(f"  {'operator (self time, ms per pass)':36s} {'dense':>8s} {'compact':>8s}")
    for name in names:
        d, c = times["dense"].get(name, 0.0), times["compact"].get(name, 0.0)
        if max(d, c) >= 0.001:
            print(f"  {name + (' *' if name in _FLOP_OPS else ''):36s} {d:8.3f} {c:8.3f}")
    split = {
        k: (sum(v for n, v in t.items() if n in _FLOP_OPS), sum(v for n, v in t.items() if n not in _FLOP_OPS))
        for k, t in times.items()
    }
    (gd, od), (gc, oc) = split["dense"], split["compact"]
    ratio = (gc + oc) / (gd + od)
    bound = (flop_ratio * gd + oc) / (gd + od)
    print(f"  * FLOP operators: dense {gd:.3f}, compact {gc:.3f} ms (ratio {gc / gd:.3f})")
    print(f"  other operators: dense {od:.3f}, compact {oc:.3f} ms (ratio {oc / od:.3f})")
    print(f"  profiled latency ratio {ratio:.3f} = {ratio / flop_ratio:.2f} x the FLOP ratio")
    print(
        f"  bound, FLOP operators at the dense FLOP rate: {bound:.3f} = {bound / flop_ratio:.2f} x the FLOP ratio "
        f"(goal: 1.5)"
    )
    if any(isinstance(m, nn.Conv2d) for m in small.modules()):
        convs = [sum(t.get(n, 0.0) for n in _FLOP_OPS if "conv" in n) for t in (times["dense"], times["compact"])]
        plain = _block_conv_flops(small, shape, 1) / _block_conv_flops(dense, shape, 1)
        blocks = _block_conv_flops(small, shape) / _block_conv_flops(dense, shape)
        print(
            f"  convolutions: time ratio {convs[1] / convs[0]:.3f}, FLOP ratio {plain:.3f}, "
            f"FLOP ratio with output channels rounded up to 16s {blocks:.3f}"
        )


def latency(dense_run: str, run_dir: str, repeats: int, rounds: int = 5) -> None:
    """The dense network of a dense run against the compact network of a sparse run, as
    trained, as inference networks (BatchNorm folded into the convs), and as inference networks
    in the channels-last layout (``net.to(memory_format=torch.channels_last)``: the conv weights
    stored NHWC, the layout oneDNN computes in; the input stays as it is), next to their FLOP
    ratio: medians over ``rounds`` rounds that time the six networks in turn."""
    _, _, shape, dense, _ = _report.dense_and_compact(dense_run)
    _, _, _, _, small = _report.dense_and_compact(run_dir)
    nets = {"dense": dense, "compact": small}
    for name, net in list(nets.items()):
        nets[f"{name}, BatchNorm folded"] = _report.inference_network(net)
        nets[f"{name}, folded, channels-last"] = _report.inference_network(net, channels_last=True)
    ms = _report.interleaved_latency_ms(nets, shape, repeats, rounds)
    flop_ratio = count_flops(small, shape) / count_flops(dense, shape)
    print(f"batch 256, {torch.get_num_threads()} threads, FLOP ratio compact / dense {flop_ratio:.3f}")
    for name, value in ms.items():
        print(f"  {name:34s} {value:8.1f} ms")
    for suffix in ("", ", BatchNorm folded", ", folded, channels-last"):
        ratio = ms[f"compact{suffix}"] / ms[f"dense{suffix}"]
        how = suffix or " (BatchNorm kept)"
        print(f"  latency ratio{how}: {ratio:.3f} = {ratio / flop_ratio:.2f} x the FLOP ratio")


def rounding(dense_run: str, repeats: int, rounds: int = 5) -> None:
    """A dense run's network pruned by Torch-Pruning (group magnitude, every group alike: half
    its channels) with the kept channel counts as they fall, and rounded to multiples of 8 and of
    16 (``round_to``): each network's latency and FLOP ratio against dense (BatchNorm folded)."""
    import torch_pruning as tp

    from constrained_sparsity.compact import count_params, fold_batchnorm_

    _, _, shape, dense, _ = _report.dense_and_compact(dense_run)
    example = torch.zeros(1, *shape)
    nets = {"dense": dense}
    for block in (None, 8, 16):
        net = copy.deepcopy(dense)
        tp.pruner.MagnitudePruner(
            net, example, importance=tp.importance.GroupMagnitudeImportance(p=2), pruning_ratio=0.5,
            ignored_layers=[m for m in net.modules() if isinstance(m, nn.Linear)], round_to=block,
        ).step()  # fmt: skip
        nets[f"half the channels, round_to={block}"] = net
    for net in nets.values():
        fold_batchnorm_(net.eval())
    ms = _report.interleaved_latency_ms(nets, shape, repeats, rounds)
    flops = {k: count_flops(net, shape) for k, net in nets.items()}
    print(f"batch 256, {torch.get_num_threads()} threads, BatchNorm folded")
    for name, net in nets.items():
        flop_ratio, ratio = flops[name] / flops["dense"], ms[name] / ms["dense"]
        widths = sorted({m.out_channels for m in net.modules() if isinstance(m, nn.Conv2d)})
        print(
            f"  {name:34s} {ms[name]:7.1f} ms  params {count_params(net):7d}  FLOP ratio {flop_ratio:.3f}  "
            f"latency ratio {ratio:.3f} = {ratio / flop_ratio:.2f} x  conv widths {widths}"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "probe",
        choices=["layers", "pool", "lenet-widths", "runtimes", "conv1", "ops", "conv-widths", "latency", "rounding"],
    )
    parser.add_argument("run_dir", nargs="?")
    parser.add_argument("sparse_run", nargs="?", help="latency: the sparse run (run_dir is the dense one)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=25, help="passes per median (runtimes: passes in all)")
    parser.add_argument("--compile", action="store_true", help="runtimes: also torch.compile")
    parser.add_argument("--fold-batchnorm", action="store_true", help="ops: fold each BatchNorm into its conv first")
    parser.add_argument(
        "--widths", nargs="+", metavar="C1-C2-F1", help="lenet-widths: these widths instead of the default set"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.probe in ("layers", "runtimes", "ops") and not args.run_dir:
        parser.error(f"{args.probe} needs RUN_DIR")
    if args.probe == "rounding":
        if not args.run_dir:
            parser.error("rounding needs DENSE_RUN")
        rounding(args.run_dir, args.repeats)
    elif args.probe == "latency":
        if not (args.run_dir and args.sparse_run):
            parser.error("latency needs DENSE_RUN and RUN_DIR")
        latency(args.run_dir, args.sparse_run, args.repeats)
    elif args.probe == "layers":
        layers(args.run_dir, args.repeats)
    elif args.probe == "runtimes":
        runtimes(args.run_dir, args.repeats, args.compile)
    elif args.probe == "conv-widths":
        conv_widths(args.repeats)
    elif args.probe == "ops":
        ops(args.run_dir, args.repeats, args.fold_batchnorm)
    elif args.probe == "conv1":
        conv1(args.repeats)
    elif args.probe == "pool":
        pool(args.repeats)
    else:
        if args.widths and not all(re.fullmatch(r"\d+-\d+-\d+", w) for w in args.widths):
            parser.error("--widths takes C1-C2-F1 triples of integers, e.g. 16-16-400")
        lenet_widths(args.repeats, chosen=args.widths)
    return 0


if __name__ == "__main__":
    sys.exit(main())
