"""Hostile files, broken runs and odd values: one clear error, no code run, nothing lost.

Each class of failure has its own tests, each with a case the code before these checks
failed: files that could run code, refusals that must be one line with exit code 2 and leave
the files untouched, resumes that must continue exactly (log included), and W&B failures
that must not stop a run.
"""

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import pytest
import torch

import constrained_sparsity as cs
from constrained_sparsity.cli import main
from constrained_sparsity.export import load_compact
from constrained_sparsity.training import load_checkpoint
from constrained_sparsity.training.rundir import is_phase_row, new_run_dir

from .test_data import _write_mnist_like
from .test_train import DIGITS, ROOT

QUIET = ["tracking.wandb=disabled", "tracking.progress=false"]


class _Payload:
    """Unpickling this creates the file ``path``: the proof that a reader ran code."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _cli(capsys, *args):
    """``csparse ARGS`` in this process: (exit code, stdout, stderr)."""
    try:
        code = main([str(a) for a in args])
    except SystemExit as exc:  # argparse
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def _refused(capsys, *args, contains=""):
    code, _, err = _cli(capsys, *args)
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("warning: ")]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    assert contains in lines[0], lines[0]
    return lines[0]


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 2-epoch digits run with its compact network written (no finishing phase: the
    returned weights are those of checkpoint.pt)."""
    out = tmp_path_factory.mktemp("trained")
    overrides = [*QUIET, "train.epochs=2", "finish.enabled=false", f"tracking.out_dir={out}"]
    cs.run(cs.load_config(DIGITS, overrides), run_dir=out / "run")
    cs.runs.compact_run(out / "run")
    return out / "run"


@pytest.fixture
def run_copy(trained, tmp_path):
    path = tmp_path / "run"
    shutil.copytree(trained, path)
    return path


# -- 1. a file can run code ------------------------------------------------------------------
def _hostile_program(good: Path, bad: Path, marker: Path) -> None:
    """``good``'s program with its first weight marked as a pickle whose loading creates ``marker``."""
    bad.mkdir()
    shutil.copy(good / "architecture.json", bad / "architecture.json")
    with zipfile.ZipFile(good / "model.pt2") as src:
        items = [(info.filename, src.read(info)) for info in src.infolist()]
    config_name = next(n for n, _ in items if n.endswith("model_weights_config.json"))
    config = json.loads(dict(items)[config_name])
    first = next(iter(config["config"]))
    config["config"][first]["use_pickle"] = True
    weight_file = config["config"][first]["path_name"]
    with zipfile.ZipFile(bad / "model.pt2", "w", zipfile.ZIP_STORED) as out:
        for name, data in items:
            if name == config_name:
                data = json.dumps(config).encode()
            elif name.endswith(f"/data/weights/{weight_file}"):
                data = pickle.dumps(_Payload(marker))
            out.writestr(name, data)


def test_a_program_with_pickled_weights_is_refused_and_runs_no_code(trained, tmp_path, capsys):
    marker = tmp_path / "MARKER"
    _hostile_program(trained / "compact", tmp_path / "bad", marker)
    # the file is hostile: torch.export.load runs its payload
    subprocess.run(
        [sys.executable, "-c", f"import torch; torch.export.load({str(tmp_path / 'bad' / 'model.pt2')!r})"],
        capture_output=True,
        timeout=120,
    )
    assert marker.exists()
    marker.unlink()
    line = _refused(capsys, "eval", tmp_path / "bad" / "model.pt2", "--repeats", 1, contains="stored as pickles")
    assert "refused" in line and not marker.exists()


def test_the_safe_program_reader_gives_the_programs_own_weights(trained):
    program = torch.export.load(trained / "compact" / "model.pt2")  # our own file: trusted here
    from constrained_sparsity.files import read_pt2_weights

    ours = read_pt2_weights(trained / "compact" / "model.pt2")
    theirs = program.state_dict
    assert set(ours) == set(theirs)
    for key in ours:
        assert torch.equal(ours[key], theirs[key].detach())


