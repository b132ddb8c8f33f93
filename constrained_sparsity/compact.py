"""Compaction: a trained sparse network becomes a smaller dense one of standard layers.

Masks that multiply by zero save nothing; :func:`compact` removes what the zeros make dead:

1. Every parametrized layer is baked at its eval-mode weights
   (:func:`~constrained_sparsity.graph.bake`: L0 gates at their test-time values, masks), and
   a :class:`~constrained_sparsity.methods.Foldable` method folds what it keeps beside them
   (the mergeable layers of layer sparsity merged, unit gates into BatchNorm).
2. In a chain of ``Linear`` / ``Conv2d`` layers separated by ReLU, max-pooling, flattening or
   dropout, a hidden unit (a linear output neuron, a conv output channel) is *dead* when
   nothing it computes is used -- every weight that reads it is 0 -- or when it computes a
   constant -- its incoming weights are all 0. A dead unit is removed from both layers; a
   constant unit ``relu(b_j)`` is first folded into the next layer's bias (for a conv,
   only when the next layer is linear or the constant is 0, which keeps it exact).
   The pass over the chain repeats until nothing changes: removing a layer's units can leave
   units of the layers before it unread.
   A linear layer may end with 0 units (the network then outputs the constant its biases
   give); a convolution whose every channel is pruned keeps one all-zero channel, with a
   warning, because PyTorch's ``Conv2d`` cannot have 0 output channels.
   Zero input columns of a first linear layer are removed only with ``select_inputs``
   (a :class:`SelectInputs` layer then picks the kept input features, so the module still
   takes the original input).
3. 2x2 max-pooling layers become :class:`MaxPool2x2` (an ``nn.MaxPool2d`` computing the
   same values as maxima of strided slices: PyTorch's CPU kernel for
   ``MaxPool2d`` on NCHW tensors took 3.5-5x longer here than LeNet-5's first convolution
   before it (batch 256), a cost that pruning later layers does not reduce;
   :func:`fast_pooling` gives any network the same layer, so that dense and compact
   networks are timed alike).
4. The result is an ``nn.Sequential`` of standard layers, on the model's device and with its
   dtype; :func:`~constrained_sparsity.export.save_compact` writes it as a state_dict plus
   an architecture description and as a ``torch.export`` program that loads without this
   package.

Per-weight (unstructured) zeros do not shrink a dense layer and dense kernels run no faster
on them; the report says so.

A network compacted through its unit graph keeps its BatchNorms, as the deployable count
does; ``fold_batchnorm`` (:func:`fold_batchnorm_`) folds each BatchNorm that alone reads a
Conv2d / Linear into that layer, for inference.
"""

from __future__ import annotations

import math
import warnings
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .errors import NetworkError
from .graph import ChainError, bake, layer_output_shapes, parse_chain, plain_layer_like
from .methods.base import Foldable, SparsityMethod, UnitPruner
from .units import GATES

__all__ = [
    "CompactModel",
    "MaxPool2x2",
    "SelectInputs",
    "active_inputs",
    "compact",
    "count_flops",
    "count_params",
    "describe",
    "fast_pooling",
    "fold",
    "fold_batchnorm_",
    "size_summary",
]


@dataclass
class CompactModel:
    """The compact network and what was removed.

    ``module`` is an ``nn.Sequential`` for a chain; for a network compacted through its unit
    graph (``l0_units``) it is the model's own class with smaller layers, and ``rebuild``
    (``{"name", "kwargs", "input_shape", "num_classes"}``: a ``model.name`` and its
    arguments) says how :func:`~constrained_sparsity.export.load_compact` builds it again.
    """

    module: nn.Module
    removed: dict[str, int] = field(default_factory=dict)  # layer or unit group -> units removed
    sparse_weights: list[str] = field(default_factory=list)  # layers with per-weight zeros left
    rebuild: dict[str, Any] | None = None
    folded_batchnorm: dict[str, str] = field(default_factory=dict)  # BatchNorm -> the layer it was folded into


# -- counting ----------------------------------------------------------------------------------
def count_params(model: nn.Module, nonzero: bool = False) -> int:
    """Parameters of ``model`` (or only the non-zero ones); the gates a unit method keeps in the
    model (``unit_gates``) are not the network's."""
    total = 0
    for name, p in model.named_parameters():
        if GATES in name.split("."):
            continue
        total += int((p != 0).sum()) if nonzero else p.numel()
    return total


