"""Units from the dependency graph (Torch-Pruning): the coupled groups of a network with BatchNorm
and residual adds, gates that close a unit everywhere, the deployable count, compaction."""

import itertools
import math

import pytest
import torch
from torch import nn

import constrained_sparsity as cs
from constrained_sparsity.compact import count_flops, count_params
from constrained_sparsity.export import load_compact, save_compact
from constrained_sparsity.methods.l0_units import attach_l0_units
from constrained_sparsity.models import ResNet
from constrained_sparsity.units import UnitError, trace_units

from .conftest import DEVICES


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x):
        return torch.relu(self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))) + x)


class TwoBlocks(nn.Module):
    """A user's ResNet-like model: stem, two residual blocks, adaptive average pooling, linear."""

    def __init__(self, c=6, classes=5):
        super().__init__()
        self.stem = nn.Conv2d(1, c, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c)
        self.b1, self.b2 = Block(c), Block(c)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, classes)

    def forward(self, x):
        x = torch.relu(self.bn(self.stem(x)))
        return self.fc(torch.flatten(self.pool(self.b2(self.b1(x))), 1))


def _randomise(model):
    """BatchNorm statistics and affine away from their defaults (so that a shift would show)."""
    torch.manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
                m.running_mean.uniform_(-0.3, 0.3)
                m.running_var.uniform_(0.5, 1.5)
    return model


def test_the_coupled_groups_of_two_residual_blocks_are_the_hand_checked_ones():
    model = TwoBlocks()
    graph = trace_units(model, torch.randn(1, 1, 8, 8))
    groups = {g.name: (g.size, set(g.layers)) for g in graph.groups}
    stream = {"stem", "bn", "b1.conv1", "b1.conv2", "b1.bn2", "b2.conv1", "b2.conv2", "b2.bn2", "fc"}
    assert groups == {
        "stem": (6, stream),  # the residual stream: written by stem, b1.conv2, b2.conv2; read by the convs and fc
        "b1.conv1": (6, {"b1.conv1", "b1.bn1", "b1.conv2"}),
        "b2.conv1": (6, {"b2.conv1", "b2.bn1", "b2.conv2"}),
    }
    units = {layer.name: (layer.out_units.tolist(), layer.in_units.tolist()) for layer in graph.layers}
    s, b1, b2 = list(range(0, 6)), list(range(6, 12)), list(range(12, 18))
    assert units["stem"] == (s, [-1])  # the image's channel is no unit
    assert units["b1.conv1"] == (b1, s) and units["b1.conv2"] == (s, b1) and units["b2.conv2"] == (s, b2)
    assert units["fc"] == ([-1] * 5, s)  # the logits are no units
    # the gates act after the BatchNorms, never between a conv and its BatchNorm
    assert graph.gate_sites == {
        "bn": "stem",
        "b1.bn1": "b1.conv1",
        "b1.bn2": "stem",
        "b2.bn1": "b2.conv1",
        "b2.bn2": "stem",
    }
    assert graph.count(torch.ones(18)) == sum(p.numel() for p in model.parameters())
    with pytest.raises(ValueError, match="weighting='macs'"):
        graph.count(torch.ones(18), "macs")


def _slice_conv(conv, out=None, inp=None):
    w = conv.weight
    w = w if out is None else w[out]
    w = w if inp is None else w[:, inp]
    new = nn.Conv2d(w.shape[1], w.shape[0], conv.kernel_size, padding=conv.padding, bias=False)
    new.weight.data.copy_(w)
    return new


def _slice_bn(bn, keep):
    new = nn.BatchNorm2d(len(keep))
    for name in ("weight", "bias", "running_mean", "running_var"):
        getattr(new, name).data.copy_(getattr(bn, name)[keep])
    return new


