"""The results page's arithmetic (benchmarks/bench_results.py): seeds summarised, the claim checked."""

import json

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


def _page_args(tmp_path, *more):
    return [
        "--setups", "digits", "--seeds", "0", "--methods", "l0", "lwc", "--epochs", "2", "--max-runs", "1",
        "--threads", "1", "--out", str(tmp_path / "out"), "--results", str(tmp_path / "results"),
        "--page", str(tmp_path / "results.md"), "--img", str(tmp_path / "img"), *more,
    ]  # fmt: skip


def _records(tmp_path):
    root = tmp_path / "results"
    return {p.parent.relative_to(root).as_posix(): p for p in root.rglob("record.json")}


@pytest.mark.slow
def test_the_results_folder_keeps_finished_runs_and_retrains_a_changed_config(bench, tmp_path, capsys):
    assert bench.main(_page_args(tmp_path)) == 0
    records = _records(tmp_path)
    # dense, l0's constrained run and its search's runs, lwc's projected run: no checkpoints kept
    assert {"digits/seed0/dense", "digits/seed0/l0/constrained-0.3", "digits/seed0/lwc/projected-0.3"} <= set(records)
    for record in records.values():
        assert sorted(p.name for p in record.parent.iterdir()) == [
            "config.yaml", "metrics.jsonl", "record.json", "summary.json"
        ]  # fmt: skip
        saved = json.loads(record.read_text())
        assert saved["commit"] and set(saved["measured"]) == {"params", "flops", "latency_ms"}
    stamps = {k: p.stat().st_mtime_ns for k, p in records.items()}
    page = (tmp_path / "results.md").read_text()
    assert "| l0 | constrained | 1 |" in page and "| lwc | projected | 1 |" in page and "Still missing" not in page
    capsys.readouterr()
    # --reuse: nothing trained again, the same page
    assert bench.main(_page_args(tmp_path, "--reuse")) == 0
    err = capsys.readouterr().err
    assert err.count("(kept") == len(records) and "(kept" in err
    assert {k: p.stat().st_mtime_ns for k, p in _records(tmp_path).items()} == stamps
    assert (tmp_path / "results.md").read_text().split("command:")[1].split("\n", 2)[2] == page.split("command:")[
        1
    ].split("\n", 2)[2]
    # a changed config (3 epochs): every run is trained again
    assert bench.main(_page_args(tmp_path, "--reuse", "--epochs", "3")) == 0
    err = capsys.readouterr().err
    assert "config changed, training again" in err and "(kept" not in err
    assert all(p.stat().st_mtime_ns != stamps[k] for k, p in _records(tmp_path).items() if k in stamps)


@pytest.mark.slow
def test_without_training_the_page_says_which_rows_are_missing(bench, tmp_path):
    assert bench.main(_page_args(tmp_path, "--methods", "lwc")) == 0  # lwc and dense only
    assert bench.main(_page_args(tmp_path, "--no-train")) == 0  # now l0 as well: not trained
    page = (tmp_path / "results.md").read_text()
    assert "**Still missing**" in page and "* digits seed 0: l0 (from digits/seed0/l0/" in page
    assert "| lwc | projected | 1 |" in page and "| l0 |" not in page
    assert not (tmp_path / "results" / "digits" / "seed0" / "l0").exists()


def test_epochs_to_a_budget_are_read_against_the_rows_budget_not_the_runs(bench, tmp_path):
    """A joint λ search's run serves every budget: its log is read against the row's budget."""
    (tmp_path / "summary.json").write_text(json.dumps({"targets": [{"metric": "density/model"}]}))
    rows = [{"epoch": 1, "density/model": 0.6}, {"epoch": 2, "density/model": 0.33}, {"epoch": 3, "density/model": 0.2}]
    rows.append({"epoch": 4, "finish/epoch": 4, "density/model": 0.05})  # the finishing phase does not count
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert bench._epochs_to(tmp_path, 0.5) == 2
    assert bench._epochs_to(tmp_path, 0.33) == 2  # as the training step decides it, in float32
    assert bench._epochs_to(tmp_path, 0.2) == 3
    assert bench._epochs_to(tmp_path, 0.1) is None