def count_flops(model: nn.Module, input_shape: Sequence[int]) -> int:
    """FLOPs per example of the ``Linear`` and ``Conv2d`` layers: 2 x multiply-accumulates.

    Bias additions, activations and pooling are not counted. Zero weights count like any
    other (a dense kernel multiplies them). One example runs on the model's device.
    """
    layers = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    flops = 0
    for m, shape in layer_output_shapes(model, layers, torch.zeros(1, *input_shape)):
        if isinstance(m, nn.Linear):
            flops += 2 * m.in_features * m.out_features * math.prod(shape[1:-1])
        else:
            kh, kw = m.kernel_size
            flops += 2 * shape[1] * shape[2] * shape[3] * (m.in_channels // m.groups) * kh * kw
    return flops


def describe(model: nn.Module, input_shape: Sequence[int]) -> str:
    """Widths of the network, e.g. ``784-300-100-10`` or ``conv 20-50 | fc 800-500-10``; for a
    network that is not a chain, its class and its convolutions' channels in all."""
    if not isinstance(model, nn.Sequential):
        convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
        linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
        parts = [f"{len(convs)} conv, {sum(m.out_channels for m in convs)} channels"] if convs else []
        parts += [f"{len(linears)} linear, {sum(m.out_features for m in linears)} units"] if linears else []
        return f"{type(model).__name__} ({'; '.join(parts)})"
    convs = [m.out_channels for m in model if isinstance(m, nn.Conv2d)]
    linears = [m for m in model if isinstance(m, nn.Linear)]
    fc = "-".join(str(w) for w in [linears[0].in_features, *(m.out_features for m in linears)]) if linears else ""
    if convs:
        return f"conv {'-'.join(str(c) for c in convs)} | fc {fc}"
    return fc


# -- compaction --------------------------------------------------------------------------------
def _chain(model: nn.Module) -> tuple[list[tuple[str, nn.Module]], list[int]]:
    """The children of a compactable chain and the positions of its layers."""
    try:
        chain = parse_chain(model, leading=(SelectInputs,))
    except ChainError as exc:
        if exc.name is None:
            raise TypeError(
                f"compaction needs an nn.Sequential of Linear / Conv2d layers with ReLU, MaxPool2d, Flatten or "
                f"Dropout between them ({exc})"
            ) from None
        if isinstance(exc.module, nn.Conv2d):
            raise TypeError(f"layer {exc.name!r}: grouped convolutions are not compacted") from None
        raise TypeError(
            f"compaction cannot see through module {exc.name!r} ({type(exc.module).__name__}); supported between "
            "layers: ReLU, MaxPool2d, Flatten, Dropout, Identity"
        ) from None
    return list(chain.items), chain.positions()


def fold(model: nn.Module, methods: Sequence[SparsityMethod] | None = None) -> nn.Module:
    """A copy of ``model`` with ``methods`` folded into plain layers, in order (the model untouched).

    Every parametrized layer is baked at its eval-mode weights; a :class:`Foldable` method then
    folds what it keeps beside them (gates into BatchNorm, merged layers).
    """
    folded = bake(model)
    for method in methods or ():
        if isinstance(method, Foldable):
            folded = method.fold(folded)
    return folded


@torch.no_grad()
def compact(
    model: nn.Module,
    input_shape: Sequence[int],
    select_inputs: bool = False,
    methods: Sequence[SparsityMethod] | None = None,
    fold_batchnorm: bool = False,
) -> CompactModel:
    """The smaller dense network equivalent to ``model`` at test time (see the module doc).

    Args:
        model: an ``nn.Sequential`` (with sparsity methods attached or not); left untouched.
        input_shape: shape of one example, e.g. ``(1, 28, 28)``.
        select_inputs: when the first layer is linear (after an optional ``Flatten``), drop
            its zero input columns too, behind a :class:`SelectInputs` layer that picks the
            kept input features (``torch.index_select``); the module still takes the
            original input. This is the architecture of the L0 paper's tables (e.g.
            784-300-100 -> 198-233-100 counts the selected inputs).
        methods: the methods attached to ``model``, folded in this order first (e.g. the
            layer-sparsity method merges the mergeable layers); see :func:`fold`.
        fold_batchnorm: fold every BatchNorm that alone reads a Conv2d / Linear into that
            layer (:func:`fold_batchnorm_`): an inference network, with fewer parameters than
            the deployable count, which keeps the BatchNorms.
    """
    compacted = _compact(model, input_shape, select_inputs, methods)
    if fold_batchnorm:
        compacted.folded_batchnorm = fold_batchnorm_(compacted.module)
    return compacted


def _compact(
    model: nn.Module, input_shape: Sequence[int], select_inputs: bool, methods: Sequence[SparsityMethod] | None
) -> CompactModel:
    folded = fold(model, methods)
    unit_methods = [m for m in methods or () if isinstance(m, UnitPruner)]
    if len(unit_methods) > 1:  # each numbers the units of the network it was attached to
        names = ", ".join(type(m).name for m in unit_methods)
        raise ValueError(f"compaction removes the units of one unit method; this model has {names}")
    if unit_methods:  # any traced network: closed units removed through its dependency graph
        removed = unit_methods[0].prune_units_(folded)
        module = folded.eval()
        return CompactModel(module, removed, _sparse_layers(module))
    try:
        items, positions = _chain(folded)
    except TypeError as exc:  # any other network: no unit removed, its per-weight zeros stored sparse
        warnings.warn(
            f"compaction removes no unit of this network ({exc}); it is kept whole, its zero weights stored "
            "sparse. Units of any traced network are removed with the l0_units method.",
            stacklevel=2,
        )
        module = folded.eval()
        return CompactModel(module, {}, _sparse_layers(module))
    removed: dict[str, int] = {}
    changed = True
    while changed:  # removing a layer's units can leave units of the layers before it unread
        changed = False
        for i, j in zip(positions[:-1], positions[1:]):
            changed |= _remove_dead_units(items, i, j, removed)
    if select_inputs:
        items = _select_inputs(items)
    module = fast_pooling(nn.Sequential(OrderedDict(items))).eval()
    return CompactModel(module, removed, _sparse_layers(module))


@torch.no_grad()
def fold_batchnorm_(module: nn.Module) -> dict[str, str]:
    """Fold, in place, every BatchNorm that alone reads a ``Conv2d`` (``BatchNorm2d``) or a
    ``Linear`` (``BatchNorm1d``) into that layer, at its running statistics, and put an
    ``nn.Identity`` in its place: the same outputs in eval mode, one layer fewer to run.

    A pair is folded only where the layer's output goes to the BatchNorm alone and each module
    is called once (found in the ``torch.fx`` graph of ``module``). Returns ``{BatchNorm:
    layer}`` for the folded pairs. Raises ``NetworkError`` (a ``TypeError``; one line) for a
    network ``torch.fx`` cannot trace.
    """
    from torch.nn.utils.fusion import fuse_conv_bn_weights, fuse_linear_bn_weights

    try:
        graph = torch.fx.symbolic_trace(module).graph
    except Exception as exc:  # noqa: BLE001 - whatever tracing raises, the message is the reason
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise NetworkError(f"folding BatchNorm needs a network torch.fx can trace ({reason})") from None
    modules = dict(module.named_modules())
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    pairs: dict[str, str] = {}
    for node in graph.nodes:
        bn = modules.get(node.target) if node.op == "call_module" else None
        if (
            not isinstance(bn, nn.modules.batchnorm._BatchNorm)
            or bn.running_mean is None
            or "." not in f".{node.target}"
        ):
            continue
        source = node.args[0] if node.args else None
        if not (isinstance(source, torch.fx.Node) and source.op == "call_module" and len(source.users) == 1):
            continue
        layer = modules[source.target]
        fits = (isinstance(layer, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d)) or (
            isinstance(layer, nn.Linear) and isinstance(bn, nn.BatchNorm1d)
        )
        if fits and calls[node.target] == 1 and calls[source.target] == 1:
            pairs[node.target] = source.target
    for bn_name, layer_name in pairs.items():
        bn, layer = modules[bn_name], modules[layer_name]
        gamma = bn.weight if bn.weight is not None else torch.ones_like(bn.running_mean)
        beta = bn.bias if bn.bias is not None else torch.zeros_like(bn.running_mean)
        fuse = fuse_conv_bn_weights if isinstance(layer, nn.Conv2d) else fuse_linear_bn_weights
        layer.weight, layer.bias = fuse(layer.weight, layer.bias, bn.running_mean, bn.running_var, bn.eps, gamma, beta)
        parent, _, child = bn_name.rpartition(".")
        setattr(module.get_submodule(parent), child, nn.Identity())
    return pairs


def _sparse_layers(module: nn.Module) -> list[str]:
    """Layers left with per-weight zeros (more than half): stored sparse where that is smaller."""
    return [
        n
        for n, m in module.named_modules()
        if isinstance(m, (nn.Linear, nn.Conv2d))
        and bool(m.weight.any())  # not an empty layer, nor one a blank channel feeds
        and float((m.weight == 0).float().mean()) > 0.5
    ]


def _remove_dead_units(items: list[tuple[str, nn.Module]], i: int, j: int, removed: dict[str, int]) -> bool:
    """Remove the dead units of layer ``items[i]`` and their inputs of ``items[j]``, the next
    linear / conv layer; ``removed`` counts them. Whether anything changed."""
    (name, layer), (next_name, nxt) = items[i], items[j]
    between = [m for _, m in items[i + 1 : j]]
    units = layer.weight.shape[0]
    if units == 0:
        return False  # a linear layer with nothing left
    # The next layer's weights grouped by the unit they read: (out, units, inputs per unit).
    if isinstance(nxt, nn.Linear):
        if nxt.in_features % units:
            return False  # not a plain flatten of this layer's output
        w_next = nxt.weight.view(nxt.out_features, units, nxt.in_features // units)
        const_ok_anyway = True  # a constant input folds exactly into a linear bias
    else:
        w_next = nxt.weight.flatten(2)
        const_ok_anyway = tuple(nxt.padding) == (0, 0)  # every window sees the whole constant map
    unused = (w_next == 0).all(dim=2).all(dim=0)
    zero_in = (layer.weight.flatten(1) == 0).all(dim=1)
    bias = layer.bias if layer.bias is not None else layer.weight.new_zeros(units)
    const = torch.relu(bias) if any(isinstance(m, nn.ReLU) for m in between) else bias
    constant = zero_in & ((const == 0) | const_ok_anyway)
    dead = unused | constant
    if not bool(dead.any()):
        return False
    keep = (~dead).nonzero().squeeze(1)
    blank = isinstance(layer, nn.Conv2d) and keep.numel() == 0
    if blank and units == 1 and not (layer.weight.any() or bias.any() or w_next.any()):
        return False  # already the blank channel of an earlier pass
    fold = dead & ~unused & (const != 0)
    if bool(fold.any()):  # the constant output of a unit with no input goes into the next bias
        contribution = (w_next[:, fold, :].sum(dim=2) * const[fold]).sum(dim=1)
        if nxt.bias is None:
            nxt.bias = nn.Parameter(nxt.weight.new_zeros(nxt.weight.shape[0]))
        nxt.bias.add_(contribution)
    if blank:  # torch's conv2d rejects 0 output channels: keep one that outputs exactly 0
        keep = keep.new_zeros(1)
        warnings.warn(
            f"compact: every output channel of {name!r} is pruned; it keeps one all-zero channel, "
            "because PyTorch's Conv2d cannot have 0 output channels (the outputs are unchanged)",
            stacklevel=4,  # the caller of compact, past torch.no_grad's wrapper
        )
    shrunk = _shrink_out(layer, keep)
    shrunk_next = _shrink_in(nxt, keep, w_next.shape[2] if isinstance(nxt, nn.Linear) else 1)
    if blank:  # its contribution, if any, is already in the next layer's bias
        with torch.no_grad():
            shrunk.weight.zero_()
            if shrunk.bias is not None:
                shrunk.bias.zero_()
            shrunk_next.weight.zero_()  # reads the blank channel only
    items[i], items[j] = (name, shrunk), (next_name, shrunk_next)
    removed[name] = removed.get(name, 0) + units - keep.numel()
    return True


class MaxPool2x2(nn.MaxPool2d):
    """``nn.MaxPool2d(2)`` (stride 2, no padding, floor mode) as the maximum of strided slices.

    The same values as ``nn.MaxPool2d(2)`` (a maximum is exact, NaN propagates in both), in a
    fraction of the time of PyTorch's CPU kernel on NCHW tensors; ``torch.export`` records
    it as slices and ``maximum``, standard operators.
    """

    def __init__(self) -> None:
        super().__init__(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2] // 2 * 2, x.shape[-1] // 2 * 2
        x = x[..., :h, :w]
        rows = torch.maximum(x[..., 0::2, :], x[..., 1::2, :])  # pairs of whole rows first: contiguous reads
        return torch.maximum(rows[..., 0::2], rows[..., 1::2])


def _is_plain_2x2_pool(m: nn.Module) -> bool:
    if not isinstance(m, nn.MaxPool2d) or m.return_indices or m.ceil_mode:
        return False
    pair = lambda v: tuple(v) if isinstance(v, (tuple, list)) else (v, v)  # noqa: E731
    return (
        pair(m.kernel_size) == (2, 2)
        and pair(m.stride) == (2, 2)
        and pair(m.padding) == (0, 0)
        and pair(m.dilation) == (1, 1)
    )


def fast_pooling(model: nn.Module) -> nn.Module:
    """``model`` (changed in place, and returned) with every plain 2x2 max-pooling as :class:`MaxPool2x2`.

    In an ``nn.Sequential``, a ReLU directly followed by a max-pooling also swaps places with
    it: ``relu(maxpool(x)) == maxpool(relu(x))`` exactly (ReLU is monotone), and the ReLU
    then runs on a quarter of the values.
    """
    if _is_plain_2x2_pool(model) and not isinstance(model, MaxPool2x2):
        return MaxPool2x2()
    for name, child in list(model.named_children()):
        setattr(model, name, fast_pooling(child))
    if isinstance(model, nn.Sequential):
        items = list(model._modules.items())
        for i in range(len(items) - 1):
            (a_name, a), (b_name, b) = items[i], items[i + 1]
            if type(a) is nn.ReLU and isinstance(b, nn.MaxPool2d) and not b.return_indices:
                items[i], items[i + 1] = (b_name, b), (a_name, a)
        model._modules.clear()
        model._modules.update(items)
    return model


class SelectInputs(nn.Module):
    """Flatten the input and keep the features at ``index`` (the first layer's open inputs)."""

    def __init__(self, index: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("index", index.to(torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1).index_select(1, self.index)


def _select_inputs(items: list[tuple[str, nn.Module]]) -> list[tuple[str, nn.Module]]:
    first = next(i for i, (_, m) in enumerate(items) if isinstance(m, (nn.Linear, nn.Conv2d)))
    layer = items[first][1]
    if not isinstance(layer, nn.Linear) or any(not isinstance(m, nn.Flatten) for _, m in items[:first]):
        return items  # inputs of a convolution stay as they are
    keep = (layer.weight != 0).any(dim=0).nonzero().squeeze(1)
    shrunk = plain_layer_like(layer, layer.weight.index_select(1, keep), layer.bias)
    return [("select", SelectInputs(keep)), (items[first][0], shrunk), *items[first + 1 :]]


def _shrink_out(layer: nn.Module, keep: torch.Tensor) -> nn.Module:
    bias = layer.bias.index_select(0, keep) if layer.bias is not None else None
    return plain_layer_like(layer, layer.weight.index_select(0, keep), bias)


def _shrink_in(layer: nn.Module, keep: torch.Tensor, per_unit: int) -> nn.Module:
    if isinstance(layer, nn.Linear):  # each kept unit feeds per_unit consecutive inputs (Flatten)
        keep = (keep.view(-1, 1) * per_unit + torch.arange(per_unit, device=keep.device).view(1, -1)).reshape(-1)
    return plain_layer_like(layer, layer.weight.index_select(1, keep), layer.bias)


def active_inputs(module: nn.Module, input_shape: Sequence[int]) -> list[int]:
    """Input features of each linear layer that can change the output (the L0 paper's widths).

    A feature counts when some weight reads it and the layers before can make it vary: a
    feature from a removed unit or channel (one that is always 0 or constant) does not. So
    these are the read columns of each linear layer of
    ``compact(module, input_shape, select_inputs=True)``. After a flattened convolution
    they count single features (LeNet-5's fc1 reads 45 of 800 in the paper's table), which
    can be fewer than the kept channels' positions that the compact layer holds.
    """
    try:
        _chain(bake(module))
    except TypeError:  # not a chain: the paper's widths are those of chains
        return []
    small = compact(module, input_shape, select_inputs=True).module
    return [int((m.weight != 0).any(dim=0).sum()) for m in small.modules() if isinstance(m, nn.Linear)]


def size_summary(dense: nn.Module, small: nn.Module, input_shape: Sequence[int]) -> dict[str, Any]:
    """Architecture, parameters and FLOPs per example of a network and its compact version."""
    return {
        "architecture_before": describe(dense, input_shape),
        "architecture_after": describe(small, input_shape),
        "params_before": count_params(dense),
        "params_after": count_params(small),
        "flops_before": count_flops(dense, input_shape),
        "flops_after": count_flops(small, input_shape),
    }
