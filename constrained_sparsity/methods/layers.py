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

:class:`LayerSparsity` is the ``layers`` method of the method interface: no surrogate (the
proximal step moves the weights), the depth as exact measure, and a phase after training that
merges the mergeable layers and refits the shallower network
(:class:`~constrained_sparsity.methods.base.Phase`). It is declared in a config as a section,
``sparsity.layers``, beside or without another method.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError, OptionError
from ..graph import ChainError, bake, model_device, original_weight, parse_chain
from ..numbers import finite, within
from .base import (
    BudgetSpec,
    BuildContext,
    Foldable,
    Freezable,
    HasPhase,
    MethodReport,
    MethodSpec,
    Phase,
    PhaseContext,
    Projectable,
    Proximal,
    SparsityMethod,
    Target,
)

__all__ = [
    "LayerSparsity",
    "LayersOptions",
    "attach_layer_sparsity",
    "merge_layers",
    "negative_part_prox_",
]

# Modules that may sit between linear layers of a mergeable chain without changing the
# argument (they act on a layer's input or are the identity at test time).
_PASSTHROUGH = (nn.Flatten, nn.Identity, nn.Dropout)


@dataclass
class LayersOptions:
    """Config section ``sparsity.layers``: at most ``max_layers`` linear layers after merging.

    ``lam`` is the frozen multiplier in penalized mode; ``weights`` the ``r_j`` (one for all
    regularised layers or one per layer); ``eligible`` the layers to regularise (null: every
    mergeable one); ``input_nonnegative`` whether the data are >= 0 (null: decided from the
    training data); ``refit_epochs``: after training, merge, then retrain the shallower
    network this long.
    """

    max_layers: int | None = None  # null: layer sparsity off
    lam: float | None = None
    weights: float | list[float] = 1.0
    eligible: list[str] | None = None
    input_nonnegative: bool | None = None
    dual_restarts: bool = False
    refit_epochs: int = 0

    def __post_init__(self) -> None:
        if self.max_layers is not None and self.max_layers < 0:
            raise OptionError("max_layers", self.max_layers, "should be >= 0")
        if self.lam is not None and not (finite(self.lam) and self.lam >= 0):
            raise OptionError("lam", self.lam, "should be >= 0")
        ws = self.weights if isinstance(self.weights, list) else [self.weights]
        if not all(finite(w) and w >= 0 for w in ws):
            raise OptionError("weights", self.weights, "should be >= 0")
        if self.refit_epochs < 0:
            raise OptionError("refit_epochs", self.refit_epochs, "should be >= 0")
        if self.refit_epochs and self.max_layers is None:
            raise OptionError("refit_epochs", self.refit_epochs, "needs max_layers")


def negative_part_prox_(tensors: Sequence[torch.Tensor], threshold: float) -> float:
    """In place: the prox of ``threshold * ||neg(theta)||_2`` over the group ``tensors``.

    Returns the norm of the negative part after the step (0.0 when it was zeroed).
    """
    if not within(threshold, 0):
        raise ValueError(f"threshold={threshold} should be a finite number >= 0")
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
    try:
        chain = parse_chain(model, between=(nn.ReLU, *_PASSTHROUGH), layers=(nn.Linear,))
    except ChainError as exc:
        if exc.name is None:
            raise TypeError(
                f"layer sparsity needs an nn.Sequential of Linear / ReLU layers ({exc}); "
                "build the network as nn.Sequential to merge its layers"
            ) from None
        raise TypeError(
            f"layer sparsity needs ReLU activations between linear layers; module {exc.name!r} is a "
            f"{type(exc.module).__name__} (merging a layer relies on ReLU being the identity on non-negative inputs)"
        ) from None
    if not chain.layers:
        raise ValueError("the model has no nn.Linear layer")
    out = []
    for k, layer in enumerate(chain.layers):
        before = chain.layers[k - 1].after if k else chain.leading
        nonneg = any(isinstance(m, nn.ReLU) for m in before) or (k == 0 and input_nonnegative)
        # A ReLU after the last linear layer has no next layer to merge into.
        relu_next = layer.relu_after and k + 1 < len(chain.layers)
        out.append(_ChainLayer(layer.name, layer.module, relu_next, nonneg))  # type: ignore[arg-type]
    return out


def _layer_params(module: nn.Linear) -> list[torch.Tensor]:
    weight = original_weight(module)
    return [weight] if module.bias is None else [weight, module.bias]


