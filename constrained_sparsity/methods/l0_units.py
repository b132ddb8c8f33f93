"""L0 gates on the units of a network's dependency graph: the ``l0_units`` method.

The hard-concrete gates of Louizos et al. (2018) -- the same :class:`HardConcreteGate` as the
``l0`` method, one sample per forward pass -- with one gate per *unit*: a channel or a neuron
coupled across every layer it lives in (:mod:`constrained_sparsity.units`, traced by
Torch-Pruning's ``DependencyGraph``). On a ResNet a unit of a residual stream is one channel
of the stem, of every block's last convolution and shortcut, of their BatchNorms and of the
inputs that read the stream; gated once, closed everywhere.

A gate scales the outputs of the layers that write its unit, *after* their BatchNorm (or
after the layer where none follows), so a closed unit is exactly zero downstream, in training
and at test time (a gate before a BatchNorm would leave its shift beta - gamma mu / sigma).
On a BatchNorm the gate scales its affine parameters, ``batch_norm(x, gamma z, beta z)`` --
the same output as ``batch_norm(x, gamma, beta) z``, without a pass over the activations
for the product, forward and backward (see :func:`_gated_batchnorm_forward`).

The measure counts the network that compaction leaves (Gallego-Posada et al. 2022's
"feasible is a property of the deployed network"): model-wise, the parameters -- or, with
``weighting: flops``, the FLOPs per example -- of the compact network over those of the
dense one, every weight counted when both its output and its input unit are open, BatchNorm
parameters and biases with their unit; the expected measure is the same count under the gates'
probabilities P(z != 0) (a product of two independent gates' probabilities for a weight).
Per-layer targets name a unit group (its root layer): the share of its units open. A group
whose units are all closed keeps one all-zero channel in the compact network (PyTorch's layers
need one); the exact count counts it, so that it equals what compaction leaves.

Compaction (:meth:`L0Units.prune_units_`) folds each deterministic gate into the BatchNorm
affine (or the layer's weight and bias) it scales, then removes the closed units physically
through the same graph; the result is an ordinary module of the model's class.
"""

from __future__ import annotations

import copy
import types
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError, OptionError
from ..numbers import finite, within
from ..units import GATES, UnitError, UnitGraph, format_unit_rows, model_device, on_example, prune_closed, units_of
from .base import (
    BudgetSpec,
    BuildContext,
    Foldable,
    Freezable,
    MethodReport,
    MethodSpec,
    Projectable,
    SparsityMethod,
    Target,
    UnitPruner,
    targets_from_spec,
)
from .l0 import HardConcreteGate, close_least_likely_

__all__ = ["L0Units", "L0UnitsOptions", "attach_l0_units"]


@dataclass
class L0UnitsOptions:
    """``weighting``: what the model-wise density counts, ``params`` or ``flops`` (per
    example) of the compact network; ``output_layers``: layers whose outputs are not units
    (default: the one that gives the network's output); hard-concrete ``droprate_init``,
    ``beta``, ``gamma``, ``zeta`` as for ``l0``."""

    weighting: str = "params"
    output_layers: list[str] | None = None
    heads: float | None = None  # a transformer's: at most this share of its attention heads open
    neurons: float | None = None  # ... and of its MLP neurons (budgets beside the model-wise one)
    droprate_init: float = 0.5
    beta: float = 2.0 / 3.0
    gamma: float = -0.1
    zeta: float = 1.1

    def __post_init__(self) -> None:
        if self.weighting not in ("params", "flops"):
            raise OptionError("weighting", self.weighting, "should be params or flops")
        for key in ("droprate_init", "beta", "gamma", "zeta"):
            value = getattr(self, key)
            if not finite(value):
                raise OptionError(key, value, "should be a finite number")
        for key in ("heads", "neurons"):
            value = getattr(self, key)
            if value is not None and not within(value, 0, 1):
                raise OptionError(key, value, "should be a share in [0, 1] (or null)")
        if not 0 < self.droprate_init < 1:
            raise OptionError("droprate_init", self.droprate_init, "should be in (0, 1)")
        if not (self.beta > 0 and self.gamma < 0 < 1 < self.zeta):
            raise OptionError("gamma", self.gamma, "needs beta > 0, gamma < 0 and zeta > 1")