def test_pt_files_holding_objects_are_refused_and_run_no_code(run_copy, tmp_path, capsys):
    marker = tmp_path / "MARKER"
    model, info = load_compact(run_copy / "compact" / "model.pt")
    hostile = {**info, "state_dict": model.state_dict(), "meta": {"dataset": "digits", "x": _Payload(marker)}}
    torch.save(hostile, run_copy / "compact" / "model.pt")
    _refused(capsys, "eval", run_copy / "compact" / "model.pt", contains="holds more than tensors, refused")
    ckpt = load_checkpoint(run_copy / "checkpoint.pt")
    torch.save({**ckpt, "wandb_id": _Payload(marker)}, run_copy / "checkpoint.pt")
    _refused(capsys, "train", "--resume", run_copy, "train.epochs=3", contains="holds more than tensors")
    _refused(capsys, "compact", run_copy, contains="checkpoint.pt")
    assert not marker.exists()
    # bytes that are no pickle at all: said to be corrupt, not to hold objects
    (run_copy / "compact" / "model.pt").write_text("garbage")
    line = _refused(capsys, "eval", run_copy / "compact" / "model.pt", contains="truncated or corrupt")
    assert "Unsupported operand" in line and "weights_only" not in line


def test_a_config_with_python_tags_is_refused_and_runs_no_code(tmp_path, capsys):
    marker = tmp_path / "MARKER"
    config = tmp_path / "evil.yaml"
    config.write_text(f"name: evil\nx: !!python/object/apply:builtins.open [{str(marker)!r}, w]\n")
    _refused(capsys, "train", config, *QUIET, contains="invalid YAML")
    assert not marker.exists()


def test_descriptions_that_lie_are_refused_before_anything_is_built(run_copy, capsys):
    arch = run_copy / "compact" / "architecture.json"
    info = json.loads(arch.read_text())
    cases = {
        "huge": lambda a: a.__setitem__(1, {**a[1], "in": 10**9, "out": 10**9}),
        "type": lambda a: a.__setitem__(1, {**a[1], "type": "Eval"}),
        "name": lambda a: a.__setitem__(1, {**a[1], "name": "fc1.weight"}),
        "shape": lambda a: a.__setitem__(1, {**a[1], "out": a[1]["out"] + 1}),
    }
    for _, change in cases.items():
        broken = json.loads(json.dumps(info))
        change(broken["architecture"])
        arch.write_text(json.dumps(broken))
        _refused(capsys, "eval", run_copy / "compact" / "model.pt2", "--repeats", 1)
    arch.write_text("{not json")
    _refused(capsys, "eval", run_copy / "compact" / "model.pt2", contains="not valid JSON")
    (run_copy / "summary.json").write_text(json.dumps({"phases": {"x": {"model_file": "../../checkpoint.pt"}}}))
    assert cs.runs.load_run(run_copy).phase_models() == []  # a run file names files of its own directory only


# -- 2. every refusal is one line, exit code 2, files untouched ------------------------------
def _corrupt(run: Path, how: str) -> None:
    ckpt = run / "checkpoint.pt"
    if how == "truncated":
        ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    elif how == "garbage":
        ckpt.write_bytes(b"not a checkpoint")
    elif how == "foreign":
        torch.save({"weights": torch.zeros(3)}, ckpt)
    elif how == "shapes":
        state = load_checkpoint(ckpt)
        state["model"]["fc1.parametrizations.weight.original"] = torch.zeros(5, 5)
        torch.save(state, ckpt)
    elif how == "empty":
        ckpt.write_bytes(b"")


@pytest.mark.parametrize("how", ["truncated", "garbage", "foreign", "shapes", "empty"])
def test_a_broken_checkpoint_is_refused_in_one_line_and_left_as_it_was(run_copy, how, capsys):
    _corrupt(run_copy, how)
    before = _snapshot(run_copy)
    _refused(capsys, "train", "--resume", run_copy, "train.epochs=3", contains="checkpoint.pt")
    _refused(capsys, "compact", run_copy, contains="checkpoint.pt")
    _refused(capsys, "eval", run_copy, "--repeats", 1, contains="checkpoint.pt")
    assert _snapshot(run_copy) == before


def test_broken_saved_networks_are_refused_in_one_line(run_copy, capsys):
    model_pt = run_copy / "compact" / "model.pt"
    program = run_copy / "compact" / "model.pt2"
    model_pt.write_bytes(model_pt.read_bytes()[:100])
    _refused(capsys, "eval", model_pt, contains="model.pt")
    program.write_bytes(b"PK\x03\x04 not really")
    _refused(capsys, "eval", program, contains="not a torch.export archive")
    (run_copy / "summary.json").write_text("{broken")
    _refused(capsys, "compact", run_copy, contains="summary.json")


