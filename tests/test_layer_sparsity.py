"""Layer sparsity (Hebiri & Lederer 2020): merge equivalence, the proximal step, the budget."""

from collections import OrderedDict

import numpy as np
import pytest
import torch
from scipy.optimize import minimize
from torch import nn

from constrained_sparsity import MLP, load_config, run
from constrained_sparsity.export import load_compact
from constrained_sparsity.methods.layers import attach_layer_sparsity, merge_layers, negative_part_prox_
from constrained_sparsity.runs import compact_run

from .test_train import ROOT

DEEP = ROOT / "configs" / "digits_deep_mlp_layers.yaml"
MERGE_TOL = 1e-10  # float64: merging only reassociates sums of products


def _random_mlp(widths, nonneg_layers, seed=0):
    torch.manual_seed(seed)
    model = MLP(widths[0], widths[1:-1], widths[-1]).double()
    with torch.no_grad():
        for name in nonneg_layers:
            layer = getattr(model, name)
            layer.weight.abs_()
            layer.bias.abs_()
    return model


@pytest.mark.parametrize(
    "nonneg",
    [["fc2"], ["fc2", "fc3"], ["fc1", "fc2", "fc3", "fc4"], ["fc1", "fc3"]],
    ids=["one", "two-consecutive", "all-hidden", "non-consecutive"],
)
def test_merged_network_gives_the_same_outputs(nonneg):
    widths = [7, 6, 5, 8, 4, 3]
    model = _random_mlp(widths, nonneg)
    merged = merge_layers(model, input_nonnegative=True)
    x = torch.rand(50, 7, dtype=torch.float64)  # non-negative input, so fc1 may merge
    torch.testing.assert_close(merged(x), model(x), rtol=MERGE_TOL, atol=MERGE_TOL)
    linears = [m for m in merged if isinstance(m, nn.Linear)]
    assert len(linears) == 5 - len(nonneg)
    assert all(m.bias is not None for m in linears)


def test_first_layer_merges_only_with_a_nonnegative_input():
    model = _random_mlp([7, 6, 5, 3], ["fc1"])
    kept = merge_layers(model, input_nonnegative=False)
    assert len([m for m in kept if isinstance(m, nn.Linear)]) == 3
    with pytest.raises(ValueError, match="fc1.*cannot be merged"):
        merge_layers(model, layers=["fc1"], input_nonnegative=False)


def test_merge_refuses_a_layer_with_a_negative_parameter():
    model = _random_mlp([7, 6, 5, 3], ["fc2"])
    with torch.no_grad():
        model.fc2.bias[0] = -1e-3
    with pytest.raises(ValueError, match=r"layer 'fc2' has 1 negative parameters"):
        merge_layers(model, layers=["fc2"])


def test_merge_refuses_a_non_relu_network():
    model = MLP(7, [6, 5], 3, activation="tanh")
    with pytest.raises(TypeError, match="ReLU.*Tanh"):
        merge_layers(model)
    with pytest.raises(TypeError, match="ReLU"):
        attach_layer_sparsity(model)


def _prox_objective(v, theta, t):
    return 0.5 * np.sum((v - theta) ** 2) + t * np.linalg.norm(np.minimum(v, 0.0))


@pytest.mark.parametrize("seed", range(6))
def test_prox_is_the_minimiser_of_its_objective(seed):
    rng = np.random.default_rng(seed)
    theta = rng.normal(size=5)
    t = float(rng.uniform(0.05, 1.5))
    w, b = torch.tensor(theta[:3]), torch.tensor(theta[3:])
    negative_part_prox_([w, b], t)
    v = np.concatenate([w.numpy(), b.numpy()])
    best = min(
        (
            minimize(
                _prox_objective,
                x0,
                args=(theta, t),
                method="Nelder-Mead",
                options={"xatol": 1e-10, "fatol": 1e-12, "maxiter": 20000},
            )
            for x0 in (theta, np.zeros(5), v)
        ),
        key=lambda r: r.fun,
    )
    # Closed form no worse than the numerical minimum, and at the same point (strictly convex).
    assert _prox_objective(v, theta, t) <= best.fun + 1e-9
    np.testing.assert_allclose(v, best.x, atol=1e-4)
    assert np.all(v[theta >= 0] == theta[theta >= 0])  # the non-negative part is untouched


def test_prox_zeroes_the_negative_part_under_the_threshold():
    w = torch.tensor([[0.5, -0.3], [-0.4, 2.0]])
    b = torch.tensor([0.1, -0.0])
    norm = 0.5  # ||(-0.3, -0.4)||
    out = negative_part_prox_([w, b], norm + 1e-6)
    assert out == 0.0
    assert (w >= 0).all() and w[0, 0] == 0.5 and w[1, 1] == 2.0
    w2 = torch.tensor([-0.3, -0.4, 1.0])
    after = negative_part_prox_([w2], 0.25)
    assert after == pytest.approx(0.25)
    torch.testing.assert_close(w2, torch.tensor([-0.15, -0.2, 1.0]))


def test_depth_counts_layers_left_after_merging():
    model = _random_mlp([7, 6, 5, 4, 3], ["fc2"])
    layers = attach_layer_sparsity(model, input_nonnegative=True)
    assert layers.layers == ["fc1", "fc2", "fc3"] and layers.num_linear == 4 and layers.min_depth == 1
    assert layers.mergeable() == ["fc2"] and layers.depth() == 3
    norms = layers.negative_norms()
    assert float(norms["fc2"].detach()) == 0.0 and float(norms["fc1"].detach()) > 0


