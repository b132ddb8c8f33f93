"""The end-of-run report: what a run measured, in a few lines for the console."""

from __future__ import annotations

from pathlib import Path

from ..methods import get_method
from .run import RunResult

__all__ = ["DYNAMICS", "format_report", "write_dynamics"]

DYNAMICS = "dynamics.png"


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
        lines += get_method(spec).format_rows(rows, targets, result.measures)
    for t in result.targets:
        verdict = "yes" if t["feasible"] else "NO"
        lines.append(
            f"constraint {t['name']}: {get_method(t['method']).format_target(t)} {verdict}"
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
        lines += get_method(info["method"]).format_phase(name, info)
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


def write_dynamics(result: RunResult, path: Path | None = None) -> Path | None:
    """Plot how the game went, per epoch of training: each budget's exact measure (and the
    expected one, dotted, where the method has it) against the budget (dashed), the
    multipliers, and the validation / test error. Written to ``run_dir/dynamics.png``;
    ``None`` when the run logged no epoch."""
    rows = [h for h in result.history if "train/loss" in h]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in rows]
    panels = 3 if result.targets else 1
    fig, axes = plt.subplots(panels, 1, figsize=(6.4, 2.4 * panels + 0.8), sharex=True, squeeze=False)
    axes = axes[:, 0]
    if result.targets:
        top, middle = axes[0], axes[1]
        for i, t in enumerate(result.targets):
            key = t.get("metric")
            color = f"C{i}"
            if key and any(key in h for h in rows):
                top.plot(
                    epochs, [h.get(key, float("nan")) for h in rows], color=color, marker=".", label=f"{key} (exact)"
                )
                if key.startswith("density/"):
                    expected = "density_expected/" + key.split("/", 1)[1]
                    if any(expected in h for h in rows):
                        values = [h.get(expected, float("nan")) for h in rows]
                        top.plot(epochs, values, color=color, linestyle=":", label=f"{expected}")
            budget = t.get("budget")
            if isinstance(budget, (int, float)):
                top.axhline(float(budget), color=color, linestyle="--", linewidth=1)
            multiplier = f"constraint/{t['name']}/multiplier"
            middle.plot(
                epochs, [h.get(multiplier, float("nan")) for h in rows], color=color, marker=".", label=t["name"]
            )
        top.set_ylabel("measure")
        top.set_title(f"{Path(result.run_dir).name}: budgets dashed", fontsize=10)
        top.legend(fontsize=7)
        middle.set_ylabel("multiplier λ")
        middle.legend(fontsize=7)
    bottom = axes[-1]
    for key, style in (("val/error", "--"), ("test/error", "-")):
        if key == "val/error" and result.val_error is None:
            continue  # no validation split: the log's val/error repeats the test error
        if any(key in h for h in rows):
            bottom.plot(epochs, [100 * h.get(key, float("nan")) for h in rows], linestyle=style, marker=".", label=key)
    bottom.set_ylabel("error (%)")
    bottom.set_xlabel("epoch")
    bottom.legend(fontsize=7)
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path) if path is not None else Path(result.run_dir) / DYNAMICS
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
