"""Transformer units: attention heads and MLP neurons gated, counted, removed (the ViT of models.py)."""

import pytest
import torch
from torch import nn

import constrained_sparsity as cs
from constrained_sparsity.compact import count_flops, count_params
from constrained_sparsity.export import load_compact, save_compact
from constrained_sparsity.models import Attention, ViT

from .conftest import DEVICES

SHAPE = (1, 8, 8)


def _vit():
    torch.manual_seed(0)
    return ViT(SHAPE, 10, patch=2, width=16, depth=2, heads=4, hidden=32)


def test_a_closed_head_equals_the_attention_without_its_rows_and_columns():
    torch.manual_seed(0)
    attn = Attention(16, heads=4)
    x = torch.randn(3, 5, 16)
    model = nn.Sequential(attn)  # a module of its own; its one head group
    units = cs.attach_l0_units(model, x, output_layers=[])
    with torch.no_grad():
        units.gates["0"].log_alpha.fill_(10.0)
        units.gates["0"].log_alpha[2] = -10.0  # head 2 closed
    model.eval()
    # by hand: an attention of 3 heads holding heads 0, 1, 3 of the original
    small = Attention(16, heads=3, head_dim=4)
    rows = torch.cat([torch.arange(h * 4, h * 4 + 4) for h in (0, 1, 3)])
    with torch.no_grad():
        for name in ("q", "k", "v"):
            getattr(small, name).weight.copy_(getattr(attn, name).weight[rows])
            getattr(small, name).bias.copy_(getattr(attn, name).bias[rows])
        small.out.weight.copy_(attn.out.weight[:, rows])
        small.out.bias.copy_(attn.out.bias)
        torch.testing.assert_close(model(x), small(x), rtol=0, atol=1e-6)


def test_heads_and_neurons_are_the_units_of_a_vit():
    model = _vit()
    units = cs.attach_l0_units(model, torch.randn(2, *SHAPE))
    assert [(g.name, g.size, g.kind) for g in units.graph.groups] == [
        ("blocks.0.attn", 4, "heads"), ("blocks.0.mlp", 32, "neurons"),
        ("blocks.1.attn", 4, "heads"), ("blocks.1.mlp", 32, "neurons"),
    ]  # fmt: skip
    dense = count_params(model)
    assert units.graph.count(torch.ones(units.graph.num_units)) == dense


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("weighting", ["params", "flops"])
def test_vit_compaction_keeps_outputs_and_counts_what_the_measure_reported(device, weighting, tmp_path):
    model = _vit().to(device)
    x = torch.randn(4, *SHAPE, device=device)
    units = cs.attach_l0_units(model, x, weighting=weighting)
    torch.manual_seed(1)
    with torch.no_grad():
        for g in units.gates.values():
            g.log_alpha.copy_(torch.where(torch.rand_like(g.log_alpha) < 0.5, -10.0, torch.randn_like(g.log_alpha)))
    model.eval()
    with torch.no_grad():
        gated = model(x)
    small = cs.compact(model, SHAPE, methods=[units])
    with torch.no_grad():
        torch.testing.assert_close(small.module(x), gated, rtol=0, atol=1e-5)
    counted = count_params(small.module) if weighting == "params" else count_flops(small.module, SHAPE)
    assert counted == units.count()
    heads = [m.heads for m in small.module.modules() if isinstance(m, Attention)]
    assert heads == [int(units.gates[f"blocks-{i}-attn"].active().sum()) or 1 for i in range(2)]
    small.rebuild = {"name": "vit", "kwargs": {}, "input_shape": list(SHAPE), "num_classes": 10}
    if weighting == "params":  # saved and loaded back: a ViT of the config's sizes, resized
        small.module = small.module.cpu()
        paths = save_compact(small, tmp_path, SHAPE)
        assert paths["model"].is_file()


