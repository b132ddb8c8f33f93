"""Installed like any package: the wheel holds the configs, runs from an empty directory, and
its version agrees with the metadata."""

import importlib.metadata
import json
import os
import shutil
import site
import subprocess
import sys
import zipfile
from pathlib import Path

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


def _outer_site_directories() -> list[str]:
    """The site-packages directories of the interpreter running the tests (system, venv --
    also one inside the repository, as ``.venv`` -- or conda-like prefix; a venv with system
    site packages lists its base's too). Never the repository itself."""
    dirs = list(site.getsitepackages())
    if site.ENABLE_USER_SITE:
        dirs.append(site.getusersitepackages())
    return [d for d in dict.fromkeys(dirs) if Path(d).is_dir() and Path(d).resolve() != ROOT.resolve()]


def _fresh_environment_with_our_packages(venv: Path) -> Path:
    """A new virtual environment that sees the packages of the one running the tests (torch and
    the rest), whatever that one is. ``--system-site-packages`` would give it the *base*
    interpreter's packages, which inside a venv are not the venv's; so the outer site
    directories are named in a ``.pth`` file instead. Plain path lines: the ``.pth`` files
    *inside* those directories (an editable install's pointer at the repository) are not read."""
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True, timeout=300)
    python = venv / "bin" / "python"
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout.strip()
    (Path(purelib) / "_outer_environment.pth").write_text("".join(f"{d}\n" for d in _outer_site_directories()))
    return python


def test_the_outer_site_directories_hold_torch_and_not_the_repository():
    dirs = [Path(d) for d in _outer_site_directories()]
    assert any((d / "torch" / "__init__.py").is_file() for d in dirs)
    assert not [d for d in dirs if (d / "constrained_sparsity" / "__init__.py").is_file()]  # the source tree


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
    venv = tmp_path / "venv"
    python = _fresh_environment_with_our_packages(venv)
    subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--force-reinstall", str(wheel)],
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
            "import constrained_sparsity as c, importlib.metadata as m, json, sys; "
            "print(c.__file__); print(c.__version__, m.version('constrained_sparsity')); print(json.dumps(sys.path))",
        ],
        cwd=empty,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    ).stdout.splitlines()
    assert where[0].startswith(str(venv)) and where[1] == f"{cs.__version__} {cs.__version__}"
    on_path = [Path(p) for p in json.loads(where[2]) if p]
    assert not [p for p in on_path if (p / "constrained_sparsity" / "__init__.py").is_file() and venv not in p.parents]
    proc = csparse("train", "digits_mlp_l0", "train.epochs=2", "tracking.progress=false")
    assert proc.returncode == 0, proc.stderr
    assert "(the shipped config digits_mlp_l0)" in proc.stdout and "test error:" in proc.stdout
    (run_dir,) = (empty / "runs").iterdir()
    assert (run_dir / "summary.json").is_file() and run_dir.name.startswith("digits_mlp_l0-")
    proc = csparse("configs")
    assert proc.returncode == 0 and "digits_mlp_l0" in proc.stdout
    assert csparse("--version").stdout.strip() == f"csparse {cs.__version__}"
