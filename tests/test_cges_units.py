"""CGES on dependency-graph units (``cges_units``): a unit's group is every weight that reads it,
its proximal step is exact, a zero group is a unit compaction removes, the measure counts
the compact network."""

import math

import pytest
import torch
from torch import nn

import constrained_sparsity as cs
from constrained_sparsity.compact import count_flops, count_params
from constrained_sparsity.export import load_compact, save_compact
from constrained_sparsity.methods.cges import group_prox
from constrained_sparsity.models import ResNet, ViT
from constrained_sparsity.units import UnitError

from .conftest import DEVICES
from .test_units import TwoBlocks, _randomise


def _stream_readers(model, j):
    """The weights that read channel j of the residual stream of TwoBlocks, by hand: each block's
    first convolution (its input is the stream) and the classifier."""
    return [model.b1.conv1.weight[:, j], model.b2.conv1.weight[:, j], model.fc.weight[:, j]]


def test_a_stream_units_group_is_every_weight_that_reads_it_and_its_prox_is_the_group_soft_threshold():
    torch.manual_seed(0)
    model = TwoBlocks(c=6, classes=5)
    x = torch.randn(3, 1, 8, 8)
    method = cs.attach_cges_units(model, x, mu=1.0)  # the group term only
    stream = next(g for g in method.graph.groups if "b1.conv2" in g.layers)
    assert set(stream.layers) >= {"stem", "bn", "b1.conv2", "b1.bn2", "b2.conv2", "b2.bn2", "b1.conv1", "fc"}
    before = [torch.cat([w.flatten() for w in _stream_readers(model, j)]).clone() for j in range(6)]
    sizes = method.sizes[stream.offset : stream.offset + stream.size]
    assert sizes.tolist() == [6 * 9 + 6 * 9 + 5] * 6  # two 6-filter 3x3 convs and the 5-class linear
    norms = torch.stack([v.norm() for v in before]).detach()
    strength = float(norms.median().detach()) / (method.mu * math.sqrt(sizes[0]))  # closes about half of them
    method.proximal_step_(cs.Target(0.5), strength)
    for j in range(6):
        after = torch.cat([w.flatten() for w in _stream_readers(model, j)])
        expected = group_prox(before[j].view(1, -1), strength * math.sqrt(sizes[0])).view(-1)
        torch.testing.assert_close(after, expected, rtol=1e-6, atol=1e-7)
    closed = method.closed_units()[stream.name]
    assert 0 < len(closed) < 6 and all(float(norms[j]) <= float(norms.median()) for j in closed)


def test_the_group_prox_is_the_minimiser_of_its_objective():
    """Exact prox of lambda sum_u c_u ||W_u||: no perturbation of the result lowers
    1/2 ||W - V||^2 + t sum_u c_u ||W_u||_2 (the reader groups are disjoint)."""
    torch.manual_seed(1)
    model = TwoBlocks(c=4, classes=3)
    method = cs.attach_cges_units(model, torch.randn(2, 1, 6, 6), mu=1.0, group_weight="none")
    v = [r.module.weight.detach().clone() for r in method.readers]
    t = 0.3

    def objective():
        fit = sum(0.5 * (r.module.weight - w0).square().sum() for r, w0 in zip(method.readers, v))
        return float(fit + t * method._per_unit(torch.square).sqrt().sum())

    method.proximal_step_(cs.Target(0.5), t)
    best = objective()
    solution = [r.module.weight.detach().clone() for r in method.readers]
    for _ in range(20):
        with torch.no_grad():
            for r, w in zip(method.readers, solution):
                r.module.weight.copy_(w + 1e-3 * torch.randn_like(w))
        assert objective() >= best - 1e-9


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("which", ["resnet20", "user", "vit"])
@pytest.mark.parametrize("weighting", ["params", "flops"])
def test_compaction_removes_the_zero_groups_keeps_the_outputs_and_counts_what_the_measure_reported(
    which, weighting, device, tmp_path
):
    torch.manual_seed(0)
    shape = (1, 16, 16)
    if which == "vit":
        model = ViT(shape, num_classes=10, patch=4, width=32, depth=2, heads=4, hidden=64)
    else:
        model = _randomise(ResNet.cifar(20, 1, 10) if which == "resnet20" else TwoBlocks(c=8, classes=10))
    model = model.to(device)
    x = torch.randn(6, *shape, device=device)
    method = cs.attach_cges_units(model, x, weighting=weighting)
    assert method.count() == (count_params(model) if weighting == "params" else count_flops(model, shape))
    method.project_(cs.Target(0.45))
    assert float(method.measure(cs.Target(0.45))[1]) <= 0.45
    model.eval()
    with torch.no_grad():
        before = model(x)
    small = cs.compact(model, shape, methods=[method])
    with torch.no_grad():
        torch.testing.assert_close(small.module(x), before, rtol=0, atol=1e-5)
    counted = count_params(small.module) if weighting == "params" else count_flops(small.module, shape)
    assert counted == method.count() and sum(small.removed.values()) > 0
    assert (method.count("params"), method.count("flops")) == (
        count_params(small.module),
        count_flops(small.module, shape),
    )
    if which == "resnet20":  # saved, loaded back without the original object, and exported
        small.rebuild = {"name": "resnet20", "kwargs": {}, "input_shape": list(shape), "num_classes": 10}
        paths = save_compact(small, tmp_path, shape)
        loaded, info = load_compact(paths["model"])
        program = torch.export.load(paths["program"]).module()
        with torch.no_grad():
            torch.testing.assert_close(loaded(x.cpu()), before.cpu(), rtol=0, atol=1e-5)
            torch.testing.assert_close(program(x.cpu()), before.cpu(), rtol=0, atol=1e-5)