class LayersReport(MethodReport):
    """How the report reads the ``summary.json`` entries of :class:`LayerSparsity`."""

    measure_label = "active layers"

    @torch.no_grad()
    def metrics(self) -> dict[str, float]:
        out: dict[str, float] = {
            "layers/active": self.method.depth(),
            "layers/surrogate": float(self.method.surrogate()),
        }
        for name, norm in self.method.negative_norms().items():
            out[f"layers/neg_norm/{name}"] = float(norm)
        return out

    def measure_key(self, target: Target) -> str | None:
        return "layers/active"

    @torch.no_grad()
    def rows(self) -> list[dict[str, Any]]:
        merged = set(self.method.mergeable())
        norms = self.method.negative_norms()
        return [
            {"name": n, "neg_norm": float(norms[n]), "mergeable": n in merged, "value": int(n not in merged)}
            for n in self.method.layers
        ]

    def describe(self, target: Target, surrogate: float | None, exact: float) -> dict[str, Any]:
        return {"max_layers": int(target.epsilon), "depth": int(exact)}

    @classmethod
    def format_target(cls, entry: dict[str, Any]) -> str:
        return f"active layers {entry['depth']} <= {entry['max_layers']}?"

    @classmethod
    def format_phase(cls, name: str, info: dict[str, Any]) -> list[str]:
        lines = [
            f"merged: {info['depth_before']} -> {info['depth_after']} linear layers, {info['params_before']} -> "
            f"{info['params_after']} parameters, widths {info['widths']}, max |output difference| "
            f"{info['max_abs_diff_merged']:.2e}, test error {100 * info['test_error_merged']:.2f} %"
        ]
        if "test_error_refit" in info:
            lines.append(f"refit ({info['refit_epochs']} epochs): test error {100 * info['test_error_refit']:.2f} %")
        return lines


