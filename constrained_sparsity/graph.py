"""Layer chains: the one parser of ``nn.Sequential`` networks that the FLOP measure, layer
merging and compaction share, and the helpers that turn parametrized layers into plain ones.

A *chain* is an ``nn.Sequential`` whose children are ``nn.Linear`` / ``nn.Conv2d`` layers with
only shape-preserving or elementwise modules between them (ReLU, max-pooling, flattening,
dropout, identity). Each consumer adds its own conditions (layer merging needs linear layers
with ReLUs between them; compaction and the FLOP measure refuse grouped convolutions).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

__all__ = [
    "BETWEEN",
    "Chain",
    "ChainError",
    "ChainLayer",
    "Mask",
    "bake",
    "keep_zeros",
    "mask_of",
    "layer_output_shapes",
    "model_device",
    "observe",
    "model_dtype",
    "original_weight",
    "parse_chain",
    "plain_layer_like",
]

#: Modules that may sit between two layers of a chain.
BETWEEN: tuple[type[nn.Module], ...] = (nn.ReLU, nn.MaxPool2d, nn.Flatten, nn.Dropout, nn.Identity)
LAYERS: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv2d)


class ChainError(TypeError):
    """``model`` is not a chain. ``name`` and ``module`` say which child broke it (None: the model)."""

    def __init__(self, message: str, name: str | None = None, module: nn.Module | None = None) -> None:
        super().__init__(message)
        self.name = name
        self.module = module


@dataclass(frozen=True)
class ChainLayer:
    """One ``Linear`` / ``Conv2d`` of a chain and the modules after it, up to the next layer."""

    index: int  # position among the chain's layers
    name: str
    module: nn.Module
    after: tuple[nn.Module, ...]

    @property
    def relu_after(self) -> bool:
        return any(isinstance(m, nn.ReLU) for m in self.after)


@dataclass(frozen=True)
class Chain:
    """A parsed chain: every child in order, the layers, and what comes before the first layer."""

    items: tuple[tuple[str, nn.Module], ...]
    layers: tuple[ChainLayer, ...]
    leading: tuple[nn.Module, ...]

    def positions(self) -> list[int]:
        """Indices in ``items`` of the layers."""
        where = {id(m): i for i, (_, m) in enumerate(self.items)}
        return [where[id(layer.module)] for layer in self.layers]


def parse_chain(
    model: nn.Module,
    between: tuple[type[nn.Module], ...] = BETWEEN,
    layers: tuple[type[nn.Module], ...] = LAYERS,
    leading: tuple[type[nn.Module], ...] = (),
    groups: bool = False,
) -> Chain:
    """Parse ``model`` as a chain of ``layers`` with ``between`` modules between them.

    Args:
        between: module types allowed between (and around) the layers.
        layers: the layer types (``nn.Linear`` and ``nn.Conv2d`` by default).
        leading: further module types allowed before the first layer only.
        groups: whether grouped convolutions are allowed.

    Raises:
        ChainError: ``model`` is not an ``nn.Sequential`` (``name`` None), or a child is
            neither a layer nor an allowed module, or a convolution is grouped.
    """
    if not isinstance(model, nn.Sequential):
        raise ChainError(f"the model is a {type(model).__name__}, not an nn.Sequential")
    items = tuple(model.named_children())
    found: list[tuple[str, nn.Module, list[nn.Module]]] = []
    before: list[nn.Module] = []
    for name, m in items:
        if isinstance(m, layers):
            if not groups and getattr(m, "groups", 1) != 1:
                raise ChainError(f"layer {name!r} is a grouped convolution", name, m)
            found.append((name, m, []))
        elif isinstance(m, between) or (not found and isinstance(m, leading)):
            (found[-1][2] if found else before).append(m)
        else:
            allowed = ", ".join(t.__name__ for t in between)
            raise ChainError(f"module {name!r} ({type(m).__name__}) is not one of {allowed}", name, m)
    chain_layers = tuple(ChainLayer(i, n, m, tuple(after)) for i, (n, m, after) in enumerate(found))
    return Chain(items, chain_layers, tuple(before))


def original_weight(module: nn.Module) -> torch.Tensor:
    """The trained weight of a layer: the parametrization's ``original`` when it has one."""
    if parametrize.is_parametrized(module, "weight"):
        return module.parametrizations.weight.original
    return module.weight


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter or buffer (CPU for a model with neither)."""
    for t in (*model.parameters(), *model.buffers()):
        return t.device
    return torch.device("cpu")


def model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the model's first floating-point parameter (the default dtype otherwise)."""
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.get_default_dtype()


