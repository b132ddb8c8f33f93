"""End-to-end runs on the embedded digits data: targets met, resume, W&B, failures, signals."""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import constrained_sparsity as cs
from constrained_sparsity import TrainingDiverged, load_config, run, scheduled_lr
from constrained_sparsity.training import load_checkpoint, save_checkpoint

from . import wandb_files

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "configs" / "digits_mlp_l0.yaml"
TOL = 0.02  # allowed excess density over the budget at the end of a run


def _run(overrides, **kwargs):
    return run(load_config(DIGITS, overrides), **kwargs)


@pytest.mark.slow
@pytest.mark.parametrize("eps", [0.2, 0.5])
def test_constrained_digits_meets_model_wise_target(quiet, eps):
    result = _run([*quiet, f"sparsity.targets={eps}"])
    assert result.density["model"] <= eps + TOL
    assert result.test_error < 0.2
    history = result.history
    assert history[0]["constraint/l0_model/strict_violation"] > 0  # dense at the start ...
    for row in history:  # ... and the multiplier pushes whenever the budget is clearly exceeded
        if row["constraint/l0_model/strict_violation"] > 0.01:
            assert row["constraint/l0_model/multiplier"] > 0, row["epoch"]
    summary = json.loads((result.run_dir / "summary.json").read_text())
    assert summary["status"] == "complete"
    assert summary["density"]["model"] == pytest.approx(result.density["model"])
    compaction = summary["compaction"]  # params and FLOPs before / after compaction
    assert compaction["params_after"] < compaction["params_before"] == 17610
    assert compaction["flops_after"] < compaction["flops_before"] == 2 * (64 * 100 + 100 * 100 + 100 * 10)


@pytest.mark.slow
def test_flop_budget_is_met_in_the_compact_networks_flops(quiet):
    result = _run([*quiet, "sparsity.weighting=flops", "sparsity.targets=0.3"])
    assert result.layers[0]["weighting"] == "flops" and result.density["model"] <= 0.3 + TOL
    compaction = json.loads((result.run_dir / "summary.json").read_text())["compaction"]
    # the exact FLOP measure of a chain is the compact network's share of the FLOPs
    flop_share = compaction["flops_after"] / compaction["flops_before"]
    assert flop_share == pytest.approx(result.density["model"], rel=1e-6)


@pytest.mark.slow
def test_layer_wise_targets_are_each_met(quiet):
    eps = [0.5, 0.3, 0.8]
    result = _run([*quiet, f"sparsity.targets={eps}"])
    assert [t["name"] for t in result.targets] == ["l0_fc1", "l0_fc2", "l0_fc3"]
    for layer, e in zip(["fc1", "fc2", "fc3"], eps):
        assert result.density[layer] <= e + TOL, (layer, result.density)


def test_an_equality_budget_reopens_the_gates_an_inequality_leaves_closed(quiet):
    """A dual step too large (SGD lr 0.5) closes nearly every gate by epoch 3. Under the
    inequality the multiplier is then 0 and nothing reopens them; under the equality it turns
    negative and the density comes back over the budget."""
    ends = {}
    for equality in (False, True):
        over = ["sparsity.targets=0.5", "optim.dual.lr=0.5", "train.epochs=6", "finish.enabled=false"]
        result = _run([*quiet, *over, f"sparsity.equality={str(equality).lower()}", "train.threads=1"])
        density = [row["density/model"] for row in result.history]
        multiplier = [row["constraint/l0_model/multiplier"] for row in result.history]
        assert density[2] < 0.05, density  # the collapse, in both runs
        ends[equality] = (density[3:], multiplier[2:])
    density, multiplier = ends[False]
    assert max(density) < 0.05 and min(multiplier) == 0.0
    density, multiplier = ends[True]
    assert max(density) >= 0.5 and min(multiplier) < 0


def test_penalized_run_keeps_multiplier_frozen(quiet):
    result = _run([*quiet, "sparsity.mode=penalized", "sparsity.lambdas=0.25", "train.epochs=3"])
    assert [row["constraint/l0_model/multiplier"] for row in result.history] == [0.25] * 3


def test_dense_baseline_runs(quiet):
    result = _run([*quiet, "sparsity.method=none", "train.epochs=2"])
    assert result.feasible is None and result.density == {}
    assert 0 <= result.test_error < 0.5


