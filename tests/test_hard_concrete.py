"""Hard-concrete gates against closed forms and Monte Carlo (Louizos et al. 2018, eqs. 10-13)."""

import copy
import math

import pytest
import torch
from torch import nn

from constrained_sparsity import HardConcreteGate, attach_l0
from constrained_sparsity.compact import count_flops
from constrained_sparsity.methods import l0 as hard_concrete

BETA, GAMMA, ZETA = 2.0 / 3.0, -0.1, 1.1
N_SAMPLES = 200_000


def _gate(log_alpha):
    gate = HardConcreteGate(len(log_alpha))
    with torch.no_grad():
        gate.log_alpha.copy_(torch.tensor(log_alpha))
    return gate


def _samples(log_alpha, n=N_SAMPLES):
    """n independent samples of each gate, drawn in one vectorised call: shape (n, gates)."""
    big = _gate(list(log_alpha) * n)
    return big.sample().detach().view(n, len(log_alpha))


def _mc_tolerance(p: torch.Tensor) -> torch.Tensor:
    # 5 standard errors of a Bernoulli frequency, plus a floor for p near 0 or 1.
    return 5 * torch.sqrt(p * (1 - p) / N_SAMPLES) + 1e-4


def test_expected_l0_matches_monte_carlo():
    torch.manual_seed(0)
    gate = _gate([-3.0, -1.0, 0.0, 0.5, 2.0, 4.0])
    samples = _samples(gate.log_alpha.tolist())
    freq = (samples != 0).double().mean(0)
    closed = gate.prob_nonzero().detach().double()
    expected = torch.sigmoid(gate.log_alpha.detach().double() - BETA * math.log(-GAMMA / ZETA))
    torch.testing.assert_close(closed, expected)
    assert ((freq - closed).abs() <= _mc_tolerance(closed)).all(), (freq, closed)


def test_probability_of_exact_one_matches_closed_form():
    # z = 1 iff s >= (1 - gamma) / (zeta - gamma) = t, and P(s >= t) = sigmoid(log_alpha - beta * logit(t)).
    torch.manual_seed(1)
    gate = _gate([-1.0, 0.0, 1.5])
    samples = _samples(gate.log_alpha.tolist())
    t = (1 - GAMMA) / (ZETA - GAMMA)
    closed = torch.sigmoid(gate.log_alpha.detach().double() - BETA * math.log(t / (1 - t)))
    freq = (samples == 1).double().mean(0)
    assert ((freq - closed).abs() <= _mc_tolerance(closed)).all(), (freq, closed)


def test_samples_lie_in_unit_interval_and_hit_both_ends():
    torch.manual_seed(2)
    z = _samples([0.0], 20_000)
    assert z.min() >= 0 and z.max() <= 1
    assert (z == 0).any() and (z == 1).any()
    assert ((z > 0) & (z < 1)).any()


def test_test_time_gate_rule():
    log_alpha = torch.tensor([-10.0, -2.5, -2.3, 0.0, 10.0])
    gate = _gate(log_alpha.tolist())
    expected = torch.clamp(torch.sigmoid(log_alpha) * (ZETA - GAMMA) + GAMMA, 0, 1)
    torch.testing.assert_close(gate.deterministic().detach(), expected)
    # z_test > 0 iff sigmoid(log_alpha) > -gamma / (zeta - gamma), i.e. log_alpha > logit(1/12) = -2.3979
    assert gate.active().tolist() == [False, False, True, True, True]
    assert gate.deterministic()[0] == 0 and gate.deterministic()[-1] == 1
    gate.eval()
    torch.testing.assert_close(gate().detach(), expected)


def test_linear_input_gates_match_manual_forward():
    torch.manual_seed(3)
    layer = nn.Linear(5, 3)
    w, b = layer.weight.detach().clone(), layer.bias.detach().clone()
    gates = attach_l0(nn.Sequential(layer), structure="input")
    gate = dict(gates.named_gates())["0"]
    with torch.no_grad():
        gate.log_alpha.copy_(torch.tensor([-5.0, 0.0, 1.0, -1.0, 5.0]))
    x = torch.randn(4, 5)
    layer.eval()
    z = gate.deterministic().detach()
    torch.testing.assert_close(layer(x), (x * z) @ w.T + b)
    assert gates.report()[0].params_per_gate == 3


