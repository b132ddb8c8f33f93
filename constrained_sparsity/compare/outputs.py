"""A comparison's files: ``results.csv`` / ``results.md``, the plots and the W&B table."""

from __future__ import annotations

import csv
import json
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..config import Config
from ..lambda_search import BisectResult
from ..training import RunResult
from .method import ComparedMethod

__all__ = [
    "COLUMNS",
    "Comparison",
    "cell",
    "joint_plot",
    "log_table",
    "mode_label",
    "plots",
    "row_kind",
    "write_tables",
    "x_value",
]


@dataclass
class Comparison:
    """What :func:`compare` wrote and measured."""

    out_dir: Path
    rows: list[dict[str, Any]]
    bisections: dict[str, BisectResult]
    plots: list[Path]


COLUMNS = [
    "mode",
    "search",
    "target",
    "lambda",
    "achieved",
    "per_layer",
    "test_error",
    "feasible",
    "runs_used",
    "wall_time_s",
    "run_dir",
]


# -- outputs -------------------------------------------------------------------------------------
def cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return str(value)


SEARCH_KINDS = ("grid", "bisect", "joint")
# marker and line style per kind of row (both plots), colour per kind (one method's plot)
MARKERS = {
    "constrained": ("o", "-"),
    "projected": ("D", "-"),
    "grid": ("s", ":"),
    "bisect": ("^", "--"),
    "joint": ("v", "--"),
}
COLORS = {
    "constrained": "tab:blue",
    "projected": "tab:green",
    "grid": "tab:orange",
    "bisect": "tab:red",
    "joint": "tab:purple",
}


def row_kind(row: dict[str, Any]) -> str:
    """How a row's run was made: ``constrained`` / ``projected`` (a budget run), or the
    penalty's ``grid``, ``bisect`` or ``joint`` search."""
    return row["mode"] if row["mode"] != "penalized" else row["search"].split()[0]


def mode_label(row: dict[str, Any]) -> str:
    """The row's mode as the tables and plots name it (``penalized (joint)`` for a search)."""
    kind = row_kind(row)
    return kind if kind in ("constrained", "projected") else f"penalized ({kind})"


def x_value(row: dict[str, Any]) -> float:
    """Where a row sits on a plot's measure axis: the achieved measure (for per-layer budgets,
    its mean over the layers)."""
    achieved = row["achieved"]
    return float(np.mean(achieved)) if isinstance(achieved, list) else float(achieved)