def test_closing_one_gate_equals_removing_the_channel_from_every_coupled_layer():
    model = _randomise(TwoBlocks()).eval()
    reference = _randomise(TwoBlocks()).eval()
    reference.load_state_dict(model.state_dict())
    x = torch.randn(4, 1, 8, 8)
    gates = attach_l0_units(model, x)
    with torch.no_grad():
        for g in gates.gates.values():
            g.log_alpha.fill_(10.0)  # open: z = 1 at test time
        gates.gates["stem"].log_alpha[2] = -10.0  # stream channel 2 closed
        gates.gates["b1-conv1"].log_alpha[4] = -10.0  # channel 4 inside block 1 closed
    # the same network with those channels sliced out of every layer by hand
    keep_s, keep_b1 = [0, 1, 3, 4, 5], [0, 1, 2, 3, 5]
    r = reference
    r.stem, r.bn = _slice_conv(r.stem, out=keep_s), _slice_bn(r.bn, keep_s)
    r.b1.conv1, r.b1.bn1 = _slice_conv(r.b1.conv1, out=keep_b1, inp=keep_s), _slice_bn(r.b1.bn1, keep_b1)
    r.b1.conv2, r.b1.bn2 = _slice_conv(r.b1.conv2, out=keep_s, inp=keep_b1), _slice_bn(r.b1.bn2, keep_s)
    r.b2.conv1 = _slice_conv(r.b2.conv1, inp=keep_s)
    r.b2.conv2, r.b2.bn2 = _slice_conv(r.b2.conv2, out=keep_s), _slice_bn(r.b2.bn2, keep_s)
    fc = nn.Linear(5, 5)
    fc.weight.data.copy_(r.fc.weight[:, keep_s])
    fc.bias.data.copy_(r.fc.bias)
    r.fc = fc
    r.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), r(x), rtol=0, atol=1e-6)


@pytest.mark.parametrize("training", [True, False])
def test_a_closed_channel_after_batchnorm_contributes_exactly_zero(training):
    model = _randomise(TwoBlocks())
    x = torch.randn(8, 1, 8, 8)
    gates = attach_l0_units(model, x)
    with torch.no_grad():
        gates.gates["stem"].log_alpha[1] = gates.gates["stem"].closed_value()
        gates.gates["b2-conv1"].log_alpha[0] = gates.gates["b2-conv1"].closed_value()
    seen = {}
    hooks = [
        getattr_path(model, name).register_forward_hook(lambda m, i, o, name=name: seen.__setitem__(name, o))
        for name in ("bn", "b1.bn2", "b2.bn1", "b2.bn2", "b1", "b2")
    ]
    model.train(training)
    model(x)
    for h in hooks:
        h.remove()
    for name in ("bn", "b1.bn2", "b2.bn2", "b1", "b2"):  # the stream's channel 1: zero wherever it is written
        assert torch.equal(seen[name][:, 1], torch.zeros_like(seen[name][:, 1])), name
    assert torch.equal(seen["b2.bn1"][:, 0], torch.zeros_like(seen["b2.bn1"][:, 0]))
    assert seen["b2.bn1"][:, 1].abs().sum() > 0  # an open channel is not


def getattr_path(model, name):
    for part in name.split("."):
        model = getattr(model, part)
    return model


def test_the_expected_count_is_the_expectation_over_every_open_closed_pattern():
    """Brute force over all 2^n patterns of a tiny network's units (independent gates)."""
    model = TwoBlocks(c=3)
    graph = trace_units(model, torch.randn(1, 1, 6, 6))
    assert graph.num_units == 9
    p = torch.rand(9, dtype=torch.float64)
    for weighting in ("params", "flops"):
        brute = 0.0
        for bits in itertools.product([0.0, 1.0], repeat=9):
            b = torch.tensor(bits, dtype=torch.float64)
            brute += float(torch.prod(torch.where(b > 0, p, 1 - p))) * float(graph.count(b, weighting))
        assert float(graph.count(p, weighting)) == pytest.approx(brute, rel=1e-12)


def _close_at_random(gates, share=0.4):
    torch.manual_seed(3)
    with torch.no_grad():
        for g in gates.gates.values():
            g.log_alpha.copy_(torch.where(torch.rand_like(g.log_alpha) < share, -10.0, torch.randn_like(g.log_alpha)))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("momentum", [0.1, None])