def test_conv_output_gates_silence_channels_including_bias():
    torch.manual_seed(4)
    conv = nn.Conv2d(2, 4, 3)
    conv.bias.data.fill_(0.7)
    gates = attach_l0(conv_model := nn.Sequential(conv))
    gate = dict(gates.named_gates())["0"]
    with torch.no_grad():
        gate.log_alpha.copy_(torch.tensor([-20.0, 20.0, -20.0, 20.0]))
    x = torch.randn(2, 2, 6, 6)
    conv_model.train()  # sampled gates: channels 0 and 2 are exactly 0 with probability ~1
    y = conv_model(x)
    assert torch.all(y[:, [0, 2]] == 0)
    assert torch.all(y[:, [1, 3]] != 0)
    report = gates.report()[0]
    assert report.structure == "output" and report.params_per_gate == 2 * 9 + 1


def test_one_sample_per_forward_pass():
    torch.manual_seed(5)
    layer = nn.Linear(50, 2)
    model = nn.Sequential(layer)
    attach_l0(model)
    gate = layer.l0_gate
    model.train()
    model(torch.randn(1, 50))
    first = gate().detach().clone()
    assert torch.equal(gate().detach(), first)  # no new sample outside a forward pass
    model(torch.randn(1, 50))
    assert not torch.equal(gate().detach(), first)


def test_model_wise_density_weights_gates_by_parameters():
    model = nn.Sequential(nn.Linear(4, 10), nn.ReLU(), nn.Linear(10, 2))
    gates = attach_l0(model)
    with torch.no_grad():
        model[0].l0_gate.log_alpha.copy_(torch.tensor([5.0, 5.0, -5.0, -5.0]))  # 2 of 4 on, 10 params each
        model[2].l0_gate.log_alpha.fill_(5.0)  # 10 of 10 on, 2 params each
    assert gates.exact_density().item() == pytest.approx((2 * 10 + 10 * 2) / (4 * 10 + 10 * 2))
    assert gates.exact_density(["0"]).item() == pytest.approx(0.5)
    p0 = model[0].l0_gate.prob_nonzero().detach()
    p2 = model[2].l0_gate.prob_nonzero().detach()
    expected = (10 * p0.sum() + 2 * p2.sum()) / 60
    torch.testing.assert_close(gates.expected_density().detach(), expected)
    assert gates.expected_density().requires_grad


def test_weight_gates_and_detach_bake_test_time_weights():
    torch.manual_seed(6)
    layer = nn.Linear(3, 2)
    model = nn.Sequential(layer)
    gates = attach_l0(model, structure="weight")
    assert layer.l0_gate.num_gates == 6
    model.eval()
    x = torch.randn(5, 3)
    before = model(x).detach()
    gates.detach()
    assert not hasattr(layer, "l0_gate")
    assert isinstance(layer.weight, nn.Parameter)
    torch.testing.assert_close(model(x), before)


def test_attach_errors_name_the_layer():
    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
    with pytest.raises(TypeError, match="layer '1' is a ReLU"):
        attach_l0(model, layers=["1"])
    with pytest.raises(ValueError, match=r"layers=\['nope'\] not found"):
        attach_l0(model, layers=["nope"])
    with pytest.raises(ValueError, match="structure='rows'"):
        attach_l0(model, structure="rows")
    with pytest.raises(ValueError, match="droprate_init=1.5"):
        HardConcreteGate(3, droprate_init=1.5)


class _TwoLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(12, 9)
        self.b = nn.Linear(9, 4, bias=False)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


