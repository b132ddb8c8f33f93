"""The end-of-run report: what a run measured, in a few lines for the console."""

from __future__ import annotations

from pathlib import Path

from ..methods import get_method
from .plots import DYNAMICS
from .run import RunResult

__all__ = ["format_report"]


def format_report(result: RunResult) -> str:
    """A short human-readable report: each method's rows, the budgets, feasibility, error, phases."""
    lines = [f"run directory: {result.run_dir}", f"epochs: {result.epochs}   wall time: {result.wall_time_s:.1f} s"]
    if result.distributed is not None:
        d = result.distributed
        lines.append(
            f"processes: {d['world_size']} ({d['backend']}), global batch {d['global_batch_size']} "
            f"(up to {d['batch_size_per_rank']} per rank); ranks' final states agree: "
            + ("yes" if d["ranks_agree"] else f"NO (differ by up to {d['max_difference']:g}; rank 0's is saved)")
        )
    for spec in result.methods:
        rows = [r for r in result.layers if r.get("method") == spec]
        targets = [t for t in result.targets if t["method"] == spec]
        lines += get_method(spec).reporter.format_rows(rows, targets, result.measures)
    for t in result.targets:
        verdict = "yes" if t["feasible"] else "NO"
        lines.append(
            f"constraint {t['name']}: {get_method(t['method']).reporter.format_target(t)} {verdict}"
            f"   (multiplier {t['multiplier']:.4g})"
        )
    if result.feasible is not None:
        lines.append(f"feasible: {'yes' if result.feasible else 'NO'}")
    if result.last_iterate is not None:
        li = result.last_iterate
        if result.selected_epoch is None:
            lines.append("selected iterate: none met every budget; this is the last iterate")
        elif result.selected_epoch != li["epoch"] or result.selected_step is not None:
            density = "" if li["density"] is None else f"had density {li['density']:.4f}, "
            where = f"epoch {result.selected_epoch}"
            if result.selected_step is not None:
                where += f", step {result.selected_step} of that epoch"
            lines.append(
                f"selected iterate: {where} (the last iterate, end of epoch {li['epoch']}, "
                f"{density}feasible {'yes' if li['feasible'] else 'no'}, test error {100 * li['test_error']:.2f} %)"
            )
        if result.selected_epoch is not None and result.epochs - result.selected_epoch > 0.1 * result.epochs:
            lines.append(
                f"note: the returned network is from epoch {result.selected_epoch} of {result.epochs}, "
                f"{result.epochs - result.selected_epoch} epochs before the end of training: no later epoch met every "
                "budget"
            )
    if result.finish is not None:
        lines.append(_finish_line(result.finish))
    lines.append(f"test error: {100 * result.test_error:.2f} %")
    if (Path(result.run_dir) / DYNAMICS).is_file():
        lines.append(f"dynamics (measures, multipliers, error per epoch): {Path(result.run_dir) / DYNAMICS}")
    if result.compaction is not None:
        c = result.compaction
        lines.append(
            f"compact network: {c['architecture_before']} -> {c['architecture_after']}, parameters "
            f"{c['params_before']} -> {c['params_after']}, FLOPs per example {c['flops_before']} -> "
            f"{c['flops_after']}   (csparse compact {result.run_dir})"
        )
    for name, info in result.phases.items():
        lines += get_method(info["method"]).reporter.format_phase(name, info)
    if result.wandb_dir:
        lines.append(f"W&B files: {Path(result.wandb_dir).parent}")
    return "\n".join(lines)


def _finish_line(f: dict) -> str:
    """What the finishing phase closed and the test error before and after."""
    if f["units_closed"]:
        per_target = "; ".join(
            f"{name}: " + ", ".join(f"{layer} {n}" for layer, n in layers.items())
            for name, layers in f["closed"].items()
        )
        what = f"closed {f['units_closed']} units to meet every budget ({per_target})"
    else:
        what = "every budget already held, nothing closed"
    if f["unprojected"]:
        what += f"; {', '.join(f['unprojected'])} left over budget (its method cannot close units)"
    return (
        f"finishing: {what}; test error {100 * f['test_error_before']:.2f} % -> "
        f"{100 * f['test_error_closed']:.2f} % (pattern fixed) -> {100 * f['test_error_after']:.2f} % "
        f"(after {f['epochs']} epochs of fine-tuning, {f['seconds']:.1f} s)"
    )
