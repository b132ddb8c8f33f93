"""Installed like any package: the wheel holds the configs, runs from an empty directory, and
its version agrees with the metadata."""

import importlib.metadata
import os
import shutil
import subprocess
import sys
import zipfile

import pytest

import constrained_sparsity as cs
from constrained_sparsity.config import resolve_config, shipped_configs

from .test_train import ROOT

IGNORE = shutil.ignore_patterns(
    ".git", "runs", "wandb", "build", "dist", "*.egg-info", "__pycache__", "out", ".pytest_cache", ".ruff_cache"
)


def test_version_agrees_with_the_metadata(capsys):
    from constrained_sparsity.cli import main

    assert importlib.metadata.version("constrained_sparsity") == cs.__version__
    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.strip() == f"csparse {cs.__version__}"


def test_a_shipped_config_is_found_by_name_and_a_file_wins(tmp_path, monkeypatch):
    shipped = shipped_configs()
    assert "digits_mlp_l0" in shipped and all(p.parent.name == "configs" for p in shipped.values())
    assert resolve_config("digits_mlp_l0") == (shipped["digits_mlp_l0"], "shipped")
    assert resolve_config("digits_mlp_l0.yaml") == (shipped["digits_mlp_l0"], "shipped")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "digits_mlp_l0.yaml").write_text("name: mine\n")
    path, source = resolve_config("digits_mlp_l0.yaml")
    assert source == "file" and path.resolve() == tmp_path / "digits_mlp_l0.yaml"
    assert cs.load_config("digits_mlp_l0.yaml").name == "mine"  # the file wins
    with pytest.raises(cs.ConfigError, match="did you mean digits_mlp_l0"):
        resolve_config("digits_mlp_lo")


def test_configs_lists_and_shows(capsys):
    from constrained_sparsity.cli import main

    assert main(["configs"]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert len(listed) == len(shipped_configs())
    assert any(line.startswith("digits_mlp_l0 ") and "embedded default" in line for line in listed)
    assert main(["configs", "show", "digits_mlp_l0"]) == 0
    shown = capsys.readouterr().out
    assert "name: digits_mlp_l0" in shown and "droprate_init: 0.5" in shown  # resolved: defaults included
    assert main(["configs", "show", "nope"]) == 2


@pytest.mark.slow
def test_the_wheel_installs_and_runs_without_the_repository(tmp_path):
    source = tmp_path / "src"
    shutil.copytree(ROOT, source, symlinks=True, ignore=IGNORE)
    dist = tmp_path / "dist"
    subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(dist), str(source)],
        check=True,
        capture_output=True,
        timeout=600,
    )
    (wheel,) = dist.glob("*.whl")
    assert len(list(dist.glob("*.tar.gz"))) == 1
    names = zipfile.ZipFile(wheel).namelist()
    for name in shipped_configs():
        assert f"constrained_sparsity/configs/{name}.yaml" in names
    assert "constrained_sparsity/py.typed" in names
    assert not [n for n in names if n.startswith(("tests/", "benchmarks/"))]
    # a fresh virtual environment that sees the torch (and the rest) already installed
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    empty = tmp_path / "empty"
    empty.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PATH=f"{venv / 'bin'}{os.pathsep}{env['PATH']}", WANDB_MODE="disabled")

    def csparse(*args):
        return subprocess.run(
            [str(venv / "bin" / "csparse"), *args], cwd=empty, env=env, capture_output=True, text=True, timeout=600
        )

    where = subprocess.run(
        [
            str(python),
            "-c",
            "import constrained_sparsity as c, importlib.metadata as m; "
            "print(c.__file__); print(c.__version__, m.version('constrained_sparsity'))",
        ],
        cwd=empty,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    ).stdout.splitlines()
    assert where[0].startswith(str(venv)) and where[1] == f"{cs.__version__} {cs.__version__}"
    proc = csparse("train", "digits_mlp_l0", "train.epochs=2", "tracking.progress=false")
    assert proc.returncode == 0, proc.stderr
    assert "(the shipped config digits_mlp_l0)" in proc.stdout and "test error:" in proc.stdout
    (run_dir,) = (empty / "runs").iterdir()
    assert (run_dir / "summary.json").is_file() and run_dir.name.startswith("digits_mlp_l0-")
    proc = csparse("configs")
    assert proc.returncode == 0 and "digits_mlp_l0" in proc.stdout
    assert csparse("--version").stdout.strip() == f"csparse {cs.__version__}"
