"""Compaction: equal outputs, fresh-process loading, hand-checked counts, the CLI."""

import json
import subprocess
import sys
import textwrap
import warnings
from collections import OrderedDict

import pytest
import torch
from torch import nn

from constrained_sparsity import MLP, LeNet5Caffe, attach_l0
from constrained_sparsity.compact import (
    MaxPool2x2,
    active_inputs,
    compact,
    count_flops,
    count_params,
    describe,
    fast_pooling,
)
from constrained_sparsity.export import load_compact, save_compact
from constrained_sparsity.runs import evaluate

from .test_train import DIGITS, ROOT

TOL = 1e-12  # float64: compaction drops exact zeros and folds exact constants


def _gated(model, closed=0.5, seed=0, layers=None):
    torch.manual_seed(seed)
    model = model.double()
    gates = attach_l0(model, layers=layers)
    with torch.no_grad():
        for _, gate in gates.named_gates():
            gate.log_alpha.normal_(0.0, 2.0)
            n = int(closed * gate.num_gates)
            gate.log_alpha[torch.randperm(gate.num_gates)[:n]] = -20.0  # test-time gate exactly 0
    return model.eval(), gates


class UserNet(nn.Sequential):
    """A user-defined conv + linear network (not one of the library's models)."""

    def __init__(self):
        super().__init__(
            OrderedDict(
                conv_a=nn.Conv2d(3, 8, 3, padding=1),
                act_a=nn.ReLU(),
                conv_b=nn.Conv2d(8, 6, 3),
                act_b=nn.ReLU(),
                pool=nn.MaxPool2d(2),
                flat=nn.Flatten(),
                head=nn.Linear(6 * 3 * 3, 12),
                act_c=nn.ReLU(),
                drop=nn.Dropout(0.1),
                out=nn.Linear(12, 4),
            )
        )


@pytest.mark.parametrize(
    ("make", "shape"),
    [(lambda: MLP(20, [15, 9], 4), (20,)), (LeNet5Caffe, (1, 28, 28)), (UserNet, (3, 8, 8))],
    ids=["mlp", "lenet5", "user-conv-linear"],
)
@pytest.mark.parametrize("closed", [0.3, 0.7])
def test_compact_outputs_equal_gated_test_time_outputs(make, shape, closed):
    model, _ = _gated(make(), closed)
    compacted = compact(model, shape)
    x = torch.rand(7, *shape, dtype=torch.float64)
    torch.testing.assert_close(compacted.module(x), model(x), rtol=TOL, atol=TOL)
    assert count_params(compacted.module) < count_params(model)
    assert compacted.removed
    for m in compacted.module.modules():  # plain layers only (MaxPool2x2 is an nn.MaxPool2d(2))
        assert type(m) in (nn.Sequential, nn.Linear, nn.Conv2d, nn.ReLU, MaxPool2x2, nn.Flatten, nn.Dropout)


def test_saved_layers_keep_every_setting(tmp_path):
    """Dilation, padding modes, "same" padding, pooling padding and ceil mode survive saving."""
    model = nn.Sequential(
        OrderedDict(
            conv_a=nn.Conv2d(2, 6, 3, padding=2, dilation=2, padding_mode="reflect"),
            act_a=nn.ReLU(),
            pool_a=nn.MaxPool2d(3, 2, padding=1, ceil_mode=True),
            conv_b=nn.Conv2d(6, 5, 3, padding="same", padding_mode="circular"),
            act_b=nn.ReLU(),
            flat=nn.Flatten(1, -1),
            head=nn.Linear(5 * 6 * 6, 3),
        )
    )
    model, _ = _gated(model, closed=0.3)
    compacted = compact(model, (2, 11, 11))
    x = torch.rand(4, 2, 11, 11, dtype=torch.float64)
    torch.testing.assert_close(compacted.module(x), model(x), rtol=TOL, atol=TOL)
    paths = save_compact(compacted, tmp_path, (2, 11, 11))
    loaded, _ = load_compact(paths["model"])
    program = torch.export.load(paths["program"]).module()
    for net in (loaded, program):
        torch.testing.assert_close(net(x.float()), model(x).float(), rtol=1e-5, atol=1e-5)


