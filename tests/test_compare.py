"""Penalised vs constrained comparison: bisection logic, files written, W&B group."""

import csv
import json
import math
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch
import yaml

from constrained_sparsity import load_config
from constrained_sparsity.compare import bisect_lambda, compare, parse_budget
from constrained_sparsity.training import load_checkpoint

from . import wandb_files
from .test_train import DIGITS, ROOT


def _toy(lam):
    # Monotone decreasing in lambda: density 0.5 - 0.1 log10(lambda); target 0.3 at lambda = 100.
    return [0.5 - 0.1 * math.log10(lam[0])]


def test_bisection_finds_lambda_in_the_expected_number_of_steps():
    calls = []

    def evaluate(lam):
        calls.append(lam[0])
        return _toy(lam)

    found = bisect_lambda(evaluate, [0.3], lo=1e-3, hi=1e3, tol=1e-3, max_runs=20)
    # log10 midpoints: 0, 1.5, 2.25, 1.875, 2.0625, 1.96875, 2.015625, 1.9921875 (|miss| 7.8e-4)
    expected = [0, 1.5, 2.25, 1.875, 2.0625, 1.96875, 2.015625, 1.9921875]
    assert found.converged and found.runs == 8 and len(calls) == 8
    assert [math.log10(c) for c in calls] == pytest.approx(expected)
    assert abs(found.value[0] - 0.3) <= 1e-3
    assert found.reason == "within tolerance"


def test_bisection_stops_at_the_budget_and_says_so():
    found = bisect_lambda(_toy, [0.3], lo=1e-3, hi=1e3, tol=1e-3, max_runs=4)
    assert not found.converged and found.runs == 4
    assert found.reason == "all 4 runs spent"
    # best of the 4 points that meet the budget (value <= 0.3 + tol): log10 = 2.25 (value 0.275)
    assert math.log10(found.lam[0]) == pytest.approx(2.25)


def test_bisection_per_coordinate():
    def evaluate(lam):
        return [_toy([lam[0]])[0], 1.0 / (1.0 + lam[1])]

    found = bisect_lambda(evaluate, [0.3, 0.25], lo=1e-3, hi=1e3, tol=2e-3, max_runs=30)
    assert found.converged
    assert found.value[0] == pytest.approx(0.3, abs=2e-3) and found.value[1] == pytest.approx(0.25, abs=2e-3)


def test_bisection_rejects_bad_arguments():
    with pytest.raises(ValueError, match="0 < lo < hi"):
        bisect_lambda(_toy, [0.3], lo=1.0, hi=0.5)
    with pytest.raises(ValueError, match="max_runs=0"):
        bisect_lambda(_toy, [0.3], max_runs=0)


def test_parse_budget():
    assert parse_budget("0.3") == 0.3
    assert parse_budget("0.5,0.3,0.8") == [0.5, 0.3, 0.8]
    with pytest.raises(ValueError, match="--targets 'x'"):
        parse_budget("x")


