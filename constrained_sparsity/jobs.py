"""Trainings N at a time (``csparse compare --jobs N``), with one line per finished run and an
overall bar.

A comparison is a list of *tasks* -- a constrained run, a penalised run, a whole λ search --
each a sequence of trainings that must run one after the other (a search's next λ depends on
its last run). :class:`Runner` plays the tasks ``jobs`` at a time: each task runs in a thread
of this process, and each of its trainings in one of ``jobs`` worker processes (``spawn``),
at ``threads`` threads each (default: the cores divided by the jobs, so processes x threads
never exceed the cores). With ``jobs=1`` the tasks and their trainings run in this process,
in order, as a plain loop would.

Two runs give the same result whichever way they run: a run depends on its config alone (its
seed; ``train.deterministic`` for bit-identical kernels), not on the process that trains it.
A :class:`RunStore` lets a caller keep finished runs (a results folder) and skip them, and
continue a stopped one. A worker whose starting process is gone (killed, or crashed) stops its
training with a checkpoint of the current step instead of training on unseen.
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol, TypeVar

from .config import Config, config_from_dict
from .errors import TrainingDiverged
from .training import RunResult, run

__all__ = ["Progress", "RunStore", "Runner", "cores", "default_threads"]

T = TypeVar("T")


def cores() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def default_threads(jobs: int) -> int:
    """Threads per training when ``jobs`` run at once: the cores shared out, at least one."""
    return max(1, cores() // jobs)


class RunStore(Protocol):
    """Finished runs kept somewhere (a results folder): ``get`` returns a kept run of the same
    config, or ``None`` (or raises ``TrainingDiverged`` for a kept failure); ``resume`` puts a
    stopped run of the same config back into ``run_dir`` to be continued there (``True``), or
    does nothing (``False``: the run starts anew); ``put`` records a run just trained and returns
    its result as kept; ``fail`` records a run that diverged."""

    def get(self, cfg: Config, run_dir: Path) -> RunResult | None: ...

    def resume(self, cfg: Config, run_dir: Path) -> bool: ...

    def put(self, cfg: Config, run_dir: Path, result: RunResult) -> RunResult: ...

    def fail(self, cfg: Config, run_dir: Path, message: str) -> None: ...


class Progress:
    """One line per finished run (``k/N``, its test error and time, the time left) and, while
    runs train silently in worker processes, an overall bar. ``N`` is an upper bound that a
    task lowers (:meth:`drop`) when it needs fewer runs than planned (a search that converged)."""

    def __init__(self, say: Callable[[str], None] | None, jobs: int, bar: bool) -> None:
        self._say = say
        self.jobs = jobs
        self.planned = 0
        self.done = 0
        self.trained_s: list[float] = []
        self._lock = threading.Lock()
        self._bar = None
        if bar and say is not None:
            from tqdm import tqdm

            self._bar = tqdm(total=0, desc="runs", unit="run", dynamic_ncols=True, file=sys.stderr)

    def plan(self, n: int) -> None:
        with self._lock:
            self.planned += n
            self._refresh()

    def drop(self, n: int) -> None:
        with self._lock:
            self.planned = max(self.done, self.planned - n)
            self._refresh()

    def _refresh(self) -> None:
        if self._bar is not None:
            self._bar.total = self.planned
            self._bar.refresh()

    def left_s(self) -> float | None:
        """Seconds left: the runs still planned times the mean time of a trained run, per job."""
        if not self.trained_s:
            return None
        mean = sum(self.trained_s) / len(self.trained_s)
        return max(0, self.planned - self.done) * mean / self.jobs

    def finished(self, label: str, result: RunResult, kept: bool, seconds: float) -> None:
        with self._lock:
            self.done += 1
            if not kept:
                self.trained_s.append(seconds)
            left = self.left_s()
            how = "kept" if kept else f"{seconds:.0f} s"
            eta = "" if left is None else f", about {_duration(left)} left"
            self.say(
                f"[{self.done}/{max(self.planned, self.done)}] {label}: test error {100 * result.test_error:.2f} %, "
                f"{_densities(result)} ({how}{eta})"
            )
            if self._bar is not None:
                self._bar.update(1)

    def say(self, msg: str) -> None:
        if self._say is None:
            return
        if self._bar is not None:  # the bar steps aside for the line, then is drawn again
            with self._bar.external_write_mode(file=sys.stderr):
                self._say(msg)
        else:
            self._say(msg)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _densities(result: RunResult) -> str:
    exact = [f"{t['name']} {float(t['exact']):.4f}" for t in result.targets if "exact" in t]
    return ", ".join(exact) if exact else "no budget"


def _train_in_worker(cfg_dict: dict[str, Any], run_dir: str, threads: int | None, resume: bool) -> RunResult:
    import torch

    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return run(resume=run_dir) if resume else run(config_from_dict(cfg_dict), run_dir=run_dir)
    finally:
        if _parent is not None and os.getppid() != _parent:
            os._exit(1)  # its run stopped with a checkpoint, and no one waits for its result


_parent: int | None = None  # in a worker: the process that started it


def _watch_parent(parent: int, poll_s: float = 1.0, grace_s: float = 300.0) -> None:
    """A worker's initializer: a thread that stops the worker's training when the process that
    started it is gone (killed, or crashed). It sends the worker SIGTERM, which a run turns into
    a checkpoint of its current step (``TrainingInterrupted``), after which the worker exits; an
    idle worker ends at once, one that does not stop within ``grace_s`` is ended outright."""
    import signal

    global _parent
    _parent = parent

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(grace_s)
        os._exit(1)

    threading.Thread(target=watch, name="watch-parent", daemon=True).start()


class Runner:
    """Trains configs and plays tasks, ``jobs`` at a time (see the module docstring).

    Args:
        jobs: trainings at once (1: in this process, in order).
        threads: threads per training, set as ``train.threads`` on every run whose config
            leaves it unset (default with ``jobs > 1``: :func:`default_threads`).
        store: keeps finished runs; a run it holds is not trained again, a stopped run it
            holds is continued.
        say: where progress lines go (``None``: nowhere).
    """

    def __init__(
        self,
        jobs: int = 1,
        threads: int | None = None,
        store: RunStore | None = None,
        say: Callable[[str], None] | None = None,
    ) -> None:
        if jobs < 1:
            raise ValueError(f"jobs={jobs} should be >= 1")
        if threads is not None and threads < 1:
            raise ValueError(f"threads={threads} should be >= 1")
        self.jobs = jobs
        self.threads = threads if threads is not None or jobs == 1 else default_threads(jobs)
        self.store = store
        self.progress = Progress(say, jobs, bar=jobs > 1)
        self._pool: concurrent.futures.ProcessPoolExecutor | None = None

    def configure(self, cfg: Config) -> Config:
        """``cfg`` as this runner trains it: its threads set, and no per-run progress bar when
        runs train side by side in workers (the overall bar stands for them)."""
        changes: dict[str, dict[str, Any]] = {}
        if self.threads is not None and cfg.train.threads is None:
            changes["train"] = {"threads": self.threads}
        if self.jobs > 1 and cfg.tracking.progress:
            changes["tracking"] = {"progress": False}
        if not changes:
            return cfg
        data = cfg.to_dict()
        for section, values in changes.items():
            data[section].update(values)
        return config_from_dict(data)

    def train(self, cfg: Config, run_dir: Path, label: str | None = None) -> RunResult:
        """Train ``cfg`` into ``run_dir`` (or take the store's run of it); safe from any thread."""
        cfg = self.configure(cfg)
        label = label or Path(run_dir).name
        if self.store is not None and (kept := self.store.get(cfg, Path(run_dir))) is not None:
            self.progress.finished(label, kept, True, kept.wall_time_s)
            return kept
        resume = self.store is not None and self.store.resume(cfg, Path(run_dir))
        if resume:
            self.progress.say(f"{label}: continuing the stopped run")
        t0 = time.perf_counter()
        try:
            if self.jobs == 1:
                result = run(resume=run_dir) if resume else run(cfg, run_dir=run_dir)
            else:
                args = (cfg.to_dict(), str(run_dir), cfg.train.threads, resume)
                result = self._workers().submit(_train_in_worker, *args).result()
        except TrainingDiverged as exc:  # kept too: the same config diverges again
            if self.store is not None:
                self.store.fail(cfg, Path(run_dir), str(exc))
            raise
        if self.store is not None:
            result = self.store.put(cfg, Path(run_dir), result)
        self.progress.finished(label, result, False, time.perf_counter() - t0)
        return result

    def _workers(self) -> concurrent.futures.ProcessPoolExecutor:
        if self._pool is None:
            self._pool = concurrent.futures.ProcessPoolExecutor(
                max_workers=self.jobs,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_watch_parent,
                initargs=(os.getpid(),),
            )
        return self._pool

    def play(self, tasks: Sequence[Callable[[], T]]) -> list[T]:
        """Run every task (each a sequence of :meth:`train` calls) and return their results in
        task order; ``jobs`` tasks at a time. The first error stops the tasks not yet started
        and is raised once the running ones end."""
        if self.jobs == 1:
            return [task() for task in tasks]
        with concurrent.futures.ThreadPoolExecutor(max_workers=self.jobs) as threads:
            futures = [threads.submit(task) for task in tasks]
            try:
                return [f.result() for f in futures]
            except BaseException:
                for f in futures:
                    f.cancel()
                raise

    def close(self) -> None:
        self.progress.close()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def __enter__(self) -> Runner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
