"""The joint λ search against the per-budget bisection, on synthetic monotone density curves."""

import math
import random

import pytest

from constrained_sparsity.lambda_search import bisect_lambda, joint_search

BUDGETS = [0.1, 0.33, 0.5]
LO, HI, TOL = 1e-3, 1e2, 0.01


def _logistic(center: float, slope: float, top: float):
    """Density falling from ``top`` to 0 around ``center`` (a penalised run's curve, in shape)."""
    return lambda lam: top / (1.0 + (lam / center) ** slope)


CURVES = {
    "l0-like": _logistic(0.3, 1.0, 0.9),
    "gentle": _logistic(0.05, 0.7, 1.0),
    "steep": _logistic(2.0, 2.0, 0.8),
    "low": _logistic(0.01, 0.5, 0.95),
    "high": _logistic(10.0, 1.5, 1.0),
    "exponential": lambda lam: 0.9 * math.exp(-lam / 0.8),
}


def _per_budget_runs(curve, budgets, max_runs=8):
    found = [bisect_lambda(lambda lam: [curve(lam[0])], [b], LO, HI, TOL, max_runs) for b in budgets]
    return sum(f.runs for f in found), all(f.converged for f in found)


@pytest.mark.parametrize("name", list(CURVES))
def test_the_joint_search_reaches_every_budget_in_fewer_runs_than_bisection(name):
    curve = CURVES[name]
    calls = []

    def evaluate(lam):
        calls.append(lam)
        return curve(lam)

    found = joint_search(evaluate, BUDGETS, LO, HI, TOL, max_runs=8 * len(BUDGETS))
    per_budget, bisect_converged = _per_budget_runs(curve, BUDGETS)
    assert bisect_converged and all(found.converged)
    assert found.runs == len(calls) < per_budget
    for budget, (lam, value), i in zip(BUDGETS, zip(found.lam, found.value), found.chosen):
        assert abs(value - budget) <= TOL and value == curve(lam) and found.history[i] == (lam, value)


def test_over_all_curves_the_joint_search_needs_at_most_two_thirds_of_the_runs():
    joint = sum(joint_search(c, BUDGETS, LO, HI, TOL, 24).runs for c in CURVES.values())
    bisect = sum(_per_budget_runs(c, BUDGETS)[0] for c in CURVES.values())
    assert joint <= 2 / 3 * bisect, (joint, bisect)


def test_the_search_never_leaves_the_lambda_range():
    # budgets the range cannot reach on either side: the search presses on its ends, never past
    curve = _logistic(1.0, 1.0, 0.9)
    seen = []

    def evaluate(lam):
        seen.append(lam)
        return curve(lam)

    found = joint_search(evaluate, [0.0001, 0.95], 1e-2, 1e1, TOL, max_runs=30)
    assert all(1e-2 < lam < 1e1 for lam in seen) and found.runs == 30
    assert not any(found.converged) and found.reason == "all 30 runs spent"


def test_a_noisy_curve_still_converges_inside_the_range():
    rng = random.Random(0)
    curve = CURVES["l0-like"]
    seen = []

    def evaluate(lam):
        seen.append(lam)
        return max(0.0, curve(lam) + rng.uniform(-0.008, 0.008))

    found = joint_search(evaluate, BUDGETS, LO, HI, TOL, max_runs=24)
    assert all(found.converged) and all(LO < lam < HI for lam in seen)


def test_an_unconverged_budget_reports_the_closest_feasible_miss():
    curve = CURVES["steep"]
    found = joint_search(curve, BUDGETS, LO, HI, tol=1e-4, max_runs=4)
    assert found.runs == 4 and found.reason == "all 4 runs spent"
    for budget, i, converged in zip(BUDGETS, found.chosen, found.converged):
        if converged:
            continue
        values = [d for _, d in found.history]
        feasible = [d for d in values if d <= budget + 1e-4]
        expected = (
            min(feasible, key=lambda d: abs(d - budget)) if feasible else min(values, key=lambda d: abs(d - budget))
        )
        assert found.history[i][1] == expected


def test_the_search_rejects_bad_arguments():
    with pytest.raises(ValueError, match="0 < lo < hi"):
        joint_search(CURVES["gentle"], BUDGETS, lo=1.0, hi=0.5)
    with pytest.raises(ValueError, match="max_runs=0"):
        joint_search(CURVES["gentle"], BUDGETS, max_runs=0)
    with pytest.raises(ValueError, match="at least one target"):
        joint_search(CURVES["gentle"], [])


def test_failed_runs_count_as_a_penalty_too_strong_and_are_never_chosen():
    """A run that diverges (evaluate returns None) above some λ: both searches lower λ and land."""
    curve = CURVES["l0-like"]
    calls = []

    def fragile(lam):
        calls.append(lam)
        return None if lam > 1.0 else curve(lam)

    found = joint_search(fragile, BUDGETS, LO, HI, TOL, max_runs=24)
    assert found.converged == [False, True, True]  # 0.1 needs λ ~ 2.4: only failed runs reach it
    assert all(not math.isnan(v) for v in found.value) and any(lam > 1.0 for lam in calls)
    assert all(math.isnan(d) for lam, d in found.history if lam > 1.0)
    bisected = bisect_lambda(lambda lam: None if lam[0] > 1.0 else [curve(lam[0])], [0.33], LO, HI, TOL, 12)
    assert bisected.converged and abs(bisected.value[0] - 0.33) <= TOL
    everything_fails = bisect_lambda(lambda lam: None, [0.33], LO, HI, TOL, 3)
    assert not everything_fails.converged and math.isnan(everything_fails.value[0])