class LayerSparsity(Proximal, Projectable, Freezable, Foldable, HasPhase, SparsityMethod):
    """The layer-sparsity measures and proximal step of one ReLU ``nn.Sequential``: the ``layers`` method.

    Built by :func:`attach_layer_sparsity`. ``layers`` are the regularised (eligible) layers.
    A target's budget is a number of linear layers (``Target(2, method="layers")``).
    """

    name = "layers"
    reporter = LayersReport
    spec = MethodSpec(
        options=LayersOptions,
        primary=False,
        budget_key="max_layers",
        lambda_key="lam",
        count_budget=True,
        compare_tolerance=0.0,
    )

    def __init__(
        self,
        model: nn.Sequential,
        chain: list[_ChainLayer],
        layers: list[str],
        weights: list[float],
        input_nonnegative: bool = False,
        refit_epochs: int = 0,
    ):
        self.model = model
        self.refit_epochs = refit_epochs
        self._chain = chain
        self.layers = list(layers)
        self.weights = dict(zip(layers, (float(w) for w in weights)))
        self.input_nonnegative = input_nonnegative
        self._by_name = {c.name: c for c in chain}
        self._frozen: set[str] | None = None  # finishing: the layers kept mergeable

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

    def regularised_parameters(self) -> Iterator[torch.Tensor]:
        """The weights and biases the regulariser acts on."""
        for name in self.layers:
            yield from self._params(name)

    # -- the method interface ------------------------------------------------------------
    @classmethod
    def from_config(
        cls, model: nn.Module, options: Any, spec: BudgetSpec, context: BuildContext
    ) -> tuple[LayerSparsity, list[Target]] | None:
        o = options if options is not None else LayersOptions()
        if o.max_layers is None:
            return None
        key = context.prefix
        nonneg = o.input_nonnegative if o.input_nonnegative is not None else context.input_nonnegative
        try:
            method = attach_layer_sparsity(
                model,
                o.eligible,
                o.weights,
                input_nonnegative=nonneg,
                refit_epochs=o.refit_epochs,  # type: ignore[arg-type]
            )
        except TypeError as exc:
            raise ConfigError(f"{key.rstrip('.')}: {exc}") from None
        except ValueError as exc:
            raise ConfigError(f"{key}{'weights' if 'weights' in str(exc) else 'eligible'}: {exc}") from None
        if not method.min_depth <= o.max_layers <= method.num_linear:
            raise ConfigError(
                f"{key}max_layers={o.max_layers}: should be between {method.min_depth} (every regularised layer "
                f"merged) and {method.num_linear} (the model's linear layers)"
            )
        if spec.mode == "penalized" and o.lam is None:
            raise ConfigError(f"{key}lam=None: penalized mode needs a lambda for the layer budget")
        lam = o.lam if spec.mode == "penalized" else None
        return method, [Target(o.max_layers, lam=lam, name="layers", method=method, restarts=o.dual_restarts)]

    def layer_names(self) -> list[str]:
        return list(self.layers)

    def check_target(self, target: Target) -> None:
        k = target.epsilon
        if not float(k).is_integer() or not self.min_depth <= k <= self.num_linear:
            raise ValueError(
                f"max_layers={k} should be between {self.min_depth} (every regularised "
                f"layer merged) and {self.num_linear} (the number of linear layers)"
            )
        if target.layers is not None:
            raise ValueError(f"layers={target.layers}: a layer budget counts the layers of the whole model")
        if target.measure != "exact":
            raise ValueError(f"measure={target.measure!r}: the depth has no differentiable surrogate; use 'exact'")

    def measure(self, target: Target) -> tuple[None, torch.Tensor]:
        """No surrogate (the proximal step acts on the weights); the depth after merging."""
        return None, torch.tensor(float(self.depth()), device=model_device(self.model))

    def proximal_step_(self, target: Target, strength: float) -> None:
        self.prox_(strength)

    def freeze_(self) -> None:
        """The finishing phase: the layers mergeable now (and those :meth:`project_` makes
        mergeable) stay mergeable: after each step their negative entries are set to 0."""
        self._frozen = set(self.mergeable())

    @torch.no_grad()
    def project_(self, target: Target) -> dict[str, int]:
        """Make mergeable, by zeroing their negative parts, the regularised layers with the
        smallest ``||neg(W_j, b_j)||`` (the ones the regulariser has shrunk most) until the
        depth is at most the budget."""
        norms = {n: float(v) for n, v in self.negative_norms().items() if n not in self.mergeable()}
        excess = self.depth() - int(target.epsilon)
        closed: dict[str, int] = {}
        for name in sorted(norms, key=norms.__getitem__)[: max(excess, 0)]:
            for p in self._params(name):
                p.clamp_(min=0.0)
            closed[name] = 1
        if self._frozen is not None:
            self._frozen |= set(closed)
        return closed

    def after_step(self) -> None:
        if self._frozen:
            with torch.no_grad():
                for name in self._frozen:
                    for p in self._params(name):
                        p.clamp_(min=0.0)

    def fold(self, model: nn.Module) -> nn.Module:
        """The merged network: every layer with no negative parameter merged into the next."""
        return merge_layers(bake(model), input_nonnegative=self.input_nonnegative)  # type: ignore[arg-type]

    def after_training(self, model: nn.Module, context: PhaseContext) -> Phase:
        """Merge the mergeable layers of the trained network, then refit it (``refit_epochs``).

        Other methods' parametrizations are folded in first, and their zeros are kept
        through the refit (``Phase.keep_zeros``).
        """
        folded = bake(model)
        merged = merge_layers(folded, input_nonnegative=self.input_nonnegative)  # type: ignore[arg-type]
        info: dict[str, Any] = {
            "depth_before": _count_linear(folded),
            "depth_after": _count_linear(merged),
            "params_before": sum(p.numel() for p in folded.parameters()),
            "params_after": sum(p.numel() for p in merged.parameters()),
            "test_error_before": context.error(folded),
            "test_error_merged": context.error(merged),
            "max_abs_diff_merged": context.max_output_difference(folded, merged),
            "widths": [m.out_features for m in merged.modules() if isinstance(m, nn.Linear)],
            "refit_epochs": self.refit_epochs,
        }
        return Phase(
            "refit",
            merged,
            self.refit_epochs,
            lr=context.primal_lr,
            keep_zeros=context.others,
            info=info,
            files={"merged_model.pt": merged},
        )


def _count_linear(model: nn.Module) -> int:
    return sum(isinstance(m, nn.Linear) for m in model.modules())


def attach_layer_sparsity(
    model: nn.Sequential,
    layers: Sequence[str] | None = None,
    weights: Sequence[float] | float = 1.0,
    input_nonnegative: bool = False,
    refit_epochs: int = 0,
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
        refit_epochs: after training (``csparse train``), merge and refit this long.
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
    if not all(within(w, 0) for w in r):
        raise ValueError(f"weights={r} should be finite numbers >= 0")
    return LayerSparsity(model, chain, chosen, r, input_nonnegative, refit_epochs)


@torch.no_grad()
def merge_layers(
    model: nn.Sequential, layers: Sequence[str] | None = None, input_nonnegative: bool = False
) -> nn.Sequential:
    """The shallower ``nn.Sequential`` equivalent to ``model``, with ``layers`` merged forward.

    Each named layer (default: every eligible layer with no negative parameter) is merged
    with the next linear layer, ``W' = W_{j+1} W_j``, ``b' = W_{j+1} b_j + b_{j+1}``, and
    the ReLU between them dropped. Consecutive layers merge in a chain. Gates or other
    parametrizations must be folded into the weights first (``L0Gates.detach()``, or
    :func:`~constrained_sparsity.graph.bake` for a folded copy).

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
            b = (
                module.bias.detach().clone()
                if module.bias is not None
                else torch.zeros(w.shape[0], dtype=w.dtype, device=w.device)
            )
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