def test_select_inputs_drops_the_first_layers_closed_inputs(tmp_path):
    model, gates = _gated(MLP(30, [12], 4), closed=0.6)
    open_inputs = int(dict(gates.named_gates())["fc1"].active().sum())
    compacted = compact(model, (30,), select_inputs=True)
    assert compacted.module.fc1.in_features == open_inputs < 30
    assert describe(compacted.module, (30,)).startswith(f"{open_inputs}-")
    x = torch.rand(5, 30, dtype=torch.float64)
    torch.testing.assert_close(compacted.module(x), model(x), rtol=TOL, atol=TOL)
    loaded, _ = load_compact(save_compact(compacted, tmp_path, (30,))["model"])
    assert compacted.module.fc1.weight.dtype == torch.float64  # saving (as float32) left it alone
    torch.testing.assert_close(loaded(x.float()), model(x).float(), rtol=1e-5, atol=1e-5)


def test_active_inputs_count_only_features_that_can_change_the_output():
    model = MLP(6, [4, 3], 2).double().eval()
    with torch.no_grad():
        model.fc1.weight[:, [0, 5]] = 0.0  # inputs 0 and 5 unread: 4 of 6
        model.fc1.weight[2] = 0.0  # unit 2 of fc1 is the constant relu(b_2): fc2 reads 3 of 4
        model.fc2.weight[:, 1] = 0.0  # and unit 1 is unread: 2 of 4
    assert active_inputs(model, (6,)) == [4, 2, 3]
    lenet = LeNet5Caffe().double().eval()
    with torch.no_grad():
        lenet.conv2.weight[7:] = 0.0  # conv2 keeps 7 of 50 channels; fc1 still reads all 800 inputs
        lenet.conv2.bias[7:] = 0.0
        lenet.fc1.weight[:300] = 0.0  # fc1 keeps 200 of 500 units
        lenet.fc1.bias[:300] = 0.0
        lenet.fc1.weight[:, [0, 1, 17, 700]] = 0.0  # single features unread (700: a removed channel)
    assert (lenet.fc1.weight != 0).any(dim=0).sum() == 800 - 4
    assert active_inputs(lenet, (1, 28, 28)) == [7 * 16 - 3, 200]


def test_a_layer_with_every_unit_pruned_still_gives_an_output():
    model, gates = _gated(MLP(10, [8, 6], 3), closed=0.0)
    with torch.no_grad():
        dict(gates.named_gates())["fc2"].log_alpha.fill_(-20.0)  # every input of fc2 closed
    compacted = compact(model, (10,))
    x = torch.rand(5, 10, dtype=torch.float64)
    torch.testing.assert_close(compacted.module(x), model(x), rtol=TOL, atol=TOL)
    widths = [m.out_features for m in compacted.module if isinstance(m, nn.Linear)]
    assert widths[0] == 0  # fc1 keeps no unit: the output is the constant the biases give
    assert torch.allclose(compacted.module(x), compacted.module(x[:1]).expand(5, -1))


