"""Magnitude pruning with retraining ("learning both weights and connections", LWC; Han et
al. 2015), gradual: the ``lwc`` method.

The smallest-magnitude weights are pruned at regular steps while training goes on, the kept
share falling from 1 to the budget epsilon along a cubic schedule (Zhu & Gupta 2017, the
``CubicSL`` schedule of ``torch.ao.pruning``)::

    kept(t) = eps + (1 - eps) (1 - (t - t0) / (t1 - t0))^3,    t0 <= t <= t1

then the network retrains with the masks fixed until the end. A model-wise budget prunes
globally (the smallest weights of all the layers), a per-layer budget each layer alone. The
masks are :class:`~constrained_sparsity.graph.Mask` parametrizations (``weight = original *
mask``, ``torch.ao.pruning``'s ``FakeSparsity``): pruned weights are exactly 0 whatever the
optimizer does to the original, and the masks are in the model's ``state_dict``. A pruned
weight stays pruned (its magnitude is 0).

The budget is met by construction (a top-k mask): the method runs in ``mode: projected``,
its constraint reported with lambda = 0; the exact measure is the share of non-zero weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..errors import ConfigError, OptionError
from ..graph import Mask, mask_of
from ..numbers import within
from .base import (
    BudgetSpec,
    BuildContext,
    Freezable,
    MethodSpec,
    Projectable,
    SparsityMethod,
    Target,
    WeightsReport,
    keep_largest,
    select_layers,
    targets_from_spec,
)

__all__ = ["LWC", "LWCOptions", "attach_lwc", "cubic_kept"]


def cubic_kept(step: int, start: int, end: int, epsilon: float) -> float:
    """The share of weights kept at ``step``: 1 before ``start``, epsilon from ``end`` on, a cubic between."""
    if step <= start:
        return 1.0
    if step >= end:
        return epsilon
    return epsilon + (1.0 - epsilon) * (1.0 - (step - start) / (end - start)) ** 3


@dataclass
class LWCOptions:
    """``start`` / ``end``: the pruning runs from ``start`` to ``end`` as shares of the
    training steps (0.0 and 0.7: the last 30 % retrain with the final masks; the steps of
    ``train.epochs``, so a run extended on resume follows the longer schedule); ``every``:
    pruning events per epoch (masks updated every 1/every epoch in between);
    ``layers``: the Linear / Conv2d layers to prune (null: all)."""

    start: float = 0.0
    end: float = 0.7
    every: float = 1.0
    layers: list[str] | None = None

    def __post_init__(self) -> None:
        if not (0.0 <= self.start < self.end <= 1.0):
            raise OptionError("end", self.end, f"should satisfy 0 <= start ({self.start}) < end <= 1")
        if not within(self.every, above=0):
            raise OptionError("every", self.every, "should be a number > 0")


class LWCReport(WeightsReport):
    """What :class:`LWC` logs and reports: its masked weights."""

    def weights(self) -> dict[str, torch.Tensor]:
        return {n: m.weight for n, m in self.method.layers.items()}


class LWC(Projectable, Freezable, SparsityMethod):
    """Gradual magnitude pruning with retraining (see the module docstring)."""

    name = "lwc"
    reporter = LWCReport
    spec = MethodSpec(options=LWCOptions, finishes=True, modes=("projected",))

    def __init__(
        self,
        model: nn.Module,
        layers: list[str] | None = None,
        start_step: int = 0,
        end_step: int = 1,
        every_steps: int = 1,
    ) -> None:
        self.layers = select_layers(model, layers, "LWC")
        for module in self.layers.values():
            if mask_of(module) is None:  # weight = original * mask, a mask of ones
                parametrize.register_parametrization(module, "weight", Mask(module.weight))
        self.start_step, self.end_step, self.every_steps = start_step, max(end_step, start_step + 1), every_steps
        self.step = 0
        self.frozen = False
        self._targets: list[Target] = []

    @classmethod
    def from_config(cls, model: nn.Module, options: Any, spec: BudgetSpec, context: BuildContext):  # type: ignore[no-untyped-def]
        o = options if options is not None else LWCOptions()
        total = context.steps_per_epoch * context.epochs
        try:
            method = cls(
                model,
                o.layers,
                int(o.start * total),
                int(o.end * total),
                max(1, round(context.steps_per_epoch / o.every)),
            )
        except ValueError as exc:
            raise ConfigError(f"{context.prefix}layers: {exc}") from None
        return method, targets_from_spec(method, spec, f"{context.prefix}targets")

    def on_targets(self, targets: list[Target]) -> None:
        self._targets = list(targets)

    def layer_names(self) -> list[str]:
        return list(self.layers)

    def _select(self, layers: tuple[str, ...] | None) -> list[nn.Module]:
        return [self.layers[n] for n in (layers or self.layers)]

    @staticmethod
    def _mask(module: nn.Module) -> torch.Tensor:
        return mask_of(module).mask  # type: ignore[union-attr]

    @torch.no_grad()
    def measure(self, target: Target) -> tuple[None, torch.Tensor]:
        """No surrogate: the share of weights that are not zero (mask and weight)."""
        mods = self._select(target.layers)
        nonzero = sum(m.weight.ne(0).sum() for m in mods)
        return None, (nonzero / sum(m.weight.numel() for m in mods)).float()

    @torch.no_grad()
    def _prune_to(self, layers: tuple[str, ...] | None, kept: float) -> None:
        mods = self._select(layers)
        total = sum(m.weight.numel() for m in mods)
        masks = keep_largest([m.weight.abs() for m in mods], math.floor(kept * total + 1e-9))
        for m, mask in zip(mods, masks):
            self._mask(m).copy_(mask & self._mask(m).bool())

    def after_step(self) -> None:
        self.step += 1
        if self.frozen or not self.start_step < self.step <= self.end_step:
            return
        if (self.step - self.start_step) % self.every_steps and self.step != self.end_step:
            return  # between pruning events (the last one, at end_step, reaches the budget)
        for target in self._targets:
            self._prune_to(target.layers, cubic_kept(self.step, self.start_step, self.end_step, target.epsilon))

    def freeze_(self) -> None:
        self.frozen = True

    @torch.no_grad()
    def project_(self, target: Target) -> dict[str, int]:
        """Prune by magnitude to exactly the budget (the last step of the schedule)."""
        before = {n: int(self._mask(m).sum()) for n, m in self.layers.items()}
        self._prune_to(target.layers, target.epsilon)
        after = {n: int(self._mask(m).sum()) for n, m in self.layers.items()}
        return {n: before[n] - after[n] for n in self.layers if before[n] != after[n]}

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])


def attach_lwc(
    model: nn.Module, layers: list[str] | None = None, start_step: int = 0, end_step: int = 1, every_steps: int = 1
) -> LWC:
    """Gradual magnitude pruning on ``model``'s Linear / Conv2d layers (see :class:`LWC`)."""
    return LWC(model, layers, start_step, end_step, every_steps)
