"""The small ViT on Fashion-MNIST: L0 gates on attention heads and MLP neurons at deployable
budgets, and the penalised twin.

Runs (``--epochs`` each, from scratch; the configs ``fashion_vit_l0_*`` without their
per-kind head budget, so that the budget is the parameters alone):

* dense (``sparsity.method=none``);
* constrained ``l0_units`` at each ``--budgets`` (shares of the compact transformer's
  parameters; the first budget's run is that of ``csparse compare``);
* the penalised twin at the λ that ``csparse compare --bisect`` finds for the first budget
  (``--max-runs`` runs at most; the λ and the runs it took);
* with ``--equality``, the constrained run at each budget again with ``sparsity.equality=true``.

Per run: test error; the exact measure times the dense count against the compact model's
parameters and FLOPs, and the unit method's own counts of both at the end state (goal: all
equal); the first epoch within the budget; feasible at the end (and the units the finishing
phase closed to get there);
the heads and MLP neurons each block keeps (a picture, ``OUT/vit_fashion_units.png``). Seconds
per epoch of the gated run against dense, timed interleaved on the same batches (goal ≤ 1.2×);
latency (batch 256, eval, median) of the compact model against the dense one, next to their
FLOP ratio.

    python benchmarks/bench_vit_fashion.py --jobs 2 --threads 1 --epochs 20 --reuse
    python benchmarks/bench_vit_fashion.py --data digits --epochs 2 --max-runs 2   # checks the script

``--jobs 2`` trains the λ search beside the dense and the other budgets' runs. Writes
``OUT/vit_fashion.{json,md}`` and the picture; every finished run is kept whole in
``OUT/kept`` (``--reuse`` copies back a kept run of the same config instead of training it, and
continues a run that stopped from its last checkpoint).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import _report

import constrained_sparsity as cs
from constrained_sparsity.compact import count_flops
from constrained_sparsity.jobs import Runner

ROOT = Path(__file__).resolve().parents[1]
CONSTRAINED = ROOT / "configs" / "fashion_vit_l0_constrained.yaml"


def _config(overrides: list[str], dense: bool = False) -> cs.Config:
    return _report.config_of(CONSTRAINED, ["sparsity.heads=null", *overrides] if not dense else overrides, dense)


def _say(msg: str) -> None:
    print(f"[vit] {msg}", file=sys.stderr, flush=True)


def kept_units(run_dir: str | Path) -> dict[str, dict[str, int]]:
    """Per unit group of the run (``blocks.<i>.attn``: heads, ``blocks.<i>.mlp``: neurons): its
    units and how many the trained network keeps open, from ``summary.json``."""
    summary = json.loads((Path(run_dir) / "summary.json").read_text())
    return {r["name"]: {"units": r["gates"], "open": r["active_gates"]} for r in summary.get("layers", [])}


def _plot(kept: dict[str, dict[str, dict[str, int]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for ax, (suffix, what) in zip(axes, ((".attn", "heads"), (".mlp", "MLP neurons"))):
        runs = list(kept)
        for i, run in enumerate(runs):
            groups = [g for g in kept[run] if g.endswith(suffix)]
            shares = [kept[run][g]["open"] for g in groups]
            ax.bar([j + (i - (len(runs) - 1) / 2) * 0.8 / len(runs) for j in range(len(groups))], shares,
                   width=0.8 / len(runs), label=run)  # fmt: skip
            ax.set_xticks(range(len(groups)), [g.split(".")[1] for g in groups])
            total = kept[run][groups[0]]["units"] if groups else 0
        ax.set_title(f"{what} kept per block (of {total})", fontsize=9)
        ax.set_xlabel("block")
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = _report.budget_args(__doc__, ROOT / "benchmarks" / "out" / "vit", 4, argv)
    threads = args.threads
    out = Path(args.out)
    common = [
        *_report.run_overrides(args.epochs, threads, root=args.root),
        f"data.name={args.data}",
        "tracking.group=vit-bench",  # one group across invocations: --reuse compares configs
    ]
    report = {**_report.header(threads), "epochs": args.epochs, "jobs": args.jobs, "data": args.data, "rows": []}
    first = args.budgets[0]
    store = _report.KeptRuns(out, out / "kept", args.reuse, "vit")
    with Runner(args.jobs, threads, store=store, say=_say) as runner:
        made = _report.budget_runs(
            runner,
            lambda o, dense=False: _config([*common, *o], dense),
            args.budgets,
            args.max_runs,
            out,
            "vit",
            args.equality,
        )
    dense, constrained, search, rows = made["dense"], made["constrained"], made["search"], made["rows"]
    kept = {f"constrained ε = {b:g}": kept_units(result.run_dir) for b, result in constrained.items()}
    kept[f"penalised λ = {search['lambda']:.3g}"] = kept_units(made["penalised"].run_dir)
    timing = _report.interleaved_timing(
        {"dense": {"run_dir": dense.run_dir}, "gated": {"run_dir": constrained[first].run_dir}}, args.rounds, args.steps
    )
    _, _, shape, dense_net, _ = _report.dense_and_compact(dense.run_dir)
    _, _, _, _, small = _report.dense_and_compact(constrained[first].run_dir)
    latency = {"dense": _report.latency_ms(dense_net, shape), "compact": _report.latency_ms(small, shape)}
    flop_ratio = count_flops(small, shape) / count_flops(dense_net, shape)
    report.update(rows=rows, kept=kept, timing_s_per_epoch=timing, latency_ms=latency, flop_ratio=flop_ratio)
    out.mkdir(parents=True, exist_ok=True)
    _plot(kept, out / "vit_fashion_units.png")
    gated = timing["gated/end"] / timing["dense/end"]
    lines = [
        f"ViT (4 blocks of 4 heads and 128 MLP neurons, width 64), {args.data}, {args.epochs} epochs per run:",
        "",
        *_report.markdown_header(report),
        *_report.budget_table(rows),
        "",
        f"The penalised twin's λ search took {search['runs_used']} runs ({search['wall_time_s']:.0f} s in all).",
        "",
        "| run | heads kept per block | MLP neurons kept per block |",
        "|---|---|---|",
    ]
    for run, groups in kept.items():
        heads = [f"{g['open']}" for n, g in groups.items() if n.endswith(".attn")]
        neurons = [f"{g['open']}" for n, g in groups.items() if n.endswith(".mlp")]
        lines.append(f"| {run} | {' / '.join(heads)} | {' / '.join(neurons)} |")
    lines += [
        "",
        f"Seconds per epoch (interleaved, end states): dense {timing['dense/end']:.2f}, gated "
        f"{timing['gated/end']:.2f} (**{gated:.2f}×**; goal ≤ 1.2×).",
        f"Latency, batch 256: dense {latency['dense']:.1f} ms, compact (ε = {first:g}) {latency['compact']:.1f} ms "
        f"(ratio {latency['compact'] / latency['dense']:.2f}; FLOP ratio {flop_ratio:.2f}).",
    ]
    _report.write(out, "vit_fashion", report, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
