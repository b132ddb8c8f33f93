"""CGES (Yoon & Hwang 2017): both proximal operators against an independent solver, the
penalised step by hand, constrained digits runs, compaction of a CGES-trained network."""

import cvxpy as cp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import constrained_sparsity as cs
from constrained_sparsity.compact import compact, count_flops, count_params
from constrained_sparsity.methods.cges import exclusive_prox, from_groups, group_prox, to_groups

from .test_train import ROOT

CONFIG = ROOT / "configs" / "digits_mlp_cges.yaml"
QUIET = ["tracking.wandb=disabled", "tracking.progress=false"]


def _solve(v: np.ndarray, t: float, kind: str) -> np.ndarray:
    w = cp.Variable(len(v))
    reg = t * cp.norm(w, 2) if kind == "group" else (t / 2) * cp.square(cp.norm(w, 1))
    problem = cp.Problem(cp.Minimize(0.5 * cp.sum_squares(w - v) + reg))
    problem.solve(solver=cp.CLARABEL, tol_gap_abs=1e-12, tol_gap_rel=1e-12, tol_feas=1e-12)
    return np.asarray(w.value)


def _objective(w: np.ndarray, v: np.ndarray, t: float, kind: str) -> float:
    reg = t * np.linalg.norm(w) if kind == "group" else (t / 2) * np.abs(w).sum() ** 2
    return 0.5 * ((w - v) ** 2).sum() + reg


def _cases():
    rng = np.random.default_rng(0)
    rows = [rng.normal(size=9) for _ in range(6)]
    rows.append(np.array([3.0, 0.1, -0.2, 0.05, 0.0, 0.3, -0.1, 0.2, 0.15]))  # one weight survives
    rows.append(rng.normal(size=9) * 0.01)  # the whole group goes to zero
    return np.stack(rows)


@pytest.mark.parametrize("kind", ["group", "exclusive"])
@pytest.mark.parametrize("t", [0.05, 0.3, 1.5])
def test_proxes_equal_the_minimiser_of_their_objective(kind, t):
    v = _cases()
    got = (group_prox if kind == "group" else exclusive_prox)(torch.tensor(v), t).numpy()
    for row, w in zip(v, got):
        ref = _solve(row, t, kind)
        np.testing.assert_allclose(w, ref, atol=1e-6)
        assert _objective(w, row, t, kind) <= _objective(ref, row, t, kind) + 1e-9
    survivors = (got != 0).sum(axis=1)
    if t == 0.3:  # the cases the test is there for
        if kind == "group":
            assert survivors[-1] == 0  # a small group goes to zero as a whole
        else:
            assert survivors[-2] == 1  # one dominant weight survives alone (an l1^2 prox never empties a group)


@pytest.mark.parametrize("t", [0.05, 0.3])
def test_the_exact_exclusive_prox_beats_the_seeds_first_order_step(t):
    v = torch.tensor(_cases())
    exact, approx = exclusive_prox(v, t), exclusive_prox(v, t, exact=False)
    for row, a, b in zip(v.numpy(), exact.numpy(), approx.numpy()):
        assert _objective(a, row, t, "exclusive") <= _objective(b, row, t, "exclusive") + 1e-12
    assert any(
        _objective(a, r, t, "exclusive") < _objective(b, r, t, "exclusive") - 1e-6
        for r, a, b in zip(v.numpy(), exact.numpy(), approx.numpy())
    )


def test_groups_of_linear_and_conv_weights():
    w = torch.arange(24.0).view(2, 3, 2, 2)  # conv: out 2, in 3, 2x2 taps
    g = to_groups(w, "input")
    assert g.shape == (3, 8) and torch.equal(g[1], w[:, 1].flatten())  # an input channel, every filter
    k = to_groups(w, "kernel")
    assert k.shape == (12, 2) and torch.equal(k[0], w[:, 0, 0, 0])  # a (channel, tap), across filters
    for grouping, groups in (("input", g), ("kernel", k)):
        assert torch.equal(from_groups(groups, w, grouping), w)
    lin = torch.randn(4, 5)
    assert torch.equal(to_groups(lin)[2], lin[:, 2]) and torch.equal(from_groups(to_groups(lin), lin), lin)