@pytest.mark.parametrize("skip", [True, False], ids=["skip-columns", "multiply"])
@pytest.mark.parametrize("closed", [0.0, 0.5, 1.0])
def test_fast_input_gated_linear_equals_parametrized_layer(closed, skip, monkeypatch):
    """The column-skipping forward/backward gives the parametrized layer's values and gradients.

    Float64, tolerance 1e-12: the two paths differ only in summation order (closed columns
    contribute exact zeros). ``closed`` is the fraction of gates forced shut; 1.0 closes a
    whole layer, which must still give an output (the bias).
    """
    if skip:  # make these small layers take the column-skipping path
        monkeypatch.setattr(hard_concrete, "_SKIP_MIN_WEIGHTS", 0)
        monkeypatch.setattr(hard_concrete, "_SKIP_MAX_OPEN", 1.0)
    torch.manual_seed(0)
    fast, slow = _TwoLinear().double(), _TwoLinear().double()
    slow.load_state_dict(fast.state_dict())
    gates_fast, gates_slow = attach_l0(fast, fast=True), attach_l0(slow, fast=False)
    assert "forward" in fast.a.__dict__ and "forward" not in slow.a.__dict__
    for (_, gf), (_, gs) in zip(gates_fast.named_gates(), gates_slow.named_gates()):
        with torch.no_grad():
            gf.log_alpha.normal_(0.0, 2.0)
            gf.log_alpha[: int(closed * gf.num_gates)] = -30.0  # z = 0 in every sample
            gs.log_alpha.copy_(gf.log_alpha)
    x = torch.randn(3, 5, 12, dtype=torch.float64, requires_grad=True)  # extra leading dim
    x2 = x.detach().clone().requires_grad_(True)
    for _ in range(3):  # fresh samples each pass, the same in both models
        torch.manual_seed(1)
        out_fast = fast(x)
        torch.manual_seed(1)
        out_slow = slow(x2)
        torch.testing.assert_close(out_fast, out_slow, rtol=1e-12, atol=1e-12)
        weights = torch.randn_like(out_fast)
        (out_fast * weights).sum().backward()
        (out_slow * weights).sum().backward()
        torch.testing.assert_close(x.grad, x2.grad, rtol=1e-12, atol=1e-12)
        for (name, p), (_, q) in zip(fast.named_parameters(), slow.named_parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-12, atol=1e-12, msg=name)
    fast.eval()
    slow.eval()
    torch.testing.assert_close(fast(x), slow(x2), rtol=1e-12, atol=1e-12)
    gates_fast.detach()
    assert "forward" not in fast.a.__dict__  # back to nn.Linear.forward


def test_sample_with_derivative_matches_autograd():
    gate = HardConcreteGate(500).double()
    with torch.no_grad():
        gate.log_alpha.normal_(0.0, 2.0)
    torch.manual_seed(3)
    z_ref = gate.sample()
    (grad_ref,) = torch.autograd.grad(z_ref.sum(), gate.log_alpha)
    torch.manual_seed(3)
    z, dz = gate.sample_with_derivative()
    torch.testing.assert_close(z, z_ref.detach(), rtol=0, atol=1e-12)
    torch.testing.assert_close(dz, grad_ref, rtol=1e-9, atol=1e-12)
    assert (dz[(z == 0) | (z == 1)] == 0).all() and ((z == 0).any() and (z == 1).any())


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "parametrized"])
def test_model_forward_draws_every_sample_at_once(fast):
    """Calling the model draws one noise vector for all its gates, in layer order; each layer
    consumes its part, with the value and log-alpha gradient of the autograd formula (eq. 10)."""
    model = nn.Sequential(nn.Linear(7, 5), nn.ReLU(), nn.Linear(5, 3)).double()
    gates = attach_l0(model, fast=fast)
    with torch.no_grad():
        for _, gate in gates.named_gates():
            gate.log_alpha.normal_(0.0, 2.0)
    model.train()
    x = torch.randn(4, 7, dtype=torch.float64)
    torch.manual_seed(11)
    out = model(x)
    torch.manual_seed(11)
    u = torch.rand(7 + 5, dtype=torch.float64)
    (g0, g2) = (g for _, g in gates.named_gates())
    z0, z2 = g0.sample(u=u[:7]), g2.sample(u=u[7:])
    torch.testing.assert_close(g0().detach(), z0.detach(), rtol=0, atol=1e-12)
    torch.testing.assert_close(g2().detach(), z2.detach(), rtol=0, atol=1e-12)
    # the same network written with the reference samples, by hand
    ref = torch.nn.functional.linear(
        torch.relu(torch.nn.functional.linear(x * z0, model[0].parametrizations.weight.original, model[0].bias)) * z2,
        model[2].parametrizations.weight.original,
        model[2].bias,
    )
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    r = torch.randn_like(out)
    grads = torch.autograd.grad((out * r).sum(), [g0.log_alpha, g2.log_alpha])
    refs = torch.autograd.grad((ref * r).sum(), [g0.log_alpha, g2.log_alpha])
    for got, want in zip(grads, refs):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


