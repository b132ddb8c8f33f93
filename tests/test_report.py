"""What each method logs and reports (its ``reporter``), and the narrow method core."""

from pathlib import Path

import pytest
import torch

import constrained_sparsity as cs
from constrained_sparsity.methods.base import SparsityMethod

ROOT = Path(__file__).resolve().parents[1]

# config -> lines only that method's reporter writes into the report of a run
REPORTS = {
    "digits_mlp_l0": [
        f"{'layer':<12}{'gates':>8}{'active':>8}{'density':>10}{'expected':>10}{'target':>8}",
        "(parameters)",
        "constraint l0_model: exact density ",
    ],
    "digits_mlp_cges": [f"{'layer':<12}{'groups':>8}{'active':>8}{'groups %':>10}{'weights %':>10}{'mu':>6}"],
    "digits_mlp_rw_l1": [
        f"{'layer':<12}{'weights':>10}{'non-zero':>10}{'density':>10}{'kurtosis':>10}",
        "non-zero weights ",
    ],
    "digits_mlp_lwc": [f"{'layer':<12}{'weights':>10}{'non-zero':>10}{'density':>10}{'kurtosis':>10}"],
    "digits_deep_mlp_layers": ["constraint layers: active layers ", "merged: "],
}


@pytest.mark.parametrize("name", list(REPORTS))
def test_the_report_of_a_run_has_its_methods_own_lines(quiet, name):
    """The report reads each method's summary entries through the method's reporter class: its
    per-layer table, its constraint line and its phase. A reporter left without them would
    print the generic line and no table."""
    cfg = cs.load_config(ROOT / "configs" / f"{name}.yaml", [*quiet, "train.epochs=1"])
    report = cs.format_report(cs.run(cfg))
    for line in REPORTS[name]:
        assert line in report, f"{line!r} not in the report:\n{report}"


def test_the_method_core_has_twelve_public_members():
    own = sorted(k for k in vars(SparsityMethod) if not k.startswith("_"))
    assert own == sorted(
        [
            *("name", "spec", "reporter", "from_config", "layer_names", "on_targets", "parameters"),
            *("check_target", "measure", "after_step", "state_dict", "load_state_dict"),
        ]
    )


def _measure(self, target):  # type: ignore[no-untyped-def]
    return None, torch.zeros(())


@pytest.mark.parametrize(
    "member,message",
    [
        ("metrics", "defines metrics: what a method logs and reports is its reporter's"),
        ("report_rows", "defines report_rows: what a method logs and reports is its reporter's"),
        ("freeze_", "defines freeze_ but does not inherit constrained_sparsity.Freezable"),
        ("fold", "defines fold but does not inherit constrained_sparsity.Foldable"),
        ("options", r"defines options: declare them as spec = MethodSpec\(options=...\)"),
    ],
)
def test_a_member_outside_the_core_is_refused_on_a_method_class(member, message):
    """A member the trainer would no longer call on the method (it belongs to the reporter, a
    capability or the spec) is a class error, not a silent no-op."""
    with pytest.raises(TypeError, match=message):
        type("Stray", (SparsityMethod,), {"name": "stray", "measure": _measure, member: lambda self: {}})


def test_a_reporter_reads_the_live_method(tmp_path):
    """``report_of(method)``: the metrics, measure key, rows and target entries of a method's reporter."""
    torch.manual_seed(0)
    model = cs.MLP(8, [6], 3)
    gates = cs.attach_l0(model)
    report = cs.report_of(gates)
    assert isinstance(report, cs.methods.l0.L0Report) and report.method is gates
    target = cs.Target(0.5, method=gates)
    expected, exact = gates.densities()
    assert report.metrics()["density/model"] == float(exact)
    assert report.measure_key(target) == "density/model"
    assert [r["name"] for r in report.rows()] == gates.layer_names()
    assert report.describe(target, float(expected), float(exact))["exact_density"] == float(exact)