def test_penalised_step_is_a_gradient_step_then_the_two_proxes_and_lambda_stays():
    torch.manual_seed(0)
    model = cs.MLP(6, [5], 3).double()
    method = cs.attach_cges(model)  # mu: 0.8 for fc1, 0.6 for fc2
    lam, lr = 0.7, 0.05
    problem = cs.SparsityProblem(model, method, [cs.Target(0.5, lam=lam)], mode="penalized")
    opt = cs.build_optimizer(problem, cs.PrimalOptimizer("sgd", lr=lr))
    x, y = torch.rand(8, 6, dtype=torch.float64), torch.randint(0, 3, (8,))
    weights = [model.fc1.weight, model.fc2.weight]
    params = list(model.parameters())
    grads = dict(zip(params, torch.autograd.grad(F.cross_entropy(model(x), y), params)))
    moved = {p: p.detach() - lr * grads[p] for p in params}
    lam = problem.multiplier_values()["cges_model"]  # the multiplier holds lambda in float32
    assert lam == pytest.approx(0.7)
    for _ in range(3):
        cs.train_step(problem, opt, x, y)
        assert problem.multiplier_values() == {"cges_model": lam}  # it never changes
        if _ == 0:
            for w, mu in zip(weights, (0.8, 0.6)):
                groups = to_groups(moved[w])  # a column per input neuron: n = out_features
                want = exclusive_prox(group_prox(groups, lr * lam * mu * groups.shape[1] ** 0.5), lr * lam * (1 - mu))
                torch.testing.assert_close(w.detach(), from_groups(want, w), rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(model.fc1.bias.detach(), moved[model.fc1.bias])  # biases: no prox


def test_cges_measures_against_a_hand_count():
    model = cs.MLP(4, [3], 2)
    with torch.no_grad():
        model.fc1.weight.copy_(torch.tensor([[1.0, 0, 0, 2], [0, 0, 0, 3], [1, 0, 0, 0]]))  # columns 1, 2 zero
        model.fc2.weight.copy_(torch.tensor([[0.0, 1, 0], [0, 2, 0]]))  # columns 0, 2 zero
    groups = cs.attach_cges(model)
    weights = cs.attach_cges(model, budget="weights")
    assert groups.measure(cs.Target(1.0))[1].item() == pytest.approx((2 * 3 + 1 * 2) / (12 + 6))
    assert groups.measure(cs.Target(1.0, layers=("fc1",)))[1].item() == pytest.approx(0.5)
    assert weights.measure(cs.Target(1.0))[1].item() == pytest.approx((4 + 2) / 18)


def test_flop_measure_counts_the_compact_networks_flops():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(36, 6), nn.ReLU(), nn.Linear(6, 3)
    ).double()
    method = cs.attach_cges(model)
    method.weight_by_flops(torch.zeros(1, 1, 8, 8))
    with torch.no_grad():
        model[4].weight[:, 9:18] = 0.0  # every feature of conv channel 1: the channel is unread
        model[6].weight[:, 2] = 0.0  # hidden unit 2 is unread
        model[4].weight[4] = 0.0  # hidden unit 4 has no input
    dense = count_flops(model, (1, 8, 8))
    small = compact(model.eval(), (1, 8, 8), select_inputs=True).module
    assert method.measure(cs.Target(1.0))[1].item() * dense == pytest.approx(count_flops(small, (1, 8, 8)), rel=1e-6)


@pytest.mark.parametrize("budget", ["groups", "weights"])
def test_projection_closes_the_smallest_until_the_budget_holds(budget):
    torch.manual_seed(1)
    model = cs.MLP(10, [8], 4).double()
    method = cs.attach_cges(model, budget=budget)
    target = cs.Target(0.4)
    before = method.measure(target)[1].item()
    closed = method.project_(target)
    after = method.measure(target)[1].item()
    assert before > 0.4 >= after and sum(closed.values()) > 0
    if budget == "weights":  # magnitude pruning: every zeroed weight is no larger than every kept one
        w = torch.cat([model.fc1.weight.flatten(), model.fc2.weight.flatten()])
        kept = w[w != 0].abs()
        assert kept.numel() == round(after * w.numel())
    assert method.project_(target) == {}


def _digits(eps, *overrides):
    return cs.run(cs.load_config(CONFIG, [*QUIET, f"sparsity.targets={eps}", *overrides]))


@pytest.mark.slow
@pytest.mark.parametrize("eps", [0.3, 0.6])
def test_constrained_digits_runs_end_within_their_budget(eps):
    result = _digits(eps, "finish.enabled=false")  # the game itself meets the budget
    assert result.feasible is True and result.density["model"] <= eps
    assert result.test_error < 0.2
    for row in result.history:
        if row["constraint/cges_model/strict_violation"] > 0.02:
            assert row["constraint/cges_model/multiplier"] > 0, row["epoch"]


@pytest.mark.slow
def test_compacting_a_cges_network_keeps_its_outputs_with_fewer_parameters(tmp_path):
    result = _digits(0.3, "train.epochs=20", f"tracking.out_dir={tmp_path}")
    report = cs.runs.compact_run(result.run_dir)
    assert report["max_abs_diff"] < 1e-5
    assert report["params_after"] < report["params_before"]
    assert report["test_error_compact"] == pytest.approx(report["test_error_gated"])


def test_a_cges_config_is_checked():
    with pytest.raises(cs.ConfigError, match="sparsity.mu=1.5: should be in"):
        cs.load_config(CONFIG, ["sparsity.mu=1.5"])
    with pytest.raises(cs.ConfigError, match="sparsity.grouping='rows'"):
        cs.load_config(CONFIG, ["sparsity.grouping=rows"])
    with pytest.raises(cs.ConfigError, match=r"sparsity.mu: mu has 2 entries for 3 layers"):
        cs.run(cs.load_config(CONFIG, [*QUIET, "sparsity.mu=[0.5, 0.5]", "train.epochs=1"]))
    assert count_params(nn.Linear(2, 2)) == 6


@pytest.mark.parametrize("t", [1e-4, 1e-2, 0.1, 1.0, 10.0])
def test_exact_exclusive_prox_equals_the_sorted_prefix_formula(t):
    """The Newton iteration without sorting gives the threshold of the sorted-prefix rule
    (k the largest index with u_k > t S_k / (1 + t k)), row by row, including all-zero rows,
    ties and rows where one weight survives."""
    torch.manual_seed(0)
    groups = torch.randn(300, 40, dtype=torch.float64) * torch.rand(300, 1, dtype=torch.float64)
    groups[0] = 0.0
    groups[1] = 0.25  # ties
    groups[2, 0] = 50.0  # one weight dominates
    a = groups.abs()
    u = torch.sort(a, dim=1, descending=True).values
    s = torch.cumsum(u, dim=1)
    k = torch.arange(1, u.shape[1] + 1, dtype=u.dtype)
    count = (u > t * s / (1 + t * k)).sum(dim=1, keepdim=True)
    s_k = torch.gather(s, 1, (count - 1).clamp(min=0))
    theta = torch.where(count > 0, t * s_k / (1 + t * count.to(u.dtype)), 0.0)
    expected = groups.sign() * (a - theta).clamp(min=0)
    torch.testing.assert_close(exclusive_prox(groups, t), expected, rtol=0, atol=1e-12)