def test_layer_called_alone_draws_its_own_sample_and_stale_samples_are_not_used():
    model = nn.Sequential(nn.Linear(40, 30), nn.ReLU(), nn.Linear(30, 2))
    gates = attach_l0(model)
    model.train()
    x = torch.randn(2, 40)
    model[0](x)
    first = model[0].l0_gate().clone()
    model[0](x)  # no model call in between: a new sample, not the last one again
    assert not torch.equal(model[0].l0_gate(), first)
    model(x)  # draws for both layers, and both parts are used
    assert model[0].l0_gate._pending is None and model[2].l0_gate._pending is None
    hook = gates._draw_hook.hooks_dict_ref()[gates._draw_hook.id]
    hook(model, ())  # a sample drawn ahead is used by the next forward of its layer ...
    drawn = model[0].l0_gate._pending[0].clone()
    model[0](x)
    assert torch.equal(model[0].l0_gate(), drawn)
    hook(model, ())
    drawn = model[0].l0_gate._pending[0].clone()
    with torch.no_grad():
        model[0].l0_gate.log_alpha.add_(1.0)  # ... but not once log_alpha has changed
    model[0](x)
    assert not torch.equal(model[0].l0_gate(), drawn)


def test_density_gradient_matches_autograd_of_the_formula():
    """The one-node density measure has the gradient of eq. 12 written with autograd ops."""
    model = nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 3)).double()
    gates = attach_l0(model)
    with torch.no_grad():
        for _, gate in gates.named_gates():
            gate.log_alpha.normal_(0.0, 3.0)
    g0, g2 = (g for _, g in gates.named_gates())
    for layers in (None, ["2"]):
        expected, exact = gates.densities(layers)
        params = [g0.log_alpha, g2.log_alpha]
        got = torch.autograd.grad(3.0 * expected, params, allow_unused=True)
        if layers is None:
            ref = (4 * g0.prob_nonzero().sum() + 3 * g2.prob_nonzero().sum()) / (6 * 4 + 4 * 3)
            ref_exact = (4 * int(g0.active().sum()) + 3 * int(g2.active().sum())) / 36
        else:
            ref, ref_exact = g2.prob_nonzero().mean(), int(g2.active().sum()) / 4
        want = torch.autograd.grad(3.0 * ref, params, allow_unused=True)
        torch.testing.assert_close(expected, ref, rtol=1e-12, atol=0)
        assert exact.item() == pytest.approx(ref_exact, abs=1e-15) and not exact.requires_grad
        for a, b in zip(got, want):
            if b is None:
                assert a is None or not a.any()
            else:
                torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-14)
    assert torch.autograd.gradcheck(
        lambda la: hard_concrete._Densities.apply(torch.full((6,), 1 / 6.0, dtype=torch.float64), g0, la)[0],
        (g0.log_alpha.detach().clone().requires_grad_(),),
    )


def _conv_linear_chain() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(36, 5), nn.ReLU(), nn.Linear(5, 2)
    )


class _NotAChain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = _conv_linear_chain()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def test_flop_weighting_of_a_chain_against_hand_computed_flops():
    model = _conv_linear_chain()
    gates = attach_l0(model)  # conv: 4 output-channel gates; linear: 36 and 5 input gates
    costs = gates.weight_by_flops(model, torch.zeros(3, 1, 8, 8))
    # the linear proxy's cost per gate: conv output channel 2 x (1 x 3 x 3) x 6 x 6 pixels; linear input 2 x out
    assert costs == {"0": 2 * 9 * 36, "4": 2 * 5, "6": 2 * 2}
    assert gates.weighting == "flops"
    with torch.no_grad():
        model[0].l0_gate.log_alpha.copy_(torch.tensor([5.0, -5.0, -5.0, -5.0]))  # 1 of 4 channels
        model[4].l0_gate.log_alpha.fill_(5.0)
        model[6].l0_gate.log_alpha.copy_(torch.tensor([5.0, 5.0, -5.0, -5.0, -5.0]))  # 2 of 5 hidden units
    # conv: 1 input x 1 open channel; fc1: the 9 inputs of the open channel x 2 read outputs; fc2: 2 x 2
    dense = 2 * 36 * 9 * 4 + 2 * 36 * 5 + 2 * 5 * 2
    assert dense == count_flops(model, (1, 8, 8))
    want = (2 * 36 * 9 * 1 + 2 * 9 * 2 + 2 * 2 * 2) / dense
    assert gates.exact_density().item() == pytest.approx(want, rel=1e-6)
    assert gates.exact_density(["4"]).item() == pytest.approx(9 * 2 / (36 * 5), rel=1e-6)  # one layer's FLOPs


