"""CGES on Fashion-MNIST against constrained L0 and the dense network, at a parameter budget.

Per model (MLP 784-300-100 at ε = 0.33, LeNet-5-Caffe at ε = 0.10), 30 epochs each:

* dense (the L0 config with ``sparsity.method=none``), constrained L0 and constrained CGES at
  the budget: the first epoch whose exact measure meets ε, feasible at the end, test error;
* penalised CGES: ``csparse compare``'s bisection over λ to the same budget (the constrained
  CGES run is the comparison's constrained row), the λ found and the runs it took;
* seconds per epoch of CGES against dense, timed interleaved on the same batches at the end
  state of each run (``_report.interleaved_timing``);
* MLP only: which input pixels fc1 keeps (its active input neurons as a 28 x 28 image) for
  L0, group sparsity alone (mu = 1), exclusive sparsity alone (mu = 0) and combined,
  written to ``docs/img/cges_fc1_inputs.png``.

    python benchmarks/bench_cges_fashion.py --threads 2 --models mlp lenet --max-runs 5

Writes ``benchmarks/out/cges_fashion.{json,md}``. After a change to the method's speed,
``--retime`` times the dense and constrained CGES runs of that report again (interleaved, with
the code as it is now) without training, into ``benchmarks/out/cges_fashion_retime.{json,md}``:

    python benchmarks/bench_cges_fashion.py --threads 2 --retime benchmarks/out/cges_fashion.json

The dense, L0 and CGES-variant runs live in ``OUT/runs/<model>-<run>``; with ``--reuse`` a
complete one of the same config is kept (a stopped one resumed) instead of trained again.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import _report
import torch

import constrained_sparsity as cs
from constrained_sparsity.compare import compare

ROOT = Path(__file__).resolve().parents[1]
MODELS = {
    "mlp": ("fashion_mlp_l0_constrained.yaml", "fashion_mlp_cges_constrained.yaml", 0.33),
    "lenet": ("fashion_lenet_l0_constrained.yaml", "fashion_lenet_cges_constrained.yaml", 0.10),
}


def _yes_no(value: bool | None) -> str:
    return "-" if value is None else ("yes" if value else "no")


def _row(name: str, result: cs.RunResult) -> dict:
    times = [row["time/epoch_s"] for row in result.history]
    return {
        "name": name,
        "run_dir": str(result.run_dir),
        "first_feasible_epoch": _report.first_feasible(result.history),
        "feasible": result.feasible,
        "density": result.density.get("model"),
        "test_error": result.test_error,
        "s_per_epoch_in_run": sum(times) / max(len(times), 1),
        "finish": result.finish,
    }


def _fc1_inputs(run_dir: str) -> torch.Tensor:
    """fc1's active input neurons of a run's returned network, as a 28 x 28 image."""
    trained = cs.runs.load_run(run_dir)
    layer = trained.model.fc1
    gate = getattr(layer, "l0_gate", None)
    active = gate.active() if gate is not None else layer.weight.detach().ne(0).any(dim=0)
    return active.float().view(28, 28)


def _picture(images: dict[str, torch.Tensor], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(images), figsize=(3.0 * len(images), 3.3))
    for ax, (title, image) in zip(axes, images.items()):
        ax.imshow(image.numpy(), cmap="gray_r", vmin=0, vmax=1)
        ax.set_title(f"{title}\n{int(image.sum())} of 784 pixels", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle("fc1's active input pixels (black), Fashion-MNIST MLP", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=["mlp", "lenet"])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-runs", type=int, default=5, help="bisection runs for the penalised CGES")
    parser.add_argument("--rounds", type=int, default=8, help="interleaved timing rounds")
    parser.add_argument("--steps", type=int, default=30, help="training steps per setup and round")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "out"))
    parser.add_argument("--retime", metavar="JSON", help="time the runs of this earlier report again; no training")
    parser.add_argument(
        "--reuse",
        action="store_true",
        help="keep a complete run of the same config under OUT/runs (dense, L0, the CGES variants); "
        "the comparison runs again",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.retime:
        return _retime(Path(args.retime), args, out)
    common = _report.run_overrides(args.epochs, args.threads, out / "runs")
    report = {**_report.header(args.threads), "models": {}}
    lines = [*_report.markdown_header(report, f", {args.epochs} epochs per run"), ""]
    for model in args.models:
        l0_config, cges_config, eps = MODELS[model]
        runs: dict[str, dict] = {}

        def train(name: str, config: str, *extra: str, runs: dict = runs, model: str = model) -> cs.RunResult:
            cfg = cs.load_config(ROOT / "configs" / config, [*common, *extra])
            slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
            result, how = _report.train_or_reuse(cfg, out / "runs" / f"{model}-{slug}", args.reuse, model)
            runs[name] = _row(name, result)
            print(f"[{model}] {name} ({how}): {runs[name]}", file=sys.stderr, flush=True)
            return result

        train("dense", l0_config, "sparsity.method=none")
        train("L0, constrained", l0_config, f"sparsity.targets={eps}")
        cges_cfg = cs.load_config(ROOT / "configs" / cges_config, [*common, f"sparsity.targets={eps}"])
        cmp = compare(
            cges_cfg,
            [eps],
            bisect=True,
            max_runs=args.max_runs,
            out_dir=out / f"cges_compare_{model}",
            overwrite=True,
            progress=lambda msg: print(msg, file=sys.stderr, flush=True),
        )
        constrained = next(r for r in cmp.rows if r["mode"] == "constrained")
        bisected = next(r for r in cmp.rows if r["search"].startswith("bisect"))
        runs["CGES, constrained"] = _row("CGES, constrained", _report.load_result(constrained["run_dir"]))
        runs["CGES, penalised (bisected)"] = {
            **_row("CGES, penalised (bisected)", _report.load_result(bisected["run_dir"])),
            "lambda": bisected["lambda"],
            "runs": bisected["runs_used"],
            "search": bisected["search"],
        }
        timing = _report.interleaved_timing(
            {"dense": runs["dense"], "cges": runs["CGES, constrained"]}, args.rounds, args.steps
        )
        ratio = {phase: timing[f"cges/{phase}"] / timing[f"dense/{phase}"] for phase in ("start", "end")}
        report["models"][model] = {"epsilon": eps, "runs": runs, "s_per_epoch": timing, "cges_dense": ratio}
        lines += [
            f"### {model}, ε = {eps}",
            "",
            "| run | first epoch ≤ ε | feasible at end | exact density | test error | λ (runs) |",
            "|---|---|---|---|---|---|",
        ]
        for name, r in runs.items():
            lam = f"{r['lambda']} ({r['runs']}, {r['search']})" if "lambda" in r else "-"
            density = "-" if r["density"] is None else f"{r['density']:.4f}"
            lines.append(
                f"| {name} | {r['first_feasible_epoch'] or '-'} | {_yes_no(r['feasible'])} | {density} | "
                f"{100 * r['test_error']:.2f} % | {lam} |"
            )
        lines += [
            "",
            f"Seconds per epoch, interleaved on the same batches: dense {timing['dense/start']:.2f} (start), "
            f"{timing['dense/end']:.2f} (end); CGES {timing['cges/start']:.2f}, {timing['cges/end']:.2f}; "
            f"CGES / dense **{ratio['start']:.3f}** (start), **{ratio['end']:.3f}** (end).",
            "",
        ]
        if model == "mlp":
            for name, mu in (("group only (mu = 1)", 1.0), ("exclusive only (mu = 0)", 0.0)):
                train(f"CGES, {name}", cges_config, f"sparsity.targets={eps}", f"sparsity.mu={mu}")
            images = {
                "L0 (input gates)": _fc1_inputs(runs["L0, constrained"]["run_dir"]),
                "group only": _fc1_inputs(runs["CGES, group only (mu = 1)"]["run_dir"]),
                "exclusive only": _fc1_inputs(runs["CGES, exclusive only (mu = 0)"]["run_dir"]),
                "combined (CGES)": _fc1_inputs(runs["CGES, constrained"]["run_dir"]),
            }
            path = ROOT / "docs" / "img" / "cges_fc1_inputs.png"
            _picture(images, path)
            lines += [
                "| CGES variant at the same budget | exact density | test error |",
                "|---|---|---|",
                *(
                    f"| {name} | {runs[f'CGES, {name}']['density']:.4f} | "
                    f"{100 * runs[f'CGES, {name}']['test_error']:.2f} % |"
                    for name in ("group only (mu = 1)", "exclusive only (mu = 0)")
                ),
                "",
                f"Picture: `{path.relative_to(ROOT)}`.",
                "",
            ]
        _report.write(out, "cges_fashion", report, lines)
    return 0


def _retime(path: Path, args: argparse.Namespace, out: Path) -> int:
    earlier = json.loads(path.read_text())
    report = {**_report.header(args.threads), "from": str(path), "models": {}}
    lines = [*_report.markdown_header(report, f", runs of {path.name} ({earlier['command']})"), ""]
    for model, data in earlier["models"].items():
        runs = {"dense": data["runs"]["dense"], "cges": data["runs"]["CGES, constrained"]}
        timing = _report.interleaved_timing(runs, args.rounds, args.steps)
        ratio = {phase: timing[f"cges/{phase}"] / timing[f"dense/{phase}"] for phase in ("start", "end")}
        before = data.get("cges_dense", {})
        report["models"][model] = {"s_per_epoch": timing, "cges_dense": ratio, "cges_dense_before": before}
        lines.append(
            f"{model}: seconds per epoch, interleaved: dense {timing['dense/start']:.2f} (start), "
            f"{timing['dense/end']:.2f} (end); CGES {timing['cges/start']:.2f}, {timing['cges/end']:.2f}; "
            f"CGES / dense **{ratio['start']:.3f}** (start), **{ratio['end']:.3f}** (end)"
            + (f"; in the earlier report {before['start']:.3f}, {before['end']:.3f}." if before else ".")
        )
    _report.write(out, "cges_fashion_retime", report, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
