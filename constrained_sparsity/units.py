"""Prunable units of any traced network, from its dependency graph (Torch-Pruning's ``DependencyGraph``).

A *unit* is what closes as a whole: a channel or a neuron, with every layer it lives in. On a
network with BatchNorm and residual adds one channel is written by several layers (every
convolution that adds into a residual stream, their BatchNorms) and read by others; Torch-
Pruning (Fang et al. 2023, "DepGraph: Towards Any Structural Pruning") traces the network once
and returns these *coupled groups*. A group of ``n`` channels holds ``n`` units; unit ``j``
is channel ``j`` of the group in every layer of it.

From the graph this module derives, for every layer with parameters, which unit each of its
output and input indices belongs to (or none: an index no unit can remove, such as the
input image's channels or the classifier's outputs). That is enough to count exactly what
compaction leaves -- parameters, or FLOPs per example -- for any set of open units, and the
same count under gate probabilities (:meth:`UnitGraph.count`). :meth:`UnitGraph.gate_sites`
says where a unit's gate must act so that a closed unit is exactly zero downstream: after a
layer's BatchNorm, or after the layer itself where no BatchNorm follows it. :func:`prune`
removes closed units physically, through the same graph.

Supported layers: ``nn.Conv2d`` (plain or depthwise), ``nn.Linear``, ``nn.BatchNorm1d`` /
``nn.BatchNorm2d``. Another layer with parameters in a group, or a network that cannot be
traced, is refused in one line naming the module.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .errors import ConfigError, NetworkError
from .graph import layer_output_shapes, observe
from .models import Attention, FeedForward

__all__ = [
    "GATES",
    "LayerDims",
    "UnitError",
    "UnitGraph",
    "UnitGroup",
    "on_example",
    "prune",
    "prune_closed",
    "prune_transformer",
    "trace_units",
    "transformer_units",
    "units_of",
    "format_unit_rows",
]

GATES = "unit_gates"  # where a method keeps the gates of its units on the model (not the network's own)

_SUPPORTED = (nn.Conv2d, nn.Linear, nn.BatchNorm1d, nn.BatchNorm2d)


class UnitError(NetworkError):
    """The network cannot be traced, or holds a layer whose units are not supported."""


def model_device(model: nn.Module) -> torch.device:
    """Where ``model``'s parameters are (the gates and examples go there); a model without
    any has no unit to gate."""
    first = next(model.parameters(), None)
    if first is None:
        raise UnitError(f"the {type(model).__name__} has no parameter: no unit to gate")
    return first.device


def on_example(build: Any, model: nn.Module, input_shape: Sequence[int], where: str) -> Any:
    """``build(model, example)`` with a zero example of ``input_shape`` on the model's device (a
    unit method traces its graph on it); a network it cannot trace is the config's error,
    named by ``where`` (``sparsity.method=l0_units``)."""
    example = torch.zeros(1, *input_shape, device=model_device(model))
    try:
        return build(model, example)
    except UnitError as exc:
        raise ConfigError(f"{where}: {exc}") from None


@dataclass
class UnitGroup:
    """One coupled group: ``size`` units, named after the layer (or module) that roots it;
    ``kind``: ``channels`` (a traced group), ``heads`` or ``neurons`` (a transformer's)."""

    name: str
    size: int
    offset: int  # the group's first unit in the graph's numbering
    layers: list[str] = field(default_factory=list)  # every layer the group's channels live in
    kind: str = "channels"


@dataclass
class LayerDims:
    """A layer with parameters: the unit of each output / input index (-1: none)."""

    name: str
    kind: str  # "conv", "depthwise", "linear", "norm"
    out_units: torch.Tensor  # long, one per output channel / feature
    in_units: torch.Tensor  # long, one per input channel / feature (empty for a norm)
    weight_per_pair: int  # parameters of one (output, input) pair: kh * kw, 1 for linear
    bias_per_out: int  # bias (1) and norm affine (2) parameters per output
    positions: int  # output positions per example (H * W of a conv's output): its FLOPs multiply


@dataclass
class UnitGraph:
    """The units of a network (see the module docstring)."""

    groups: list[UnitGroup]
    layers: list[LayerDims]
    constant_params: int  # parameters no unit touches
    gate_sites: dict[str, str]  # layer name -> group name: the layers whose outputs a group's gate scales
    # layer name -> (group name, inputs per unit): the layers whose *inputs* a group's gate scales
    # (a transformer's output projection per head, its MLP's second layer per neuron)
    input_sites: dict[str, tuple[str, int]] = field(default_factory=dict)
    num_units: int = 0

    def __post_init__(self) -> None:
        self.num_units = sum(g.size for g in self.groups)

    def to(self, device: torch.device | str) -> UnitGraph:
        """The index maps on ``device`` (where the gates live), in place."""
        for layer in self.layers:
            layer.out_units = layer.out_units.to(device)
            layer.in_units = layer.in_units.to(device)
        return self

    def as_compacted(self, open_units: torch.Tensor) -> torch.Tensor:
        """``open_units`` (1 open, 0 closed) as compaction leaves them: a group with every unit
        closed keeps its first one (an all-zero channel: PyTorch's layers need one). A copy."""
        kept = open_units.clone()
        for g in self.groups:
            part = kept[g.offset : g.offset + g.size]
            if not bool(part.any()):
                part[0] = 1.0
        return kept

    def group(self, name: str) -> UnitGroup:
        return next(g for g in self.groups if g.name == name)

    def count(self, open_units: torch.Tensor, weighting: str = "params") -> torch.Tensor:
        """Parameters (or FLOPs per example, ``weighting="flops"``) of the network with the units
        open as ``open_units`` says: one value per unit, 1 open, 0 closed, or a probability --
        then the count is the expected one (a weight needs its output and its input unit open;
        the gates of two units are independent). Differentiable in ``open_units``."""
        if weighting not in ("params", "flops"):
            raise ValueError(f"weighting={weighting!r}: should be params or flops")
        ext = torch.cat([open_units, open_units.new_ones(1)])  # index -1: an index no unit removes
        total = open_units.new_zeros(()) + (self.constant_params if weighting == "params" else 0)
        for layer in self.layers:
            n_out = ext[layer.out_units].sum()
            if layer.kind == "norm":
                if weighting == "params":
                    total = total + layer.bias_per_out * n_out
                continue
            if layer.kind == "depthwise":
                pairs = ext[layer.out_units] @ ext[layer.in_units]  # in and out are one coupled unit
            else:
                pairs = n_out * ext[layer.in_units].sum()
            if weighting == "params":
                total = total + layer.weight_per_pair * pairs + layer.bias_per_out * n_out
            else:
                total = total + 2 * layer.weight_per_pair * layer.positions * pairs
        return total


def _leaf_output_layer(model: nn.Module, example: torch.Tensor) -> nn.Module | None:
    """The leaf module whose output is the network's output (its outputs are not units)."""
    produced: dict[int, nn.Module] = {}
    leaves = [m for m in model.modules() if not list(m.children())]
    out = observe(model, example, forward={m: lambda mod, _i, o: produced.__setitem__(id(o), mod) for m in leaves})
    return produced.get(id(out)) if isinstance(out, torch.Tensor) else None


def _normalised(model: nn.Module, example: torch.Tensor) -> set[nn.Module]:
    """The convolutions / linear layers whose output goes straight into a BatchNorm."""
    outputs: dict[int, nn.Module] = {}
    kept: list[torch.Tensor] = []  # alive until the pass ends, so that no id is reused
    found: set[nn.Module] = set()

    def produced(mod: nn.Module, _inputs: object, out: torch.Tensor) -> None:
        outputs[id(out)] = mod
        kept.append(out)

    def normalises(_mod: nn.Module, inputs: tuple) -> None:
        if inputs and id(inputs[0]) in outputs:
            found.add(outputs[id(inputs[0])])

    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    observe(model, example, forward=dict.fromkeys(layers, produced), pre=dict.fromkeys(norms, normalises))
    return found


def _output_positions(model: nn.Module, example: torch.Tensor) -> dict[nn.Module, int]:
    """Output positions per example of every Conv2d (H x W) and Linear (the dims between batch and features)."""
    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    return {
        m: math.prod(shape[2:]) if isinstance(m, nn.Conv2d) else math.prod(shape[1:-1])
        for m, shape in layer_output_shapes(model, layers, example)
    }


def _dependency_graph(model: nn.Module, example: torch.Tensor):  # type: ignore[no-untyped-def]
    """The traced graph. No layer is ignored here: a layer whose outputs are not units (the
    classifier) still loses the inputs of the units it reads; only the groups rooted at it
    are left out (``get_all_groups(ignored_layers=...)``)."""
    import torch_pruning as tp

    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():  # the tracer follows autograd's graph (compaction runs under no_grad)
            return tp.DependencyGraph().build_dependency(model, example_inputs=example, verbose=False)
    except Exception as exc:  # noqa: BLE001 - torch's tracer: say so in one line
        raise UnitError(f"the network cannot be traced for its units ({type(exc).__name__}: {exc})") from None
    finally:
        model.train(was_training)


def trace_units(model: nn.Module, example: torch.Tensor, output_layers: Sequence[str] | None = None) -> UnitGraph:
    """The units of ``model`` (see the module docstring), traced with one ``example`` batch.

    ``output_layers``: layers whose outputs are not units (default: the layer that gives the
    network's output, found by running the example).
    """
    names = {m: n for n, m in model.named_modules()}
    for name, module in model.named_modules():
        own = list(module.parameters(recurse=False))
        if own and not isinstance(module, _SUPPORTED):
            raise UnitError(
                f"layer {name!r} ({type(module).__name__}) has parameters of a kind units do not support "
                "(Conv2d, Linear, BatchNorm1d / 2d)"
            )
        if (
            isinstance(module, nn.Conv2d)
            and module.groups != 1
            and not (module.groups == module.in_channels == module.out_channels)
        ):
            raise UnitError(f"layer {name!r}: grouped convolutions other than depthwise are not supported")
    if output_layers is None:
        last = _leaf_output_layer(model, example)
        if last is None:
            raise UnitError("cannot tell which layer gives the network's output: name it (output_layers=[...])")
        ignored = [last]
    else:
        modules = dict(model.named_modules())
        missing = [n for n in output_layers if n not in modules]
        if missing:
            raise UnitError(f"output_layers={missing}: no such layer in the model")
        ignored = [modules[n] for n in output_layers]
    graph = _dependency_graph(model, example)
    normalised = _normalised(model, example)
    layers = [m for m in model.modules() if isinstance(m, _SUPPORTED)]
    out_units = {m: torch.full((_width(m, "out"),), -1, dtype=torch.long) for m in layers}
    in_units = {m: torch.full((_width(m, "in"),), -1, dtype=torch.long) for m in layers}
    groups: list[UnitGroup] = []
    sites: dict[str, str] = {}
    offset = 0
    order = {m: i for i, m in enumerate(model.modules())}
    found = graph.get_all_groups(ignored_layers=ignored, root_module_types=(nn.Conv2d, nn.Linear))
    for group in sorted(found, key=lambda g: order[g[0].dep.target.module]):  # model order
        root_dep = group[0].dep
        root, fn = root_dep.target.module, root_dep.handler
        size = _width(root, "out")
        name = names[root]
        members: set[str] = set()
        writers: list[nn.Module] = []
        for j in range(size):
            for dep, idxs in graph.get_pruning_group(root, fn, [j]):
                module = dep.target.module
                if module not in out_units:
                    continue
                out = graph.is_out_channel_pruning_fn(dep.handler)
                table = (
                    out_units[module]
                    if out or isinstance(module, nn.modules.batchnorm._BatchNorm)
                    else in_units[module]
                )
                for i in (int(k) for k in idxs):
                    if table[i] not in (-1, offset + j):
                        side = "output" if table is out_units[module] else "input"
                        raise UnitError(
                            f"layer {names[module]!r}: {side} channel {i} is coupled to units {int(table[i])} and "
                            f"{offset + j} ({dep})"
                        )
                    table[i] = offset + j
                members.add(names[module])
                if j == 0 and (out or isinstance(module, nn.modules.batchnorm._BatchNorm)):
                    writers.append(module)
        for module in dict.fromkeys(writers):
            if module not in normalised:
                sites[names[module]] = name
        groups.append(UnitGroup(name, size, offset, sorted(members)))
        offset += size
    dims, constant = _layer_dims(model, example, layers, {m: (out_units[m], in_units[m]) for m in layers})
    return UnitGraph(groups, dims, constant, sites)


def _layer_dims(
    model: nn.Module,
    example: torch.Tensor,
    layers: list[nn.Module],
    units: dict[nn.Module, tuple[torch.Tensor, torch.Tensor]],
) -> tuple[list[LayerDims], int]:
    """The :class:`LayerDims` of ``layers`` (the units of their outputs and inputs from
    ``units``; -1, no unit, for a layer it leaves out) and the parameters no such layer holds."""
    names = {m: n for n, m in model.named_modules()}
    positions = _output_positions(model, example)
    dims, touched = [], 0
    for m in layers:
        kind = _kind(m)
        out_u, in_u = units.get(m, (torch.full((_width(m, "out"),), -1), torch.full((_width(m, "in"),), -1)))
        per_pair = math.prod(m.kernel_size) if isinstance(m, nn.Conv2d) else 1
        per_out = (2 if m.affine else 0) if kind == "norm" else int(m.bias is not None)
        in_u = in_u[:0] if kind == "norm" else in_u  # a norm has one side
        dims.append(LayerDims(names[m], kind, out_u.long(), in_u.long(), per_pair, per_out, positions.get(m, 1)))
        touched += sum(p.numel() for p in m.parameters(recurse=False))
    return dims, sum(p.numel() for p in model.parameters()) - touched


def _kind(m: nn.Module) -> str:
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        return "norm"
    if isinstance(m, nn.Linear):
        return "linear"
    return "depthwise" if m.groups != 1 else "conv"


def _width(m: nn.Module, side: str) -> int:
    if isinstance(m, nn.Linear):
        return m.out_features if side == "out" else m.in_features
    if isinstance(m, nn.Conv2d):
        return m.out_channels if side == "out" else m.in_channels
    return m.num_features  # a norm: one side


def prune(model: nn.Module, example: torch.Tensor, closed: dict[str, list[int]]) -> nn.Module:
    """Remove the ``closed`` units (group name -> unit indices in the group) from ``model``, in
    place, through its dependency graph: every layer each unit lives in loses that channel.
    The units must be exactly zero in the network (gates folded in) for its outputs to stay."""
    modules = dict(model.named_modules())
    graph = _dependency_graph(model, example)
    for name, idxs in closed.items():
        if not idxs:
            continue
        root = modules[name]
        fn = graph.get_pruner_of_module(root).prune_out_channels
        if len(idxs) >= _width(root, "out"):  # a group keeps its first channel: PyTorch's layers need one
            idxs = sorted(idxs)[1:]
        group = graph.get_pruning_group(root, fn, sorted(idxs))
        group.prune()
    return model


def units_of(model: nn.Module, example: torch.Tensor, output_layers: Sequence[str] | None = None) -> UnitGraph:
    """The units of ``model``: a transformer's heads and MLP neurons when it is built from the
    project's ``Attention`` / ``FeedForward`` modules (:func:`transformer_units`), else the
    coupled channels and neurons of its dependency graph (:func:`trace_units`)."""
    if any(isinstance(m, (Attention, FeedForward)) for m in model.modules()):
        return transformer_units(model, example)
    return trace_units(model, example, output_layers)


def prune_closed(
    model: nn.Module, graph: UnitGraph, example: torch.Tensor, closed: dict[str, list[int]]
) -> dict[str, int]:
    """Remove the ``closed`` units of ``graph`` (a :func:`units_of` of a network like ``model``)
    from ``model``, in place: :func:`prune_transformer` for a transformer's units, else
    :func:`prune` through the dependency graph. Returns how many units each group lost (a
    group keeps one unit at least)."""
    if graph.input_sites:
        prune_transformer(model, closed)
    else:
        prune(model, example.to(model_device(model)), closed)
    sizes = {g.name: g.size for g in graph.groups}
    return {name: min(len(idxs), sizes[name] - 1) for name, idxs in closed.items() if idxs}


def format_unit_rows(
    rows: list[tuple[str, int, int, float | None, int]], measures: dict, expected: bool = False
) -> list[str]:
    """Report lines of a unit method: per group ``(name, units, open, expected density or None,
    layers)``, then the model's density (and expected density) and the compact network's count."""
    if not rows:
        return []
    head = f"{'expected':>10}" if expected else ""
    lines = [f"{'unit group':<28}{'units':>7}{'open':>7}{'density':>9}{head}  layers"]
    for name, units, open_, exp, layers in rows:
        extra = f"{exp:>10.3f}" if expected else ""
        lines.append(f"{name:<28}{units:>7}{open_:>7}{open_ / units:>9.3f}{extra}  {layers}")
    weighting = next((k.split("/")[0] for k in measures if k.endswith("/compact")), "params")
    compact = measures.get(f"{weighting}/compact")
    if compact is not None:
        extra = f"{measures.get('density_expected/model', float('nan')):>10.3f}" if expected else ""
        lines.append(
            f"{'model':<28}{'':>7}{'':>7}{measures.get('density/model', float('nan')):>9.3f}{extra}"
            f"  ({weighting} of the compact network: {compact:,.0f})"
        )
    return lines


# -- transformers: heads and MLP neurons -------------------------------------------------------------
def transformer_units(model: nn.Module, example: torch.Tensor) -> UnitGraph:
    """The units of a transformer built from the project's :class:`~constrained_sparsity.models.Attention`
    and :class:`~constrained_sparsity.models.FeedForward` modules: each attention's heads (a head
    is its ``head_dim`` rows of ``q``, ``k``, ``v`` and columns of ``out``) and each MLP's hidden
    neurons (a row of ``fc1``, a column of ``fc2``), as in CoFi (Xia, Zhong & Chen 2022). A
    gate scales a head's output before the output projection, a neuron's activation before
    ``fc2``. Every other Linear / Conv2d is counted whole (its FLOPs too); LayerNorms, embeddings
    and tokens are constant parameters."""
    names = {m: n for n, m in model.named_modules()}
    units: dict[nn.Module, tuple[torch.Tensor, torch.Tensor]] = {}
    groups: list[UnitGroup] = []
    inputs: dict[str, tuple[str, int]] = {}
    offset = 0
    for name, module in model.named_modules():
        if isinstance(module, Attention):
            heads = offset + torch.arange(module.heads).repeat_interleave(module.head_dim)
            for proj in (module.q, module.k, module.v):
                units[proj] = (heads, torch.full((proj.in_features,), -1, dtype=torch.long))
            units[module.out] = (torch.full((module.out.out_features,), -1, dtype=torch.long), heads)
            layers = [names[m] for m in (module.q, module.k, module.v, module.out)]
            groups.append(UnitGroup(name, module.heads, offset, layers, "heads"))
            inputs[names[module.out]] = (name, module.head_dim)
            offset += module.heads
        elif isinstance(module, FeedForward):
            neurons = offset + torch.arange(module.fc1.out_features)
            units[module.fc1] = (neurons, torch.full((module.fc1.in_features,), -1, dtype=torch.long))
            units[module.fc2] = (torch.full((module.fc2.out_features,), -1, dtype=torch.long), neurons)
            groups.append(
                UnitGroup(name, module.fc1.out_features, offset, [names[module.fc1], names[module.fc2]], "neurons")
            )
            inputs[names[module.fc2]] = (name, 1)
            offset += module.fc1.out_features
    if not groups:
        raise UnitError("the model has no Attention or FeedForward module of constrained_sparsity.models")
    layers = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    grouped = [names[m] for m in layers if isinstance(m, nn.Conv2d) and m.groups != 1]
    if grouped:
        raise UnitError(f"layer {grouped[0]!r}: grouped convolutions are not counted in a transformer")
    dims, constant = _layer_dims(model, example, layers, units)
    return UnitGraph(groups, dims, constant, {}, inputs)


@torch.no_grad()
def prune_transformer(model: nn.Module, closed: dict[str, list[int]]) -> nn.Module:
    """Remove closed heads (their ``q``/``k``/``v`` rows and ``out`` columns; ``heads`` updated)
    and MLP neurons (``fc1`` rows, ``fc2`` columns) from ``model``, in place. A module keeps
    at least one head / neuron (PyTorch's layers need one)."""
    modules = dict(model.named_modules())
    for name, idxs in closed.items():
        module = modules[name]
        size = module.heads if isinstance(module, Attention) else module.fc1.out_features
        shut = set(idxs) if len(set(idxs)) < size else set(sorted(idxs)[1:])
        keep = torch.tensor([i for i in range(size) if i not in shut], dtype=torch.long)
        if isinstance(module, Attention):
            rows = (keep.view(-1, 1) * module.head_dim + torch.arange(module.head_dim).view(1, -1)).reshape(-1)
            for proj in ("q", "k", "v"):
                setattr(module, proj, _rows(getattr(module, proj), rows))
            module.out = _columns(module.out, rows)
            module.heads = len(keep)
        elif isinstance(module, FeedForward):
            module.fc1, module.fc2 = _rows(module.fc1, keep), _columns(module.fc2, keep)
    return model


def _rows(layer: nn.Linear, keep: torch.Tensor) -> nn.Linear:
    keep = keep.to(layer.weight.device)
    new = nn.Linear(layer.in_features, len(keep), bias=layer.bias is not None).to(layer.weight)
    new.weight.copy_(layer.weight[keep])
    if layer.bias is not None:
        new.bias.copy_(layer.bias[keep])
    return new


def _columns(layer: nn.Linear, keep: torch.Tensor) -> nn.Linear:
    keep = keep.to(layer.weight.device)
    new = nn.Linear(len(keep), layer.out_features, bias=layer.bias is not None).to(layer.weight)
    new.weight.copy_(layer.weight[:, keep])
    if layer.bias is not None:
        new.bias.copy_(layer.bias)
    return new