def test_flop_weighting_falls_back_to_the_linear_proxy_off_a_chain():
    model = _NotAChain()
    gates = attach_l0(model)
    with pytest.warns(UserWarning, match="not an nn.Sequential"):
        costs = gates.weight_by_flops(model, torch.zeros(1, 1, 8, 8))
    assert costs == {"body.0": 2 * 9 * 36, "body.4": 2 * 5, "body.6": 2 * 2}
    with torch.no_grad():
        model.body[0].l0_gate.log_alpha.copy_(torch.tensor([5.0, -5.0, -5.0, -5.0]))
        model.body[4].l0_gate.log_alpha.fill_(5.0)
        model.body[6].l0_gate.log_alpha.fill_(5.0)
    want = (1 * 648 + 36 * 10 + 5 * 4) / (4 * 648 + 36 * 10 + 5 * 4)  # each gate its own layer's FLOPs
    assert gates.exact_density().item() == pytest.approx(want)
    assert gates.exact_density(["body.0"]).item() == pytest.approx(0.25)


def test_expected_flops_of_a_chain_equal_brute_force_over_all_gate_states():
    # conv 1 -> 2 channels (2 output gates), flatten 2 x 2 x 2 -> fc1 8 -> 3 (8 input gates),
    # fc2 3 -> 2 (3 input gates): 13 gates, 8,192 states.
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 2, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8, 3), nn.ReLU(), nn.Linear(3, 2)
    ).double()
    gates = attach_l0(model)
    gates.weight_by_flops(model, torch.zeros(1, 1, 6, 6, dtype=torch.float64))
    conv, fc1, fc2 = model[0].l0_gate, model[4].l0_gate, model[6].l0_gate
    with torch.no_grad():
        for g in (conv, fc1, fc2):
            g.log_alpha.copy_(torch.randn(g.num_gates, dtype=torch.float64) * 2)
    p = torch.cat([g.prob_nonzero() for g in (conv, fc1, fc2)]).tolist()
    expected = 0.0
    for state in range(1 << 13):
        on = [(state >> j) & 1 for j in range(13)]
        c, f1, f2 = on[:2], on[2:10], on[10:]
        weight = math.prod(p[j] if on[j] else 1 - p[j] for j in range(13))
        conv_out = sum(c[k] and any(f1[4 * k : 4 * k + 4]) for k in range(2))  # read by fc1 through an open input
        fc1_in = 4 * conv_out  # a flattened channel's 4 inputs are kept or removed together
        flops = 2 * 16 * 9 * 1 * conv_out + 2 * fc1_in * sum(f2) + 2 * sum(f2) * 2
        expected += weight * flops
    dense = 2 * 16 * 9 * 2 + 2 * 8 * 3 + 2 * 3 * 2
    assert dense == count_flops(copy.deepcopy(model).float(), (1, 6, 6))
    got, _ = gates.densities()
    assert got.item() == pytest.approx(expected / dense, rel=1e-12)
    # its gradient against central differences, one log_alpha at a time
    grads = torch.autograd.grad(got, [g.log_alpha for g in (conv, fc1, fc2)])
    h = 1e-6
    for g, grad in zip((conv, fc1, fc2), grads):
        for j in range(g.num_gates):
            with torch.no_grad():
                g.log_alpha[j] += h
                up = gates.densities()[0].item()
                g.log_alpha[j] -= 2 * h
                down = gates.densities()[0].item()
                g.log_alpha[j] += h
            assert grad[j].item() == pytest.approx((up - down) / (2 * h), rel=1e-5, abs=1e-10)


def test_a_deep_copy_draws_for_its_own_gates():
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    attach_l0(model)
    copied = copy.deepcopy(model)
    (hook,) = copied._forward_pre_hooks.values()
    assert hook.gates[0] is copied[0].l0_gate and hook.gates[1] is copied[2].l0_gate
    copied.train()
    hook(copied, ())
    assert copied[0].l0_gate._pending is not None and model[0].l0_gate._pending is None