def test_attach_checks_weights_and_eligibility():
    model = MLP(7, [6, 5], 3)
    with pytest.raises(ValueError, match=r"weights has 3 entries for 1 regularised layers \[.fc2.\]"):
        attach_layer_sparsity(model, weights=[1, 1, 1], input_nonnegative=False)
    with pytest.raises(ValueError, match="'fc3' cannot be merged"):
        attach_layer_sparsity(model, layers=["fc3"])
    with pytest.raises(TypeError, match="nn.Sequential"):
        attach_layer_sparsity(nn.ModuleList([nn.Linear(2, 2)]))  # type: ignore[arg-type]


def _deep(overrides, quiet):
    return run(load_config(DEEP, [*quiet, *overrides]))


@pytest.mark.slow
def test_constrained_digits_run_reaches_the_layer_budget(quiet):
    result = _deep(["sparsity.layers.refit_epochs=3"], quiet)
    history = result.history
    assert history[0]["layers/active"] == 6
    assert result.feasible is True
    (target,) = result.targets
    assert target["depth"] <= 2
    # while over budget the multiplier grows
    over = [row for row in history if row["layers/active"] > 2]
    assert over and all(row["constraint/layers/multiplier"] > 0 for row in over)
    refit = result.phases["refit"]
    assert refit["depth_before"] == 6 and refit["depth_after"] == target["depth"]
    assert refit["max_abs_diff_merged"] < 1e-4  # float32 outputs of the two networks
    assert refit["test_error_merged"] == pytest.approx(refit["test_error_before"], abs=0.003)
    assert refit["test_error_refit"] < 0.2
    assert (result.run_dir / "merged_model.pt").is_file() and (result.run_dir / "refit_model.pt").is_file()
    # csparse compact on a layer-sparsity run compacts the merged, refitted network
    report = compact_run(result.run_dir)
    assert report["source"].startswith("refit_model.pt")
    assert report["architecture_before"].count("-") == refit["depth_after"]  # e.g. 64-64-10: 2 layers
    assert report["max_abs_diff"] < 1e-5
    assert report["test_error_compact"] == pytest.approx(refit["test_error_refit"])


def test_penalized_with_lambda_zero_changes_no_count(quiet):
    result = _deep(["train.epochs=3", "sparsity.mode=penalized", "sparsity.layers.lam=0.0"], quiet)
    assert [row["layers/active"] for row in result.history] == [6, 6, 6]
    assert [row["constraint/layers/multiplier"] for row in result.history] == [0.0] * 3


def test_combined_with_l0_tracks_two_constraints_and_keeps_the_l0_zeros_through_the_refit(quiet):
    l0 = ["sparsity.method=l0", "sparsity.targets=0.8", "sparsity.structure=weight", "optim.primal.gate_lr=0.05"]
    result = _deep(["train.epochs=4", *l0, "sparsity.layers.refit_epochs=1"], quiet)
    assert result.methods == ["l0", "layers"]
    for row in result.history:  # each constraint measures its own method, by the rule of the training step
        l0_strict = row["constraint/l0_model/strict_violation"]
        assert l0_strict == pytest.approx(row["density/model"] - 0.8, abs=1e-6)
        assert row["constraint/layers/strict_violation"] == row["layers/active"] - 2
        for name in ("l0_model", "layers"):
            assert row[f"constraint/{name}/feasible"] == (row[f"constraint/{name}/strict_violation"] <= 0)
    assert result.history[0]["constraint/layers/multiplier"] > 0  # 6 layers > 2: the multiplier rose
    refit = result.phases["refit"]
    assert refit["max_abs_diff_merged"] < 1e-4
    # L0's zeros are kept through the refit (fixed masks); everything else moved
    merged, _ = load_compact(result.run_dir / "merged_model.pt")
    refitted, _ = load_compact(result.run_dir / "refit_model.pt")
    zeros = moved = 0
    for a, b in zip(merged.modules(), refitted.modules()):
        if isinstance(a, nn.Linear):
            assert torch.all(b.weight[a.weight == 0] == 0)
            zeros += int((a.weight == 0).sum())
            moved += int((a.weight != b.weight).sum())
    assert zeros > 0 and moved > 0


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["sparsity.layers.max_layers=-1"], r"sparsity.layers.max_layers=-1.*>= 0"),
        (["sparsity.layers.max_layers=9"], r"sparsity.layers.max_layers=9.*between 1 .* and 6"),
        (["sparsity.layers.weights=[1, 2]"], r"sparsity.layers.weights.*2 entries for 5"),
        (["model.activation=tanh"], r"sparsity.layers: layer sparsity needs ReLU .* 'act1' is a Tanh"),
        (["sparsity.mode=penalized"], r"sparsity.layers.lam.*penalized"),
    ],
)
def test_bad_layer_budget_inputs(quiet, overrides, message):
    with pytest.raises(ValueError, match=message):
        _deep(["train.epochs=1", *overrides], quiet)


def test_sequential_with_custom_names_merges():
    model = nn.Sequential(
        OrderedDict(a=nn.Linear(3, 4), r=nn.ReLU(), b=nn.Linear(4, 4), s=nn.ReLU(), c=nn.Linear(4, 2))
    ).double()
    with torch.no_grad():
        model.b.weight.abs_()
        model.b.bias.abs_()
    merged = merge_layers(model)
    assert list(dict(merged.named_children())) == ["a", "r", "c"]
    x = torch.randn(10, 3, dtype=torch.float64)
    torch.testing.assert_close(merged(x), model(x), rtol=MERGE_TOL, atol=MERGE_TOL)