def _png_ok(path: Path) -> tuple[int, int]:
    """Check the PNG signature and every chunk's CRC; return (width, height)."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", path
    pos, chunks = 8, []
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind = data[pos + 4 : pos + 8]
        body = data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        assert zlib.crc32(kind + body) == crc, (path, kind)
        chunks.append(kind)
        pos += 12 + length
    assert chunks[0] == b"IHDR" and chunks[-1] == b"IEND" and b"IDAT" in chunks
    return struct.unpack(">II", data[16:24])


@pytest.mark.slow
def test_small_digits_comparison_end_to_end(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = load_config(DIGITS, ["train.epochs=4", "tracking.progress=false", "tracking.wandb=offline"])
    result = compare(
        cfg,
        [0.3, 0.5],
        lambdas=[0.05, 0.5],
        bisect=True,
        search="per-budget",
        max_runs=2,
        out_dir=tmp_path / "cmp",
        progress=None,
    )
    out = result.out_dir
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [(r["mode"], r["search"].split()[0]) for r in rows] == [
        ("constrained", "-"),
        ("constrained", "-"),
        ("penalized", "grid"),
        ("penalized", "grid"),
        ("penalized", "bisect"),
        ("penalized", "bisect"),
    ]
    assert [r["target"] for r in rows] == ["0.3", "0.5", "-", "-", "0.3", "0.5"]
    assert [r["lambda"] for r in rows[2:4]] == ["0.05", "0.5"]
    assert [r["runs_used"] for r in rows] == ["1", "1", "1", "1", "2", "2"]
    for r in rows:
        assert 0.0 <= float(r["achieved"]) <= 1.0 and 0.0 <= float(r["test_error"]) <= 1.0
    for r, budget in zip(rows[4:], ("0.3", "0.5")):  # the reason the search stopped is the one its runs show
        found = result.bisections[budget]
        assert found.value[0] == pytest.approx(float(r["achieved"]), abs=1e-4)
        close = abs(float(r["achieved"]) - float(budget)) <= 0.01  # the L0 tolerance
        assert found.converged == close
        assert r["search"] == ("bisect (within tolerance)" if close else "bisect (all 2 runs spent)")
    md = (out / "results.md").read_text().splitlines()
    assert md[0].startswith("| mode | search | target") and len(md) == 2 + len(rows)
    pngs = sorted(p.name for p in out.glob("*.png"))
    # one dynamics plot per run: 2 constrained + 2 grid + 2 x 2 bisection
    assert len(pngs) == 1 + 8 and "error_vs_density.png" in pngs
    for png in out.glob("*.png"):
        width, height = _png_ok(png)
        assert width > 300 and height > 300
    # W&B: every run of the comparison shares the group; job types say which method
    groups, job_types = set(), []
    for run_dir in sorted((out / "runs").iterdir()):
        wb = wandb_files.offline_run_dir(run_dir)
        record = wandb_files.run_record(wb)
        groups.add(record.run_group)
        job_types.append(record.job_type)
    assert len(groups) == 1 and groups.pop().startswith("compare-")
    assert sorted(set(job_types)) == ["constrained", "penalized"]
    table_run = wandb_files.offline_run_dir(out)
    assert wandb_files.run_record(table_run).job_type == "comparison"
    (logged,) = [row for row in wandb_files.history(table_run) if "comparison/results/_type" in row]
    assert logged["comparison/results/_type"] == "table-file"
    table = json.loads((table_run / "files" / logged["comparison/results/path"]).read_text())
    assert table["columns"][:3] == ["mode", "search", "target"] and len(table["data"]) == len(rows)


def test_compare_cli_rejects_a_config_without_budget(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "constrained_sparsity",
            "compare",
            str(DIGITS),
            "sparsity.method=none",
            "--targets",
            "0.3",
            "--out",
            str(tmp_path / "c"),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "declares no sparsity budget" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_per_layer_targets_and_layer_budgets_compare(tmp_path):
    cfg = load_config(DIGITS, ["train.epochs=2", "tracking.progress=false", "tracking.wandb=disabled"])
    result = compare(
        cfg,
        [parse_budget("0.5,0.3,0.8")],
        lambdas=[0.1],
        bisect=True,
        max_runs=1,
        out_dir=tmp_path / "l0",
        progress=None,
    )
    bisect_row = result.rows[-1]
    assert isinstance(bisect_row["achieved"], list) and len(bisect_row["achieved"]) == 3
    assert isinstance(bisect_row["lambda"], list) and len(bisect_row["lambda"]) == 3  # one λ per layer
    assert set(bisect_row["per_layer"]) == {"fc1", "fc2", "fc3"}

    deep = load_config(
        ROOT / "configs" / "digits_deep_mlp_layers.yaml",
        ["train.epochs=2", "tracking.progress=false", "tracking.wandb=disabled", "sparsity.layers.refit_epochs=0"],
    )
    result = compare(deep, [2], lambdas=[0.0], out_dir=tmp_path / "layers", progress=None)
    constrained, grid = result.rows
    assert constrained["mode"] == "constrained" and constrained["target"] == 2
    assert grid["lambda"] == 0.0 and grid["achieved"] == 6.0  # λ = 0 merges nothing
    assert "active layers" in (tmp_path / "layers" / "results.md").read_text()


def test_compare_refuses_bad_budgets_before_running(tmp_path):
    cfg = load_config(DIGITS, ["tracking.wandb=disabled"])
    with pytest.raises(ValueError, match=r"epsilon 1.5 is outside \[0, 1\]"):
        compare(cfg, [0.3, 1.5], out_dir=tmp_path / "c", progress=None)
    with pytest.raises(ValueError, match="lambdas"):
        compare(cfg, [0.3], lambdas=[-1.0], out_dir=tmp_path / "c", progress=None)
    assert not (tmp_path / "c").exists()


def test_a_density_of_exactly_the_budget_is_feasible_as_the_training_step_decides():
    from constrained_sparsity.lambda_search import within as _within

    exact = float(torch.tensor(348 / 1740, dtype=torch.float32))  # 0.2 in float32: 0.20000000298...
    assert exact > 0.2 and _within(exact, 0.2)
    assert not _within(349 / 1740, 0.2)


def test_a_method_without_a_penalty_is_compared_without_a_lambda_search(tmp_path):
    """LWC meets its budget by construction: a lambda grid or bisection would search nothing."""
    from constrained_sparsity.errors import ConfigError

    cfg = load_config(ROOT / "configs" / "digits_mlp_lwc.yaml")
    for options in ({"bisect": True}, {"lambdas": [0.1]}):
        with pytest.raises(ConfigError, match="lwc meets its budget by construction .* without --lambdas"):
            compare(cfg, [0.3], out_dir=tmp_path / "c", progress=None, **options)
    assert not (tmp_path / "c").exists()


@pytest.mark.slow
def test_several_methods_compare_on_one_page_through_the_command_line(tmp_path):
    """``csparse compare CONFIG --methods l0 cges lwc``: each method's constrained run and
    λ search (LWC, with no penalty: its projected run only), one joint table with the time
    each needed (a bisection: all its runs), one plot, one directory per method."""
    out = tmp_path / "cmp"
    cmd = [
        sys.executable, "-m", "constrained_sparsity", "compare", str(DIGITS), "train.epochs=2",
        "tracking.progress=false", "tracking.wandb=disabled",
        "--methods", "l0", "cges", "lwc", "--targets", "0.4", "--bisect", "--max-runs", "2", "--out", str(out),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [(r["label"], r["mode"], r["search"].split()[0]) for r in rows] == [
        ("l0", "constrained", "-"),
        ("l0", "penalized", "joint"),
        ("cges", "constrained", "-"),
        ("cges", "penalized", "joint"),
        ("lwc", "projected", "-"),
    ]
    assert "method lwc (digits_mlp_l0; no penalty: projected runs only)" in proc.stderr
    assert float(rows[-1]["achieved"]) <= 0.4 + 1e-6 and rows[-1]["feasible"] == "True"  # by construction
    for label in ("l0", "cges", "lwc"):  # each method's own comparison, with its runs
        own = list(csv.DictReader((out / label / "results.csv").open()))
        assert [r["run_dir"] for r in own] == [r["run_dir"] for r in rows if r["label"] == label]
        assert json.loads((Path(own[0]["run_dir"]) / "summary.json").read_text())["methods"][0].startswith(label)
    bisect_rows = [r for r in rows if r["mode"] == "penalized"]
    assert all(r["runs_used"] == "2" for r in bisect_rows)
    for r in rows:  # the wall time is that of the runs the row needed
        summaries = [json.loads(p.read_text()) for p in (out / r["label"] / "runs").glob("*/summary.json")]
        own = [s["wall_time_s"] for s in summaries if r["search"] == "-" and s["run_dir"] == r["run_dir"]]
        if own:
            assert float(r["wall_time_s"]) >= own[0] - 0.05
    width, height = _png_ok(out / "error_vs_density.png")
    assert width > 300 and height > 300
    table = proc.stdout
    assert "| l0 | constrained | 0.4 |" in table and "| cges | penalized (joint) | 0.4 |" in table
    assert "| lwc | projected | 0.4 |" in table


def test_compare_refuses_mixing_layer_counts_with_densities(tmp_path):
    from constrained_sparsity.compare import compare_methods
    from constrained_sparsity.errors import ConfigError

    cfgs = [load_config(DIGITS), load_config(ROOT / "configs" / "digits_deep_mlp_layers.yaml")]
    with pytest.raises(ConfigError, match="layer counts and densities"):
        compare_methods(cfgs, [0.3], out_dir=tmp_path / "x", progress=None)
    assert not (tmp_path / "x").exists()  # nothing written


def test_bisection_starts_in_the_methods_own_bracket_unless_given_one(tmp_path):
    """CGES's lambda multiplies weight norms: its bracket (1e-6, 1e-1) is not L0's (1e-3, 1e2)."""
    from constrained_sparsity.methods.cges import CGES
    from constrained_sparsity.methods.l0 import L0Gates

    assert CGES.spec.lambda_range == (1e-6, 1e-1) and L0Gates.spec.lambda_range == (1e-3, 1e2)
    cfg = load_config(
        ROOT / "configs" / "digits_mlp_cges.yaml",
        ["train.epochs=1", "tracking.progress=false", "tracking.wandb=disabled", "finish.enabled=false"],
    )
    first = {}
    for label, bracket in (("own", None), ("given", (1e-2, 1.0))):
        result = compare(
            cfg, [0.3], bisect=True, max_runs=1, lambda_range=bracket, out_dir=tmp_path / label, progress=None
        )
        first[label] = next(r["lambda"] for r in result.rows if r["mode"] == "penalized")
    assert first["own"] == pytest.approx(10**-3.5)  # the geometric middle of (1e-6, 1e-1)
    assert first["given"] == pytest.approx(0.1)


@pytest.mark.slow
def test_two_jobs_give_the_runs_of_one_job_bit_for_bit(tmp_path):
    """``jobs=2`` trains in two worker processes what ``jobs=1`` trains in order, at the same
    thread count: the same rows and the same networks, bit for bit (train.deterministic)."""
    cfg = load_config(
        DIGITS, ["train.epochs=3", "train.deterministic=true", "tracking.progress=false", "tracking.wandb=disabled"]
    )
    lines = []
    found = {}
    for jobs in (1, 2):
        found[jobs] = compare(
            cfg, [0.3, 0.5], bisect=True, max_runs=1, jobs=jobs, threads=1, out_dir=tmp_path / f"j{jobs}",
            progress=lines.append,
        )  # fmt: skip
    one, two = found[1].rows, found[2].rows
    assert [r["label"] for r in one] == [r["label"] for r in two]
    for a, b in zip(one, two):
        assert (a["achieved"], a["test_error"], a["lambda"], a["runs_used"]) == (
            b["achieved"], b["test_error"], b["lambda"], b["runs_used"],
        )  # fmt: skip
    runs = sorted(p.name for p in (tmp_path / "j1" / "runs").iterdir())
    assert runs == sorted(p.name for p in (tmp_path / "j2" / "runs").iterdir()) and len(runs) == 4
    for name in runs:
        a = load_checkpoint(tmp_path / "j1" / "runs" / name / "checkpoint.pt")["model"]
        b = load_checkpoint(tmp_path / "j2" / "runs" / name / "checkpoint.pt")["model"]
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
        assert yaml.safe_load((tmp_path / "j2" / "runs" / name / "config.yaml").read_text())["train"]["threads"] == 1
    finished = [line for line in lines if line.startswith("[") and "test error" in line]
    assert len(finished) == 8 and finished[-1].startswith("[4/4]")  # one line per run, k of N


def test_jobs_and_threads_are_checked_before_anything_runs(tmp_path):
    from constrained_sparsity.errors import ConfigError

    cfg = load_config(DIGITS)
    for kwargs, match in (({"jobs": 0}, "--jobs 0"), ({"threads": 0}, "--threads 0"), ({"search": "x"}, "--search")):
        with pytest.raises(ConfigError, match=match):
            compare(cfg, [0.3], out_dir=tmp_path / "x", progress=None, **kwargs)
    assert not (tmp_path / "x").exists()


def test_every_kind_of_row_has_one_mode_and_a_place_on_both_plots():
    """One rule names a row's mode for the tables and both plots; a joint search's rows are
    plotted too, and a per-layer budget sits at its mean on both plots."""
    from constrained_sparsity.compare.outputs import MARKERS, mode_label, row_kind, x_value

    rows = [
        {"mode": "constrained", "search": "-"},
        {"mode": "projected", "search": "-"},
        {"mode": "penalized", "search": "grid"},
        {"mode": "penalized", "search": "bisect (within tolerance)"},
        {"mode": "penalized", "search": "joint (within tolerance; 5 runs for 3 budgets)"},
    ]
    assert [mode_label(r) for r in rows] == [
        "constrained",
        "projected",
        "penalized (grid)",
        "penalized (bisect)",
        "penalized (joint)",
    ]
    assert all(row_kind(r) in MARKERS for r in rows)
    assert x_value({"achieved": [0.2, 0.4]}) == pytest.approx(0.3) and x_value({"achieved": 0.25}) == 0.25


def test_a_plans_files_leave_out_a_task_that_made_nothing(tmp_path):
    """The results page finishes a method's plan from the tasks that trained; a task that
    failed (None) is left out of the table, not the whole method."""
    from constrained_sparsity.compare.method import method_of
    from constrained_sparsity.compare.search import SearchOptions, SearchPlan, shared_runner

    cfg = load_config(DIGITS, ["train.epochs=1", "tracking.progress=false", "tracking.wandb=disabled"])
    options = SearchOptions([0.3, 0.5], (), False, "joint", None, 2, None)
    with shared_runner(None, 1, 1, None) as runner:
        plan = SearchPlan(cfg, method_of(cfg), options, tmp_path, "group", runner)
        tasks = plan.tasks()
        comparison = plan.finish([tasks[0](), None])
    assert [row["target"] for row in comparison.rows] == [0.3]
    assert (tmp_path / "results.md").read_text().count("\n") == 3  # header, rule, one row
