"""The Lagrangian game on Cooper: penalised == loss + lambda * g, multipliers, restarts."""

import copy

import cooper
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import constrained_sparsity as cs
from constrained_sparsity import (
    DualOptimizer,
    PrimalOptimizer,
    SparsityMethod,
    SparsityProblem,
    Target,
    attach_l0,
    build_optimizer,
    train_step,
)
from constrained_sparsity.methods.layers import attach_layer_sparsity
from constrained_sparsity.problem import SCHEMES


def _model(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    gates = attach_l0(model)
    return model, gates


def _batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g)


@pytest.mark.parametrize("scheme", ["alternating", "simultaneous", "alternating_primal_dual"])
def test_penalized_step_equals_handwritten_loss_plus_lambda_g(scheme):
    lam, lr = 0.7, 0.1
    x, y = _batch()
    model, gates = _model()
    reference = copy.deepcopy(model)

    problem = SparsityProblem(model, gates, [Target(0.3, lam=lam)], mode="penalized")
    opt = build_optimizer(problem, PrimalOptimizer("sgd", lr=lr), scheme=scheme)
    torch.manual_seed(42)
    train_step(problem, opt, x, y)

    _handwritten_step_matches(model, reference, x, y, lam, lr)


def _handwritten_step_matches(model, reference, x, y, lam, lr):
    """By hand: one SGD step of ``reference`` on cross-entropy + lam * expected density, with
    the gate sample of seed 42, gives ``model``'s parameters. Returns the gates' gradients."""
    ref_gates = [m.l0_gate for m in (reference[0], reference[2])]
    torch.manual_seed(42)
    reference.train()
    loss = F.cross_entropy(reference(x), y)
    num = sum(g.prob_nonzero().sum() * k for g, k in zip(ref_gates, (8, 3)))
    density = num / (6 * 8 + 8 * 3)
    (loss + lam * density).backward()
    grads = [g.log_alpha.grad.clone() for g in ref_gates]
    with torch.no_grad():
        for p in reference.parameters():
            p -= lr * p.grad
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7, msg=name)
    return grads


def test_penalized_multipliers_never_change():
    model, gates = _model()
    targets = [Target(0.2, layers=("0",), lam=0.5, name="a"), Target(0.9, layers=("2",), lam=0.0, name="b")]
    problem = SparsityProblem(model, gates, targets, mode="penalized")
    opt = build_optimizer(problem, dual=DualOptimizer("adam", lr=1.0))
    for seed in range(20):
        train_step(problem, opt, *_batch(seed), dual_restarts=True)
    assert problem.multiplier_values() == {"a": 0.5, "b": 0.0}


def test_constrained_multiplier_grows_by_lr_times_strict_violation():
    model, gates = _model()
    problem = SparsityProblem(model, gates, [Target(0.25)], mode="constrained")
    opt = build_optimizer(problem, dual=DualOptimizer("sgd", lr=0.5))
    exact = gates.exact_density().item()
    assert exact == 1.0  # log_alpha ~ 0 at init: every gate is on at test time
    train_step(problem, opt, *_batch())
    # alternating (dual first): lambda_1 = [0 + lr * (exact(x_0) - eps)]_+
    assert problem.multiplier_values()["l0_model"] == pytest.approx(0.5 * (1.0 - 0.25))


def test_expected_measure_moves_the_multiplier_when_asked():
    model, gates = _model()
    problem = SparsityProblem(model, gates, [Target(0.25, measure="expected")])
    opt = build_optimizer(problem, dual=DualOptimizer("sgd", lr=0.5))
    expected = gates.expected_density().item()
    train_step(problem, opt, *_batch())
    assert problem.multiplier_values()["l0_model"] == pytest.approx(0.5 * (expected - 0.25), rel=1e-5)


