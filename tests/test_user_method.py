"""A method written outside the package (tests/l1_method.py) trains with no change to package
code: through the Python API and through a YAML config naming it as ``module:Class``."""

import json
import subprocess
import sys

import pytest
import torch
import yaml

import constrained_sparsity as cs
from constrained_sparsity.methods import method_spec
from constrained_sparsity.training import load_checkpoint

from .l1_method import SoftThresholdL1
from .test_train import ROOT

SPEC = "tests.l1_method:SoftThresholdL1"
CONFIG = {
    "name": "digits_l1",
    "data": {"name": "digits", "batch_size": 64},
    "model": {"name": "mlp", "hidden": [100, 100]},
    "sparsity": {"method": SPEC, "mode": "constrained", "targets": 0.2, "dual_restarts": False, "delta": 1e-4},
    "optim": {"primal": {"name": "adam", "lr": 0.003}, "dual": {"name": "sgd", "lr": 0.003}},
    "train": {"epochs": 25},
}


def _brute_force_density(model, delta=1e-4):
    weights = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
    return sum(int((w.abs() > delta).sum()) for w in weights) / sum(w.numel() for w in weights)


def _train(problem, optimizer, data, epochs):
    problem.model.train()
    for epoch in range(epochs):
        for x, y in cs.data.batches(data.train_x, data.train_y, 64, torch.Generator().manual_seed(epoch)):
            cs.train_step(problem, optimizer, x, y, dual_restarts=False)


@pytest.mark.slow
def test_python_api_constrained_meets_the_budget():
    torch.manual_seed(0)
    digits = cs.load_dataset("digits")
    model = cs.MLP(64, [100, 100], 10)
    method = SoftThresholdL1(model)
    problem = cs.SparsityProblem(model, method, [cs.Target(0.2)])
    assert problem.targets[0].name == "l1_model" and problem.targets[0].method is method
    optimizer = cs.build_optimizer(problem, cs.PrimalOptimizer("adam", lr=3e-3), cs.DualOptimizer("sgd", lr=3e-3))
    _train(problem, optimizer, digits, 25)
    _, exact = method.measure(problem.targets[0])
    assert exact.item() == pytest.approx(_brute_force_density(model))  # the measure counts the weights
    assert exact.item() <= 0.2
    assert problem.multiplier_values()["l1_model"] > 0  # the budget was pushed on, and still is
    assert method.steps == 25 * 23  # after_step ran once per step
    assert cs.error_rate(model, digits.test_x, digits.test_y) < 0.15


def test_python_api_penalized_thresholds_by_lr_times_lambda():
    torch.manual_seed(0)
    digits = cs.load_dataset("digits")
    x, y = digits.train_x[:64], digits.train_y[:64]
    for lam in (0.0, 2.0):
        model = cs.MLP(64, [100, 100], 10)
        method = SoftThresholdL1(model)
        problem = cs.SparsityProblem(model, method, [cs.Target(0.2, lam=lam)], mode="penalized")
        optimizer = cs.build_optimizer(problem, cs.PrimalOptimizer("sgd", lr=0.05))
        before = {n: w.detach().clone() for n, w in method.weights.items()}
        density_before = _brute_force_density(model)
        model.train()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        grads = torch.autograd.grad(loss, [method.weights[n] for n in before])
        cs.train_step(problem, optimizer, x, y)
        assert problem.multiplier_values() == {"l1_model": lam}
        # one SGD step, then the soft-threshold of lr * lambda: the proximal gradient step
        for (name, w0), g in zip(before.items(), grads):
            moved = w0 - 0.05 * g
            want = moved.sign() * (moved.abs() - 0.05 * lam).clamp(min=0.0)
            torch.testing.assert_close(method.weights[name].detach(), want, rtol=1e-5, atol=1e-6)
        _, exact = method.measure(problem.targets[0])
        assert exact.item() == pytest.approx(_brute_force_density(model))
        if lam > 0:  # a threshold of 0.1 closes the weights the step left under it
            assert exact.item() < density_before - 0.3


def _config_file(tmp_path, **sparsity):
    data = json.loads(json.dumps(CONFIG))
    data["sparsity"].update(sparsity)
    path = tmp_path / "digits_l1.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.slow