def write_tables(out: Path, rows: list[dict[str, Any]], measure: str, methods: bool = False) -> None:
    """``results.csv`` (every column) and ``results.md``; ``methods``: the joint table of several
    methods (a ``label`` and ``config`` column, sorted by target, method and mode)."""
    columns = ["label", "config", *COLUMNS] if methods else COLUMNS
    with (out / "results.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: cell(row[k]) if isinstance(row[k], (list, dict)) else row[k] for k in columns})
    if methods:
        head = f"| method | mode | target | λ | achieved {measure} | test error | feasible | runs | wall s |"
        ordered = sorted(rows, key=lambda r: (json.dumps(r["target"]), r["label"], mode_label(r)))
    else:
        head = (
            f"| mode | search | target | λ | achieved {measure} | per layer | test error | feasible | runs | wall s |"
        )
        ordered = rows
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in ordered:
        first = f"| {r['label']} | {mode_label(r)} |" if methods else f"| {r['mode']} | {r['search']} |"
        per_layer = "" if methods else f" {cell(r['per_layer'])} |"
        lines.append(
            f"{first} {cell(r['target'])} | {cell(r['lambda'])} | {cell(r['achieved'])} |{per_layer} "
            f"{100 * r['test_error']:.2f} % | {cell(r['feasible'])} | {r['runs_used']} | {r['wall_time_s']:.1f} |"
        )
    (out / "results.md").write_text("\n".join(lines) + "\n")


def plots(
    out: Path,
    results: list[tuple[dict, RunResult, Any]],
    every_run: list[tuple[dict, RunResult, Any]],
    method: ComparedMethod,
    targets: Sequence[Any],
) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    measure = method.label
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    labels = {
        "constrained": "constrained",
        "projected": "projected (budget by construction)",
        "grid": "penalized (λ grid)",
        "bisect": "penalized (bisection)",
        "joint": "penalized (joint λ search)",
    }
    for kind, (marker, _) in MARKERS.items():
        pts = [(x_value(r), 100 * r["test_error"]) for r, _, _ in results if row_kind(r) == kind]
        if pts:
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], marker=marker, color=COLORS[kind], label=labels[kind])
    for budget in targets:
        if not isinstance(budget, list):
            ax.axvline(float(budget), color="gray", linestyle="--", linewidth=1)
    ax.set_xlabel(measure + " (mean over layers for per-layer budgets)")
    ax.set_ylabel("test error (%)")
    ax.set_title("test error vs sparsity (dashed: targets)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = out / "error_vs_density.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    paths.append(path)

    for row, result, budget in every_run:
        hist = result.history
        if not hist:
            continue
        epochs = [h["epoch"] for h in hist]
        ref = budget if budget is not None else targets[0]
        fig, (top, bottom) = plt.subplots(2, 1, figsize=(6.4, 5.6), sharex=True)
        series = [method.history_measure(h, result) for h in hist]
        names = [t["name"] for t in method._targets(result)]
        for i, name in enumerate(names):
            top.plot(epochs, [s[i] for s in series], marker=".", label=name)
        for i, b in enumerate(method.budgets(ref) if budget is not None else []):
            top.axhline(b, color=f"C{i}", linestyle="--", linewidth=1)
        top.set_ylabel(measure)
        title = row["label"]
        if row.get("lambda") not in (None, "-"):
            title += f", λ = {cell(row['lambda'])}"
        if budget is not None:
            title += f", target {cell(budget)} (dashed)"
        top.set_title(title, fontsize=10)
        top.grid(alpha=0.3)
        top.legend(fontsize=8)
        for key in method.multiplier_keys(result):
            bottom.plot(epochs, [h.get(key, float("nan")) for h in hist], marker=".", label=key.split("/")[1])
        bottom.set_ylabel("multiplier λ")
        bottom.set_xlabel("epoch")
        bottom.grid(alpha=0.3)
        bottom.legend(fontsize=8)
        fig.tight_layout()
        path = out / f"dynamics_{row['label']}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths


def log_table(cfg: Config, group: str, out: Path, rows: list[dict[str, Any]]) -> None:
    from ..tracking import resolve_wandb_mode

    mode = resolve_wandb_mode(cfg.tracking.wandb)
    if mode == "disabled":
        return
    import wandb

    kwargs = {
        "project": cfg.tracking.project,
        "group": group,
        "job_type": "comparison",
        "name": f"{group}-results",
        "dir": str(out),
        "settings": wandb.Settings(console="off", silent=True, init_timeout=60, x_save_requirements=False),
    }
    try:
        try:
            wb = wandb.init(mode=mode, entity=cfg.tracking.entity, **kwargs)
        except Exception:  # noqa: BLE001 - the comparison's files are written; W&B is a copy
            if mode != "online":
                raise
            wb = wandb.init(mode="offline", **kwargs)
        table = wandb.Table(columns=COLUMNS, allow_mixed_types=True)
        for r in rows:
            table.add_data(*[cell(r[k]) if isinstance(r[k], (list, dict)) else r[k] for k in COLUMNS])
        wb.log({"comparison/results": table})
        wb.finish()
    except Exception as exc:  # noqa: BLE001
        warnings.warn(f"W&B could not log the comparison table ({type(exc).__name__}: {exc}); see {out}", stacklevel=2)


def joint_plot(out: Path, rows: list[dict[str, Any]], measure: str, targets: Sequence[Any]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.0, 4.6))
    labels = list(dict.fromkeys(r["label"] for r in rows))
    for i, label in enumerate(labels):
        for kind, (marker, style) in MARKERS.items():
            mode = mode_label({"mode": "penalized", "search": kind}) if kind in SEARCH_KINDS else kind
            pts = sorted(
                (x_value(r), 100 * r["test_error"]) for r in rows if r["label"] == label and row_kind(r) == kind
            )
            if pts:
                ax.plot(
                    [p[0] for p in pts], [p[1] for p in pts], marker=marker, linestyle=style, color=f"C{i}",
                    label=f"{label}, {mode}",
                )  # fmt: skip
    for budget in targets:
        if not isinstance(budget, list):
            ax.axvline(float(budget), color="gray", linestyle="--", linewidth=1)
    ax.set_xlabel(measure + " (mean over layers for per-layer budgets)")
    ax.set_ylabel("test error (%)")
    ax.set_title("test error vs sparsity, per method and mode (dashed: budgets)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = out / "error_vs_density.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