def test_every_run_draws_its_dynamics_and_the_report_names_the_file(quiet):
    from constrained_sparsity.training import format_report

    result = _run([*quiet, "sparsity.targets=[0.5,0.3,0.8]", "train.epochs=3"])
    path = Path(result.run_dir) / "dynamics.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000
    assert f"dynamics (measures, multipliers, error per epoch): {path}" in format_report(result)
    dense = _run([*quiet, "sparsity.method=none", "train.epochs=1"])  # no budget: the error alone
    assert (Path(dense.run_dir) / "dynamics.png").is_file()


def _state(run_dir):
    ckpt = load_checkpoint(Path(run_dir) / "checkpoint.pt")
    return ckpt["model"], ckpt["cmp"], ckpt["optimizer"]


def _assert_same(a, b):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            _assert_same(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _assert_same(x, y)
    else:
        assert a == b


@pytest.mark.parametrize("scheme,dual", [("alternating", "sgd"), ("extrapolation", "adam"), ("simultaneous", "nupi")])
def test_resume_equals_uninterrupted(tmp_path, quiet, scheme, dual):
    common = [*quiet, f"optim.scheme={scheme}", f"optim.dual.name={dual}", "train.deterministic=true"]
    full = _run([*common, "train.epochs=4"], run_dir=tmp_path / "full")
    _run([*common, "train.epochs=2"], run_dir=tmp_path / "part")
    resumed = run(resume=tmp_path / "part", overrides=["train.epochs=4"])
    assert resumed.epochs == 4
    _assert_same(_state(tmp_path / "full"), _state(tmp_path / "part"))
    strip = [{k: v for k, v in row.items() if k != "time/epoch_s"} for row in full.history]
    again = [{k: v for k, v in row.items() if k != "time/epoch_s"} for row in resumed.history]
    assert strip == again


def test_resume_refuses_changing_the_experiment(tmp_path, quiet):
    _run([*quiet, "train.epochs=1"], run_dir=tmp_path / "r")
    with pytest.raises(ValueError, match="override 'sparsity.targets' cannot change on --resume"):
        run(resume=tmp_path / "r", overrides=["sparsity.targets=0.1"])


def test_wandb_offline_run_holds_the_metrics(tmp_path):
    result = _run(["tracking.wandb=offline", "tracking.progress=false", "train.epochs=2"], run_dir=tmp_path / "r")
    offline = wandb_files.offline_run_dir(tmp_path / "r")
    rows = wandb_files.history(offline)
    finish_rows = [row for row in rows if "finish/epoch" in row]  # the finishing phase: 1 epoch
    rows = [row for row in rows if "finish/epoch" not in row]
    assert len(rows) == 2 and len(finish_rows) == 1, wandb_files.describe(offline)
    assert finish_rows[0]["epoch"] == 3 and "finish/test_error" in finish_rows[0]
    keys = set().union(*rows)
    for key in [
        "epoch",
        "train/loss",
        "train/lagrangian",
        "val/error",
        "time/epoch_s",
        "density/model",
        "density/fc1",
        "constraint/l0_model/violation",
        "constraint/l0_model/strict_violation",
        "constraint/l0_model/multiplier",
        "constraint/l0_model/feasible",
    ]:
        assert key in keys, key
    assert rows[-1]["density/model"] == pytest.approx(result.history[-1]["density/model"])
    config = wandb_files.run_config(offline)
    assert config["sparsity"]["targets"] == 0.3 and config["name"] == "digits_mlp_l0"
    assert result.wandb_dir is not None and str(offline) in result.wandb_dir


def test_nan_loss_stops_with_clear_error(quiet):
    # the main training is no phase: the message names none
    with pytest.raises(TrainingDiverged, match=r"loss became (nan|inf) at epoch 1, step \d+; training stopped"):
        _run([*quiet, "optim.primal.name=sgd", "optim.primal.lr=1e30", "sparsity.method=none"])


class _CountedReads(torch.Tensor):
    """A loss that counts how often its value is read back to the host (each a device
    synchronisation on an accelerator); the tensors computed from it count too."""

    reads = 0

    def _count(self, name):
        type(self).reads += 1
        return getattr(torch.Tensor, name)(self.as_subclass(torch.Tensor))

    def __float__(self):
        return self._count("__float__")

    def __bool__(self):
        return self._count("__bool__")

    def item(self):
        return self._count("item")

    def tolist(self):
        return self._count("tolist")


def test_the_loop_reads_the_loss_back_once_per_check_not_once_per_step(monkeypatch, quiet):
    from constrained_sparsity.training import loop

    real, calls = loop.train_step, []

    def counted(*args, **kwargs):
        result = real(*args, **kwargs)
        calls.append(1)
        return {**result, "loss": result["loss"].detach().as_subclass(_CountedReads)}

    monkeypatch.setattr(loop, "train_step", counted)
    _CountedReads.reads = 0
    result = _run([*quiet, "train.epochs=2", "train.select=last"])
    steps = len(calls)
    assert len(result.history) == 2 and steps > 2 * loop.CHECK_EVERY
    # per epoch played (2, and 1 of the finishing phase): a finiteness read per CHECK_EVERY
    # steps and one at its end, and its mean loss
    assert 0 < _CountedReads.reads <= steps // loop.CHECK_EVERY + 2 * 3 < steps


def test_a_nan_loss_names_the_step_it_first_happened_at(monkeypatch, quiet):
    """The check reads the losses back in batches: the step named is still the first bad one."""
    from constrained_sparsity.training import loop

    real, calls = loop.train_step, []

    def nan_at_third(*args, **kwargs):
        result = real(*args, **kwargs)
        calls.append(1)
        return {**result, "loss": torch.full_like(result["loss"], math.nan)} if len(calls) == 3 else result

    monkeypatch.setattr(loop, "train_step", nan_at_third)
    with pytest.raises(TrainingDiverged, match=r"loss became nan at epoch 1, step 3; training stopped"):
        _run([*quiet, "train.epochs=1"])


def test_nan_loss_keeps_last_good_checkpoint(tmp_path, quiet):
    _run([*quiet, "train.epochs=1"], run_dir=tmp_path / "r")
    ckpt_path = tmp_path / "r" / "checkpoint.pt"
    ckpt = load_checkpoint(ckpt_path)
    ckpt["model"]["fc2.parametrizations.weight.original"].fill_(float("inf"))
    save_checkpoint(ckpt, ckpt_path)
    before = ckpt_path.read_bytes()
    with pytest.raises(TrainingDiverged, match=f"last good checkpoint: {ckpt_path} \\(epoch 1\\)"):
        run(resume=tmp_path / "r", overrides=["train.epochs=2"])
    assert ckpt_path.read_bytes() == before
    assert len((tmp_path / "r" / "metrics.jsonl").read_text().splitlines()) == 1
    assert json.loads((tmp_path / "r" / "summary.json").read_text())["status"] == "failed"


def _cli(args, **kwargs):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen(
        [sys.executable, "-m", "constrained_sparsity", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kwargs,
    )


def test_cli_train_prints_report(tmp_path):
    proc = _cli(["train", str(DIGITS), "train.epochs=3", "tracking.wandb=disabled", "--run-dir", str(tmp_path / "r")])
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert f"run directory: {tmp_path / 'r'}" in out
    assert "feasible:" in out and "test error:" in out and "fc1" in out


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_writes_checkpoint_and_resume_finishes(tmp_path, sig):
    run_dir = tmp_path / "r"
    args = ["train", str(DIGITS), "train.epochs=500", "tracking.wandb=disabled", "--run-dir", str(run_dir)]
    proc = _cli(args)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 90
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 2):
        time.sleep(0.05)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig, err
    assert "checkpoint written" in err and f"csparse train --resume {run_dir}" in err
    assert "Traceback" not in err
    ckpt = load_checkpoint(run_dir / "checkpoint.pt")
    done = ckpt["epoch"]
    assert 2 <= done < 500
    stopped = json.loads((run_dir / "summary.json").read_text())  # a stopped run says so
    assert stopped["status"] == "interrupted" and stopped["epochs"] == done
    resumed = _cli(["train", "--resume", str(run_dir), f"train.epochs={done + 2}"])
    out, err = resumed.communicate(timeout=120)
    assert resumed.returncode == 0, err
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "complete"
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    epochs = [row["epoch"] for row in rows if "finish/epoch" not in row]
    assert epochs == list(range(1, done + 3))  # each epoch once, then the finishing phase's rows
    assert [row["epoch"] for row in rows if "finish/epoch" in row] == [done + 3]


@pytest.mark.slow
def test_interrupted_cosine_run_resumes_onto_the_same_curve(tmp_path):
    """SIGINT mid-run, resume with the same config: the final state equals an uninterrupted run's.

    The learning rate is a function of the step alone, so the resumed run continues the
    cosine curve where it stopped (mid-epoch included).
    """
    common = [
        "train.epochs=40",
        "optim.primal.schedule=cosine",
        "train.deterministic=true",
        "tracking.wandb=disabled",
        "tracking.progress=false",
    ]
    full = _cli(["train", str(DIGITS), *common, "--run-dir", str(tmp_path / "full")])
    _, err = full.communicate(timeout=300)
    assert full.returncode == 0, err
    proc = _cli(["train", str(DIGITS), *common, "--run-dir", str(tmp_path / "part")])
    metrics = tmp_path / "part" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 3):
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGINT, err
    assert load_checkpoint(tmp_path / "part" / "checkpoint.pt")["epoch"] < 40
    resumed = _cli(["train", "--resume", str(tmp_path / "part")])
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    _assert_same(_state(tmp_path / "full"), _state(tmp_path / "part"))


