"""``dynamics.png``: how a run's game went, per epoch (drawn for every run; no import of the
trainer, which calls it)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["DYNAMICS", "write_dynamics"]

DYNAMICS = "dynamics.png"


def write_dynamics(result: Any, path: Path | None = None) -> Path | None:
    """Plot how the game went, per epoch of training (``result``: a ``RunResult``): each budget's exact measure (and the
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
