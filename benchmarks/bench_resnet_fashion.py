"""ResNet-20 on Fashion-MNIST: constrained L0 unit gates at deployable budgets, the penalised twin,
and Torch-Pruning's magnitude pruning as the baseline a user would otherwise pick.

Runs (``--epochs`` each, from scratch; the configs ``fashion_resnet20_l0_units_*``):

* dense (``sparsity.method=none``);
* constrained ``l0_units`` at each ``--budgets`` (shares of the deployable parameters; the
  first budget's run is that of ``csparse compare``);
* the penalised twin at the λ that ``csparse compare --bisect`` finds for the first budget
  (``--max-runs`` runs at most; the λ and the runs it took);
* with ``--equality``, the constrained run at each budget again with ``sparsity.equality=true``
  (the game aims at the budget from both sides; docs/method.md);
* magnitude pruning: the trained dense network pruned with Torch-Pruning's group-norm
  importance (``MagnitudePruner``, global) to the parameter count of the constrained run at
  the first budget, then fine-tuned for ``--epochs`` epochs (Adam at the configs' lr), once
  at that constant lr and once with it annealed to 0 on a cosine (as the constrained runs'
  finishing phase anneals its fine-tuning).

Per run: test error; the exact measure times the dense count against the compact network's
parameters and FLOPs, and the unit method's own counts of both at the end state (goal: all
equal); the first epoch within the budget; feasible at the end (and the units the finishing
phase closed to get there).
Seconds per epoch of the gated run against dense, timed interleaved on the same batches
(``_report.interleaved_timing``, goal ≤ 1.15×); latency (batch 256, eval, median) of the compact
network against the dense one, next to their FLOP ratio (goal: latency ratio ≤ 1.2 × FLOP
ratio): as trained, with BatchNorm folded into the convs (the inference networks), folded and
channels-last, folded and compiled (``torch.compile``); the eight networks timed in turn in
each of ``--rounds`` rounds (``_report.interleaved_latency_ms``).

    python benchmarks/bench_resnet_fashion.py --jobs 2 --threads 1 --epochs 12 --max-runs 4 --reuse --equality
    python benchmarks/bench_resnet_fashion.py --data digits --epochs 2 --max-runs 2   # checks the script

``--jobs 2`` trains the λ search beside the dense and the other budgets' runs. Writes
``OUT/resnet_fashion.{json,md}``. Every finished run is kept whole in ``OUT/kept``: ``--reuse``
copies back a kept run of the same config instead of training it, and continues a run that
stopped (the script killed) from its last checkpoint; the baselines' fine-tunings are kept in
``OUT/magnitude`` and ``OUT/magnitude-cosine`` the same way. The script can so be stopped and
started again at any time.
"""

from __future__ import annotations

import copy
import json
import math
import sys
import time
from pathlib import Path

import _report
import torch

import constrained_sparsity as cs
from constrained_sparsity.compact import count_flops, count_params
from constrained_sparsity.jobs import Runner
from constrained_sparsity.problem import scheduled_lr

ROOT = Path(__file__).resolve().parents[1]
CONSTRAINED = ROOT / "configs" / "fashion_resnet20_l0_units_constrained.yaml"


def _config(overrides: list[str], dense: bool = False) -> cs.Config:
    return _report.config_of(CONSTRAINED, overrides, dense)


def _say(msg: str) -> None:
    print(f"[resnet] {msg}", file=sys.stderr, flush=True)


def _magnitude_baseline(
    dense_dir: Path, params: int, cfg: cs.Config, epochs: int, out: Path, reuse: bool, schedule: str = "constant"
) -> dict:
    """The dense network pruned by group magnitude to at most ``params`` parameters, fine-tuned
    with Adam at ``cfg``'s lr, constant or (``schedule="cosine"``) annealed to 0 over its steps.

    Kept in ``out``: ``result.json`` once done, ``checkpoint.pt`` after every epoch (the pruned
    network is rebuilt from the dense run, then its weights and Adam's state are loaded), both
    under the key of what they were trained from; with ``reuse`` the same key is not trained again."""
    import torch_pruning as tp

    from constrained_sparsity.runs import load_trained

    dense_config = (Path(dense_dir) / "config.yaml").read_text()
    key = {"dense": dense_config, "params": params, "epochs": epochs, "lr": cfg.optim.primal.lr}
    if schedule != "constant":
        key["schedule"] = schedule
    done, ckpt_path = out / "result.json", out / "checkpoint.pt"
    if reuse and done.is_file() and (saved := json.loads(done.read_text())).get("key") == key:
        _say("magnitude baseline: kept")
        return saved["row"]
    _, model, dataset = load_trained(dense_dir)
    shape = tuple(dataset.input_shape)
    example = torch.zeros(1, *shape)

    def pruned(ratio: float) -> torch.nn.Module:
        m = copy.deepcopy(model).train()
        pruner = tp.pruner.MagnitudePruner(
            m, example, importance=tp.importance.GroupMagnitudeImportance(p=2), pruning_ratio=ratio,
            global_pruning=True, ignored_layers=[m.fc],
        )  # fmt: skip
        pruner.step()
        return m

    lo, hi = 0.0, 0.95
    for _ in range(20):  # the smallest ratio whose network fits the count
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if count_params(pruned(mid)) <= params else (mid, hi)
    model = pruned(hi)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.optim.primal.lr)
    start, seconds = 0, 0.0
    if reuse and ckpt_path.is_file() and (ckpt := torch.load(ckpt_path, weights_only=True))["key"] == key:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        start, seconds = ckpt["epoch"], ckpt["seconds"]
        _say(f"magnitude baseline: continuing after epoch {start}")
    out.mkdir(parents=True, exist_ok=True)
    per_epoch = math.ceil(len(dataset.train_y) / cfg.data.batch_size)
    for epoch in range(start, epochs):
        t0 = time.perf_counter()
        model.train()
        gen = torch.Generator().manual_seed(epoch)
        for i, (x, y) in enumerate(cs.data.batches(dataset.train_x, dataset.train_y, cfg.data.batch_size, gen)):
            lr = scheduled_lr(cfg.optim.primal.lr, epoch * per_epoch + i, epochs * per_epoch, schedule)
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
        seconds += time.perf_counter() - t0
        state = {"key": key, "epoch": epoch + 1, "seconds": seconds}
        torch.save({**state, "model": model.state_dict(), "optimizer": optimizer.state_dict()}, ckpt_path)
        _say(f"magnitude baseline ({schedule} lr): epoch {epoch + 1}/{epochs} ({seconds:.0f} s)")
    model.eval()
    row = {
        "run": "magnitude (Torch-Pruning, group norm) + fine-tuning"
        + ("" if schedule == "constant" else f", {schedule} lr"),
        "pruning_ratio": hi,
        "test_error": cs.error_rate(model, dataset.test_x, dataset.test_y),
        "params": count_params(model),
        "flops": count_flops(model, shape),
        "seconds": seconds,
        "latency_ms": _report.latency_ms(model, shape),
    }
    done.write_text(json.dumps({"key": key, "row": row}, indent=2))
    return row