def test_select_last_feasible_returns_that_iterate(quiet):
    # A budget that restarts make the run cross back and forth: keep the last epoch that met it.
    result = _run(
        [*quiet, "sparsity.targets=0.3", "train.epochs=12", "train.select=last_feasible", "finish.enabled=false"]
    )
    feasible_epochs = [row["epoch"] for row in result.history if row["constraint/l0_model/feasible"]]
    assert feasible_epochs, "the run never met the budget; the test needs one that does"
    assert result.selected_epoch == feasible_epochs[-1]
    assert result.feasible is True
    row = result.history[result.selected_epoch - 1]
    assert result.test_error == row["test/error"]
    assert result.density["model"] == pytest.approx(row["density/model"])
    assert result.last_iterate["epoch"] == 12
    saved = load_checkpoint(result.run_dir / "selected_model.pt")
    assert saved["epoch"] == result.selected_epoch
    summary = json.loads((result.run_dir / "summary.json").read_text())
    assert summary["selected_epoch"] == result.selected_epoch


def test_select_best_feasible_ranks_by_validation_error(quiet):
    result = _run(
        [
            *quiet,
            "sparsity.targets=0.4",
            "train.epochs=10",
            "train.select=best_feasible",
            "data.val_fraction=0.2",
            "finish.enabled=false",
        ]
    )
    feasible = [row for row in result.history if row["constraint/l0_model/feasible"]]
    assert feasible
    best = min(feasible, key=lambda row: row["val/error"])
    assert result.selected_epoch == best["epoch"]
    assert result.val_error == best["val/error"]