def test_a_failed_run_leaves_the_page_going_and_a_stop_signal_stops_it(bench):
    import constrained_sparsity as cs

    def diverges():
        raise cs.TrainingDiverged("loss became nan at epoch 24, step 1\nmore")

    def interrupted():
        raise cs.TrainingInterrupted("stopped", 15)

    failed = bench._or_missing(diverges)()
    assert isinstance(failed, bench.Failed) and str(failed) == "loss became nan at epoch 24, step 1"
    with pytest.raises(cs.TrainingInterrupted):
        bench._or_missing(interrupted)()


def test_a_diverged_run_is_kept_as_failed_and_not_trained_again(bench, tmp_path):
    import constrained_sparsity as cs
    from constrained_sparsity.jobs import Runner

    cfg = cs.load_config(
        "digits_mlp_l0",
        ["optim.primal.name=sgd", "optim.primal.lr=1e30", "sparsity.method=none", "train.epochs=1",
         "tracking.wandb=disabled", "tracking.progress=false"],
    )  # fmt: skip
    folder = bench.ResultsFolder(tmp_path / "out", tmp_path / "results", reuse=True)
    run_dir = tmp_path / "out" / "digits" / "seed0" / "dense"
    with pytest.raises(cs.TrainingDiverged, match="loss became"):
        Runner(1, 1, store=folder).train(cfg, run_dir)
    record = json.loads((tmp_path / "results" / "digits" / "seed0" / "dense" / "record.json").read_text())
    assert record["failed"].startswith("loss became") and record["key"] == bench.config_key(cfg)
    stamp = (tmp_path / "results" / "digits" / "seed0" / "dense" / "record.json").stat().st_mtime_ns
    with pytest.raises(cs.TrainingDiverged, match="loss became"):  # kept: not trained again
        Runner(1, 1, store=folder).train(cfg, run_dir)
    assert (tmp_path / "results" / "digits" / "seed0" / "dense" / "record.json").stat().st_mtime_ns == stamp


def test_the_claim_counts_the_penaltys_seeds_apart_from_the_constrained_rows(bench):
    """A constrained run that failed in two seeds leaves its row with one seed; the penalty's
    count stays its own (the page once wrote "3/1 seeds")."""
    rows = [_row("focuss", "constrained", 0.16)]
    rows += [_row("focuss", "penalized (bisect)", e) for e in (0.11, 0.112, 0.114)]
    (check,) = bench.claim(bench.aggregate(rows))
    assert check["seeds"] == 1 and check["penalty_seeds"] == 3 and check["penalty_feasible"] == 3


@pytest.mark.slow
def test_a_method_can_run_at_fewer_budgets_than_its_setup(bench, tmp_path, monkeypatch):
    """``budgets_of``: a method runs at the budgets named for it (LeNet-5: every method at 0.1,
    L0 at 0.05 too), the plan counts those, and the page says who did not run at a budget."""
    digits = {**bench.SETUPS["digits"], "budgets": [0.3, 0.5], "budgets_of": {"lwc": [0.3]}}
    monkeypatch.setitem(bench.SETUPS, "digits", digits)
    assert bench.budgets_of("digits", "l0") == [0.3, 0.5] and bench.budgets_of("digits", "lwc") == [0.3]
    args = bench.argparse.Namespace(max_runs=2)
    # dense; l0: two constrained runs and a joint search of 1-4 runs; lwc: one projected run
    assert bench._planned_runs("digits", ["l0", "lwc"], args) == (1 + 2 * 2 + 1, 1 + 2 * 3 + 1)
    assert bench.main(_page_args(tmp_path, "--max-runs", "1")) == 0
    records = set(_records(tmp_path))
    assert {"digits/seed0/lwc/projected-0.3", "digits/seed0/l0/constrained-0.5"} <= records
    assert "digits/seed0/lwc/projected-0.5" not in records
    page = (tmp_path / "results.md").read_text()
    assert "Not run at this budget, to fit the setup's time: lwc." in page.split("### ε = 0.5")[1]
    assert "Not run at this budget" not in page.split("### ε = 0.5")[0]
