"""What the benchmark scripts share (benchmarks/_report.py): reading a run's log, reusing a run."""

import json

import pytest
import yaml

from constrained_sparsity import load_config

from .test_train import DIGITS


@pytest.fixture(scope="module")
def report(benchmark_module):
    return benchmark_module("_report")


def test_first_feasible_epoch_is_the_first_with_every_budget_met(report):
    history = [
        {"epoch": 1, "constraint/a/strict_violation": 0.2, "constraint/b/strict_violation": -0.1},
        {"epoch": 2, "constraint/a/strict_violation": 0.0, "constraint/b/strict_violation": 0.1},
        {"epoch": 3, "constraint/a/strict_violation": -0.01, "constraint/b/strict_violation": 0.0},
    ]
    assert report.first_feasible(history) == 3
    assert report.first_feasible(history[:2]) is None


def test_a_run_without_a_budget_has_no_first_feasible_epoch(report):
    assert report.first_feasible([{"epoch": e, "test/error": 0.1} for e in (1, 2)]) is None


def test_a_run_is_reused_only_with_the_same_config(report, tmp_path):
    cfg = load_config(DIGITS, ["train.threads=2"])
    run = tmp_path / "run"
    assert report.existing_run(run, cfg) is None  # nothing there
    run.mkdir()
    saved = cfg.to_dict()
    saved["train"]["threads"] = 1  # the thread count and where the run lives do not matter
    saved["tracking"]["out_dir"] = str(tmp_path / "elsewhere")
    (run / "config.yaml").write_text(yaml.safe_dump(saved))
    assert report.existing_run(run, cfg) is None  # no summary, no checkpoint
    (run / "checkpoint.pt").write_bytes(b"")
    assert report.existing_run(run, cfg) == "resumable"
    (run / "summary.json").write_text(json.dumps({"status": "interrupted"}))
    assert report.existing_run(run, cfg) == "resumable"
    (run / "summary.json").write_text(json.dumps({"status": "complete"}))
    assert report.existing_run(run, cfg) == "complete"
    other = load_config(DIGITS, ["train.epochs=3"])
    assert report.existing_run(run, other) is None  # another config: trained again