def _key(group: str) -> str:
    return group.replace(".", "-")  # a ModuleDict key holds no "."


class _ScaleOutput:
    """Forward hook: the layer's output times its unit gate, per channel (dim 1) or feature (last)."""

    def __init__(self, gate: HardConcreteGate) -> None:
        self.gate = gate

    def __call__(self, module: nn.Module, inputs: object, out: torch.Tensor) -> torch.Tensor:
        z = self.gate()
        if isinstance(module, nn.Linear) or out.dim() == 2:
            return out * z
        return out * z.view(1, -1, *([1] * (out.dim() - 2)))


_GATE_ATTR = "l0_unit_gate"  # a gated BatchNorm's gate, kept out of its state_dict
_BATCHNORM_FORWARD = nn.modules.batchnorm._BatchNorm.forward


def _fusable(module: nn.Module) -> bool:
    """A BatchNorm whose forward is torch's own (not SyncBatchNorm's, nor one set on the instance):
    its gate can scale gamma and beta."""
    return (
        isinstance(module, nn.modules.batchnorm._BatchNorm)
        and type(module).forward is _BATCHNORM_FORWARD
        and "forward" not in module.__dict__
    )


def _gated_batchnorm_forward(self: nn.modules.batchnorm._BatchNorm, input: torch.Tensor) -> torch.Tensor:
    """torch's ``_BatchNorm.forward`` with ``weight * z`` and ``bias * z`` (``z`` the unit gate).

    Bound as the instance's ``forward`` by :class:`L0Units`. ``(gamma z) x_hat + beta z`` is the
    BatchNorm's output times ``z``; the product then costs two vectors of the channels' size
    instead of a pass over the activations, and autograd reaches ``z`` through the BatchNorm's
    own gradients of ``gamma`` and ``beta``. The running statistics are updated as torch does."""
    z = self.__dict__[_GATE_ATTR]()
    self._check_input_dim(input)
    factor = 0.0 if self.momentum is None else self.momentum
    if self.training and self.track_running_stats and self.num_batches_tracked is not None:
        self.num_batches_tracked.add_(1)
        factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
    batch_stats = self.training or (self.running_mean is None and self.running_var is None)
    track = not self.training or self.track_running_stats
    return nn.functional.batch_norm(
        input,
        self.running_mean if track else None,
        self.running_var if track else None,
        self.weight * z,
        self.bias * z,
        batch_stats,
        factor,
        self.eps,
    )


def _unfuse(module: nn.Module) -> None:
    module.__dict__.pop("forward", None)
    module.__dict__.pop(_GATE_ATTR, None)


class _ScaleInput:
    """Forward pre-hook: the layer's input times its units' gates (a transformer's heads before
    the output projection, ``per_unit`` features each; its MLP neurons before ``fc2``)."""

    def __init__(self, gate: HardConcreteGate, per_unit: int) -> None:
        self.gate, self.per_unit = gate, per_unit

    def __call__(self, module: nn.Module, args: tuple) -> tuple:
        z = self.gate()
        if self.per_unit > 1:
            z = z.repeat_interleave(self.per_unit)
        return (args[0] * z, *args[1:])


class _Resample:
    """Forward pre-hook of the model: one new gate sample per forward pass (training mode)."""

    def __init__(self, gates: list[HardConcreteGate]) -> None:
        self.gates = gates

    def __call__(self, module: nn.Module, args: object) -> None:
        for gate in self.gates:
            if gate.sampling:
                gate.resample()


def _host(model: nn.Module) -> str:
    """Where the gates are registered: the model, unless its forward runs its children in turn."""
    containers = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
    if not isinstance(model, containers):
        return ""
    return next(name for name, m in model.named_modules() if name and not isinstance(m, containers))


