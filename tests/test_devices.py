"""Everything follows the model's device and dtype: measures, violations, proximal steps,
compaction, FLOP counting, export, evaluation and a whole run (CUDA is skipped where absent)."""

import pytest
import torch
from torch import nn

import constrained_sparsity as cs
from constrained_sparsity.compact import active_inputs, compact, count_flops
from constrained_sparsity.evaluation import measure_latency
from constrained_sparsity.export import load_compact, save_compact
from constrained_sparsity.methods.layers import attach_layer_sparsity
from constrained_sparsity.runs import compact_run

from .test_train import DIGITS


def _gated(model, device, dtype=torch.float32):
    torch.manual_seed(0)
    model = model.to(device=device, dtype=dtype)
    gates = cs.attach_l0(model)
    with torch.no_grad():
        for _, gate in gates.named_gates():
            gate.log_alpha.normal_(0.0, 2.0)
            gate.log_alpha[: gate.num_gates // 3] = -20.0
    return model, gates


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_game_step_on_the_models_device_and_dtype(device, dtype):
    model, gates = _gated(cs.MLP(12, [10, 8], 3), device, dtype)
    layers = attach_layer_sparsity(model, input_nonnegative=True)
    targets = [cs.Target(0.5), cs.Target(2, method="layers", restarts=False)]
    problem = cs.SparsityProblem(model, [gates, layers], targets).to(device)
    opt = cs.build_optimizer(problem, dual=cs.DualOptimizer("sgd", lr=1.0))
    x = torch.rand(16, 12, device=device, dtype=dtype)
    y = torch.randint(0, 3, (16,), device=device)
    for target in problem.targets:
        surrogate, exact = target.method.measure(target)
        assert exact.device.type == device.type
        assert surrogate is None or surrogate.device.type == device.type
    result = cs.train_step(problem, opt, x, y)
    assert result["loss"].device.type == device.type and torch.isfinite(result["loss"])
    assert problem.multiplier_values()["layers"] > 0  # 3 layers > 2: the proximal step had lambda > 0
    assert set(problem.violations()) == {"l0_model", "layers"}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_an_equality_game_step_and_its_restart_on_the_models_device(device, dtype):
    model, gates = _gated(cs.MLP(12, [10, 8], 3), device, dtype)
    problem = cs.SparsityProblem(model, gates, [cs.Target(0.99, equality=True)], lambda_init=1.0).to(device)
    opt = cs.build_optimizer(problem, dual=cs.DualOptimizer("sgd", lr=0.01))
    x = torch.rand(16, 12, device=device, dtype=dtype)
    y = torch.randint(0, 3, (16,), device=device)
    result = cs.train_step(problem, opt, x, y, dual_restarts=True)  # under 0.99 with lambda > 0: crossed
    assert result["restarted"] == ["l0_model"] and problem.multiplier_values()["l0_model"] == 0.0
    cs.train_step(problem, opt, x, y, dual_restarts=True)  # then negative, and kept
    assert problem.multiplier_values()["l0_model"] < 0
    assert problem.l0_model.multiplier.weight.device.type == device.type


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_compaction_flops_and_export_follow_the_model(device, dtype, tmp_path):
    model, _ = _gated(cs.LeNet5Caffe(), device, dtype)
    model.eval()
    shape = (1, 28, 28)
    small = compact(model, shape, select_inputs=True)
    assert next(small.module.parameters()).device.type == device.type
    x = torch.rand(5, *shape, device=device, dtype=dtype)
    torch.testing.assert_close(small.module(x), model(x), rtol=1e-4, atol=1e-5)
    assert count_flops(small.module, shape) < count_flops(model, shape)
    assert len(active_inputs(model, shape)) == 2
    paths = save_compact(small, tmp_path, shape)  # written on the CPU, in float32
    loaded, _ = load_compact(paths["model"])
    torch.testing.assert_close(loaded(x.float().cpu()), model(x).float().cpu(), rtol=1e-4, atol=1e-4)
    assert measure_latency(small.module, shape, batch=2, threads=1, repeats=2, warmup=1) > 0


def test_a_whole_run_on_the_device(device, quiet, tmp_path):
    overrides = [*quiet, f"train.device={device.type}", "train.epochs=2", "train.select=last"]
    result = cs.run(cs.load_config(DIGITS, overrides), run_dir=tmp_path / "l0")
    assert len(result.history) == 2 and result.compaction["params_before"] == 17610
    deep = DIGITS.with_name("digits_deep_mlp_layers.yaml")
    result = cs.run(cs.load_config(deep, [*overrides, "sparsity.layers.refit_epochs=1"]), run_dir=tmp_path / "layers")
    assert result.phases["refit"]["refit_epochs"] == 1 and "test_error_refit" in result.phases["refit"]
    report = compact_run(tmp_path / "layers")  # the saved networks load on the CPU
    assert report["max_abs_diff"] < 1e-4


def test_error_rate_follows_the_data(device):
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2)).to(device)
    x = torch.rand(10, 4, device=device)
    y = model(x).argmax(1)
    assert cs.error_rate(model, x, y) == 0.0
