"""Bad configuration is refused with a one-line message naming the key and the value."""

import subprocess
import sys
from pathlib import Path

import pytest

from constrained_sparsity import ConfigError, load_config, run
from constrained_sparsity.config import config_from_dict

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_are_valid(path):
    cfg = load_config(path)
    assert cfg.name == path.stem


def test_expected_configs_are_shipped():
    names = {p.name for p in CONFIGS}
    for name in [
        "digits_mlp_l0.yaml",
        "fashion_mlp_l0_constrained.yaml",
        "fashion_mlp_l0_penalized.yaml",
        "fashion_lenet_l0_constrained.yaml",
        "mnist_mlp_l0_constrained.yaml",
        "mnist_mlp_l0_penalized.yaml",
        "mnist_lenet_l0_constrained.yaml",
        "mnist_lenet_l0_penalized.yaml",
        "digits_deep_mlp_layers.yaml",
        "fashion_deep_mlp_layers_constrained.yaml",
        "fashion_deep_mlp_layers_penalized.yaml",
    ]:
        assert name in names
    assert load_config(ROOT / "configs/mnist_mlp_l0_constrained.yaml").sparsity.targets == 0.33
    assert load_config(ROOT / "configs/mnist_lenet_l0_constrained.yaml").sparsity.targets == 0.10


BAD = [
    ({"sparsity": {"targts": 0.3}}, r"unknown config key 'sparsity.targts'; did you mean sparsity.targets\?"),
    ({"trian": {}}, r"unknown config key 'trian'; did you mean train\?"),
    ({"sparsity": {"targets": 1.2}}, r"sparsity.targets=1.2: epsilon 1.2 is outside \[0, 1\]"),
    ({"sparsity": {"targets": [0.5, -0.1]}}, r"sparsity.targets=\[0.5, -0.1\]: epsilon -0.1 is outside"),
    ({"optim": {"primal": {"lr": 0}}}, r"optim.primal.lr=0: should be a number > 0"),
    ({"optim": {"dual": {"lr": -0.5}}}, r"optim.dual.lr=-0.5: should be a number > 0"),
    ({"sparsity": {"mode": "penalized", "lambdas": -1}}, r"sparsity.lambdas=-1: lambda -1.0 should be >= 0"),
    ({"sparsity": {"mode": "penalized"}}, r"sparsity.lambdas=None: penalized mode needs a lambda"),
    (
        {"sparsity": {"method": "magic"}},
        r"sparsity.method='magic': unknown method; methods: cges, cges_units, dns, .* \(declared",
    ),
    ({"sparsity": {"method": "l1"}}, r"sparsity.method='l1': unknown method; did you mean rw_l1\?"),
    ({"sparsity": {"method": "layers"}}, r"sparsity.method='layers': is declared as a section: sparsity.layers"),
    ({"sparsity": {"method": "nomodule_xyz:Cls"}}, r"sparsity.method='nomodule_xyz:Cls': cannot import module"),
    ({"sparsity": {"method": "math:pi"}}, r"sparsity.method='math:pi': pi is not a subclass of .*SparsityMethod"),
    ({"sparsity": {"structure": "rows"}}, r"sparsity.structure='rows': should be one of auto, input, output, weight"),
    ({"sparsity": {"gamma": float("nan")}}, r"sparsity.gamma=nan: should be < 0"),
    ({"sparsity": {"method": "none", "structure": "input"}}, r"unknown config key 'sparsity.structure'"),
    ({"sparsity": {"layers": {"max_layer": 2}}}, r"unknown config key 'sparsity.layers.max_layer'; did you mean"),
    ({"sparsity": {"layers": {"refit_epochs": 2}}}, r"sparsity.layers.refit_epochs=2: needs max_layers"),
    ({"sparsity": {"method": "lwc", "mode": "constrained"}}, r"sparsity.mode='constrained': method 'lwc' has no such"),
    ({"sparsity": {"method": "dns", "mode": "penalized", "lambdas": 1}}, r"by construction: use mode projected"),
    ({"sparsity": {"mode": "projected"}}, r"method 'l0' has no such mode; it runs in mode constrained or penalized"),
    ({"model": {"name": "resnet"}}, r"model.name='resnet': should be one of mlp, lenet5"),
    ({"data": {"name": "cifar"}}, r"data.name='cifar': should be one of digits, mnist, fashion_mnist"),
    ({"optim": {"scheme": "gda"}}, r"optim.scheme='gda': should be one of"),
    ({"train": {"epochs": "ten"}}, r"train.epochs='ten': should be int"),
    ({"model": {"name": "lenet5"}}, r"model.name='lenet5': needs 28x28 images"),
    ({"optim": {"primal": {"schedule": "step"}}}, r"optim.primal.schedule='step': should be one of constant, cosine"),
    ({"optim": {"primal": {"final_lr_factor": 2}}}, r"optim.primal.final_lr_factor=2: should be in \[0, 1\]"),
    (
        {"sparsity": {"equality": True, "mode": "penalized", "lambdas": 1}},
        r"sparsity.equality=True: needs mode constrained \(the mode is penalized\)",
    ),
    ({"sparsity": {"equality": True, "method": "cges"}}, r"sparsity.equality=True: method 'cges' cannot aim at"),
    ({"sparsity": {"equality": True, "layers": {"max_layers": 2}}}, r"method 'layers' cannot aim at its budget"),
    ({"sparsity": {"equality": "yes"}}, r"sparsity.equality='yes': should be bool"),
]


