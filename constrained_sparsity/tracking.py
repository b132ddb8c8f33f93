"""Run tracking: a JSONL metrics file (always) and Weights & Biases (online / offline / off).

W&B never blocks or stops a run: ``auto`` means online only when an API key is configured,
offline otherwise; an online start that fails falls back to offline, and when W&B cannot
start or write at all (its directory not writable, its service failing) the run goes on
with the JSONL log alone, after one warning.
"""

from __future__ import annotations

import json
import math
import os
import sys
import warnings
from pathlib import Path
from typing import Any

from .errors import CheckpointError

__all__ = ["NullTracker", "Tracker", "resolve_wandb_mode"]


def resolve_wandb_mode(mode: str) -> str:
    """``auto`` -> ``$WANDB_MODE`` if set, else online with ``$WANDB_API_KEY``, else offline."""
    if mode != "auto":
        return mode
    env = os.environ.get("WANDB_MODE", "").strip().lower()
    if env in ("online", "offline", "disabled"):
        return env
    if env == "dryrun":
        return "offline"
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else (1e308 if value > 0 else -1e308)
    return value


class Tracker:
    """Writes ``metrics.jsonl`` in the run directory and mirrors every record to W&B."""

    def __init__(
        self,
        run_dir: Path,
        config: dict,
        wandb_mode: str = "auto",
        project: str = "constrained_sparsity",
        entity: str | None = None,
        group: str | None = None,
        job_type: str | None = None,
        name: str | None = None,
        run_id: str | None = None,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.metrics_path = self.run_dir / "metrics.jsonl"
        try:
            self._jsonl = self.metrics_path.open("a", encoding="utf-8")
        except OSError as exc:
            raise CheckpointError(f"{self.metrics_path}: cannot write the log ({exc.strerror or exc})") from None
        self.mode = resolve_wandb_mode(wandb_mode)
        self.wandb_run: Any = None
        self.wandb_error: str | None = None  # why W&B stopped logging, if it did
        if self.mode != "disabled":
            try:
                self.wandb_run = self._start_wandb(config, project, entity, group, job_type, name, run_id)
            except Exception as exc:  # noqa: BLE001 - W&B is a copy of the log; the run goes on without it
                self._give_up("start", exc)

    @property
    def wandb_id(self) -> str | None:
        return self.wandb_run.id if self.wandb_run is not None else None

    @property
    def wandb_dir(self) -> str | None:
        return self.wandb_run.dir if self.wandb_run is not None else None

    def _start_wandb(self, config, project, entity, group, job_type, name, run_id):  # type: ignore[no-untyped-def]
        import wandb

        settings = wandb.Settings(console="off", silent=True, init_timeout=60, x_save_requirements=False)
        kwargs = dict(
            project=project,
            entity=entity,
            group=group,
            job_type=job_type,
            name=name,
            config=config,
            dir=str(self.run_dir),
            id=run_id,
            resume="allow" if run_id else None,
            settings=settings,
        )
        try:
            run = wandb.init(mode=self.mode, **kwargs)
        except Exception as exc:  # noqa: BLE001 - any failure to reach W&B must not stop training
            if self.mode != "online":
                raise
            warnings.warn(f"W&B online start failed ({exc}); logging offline instead", stacklevel=2)
            self.mode = "offline"
            run = wandb.init(mode="offline", **kwargs)
        run.define_metric("epoch")
        run.define_metric("*", step_metric="epoch")
        return run

    def _give_up(self, what: str, exc: BaseException) -> None:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        self.wandb_error = f"W&B could not {what} ({type(exc).__name__}: {reason})"
        warnings.warn(f"{self.wandb_error}; the run goes on, logged in {self.metrics_path} only", stacklevel=3)
        self.wandb_run = None

    def log(self, metrics: dict[str, Any]) -> None:
        """Append one record (flushed to disk at once) and send it to W&B."""
        record = {k: _jsonable(v) for k, v in metrics.items()}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        os.fsync(self._jsonl.fileno())
        if self.wandb_run is not None:
            try:
                self.wandb_run.log(metrics)
            except Exception as exc:  # noqa: BLE001
                self._give_up("log", exc)

    def summary(self, values: dict[str, Any]) -> None:
        if self.wandb_run is not None:
            try:
                for key, value in values.items():
                    self.wandb_run.summary[key] = value
            except Exception as exc:  # noqa: BLE001
                self._give_up("write the summary", exc)

    def finish(self, exit_code: int = 0) -> None:
        self._jsonl.close()
        if self.wandb_run is not None:
            try:
                self.wandb_run.finish(exit_code=exit_code)
            except Exception as exc:  # noqa: BLE001
                print(f"warning: W&B finish failed: {exc}", file=sys.stderr)
            self.wandb_run = None


class NullTracker:
    """The tracker of a rank other than 0 in a run of several processes: it writes nothing."""

    wandb_id = None
    wandb_dir = None
    wandb_error = None

    def __init__(self, run_dir: Path, *args: Any, **kwargs: Any) -> None:
        self.run_dir = Path(run_dir)
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.mode = "disabled"
        self.wandb_run = None

    def log(self, metrics: dict[str, Any]) -> None:
        pass

    def summary(self, values: dict[str, Any]) -> None:
        pass

    def finish(self, exit_code: int = 0) -> None:
        pass