def main(argv: list[str] | None = None) -> int:
    args = _report.budget_args(__doc__, ROOT / "benchmarks" / "out" / "resnet", 5, argv)
    threads = args.threads
    out = Path(args.out)
    common = [*_report.run_overrides(args.epochs, threads, root=args.root), f"data.name={args.data}"]
    report = {**_report.header(threads), "epochs": args.epochs, "jobs": args.jobs, "data": args.data, "rows": []}
    first = args.budgets[0]
    store = _report.KeptRuns(out, out / "kept", args.reuse, "resnet")
    with Runner(args.jobs, threads, store=store, say=_say) as runner:
        made = _report.budget_runs(
            runner,
            lambda o, dense=False: _config([*common, *o], dense),
            args.budgets,
            args.max_runs,
            out,
            "resnet",
            args.equality,
        )
    dense, constrained, search, rows = made["dense"], made["constrained"], made["search"], made["rows"]
    target_params = rows[1]["params"]
    torch.set_num_threads(threads * args.jobs)  # the fine-tuning runs alone: every training's threads
    dense_cfg = _config(common, dense=True)
    for schedule, kept in (("constant", "magnitude"), ("cosine", "magnitude-cosine")):
        rows.append(
            _magnitude_baseline(dense.run_dir, target_params, dense_cfg, args.epochs, out / kept, args.reuse, schedule)
        )
    torch.set_num_threads(threads)  # the timings at the trainings' threads
    # speed: the gated run against dense, interleaved on the same batches
    timing = _report.interleaved_timing(
        {"dense": {"run_dir": dense.run_dir}, "gated": {"run_dir": constrained[first].run_dir}}, args.rounds, args.steps
    )
    _, _, shape, dense_net, _ = _report.dense_and_compact(dense.run_dir)
    _, _, _, _, small = _report.dense_and_compact(constrained[first].run_dir)
    nets = {}
    for name, net in (("dense", dense_net), ("compact", small)):
        folded = _report.inference_network(net)  # BatchNorm folded into the convs
        nets.update({name: net, f"{name}_folded": folded})
        nets[f"{name}_nhwc"] = _report.inference_network(net, channels_last=True)
        nets[f"{name}_compiled"] = torch.compile(folded)  # compiled at its first (warm-up) pass
    latency = _report.interleaved_latency_ms(nets, shape, 10, args.rounds)
    flop_ratio = count_flops(small, shape) / count_flops(dense_net, shape)
    report.update(rows=rows, timing_s_per_epoch=timing, latency_ms=latency, flop_ratio=flop_ratio)
    lines = [
        f"ResNet-20, {args.data}, {args.epochs} epochs per run:",
        "",
        *_report.markdown_header(report),
        *_report.budget_table(rows),
    ]
    gated = timing["gated/end"] / timing["dense/end"]
    lines += [
        "",
        f"The penalised twin's λ search took {search['runs_used']} runs ({search['wall_time_s']:.0f} s in all).",
        "",
        f"Seconds per epoch (interleaved, end states): dense {timing['dense/end']:.2f}, gated "
        f"{timing['gated/end']:.2f} (**{gated:.2f}×**; goal ≤ 1.15×).",
        "",
        f"Latency, batch 256, eval, compact (ε = {first:g}) against dense, medians of {args.rounds} interleaved "
        f"rounds; FLOP ratio {flop_ratio:.3f}, goal: latency ratio ≤ {1.2 * flop_ratio:.3f}:",
        "",
        "| network | dense | compact | ratio | ratio / FLOP ratio |",
        "|---|---|---|---|---|",
    ]
    for suffix, how in (
        ("", "as trained (BatchNorm kept)"),
        ("_folded", "BatchNorm folded (`csparse compact --fold-batchnorm`)"),
        ("_nhwc", "folded, channels-last (`.to(memory_format=torch.channels_last)`)"),
        ("_compiled", "folded, `torch.compile`"),
    ):
        d, c = latency[f"dense{suffix}"], latency[f"compact{suffix}"]
        lines.append(f"| {how} | {d:.1f} ms | {c:.1f} ms | {c / d:.3f} | {c / d / flop_ratio:.2f} |")
    out.mkdir(parents=True, exist_ok=True)
    _report.write(out, "resnet_fashion", report, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
