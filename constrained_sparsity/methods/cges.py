"""Combined group and exclusive sparsity (Yoon & Hwang, ICML 2017): the ``cges`` method.

**Groups.** A group is the set of weights that leave one input feature: a column of an
``nn.Linear`` weight, or, for an ``nn.Conv2d``, one input channel (every filter's weights on
it; ``grouping: input``, the default, because a zero group is then an input channel that
compaction removes). The authors' code groups a conv weight by (kernel position, input
channel) across the output filters (``grouping: kernel``); a zero group there removes one tap
of every filter, which shrinks nothing until all the taps of a channel are zero.

**Regularisers** (per layer l, groups g of size n_g)::

    group (l2,1):      Omega_g(W) = sum_g c_g ||W_g||_2,      c_g = sqrt(n_g) (or 1)
    exclusive (l1,2):  Omega_e(W) = 1/2 sum_g ||W_g||_1^2

combined with a mix mu_l: strength lambda mu_l on the group term and lambda (1 - mu_l) on
the exclusive one. The default schedule is the authors': mu = 0.8 in the first layer, 0.2
less in each next layer (towards exclusive sparsity), clipped to [0, 1].

**Proximal steps** after each primal step, with step size the primal learning rate lr
(group first, then exclusive, as the authors do)::

    group:      w_g <- (1 - t_g / ||w_g||_2)_+ w_g,                  t_g = lr lambda mu_l c_g
    exclusive:  argmin_w 1/2 ||w - v||^2 + t/2 (sum_i |w_i|)^2,        t = lr lambda (1 - mu_l)
                = sign(v_i) (|v_i| - theta)_+,   theta = t S_k / (1 + t k)

where, with |v| sorted in decreasing order u_1 >= u_2 >= ..., k is the largest index with
u_k > t (u_1 + ... + u_k) / (1 + t k) and S_k = u_1 + ... + u_k (the optimality condition of
the soft-threshold: theta = t sum_i (|v_i| - theta)_+; found without sorting, by Newton's
method on that equation, see :func:`exclusive_prox`). The step of Yoon & Hwang's notes is the first-order
``w_i <- (1 - t ||v||_1 / |v_i|)_+ v_i`` (``exclusive_prox: approximate``), which
over-shrinks: it thresholds at t ||v||_1 instead of theta <= t ||v||_1.

**Measures** (exact only: there is no differentiable surrogate; the multiplier acts through
the proximal strength): the share of groups that are not all zero (``budget:
groups``; model-wise each group weighs its number of weights, or with ``weighting: flops``
the FLOPs of the chain that compaction keeps) or the share of weights that are not zero
(``budget: weights``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError, OptionError
from ..graph import ChainError, layer_output_shapes, parse_chain
from ..numbers import within
from .base import (
    BudgetSpec,
    BuildContext,
    MethodReport,
    MethodSpec,
    Projectable,
    Proximal,
    SparsityMethod,
    Target,
    close_fewest_,
    select_layers,
    targets_from_spec,
)

__all__ = [
    "BUDGETS",
    "CGES",
    "CGESOptions",
    "GROUPINGS",
    "attach_cges",
    "exclusive_prox",
    "from_groups",
    "group_prox",
    "to_groups",
]

GROUPINGS = ("input", "kernel")
BUDGETS = ("groups", "weights")
EXCLUSIVE_PROXES = ("exact", "approximate")


# -- groups and proximal operators ---------------------------------------------------------------
def to_groups(weight: torch.Tensor, grouping: str = "input") -> torch.Tensor:
    """The weight as a matrix with one group per row: ``(groups, group size)``."""
    if weight.dim() == 2:  # Linear (out, in): a column per input neuron
        return weight.t()
    if grouping == "input":  # Conv2d (out, in, kh, kw): an input channel, every filter's taps on it
        return weight.transpose(0, 1).reshape(weight.shape[1], -1)
    return weight.permute(1, 2, 3, 0).reshape(-1, weight.shape[0])  # a (channel, tap), across filters


def from_groups(groups: torch.Tensor, like: torch.Tensor, grouping: str = "input") -> torch.Tensor:
    """The inverse of :func:`to_groups`: a tensor shaped like ``like``."""
    if like.dim() == 2:
        return groups.t()
    out, cin, kh, kw = like.shape
    if grouping == "input":
        return groups.reshape(cin, out, kh, kw).transpose(0, 1)
    return groups.reshape(cin, kh, kw, out).permute(3, 0, 1, 2)


def group_prox(groups: torch.Tensor, threshold: float | torch.Tensor) -> torch.Tensor:
    """Prox of ``threshold * ||w_g||_2`` for every row: ``(1 - threshold / ||w_g||)_+ w_g``."""
    # sqrt of the sum of squares: a reduction along the rows of a transposed weight that is
    # several times faster than ``norm(dim=1)`` there (the prox runs after every step)
    norms = groups.square().sum(dim=1, keepdim=True).sqrt_()
    scale = torch.where(norms > 0, (1.0 - threshold / norms.clamp_min(1e-30)).clamp(min=0.0), 0.0)
    return groups * scale


def exclusive_prox(groups: torch.Tensor, t: float, exact: bool = True) -> torch.Tensor:
    """Prox of ``t/2 ||w_g||_1^2`` for every row (the exact soft-threshold, or Yoon & Hwang's first-order step).

    Exact: ``sign(v) (|v| - theta)_+`` with ``theta = t S_A / (1 + t |A|)``, A the weights with
    ``|v_i| > theta`` and S_A the sum of their magnitudes -- the root of the convex, decreasing,
    piecewise-linear ``g(theta) = t sum_i (|v_i| - theta)_+ - theta``. Newton's method on g from
    the left (``theta_0 = 0``: every non-zero weight active) is the update
    ``theta <- t S_A / (1 + t |A|)`` with A the weights above the current theta: theta rises, A
    only shrinks, and the iteration stops when A stops changing (its size, as A only shrinks) --
    then the formula holds with A exactly the weights above theta, which is the sorted-prefix
    characterisation (k = |A|). Vectorised over the rows; a few iterations in practice, no
    sort, four passes over the weights per iteration (``S_A = sum (|v| - theta)_+ + |A| theta``
    and ``|A|`` from the same ``(|v| - theta)_+``, which at the end is the answer's magnitude).
    Approximate: ``theta = t ||v||_1``.
    """
    a = groups.abs()
    if t <= 0:
        return groups.clone()
    if not exact:
        theta = t * a.sum(dim=1, keepdim=True)
        return groups.sign() * (a - theta).clamp(min=0.0)
    # the first step, from theta = 0 (A: the non-zero weights), needs no (|v| - theta)_+ pass
    size = a.sign().sum(dim=1, keepdim=True)  # |A| (a >= 0): a float sum, far faster than a bool one
    theta = t * a.sum(dim=1, keepdim=True) / (1.0 + t * size)
    r = torch.empty_like(a)
    for _ in range(a.shape[1] + 1):  # A shrinks at every step that does not stop
        torch.sub(a, theta, out=r).clamp_(min=0.0)
        count = r.sign().sum(dim=1, keepdim=True)
        if torch.equal(count, size):
            break
        theta = t * (r.sum(dim=1, keepdim=True) + count * theta) / (1.0 + t * count)
        size = count
    return r.copysign_(groups)


# -- the method -----------------------------------------------------------------------------------
@dataclass
class CGESOptions:
    """Config options of the ``cges`` method (``sparsity.<key>`` when ``sparsity.method: cges``).

    ``budget``: what a target counts, non-zero ``groups`` or non-zero ``weights``.
    ``grouping``: ``input`` (a group per input neuron / channel) or ``kernel`` (per input
    channel and kernel position, the authors' code). ``mu``: the group share per sparsified
    layer, one number for all or a list (null: 0.8 for the first layer, 0.2 less per layer).
    ``group_weight``: ``sqrt`` (c_g = sqrt of the group size) or ``none``.
    ``exclusive_prox``: ``exact`` or ``approximate`` (Yoon & Hwang's first-order step).
    ``weighting``: model-wise, what a group or weight weighs: ``params`` or ``flops``.
    ``layers``: the Linear / Conv2d layers to sparsify (null: all).
    """

    budget: str = "groups"
    grouping: str = "input"
    mu: float | list[float] | None = None
    group_weight: str = "sqrt"
    exclusive_prox: str = "exact"
    weighting: str = "params"
    layers: list[str] | None = None

    def __post_init__(self) -> None:
        for key, choices in (
            ("budget", BUDGETS),
            ("grouping", GROUPINGS),
            ("group_weight", ("sqrt", "none")),
            ("exclusive_prox", EXCLUSIVE_PROXES),
            ("weighting", ("params", "flops")),
        ):
            if getattr(self, key) not in choices:
                raise OptionError(key, getattr(self, key), f"should be one of {', '.join(choices)}")
        mus = self.mu if isinstance(self.mu, list) else [] if self.mu is None else [self.mu]
        if not all(within(m, 0.0, 1.0) for m in mus):
            raise OptionError("mu", self.mu, "should be in [0, 1], one number or one per layer")


@dataclass
class _Layer:
    name: str
    module: nn.Module
    mu: float

    @property
    def weight(self) -> torch.Tensor:
        return self.module.weight


class CGESReport(MethodReport):
    """What :class:`CGES` logs and reports: the share of groups and of weights per layer."""

    @torch.no_grad()
    def rows(self) -> list[dict[str, Any]]:
        rows = []
        for layer in self.method._layers:
            groups = to_groups(layer.weight.detach(), self.method.grouping)
            open_groups = int(groups.ne(0).any(dim=1).sum())
            nonzero = int(layer.weight.detach().ne(0).sum())
            group_density = open_groups / groups.shape[0]
            weight_density = nonzero / layer.weight.numel()
            rows.append(
                {
                    "name": layer.name,
                    "groups": groups.shape[0],
                    "active_groups": open_groups,
                    "params": layer.weight.numel(),
                    "active_params": nonzero,
                    "group_density": group_density,
                    "weight_density": weight_density,
                    "exact_density": weight_density,
                    "mu": layer.mu,
                    "value": group_density if self.method.budget == "groups" else weight_density,
                }
            )
        return rows

    @torch.no_grad()
    def metrics(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for row in self.rows():  # per layer: the share of weights, and of groups
            out[f"density/{row['name']}"] = row["weight_density"]
            out[f"density_groups/{row['name']}"] = row["group_density"]
        rows = self.rows()
        out["density/model"] = float(self.method._measure(None))  # what a model-wise budget counts
        out["density_groups/model"] = sum(r["active_groups"] * r["params"] / r["groups"] for r in rows) / sum(
            r["params"] for r in rows
        )
        out["density_weights/model"] = sum(r["active_params"] for r in rows) / sum(r["params"] for r in rows)
        return out

    def measure_key(self, target: Target) -> str | None:
        if target.layers is None:
            return "density/model"
        if len(target.layers) != 1:
            return None
        return f"density_groups/{target.layers[0]}" if self.method.budget == "groups" else f"density/{target.layers[0]}"

    def describe(self, target: Target, surrogate: float | None, exact: float) -> dict[str, Any]:
        kind = (
            self.method.budget
            if self.method._flops is None or target.layers
            else f"{self.method.budget} (FLOP-weighted)"
        )
        return {"epsilon": target.epsilon, "exact_density": exact, "budget_of": kind}

    @classmethod
    def format_target(cls, entry: dict[str, Any]) -> str:
        return f"exact {entry['budget_of']} density {entry['exact_density']:.4f} <= {entry['epsilon']:.4f}?"

    @classmethod
    def format_rows(
        cls, rows: list[dict[str, Any]], targets: list[dict[str, Any]], measures: dict[str, Any]
    ) -> list[str]:
        if not rows:
            return []
        lines = [f"{'layer':<12}{'groups':>8}{'active':>8}{'groups %':>10}{'weights %':>10}{'mu':>6}"]
        for row in rows:
            lines.append(
                f"{row['name']:<12}{row['groups']:>8}{row['active_groups']:>8}"
                f"{100 * row['group_density']:>9.1f}%{100 * row['weight_density']:>9.1f}%{row['mu']:>6.2f}"
            )
        params = sum(r["params"] for r in rows)
        active = sum(r["active_params"] for r in rows)
        lines.append(f"{'model':<12}{'':>16}{'':>10}{100 * active / params:>9.1f}%   ({active} of {params} weights)")
        return lines


class CGES(Proximal, Projectable, SparsityMethod):
    """Combined group and exclusive sparsity on the Linear / Conv2d layers of a model (see the
    module docstring). Built by :func:`attach_cges`; the weights are the model's own (nothing
    is registered on the model: the method acts through its proximal steps)."""

    name = "cges"
    reporter = CGESReport
    # lambda multiplies weight norms, not a density: the authors' 6e-5 on MNIST, ~1e-4 to 1e-3
    # at the Fashion-MNIST budgets (docs/benchmarks.md); the bisection starts at 3e-4
    spec = MethodSpec(options=CGESOptions, lambda_range=(1e-6, 1e-1))

    def __init__(
        self,
        model: nn.Module,
        layers: list[str] | None = None,
        mu: float | list[float] | None = None,
        grouping: str = "input",
        budget: str = "groups",
        group_weight: str = "sqrt",
        exclusive_prox: str = "exact",
    ) -> None:
        CGESOptions(budget, grouping, mu, group_weight, exclusive_prox)  # the same checks as a config
        modules = select_layers(model, layers, "CGES")
        names = list(modules)
        for n in names:
            if getattr(modules[n], "groups", 1) != 1:
                raise ValueError(f"layer {n!r}: grouped convolutions are not supported")
        if isinstance(mu, list):
            if len(mu) != len(names):
                raise ValueError(f"mu has {len(mu)} entries for {len(names)} layers {names}")
            mus = [float(m) for m in mu]
        elif mu is not None:
            mus = [float(mu)] * len(names)
        else:  # the authors' schedule
            mus = [max(0.0, 0.8 - 0.2 * i) for i in range(len(names))]
        self.model = model
        self.grouping = grouping
        self.budget = budget
        self.group_weight = group_weight
        self.exclusive_prox = exclusive_prox
        self._layers = [_Layer(n, modules[n], m) for n, m in zip(names, mus)]
        self._flops: list[tuple[nn.Module, float]] | None = None  # set by weight_by_flops

    # -- building ---------------------------------------------------------------------------
    @classmethod
    def from_config(
        cls, model: nn.Module, options: Any, spec: BudgetSpec, context: BuildContext
    ) -> tuple[CGES, list[Target]]:
        o = options if options is not None else CGESOptions()
        try:
            method = cls(model, o.layers, o.mu, o.grouping, o.budget, o.group_weight, o.exclusive_prox)
        except ValueError as exc:
            key = "mu" if str(exc).startswith("mu ") else "layers"
            raise ConfigError(f"{context.prefix}{key}: {exc}") from None
        if o.weighting == "flops":
            try:
                method.weight_by_flops(torch.zeros(1, *context.input_shape))
            except ValueError as exc:
                raise ConfigError(f"{context.prefix}weighting='flops': {exc}") from None
        return method, targets_from_spec(method, spec, f"{context.prefix}targets")

    def weight_by_flops(self, example: torch.Tensor) -> None:
        """Model-wise measures count the FLOPs per example the compact network keeps.

        The model must be a chain (an ``nn.Sequential`` of Linear / Conv2d layers with
        ReLU, pooling, flattening between): layer k costs ``2 x positions x kernel x (open
        inputs) x (open outputs)``, an input open when its group is not zero (a conv channel
        when any of its groups is not), an output when its row is not zero and the next layer
        reads it (the last layer's outputs are all open), an input also only when the unit it
        comes from has a weight into it. One pass over the chain: where removing units would
        leave further units unread, compaction removes more and the measure is an upper bound.
        """
        try:
            chain = parse_chain(self.model)
        except ChainError as exc:
            raise ValueError(f"FLOP weighting needs a chain of layers: {exc}") from None
        mods = [layer.module for layer in chain.layers]
        mine = {layer.module for layer in self._layers}
        if not mine <= set(mods):
            raise ValueError("FLOP weighting needs every sparsified layer in the chain")
        positions = {}
        for module, shape in layer_output_shapes(self.model, mods, example[:1]):
            positions[module] = math.prod(shape[1:-1]) if isinstance(module, nn.Linear) else math.prod(shape[2:])
        self._flops = []
        for m in mods:
            kernel = math.prod(m.weight.shape[2:]) if m.weight.dim() > 2 else 1
            self._flops.append((m, 2.0 * positions[m] * kernel))

    # -- measures ----------------------------------------------------------------------------
    def layer_names(self) -> list[str]:
        return [layer.name for layer in self._layers]

    def _select(self, layers: tuple[str, ...] | None) -> list[_Layer]:
        if layers is None:
            return self._layers
        by_name = {layer.name: layer for layer in self._layers}
        return [by_name[n] for n in layers]

    def _open_inputs(self, module: nn.Module) -> torch.Tensor:
        """Per input unit (neuron or channel) of a layer: does any of its weights survive?"""
        w = module.weight.detach()
        return w.ne(0).any(dim=0) if w.dim() == 2 else w.ne(0).flatten(2).any(dim=2).any(dim=0)

    @torch.no_grad()
    def _flop_measure(self, selected: list[_Layer]) -> torch.Tensor:
        assert self._flops is not None
        wanted = {layer.module for layer in selected}
        mods = [m for m, _ in self._flops]
        cols = [self._open_inputs(m) for m in mods]  # inputs a layer reads
        rows = [m.weight.detach().reshape(m.weight.shape[0], -1).ne(0).any(dim=1) for m in mods]  # outputs fed

        def per_unit(mask: torch.Tensor, units: int) -> torch.Tensor | None:  # a flattened channel: any feature
            return mask.view(units, -1).any(dim=1) if mask.numel() % units == 0 else None

        num = torch.zeros((), device=selected[0].weight.device, dtype=torch.float64)
        den = 0.0
        for k, (m, cost) in enumerate(self._flops):
            n_out, n_in = m.weight.shape[:2]
            inputs, outputs = cols[k], rows[k]
            if k > 0:  # an input from a unit with no weight into it is a constant: compaction folds it away
                fed = rows[k - 1]
                if n_in % fed.numel() == 0:
                    inputs = inputs & fed.repeat_interleave(n_in // fed.numel())
            if k + 1 < len(mods):  # an output nobody reads is removed
                read = per_unit(cols[k + 1], n_out)
                if read is not None:
                    outputs = outputs & read
            if m in wanted:
                num = num + cost * inputs.sum().double() * outputs.sum().double()
                den += cost * n_in * n_out
        return (num / den).float()

    @torch.no_grad()
    def _measure(self, layers: tuple[str, ...] | None) -> torch.Tensor:
        selected = self._select(layers)
        if self._flops is not None and layers is None:
            return self._flop_measure(selected)
        device = selected[0].weight.device
        num = torch.zeros((), device=device, dtype=torch.float64)
        den = 0
        for layer in selected:
            # counted through float reductions (|sign|, the largest magnitude): on the CPU they are
            # several times faster than reducing a boolean tensor, and this runs at every step
            if self.budget == "weights":
                num = num + layer.weight.detach().sign().abs_().sum(dtype=torch.float64)
            else:
                groups = to_groups(layer.weight.detach(), self.grouping)
                num = num + groups.abs().amax(dim=1).ne(0).sum() * groups.shape[1]
            den += layer.weight.numel()
        return (num / den).float()

    def measure(self, target: Target) -> tuple[None, torch.Tensor]:
        """No surrogate (the proximal steps move the weights); the exact share of non-zero
        groups or weights (FLOPs with ``weighting: flops``, model-wise)."""
        return None, self._measure(target.layers)

    def check_target(self, target: Target) -> None:
        super().check_target(target)
        if target.measure != "exact":
            raise ValueError(f"measure={target.measure!r}: CGES has no differentiable surrogate; use 'exact'")

    # -- proximal steps ----------------------------------------------------------------------
    @torch.no_grad()
    def proximal_step_(self, target: Target, strength: float) -> None:
        """Group prox (strength x mu_l x c_g), then exclusive prox (strength x (1 - mu_l)) per layer."""
        for layer in self._select(target.layers):
            w = layer.weight
            groups = to_groups(w.detach(), self.grouping)
            c = math.sqrt(groups.shape[1]) if self.group_weight == "sqrt" else 1.0
            if layer.mu > 0:
                groups = group_prox(groups, strength * layer.mu * c)
            if layer.mu < 1:
                groups = exclusive_prox(groups, strength * (1.0 - layer.mu), self.exclusive_prox == "exact")
            w.copy_(from_groups(groups, w, self.grouping))

    # -- finishing ---------------------------------------------------------------------------
    @torch.no_grad()
    def project_(self, target: Target) -> dict[str, int]:
        """Zero the groups with the smallest RMS (``budget: groups``) or the weights of smallest
        magnitude (``budget: weights``) until ``target`` holds: the fewest, by binary search."""
        selected = self._select(target.layers)
        if float(self._measure(target.layers)) <= target.epsilon:
            return {}
        candidates = []
        for layer in selected:
            if self.budget == "groups":
                groups = to_groups(layer.weight.detach(), self.grouping)
                score = groups.norm(dim=1) / math.sqrt(groups.shape[1])
            else:
                score = layer.weight.detach().abs().flatten()
            alive = score.ne(0).nonzero().squeeze(1)
            candidates.append((alive, score[alive]))
        original = [layer.weight.detach().clone() for layer in selected]

        def shut(per_layer: list[torch.Tensor]) -> None:
            for layer, w0, idx in zip(selected, original, per_layer):
                w = layer.weight
                w.copy_(w0)
                idx = idx.to(w.device)
                if self.budget == "groups":
                    groups = to_groups(w.detach(), self.grouping).clone()
                    groups[idx] = 0.0
                    w.copy_(from_groups(groups, w, self.grouping))
                else:
                    w.view(-1)[idx] = 0.0

        counts = close_fewest_(candidates, shut, lambda: float(self._measure(target.layers)) <= target.epsilon)
        return {layer.name: n for layer, n in zip(selected, counts) if n}


def attach_cges(
    model: nn.Module,
    layers: list[str] | None = None,
    mu: float | list[float] | None = None,
    grouping: str = "input",
    budget: str = "groups",
    group_weight: str = "sqrt",
    exclusive_prox: str = "exact",
) -> CGES:
    """Combined group and exclusive sparsity on ``model``'s Linear / Conv2d layers (see :class:`CGES`)."""
    return CGES(model, layers, mu, grouping, budget, group_weight, exclusive_prox)