NAN = ".nan"
BAD_INPUTS = [
    (["train.device=tpu0"], "train.device='tpu0'"),
    (["train.device=cuda:7"], "train.device='cuda:7'"),
    (["train.seed=-1"], "train.seed=-1"),
    (["train.seed=99999999999999999999"], "train.seed=99999999999999999999"),
    (["tracking.run_name=../escape"], "tracking.run_name='../escape'"),
    (["name=a/b"], "name='a/b'"),
    (["optim.primal.momentum=.nan"], "optim.primal.momentum=nan"),
    (["optim.primal.weight_decay=-.inf"], "optim.primal.weight_decay=-inf"),
    (["optim.dual.momentum=.nan"], "optim.dual.momentum=nan"),
    (["optim.dual.kp=.inf"], "optim.dual.kp=inf"),
    (["optim.dual.ki=.nan"], "optim.dual.ki=nan"),
    (["sparsity.gamma=.nan"], "sparsity.gamma=nan"),
    (["sparsity.zeta=.nan"], "sparsity.zeta=nan"),
    (["sparsity.beta=.inf"], "sparsity.beta=inf"),
    (["sparsity.droprate_init=.nan"], "sparsity.droprate_init=nan"),
    (["sparsity.lambda_init=.nan"], "sparsity.lambda_init=nan"),
    (["sparsity.targets=.nan"], "sparsity.targets=nan"),
    (["data.val_fraction=.nan"], "data.val_fraction=nan"),
    (["optim.primal.lr=.inf"], "optim.primal.lr=inf"),
]


@pytest.mark.parametrize("overrides,message", BAD_INPUTS, ids=[m for _, m in BAD_INPUTS])
def test_bad_values_are_refused_in_one_line(overrides, message, tmp_path, capsys):
    _refused(capsys, "train", DIGITS, *QUIET, f"tracking.out_dir={tmp_path}", *overrides, contains=message)
    assert not any(tmp_path.iterdir())  # nothing was created


