"""A sparsity method written outside the package, as a user would: l1 by soft-thresholding.

The budget is "at most eps of the weights non-zero" (``|w| > delta``), moved by the exact
count; there is no differentiable surrogate: after each primal step the proximal step of
``lambda * ||w||_1`` with step ``lr`` soft-thresholds the weights,
``w <- sign(w) * max(|w| - lr * lambda, 0)``. It keeps one piece of state outside the model
(the number of steps it has seen), so that checkpoints must carry it.

Used by ``tests/test_user_method.py``: as a class, and from a config as
``sparsity.method: tests.l1_method:SoftThresholdL1``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from constrained_sparsity import MethodReport, MethodSpec, OptionError, Proximal, SparsityMethod, targets_from_spec


@dataclass
class L1Options:
    delta: float = 1e-4  # |w| <= delta counts as zero
    layers: list[str] | None = None  # the linear layers whose weights are sparsified; null: all

    def __post_init__(self) -> None:
        if not self.delta >= 0:
            raise OptionError("delta", self.delta, "should be >= 0")


class L1Report(MethodReport):
    """What the method logs: the share of weights above ``delta`` per layer, and its step count."""

    def metrics(self) -> dict[str, float]:
        m = self.method
        out = {f"l1/density/{n}": float((w.abs() > m.delta).float().mean()) for n, w in m.weights.items()}
        out["l1/steps"] = m.steps
        return out

    def measure_key(self, target):  # type: ignore[no-untyped-def]
        return f"l1/density/{target.layers[0]}" if target.layers and len(target.layers) == 1 else None


class SoftThresholdL1(Proximal, SparsityMethod):
    name = "l1"
    spec = MethodSpec(options=L1Options)
    reporter = L1Report

    def __init__(self, model: nn.Module, layers: list[str] | None = None, delta: float = 1e-4) -> None:
        modules = dict(model.named_modules())
        names = layers if layers is not None else [n for n, m in modules.items() if isinstance(m, nn.Linear)]
        self.weights = {n: modules[n].weight for n in names}
        self.delta = delta
        self.steps = 0

    @classmethod
    def from_config(cls, model, options, spec, context):  # type: ignore[no-untyped-def]
        method = cls(model, options.layers, options.delta)
        return method, targets_from_spec(method, spec, f"{context.prefix}targets")

    def layer_names(self) -> list[str]:
        return list(self.weights)

    def _selected(self, layers: tuple[str, ...] | None) -> list[torch.Tensor]:
        return [self.weights[n] for n in (layers or self.weights)]

    def measure(self, target):  # type: ignore[no-untyped-def]
        with torch.no_grad():
            ws = self._selected(target.layers)
            nonzero = sum((w.abs() > self.delta).sum() for w in ws)
            exact = nonzero / sum(w.numel() for w in ws)
        return None, exact.float()

    def proximal_step_(self, target, strength: float) -> None:  # type: ignore[no-untyped-def]
        with torch.no_grad():
            for w in self._selected(target.layers):
                w.copy_(w.sign() * (w.abs() - strength).clamp(min=0.0))

    def after_step(self) -> None:
        self.steps += 1

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps = int(state["steps"])
