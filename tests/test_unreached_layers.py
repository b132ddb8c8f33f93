"""A gate acts where its layer runs: layers a model uses without calling them are refused in one
line (nn.MultiheadAttention's out_proj, F.linear(x, layer.weight)), never a silent no-op or a
crash at the second step."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import constrained_sparsity as cs


class EncoderClassifier(nn.Module):
    """A hand-built nn.TransformerEncoder classifier of 8x8 digits (rows as tokens)."""

    def __init__(self, width=16, classes=10):
        super().__init__()
        self.embed = nn.Linear(8, width)
        layer = nn.TransformerEncoderLayer(width, nhead=2, dim_feedforward=32, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=1, enable_nested_tensor=False)
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        return self.head(self.encoder(self.embed(x.view(-1, 8, 8))).mean(1))


class DirectWeight(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(torch.relu(F.linear(x, self.proj.weight, self.proj.bias)))


def test_attach_l0_defaults_on_a_transformer_encoder_refuse_in_one_line():
    model = EncoderClassifier()
    with pytest.raises(ValueError, match="layer 'encoder.layers.0.self_attn.out_proj': nn.MultiheadAttention") as info:
        cs.attach_l0(model)
    assert "\n" not in str(info.value)
    assert not any(n.endswith("parametrizations") for n, _ in model.named_modules())  # nothing attached


def test_the_layers_a_transformer_calls_train_with_gates_that_act():
    torch.manual_seed(0)
    model = EncoderClassifier()
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and "self_attn" not in n]
    digits = cs.load_dataset("digits")
    gates = cs.attach_l0(model, layers=names, example=digits.train_x[:2])
    problem = cs.SparsityProblem(model, gates, [cs.Target(epsilon=0.5)], mode="constrained")
    optimizer = cs.build_optimizer(problem, primal=cs.PrimalOptimizer("adam", lr=3e-3, gate_lr=3e-2))
    model.train()
    for step, (x, y) in enumerate(
        cs.data.batches(digits.train_x, digits.train_y, 64, torch.Generator().manual_seed(0))
    ):
        cs.train_step(problem, optimizer, x, y)
        if step == 19:
            break
    model.eval()
    x = digits.test_x[:16]
    before = model(x)
    with torch.no_grad():
        model.encoder.layers[0].linear1.l0_gate.log_alpha.fill_(-20.0)  # close every gate of one layer
    assert not torch.allclose(model(x), before)


def test_a_layer_used_through_its_weight_is_refused_when_an_example_runs():
    model = DirectWeight()
    with pytest.raises(ValueError, match="layer 'proj' is not called in the model's forward pass"):
        cs.attach_l0(model, example=torch.randn(2, 8))
    gates = cs.attach_l0(DirectWeight(), layers=["head"], example=torch.randn(2, 8))  # the called one is fine
    assert gates.layer_names() == ["head"]