def test_select_best_feasible_needs_a_validation_split():
    with pytest.raises(ValueError, match=r"train.select.*best_feasible.*val_fraction"):
        load_config(DIGITS, ["train.select=best_feasible"])


def test_cosine_schedule_closed_form_and_in_training(tmp_path, quiet):
    """scheduled_lr against the closed form; a run applies it to the weights, not the gates."""
    assert scheduled_lr(0.1, 0, 100, "cosine") == pytest.approx(0.1)
    assert scheduled_lr(0.1, 50, 100, "cosine") == pytest.approx(0.05)
    assert scheduled_lr(0.1, 100, 100, "cosine", final_factor=0.2) == pytest.approx(0.02)
    assert scheduled_lr(0.1, 25, 100, "cosine") == pytest.approx(0.1 * (1 + math.cos(math.pi / 4)) / 2)
    assert scheduled_lr(0.1, 37, 100, "constant") == 0.1
    overrides = ["train.epochs=2", "optim.primal.schedule=cosine", "optim.primal.gate_lr=0.05"]
    _run([*quiet, *overrides], run_dir=tmp_path / "r")
    ckpt = load_checkpoint(tmp_path / "r" / "checkpoint.pt")
    groups = ckpt["optimizer"]["primal_optimizer_states"][0]["param_groups"]
    steps = ckpt["global_step"]
    assert groups[0]["lr"] == pytest.approx(scheduled_lr(3e-3, steps - 1, steps, "cosine"))  # the last step's
    assert groups[1]["lr"] == 0.05