def test_dual_restart_resets_multiplier_and_optimizer_state():
    model, gates = _model()
    problem = SparsityProblem(model, gates, [Target(0.5)], mode="constrained")
    opt = build_optimizer(problem, dual=DualOptimizer("adam", lr=0.1))
    train_step(problem, opt, *_batch())  # infeasible: lambda > 0, Adam has state
    assert problem.multiplier_values()["l0_model"] > 0
    weight = problem.l0_model.multiplier.weight
    assert weight in opt.dual_optimizer.state
    with torch.no_grad():  # close 6 of 6 first-layer gates: density (0 + 8*3) / 72 < 0.5
        model[0].l0_gate.log_alpha.fill_(-10.0)
    result = train_step(problem, opt, *_batch(2), dual_restarts=True)
    assert result["restarted"] == ["l0_model"]
    assert problem.multiplier_values()["l0_model"] == 0.0
    assert weight not in opt.dual_optimizer.state


@pytest.mark.parametrize("epsilon", [0.05, 0.33, 0.6])
def test_dual_adam_raises_the_multiplier_by_its_lr_whatever_the_violation(epsilon):
    # Adam's first step is lr * m / (sqrt(v) + eps) = lr * g / (|g| + eps): about lr for a
    # violation of 0.001 as for 0.9, where SGD would move lr * violation.
    model, gates = _model()
    with torch.no_grad():  # first-layer gates wide open, second closed: exact density 48/72
        model[0].l0_gate.log_alpha.fill_(5.0)
        model[2].l0_gate.log_alpha.fill_(-10.0)
    problem = SparsityProblem(model, gates, [Target(epsilon)], mode="constrained")
    opt = build_optimizer(problem, dual=DualOptimizer("adam", lr=0.01))
    train_step(problem, opt, *_batch(), dual_restarts=True)
    assert 48 / 72 - epsilon > 0.06
    assert problem.multiplier_values()["l0_model"] == pytest.approx(0.01, rel=1e-5)


def test_without_restarts_multiplier_decays_gradually():
    model, gates = _model()
    problem = SparsityProblem(model, gates, [Target(0.5)], mode="constrained", lambda_init=1.0)
    opt = build_optimizer(problem, dual=DualOptimizer("sgd", lr=0.1))
    with torch.no_grad():
        model[0].l0_gate.log_alpha.fill_(-10.0)
    train_step(problem, opt, *_batch(), dual_restarts=False)
    exact = 24 / 72
    assert problem.multiplier_values()["l0_model"] == pytest.approx(1.0 + 0.1 * (exact - 0.5))


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("dual", ["sgd", "adam", "nupi"])
def test_every_scheme_and_dual_optimizer_steps(scheme, dual):
    if scheme == "extrapolation" and dual == "nupi":
        with pytest.raises(ValueError, match="nupi"):
            build_optimizer(SparsityProblem(*_model(), [Target(0.3)]), dual=DualOptimizer(dual), scheme=scheme)
        return
    model, gates = _model()
    problem = SparsityProblem(model, gates, [Target(0.3)])
    opt = build_optimizer(problem, dual=DualOptimizer(dual, lr=0.1, kp=1.0), scheme=scheme)
    before = [p.detach().clone() for p in model.parameters()]
    for seed in range(3):
        result = train_step(problem, opt, *_batch(seed))
    assert torch.isfinite(result["loss"])
    assert problem.multiplier_values()["l0_model"] > 0
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_dense_problem_uses_unconstrained_optimizer():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 3))
    problem = SparsityProblem(model, None, [])
    opt = build_optimizer(problem)
    assert opt.dual_optimizer is None
    result = train_step(problem, opt, *_batch())
    assert torch.isfinite(result["loss"])


def test_bad_targets_and_problems_are_refused():
    with pytest.raises(ValueError, match="lam=-1"):
        Target(0.3, lam=-1.0)
    with pytest.raises(ValueError, match="measure='mean'"):
        Target(0.3, measure="mean")
    for bad in (float("nan"), float("inf"), -0.1, True):
        with pytest.raises(ValueError, match="epsilon=.* should be a finite number >= 0"):
            Target(bad)
    model, gates = _model()
    with pytest.raises(ValueError, match=r"epsilon=1.5 should be a number in \[0, 1\]"):  # the method's range
        SparsityProblem(model, gates, [Target(1.5)])
    with pytest.raises(ValueError, match="no such method is attached"):
        SparsityProblem(model, gates, [Target(2, method="layers")])
    with pytest.raises(ValueError, match="penalized mode needs a lambda"):
        SparsityProblem(model, gates, [Target(0.3)], mode="penalized")
    with pytest.raises(ValueError, match="mode='lagrangian'"):
        SparsityProblem(model, gates, [Target(0.3)], mode="lagrangian")
    with pytest.raises(ValueError, match="not gated"):
        SparsityProblem(model, gates, [Target(0.3, layers=("fc9",))])
    with pytest.raises(ValueError, match="primal optimizer name='rmsprop'"):
        build_optimizer(
            SparsityProblem(
                model,
                gates,
                [Target(0.3)],
            ),
            PrimalOptimizer("rmsprop"),
        )