class L0UnitsReport(MethodReport):
    """What :class:`L0Units` logs and reports: the open units of each group and the compact count."""

    def metrics(self) -> dict[str, float]:
        out: dict[str, float] = {}
        with torch.no_grad():
            for g in self.method.graph.groups:
                gate = self.method.gates[_key(g.name)]
                out[f"density/{g.name}"] = float(gate.active().float().mean())
            for kind, groups in self.method.kinds.items():  # the share of each kind's units open
                out[f"density/{kind}"] = float(self.method.densities(groups)[1])
            expected, exact = self.method.densities()
            out["density/model"] = float(exact)
            out["density_expected/model"] = float(expected)
            out[f"{self.method.weighting}/compact"] = float(self.method.count())
        return out

    def measure_key(self, target: Target) -> str | None:
        if target.layers is None:
            return "density/model"
        if len(target.layers) == 1:
            return f"density/{target.layers[0]}"
        kind = next((k for k, groups in self.method.kinds.items() if tuple(target.layers) == groups), None)
        return None if kind is None else f"density/{kind}"

    def rows(self) -> list[dict[str, Any]]:
        rows = []
        with torch.no_grad():
            for g in self.method.graph.groups:
                gate = self.method.gates[_key(g.name)]
                rows.append(
                    {
                        "name": g.name,
                        "gates": g.size,
                        "active_gates": int(gate.active().sum()),
                        "expected_density": float(gate.prob_nonzero().mean()),
                        "layers": g.layers,
                    }
                )
        return rows

    @classmethod
    def format_rows(
        cls, rows: list[dict[str, Any]], targets: list[dict[str, Any]], measures: dict[str, Any]
    ) -> list[str]:
        table = [(r["name"], r["gates"], r["active_gates"], r["expected_density"], len(r["layers"])) for r in rows]
        return format_unit_rows(table, measures, expected=True)