def test_a_gate_on_a_batchnorm_scales_gamma_and_beta_as_its_output_would_be_scaled(momentum, device):
    """The fused BatchNorm (gamma z, beta z) against the BatchNorm's output times z (a hook):
    the same outputs, gradients (log_alpha's included) and running statistics, training and eval."""
    import copy

    from constrained_sparsity.methods.l0_units import _GATE_ATTR, _fusable, _ScaleOutput, _unfuse

    model = _randomise(TwoBlocks(c=8, classes=5)).to(device)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = momentum
    x = torch.randn(6, 1, 12, 12, device=device)
    gates = attach_l0_units(model, x)
    _close_at_random(gates, share=0.3)
    fused = [m for m in model.modules() if _GATE_ATTR in m.__dict__]
    assert len(fused) == 5 and all(type(m) is nn.BatchNorm2d for m in fused)  # every gate site is a BatchNorm here
    hooked = copy.deepcopy(model)
    for m in hooked.modules():
        if _GATE_ATTR in m.__dict__:
            gate = m.__dict__[_GATE_ATTR]
            _unfuse(m)
            m.register_forward_hook(_ScaleOutput(gate))
    for training in (True, False):
        model.train(training)
        hooked.train(training)
        outputs = []
        for net in (model, hooked):
            torch.manual_seed(5)  # the same gate samples
            out = net(x)
            (out * torch.linspace(-1, 1, out.numel(), device=device).view_as(out)).sum().backward()
            outputs.append(out)
        torch.testing.assert_close(outputs[0], outputs[1], rtol=0, atol=1e-5)
        for (name, a), (_, b) in zip(model.named_parameters(), hooked.named_parameters()):
            assert (a.grad is None) == (b.grad is None), name
            if a.grad is not None:
                torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6, msg=name)
        for (name, a), (_, b) in zip(model.named_buffers(), hooked.named_buffers()):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)
        model.zero_grad()
        hooked.zero_grad()
    assert not _fusable(nn.SyncBatchNorm(4))  # its own forward: the gate stays a hook on its output
    gates.detach()
    assert not any("forward" in m.__dict__ or _GATE_ATTR in m.__dict__ for m in model.modules())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("which", ["resnet20", "user"])
@pytest.mark.parametrize("weighting", ["params", "flops"])
def test_compaction_keeps_the_outputs_and_counts_what_the_measure_reported(which, weighting, device, tmp_path):
    shape = (1, 16, 16)
    model = (ResNet.cifar(20, 1, 10) if which == "resnet20" else TwoBlocks(c=8, classes=10)).to(device)
    _randomise(model)
    x = torch.randn(6, *shape, device=device)
    gates = attach_l0_units(model, x, weighting=weighting)
    _close_at_random(gates)
    model.eval()
    with torch.no_grad():
        gated = model(x)
    small = cs.compact(model, shape, methods=[gates])
    with torch.no_grad():
        torch.testing.assert_close(small.module(x), gated, rtol=0, atol=1e-5)
    counted = count_params(small.module) if weighting == "params" else count_flops(small.module, shape)
    assert counted == gates.count()  # exactly what the exact measure counted
    # and both counts, whichever the budget weighs
    assert (gates.count("params"), gates.count("flops")) == (
        count_params(small.module),
        count_flops(small.module, shape),
    )
    dense = count_params(model) if weighting == "params" else count_flops(model, shape)
    assert float(gates.densities()[1]) * dense == pytest.approx(counted, abs=0.5)
    assert sum(small.removed.values()) > 0 and count_params(small.module) < count_params(model)
    # saved, then loaded back without the original object: the model rebuilt and resized
    if which == "resnet20":
        small.rebuild = {"name": "resnet20", "kwargs": {}, "input_shape": list(shape), "num_classes": 10}
        paths = save_compact(small, tmp_path, shape)
        loaded, info = load_compact(paths["model"])
        assert info["format"] == "units" and type(loaded) is ResNet
        program = torch.export.load(paths["program"]).module()
        with torch.no_grad():
            torch.testing.assert_close(loaded(x.cpu()), gated.cpu(), rtol=0, atol=1e-5)
            torch.testing.assert_close(program(x.cpu()), gated.cpu(), rtol=0, atol=1e-5)


