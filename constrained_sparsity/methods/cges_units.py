"""Combined group and exclusive sparsity on the units of a network's dependency graph: the ``cges_units`` method.

CGES (Yoon & Hwang, ICML 2017; the ``cges`` method) with its groups taken from the network's
coupled units (:mod:`constrained_sparsity.units`, traced by Torch-Pruning's
``DependencyGraph``) instead of one layer's columns. The group of a unit is **every weight
that reads it**: the input slices of every layer that reads that channel or neuron. On a
ResNet a residual-stream channel is read by the first convolution of every later block, by the
shortcut convolutions and by the classifier; its group is all of those slices together. This
is ``cges``'s ``grouping: input`` (a group is the weights leaving one input feature) with the
coupling of the graph: when the group is zero nothing reads the unit, so compaction removes it
from every layer it lives in -- its writers, their BatchNorms, its readers -- and the outputs do
not change (a BatchNorm's shift on an unread channel reaches nothing).

Why the readers only, not the readers and the writers: a weight of a convolution reads one unit
and writes another, so groups of both would overlap, and the proximal operator of overlapping
group norms has no closed form. The reader groups do not overlap (every weight reads exactly
one input index), their proximal step is exact, and a zero reader group is a removable unit.

**Regularisers** with a mix ``mu`` (one number: a unit spans layers, so the ``cges`` per-layer
schedule does not apply)::

    group (l2,1):      lambda mu       sum_u c_u ||W_u||_2,   W_u: the weights reading unit u, c_u = sqrt(|W_u|)
    exclusive (l1,2):  lambda (1 - mu) sum_l 1/2 sum_g ||W_{l,g}||_1^2,   g: one input of layer l, as in ``cges``

**Proximal steps** after each primal step, with step size the primal learning rate lr: the
group prox of every unit at once (exact: the groups are disjoint), then ``cges``'s exclusive
prox per layer (:func:`~constrained_sparsity.methods.cges.exclusive_prox`).

**Measure** (exact only; the multiplier acts through the proximal strength, as for ``cges``):
model-wise, the parameters -- or, with ``weighting: flops``, the FLOPs per example -- of the
network compaction leaves, over the dense network's (:meth:`UnitGraph.count
<constrained_sparsity.units.UnitGraph.count>` with a unit open when any weight reads it); per
unit group (targets naming the group's root layer), the share of its units open. A group whose
units are all closed keeps one channel (PyTorch's layers need one), counted, as compaction
leaves it. Per-weight zeros that the exclusive term makes inside open units are not counted:
a dense deployed layer stores them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import OptionError
from ..numbers import within
from ..units import UnitError, UnitGraph, format_unit_rows, model_device, on_example, prune_closed, units_of
from .base import (
    BudgetSpec,
    BuildContext,
    MethodReport,
    MethodSpec,
    Projectable,
    Proximal,
    SparsityMethod,
    Target,
    UnitPruner,
    close_fewest_,
    targets_from_spec,
)
from .cges import EXCLUSIVE_PROXES, exclusive_prox, from_groups, to_groups

__all__ = ["CGESUnits", "CGESUnitsOptions", "attach_cges_units"]


@dataclass
class CGESUnitsOptions:
    """Config options of the ``cges_units`` method (``sparsity.<key>``).

    ``mu``: the group share of the strength (the exclusive term has ``1 - mu``).
    ``group_weight``: ``sqrt`` (c_u = sqrt of the group's size) or ``none``.
    ``exclusive_prox``: ``exact`` or ``approximate`` (as for ``cges``).
    ``weighting``: what the model-wise density counts, ``params`` or ``flops`` (per example)
    of the compact network. ``output_layers``: layers whose outputs are not units (default:
    the one that gives the network's output).
    """

    mu: float = 0.8
    group_weight: str = "sqrt"
    exclusive_prox: str = "exact"
    weighting: str = "params"
    output_layers: list[str] | None = None

    def __post_init__(self) -> None:
        for key, choices in (
            ("group_weight", ("sqrt", "none")),
            ("exclusive_prox", EXCLUSIVE_PROXES),
            ("weighting", ("params", "flops")),
        ):
            if getattr(self, key) not in choices:
                raise OptionError(key, getattr(self, key), f"should be one of {', '.join(choices)}")
        if not within(self.mu, 0, 1):
            raise OptionError("mu", self.mu, "should be a number in [0, 1]")


@dataclass
class _Reader:
    """A layer that reads units: the unit of each of its inputs (``num_units``: none)."""

    module: nn.Module
    units: torch.Tensor  # long, one per input index; ``num_units`` where no unit
    depthwise: bool

    def input_view(self, values: torch.Tensor) -> torch.Tensor:
        """``values`` (one per input index) shaped to scale the weight along its inputs."""
        w = self.module.weight
        if self.depthwise:  # (channels, 1, kh, kw): the channel is its own input
            return values.view(-1, *([1] * (w.dim() - 1)))
        return values.view(1, -1, *([1] * (w.dim() - 2)))

    def per_input(self, values: torch.Tensor) -> torch.Tensor:
        """The sum of ``values`` (shaped like the weight) over each input index."""
        dims = tuple(d for d in range(values.dim()) if d != (0 if self.depthwise else 1))
        return values.sum(dim=dims)


class CGESUnitsReport(MethodReport):
    """What :class:`CGESUnits` logs and reports: the open units of each group and the compact count."""

    @torch.no_grad()
    def rows(self) -> list[dict[str, Any]]:
        open_ = self.method.open_units()
        return [
            {
                "name": g.name,
                "units": g.size,
                "open_units": int(open_[g.offset : g.offset + g.size].sum()),
                "layers": g.layers,
                "kind": g.kind,
            }
            for g in self.method.graph.groups
        ]

    @torch.no_grad()
    def metrics(self) -> dict[str, float]:
        out = {f"density/{r['name']}": r["open_units"] / r["units"] for r in self.rows()}
        out["density/model"] = float(self.method._measure(None))
        out[f"{self.method.weighting}/compact"] = float(self.method.count())
        return out

    def measure_key(self, target: Target) -> str | None:
        if target.layers is None:
            return "density/model"
        return f"density/{target.layers[0]}" if len(target.layers) == 1 else None

    @classmethod
    def format_rows(
        cls, rows: list[dict[str, Any]], targets: list[dict[str, Any]], measures: dict[str, Any]
    ) -> list[str]:
        table = [(r["name"], r["units"], r["open_units"], None, len(r["layers"])) for r in rows]
        return format_unit_rows(table, measures)


class CGESUnits(Proximal, Projectable, UnitPruner, SparsityMethod):
    """CGES on dependency-graph units (see the module docstring). Built by :func:`attach_cges_units`;
    the weights are the model's own (nothing is registered on the model)."""

    name = "cges_units"
    reporter = CGESUnitsReport
    # as for cges: lambda multiplies weight norms
    spec = MethodSpec(options=CGESUnitsOptions, lambda_range=(1e-6, 1e-1))

    def __init__(self, model: nn.Module, example: torch.Tensor, options: CGESUnitsOptions | None = None) -> None:
        o = options or CGESUnitsOptions()
        device = model_device(model)
        self.model = model
        self.example = example[:1].detach().to(device).clone()
        self.graph: UnitGraph = units_of(model, self.example, o.output_layers)
        if not self.graph.groups:
            raise UnitError("the network has no prunable unit (every channel feeds the output)")
        self.graph.to(device)
        self.mu, self.weighting = float(o.mu), o.weighting
        self.group_weight, self.exclusive_prox = o.group_weight, o.exclusive_prox
        n = self.graph.num_units
        modules = dict(model.named_modules())
        self.readers: list[_Reader] = []
        self.layers: list[nn.Module] = []  # every Linear / Conv2d: the exclusive term's layers
        for dims in self.graph.layers:
            if dims.kind == "norm":
                continue
            module = modules[dims.name]
            self.layers.append(module)
            if bool((dims.in_units >= 0).any()):
                units = torch.where(dims.in_units >= 0, dims.in_units, n)
                self.readers.append(_Reader(module, units, dims.kind == "depthwise"))
        self._group_of = torch.cat(
            [torch.full((g.size,), i, dtype=torch.long, device=device) for i, g in enumerate(self.graph.groups)]
        )
        with torch.no_grad():
            self.sizes = self._per_unit(lambda w: torch.ones_like(w))  # weights reading each unit
        self.read = self.sizes > 0  # a unit no weight reads stays open
        self.dense = float(self.graph.count(torch.ones(n, device=device), self.weighting))

    @classmethod
    def from_config(cls, model: nn.Module, options: Any, spec: BudgetSpec, context: BuildContext):  # type: ignore[no-untyped-def]
        where = f"{context.prefix}method={cls.name}"
        method = on_example(lambda m, x: cls(m, x, options), model, context.input_shape, where)
        return method, targets_from_spec(method, spec, f"{context.prefix}targets")

    def layer_names(self) -> list[str]:
        return [g.name for g in self.graph.groups]

    # -- per-unit sums over the reader groups ----------------------------------------------------
    def _per_unit(self, of_weight: Any) -> torch.Tensor:
        """For every unit, the sum of ``of_weight(weight)`` over the weights that read it."""
        n = self.graph.num_units
        total = torch.zeros(n + 1, device=self._group_of.device, dtype=torch.float64)
        for r in self.readers:
            total.index_add_(0, r.units, r.per_input(of_weight(r.module.weight.detach())).double())
        return total[:n]

    def _scale_readers_(self, scale: torch.Tensor) -> None:
        """Every reader's weight times ``scale`` of the unit each input reads (one value per unit)."""
        ext = torch.cat([scale, scale.new_ones(1)])
        for r in self.readers:
            w = r.module.weight
            w.mul_(r.input_view(ext[r.units].to(w.dtype)))

    def _units_of(self, layers: tuple[str, ...] | None) -> torch.Tensor:
        """Which units the groups named by ``layers`` hold (all for ``None``)."""
        if layers is None:
            return torch.ones_like(self.read)
        wanted = torch.tensor(
            [g.name in layers for g in self.graph.groups], dtype=torch.bool, device=self._group_of.device
        )
        return wanted[self._group_of]

    # -- the measure -----------------------------------------------------------------------------
    @torch.no_grad()
    def open_units(self) -> torch.Tensor:
        """1 for a unit some weight still reads (or that nothing reads), else 0."""
        return (self._per_unit(torch.abs).gt(0) | ~self.read).float()

    @torch.no_grad()
    def _counted(self) -> torch.Tensor:
        """:meth:`open_units` with the first unit of an all-closed group kept (compaction keeps it)."""
        return self.graph.as_compacted(self.open_units())

    @torch.no_grad()
    def _measure(self, layers: tuple[str, ...] | None) -> torch.Tensor:
        if layers is None:
            return (self.graph.count(self._counted(), self.weighting) / self.dense).float()
        mask = self._units_of(layers)
        return self.open_units()[mask].mean().float()

    def measure(self, target: Target) -> tuple[None, torch.Tensor]:
        """No surrogate (the proximal steps move the weights); the exact deployable share."""
        return None, self._measure(target.layers)

    def check_target(self, target: Target) -> None:
        super().check_target(target)
        if target.measure != "exact":
            raise ValueError(f"measure={target.measure!r}: cges_units has no differentiable surrogate; use 'exact'")

    def count(self, weighting: str | None = None) -> int:
        """The compact network's parameters (or FLOPs per example) now: what compaction reports.
        ``weighting``: ``params`` or ``flops`` (default: the budget's own)."""
        with torch.no_grad():
            return round(float(self.graph.count(self._counted(), weighting or self.weighting)))

    # -- proximal steps ----------------------------------------------------------------------------
    @torch.no_grad()
    def proximal_step_(self, target: Target, strength: float) -> None:
        """The group prox of the units ``target`` covers (strength x mu x c_u), then the exclusive
        prox (strength x (1 - mu)) on every layer that reads them (every layer, model-wise)."""
        mask = self._units_of(target.layers)
        if self.mu > 0:
            c = self.sizes.sqrt() if self.group_weight == "sqrt" else torch.ones_like(self.sizes)
            t = strength * self.mu * c * mask
            norms = self._per_unit(torch.square).sqrt()
            scale = torch.where(norms > 0, (1.0 - t / norms.clamp_min(1e-30)).clamp(min=0.0), 0.0)
            self._scale_readers_(torch.where(mask, scale, 1.0))
        if self.mu < 1:
            if target.layers is None:
                layers = self.layers
            else:
                layers = [r.module for r in self.readers if bool(mask[r.units[r.units < len(mask)]].any())]
            exact = self.exclusive_prox == "exact"
            for module in layers:
                w = module.weight
                groups = exclusive_prox(to_groups(w.detach(), "input"), strength * (1.0 - self.mu), exact)
                w.copy_(from_groups(groups, w, "input"))

    # -- finishing ---------------------------------------------------------------------------------
    @torch.no_grad()
    def project_(self, target: Target) -> dict[str, int]:
        """Close the open units with the smallest RMS over their reader group until ``target``
        holds: the fewest, by binary search (the measure never grows when a unit closes)."""
        if float(self._measure(target.layers)) <= target.epsilon:
            return {}
        rms = (self._per_unit(torch.square) / self.sizes.clamp_min(1)).sqrt()
        candidates = (self._units_of(target.layers) & self.read & rms.gt(0)).nonzero().squeeze(1)
        original = [r.module.weight.detach().clone() for r in self.readers]

        def shut(closing: list[torch.Tensor]) -> None:
            for r, w0 in zip(self.readers, original):
                r.module.weight.copy_(w0)
            keep = torch.ones_like(rms)
            keep[closing[0].to(keep.device)] = 0.0
            self._scale_readers_(keep)

        was_open = self.open_units().bool()
        close_fewest_(
            [(candidates, rms[candidates])], shut, lambda: float(self._measure(target.layers)) <= target.epsilon
        )
        closed = was_open & ~self.open_units().bool()
        per_group = torch.bincount(self._group_of[closed], minlength=len(self.graph.groups)).tolist()
        return {g.name: c for g, c in zip(self.graph.groups, per_group) if c}

    # -- compaction (the model's own weights are all it keeps: nothing to fold) -------------------
    def closed_units(self) -> dict[str, list[int]]:
        """Group name -> the indices of its closed units (no weight reads them)."""
        open_ = self.open_units()
        return {
            g.name: (open_[g.offset : g.offset + g.size] == 0).nonzero().squeeze(1).tolist() for g in self.graph.groups
        }

    def prune_units_(self, folded: nn.Module) -> dict[str, int]:
        """Remove the closed units from ``folded`` (a copy of the model), in place; how many
        units each group lost."""
        return prune_closed(folded, self.graph, self.example, self.closed_units())


def attach_cges_units(model: nn.Module, example: torch.Tensor, **options: Any) -> CGESUnits:
    """CGES on the units of ``model``'s dependency graph, traced with ``example`` (one batch of
    inputs); ``options``: those of :class:`CGESUnitsOptions`."""
    return CGESUnits(model, example, CGESUnitsOptions(**options))
