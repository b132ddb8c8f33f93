"""What the benchmark scripts share (benchmarks/_report.py): reading a run's log, reusing a run,
continuing a run whose script was killed."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

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


def test_the_channels_last_inference_network_computes_the_same_outputs(report):
    """BatchNorm folded, conv weights stored NHWC: the eval network's outputs (1e-5), for any input layout."""
    import torch

    from constrained_sparsity.models import ResNet

    torch.manual_seed(0)
    net = ResNet(blocks=1, in_channels=1)
    for m in net.modules():  # running statistics away from 0 / 1, so that folding changes the weights
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    x = torch.randn(4, 1, 16, 16)
    with torch.no_grad():
        want = net.eval()(x)
        nhwc = report.inference_network(net, channels_last=True)
        assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in nhwc.modules())
        convs = [m for m in nhwc.modules() if isinstance(m, torch.nn.Conv2d)]
        assert convs and all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs)
        assert torch.allclose(nhwc(x), want, atol=1e-5)
        assert torch.allclose(nhwc(x.to(memory_format=torch.channels_last)), want, atol=1e-5)


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
    assert report.existing_run(run, cfg, same_threads=True) is None  # continued, it would run at 1 thread, not 2
    (run / "summary.json").write_text(json.dumps({"status": "interrupted"}))
    assert report.existing_run(run, cfg) == "resumable"
    (run / "summary.json").write_text(json.dumps({"status": "failed"}))
    assert report.existing_run(run, cfg) is None  # it diverged: it would again
    (run / "summary.json").write_text(json.dumps({"status": "complete"}))
    assert report.existing_run(run, cfg) == "complete"
    other = load_config(DIGITS, ["train.epochs=3"])
    assert report.existing_run(run, other) is None  # another config: trained again


KILLED_SCRIPT = """
import sys
from pathlib import Path

sys.path.insert(0, {bench!r})
import _report
from constrained_sparsity import load_config
from constrained_sparsity.jobs import Runner

out = Path({out!r})
cfg = load_config({config!r}, {overrides!r})
with Runner(2, 1, store=_report.KeptRuns(out, out / "kept", True)) as runner:
    runner.train(cfg, out / "runs" / "long")
"""


def _wait_for(check, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"waited {timeout_s:.0f} s for {what}")
        time.sleep(0.2)


def _children(pid: int) -> list[int]:
    tasks = Path(f"/proc/{pid}/task")
    return [int(c) for t in tasks.iterdir() for c in (t / "children").read_text().split()]


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads the process tree from /proc (Linux)")
def test_a_benchmark_killed_mid_run_continues_the_run_where_it_stopped(report, tmp_path):
    """A script killed outright (SIGKILL, as when a session ends): its worker stops the training
    with a checkpoint instead of training on unseen, and a second invocation with ``--reuse``
    continues that run from the checkpoint instead of starting it over."""
    overrides = ["train.epochs=60", "train.threads=1", "tracking.wandb=disabled", "tracking.progress=false"]
    bench = str(Path(report.__file__).parent)
    script = KILLED_SCRIPT.format(bench=bench, out=str(tmp_path), config=str(DIGITS), overrides=overrides)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    parent = subprocess.Popen([sys.executable, "-c", script], env=env, stderr=subprocess.PIPE)
    run_dir = tmp_path / "runs" / "long"
    log = run_dir / "metrics.jsonl"
    try:
        _wait_for(lambda: (run_dir / "checkpoint.pt").is_file() or parent.poll() is not None, 180, "a checkpoint")
        assert parent.poll() is None, parent.stderr.read().decode()
        workers = _children(parent.pid)
        parent.send_signal(signal.SIGKILL)
        parent.wait()
    finally:
        if parent.poll() is None:
            parent.kill()
    summary = run_dir / "summary.json"
    _wait_for(lambda: summary.is_file() and json.loads(summary.read_text())["status"] == "interrupted", 60,
              "the orphaned worker to stop its run")  # fmt: skip
    _wait_for(lambda: not any(Path(f"/proc/{w}").exists() and "zombie" not in _state(w) for w in workers), 60,
              "the orphaned workers to exit")  # fmt: skip
    stopped_at = max(json.loads(line)["epoch"] for line in log.read_text().splitlines() if "train/loss" in line)
    assert 1 <= stopped_at < 60

    cfg = load_config(DIGITS, overrides)
    store = report.KeptRuns(tmp_path, tmp_path / "kept", True)  # a second invocation
    assert not run_dir.exists() and (tmp_path / "kept" / "runs" / "long" / "checkpoint.pt").is_file()
    from constrained_sparsity.jobs import Runner

    said = []
    result = Runner(1, 1, store=store, say=said.append).train(cfg, run_dir)
    assert any("continuing the stopped run" in line for line in said)
    epochs = [json.loads(line)["epoch"] for line in log.read_text().splitlines() if "train/loss" in line]
    assert epochs == list(range(1, 61))  # the log cut back to the checkpoint, then carried on: each epoch once
    assert result.epochs == 60 and json.loads(summary.read_text())["status"] == "complete"
    assert report.existing_run(tmp_path / "kept" / "runs" / "long", cfg) == "complete"


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/status").read_text().split("State:", 1)[1].splitlines()[0].lower()
    except (FileNotFoundError, IndexError):
        return "zombie"