def test_output_paths_that_cannot_be_written_are_refused(tmp_path, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    common = ["train", DIGITS, *QUIET, "train.epochs=1"]
    _refused(capsys, *common, f"tracking.out_dir={a_file}", contains="tracking.out_dir")
    _refused(capsys, *common, "--run-dir", a_file, contains="--run-dir")
    _refused(capsys, *common, f"tracking.out_dir={a_file / 'below'}", contains="tracking.out_dir")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    _refused(capsys, *common, "--run-dir", tmp_path / "mine", "--overwrite", contains="does not hold a run")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    _refused(capsys, "compact", tmp_path / "mine", contains="not a run directory")
    assert a_file.read_text() == "x"


def test_compare_arguments_are_checked_before_any_run(tmp_path, capsys):
    out = tmp_path / "cmp"
    common = ["compare", DIGITS, *QUIET, "train.epochs=1", "--out", out]
    for extra, message in [
        (["--targets", "0.3", "--max-runs", "0", "--bisect"], "--max-runs 0"),
        (["--targets", "0.3", "--lambda-range", "0", "1"], "--lambda-range"),
        (["--targets", "0.3", "--lambda-range", "5", "1"], "--lambda-range"),
        (["--targets", "0.3", "--tol", "-1"], "--tol -1"),
        (["--targets", "nan"], "--targets 'nan'"),
        (["--targets", "0.3", "--lambdas", "nan"], "--lambdas 'nan'"),
        (["--targets", "0.3", "--lambdas", "-1"], "--lambdas '-1'"),
        (["--targets", "0.3,0.2"], "2 values for 3 gated layers"),
        (["--targets", "1.5"], "outside [0, 1]"),
        ([], "--targets"),
    ]:
        _refused(capsys, *common, *extra, contains=message)
    assert not out.exists()
    deep = ROOT / "configs" / "digits_deep_mlp_layers.yaml"
    _refused(capsys, "compare", deep, *QUIET, "--targets", "2.5", "--out", out, contains="whole numbers")
    _refused(capsys, "compare", deep, *QUIET, "--targets", "9", "--out", out, contains="max_layers=9")
    assert not out.exists()


def test_a_config_that_is_not_utf8_or_not_yaml_is_refused(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_bytes(b"name: x\n\xff\xfe\n")
    _refused(capsys, "train", config, contains="not UTF-8")
    config.write_text("[" * 5000)
    _refused(capsys, "train", config, contains="invalid YAML")
    _refused(capsys, "train", tmp_path, contains="is a directory")


def test_labels_outside_the_declared_classes_are_refused(tmp_path, capsys):
    root = tmp_path / "mnist"
    _write_mnist_like(root, compress=False)
    labels = root / "t10k-labels-idx1-ubyte"
    data = bytearray(labels.read_bytes())
    data[-1] = 12  # one test label 12 for a 10-class task
    labels.write_bytes(bytes(data))
    with pytest.raises(cs.DataError, match=r"test label 12 is outside the 10 classes of mnist \(0..9\)"):
        cs.load_dataset("mnist", root=str(root))
    _refused(capsys, "train", DIGITS, *QUIET, "data.name=mnist", f"data.root={root}", contains="label 12")


# -- 3. resume continues exactly, and the log stays true ---------------------------------------
def _rows(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if not k.startswith("time/")} for row in rows]


def _epochs(run: Path) -> list[int]:
    """The epochs of the game's rows (the finishing phase logs rows of its own after them)."""
    return [row["epoch"] for row in _rows(run) if not is_phase_row(row)]


def _start(run_dir: Path, *overrides: str) -> subprocess.Popen:
    args = ["train", str(DIGITS), *QUIET, "train.deterministic=true", *overrides, "--run-dir", str(run_dir)]
    return subprocess.Popen(
        [sys.executable, "-m", "constrained_sparsity", *args],
        cwd=ROOT,
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.slow
def test_a_stop_inside_an_epoch_resumes_to_the_same_log(tmp_path):
    # 180 steps per epoch (batch 8): a SIGTERM lands inside an epoch
    # 6 epochs: on a fast machine the run cannot end within the 0.3 s offset into epoch 2
    common = ["train.epochs=6", "data.batch_size=8", "train.threads=1"]
    full = _start(tmp_path / "full", *common)
    assert full.wait(timeout=300) == 0
    part = _start(tmp_path / "part", *common)
    metrics = tmp_path / "part" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not metrics.exists() or not metrics.read_text()):
        time.sleep(0.01)
    time.sleep(0.3)
    part.send_signal(signal.SIGTERM)
    assert part.wait(timeout=120) == 128 + signal.SIGTERM
    ckpt = load_checkpoint(tmp_path / "part" / "checkpoint.pt")
    assert ckpt["step_in_epoch"] > 0 and ckpt["epoch_sums"]["steps"] == ckpt["step_in_epoch"]
    resumed = subprocess.run(
        [sys.executable, "-m", "constrained_sparsity", "train", "--resume", str(tmp_path / "part")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr
    assert _rows(tmp_path / "part") == _rows(tmp_path / "full")  # train/loss and train/lagrangian too


def test_a_row_logged_after_the_last_checkpoint_and_a_cut_line_are_cut_on_resume(tmp_path):
    common = [*QUIET, "train.deterministic=true"]
    cs.run(cs.load_config(DIGITS, [*common, "train.epochs=3"]), run_dir=tmp_path / "full")
    run = tmp_path / "run"
    cs.run(cs.load_config(DIGITS, [*common, "train.epochs=1"]), run_dir=run)
    epoch1 = (run / "checkpoint.pt").read_bytes()
    cs.run(resume=run, overrides=["train.epochs=2"])
    # a kill after epoch 2's row was written but before its checkpoint, during the next write
    (run / "checkpoint.pt").write_bytes(epoch1)
    with (run / "metrics.jsonl").open("a") as fh:
        fh.write('{"epoch": 3, "train/lo')
    cut_before = (run / "metrics.jsonl").read_text().splitlines(keepends=True)[1:]
    result = cs.run(resume=run, overrides=["train.epochs=3"])
    assert _epochs(run) == [1, 2, 3]
    assert _rows(run) == _rows(tmp_path / "full")  # the finishing phase's rows too
    assert [row["epoch"] for row in result.history] == [1, 2, 3]
    # what was cut is kept: the finishing row of the 1-epoch run (cut by the first resume), then the rest
    assert json.loads((run / "metrics.jsonl.cut-1").read_text())["finish/epoch"] == 1
    assert (run / "metrics.jsonl.cut-2").read_text() == "".join(cut_before)


def test_a_new_run_never_reuses_a_run_directory(tmp_path, capsys):
    run = tmp_path / "run"
    cs.run(cs.load_config(DIGITS, [*QUIET, "train.epochs=1"]), run_dir=run)
    before = _snapshot(run)
    with pytest.raises(cs.ConfigError, match="already holds a run; continue it with --resume"):
        cs.run(cs.load_config(DIGITS, [*QUIET, "train.epochs=1"]), run_dir=run)
    _refused(capsys, "train", DIGITS, *QUIET, "train.epochs=1", "--run-dir", run, contains="--overwrite")
    assert _snapshot(run) == before
    result = cs.run(cs.load_config(DIGITS, [*QUIET, "train.epochs=2"]), run_dir=run, overwrite=True)
    assert [row["epoch"] for row in result.history] == [1, 2] and _epochs(run) == [1, 2]


def test_run_directories_made_at_the_same_moment_are_distinct(tmp_path):
    barrier = threading.Barrier(16)
    made, errors = [], []

    def make():
        barrier.wait()
        try:
            made.append(new_run_dir(tmp_path, "same"))
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=make) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(set(made)) == 16 and all(p.parent == tmp_path for p in made)


def test_wandb_that_cannot_write_does_not_stop_the_run(tmp_path):
    # its directory not writable: a file where its folder should go
    cs.run(cs.load_config(DIGITS, [*QUIET, "train.epochs=1"]), run_dir=tmp_path / "b")
    (tmp_path / "b" / "wandb").write_text("in the way")
    with pytest.warns(UserWarning, match="W&B could not start"):
        result = cs.run(resume=tmp_path / "b", overrides=["train.epochs=2", "tracking.wandb=offline"])
    assert _epochs(tmp_path / "b") == [1, 2] and result.wandb_dir is None


def test_wandb_failing_keeps_exit_code_zero_at_the_command_line(tmp_path):
    # its service failing (a fresh process: W&B keeps one service per process)
    env = dict(os.environ, WANDB_SERVICE="not-a-service")
    args = ["train", str(DIGITS), "tracking.wandb=offline", "tracking.progress=false", "train.epochs=1"]
    proc = subprocess.run(
        [sys.executable, "-m", "constrained_sparsity", *args, "--run-dir", str(tmp_path / "r")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "warning: W&B could not start" in proc.stderr and "Traceback" not in proc.stderr
    assert _epochs(tmp_path / "r") == [1]


def test_the_readme_trust_paragraph_names_what_is_refused():
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Files and trust") :]
    for phrase in ("weights_only=True", "model.pt2", "torch.export.load", "safe_load", "module:Class"):
        assert phrase in section, phrase


def test_more_hostile_inputs_are_refused_in_one_line(run_copy, tmp_path, capsys):
    _refused(capsys, "train", DIGITS, *QUIET, "model.hidden=[100000000000]", contains="cannot allocate the network")
    _refused(capsys, "eval", run_copy, "--batches", 10**8, contains="--batches at most")
    _refused(capsys, "train", DIGITS, *QUIET, "train.epochs.x=1", contains="is not a section")
    _refused(capsys, "train", DIGITS, *QUIET, "sparsity.layers=5", contains="should be a mapping")
    _refused(capsys, "train", DIGITS, *QUIET, "sparsity.method=math:pi", contains="not a subclass")
    _refused(capsys, "train", "--resume", tmp_path / "nowhere", contains="no checkpoint.pt there")
    _refused(capsys, "eval", tmp_path / "notes.txt", contains="expected a run directory or a compact model")
    # a checkpoint whose position does not fit its run
    state = load_checkpoint(run_copy / "checkpoint.pt")
    torch.save({**state, "epoch": -3}, run_copy / "checkpoint.pt")
    before = _snapshot(run_copy)
    _refused(capsys, "train", "--resume", run_copy, "train.epochs=4", contains="does not fit")
    assert _snapshot(run_copy) == before
    torch.save(state, run_copy / "checkpoint.pt")
    # a log that cannot be written
    (run_copy / "metrics.jsonl").unlink()
    (run_copy / "metrics.jsonl").mkdir()
    _refused(capsys, "train", "--resume", run_copy, "train.epochs=4", contains="cannot write the log")


def test_a_run_of_zero_epochs_keeps_a_checkpoint_and_compacts(tmp_path):
    """``train.epochs: 0`` (the finishing phase alone, e.g. after ``train.init_from``): the run
    directory still holds the state the finishing phase started from, so that ``csparse
    compact`` / ``eval`` load the network the run returned (refused before: "not a run directory")."""
    from constrained_sparsity.runs import compact_trained, load_run

    config = cs.load_config(DIGITS, ["train.epochs=0", "sparsity.targets=0.3", *QUIET])
    result = cs.run(config, run_dir=tmp_path / "run")
    assert (tmp_path / "run" / "checkpoint.pt").is_file() and result.feasible
    trained = load_run(tmp_path / "run")
    assert cs.error_rate(trained.model, trained.dataset.test_x, trained.dataset.test_y) == result.test_error
    small = compact_trained(trained).module
    assert cs.error_rate(small, trained.dataset.test_x, trained.dataset.test_y) == result.test_error