@pytest.mark.parametrize(
    ("make", "shape", "layer"),
    [
        (LeNet5Caffe, (1, 28, 28), "conv1"),
        (LeNet5Caffe, (1, 28, 28), "conv2"),
        (UserNet, (3, 8, 8), "conv_a"),  # the next conv has padding 0
        (UserNet, (3, 8, 8), "conv_b"),
    ],
)
def test_a_conv_with_every_channel_pruned_keeps_one_blank_channel(tmp_path, make, shape, layer):
    model, gates = _gated(make(), closed=0.3)
    with torch.no_grad():
        dict(gates.named_gates())[layer].log_alpha.fill_(-20.0)
    with pytest.warns(UserWarning, match=f"every output channel of '{layer}' is pruned"):
        compacted = compact(model, shape)
    x = torch.rand(5, *shape, dtype=torch.float64)
    torch.testing.assert_close(compacted.module(x), model(x), rtol=TOL, atol=TOL)
    blank = getattr(compacted.module, layer)
    assert blank.out_channels == 1 and not blank.weight.any()
    assert layer not in compacted.sparse_weights
    assert count_flops(compacted.module.float(), shape) < count_flops(make(), shape)
    loaded, _ = load_compact(save_compact(compacted, tmp_path, shape)["model"])
    torch.testing.assert_close(loaded(x.float()), model(x).float(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("make", "shape", "layer", "arch"),
    [
        (lambda: MLP(20, [15, 9], 4), (20,), "fc3", "20-0-0-4"),
        (LeNet5Caffe, (1, 28, 28), "fc1", "conv 1-1 | fc 16-0-10"),
        (LeNet5Caffe, (1, 28, 28), "fc2", "conv 1-1 | fc 16-0-10"),
    ],
)
def test_a_layer_cut_off_whole_leaves_nothing_before_it(make, shape, layer, arch):
    """Removing a layer's units can leave the units before it unread: compaction repeats its
    pass until nothing changes (convolutions keep their one blank channel)."""
    model, gates = _gated(make(), closed=0.3)
    with torch.no_grad():
        dict(gates.named_gates())[layer].log_alpha.fill_(-20.0)  # every input of `layer` closed
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the blank-channel warnings
        compacted = compact(model, shape)
    assert describe(compacted.module, shape) == arch
    x = torch.rand(5, *shape, dtype=torch.float64)
    torch.testing.assert_close(compacted.module(x), model(x), rtol=TOL, atol=TOL)
    torch.testing.assert_close(compacted.module(x), compacted.module(x[:1]).expand(5, -1), rtol=TOL, atol=TOL)


def test_constant_units_fold_into_the_next_bias():
    model = MLP(4, [3], 2).double().eval()
    with torch.no_grad():
        model.fc1.weight[1].zero_()  # unit 1 computes relu(b_1), a constant
        model.fc1.bias[1] = 0.7
    compacted = compact(model, (4,))
    x = torch.randn(6, 4, dtype=torch.float64)
    torch.testing.assert_close(compacted.module(x), model(x), rtol=TOL, atol=TOL)
    assert compacted.module.fc1.out_features == 2


def test_counts_against_hand_computed_values():
    model = nn.Sequential(
        OrderedDict(
            conv=nn.Conv2d(2, 3, 3),  # 6x6 -> 4x4: 2*3*9 + 3 = 57 params, 2*(3*4*4)*(2*9) = 1728 FLOPs
            relu=nn.ReLU(),
            pool=nn.MaxPool2d(2),  # 4x4 -> 2x2
            flat=nn.Flatten(),
            fc=nn.Linear(12, 5),  # 12*5 + 5 = 65 params, 2*60 = 120 FLOPs
        )
    )
    assert count_params(model) == 57 + 65
    assert count_flops(model, (2, 6, 6)) == 1728 + 120
    assert describe(model, (2, 6, 6)) == "conv 3 | fc 12-5"
    with torch.no_grad():
        model.conv.weight[1].zero_()  # channel 1 has no input: constant relu(b_1) feeds fc
        model.conv.bias[1] = -1.0  # relu(-1) = 0: simply dead
    compacted = compact(model, (2, 6, 6))
    # conv keeps 2 channels: 2*2*9 + 2 = 38 params; fc reads 2*4 = 8 inputs: 8*5 + 5 = 45
    assert count_params(compacted.module) == 38 + 45
    assert count_flops(compacted.module, (2, 6, 6)) == 2 * (2 * 4 * 4) * (2 * 9) + 2 * 8 * 5


def test_exported_program_loads_in_a_fresh_process_without_the_package(tmp_path):
    model, _ = _gated(LeNet5Caffe(), closed=0.6)
    compacted = compact(model, (1, 28, 28), select_inputs=True)
    compacted.module.float()
    paths = save_compact(compacted, tmp_path / "c", (1, 28, 28))
    x = torch.rand(3, 1, 28, 28)
    torch.save(x, tmp_path / "x.pt")
    torch.save(model.float()(x), tmp_path / "expected.pt")
    script = textwrap.dedent(
        f"""
        import sys, torch
        program = torch.export.load({str(paths["program"])!r}).module()
        x = torch.load({str(tmp_path / "x.pt")!r})
        expected = torch.load({str(tmp_path / "expected.pt")!r})
        out = program(x)
        assert "constrained_sparsity" not in sys.modules, "the package was imported"
        print(float((out - expected).abs().max()))
        """
    )
    # -I: isolated mode, so neither the working directory nor the user's site can import it
    proc = subprocess.run([sys.executable, "-I", "-c", script], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert float(proc.stdout.strip()) < 1e-4  # float32 throughout


def test_state_dict_and_architecture_round_trip_with_csr_weights(tmp_path):
    model, _ = _gated(MLP(30, [20], 5), closed=0.8, layers={"fc1": "weight", "fc2": "input"})
    compacted = compact(model, (30,))
    assert compacted.sparse_weights == ["fc1"]  # per-weight zeros stay inside a dense layer
    paths = save_compact(compacted, tmp_path, (30,))
    loaded, info = load_compact(paths["model"])
    x = torch.rand(4, 30)
    torch.testing.assert_close(loaded(x), compacted.module.float()(x), rtol=0, atol=0)
    assert json.loads(paths["architecture"].read_text())["architecture"][1]["type"] == "Linear"
    stored = torch.load(paths["model"], weights_only=True)["state_dict"]
    assert [spec["key"] for spec in info["sparse"]] == ["fc1.weight"]
    for spec in info["sparse"]:
        assert stored[spec["key"]].layout == torch.sparse_csr


def test_compact_and_eval_cli_on_a_digits_run(tmp_path, quiet):
    from constrained_sparsity import load_config, run

    result = run(load_config(DIGITS, [*quiet, "train.epochs=3", "sparsity.targets=0.3"]))
    proc = subprocess.run(
        [sys.executable, "-m", "constrained_sparsity", "compact", str(result.run_dir)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "architecture: 64-100-100-10  ->" in proc.stdout
    report = json.loads((result.run_dir / "compact" / "report.json").read_text())
    assert report["max_abs_diff"] < 1e-5 and report["test_error_compact"] == report["test_error_gated"]
    proc = subprocess.run(
        [sys.executable, "-m", "constrained_sparsity", "eval", str(result.run_dir), "--repeats", "3"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.startswith("| ")]
    assert lines[0].startswith("| network | architecture") and len(lines) == 3  # header + 2 networks
    compact_row = evaluate(result.run_dir, batches=(2,), threads=(1,), repeats=2)[1]
    for saved in ("model.pt", "model.pt2"):  # the saved files, the exported program without the package's layers
        (row,) = evaluate(result.run_dir / "compact" / saved, batches=(2,), threads=(1,), repeats=2)
        for key in ("architecture", "params", "nonzero_params", "flops", "test_error"):
            assert row[key] == compact_row[key], (saved, key)
        assert row["latency_ms/b2/t1"] > 0
    proc = subprocess.run(
        [sys.executable, "-m", "constrained_sparsity", "eval", str(tmp_path / "nothing")],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert proc.returncode == 2 and "expected a run directory or a compact model" in proc.stderr


@pytest.mark.parametrize("shape", [(3, 5, 24, 24), (2, 4, 7, 9), (4, 6, 6)], ids=["even", "odd", "unbatched"])
def test_fast_max_pool_equals_torch_max_pool(shape):
    x = torch.randn(*shape)
    x.view(-1)[::17] = float("nan")  # NaN propagates in both
    torch.testing.assert_close(MaxPool2x2()(x), nn.MaxPool2d(2)(x), rtol=0, atol=0, equal_nan=True)
    model = nn.Sequential(nn.MaxPool2d(2), nn.Sequential(nn.MaxPool2d(2, 2)), nn.MaxPool2d(3), nn.MaxPool2d(2, 1))
    fast = fast_pooling(model)
    assert [type(m) for m in fast.modules()][1:] == [MaxPool2x2, nn.Sequential, MaxPool2x2, nn.MaxPool2d, nn.MaxPool2d]


def test_fast_pooling_moves_relu_after_the_pool_exactly():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(3, 4, 3), nn.ReLU(), nn.MaxPool2d(3)
    )
    x = torch.randn(5, 2, 16, 16)
    want = model(x)
    fast = fast_pooling(model)
    assert [type(m) for m in fast] == [nn.Conv2d, MaxPool2x2, nn.ReLU, nn.Conv2d, nn.MaxPool2d, nn.ReLU]
    assert list(fast._modules) == ["0", "2", "1", "3", "5", "4"]  # names (and state_dict keys) kept
    torch.testing.assert_close(fast(x), want, rtol=0, atol=0)


@pytest.mark.parametrize(
    "make, shape", [(lambda: MLP(64, [20, 12], 10), (1, 8, 8)), (lambda: LeNet5Caffe(), (1, 28, 28))]
)
def test_exact_flop_density_counts_the_flops_compaction_keeps(make, shape):
    model, gates = _gated(make(), closed=0.5)
    gates.weight_by_flops(model, torch.zeros(1, *shape, dtype=torch.float64))
    small = compact(model, shape, select_inputs=True).module
    dense = count_flops(make(), shape)
    assert gates.exact_density().item() * dense == pytest.approx(count_flops(small.float(), shape), rel=1e-9)
    assert count_flops(small.float(), shape) < dense


def test_exact_flop_density_is_an_upper_bound_when_a_layer_is_cut_off_whole():
    model, gates = _gated(MLP(20, [15, 9], 4), closed=0.3)
    with torch.no_grad():
        dict(gates.named_gates())["fc2"].log_alpha.fill_(-20.0)  # fc2's outputs are constants
    gates.weight_by_flops(model, torch.zeros(1, 20, dtype=torch.float64))
    small = compact(model, (20,), select_inputs=True).module
    fc3_open = int(dict(gates.named_gates())["fc3"].active().sum())
    assert fc3_open > 0
    # the measure still counts fc3's open inputs; compaction folded them into fc3's bias
    assert gates.exact_density().item() * count_flops(MLP(20, [15, 9], 4), (20,)) == pytest.approx(2 * 4 * fc3_open)
    assert count_flops(small.float(), (20,)) == 0
