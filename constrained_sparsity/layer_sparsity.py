"""Layer sparsity (Hebiri & Lederer 2020): fewer layers, not fewer weights.

In a ReLU network, if a linear layer's weights and bias are all non-negative and its input is
non-negative (it follows a ReLU, or the data are non-negative), its output is non-negative, so
the ReLU after it is the identity and the layer merges with the next one::

    W' = W_{j+1} W_j,    b' = W_{j+1} b_j + b_{j+1}.

Regulariser (the surrogate of the constraint): ``sum_j r_j ||neg(W_j, b_j)||_2`` with
``neg(x) = min(x, 0)`` elementwise, over the eligible layers. The exact measure is the depth
of the merged network: the number of linear layers that remain once every mergeable layer
has been merged (a layer is mergeable when it is eligible and has no negative parameter).

The regulariser is handled by a proximal step after each primal step: for threshold ``t``,

    argmin_v  1/2 ||v - theta||^2 + t ||neg(v)||_2

leaves the non-negative entries of ``theta`` unchanged and shrinks the negative part as a
group, ``neg(v) = (1 - t / ||neg(theta)||)_+ neg(theta)``: it becomes exactly zero once its
norm is under ``t``. (Entries of ``theta`` that are >= 0 add nothing to either term when kept;
for the negative entries the optimum stays <= 0, where the problem is the group lasso prox.)
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

__all__ = [
    "LayerSparsity",
    "attach_layer_sparsity",
    "merge_layers",
    "negative_part_prox_",
]

# Modules that may sit between linear layers of a mergeable chain without changing the
# argument (they act on a layer's input or are the identity at test time).
_PASSTHROUGH = (nn.Flatten, nn.Identity, nn.Dropout)


def negative_part_prox_(tensors: Sequence[torch.Tensor], threshold: float) -> float:
    """In place: the prox of ``threshold * ||neg(theta)||_2`` over the group ``tensors``.

    Returns the norm of the negative part after the step (0.0 when it was zeroed).
    """
    if threshold < 0:
        raise ValueError(f"threshold={threshold} should be >= 0")
    with torch.no_grad():
        norm = torch.sqrt(sum((t.clamp(max=0.0) ** 2).sum() for t in tensors))  # type: ignore[arg-type]
        if float(norm) == 0.0:
            return 0.0
        scale = torch.clamp(1.0 - threshold / norm, min=0.0)
        for t in tensors:
            neg = t.clamp(max=0.0)
            t.sub_(neg * (1.0 - scale))
        return float(norm * scale)


@dataclass(frozen=True)
class _ChainLayer:
    name: str
    module: nn.Linear
    followed_by_relu: bool
    input_nonnegative: bool

    @property
    def eligible(self) -> bool:
        # It can merge with the next linear layer only if a ReLU follows it (which then is
        # the identity) and its input is non-negative.
        return self.followed_by_relu and self.input_nonnegative


def _parse_chain(model: nn.Module, input_nonnegative: bool) -> list[_ChainLayer]:
    """The linear layers of an ``nn.Sequential`` ReLU network, with what follows each."""
    if not isinstance(model, nn.Sequential):
        raise TypeError(
            f"layer sparsity needs an nn.Sequential of Linear / ReLU layers (got {type(model).__name__}); "
            "build the network as nn.Sequential to merge its layers"
        )
    items = list(model.named_children())
    chain: list[_ChainLayer] = []
    nonneg = input_nonnegative
    pending: tuple[str, nn.Linear, bool] | None = None
    for name, module in items:
        if isinstance(module, nn.Linear):
            if pending is not None:
                chain.append(_ChainLayer(pending[0], pending[1], False, pending[2]))
            pending = (name, module, nonneg)
            nonneg = False
        elif isinstance(module, nn.ReLU):
            if pending is not None:
                chain.append(_ChainLayer(pending[0], pending[1], True, pending[2]))
                pending = None
            nonneg = True
        elif isinstance(module, _PASSTHROUGH):
            continue
        else:
            raise TypeError(
                f"layer sparsity needs ReLU activations between linear layers; module {name!r} is a "
                f"{type(module).__name__} (merging a layer relies on ReLU being the identity on non-negative inputs)"
            )
    if pending is not None:
        chain.append(_ChainLayer(pending[0], pending[1], False, pending[2]))
    if not chain:
        raise ValueError("the model has no nn.Linear layer")
    # A ReLU after the last linear layer has no next layer to merge into.
    last = chain[-1]
    if last.followed_by_relu:
        chain[-1] = _ChainLayer(last.name, last.module, False, last.input_nonnegative)
    return chain


def _layer_params(module: nn.Linear) -> list[torch.Tensor]:
    weight = module.parametrizations.weight.original if hasattr(module, "parametrizations") else module.weight
    return [weight] if module.bias is None else [weight, module.bias]


class LayerSparsity:
    """The layer-sparsity measures and proximal step of one ReLU ``nn.Sequential``.

    Built by :func:`attach_layer_sparsity`. ``layers`` are the regularised (eligible) layers.
    """

    def __init__(self, model: nn.Sequential, chain: list[_ChainLayer], layers: list[str], weights: list[float]):
        self.model = model
        self._chain = chain
        self.layers = list(layers)
        self.weights = dict(zip(layers, (float(w) for w in weights)))
        self._by_name = {c.name: c for c in chain}

    @property
    def num_linear(self) -> int:
        return len(self._chain)

    @property
    def min_depth(self) -> int:
        """The depth if every regularised layer were merged."""
        return self.num_linear - len(self.layers)

    def _params(self, name: str) -> list[torch.Tensor]:
        return _layer_params(self._by_name[name].module)

    def negative_norms(self) -> dict[str, torch.Tensor]:
        """``||neg(W_j, b_j)||_2`` of each regularised layer (differentiable)."""
        out = {}
        for name in self.layers:
            out[name] = torch.sqrt(sum((p.clamp(max=0.0) ** 2).sum() for p in self._params(name)))
        return out

    def surrogate(self) -> torch.Tensor:
        """``sum_j r_j ||neg(W_j, b_j)||_2`` over the regularised layers."""
        norms = self.negative_norms()
        return sum(self.weights[n] * v for n, v in norms.items())  # type: ignore[return-value]

    @torch.no_grad()
    def mergeable(self) -> list[str]:
        """Regularised layers with no negative parameter: they merge into the next layer."""
        return [n for n in self.layers if all(bool((p >= 0).all()) for p in self._params(n))]

    @torch.no_grad()
    def depth(self) -> int:
        """Exact measure: linear layers left after merging every mergeable layer."""
        return self.num_linear - len(self.mergeable())

    @torch.no_grad()
    def prox_(self, threshold: float) -> None:
        """The proximal step with threshold ``threshold * r_j`` on each regularised layer."""
        for name in self.layers:
            negative_part_prox_(self._params(name), threshold * self.weights[name])

    def parameters(self) -> Iterator[torch.Tensor]:
        for name in self.layers:
            yield from self._params(name)


def attach_layer_sparsity(
    model: nn.Sequential,
    layers: Sequence[str] | None = None,
    weights: Sequence[float] | float = 1.0,
    input_nonnegative: bool = False,
) -> LayerSparsity:
    """Declare layer sparsity on a ReLU ``nn.Sequential``.

    Args:
        model: ``nn.Sequential`` of ``nn.Linear`` / ``nn.ReLU`` (``nn.Flatten``, ``nn.Identity``
            and ``nn.Dropout`` may appear too).
        layers: names of the layers to regularise; ``None`` for every eligible layer. A layer
            is eligible when a ReLU follows it (and another linear layer after that) and its
            input is non-negative.
        weights: the per-layer weights ``r_j`` (one number for all, or one per layer).
        input_nonnegative: whether the network's input is non-negative (e.g. pixel
            intensities in [0, 1]); only then can the first layer merge.
    """
    chain = _parse_chain(model, input_nonnegative)
    eligible = [c.name for c in chain if c.eligible]
    if layers is None:
        chosen = eligible
    else:
        chosen = list(layers)
        names = [c.name for c in chain]
        for name in chosen:
            if name not in names:
                raise ValueError(f"layer {name!r} is not a linear layer of the model; linear layers: {names}")
            if name not in eligible:
                why = (
                    "no ReLU and linear layer follow it"
                    if not next(c for c in chain if c.name == name).followed_by_relu
                    else "its input can be negative (set input_nonnegative=True if the data are >= 0)"
                )
                raise ValueError(f"layer {name!r} cannot be merged: {why}; eligible layers: {eligible}")
        chosen = [c.name for c in chain if c.name in chosen]  # model order
    if not chosen:
        raise ValueError(
            "no layer of the model can be merged (need Linear -> ReLU -> Linear with a non-negative input)"
        )
    if isinstance(weights, (int, float)):
        r = [float(weights)] * len(chosen)
    else:
        r = [float(w) for w in weights]
        if len(r) != len(chosen):
            raise ValueError(f"weights has {len(r)} entries for {len(chosen)} regularised layers {chosen}")
    if any(w < 0 for w in r):
        raise ValueError(f"weights={r} should be >= 0")
    return LayerSparsity(model, chain, chosen, r)


@torch.no_grad()
def merge_layers(
    model: nn.Sequential, layers: Sequence[str] | None = None, input_nonnegative: bool = False
) -> nn.Sequential:
    """The shallower ``nn.Sequential`` equivalent to ``model``, with ``layers`` merged forward.

    Each named layer (default: every eligible layer with no negative parameter) is merged
    with the next linear layer, ``W' = W_{j+1} W_j``, ``b' = W_{j+1} b_j + b_{j+1}``, and
    the ReLU between them dropped. Consecutive layers merge in a chain. Gates or other
    parametrizations must be folded into the weights first (``L0Gates.detach()``).

    Raises:
        ValueError: a requested layer has a negative parameter, or is not eligible.
    """
    chain = _parse_chain(model, input_nonnegative)
    for c in chain:
        if hasattr(c.module, "parametrizations"):
            raise ValueError(f"layer {c.name!r} is parametrized (e.g. L0 gates): fold it first with gates.detach()")
    if layers is None:
        to_merge = {c.name for c in chain if c.eligible and all(bool((p >= 0).all()) for p in _layer_params(c.module))}
    else:
        to_merge = set(layers)
        for name in to_merge:
            c = next((c for c in chain if c.name == name), None)
            if c is None:
                raise ValueError(f"layer {name!r} is not a linear layer of the model")
            if not c.eligible:
                raise ValueError(
                    f"layer {name!r} cannot be merged: it is not followed by a ReLU and a linear layer, "
                    "or its input can be negative"
                )
            negatives = sum(int((p < 0).sum()) for p in _layer_params(c.module))
            if negatives:
                raise ValueError(f"layer {name!r} has {negatives} negative parameters; it cannot be merged")
    pending: tuple[torch.Tensor, torch.Tensor] | None = None  # accumulated (W, b) of merged layers
    out: list[tuple[str, nn.Module]] = []
    for name, module in model.named_children():
        if isinstance(module, nn.Linear):
            w = module.weight.detach().clone()
            b = module.bias.detach().clone() if module.bias is not None else torch.zeros(w.shape[0], dtype=w.dtype)
            if pending is not None:
                pw, pb = pending
                w, b = w @ pw, w @ pb + b
                pending = None
            if name in to_merge:
                pending = (w, b)
                continue
            layer = nn.Linear(w.shape[1], w.shape[0], bias=True, device=w.device, dtype=w.dtype)
            layer.weight.copy_(w)
            layer.bias.copy_(b)
            out.append((name, layer))
        elif isinstance(module, nn.ReLU):
            if pending is not None:  # the ReLU after a merged layer is the identity: drop it
                continue
            out.append((name, nn.ReLU()))
        else:
            out.append((name, module))
    assert pending is None, "a merged layer must be followed by another linear layer"
    return nn.Sequential(OrderedDict(out))