@pytest.mark.parametrize("which", ["resnet20", "user"])
def test_folding_batchnorm_keeps_the_outputs_and_leaves_no_batchnorm(which, tmp_path):
    """``compact(fold_batchnorm=True)``: an inference network, each BatchNorm folded into the conv
    it alone reads; the gated network's outputs, the parameters of the unfolded compact network
    less the BatchNorms' plus the biases the convs gain; saved and loaded back, and exported."""
    shape = (1, 16, 16)
    model = ResNet.cifar(20, 1, 10) if which == "resnet20" else TwoBlocks(c=8, classes=10)
    _randomise(model)
    x = torch.randn(6, *shape)
    gates = attach_l0_units(model, x)
    _close_at_random(gates)
    model.eval()
    with torch.no_grad():
        gated = model(x)
    kept = cs.compact(model, shape, methods=[gates]).module
    small = cs.compact(model, shape, methods=[gates], fold_batchnorm=True)
    with torch.no_grad():
        torch.testing.assert_close(small.module(x), gated, rtol=0, atol=1e-5)
    bns = {n: m for n, m in kept.named_modules() if isinstance(m, nn.BatchNorm2d)}
    assert set(small.folded_batchnorm) == set(bns) and not any(
        isinstance(m, nn.BatchNorm2d) for m in small.module.modules()
    )
    layers = dict(kept.named_modules())
    gained = sum(layers[c].out_channels for c in small.folded_batchnorm.values() if layers[c].bias is None)
    assert count_params(small.module) == count_params(kept) - sum(2 * m.num_features for m in bns.values()) + gained
    small.rebuild = {
        "name": "resnet20" if which == "resnet20" else f"{__name__}:TwoBlocks",
        "kwargs": {} if which == "resnet20" else {"c": 8},
        "input_shape": list(shape),
        "num_classes": 10,
    }
    paths = save_compact(small, tmp_path, shape)
    loaded, info = load_compact(paths["model"])
    program = torch.export.load(paths["program"]).module()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), gated, rtol=0, atol=1e-5)
        torch.testing.assert_close(program(x), gated, rtol=0, atol=1e-5)
    assert info["folded_batchnorm"] == small.folded_batchnorm and count_params(loaded) == count_params(small.module)