@pytest.mark.parametrize("data,message", BAD, ids=[m[:30] for _, m in BAD])
def test_bad_values_raise_config_error(data, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict(data)


def test_per_layer_target_list_must_match_gated_layers(quiet, tmp_path):
    cfg = load_config(ROOT / "configs/digits_mlp_l0.yaml", [*quiet, "sparsity.targets=[0.5, 0.5]"])
    with pytest.raises(ConfigError, match=r"sparsity.targets=\[0.5, 0.5\]: 2 values for 3 gated layers"):
        run(cfg)
    assert not (tmp_path / "runs").exists()  # nothing was created for a refused run


def test_overrides_parse_yaml_values():
    cfg = load_config(None, ["sparsity.targets=[0.1, 0.2, 0.3]", "train.epochs=3", "tracking.wandb=disabled"])
    assert cfg.sparsity.targets == [0.1, 0.2, 0.3] and cfg.train.epochs == 3
    cfg = load_config(None, ["optim.primal.lr=1e-3", "optim.dual.lr=2E+1"])  # YAML 1.1 would read strings
    assert cfg.optim.primal.lr == 0.001 and cfg.optim.dual.lr == 20.0
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config(None, ["train.epochs"])


def _cli(*args, cwd=ROOT):
    return subprocess.run(
        [sys.executable, "-m", "constrained_sparsity", *args], capture_output=True, text=True, cwd=cwd, timeout=120
    )


@pytest.mark.parametrize(
    "override,message",
    [
        ("sparsity.targets=1.5", "sparsity.targets=1.5: epsilon 1.5 is outside [0, 1]"),
        ("sparsity.lamdas=0.1", "unknown config key 'sparsity.lamdas'; did you mean sparsity.lambdas?"),
        ("optim.primal.lr=-1", "optim.primal.lr=-1: should be a number > 0"),
        ("sparsity.targets=[0.3]", "sparsity.targets=[0.3]: 1 values for 3 gated layers ['fc1', 'fc2', 'fc3']"),
    ],
)
def test_cli_bad_input_exits_2_with_one_line(override, message, tmp_path):
    proc = _cli(
        "train", "configs/digits_mlp_l0.yaml", override, f"tracking.out_dir={tmp_path}", "tracking.wandb=disabled"
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == f"error: {message}"
    assert "Traceback" not in proc.stderr


def test_cli_missing_config_file(tmp_path):
    proc = _cli("train", str(tmp_path / "nope.yaml"))
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: config file not found: {tmp_path / 'nope.yaml'}"


def test_an_equality_config_gives_equality_targets_and_its_penalised_twin_none():
    from constrained_sparsity.compare.method import ComparedMethod
    from constrained_sparsity.config import apply_overrides
    from constrained_sparsity.training import build_trainer, dataset_for

    cfg = load_config(ROOT / "configs" / "digits_mlp_l0.yaml", ["sparsity.equality=true"])
    dataset = dataset_for(cfg)
    _, _, problem, _ = build_trainer(cfg, dataset)
    assert [t.equality for t in problem.targets] == [True]
    twin = ComparedMethod(cfg.sparsity.declarations()[0]).penalized(0.3, [1.0])
    penalised = config_from_dict(apply_overrides(cfg.to_dict(), twin))
    assert (penalised.sparsity.mode, penalised.sparsity.equality) == ("penalized", False)
    _, _, problem, _ = build_trainer(penalised, dataset)
    assert [t.equality for t in problem.targets] == [False]