def test_violations_follow_the_measure_of_each_target_and_decide_feasibility():
    model, gates = _model()
    with torch.no_grad():  # layer "0": 6 input gates, 3 of them closed at test time
        model[0].l0_gate.log_alpha.copy_(torch.tensor([5.0, 5.0, 5.0, -5.0, -5.0, -5.0]))
        model[2].l0_gate.log_alpha.fill_(5.0)
    targets = [
        Target(0.6, layers=("0",), measure="exact", name="exact0"),
        Target(0.4, layers=("0",), measure="expected", name="expected0"),
        Target(0.9, measure="exact", name="model"),
    ]
    problem = SparsityProblem(model, gates, targets)
    beta, gamma, zeta = 2 / 3, -0.1, 1.1
    shift = beta * torch.log(torch.tensor(-gamma / zeta))
    p = torch.sigmoid(model[0].l0_gate.log_alpha.detach() - shift).mean()  # eq. 12
    p_all = (p * 48 + torch.sigmoid(5.0 - shift) * 24) / 72
    exact_all = (0.5 * 48 + 24) / 72  # three of six input gates of layer 0, every gate of layer 2
    got = problem.violations()
    assert list(got) == ["exact0", "expected0", "model"]
    assert got["exact0"] == pytest.approx((float(p) - 0.6, 0.5 - 0.6), abs=1e-6)
    assert got["expected0"] == pytest.approx((float(p) - 0.4, float(p) - 0.4), abs=1e-6)  # no proxy
    assert got["model"] == pytest.approx((float(p_all) - 0.9, exact_all - 0.9), abs=1e-6)
    assert problem.feasible() == all(strict <= 0 for _, strict in got.values())
    assert not problem.feasible()  # "expected0": p = 0.5 (about) > 0.4
    problem = SparsityProblem(model, gates, targets[:1] + targets[2:])
    assert problem.feasible()  # 0.5 <= 0.6 and 0.833 <= 0.9


class _SquaredNorm(SparsityMethod):
    """``||w||^2`` of a linear layer's weight: surrogate and exact measure at once (no proxy)."""

    name = "sqnorm"

    def __init__(self, layer: nn.Linear) -> None:
        self.w = layer.weight

    def check_target(self, target):  # a budget in the units of ||w||^2
        pass

    def measure(self, target):
        s = (self.w**2).sum()
        return s, s.detach()


def test_game_converges_to_the_kkt_point_of_a_norm_constrained_least_squares():
    """min 1/2 mean (Xw - y)^2  s.t.  ||w||^2 <= c: w(lam) = (X'X/n + 2 lam I)^-1 X'y/n, lam* from ||w(lam*)||^2 = c."""
    torch.manual_seed(0)
    n, d = 200, 5
    x = torch.randn(n, d, dtype=torch.float64)
    y = x @ torch.tensor([2.0, -1.0, 0.5, 3.0, -2.0], dtype=torch.float64) + 0.1 * torch.randn(n, dtype=torch.float64)
    a, b = x.T @ x / n, x.T @ y / n

    def w_of(lam):
        return torch.linalg.solve(a + 2 * lam * torch.eye(d, dtype=torch.float64), b)

    c = 0.5 * float((w_of(0.0) ** 2).sum())  # half the squared norm of the unconstrained optimum: active
    lo, hi = 0.0, 100.0
    for _ in range(200):  # ||w(lam)||^2 decreases in lam
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if float((w_of(mid) ** 2).sum()) > c else (lo, mid)
    lam_star = (lo + hi) / 2
    w_star = w_of(lam_star)

    model = nn.Linear(d, 1, bias=False).double()
    method = _SquaredNorm(model)

    def loss(out, target):
        return 0.5 * ((out.squeeze(1) - target) ** 2).mean()

    problem = SparsityProblem(model, method, [Target(c, restarts=False)], loss_fn=loss)
    opt = build_optimizer(problem, PrimalOptimizer("sgd", lr=0.1), DualOptimizer("sgd", lr=0.5), scheme="alternating")
    for _ in range(3000):
        train_step(problem, opt, x, y, dual_restarts=False)
    torch.testing.assert_close(model.weight.detach().squeeze(0), w_star, rtol=0, atol=1e-6)
    assert problem.multiplier_values()["sqnorm_model"] == pytest.approx(lam_star, abs=1e-6)  # the KKT multiplier
    assert float((model.weight.detach() ** 2).sum()) == pytest.approx(c, rel=1e-6)  # the constraint is active


