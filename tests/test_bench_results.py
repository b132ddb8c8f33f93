"""The results page's arithmetic (benchmarks/bench_results.py): seeds summarised, the claim checked."""

import pytest


@pytest.fixture(scope="module")
def bench(benchmark_module):
    return benchmark_module("bench_results")


def _row(method, mode, error, feasible=True, achieved=0.1, epochs=3, wall=10.0, runs=1):
    return {
        "method": method, "mode": mode, "budget": 0.1, "lambda": "-", "achieved": achieved,
        "test_error": error, "feasible": feasible, "runs": runs, "wall_time_s": wall,
        "epochs_to_budget": epochs, "flops": 1000.0, "latency_ms": 0.5, "run_dir": "-",
    }  # fmt: skip


def test_seeds_are_summarised_by_mean_and_sample_deviation(bench):
    rows = [_row("l0", "constrained", e, epochs=ep) for e, ep in ((0.10, 2), (0.12, 4), (0.14, None))]
    (entry,) = bench.aggregate(rows)
    assert entry["test_error"] == pytest.approx(0.12)
    assert entry["test_error_sd"] == pytest.approx(0.02)  # sample sd of 0.10, 0.12, 0.14
    assert entry["seeds"] == 3 and entry["feasible"] == 3
    assert entry["epochs_to_budget"] is None and entry["never_met"] == 1  # one seed never met it


def test_the_claim_holds_only_when_the_constrained_run_is_feasible_at_no_cost(bench):
    def verdict(constrained, penalised):
        rows = [*constrained, *penalised]
        (check,) = bench.claim(bench.aggregate(rows))
        return check

    pen = [_row("l0", "penalized (bisect)", e, runs=5, wall=50.0) for e in (0.10, 0.10)]
    same = verdict([_row("l0", "constrained", e) for e in (0.10, 0.11)], pen)
    assert same["holds"] and same["wall_ratio"] == pytest.approx(5.0)
    worse = verdict([_row("l0", "constrained", e) for e in (0.13, 0.13)], pen)
    assert not worse["holds"] and "error 13.00 % vs the penalty's 10.00 %" in worse["why"]
    over = verdict([_row("l0", "constrained", 0.10, feasible=f) for f in (True, False)], pen)
    assert not over["holds"] and "over the budget in 1 of 2 seeds" in over["why"]
    # a penalty that missed the budget is not a match for the error comparison
    missed = [_row("l0", "penalized (bisect)", 0.05, feasible=False, achieved=0.3) for _ in range(2)]
    unmatched = verdict([_row("l0", "constrained", 0.13) for _ in range(2)], missed)
    assert unmatched["holds"] and not unmatched["comparable"]