class SharedOutput(nn.Module):
    """A conv whose output goes to its BatchNorm and to the add: folding would change the add."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        return self.bn2(self.conv2(self.bn(y) + y))


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
            return self.bn(self.conv(x))
        return self.conv(x)


def test_folding_batchnorm_folds_only_a_layer_it_alone_reads_and_refuses_an_untraceable_network():
    from constrained_sparsity.compact import fold_batchnorm_

    model = _randomise(SharedOutput()).eval()
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        before = model(x)
        assert fold_batchnorm_(model) == {"bn2": "conv2"}
        torch.testing.assert_close(model(x), before, rtol=0, atol=1e-5)
    assert isinstance(model.bn, nn.BatchNorm2d) and isinstance(model.bn2, nn.Identity)
    with pytest.raises(TypeError, match=r"^folding BatchNorm needs a network torch.fx can trace \(.+\)$"):
        fold_batchnorm_(Untraceable())


class WithLayerNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.norm, self.fc2 = nn.Linear(8, 8), nn.LayerNorm(8), nn.Linear(8, 3)

    def forward(self, x):
        return self.fc2(self.norm(self.fc1(x)))


class TupleOutput(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x):
        return self.fc2(self.fc1(x)), x


@pytest.mark.parametrize(
    "model, match",
    [
        (WithLayerNorm(), "layer 'norm' \\(LayerNorm\\) has parameters of a kind units do not support"),
        (TupleOutput(), "cannot tell which layer gives the network's output"),
        (nn.Sequential(nn.Conv2d(4, 4, 3, groups=2), nn.Flatten()), "grouped convolutions other than depthwise"),
        (nn.Sequential(nn.Flatten()), "the Sequential has no parameter: no unit to gate"),
    ],
)
def test_unsupported_networks_are_refused_in_one_line(model, match):
    x = torch.randn(2, 4, 5, 5) if isinstance(model, nn.Sequential) else torch.randn(2, 8)
    with pytest.raises(UnitError, match=match) as info:
        attach_l0_units(model, x)
    assert "\n" not in str(info.value)


def test_a_constrained_run_in_the_users_loop_meets_a_deployable_budget():
    torch.manual_seed(0)
    digits = cs.load_dataset("digits")
    model = TwoBlocks(c=8, classes=10)
    x = digits.train_x[:64].view(-1, 1, 8, 8)
    gates = attach_l0_units(model, x)
    problem = cs.SparsityProblem(model, gates, [cs.Target(epsilon=0.4, name="params")], mode="constrained")
    optimizer = cs.build_optimizer(
        problem, primal=cs.PrimalOptimizer("adam", lr=3e-3, gate_lr=3e-2), dual=cs.DualOptimizer("sgd", lr=0.05)
    )

    model.train()
    for epoch in range(4):
        for xb, yb in cs.data.batches(digits.train_x, digits.train_y, 64, torch.Generator().manual_seed(epoch)):
            cs.train_step(problem, optimizer, xb.view(-1, 1, 8, 8), yb)
    problem.project_()
    assert problem.violations()["params"][1] <= 0
    small = cs.compact(model, (1, 8, 8), methods=[gates])
    assert count_params(small.module) == gates.count() <= math.floor(0.4 * count_params(model))


@pytest.mark.slow
def test_csparse_trains_a_resnet_to_a_deployable_budget_and_compacts_it(tmp_path):
    import json
    import subprocess
    import sys

    run_dir = tmp_path / "run"
    common = ["tracking.wandb=disabled", "tracking.progress=false", "train.threads=1"]
    cfg = cs.load_config(
        "fashion_resnet20_l0_units_constrained",
        ["data.name=digits", "data.batch_size=64", "train.epochs=4", "sparsity.targets=0.4", *common],
    )
    result = cs.run(cfg, run_dir=run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert result.feasible is True and summary["density"]["model"] <= 0.4
    compaction = summary["compaction"]
    # the exact measure is the compact network's parameter count over the dense one's
    assert compaction["params_before"] == 272_186 and compaction["params_after"] < 0.4 * 272_186
    assert summary["density"]["model"] * compaction["params_before"] == pytest.approx(
        compaction["params_after"], abs=0.5
    )
    proc = subprocess.run(
        [sys.executable, "-m", "constrained_sparsity", "compact", str(run_dir)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"parameters: 272186 -> {compaction['params_after']}" in proc.stdout
    loaded, info = load_compact(run_dir / "compact" / "model.pt")  # rebuilt from its model name, resized
    assert info["rebuild"]["name"] == "resnet20" and count_params(loaded) == compaction["params_after"]
    digits = cs.load_dataset("digits")
    assert cs.error_rate(loaded, digits.test_x, digits.test_y) == pytest.approx(result.test_error)
    # the inference network: every BatchNorm folded into its conv, the same test error
    proc = subprocess.run(
        [sys.executable, "-m", "constrained_sparsity", "compact", str(run_dir), "--fold-batchnorm"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "BatchNorm folded into the layer before it: 21 (an inference network)" in proc.stdout
    folded, info = load_compact(run_dir / "compact" / "model.pt")
    assert len(info["folded_batchnorm"]) == 21 and count_params(folded) < compaction["params_after"]
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert cs.error_rate(folded, digits.test_x, digits.test_y) == pytest.approx(result.test_error, abs=1 / 360)


def test_on_a_chain_the_units_are_its_hidden_neurons_and_the_gates_leave_its_forward_alone():
    """An nn.Sequential runs every child: the gates are kept on its first layer, not beside it."""
    torch.manual_seed(0)
    mlp = cs.MLP(64, [32, 16], 10)
    x = torch.randn(5, 64)
    units = attach_l0_units(mlp, x)
    assert [(g.name, g.size) for g in units.graph.groups] == [("fc1", 32), ("fc2", 16)]
    assert units.host == "flatten" and count_params(mlp) == 64 * 32 + 32 + 32 * 16 + 16 + 16 * 10 + 10
    _close_at_random(units)
    mlp.eval()
    small = cs.compact(mlp, (64,), methods=[units])
    with torch.no_grad():
        torch.testing.assert_close(small.module(x), mlp(x), rtol=0, atol=1e-6)
    assert count_params(small.module) == units.count()


def test_compaction_refuses_two_unit_methods_on_one_model():
    """Each unit method numbers the units of the network it was attached to: pruning one after the
    other would cut the wrong channels, so compaction takes one."""
    model, x = TwoBlocks(c=4), torch.randn(2, 1, 8, 8)
    groups = cs.attach_cges_units(model, x)  # first: it traces the network alone
    gates = attach_l0_units(model, x)
    with pytest.raises(
        ValueError, match="^compaction removes the units of one unit method; this model has l0_units, cges_units$"
    ):
        cs.compact(model, (1, 8, 8), methods=[gates, groups])