class ResidualMLP(nn.Module):
    """A user's residual network without BatchNorm: two residual blocks on one stream."""

    def __init__(self, inputs=64, width=48, classes=10):
        super().__init__()
        self.stem, self.fc = nn.Linear(inputs, width), nn.Linear(width, classes)
        self.a1, self.a2, self.b1, self.b2 = (nn.Linear(width, width) for _ in range(4))

    def forward(self, x):
        x = torch.relu(self.stem(x.flatten(1)))
        x = x + self.a2(torch.relu(self.a1(x)))
        x = x + self.b2(torch.relu(self.b1(x)))
        return self.fc(torch.relu(x))


def test_a_constrained_run_in_the_users_loop_meets_a_deployable_budget():
    torch.manual_seed(0)
    digits = cs.load_dataset("digits")
    model = ResidualMLP()
    method = cs.attach_cges_units(model, digits.train_x[:64])
    problem = cs.SparsityProblem(model, method, [cs.Target(epsilon=0.4, name="params")], mode="constrained")
    optimizer = cs.build_optimizer(
        problem, primal=cs.PrimalOptimizer("sgd", lr=0.05, momentum=0.9), dual=cs.DualOptimizer("sgd", lr=0.002)
    )
    model.train()
    densities = []
    for epoch in range(8):
        for xb, yb in cs.data.batches(digits.train_x, digits.train_y, 64, torch.Generator().manual_seed(epoch)):
            cs.train_step(problem, optimizer, xb, yb)
        densities.append(problem.violations()["params"][1] + 0.4)
    assert min(densities) < 0.5  # the multiplier's proximal steps close units
    problem.project_()
    assert problem.violations()["params"][1] <= 0
    small = cs.compact(model, (64,), methods=[method])
    assert count_params(small.module) == method.count() <= math.floor(0.4 * count_params(model))
    assert cs.error_rate(small.module, digits.test_x, digits.test_y) < 0.1  # dense: about 0.03


def test_cges_units_options_and_targets_are_checked():
    model = TwoBlocks(c=4, classes=3)
    x = torch.randn(2, 1, 6, 6)
    with pytest.raises(cs.OptionError, match="mu"):
        cs.attach_cges_units(model, x, mu=1.5)
    with pytest.raises(cs.OptionError, match="weighting"):
        cs.attach_cges_units(model, x, weighting="bytes")
    method = cs.attach_cges_units(model, x)
    with pytest.raises(ValueError, match="no differentiable surrogate"):
        method.check_target(cs.Target(0.5, measure="expected"))
    with pytest.raises(ValueError, match="not gated"):
        method.check_target(cs.Target(0.5, layers=("nope",)))


def test_a_network_without_units_is_refused_in_one_line():
    with pytest.raises(UnitError, match="LayerNorm") as info:
        cs.attach_cges_units(nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 2)), torch.randn(2, 4))
    assert "\n" not in str(info.value)


def test_the_cges_units_config_trains_from_the_cli_runner_and_compacts_to_its_count(tmp_path):
    import json

    cfg = cs.load_config(
        "fashion_mlp_cges_units_constrained",
        [
            "data.name=digits",
            "data.batch_size=64",
            "model.hidden=[32,16]",
            "train.epochs=3",
            "sparsity.targets=0.5",
            "tracking.wandb=disabled",
            "tracking.progress=false",
            "train.threads=1",
        ],
    )
    result = cs.run(cfg, run_dir=tmp_path / "run")
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    compaction = summary["compaction"]
    assert result.feasible is True and summary["density"]["model"] <= 0.5
    assert summary["density"]["model"] * compaction["params_before"] == pytest.approx(
        compaction["params_after"], abs=0.5
    )
