"""Searching the penalty λ that makes a penalised run land on a budget.

A penalised run's achieved measure is (up to training noise) a non-increasing function of λ:
a larger penalty, a sparser network. Two searches:

* :func:`bisect_lambda`: one budget (or one vector of per-layer budgets) at a time, bisection
  on ``log λ`` -- the baseline of the constrained-L0 paper (Gallego-Posada et al. 2022), which
  counts the runs a penalty needs to hit one target.
* :func:`joint_search`: every budget of a method at once. Every run's achieved measure
  informs every budget's bracket, and inside a bracket the next λ comes from interpolating
  ``log λ`` against ``log(measure)`` (a secant in log-log, monotone by construction), falling
  back to bisection where there is nothing to interpolate. It reports, per budget, the run
  that landed within tolerance and how many runs the whole search took.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

__all__ = ["BisectResult", "JointSearchResult", "bisect_lambda", "joint_search", "within"]


def within(achieved: float, budget: float) -> bool:
    """``achieved <= budget`` as the training step decides it: in float32, where the measures
    live (a density of exactly the budget, 0.2, reads 0.20000000298 as a double)."""
    return bool(torch.tensor(achieved, dtype=torch.float32) <= torch.tensor(budget, dtype=torch.float32))


def _check(lo: float, hi: float, tol: float, max_runs: int) -> None:
    if not 0 < lo < hi:
        raise ValueError(f"lambda range ({lo}, {hi}) should satisfy 0 < lo < hi")
    if max_runs < 1:
        raise ValueError(f"max_runs={max_runs} should be >= 1")
    if tol < 0:
        raise ValueError(f"tol={tol} should be >= 0")


def _miss(value: Sequence[float], targets: Sequence[float], tol: float) -> tuple[bool, bool, float]:
    """How a search ranks its runs for a budget (the smallest first): a run that met every
    budget within ``tol`` above it before one that did not, then by the largest miss; a failed
    run (NaN) last, chosen only when every run failed."""
    if any(math.isnan(v) for v in value):
        return (True, True, math.inf)
    feasible = all(v <= t + tol for v, t in zip(value, targets))
    return (False, not feasible, max(abs(v - t) for v, t in zip(value, targets)))


# -- one budget at a time -------------------------------------------------------------------------
@dataclass
class BisectResult:
    """Outcome of :func:`bisect_lambda`: the lambda(s) chosen and how the search went."""

    lam: list[float]
    value: list[float]
    runs: int
    converged: bool
    reason: str
    history: list[tuple[list[float], list[float]]] = field(default_factory=list)


def bisect_lambda(
    evaluate: Callable[[list[float]], list[float] | None],
    targets: Sequence[float],
    lo: float = 1e-3,
    hi: float = 1e2,
    tol: float = 0.01,
    max_runs: int = 8,
) -> BisectResult:
    """Bisection on ``log(lambda)`` so that ``evaluate(lambda)`` is within ``tol`` of ``targets``.

    ``evaluate`` maps one lambda per coordinate to the achieved measure per coordinate and must
    be non-increasing in each lambda (a larger penalty, a sparser network); ``None`` says the
    run failed (diverged), taken as a penalty too strong: the next lambda is smaller, and the
    run is never the one returned unless every run failed (its values then NaN). Every coordinate
    keeps its own bracket ``[lo, hi]`` and is evaluated at the bracket's geometric midpoint;
    all coordinates share each run. Stops when every coordinate is within ``tol`` or after
    ``max_runs`` runs. The returned lambda is the last one evaluated on convergence; otherwise
    the one whose worst miss was smallest, preferring points that met every budget.
    """
    _check(lo, hi, tol, max_runs)
    n = len(targets)
    lows, highs = [math.log(lo)] * n, [math.log(hi)] * n
    history: list[tuple[list[float], list[float]]] = []
    for _ in range(max_runs):
        lam = [math.exp((a + b) / 2) for a, b in zip(lows, highs)]
        measured = evaluate(lam)
        if measured is None:  # the run failed (diverged): taken as a penalty too strong
            history.append((lam, [math.nan] * n))
            highs = [math.log(v) for v in lam]
            continue
        value = list(measured)
        history.append((lam, value))
        if all(abs(v - t) <= tol for v, t in zip(value, targets)):
            return BisectResult(lam, value, len(history), True, "within tolerance", history)
        for i, (v, t) in enumerate(zip(value, targets)):
            if abs(v - t) <= tol:
                continue
            if v > t:  # not sparse enough: a larger penalty
                lows[i] = math.log(lam[i])
            else:
                highs[i] = math.log(lam[i])

    lam, value = min(history, key=lambda item: _miss(item[1], targets, tol))
    return BisectResult(lam, value, len(history), False, f"all {max_runs} runs spent", history)


# -- every budget at once -------------------------------------------------------------------------
@dataclass
class JointSearchResult:
    """Outcome of :func:`joint_search`.

    Per budget (in the order given): ``chosen[i]`` indexes ``history`` (one ``(λ, achieved)``
    per run, in run order) -- the run that landed within tolerance, or else the closest miss,
    preferring one within ``budget + tol``; ``converged[i]`` says which. ``runs``: the runs
    the whole search took, shared by every budget.
    """

    targets: list[float]
    chosen: list[int]
    converged: list[bool]
    runs: int
    reason: str
    history: list[tuple[float, float]] = field(default_factory=list)

    @property
    def lam(self) -> list[float]:
        return [self.history[i][0] for i in self.chosen]

    @property
    def value(self) -> list[float]:
        return [self.history[i][1] for i in self.chosen]


_FLOOR = 1e-6  # a measure of 0 (an empty network) in log space
_MARGIN = 0.1  # interpolated points keep this share of the bracket from either end
_REACH = 0.75  # an extrapolation goes at most this share of the way to the range's end


def _bracket(points: list[tuple[float, float]], target: float, tol: float, lo: float, hi: float):
    """The log-λ bracket of ``target``: the largest evaluated ``log λ`` still too dense and the
    smallest already too sparse, each with its measure (``None`` where the side is a range
    bound), and the runs on each side."""
    dense = sorted((x, d) for x, d in points if d > target + tol)
    sparse = sorted((x, d) for x, d in points if d < target - tol)
    a: tuple[float, float | None] = dense[-1] if dense else (lo, None)
    b: tuple[float, float | None] = sparse[0] if sparse else (hi, None)
    if a[0] >= b[0]:  # noise broke monotonicity here: bisect between the two runs
        a, b = (b[0], None), (a[0], None)
    return a, b, dense, sparse


def _secant(x1: float, d1: float, x2: float, d2: float, target: float) -> float | None:
    """Where the line through ``(x, log d)`` points reaches ``log target`` (``None``: flat)."""
    y1, y2, yt = (math.log(max(v, _FLOOR)) for v in (d1, d2, target))
    if y1 == y2:
        return None
    return x1 + (x2 - x1) * (yt - y1) / (y2 - y1)


def _candidate(points: list[tuple[float, float]], target: float, tol: float, lo: float, hi: float):
    """The next ``log λ`` aimed at ``target`` and the width of its bracket."""
    (a, da), (b, db), dense, sparse = _bracket(points, target, tol, lo, hi)
    width = b - a
    mid = (a + b) / 2
    if da is not None and db is not None:  # bracketed by runs: interpolate
        x = _secant(a, da, b, db, target)
        guard = (a + _MARGIN * width, b - _MARGIN * width)
    elif da is not None and len(dense) >= 2:  # runs below only: extrapolate towards hi
        (x1, d1), (x2, d2) = sorted(dense)[-2:]
        x = _secant(x1, d1, x2, d2, target)
        guard = (a + _MARGIN * width, a + _REACH * width)
    elif db is not None and len(sparse) >= 2:  # runs above only: extrapolate towards lo
        (x1, d1), (x2, d2) = sorted(sparse)[:2]
        x = _secant(x1, d1, x2, d2, target)
        guard = (b - _REACH * width, b - _MARGIN * width)
    else:
        x, guard = mid, (mid, mid)
    if x is None or not math.isfinite(x):
        x = mid
    return min(max(x, guard[0]), guard[1]), width


def joint_search(
    evaluate: Callable[[float], float | None],
    targets: Sequence[float],
    lo: float = 1e-3,
    hi: float = 1e2,
    tol: float = 0.01,
    max_runs: int = 24,
) -> JointSearchResult:
    """One λ search for several budgets of one (scalar) measure.

    ``evaluate(λ)`` trains at ``λ`` and returns the achieved measure, non-increasing in λ up
    to noise. Each next run aims at the open budget (not yet within ``tol`` of any run) whose
    bracket in ``log λ`` is widest: inside a bracket of two runs at the secant of
    ``log(measure)`` against ``log λ``, kept ``10 %`` of the bracket from its ends; with runs on
    one side only, at the secant through the two nearest, at most ``75 %`` of the way to the
    range's end; with fewer, at the bracket's midpoint (bisection). Every λ lies strictly
    inside ``(lo, hi)``. Stops when every budget is within ``tol`` or after ``max_runs`` runs.
    ``evaluate`` returns ``None`` for a run that failed (diverged): it counts as a penalty too
    strong (an emptied network) for the brackets, its measure is NaN in ``history``, and it is
    never chosen unless every run failed.
    """
    _check(lo, hi, tol, max_runs)
    if not targets:
        raise ValueError("joint_search needs at least one target")
    lo_x, hi_x = math.log(lo), math.log(hi)
    points: list[tuple[float, float]] = []  # (log λ, achieved) per run; a failed run counts as emptied (0)
    failed: set[int] = set()

    def hit(target: float) -> bool:
        return any(abs(d - target) <= tol for i, (_, d) in enumerate(points) if i not in failed)

    while len(points) < max_runs:
        open_targets = [t for t in targets if not hit(t)]
        if not open_targets:
            break
        aims = [(*_candidate(points, t, tol, lo_x, hi_x), t) for t in open_targets]
        x, _, aim = max(aims, key=lambda item: item[1])  # the widest bracket first (first on ties)
        if any(abs(x - p) < 1e-9 for p, _ in points):  # run already: bisect that bracket instead
            (a, _), (b, _), _, _ = _bracket(points, aim, tol, lo_x, hi_x)
            x = (a + b) / 2
        measured = evaluate(math.exp(x))
        if measured is None:  # the run failed (diverged): a penalty too strong, as an emptied network
            failed.add(len(points))
            points.append((x, 0.0))
        else:
            points.append((x, float(measured)))
    history = [(math.exp(x), math.nan if i in failed else d) for i, (x, d) in enumerate(points)]
    # per budget: a run within tol of it ranks before any other (its miss is the smallest)
    chosen = [min(range(len(history)), key=lambda i: _miss([history[i][1]], [t], tol)) for t in targets]
    converged = [abs(history[i][1] - t) <= tol for i, t in zip(chosen, targets)]
    reason = "within tolerance" if all(converged) else f"all {max_runs} runs spent"
    return JointSearchResult(list(targets), chosen, converged, len(history), reason, history)