def test_a_stale_run_directory_is_cleared_before_its_run_is_trained_there(report, tmp_path):
    """A run of another config where the script trains (an earlier invocation's): cleared, so
    that the training does not refuse a directory that holds a run."""
    cfg = load_config(DIGITS)
    run_dir = tmp_path / "runs" / "dense"
    run_dir.mkdir(parents=True)
    saved = load_config(DIGITS, ["train.epochs=2"]).to_dict()
    (run_dir / "config.yaml").write_text(yaml.safe_dump(saved))
    (run_dir / "summary.json").write_text(json.dumps({"status": "complete"}))
    store = report.KeptRuns(tmp_path, tmp_path / "kept", True)
    assert store.get(cfg, run_dir) is None and not store.resume(cfg, run_dir)
    assert not run_dir.exists()


@pytest.mark.parametrize("method", ["l0_units", "l0"])
def test_a_budget_row_counts_what_compaction_left(report, method, tmp_path):
    """The unit method's own parameter and FLOP counts of the end state are the compact
    network's; a run without a unit method has none."""
    from constrained_sparsity import run

    overrides = ["train.epochs=1", "train.threads=1", f"sparsity.method={method}", "sparsity.targets=0.4"]
    overrides += ["tracking.wandb=disabled", "tracking.progress=false"]
    result = run(load_config(DIGITS, overrides), run_dir=tmp_path / "run")
    row = report.budget_row("run", result, 0.4)
    assert row["params"] < 17610 and row["flops"] > 0
    if method == "l0_units":
        assert (row["counted_params"], row["counted_flops"]) == (row["params"], row["flops"])
        assert row["measure_params"] == pytest.approx(row["params"], abs=0.5)
    else:
        assert row["counted_params"] is None and row["counted_flops"] is None
    table = report.budget_table([row])
    assert table[-1].startswith(f"| run | {100 * result.test_error:.2f} % |")
    assert table[-1].count("|") == table[0].count("|")


def test_the_dense_network_of_a_unit_gated_run_has_its_gates_folded_in(report, tmp_path):
    """No gate hook is left on the dense network that the latency is timed on, and it computes
    what the gated network and the compact one compute."""
    import torch

    from constrained_sparsity import run

    overrides = ["train.epochs=1", "train.threads=1", "sparsity.method=l0_units", "sparsity.targets=0.4"]
    overrides += ["tracking.wandb=disabled", "tracking.progress=false"]
    run(load_config(DIGITS, overrides), run_dir=tmp_path / "run")
    _, dataset, _, dense, small = report.dense_and_compact(tmp_path / "run")
    assert not any(m._forward_hooks or m._forward_pre_hooks or "forward" in m.__dict__ for m in dense.modules())
    x = dataset.test_x[:64]
    with torch.no_grad():
        torch.testing.assert_close(dense(x), small(x), rtol=0, atol=1e-5)


def test_a_run_saved_before_a_config_key_existed_is_the_same_run(report, tmp_path):
    """A key the configs gained since (``sparsity.equality``), at its default, is no change."""
    cfg = load_config(DIGITS)
    run = tmp_path / "run"
    run.mkdir()
    saved = cfg.to_dict()
    del saved["sparsity"]["equality"]
    (run / "config.yaml").write_text(yaml.safe_dump(saved))
    (run / "summary.json").write_text(json.dumps({"status": "complete"}))
    assert report.existing_run(run, cfg) == "complete"
    assert report.existing_run(run, load_config(DIGITS, ["sparsity.equality=true"])) is None
    saved["sparsity"]["targets"] = 7.0  # no longer a valid config: not the same run
    (run / "config.yaml").write_text(yaml.safe_dump(saved))
    assert report.existing_run(run, cfg) is None
