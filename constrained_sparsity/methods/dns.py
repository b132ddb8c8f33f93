"""Dynamic network surgery (Guo, Yao & Chen 2016; Fedorov & Rao eq. 2-3): the ``dns`` method.

A binary mask T per weight of each pruned layer; the layer computes with ``W * T``, but the
gradient reaches W whatever T is (straight-through: ``W + (W * T - W).detach()``), so that a
pruned weight keeps learning and can be *spliced* back. At a decaying rate the masks are
updated with hysteresis thresholds a_k < b_k per layer::

    T = 0 where |W| < a_k,    T = 1 where |W| >= b_k,    T unchanged in between     (eq. 2)

The thresholds come either from the layer's weight statistics (DNS's rule,
``thresholds: statistics``: ``t_k = max(mean|W_k| + c std|W_k|, 0)``) or from the budget
(``thresholds: budget``: t the magnitude that keeps exactly the budget's share of the weights,
model-wise over all pruned layers or per layer); in both cases ``a_k = (1 - margin) t_k`` and
``b_k = (1 + margin) t_k``. An update happens at a step with probability
``(1 + gamma step)^(-power)`` (DNS's decaying probability), drawn from the method's own
generator (its state is saved with the run). The mask is a ``torch.nn.utils.parametrize``
parametrization with a buffer, so it is in the model's ``state_dict``.

The budget is reported as for every method (``mode: projected``, lambda = 0); the finishing
phase prunes by magnitude to exactly the budget and retrains with the masks fixed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..errors import ConfigError, OptionError
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

__all__ = ["DNS", "DNSOptions", "StraightThroughMask", "attach_dns"]


class StraightThroughMask(nn.Module):
    """Parametrization ``W -> W * mask`` whose gradient passes to W unmasked (straight-through)."""

    def __init__(self, shape: torch.Size, device: torch.device, dtype: torch.dtype) -> None:
        super().__init__()
        self.register_buffer("mask", torch.ones(shape, device=device, dtype=dtype))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + (weight * self.mask - weight).detach()


@dataclass
class DNSOptions:
    """``thresholds``: ``budget`` or ``statistics`` (DNS's rule with ``c``); ``margin``: the
    hysteresis half-width (a = (1 - margin) t, b = (1 + margin) t); ``gamma``, ``power``: the
    mask-update probability ``(1 + gamma step)^(-power)``; ``layers``: the layers to prune."""

    thresholds: str = "budget"
    c: float = 1.0
    margin: float = 0.1
    gamma: float = 1e-4
    power: float = 1.0
    layers: list[str] | None = None

    def __post_init__(self) -> None:
        if self.thresholds not in ("budget", "statistics"):
            raise OptionError("thresholds", self.thresholds, "should be one of budget, statistics")
        for key in ("c", "gamma", "power"):
            value = getattr(self, key)
            if not within(value, 0):
                raise OptionError(key, value, "should be a finite number >= 0")
        if not (isinstance(self.margin, (int, float)) and 0.0 <= self.margin < 1.0):
            raise OptionError("margin", self.margin, "should be in [0, 1)")


class DNSReport(WeightsReport):
    """What :class:`DNS` logs and reports: its weights as the mask leaves them."""

    def weights(self) -> dict[str, torch.Tensor]:
        m = self.method
        return {n: m._w(layer) * m._mask(layer) for n, layer in m.layers.items()}


class DNS(Projectable, Freezable, SparsityMethod):
    """Dynamic network surgery on the Linear / Conv2d layers of a model (see the module docstring)."""

    name = "dns"
    reporter = DNSReport
    spec = MethodSpec(options=DNSOptions, finishes=True, modes=("projected",))

    def __init__(
        self,
        model: nn.Module,
        layers: list[str] | None = None,
        thresholds: str = "budget",
        c: float = 1.0,
        margin: float = 0.1,
        gamma: float = 1e-4,
        power: float = 1.0,
        seed: int | None = None,
    ) -> None:
        DNSOptions(thresholds, c, margin, gamma, power)
        self.layers = select_layers(model, layers, "DNS")
        for module in self.layers.values():
            w = module.weight
            parametrize.register_parametrization(module, "weight", StraightThroughMask(w.shape, w.device, w.dtype))
        self.rule, self.c, self.margin, self.gamma, self.power = thresholds, c, margin, gamma, power
        # the mask updates' draws: seeded from the run's seed (train.seed), without using its stream
        self.generator = torch.Generator().manual_seed(torch.initial_seed() if seed is None else seed)
        self.step = 0
        self.frozen = False
        self._targets: list[Target] = []

    @classmethod
    def from_config(cls, model: nn.Module, options: Any, spec: BudgetSpec, context: BuildContext):  # type: ignore[no-untyped-def]
        o = options if options is not None else DNSOptions()
        try:
            method = cls(model, o.layers, o.thresholds, o.c, o.margin, o.gamma, o.power)
        except ValueError as exc:
            raise ConfigError(f"{context.prefix}layers: {exc}") from None
        return method, targets_from_spec(method, spec, f"{context.prefix}targets")

    def on_targets(self, targets: list[Target]) -> None:
        self._targets = list(targets)

    def layer_names(self) -> list[str]:
        return list(self.layers)

    def _mask(self, module: nn.Module) -> torch.Tensor:
        return module.parametrizations.weight[0].mask

    def _w(self, module: nn.Module) -> torch.Tensor:
        return module.parametrizations.weight.original

    @torch.no_grad()
    def measure(self, target: Target) -> tuple[None, torch.Tensor]:
        """No surrogate: the share of weights that are not zero in ``W * T``."""
        mods = [self.layers[n] for n in (target.layers or self.layers)]
        nonzero = sum((self._w(m) * self._mask(m)).ne(0).sum() for m in mods)
        return None, (nonzero / sum(self._w(m).numel() for m in mods)).float()

    # -- surgery -------------------------------------------------------------------------------
    @torch.no_grad()
    def thresholds(self, magnitudes: dict[str, torch.Tensor] | None = None) -> dict[str, float]:
        """t_k of every layer: from the statistics, or the magnitude that keeps the budget."""
        mags = magnitudes if magnitudes is not None else {n: self._w(m).abs() for n, m in self.layers.items()}
        if self.rule == "statistics":
            return {n: max(float(a.mean() + self.c * a.std()), 0.0) for n, a in mags.items()}
        out: dict[str, float] = {}
        for target in self._targets or [Target(1.0)]:
            names = list(target.layers or self.layers)
            flat = torch.cat([mags[n].flatten() for n in names])
            keep = math.floor(target.epsilon * flat.numel() + 1e-9)
            # the keep-th largest magnitude: weights at or above it are the budget's share
            t = float(torch.topk(flat, keep, sorted=False).values.min()) if keep > 0 else float("inf")
            for n in names:
                out[n] = max(out.get(n, 0.0), t)  # a per-layer budget is the stricter one
        return out

    @torch.no_grad()
    def update_masks(self, thresholds: dict[str, float] | None = None) -> None:
        """Eq. 2: T = 0 under a_k, 1 at or over b_k, unchanged in between (t_k of
        ``thresholds``, by layer; default :meth:`thresholds`)."""
        mags = {n: self._w(m).abs() for n, m in self.layers.items()}
        for name, t in (self.thresholds(mags) if thresholds is None else thresholds).items():
            mag, mask = mags[name], self._mask(self.layers[name])
            keep = (mag >= (1.0 + self.margin) * t) | (mask.bool() & (mag >= (1.0 - self.margin) * t))
            mask.copy_(keep)

    def after_step(self) -> None:
        self.step += 1
        if self.frozen:
            return
        probability = (1.0 + self.gamma * self.step) ** (-self.power)
        if float(torch.rand((), generator=self.generator)) < probability:
            self.update_masks()

    def freeze_(self) -> None:
        self.frozen = True

    @torch.no_grad()
    def project_(self, target: Target) -> dict[str, int]:
        """Keep the largest ``|W * T|`` weights, exactly the budget's share; mask the rest."""
        names = list(target.layers or self.layers)
        mods = [self.layers[n] for n in names]
        total = sum(self._w(m).numel() for m in mods)
        masks = keep_largest(
            [(self._w(m) * self._mask(m)).abs() for m in mods], math.floor(target.epsilon * total + 1e-9)
        )
        closed = {}
        for name, m, keep in zip(names, mods, masks):
            before = int(self._mask(m).sum())
            self._mask(m).mul_(keep.to(self._mask(m).dtype))
            if before != int(self._mask(m).sum()):
                closed[name] = before - int(self._mask(m).sum())
        return closed

    # -- state outside the model ----------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.generator.set_state(state["generator"])


def attach_dns(model: nn.Module, layers: list[str] | None = None, **options: Any) -> DNS:
    """Dynamic network surgery on ``model``'s Linear / Conv2d layers (see :class:`DNS`)."""
    return DNS(model, layers, **options)