@pytest.mark.slow
def test_last_feasible_keeps_a_feasible_step_of_the_last_epoch(tmp_path, quiet):
    """The default digits run ends just over its budget (restarts make it hover at ε); the
    returned network is the last step of the last epoch that met it, not an earlier epoch."""
    from constrained_sparsity import error_rate
    from constrained_sparsity.runs import load_trained

    # Restarts make the digits run hover at ε; which epochs end over it, and which of their
    # steps meet it, depends on the CPU's float rounding. A first run finds the epochs E that
    # end over the budget after one that ended within it; a run of E epochs (constant learning
    # rate: the same trajectory) starts its last epoch feasible and ends it infeasible. The
    # latest E whose last epoch has a feasible step (the first step may already cross) is kept.
    probe = _run([*quiet, "finish.enabled=false"], run_dir=tmp_path / "probe")
    ends = [bool(h["constraint/l0_model/feasible"]) for h in probe.history if "train/loss" in h]
    crossings = [e + 1 for e in range(len(ends) - 1, 0, -1) if not ends[e] and ends[e - 1]]
    for epochs in crossings[:4]:
        shutil.rmtree(tmp_path / "r", ignore_errors=True)
        result = _run([*quiet, "train.select=last_feasible", f"train.epochs={epochs}"], run_dir=tmp_path / "r")
        assert result.last_iterate["feasible"] is False, "the test needs a run whose last epoch ends infeasible"
        if result.selected_step is not None:
            break
    assert result.selected_epoch == result.epochs and result.selected_step is not None
    assert result.feasible is True and result.density["model"] <= 0.3
    # the reported numbers are those of the weights written to selected_model.pt
    cfg, model, dataset = load_trained(tmp_path / "r")
    assert load_checkpoint(tmp_path / "r" / "selected_model.pt")["step"] == result.selected_step
    assert error_rate(model, dataset.test_x, dataset.test_y) == result.test_error
    layers = [model.fc1, model.fc2, model.fc3]  # input gates: each controls out_features weights
    active = sum(int(m.l0_gate.active().sum()) * m.out_features for m in layers)
    assert active / 17400 == pytest.approx(result.density["model"])
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["selected_step"] == result.selected_step


def test_a_checkpoint_of_another_format_version_is_refused_in_one_line(tmp_path, quiet):
    _run([*quiet, "train.epochs=1"], run_dir=tmp_path / "r")
    path = tmp_path / "r" / "checkpoint.pt"
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["version"] == 3
    ckpt["version"] = 2
    torch.save(ckpt, path)
    before = path.read_bytes()
    for args in (["train", "--resume", str(tmp_path / "r"), "train.epochs=2"], ["compact", str(tmp_path / "r")]):
        proc = _cli(args)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 2, err
        assert err.strip() == (
            f"error: {path}: checkpoint format version 2, but this version of constrained_sparsity reads version 3; "
            "train the run again with this version"
        )
    assert path.read_bytes() == before


def test_a_stop_on_an_epochs_last_step_resumes_and_logs_that_epoch(monkeypatch, tmp_path, quiet):
    """A stop signal that lands on the last step of an epoch (before the epoch's log row and
    checkpoint) leaves a checkpoint at step = steps per epoch; resuming ends that epoch and goes
    on, with the rows of a run that never stopped."""
    from constrained_sparsity.training import loop

    straight = _run([*quiet, "train.epochs=2"], run_dir=tmp_path / "straight")
    steps_per_epoch = math.ceil(len(cs.load_dataset("digits").train_y) / 64)
    real, calls = loop.train_step, []

    def stop_on_the_last_step(*args, **kwargs):
        result = real(*args, **kwargs)
        calls.append(1)
        if len(calls) == steps_per_epoch:
            os.kill(os.getpid(), signal.SIGTERM)
        return result

    monkeypatch.setattr(loop, "train_step", stop_on_the_last_step)
    with pytest.raises(cs.TrainingInterrupted):
        _run([*quiet, "train.epochs=2"], run_dir=tmp_path / "stopped")
    ckpt = load_checkpoint(tmp_path / "stopped" / "checkpoint.pt", ("epoch", "step_in_epoch"))
    assert (ckpt["epoch"], ckpt["step_in_epoch"]) == (0, steps_per_epoch)
    monkeypatch.setattr(loop, "train_step", real)
    resumed = run(resume=tmp_path / "stopped")
    assert [r["epoch"] for r in resumed.history] == [1, 2]
    for a, b in zip(straight.history, resumed.history):
        assert {k: v for k, v in a.items() if not k.startswith("time/")} == {
            k: v for k, v in b.items() if not k.startswith("time/")
        }