def test_layer_sparsity_proximal_step_through_the_problem_matches_its_closed_form():
    """One penalized step: SGD, then per regularised layer j neg <- (1 - lr lam r_j / ||neg||)_+ neg."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 5), nn.ReLU(), nn.Linear(5, 3)
    ).double()
    r = [1.0, 2.0, 0.5]
    layers = attach_layer_sparsity(model, weights=r, input_nonnegative=True)
    assert layers.layers == ["0", "2", "4"]
    lam, lr = 3.0, 0.05
    problem = SparsityProblem(model, layers, [Target(2, lam=lam, method="layers")], mode="penalized")
    opt = build_optimizer(problem, PrimalOptimizer("sgd", lr=lr))
    x = torch.rand(8, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (8,))
    loss = F.cross_entropy(model(x), y)
    params = [p for name in layers.layers for p in (model.get_submodule(name).weight, model.get_submodule(name).bias)]
    moved = [p.detach() - lr * g for p, g in zip(params, torch.autograd.grad(loss, params))]
    train_step(problem, opt, x, y)
    for j, name in enumerate(layers.layers):
        w, bias = moved[2 * j], moved[2 * j + 1]
        neg = torch.sqrt((w.clamp(max=0) ** 2).sum() + (bias.clamp(max=0) ** 2).sum())
        scale = max(0.0, 1.0 - lr * lam * r[j] / float(neg))
        for got, want in ((model.get_submodule(name).weight, w), (model.get_submodule(name).bias, bias)):
            closed = torch.where(want < 0, want * scale, want)
            torch.testing.assert_close(got.detach(), closed, rtol=1e-12, atol=1e-12)


def test_nan_and_infinite_settings_are_refused_where_they_are_given():
    from constrained_sparsity import HardConcreteGate
    from constrained_sparsity.methods.layers import negative_part_prox_

    for kwargs in (
        {"beta": float("nan")},
        {"gamma": float("nan")},
        {"zeta": float("inf")},
        {"droprate_init": float("nan")},
    ):
        with pytest.raises(ValueError, match="finite|should be in"):
            HardConcreteGate(3, **kwargs)
    problem = SparsityProblem(*_model(), [Target(0.3)])
    for primal, dual in (
        (PrimalOptimizer(lr=float("nan")), DualOptimizer()),
        (PrimalOptimizer(momentum=float("inf")), DualOptimizer()),
        (PrimalOptimizer(), DualOptimizer(lr=0.0)),
        (PrimalOptimizer(), DualOptimizer(kp=float("nan"))),
    ):
        with pytest.raises(ValueError, match=r"Optimizer\.\w+="):
            build_optimizer(problem, primal, dual)
    with pytest.raises(ValueError, match="threshold=nan"):
        negative_part_prox_([torch.zeros(2)], float("nan"))
    with pytest.raises(ValueError, match="weights=.*finite"):
        attach_layer_sparsity(
            nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 2)), weights=float("nan"), input_nonnegative=True
        )


@pytest.mark.parametrize(
    "attach, mode, match",
    [
        (lambda m: cs.attach_dns(m), "constrained", "use mode='projected'"),
        (lambda m: cs.attach_lwc(m), "penalized", "use mode='projected'"),
        (lambda m: cs.attach_l0(m), "projected", "runs in mode constrained or penalized"),
        (lambda m: cs.attach_ast(m, "rw_l1"), "projected", "runs in mode constrained or penalized"),
    ],
)
def test_a_problem_refuses_a_mode_its_method_does_not_have(attach, mode, match):
    mlp = cs.MLP(8, [6], 3)
    with pytest.raises(ValueError, match=match):
        cs.SparsityProblem(mlp, attach(mlp), [cs.Target(epsilon=0.5, lam=0.1)], mode=mode)


def _under_budget(equality: bool, **kw):
    """The test model with its first-layer gates closed (exact density 24 / 72), budget 0.5."""
    model, gates = _model()
    with torch.no_grad():
        model[0].l0_gate.log_alpha.fill_(-10.0)
    problem = SparsityProblem(model, gates, [Target(0.5, equality=equality)], mode="constrained", **kw)
    return model, gates, problem


@pytest.mark.parametrize("equality", [False, True])
def test_under_the_budget_an_equality_multiplier_turns_negative_and_is_never_restarted(equality):
    model, gates, problem = _under_budget(equality)
    kind = cooper.ConstraintType.EQUALITY if equality else cooper.ConstraintType.INEQUALITY
    assert problem.l0_model.constraint_type == kind
    opt = build_optimizer(problem, dual=DualOptimizer("sgd", lr=0.5))
    result = train_step(problem, opt, *_batch(), dual_restarts=True)
    # alternating (dual first): lambda_1 = 0 + lr * (exact - eps), projected on >= 0 for an inequality
    step = 0.5 * (24 / 72 - 0.5)
    assert problem.multiplier_values()["l0_model"] == pytest.approx(step if equality else 0.0)
    assert result["restarted"] == ([] if equality else ["l0_model"])


def test_a_negative_multiplier_enters_the_primal_step_as_lambda_times_g():
    """One alternating step of an equality under its budget is SGD on loss + lambda_1 * g with
    lambda_1 < 0 (the same hand-written loss as the penalised test): it opens gates."""
    lr, dual_lr = 0.1, 0.5
    x, y = _batch()
    model, gates, problem = _under_budget(True)
    reference = copy.deepcopy(model)
    opt = build_optimizer(problem, PrimalOptimizer("sgd", lr=lr), DualOptimizer("sgd", lr=dual_lr))
    torch.manual_seed(42)
    train_step(problem, opt, x, y)
    lam = dual_lr * (24 / 72 - 0.5)
    assert problem.multiplier_values()["l0_model"] == pytest.approx(lam)
    closed_grad, _ = _handwritten_step_matches(model, reference, x, y, lam, lr)
    assert (closed_grad < 0).all()  # descent raises the closed gates' log alpha


def test_an_equality_target_is_refused_where_it_means_nothing():
    model, gates = _model()
    with pytest.raises(ValueError, match="needs mode='constrained'"):
        SparsityProblem(model, gates, [Target(0.5, lam=1.0, equality=True)], mode="penalized")
    net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    cges = cs.attach_cges(net)
    with pytest.raises(ValueError, match="'cges' cannot aim at its budget from below"):
        SparsityProblem(net, cges, [Target(0.5, equality=True)])


@pytest.mark.parametrize("restarts", [False, True])
def test_an_equality_multiplier_is_restarted_once_the_measure_has_crossed_the_budget(restarts):
    """lambda > 0 pushed the density under the budget: a restart resets it (lambda < 0 under
    the budget is the equality at work, and is kept: the test above)."""
    model, gates, problem = _under_budget(True, lambda_init=1.0)
    opt = build_optimizer(problem, dual=DualOptimizer("sgd", lr=0.5))
    result = train_step(problem, opt, *_batch(), dual_restarts=restarts)
    after_dual_step = 1.0 + 0.5 * (24 / 72 - 0.5)
    assert after_dual_step > 0
    assert problem.multiplier_values()["l0_model"] == pytest.approx(0.0 if restarts else after_dual_step)
    assert result["restarted"] == (["l0_model"] if restarts else [])