def test_per_kind_budgets_hold_beside_the_model_wise_one():
    """At most 40 % of the parameters and at most 50 % of the heads: both hold at the end."""
    torch.manual_seed(0)
    digits = cs.load_dataset("digits")
    images = digits.train_x.view(-1, *SHAPE)
    model = _vit()
    units = cs.attach_l0_units(model, images[:4])
    targets = [cs.Target(epsilon=0.4, name="params"), units.kind_target("heads", 0.5)]
    problem = cs.SparsityProblem(model, units, targets, mode="constrained")
    optimizer = cs.build_optimizer(problem, primal=cs.PrimalOptimizer("adam", lr=3e-3, gate_lr=3e-2))
    model.train()
    for epoch in range(2):
        for x, y in cs.data.batches(images, digits.train_y, 64, torch.Generator().manual_seed(epoch)):
            cs.train_step(problem, optimizer, x, y)
    problem.project_()
    violations = problem.violations()
    assert violations["params"][1] <= 0 and violations["l0_units_heads"][1] <= 0
    metrics = cs.report_of(units).metrics()
    assert metrics["density/heads"] <= 0.5 and metrics["density/model"] <= 0.4


@pytest.mark.slow
def test_csparse_trains_the_vit_config_and_its_compact_network_loads_back(tmp_path):
    run_dir = tmp_path / "run"
    overrides = ["data.name=digits", "data.batch_size=64", "train.epochs=2", "train.threads=1"]
    cfg = cs.load_config(
        "fashion_vit_l0_constrained", [*overrides, "tracking.wandb=disabled", "tracking.progress=false"]
    )
    result = cs.run(cfg, run_dir=run_dir)
    assert result.feasible is True
    assert result.measures["density/heads"] <= 0.75 and result.density["model"] <= 0.5
    report = cs.runs.compact_run(run_dir)
    assert report["max_abs_diff"] < 1e-5
    loaded, info = load_compact(run_dir / "compact" / "model.pt")
    assert info["rebuild"]["name"] == "vit" and type(loaded) is ViT
    program = torch.export.load(run_dir / "compact" / "model.pt2").module()
    digits = cs.load_dataset("digits")
    x = digits.test_x[:32].view(-1, *SHAPE)
    with torch.no_grad():
        torch.testing.assert_close(program(x), loaded(x), rtol=0, atol=1e-5)
    assert cs.error_rate(loaded, digits.test_x, digits.test_y) == pytest.approx(result.test_error)


@pytest.mark.parametrize(
    "attach, mode",
    [
        (lambda m: cs.attach_cges(m, budget="weights"), "constrained"),
        (lambda m: cs.attach_ast(m, "rw_l1"), "constrained"),
        (lambda m: cs.attach_lwc(m, end_step=8, every_steps=2), "projected"),
        (lambda m: cs.attach_dns(m), "projected"),
        (lambda m: cs.attach_cges_units(m, torch.zeros(1, *SHAPE)), "constrained"),
    ],
    ids=["cges", "rw_l1", "lwc", "dns", "cges_units"],
)
def test_the_other_methods_train_on_the_vits_linear_layers_and_compact(attach, mode):
    """CGES, the per-weight methods and CGES on units work on a ViT (its Linear layers are
    called through their forward); the finishing projection meets the budget, and compaction
    keeps the outputs (per-weight zeros stored sparse, units removed for cges_units)."""
    import warnings

    model = _vit()
    method = attach(model)
    digits = cs.load_dataset("digits")
    problem = cs.SparsityProblem(model, method, [cs.Target(0.5, restarts=False)], mode=mode)
    optimizer = cs.build_optimizer(
        problem, primal=cs.PrimalOptimizer("sgd", lr=0.05, momentum=0.9), dual=cs.DualOptimizer("sgd", lr=0.01)
    )
    model.train()
    for x, y in list(cs.data.batches(digits.train_x, digits.train_y, 64, torch.Generator().manual_seed(0)))[:10]:
        cs.train_step(problem, optimizer, x.view(-1, *SHAPE), y, dual_restarts=False)
    problem.project_()
    assert problem.violations()[problem.targets[0].name][1] <= 0
    model.eval()
    x = digits.test_x[:16].view(-1, *SHAPE)
    with torch.no_grad():
        before = model(x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a network that is not a chain keeps its per-weight zeros sparse
        small = cs.compact(model, SHAPE, methods=[method])
    with torch.no_grad():
        torch.testing.assert_close(small.module(x), before, rtol=0, atol=1e-5)