@torch.no_grad()
def observe(
    model: nn.Module,
    example: torch.Tensor,
    forward: dict[nn.Module, Callable[..., Any]] | None = None,
    pre: dict[nn.Module, Callable[..., Any]] | None = None,
) -> Any:
    """Run ``model`` on ``example`` once with forward hooks (``module -> hook(module, inputs,
    output)``) and forward pre-hooks (``module -> hook(module, inputs)``), and return its output.

    In eval mode (no batch statistics updated, no random draw) and without autograd; the
    model's mode is restored and the hooks removed whatever happens. ``example`` is moved to
    the model's device and dtype.
    """
    example = example.to(device=model_device(model), dtype=model_dtype(model))
    handles = [m.register_forward_hook(h) for m, h in (forward or {}).items()]
    handles += [m.register_forward_pre_hook(h) for m, h in (pre or {}).items()]
    was_training = model.training
    model.eval()
    try:
        return model(example)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()


def layer_output_shapes(
    model: nn.Module, layers: Sequence[nn.Module], example: torch.Tensor
) -> list[tuple[nn.Module, torch.Size]]:
    """``(layer, output shape)`` of every call of one of ``layers`` when ``model`` runs ``example``
    (in call order; see :func:`observe`)."""
    calls: list[tuple[nn.Module, torch.Size]] = []
    observe(model, example, forward={m: lambda m, _inp, out: calls.append((m, out.shape)) for m in layers})
    return calls


def plain_layer_like(layer: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
    """A new plain ``nn.Linear`` / ``nn.Conv2d`` shaped like ``weight``, with ``layer``'s other settings.

    It lives on ``weight``'s device, with its dtype.
    """
    kw = {"bias": bias is not None, "device": weight.device, "dtype": weight.dtype}
    if isinstance(layer, nn.Linear):
        plain: nn.Module = nn.Linear(weight.shape[1], weight.shape[0], **kw)
    elif isinstance(layer, nn.Conv2d):
        groups = layer.groups
        plain = nn.Conv2d(
            weight.shape[1] * groups,
            weight.shape[0],
            layer.kernel_size,
            layer.stride,
            layer.padding,
            layer.dilation,
            groups,
            padding_mode=layer.padding_mode,
            **kw,
        )
    else:
        raise TypeError(f"plain_layer_like: {type(layer).__name__} is not an nn.Linear or nn.Conv2d")
    with torch.no_grad():
        plain.weight.copy_(weight)
        if bias is not None:
            plain.bias.copy_(bias)
    return plain


class Mask(nn.Module):
    """Parametrization ``W -> W * mask`` (``torch.ao.pruning``'s ``FakeSparsity``): a pruned weight
    is exactly 0 whatever the optimizer does to the original, and its gradient is 0. The mask
    is a buffer of the parametrization, so it is in the model's ``state_dict``."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", torch.ones_like(weight.detach()))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.mask


def mask_of(module: nn.Module) -> Mask | None:
    """The :class:`Mask` parametrization of a layer's weight, if it has one."""
    if not parametrize.is_parametrized(module, "weight"):
        return None
    return next((p for p in module.parametrizations.weight if isinstance(p, Mask)), None)


def keep_zeros(model: nn.Module) -> Callable[..., None]:
    """A function that sets back to 0 every ``Linear`` / ``Conv2d`` weight that is 0 now (the
    trained weight: a parametrization's original): called after each step of a phase that must
    keep a sparsity pattern while it trains the other weights."""
    zeros = [(w, w == 0) for w in (original_weight(m) for m in model.modules() if isinstance(m, LAYERS))]
    zeros = [(w, mask) for w, mask in zeros if bool(mask.any())]

    @torch.no_grad()
    def restore(*_args: Any) -> None:
        for w, mask in zeros:
            w.masked_fill_(mask, 0.0)

    return restore


def _is_bakeable(module: nn.Module) -> bool:
    return isinstance(module, LAYERS) and (parametrize.is_parametrized(module) or "forward" in module.__dict__)


@torch.no_grad()
def bake(model: nn.Module) -> nn.Module:
    """A copy of ``model`` in eval mode whose ``Linear`` / ``Conv2d`` layers are plain.

    Every layer that a sparsity method changed -- a parametrization on its weight or bias
    (``torch.nn.utils.parametrize``), an instance ``forward`` -- is replaced by a plain layer
    holding its current weight and bias as computed in eval mode. Forward (pre-)hooks that
    methods registered on other modules are dropped from the copy. The original model is
    left untouched. (The copy does not call ``remove_parametrizations``: a deep copy shares
    the parametrized class with the original, and removing a parametrization from one would
    remove it from both.)
    """
    was_training = model.training
    model.eval()
    try:
        baked = copy.deepcopy(model)
        for module in baked.modules():
            for key in [k for k, h in module._forward_pre_hooks.items() if getattr(h, "sparsity_hook", False)]:
                del module._forward_pre_hooks[key]
        for name, module in list(baked.named_modules()):
            if not _is_bakeable(module):
                continue
            bias = module.bias.detach() if module.bias is not None else None
            plain = plain_layer_like(module, module.weight.detach(), bias)
            if not name:
                return plain.eval()
            parent_name, _, child = name.rpartition(".")
            setattr(baked.get_submodule(parent_name) if parent_name else baked, child, plain)
    finally:
        model.train(was_training)
    return baked.eval()