class L0Units(Projectable, Freezable, UnitPruner, Foldable, SparsityMethod):
    """L0 gates on dependency-graph units (see the module docstring). Built by :func:`attach_l0_units`."""

    name = "l0_units"
    spec = MethodSpec(options=L0UnitsOptions, equality=True)
    reporter = L0UnitsReport

    def __init__(self, model: nn.Module, example: torch.Tensor, options: L0UnitsOptions | None = None) -> None:
        o = options or L0UnitsOptions()
        if any(name.split(".")[-1] == GATES for name, _ in model.named_modules()):
            raise ValueError(f"the model already has {GATES!r}: l0_units is attached once")
        for name, m in model.named_modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and not m.affine:
                raise UnitError(f"layer {name!r}: a BatchNorm without affine parameters cannot fold a gate")
        device = model_device(model)  # where the gates live: with the model
        self.example = example[:1].detach().to(device).clone()
        self.graph: UnitGraph = units_of(model, self.example, o.output_layers)
        if not self.graph.groups:
            raise UnitError("the network has no prunable unit (every channel feeds the output)")
        self.weighting = o.weighting
        self.graph.to(device)
        gates = nn.ModuleDict(
            {
                _key(g.name): HardConcreteGate(g.size, o.droprate_init, o.beta, o.gamma, o.zeta).to(device)
                for g in self.graph.groups
            }
        )
        # The gates live in the model (its state_dict and DistributedDataParallel hold them), on
        # the model itself -- or, when it is a container whose forward runs every child (an
        # nn.Sequential), on its first layer
        self.host = _host(model)
        dict(model.named_modules())[self.host].add_module(GATES, gates)
        self.gates = gates
        modules = dict(model.named_modules())
        self._handles = []
        self._fused: list[nn.Module] = []  # BatchNorms whose forward scales gamma and beta
        for site, group in self.graph.gate_sites.items():
            module = modules[site]
            if _fusable(module):
                module.__dict__[_GATE_ATTR] = gates[_key(group)]
                module.forward = types.MethodType(_gated_batchnorm_forward, module)
                self._fused.append(module)
            else:
                self._handles.append(module.register_forward_hook(_ScaleOutput(gates[_key(group)])))
        self._handles += [
            modules[site].register_forward_pre_hook(_ScaleInput(gates[_key(group)], per_unit))
            for site, (group, per_unit) in self.graph.input_sites.items()
        ]
        self._handles.append(model.register_forward_pre_hook(_Resample(list(gates.values()))))
        self.kinds = {
            kind: tuple(g.name for g in self.graph.groups if g.kind == kind)
            for kind in dict.fromkeys(g.kind for g in self.graph.groups)
        }
        self.dense = float(self.graph.count(torch.ones(self.graph.num_units, device=device), self.weighting))

    # -- building ------------------------------------------------------------------------------
    @classmethod
    def from_config(cls, model: nn.Module, options: Any, spec: BudgetSpec, context: BuildContext):  # type: ignore[no-untyped-def]
        where = f"{context.prefix}method={cls.name}"
        method = on_example(lambda m, x: cls(m, x, options), model, context.input_shape, where)
        targets = targets_from_spec(method, spec, f"{context.prefix}targets")
        o = options or L0UnitsOptions()
        for kind in ("heads", "neurons"):
            budget = getattr(o, kind)
            if budget is None:
                continue
            if kind not in method.kinds:
                raise ConfigError(
                    f"{context.prefix}{kind}={budget}: the model has no {kind} (no Attention / FeedForward)"
                )
            lam = spec.lambdas[0] if spec.lambdas else None
            targets.append(method.kind_target(kind, budget, spec.measures[0], lam, spec.restarts))
        return method, targets

    def kind_target(
        self, kind: str, epsilon: float, measure: str = "exact", lam: float | None = None, restarts: bool = True
    ) -> Target:
        """``at most epsilon of the model's units of this kind open`` (``heads``, ``neurons``,
        ``channels``), beside the model-wise budget."""
        return Target(epsilon, self.kinds[kind], measure, lam, f"{self.name}_{kind}", self, restarts)

    def layer_names(self) -> list[str]:
        return [g.name for g in self.graph.groups]

    def parameters(self):  # type: ignore[no-untyped-def]
        return (g.log_alpha for g in self.gates.values())

    # -- the measure ---------------------------------------------------------------------------
    def _open(self, exact: bool) -> torch.Tensor:
        """Each unit's P(z != 0), or whether it is open at test time (``exact``). A group with
        every unit closed keeps one all-zero channel in the compact network (PyTorch's layers
        need one), so the exact count keeps its first unit."""
        if not exact:
            return torch.cat([g.prob_nonzero() for g in self.gates.values()])
        return self.graph.as_compacted(torch.cat([g.active().to(g.log_alpha.dtype) for g in self.gates.values()]))

    def densities(self, layers: tuple[str, ...] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(expected, exact)``: model-wise, the compact network's parameters (or FLOPs) over
        the dense network's; for groups, the share of their units open."""
        if layers is None:
            expected = self.graph.count(self._open(False), self.weighting) / self.dense
            with torch.no_grad():
                exact = self.graph.count(self._open(True), self.weighting) / self.dense
            return expected, exact
        gates = [self.gates[_key(n)] for n in layers]
        size = sum(g.num_gates for g in gates)
        expected = sum(g.prob_nonzero().sum() for g in gates) / size
        exact = sum(g.active().sum() for g in gates).to(expected.dtype) / size
        return expected, exact  # type: ignore[return-value]

    def measure(self, target: Target) -> tuple[torch.Tensor, torch.Tensor]:
        expected, exact = self.densities(target.layers)
        return expected, exact.detach()

    def count(self, weighting: str | None = None) -> int:
        """The compact network's parameters (or FLOPs per example) now: what compaction reports.
        ``weighting``: ``params`` or ``flops`` (default: the budget's own)."""
        with torch.no_grad():
            return round(float(self.graph.count(self._open(True), weighting or self.weighting)))

    # -- finishing -----------------------------------------------------------------------------
    def freeze_(self) -> None:
        for gate in self.gates.values():
            gate.frozen = True
            gate.log_alpha.requires_grad_(False)
            gate._sample = None
            gate._pending = None

    @torch.no_grad()
    def project_(self, target: Target) -> dict[str, int]:
        """Close the open units with the lowest P(z != 0), the fewest that meet ``target``
        (the measure never grows when a unit closes: a binary search on how many)."""

        def value() -> float:
            expected, exact = self.densities(target.layers)
            return float(expected if target.measure == "expected" else exact)

        names = list(target.layers) if target.layers is not None else [g.name for g in self.graph.groups]
        counts = close_least_likely_([self.gates[_key(n)] for n in names], value, target.epsilon)
        return {n: c for n, c in zip(names, counts) if c}

    # -- compaction ----------------------------------------------------------------------------
    @torch.no_grad()
    def fold(self, model: nn.Module) -> nn.Module:
        """A copy of ``model`` with every test-time gate folded into the BatchNorm affine (or the
        layer's weight and bias) it scales, and no gate left: the same outputs in eval mode, a
        closed unit an all-zero channel."""
        folded = copy.deepcopy(model)
        host = folded.get_submodule(self.host) if self.host else folded
        gates = getattr(host, GATES)
        modules = dict(folded.named_modules())
        for site, group in self.graph.gate_sites.items():
            z = gates[_key(group)].deterministic()
            layer = modules[site]
            if isinstance(layer, nn.modules.batchnorm._BatchNorm):
                layer.weight.mul_(z)
                layer.bias.mul_(z)
            else:
                layer.weight.mul_(z.view(-1, *([1] * (layer.weight.dim() - 1))))
                if layer.bias is not None:
                    layer.bias.mul_(z)
        for site, (group, per_unit) in self.graph.input_sites.items():
            z = gates[_key(group)].deterministic().repeat_interleave(per_unit)
            modules[site].weight.mul_(z.view(1, -1))  # column j of the next layer reads unit j's output
        for module in folded.modules():
            if _GATE_ATTR in module.__dict__:
                _unfuse(module)
            for hooks in (module._forward_hooks, module._forward_pre_hooks):
                for key in [k for k, h in hooks.items() if isinstance(h, (_ScaleOutput, _ScaleInput, _Resample))]:
                    del hooks[key]
        delattr(host, GATES)
        return folded

    def closed_units(self) -> dict[str, list[int]]:
        """Group name -> the indices of its closed units (test-time gate 0)."""
        with torch.no_grad():
            return {
                g.name: (~self.gates[_key(g.name)].active()).nonzero().squeeze(1).tolist() for g in self.graph.groups
            }

    def prune_units_(self, folded: nn.Module) -> dict[str, int]:
        """Remove the closed units from ``folded`` (a :meth:`fold` of the model), in place.
        Returns how many units each group lost."""
        return prune_closed(folded, self.graph, self.example, self.closed_units())

    def detach(self) -> None:
        """Remove the gates' hooks from the model (its ``unit_gates`` stay, for their state)."""
        for handle in self._handles:
            handle.remove()
        for module in self._fused:
            _unfuse(module)
        self._handles, self._fused = [], []


def attach_l0_units(
    model: nn.Module,
    example: torch.Tensor,
    weighting: str = "params",
    output_layers: list[str] | None = None,
    **gate: Any,
) -> L0Units:
    """L0 gates on the units of ``model``'s dependency graph, traced with ``example`` (one batch of
    inputs); ``gate``: ``droprate_init``, ``beta``, ``gamma``, ``zeta`` (see :class:`L0UnitsOptions`)."""
    return L0Units(model, example, L0UnitsOptions(weighting, output_layers, **gate))