def test_yaml_config_names_the_method_as_module_colon_class(tmp_path, quiet):
    result = cs.run(cs.load_config(_config_file(tmp_path), quiet))
    assert result.methods == [SPEC] == [method_spec(SoftThresholdL1)]
    assert result.feasible is True and result.targets[0]["exact"] <= 0.2
    assert result.test_error < 0.15
    rows = result.history
    assert [row["l1/steps"] for row in rows] == [23 * e for e in range(1, 26)]
    assert rows[0]["constraint/l1_model/strict_violation"] > 0 and rows[0]["constraint/l1_model/multiplier"] > 0
    saved = yaml.safe_load((result.run_dir / "config.yaml").read_text())
    assert saved["sparsity"]["method"] == SPEC and saved["sparsity"]["delta"] == 1e-4  # its options, resolved
    # penalized: the multiplier stays at lambda
    result = cs.run(
        cs.load_config(
            _config_file(tmp_path), [*quiet, "sparsity.mode=penalized", "sparsity.lambdas=1.0", "train.epochs=3"]
        )
    )
    assert [row["constraint/l1_model/multiplier"] for row in result.history] == [1.0] * 3
    assert (
        result.history[-1]["constraint/l1_model/strict_violation"]
        < result.history[0]["constraint/l1_model/strict_violation"]
    )


def test_cli_with_a_users_method_and_its_option_errors(tmp_path):
    path = _config_file(tmp_path)
    common = ["tracking.wandb=disabled", "tracking.progress=false"]
    cmd = [sys.executable, "-m", "constrained_sparsity", "train", str(path), "train.epochs=2", *common]
    proc = subprocess.run(
        [*cmd, "--run-dir", str(tmp_path / "r")], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert "constraint l1_model: exact density" in proc.stdout and "compact network:" in proc.stdout
    proc = subprocess.run([*cmd, "sparsity.delta=-1"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip() == "error: sparsity.delta=-1: should be >= 0"
    proc = subprocess.run([*cmd, "sparsity.dleta=1"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2 and "unknown config key 'sparsity.dleta'; did you mean sparsity.delta?" in proc.stderr


def test_resume_restores_the_methods_state_outside_the_model(tmp_path, quiet):
    common = [*quiet, "train.deterministic=true"]
    full = cs.run(cs.load_config(_config_file(tmp_path), [*common, "train.epochs=4"]), run_dir=tmp_path / "full")
    cs.run(cs.load_config(_config_file(tmp_path), [*common, "train.epochs=2"]), run_dir=tmp_path / "part")
    resumed = cs.run(resume=tmp_path / "part", overrides=["train.epochs=4"])
    strip = [{k: v for k, v in row.items() if k != "time/epoch_s"} for row in full.history]
    again = [{k: v for k, v in row.items() if k != "time/epoch_s"} for row in resumed.history]
    assert strip == again and again[-1]["l1/steps"] == 4 * 23
    assert load_checkpoint(tmp_path / "part" / "checkpoint.pt")["methods"] == [{"steps": 4 * 23}]


def test_a_capabilitys_method_without_the_capability_is_refused_when_the_class_is_defined():
    """A proximal step or a projection the problem would never call is a class error, not a no-op."""
    with pytest.raises(TypeError, match="defines proximal_step_ but does not inherit constrained_sparsity.Proximal"):

        class Forgotten(cs.SparsityMethod):  # noqa: F841 - the definition is the test
            name = "forgotten"

            def measure(self, target):  # type: ignore[no-untyped-def]
                return None, torch.zeros(())

            def proximal_step_(self, target, strength):  # type: ignore[no-untyped-def]
                pass

    class Declared(cs.Proximal, cs.Projectable, cs.SparsityMethod):
        name = "declared"

        def measure(self, target):  # type: ignore[no-untyped-def]
            return None, torch.zeros(())

        def proximal_step_(self, target, strength):  # type: ignore[no-untyped-def]
            pass

        def project_(self, target):  # type: ignore[no-untyped-def]
            return {}

    assert issubclass(Declared, cs.Proximal) and issubclass(Declared, cs.Projectable)
