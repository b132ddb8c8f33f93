"""The networks of the project (the CIFAR ResNets) and a user's own model class from a config."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import constrained_sparsity as cs
from constrained_sparsity.models import RESNETS, BasicBlock, ResNet

QUIET = ["tracking.wandb=disabled", "tracking.progress=false"]


def _conv(cin, cout, k):
    return cin * cout * k * k


def _resnet_params(blocks, width, cin, classes):
    """ResNet parameters counted by hand: stem, blocks (3x3 convs, BN affine, 1x1 shortcuts
    with BN where the shape changes), classifier."""
    widths = [16 * width, 32 * width, 64 * width]
    n = _conv(cin, 16, 3) + 2 * 16
    previous = 16
    for i, w in enumerate(widths):
        for b in range(blocks):
            cin_b = previous if b == 0 else w
            n += _conv(cin_b, w, 3) + 2 * w + _conv(w, w, 3) + 2 * w
            if (i and b == 0) or cin_b != w:
                n += _conv(cin_b, w, 1) + 2 * w
        previous = w
    return n + widths[-1] * classes + classes


@pytest.mark.parametrize(
    "name, blocks, width", [("resnet20", 3, 1), ("resnet32", 5, 1), ("resnet56", 9, 1), ("wrn16_4", 2, 4)]
)
@pytest.mark.parametrize("channels", [1, 3])
def test_resnets_have_the_papers_layout(name, blocks, width, channels):
    model = RESNETS[name](channels, 10)
    assert sum(p.numel() for p in model.parameters()) == _resnet_params(blocks, width, channels, 10)
    assert len(model.layer1) == len(model.layer2) == len(model.layer3) == blocks
    blocks_ = [b for stage in (model.layer1, model.layer2, model.layer3) for b in stage]
    assert all(isinstance(b, BasicBlock) for b in blocks_)
    assert model(torch.randn(2, channels, 28, 28)).shape == (2, 10)
    if name == "resnet20" and channels == 3:
        assert sum(p.numel() for p in model.parameters()) == 272_474  # the known ResNet-20 (option B) count


def test_resnet_depths_are_checked():
    with pytest.raises(ValueError, match="6n \\+ 2"):
        ResNet.cifar(21)
    with pytest.raises(ValueError, match="6n \\+ 4"):
        ResNet.wide(15, 4)


def test_a_resnet_trains_from_the_config(tmp_path):
    cfg = cs.load_config("digits_mlp_l0", ["model.name=resnet20", "sparsity.method=none", "train.epochs=1", *QUIET])
    result = cs.run(cfg, run_dir=tmp_path / "r")
    assert result.status == "complete" and 0 <= result.test_error <= 1


USER_MODULE = textwrap.dedent(
    """
    import torch
    from torch import nn

    class TinyChain(nn.Sequential):
        def __init__(self, in_features, num_classes, width=32):
            super().__init__(nn.Flatten(), nn.Linear(in_features, width), nn.ReLU(), nn.Linear(width, num_classes))

    class WrongOutput(nn.Module):
        def forward(self, x):
            return x

    class NoParameters(nn.Module):
        def forward(self, x):
            return x.flatten(1)[:, :10]

    class Branchy(nn.Module):  # a BatchNorm, and a branch on the data: no torch.fx graph
        def __init__(self, in_channels, num_classes):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(in_channels, 8, 3, padding=1), nn.BatchNorm2d(8)
            self.fc = nn.Linear(8, num_classes)

        def forward(self, x):
            h = torch.relu(self.bn(self.conv(x)))
            if h.sum() > 0:
                h = 2 * h
            return self.fc(h.mean((2, 3)))

    class NotAModule:
        pass
    """
)


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "mymodels.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    sys.modules.pop("mymodels", None)


def test_a_user_model_class_is_built_with_its_kwargs_and_the_datas_sizes(user_module):
    cfg = cs.load_config("digits_mlp_l0", ["model.name=mymodels:TinyChain", "model.kwargs={width: 24}"])
    model = cs.training.build_model(cfg, cs.load_dataset("digits"))
    assert type(model).__name__ == "TinyChain" and model[1].in_features == 64 and model[1].out_features == 24
    assert model[3].out_features == 10


@pytest.mark.parametrize(
    "overrides, match",
    [
        (["model.name=mymodels:Nope"], "module 'mymodels' has no 'Nope'"),
        (["model.name=nomodule_here:Net"], "cannot import module 'nomodule_here'"),
        (["model.name=mymodels:NotAModule"], "is not a torch.nn.Module class"),
        (["model.name=mymodels:WrongOutput"], r"expected \(1, 10\) logits"),
        (["model.name=mymodels:NoParameters"], "the model has no trainable parameter"),
        (["model.name=mymodels:TinyChain", "model.kwargs={depth: 3}"], "TinyChain\\(...\\) failed"),
    ],
)
def test_a_bad_user_model_is_refused_in_one_line(user_module, overrides, match):
    cfg = cs.load_config("digits_mlp_l0", overrides)
    with pytest.raises(cs.ConfigError, match=match) as info:
        cs.training.build_model(cfg, cs.load_dataset("digits"))
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "overrides, match",
    [
        (["model.name=:Net"], "should be module:Class"),
        (["model.name=resnet21"], "or module:Class"),
        (["model.kwargs={width: 3}"], "model.kwargs=.*is for a model class of your own"),
        (["model.name=mymodels:TinyChain", "model.kwargs=3"], "model.kwargs=3: should be a mapping"),
    ],
)
def test_model_names_and_kwargs_are_checked_by_the_config(overrides, match):
    with pytest.raises(cs.ConfigError, match=match):
        cs.load_config("digits_mlp_l0", overrides)


@pytest.mark.slow
def test_csparse_trains_compacts_and_evaluates_a_user_model(user_module):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(user_module), os.environ.get("PYTHONPATH", "")])}
    run_dir = user_module / "run"

    def csparse(*args):
        proc = subprocess.run(
            [sys.executable, "-m", "constrained_sparsity", *args],
            cwd=user_module, env=env, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-2000:]
        return proc.stdout

    out = csparse(
        "train", "digits_mlp_l0", "model.name=mymodels:TinyChain", "model.kwargs={width: 24}", "train.epochs=3",
        *QUIET, "--run-dir", str(run_dir),
    )  # fmt: skip
    assert "test error:" in out and "64-24-10 ->" in out
    out = csparse("compact", str(run_dir))
    assert "max |output difference|" in out and (run_dir / "compact" / "model.pt2").is_file()
    out = csparse("eval", str(run_dir), "--repeats", "2")
    assert "| compact |" in out


def test_l0_on_a_network_that_is_not_a_chain_says_its_budget_is_not_the_deployable_one():
    cfg = cs.load_config("digits_mlp_l0", ["model.name=resnet20", *QUIET])
    with pytest.warns(UserWarning, match="its density is not the deployable network's.*l0_units"):
        cs.training.build_trainer(cfg, cs.load_dataset("digits"))


def test_a_network_with_a_branch_on_its_data_compacts_without_a_program_and_refuses_folding(user_module, capsys):
    """It trains and compacts (its units come from the dependency graph): ``model.pt`` is written
    and loads; ``torch.export`` cannot export it, so there is no ``model.pt2`` and a warning says
    why; folding its BatchNorm needs a torch.fx graph, and the command says so in one line."""
    from constrained_sparsity.cli import main

    overrides = ["model.name=mymodels:Branchy", "sparsity.method=l0_units", "train.epochs=1", *QUIET]
    run_dir = user_module / "run"
    cs.run(cs.load_config("digits_mlp_l0", overrides), run_dir=run_dir)
    (run_dir / "compact").mkdir()
    (run_dir / "compact" / "model.pt2").write_text("a program of another network")
    assert main(["compact", str(run_dir)]) == 0
    out, err = capsys.readouterr()
    assert "no model.pt2 (torch.export cannot export this network)" in out
    # one line each: the reason, neither torch.export's graph dump nor a spurious "removes no unit"
    assert err.splitlines() == [err.splitlines()[0]] and err.startswith(
        "warning: model.pt2 not written: torch.export cannot export the Branchy (Could not guard on data-dependent"
    ), err
    assert not (run_dir / "compact" / "model.pt2").exists()  # nothing stale beside model.pt
    loaded, _ = cs.load_compact(run_dir / "compact" / "model.pt")
    assert type(loaded).__name__ == "Branchy"
    assert main(["compact", str(run_dir), "--fold-batchnorm"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "folding BatchNorm needs a network torch.fx can trace" in err[0], err
