"""L0 regularisation with hard-concrete gates (Louizos, Welling & Kingma, ICLR 2018).

Each gate j has a location parameter ``log_alpha_j``. During training a gate is sampled
(Louizos et al. 2018, eq. 10)::

    u ~ U(0, 1)
    s = sigmoid((log u - log(1 - u) + log_alpha) / beta)
    z = clamp(s * (zeta - gamma) + gamma, 0, 1)

so that z lies in [0, 1] and equals exactly 0 or exactly 1 with positive probability. The
probability that a gate is active has a closed form (eq. 12)::

    P(z != 0) = sigmoid(log_alpha - beta * log(-gamma / zeta))

and at test time the gate is deterministic (eq. 13)::

    z_test = clamp(sigmoid(log_alpha) * (zeta - gamma) + gamma, 0, 1).

Gates attach to ordinary ``nn.Linear`` / ``nn.Conv2d`` layers through
:func:`torch.nn.utils.parametrize.register_parametrization`, so users keep their own model
class. Three structures are supported:

* ``"input"``: one gate per input neuron (a column of a linear weight, an input channel of a
  convolution); the bias is not gated.
* ``"output"``: one gate per output neuron / channel; the gate multiplies the weight rows and
  the bias, so a closed gate silences the unit entirely.
* ``"weight"``: one gate per weight entry (unstructured); the bias is not gated.

One gate sample is drawn per forward pass of the host layer, and the weight and bias
parametrizations of that layer share it. When the model that :func:`attach_l0` was given is
called, a forward pre-hook on it draws the samples of all its gates at once (one vector
computation instead of one per layer); each layer consumes its own part. A layer called on its
own draws its sample itself.

Sparsity measures (Gallego-Posada et al. 2021, constrained L0): the *expected* density is the
mean of P(z != 0), the *exact* (test-time) density is the proportion of gates with
``z_test > 0``. Model-wise measures weight every gate by the number of parameters it controls,
or, after :meth:`L0Gates.weight_by_flops`, count the (expected) FLOPs per example.

:class:`L0Gates` is the ``l0`` method of the method interface
(:class:`~constrained_sparsity.methods.base.SparsityMethod`): the expected density is the
surrogate of a target, the exact density its test-time measure.
"""

from __future__ import annotations

import math
import types
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..errors import ConfigError, OptionError
from ..graph import ChainError, bake, layer_output_shapes, observe, original_weight, parse_chain
from ..numbers import finite
from .base import (
    BudgetSpec,
    BuildContext,
    Freezable,
    MethodReport,
    MethodSpec,
    Projectable,
    SparsityMethod,
    Target,
    close_fewest_,
    targets_from_spec,
)

__all__ = [
    "GATE_STRUCTURES",
    "WEIGHTINGS",
    "HardConcreteGate",
    "L0Gates",
    "L0Options",
    "LayerReport",
    "attach_l0",
    "fold_l0",
]

GATE_STRUCTURES = ("auto", "input", "output", "weight")
WEIGHTINGS = ("params", "flops")
_GATE_ATTR = "l0_gate"


@dataclass
class L0Options:
    """Config options of the ``l0`` method (``sparsity.<key>`` when ``sparsity.method: l0``).

    ``structure``, ``droprate_init``, ``beta``, ``gamma``, ``zeta``: see :func:`attach_l0`.
    ``weighting``: what a gate weighs in the model-wise density -- the parameters it
    controls, or the FLOPs per example of the chain it switches off (a budget on compute:
    convolutions early in a network cost far more per parameter).
    """

    structure: str = "auto"
    droprate_init: float = 0.5
    beta: float = 2.0 / 3.0
    gamma: float = -0.1
    zeta: float = 1.1
    weighting: str = "params"

    def __post_init__(self) -> None:
        if self.structure not in GATE_STRUCTURES:
            raise OptionError("structure", self.structure, f"should be one of {', '.join(GATE_STRUCTURES)}")
        if not (finite(self.droprate_init) and 0.0 < self.droprate_init < 1.0):
            raise OptionError("droprate_init", self.droprate_init, "should be in (0, 1)")
        if not (finite(self.beta) and self.beta > 0):
            raise OptionError("beta", self.beta, "should be a number > 0")
        if not (finite(self.gamma) and self.gamma < 0):
            raise OptionError("gamma", self.gamma, "should be < 0")
        if not (finite(self.zeta) and self.zeta > 1):
            raise OptionError("zeta", self.zeta, "should be > 1")
        if self.weighting not in WEIGHTINGS:
            raise OptionError("weighting", self.weighting, f"should be one of {', '.join(WEIGHTINGS)}")


class HardConcreteGate(nn.Module):
    r"""A vector of hard-concrete gates (Louizos et al. 2018, §4).

    Args:
        num_gates: number of gates.
        droprate_init: initial probability of dropping a gate; ``log_alpha`` is initialised
            around ``log(1 - droprate_init) - log(droprate_init)`` (std 0.01), as in the
            reference implementation.
        beta: temperature of the concrete distribution (2/3 in the paper).
        gamma, zeta: stretch interval (gamma < 0 < 1 < zeta), -0.1 and 1.1 in the paper.
    """

    def __init__(
        self,
        num_gates: int,
        droprate_init: float = 0.5,
        beta: float = 2.0 / 3.0,
        gamma: float = -0.1,
        zeta: float = 1.1,
    ) -> None:
        super().__init__()
        if num_gates <= 0:
            raise ValueError(f"num_gates={num_gates} should be a positive integer")
        if not (finite(droprate_init) and 0.0 < droprate_init < 1.0):
            raise ValueError(f"droprate_init={droprate_init} should be in (0, 1)")
        if not (finite(beta) and beta > 0):
            raise ValueError(f"beta={beta} should be a finite number > 0")
        if not (finite(gamma) and finite(zeta) and gamma < 0.0 and zeta > 1.0):
            raise ValueError(f"gamma={gamma}, zeta={zeta}: need finite gamma < 0 and zeta > 1")
        self.beta = float(beta)
        self.gamma = float(gamma)
        self.zeta = float(zeta)
        mean = math.log(1.0 - droprate_init) - math.log(droprate_init)
        self.log_alpha = nn.Parameter(torch.empty(num_gates).normal_(mean, 1e-2))
        self._sample: torch.Tensor | None = None
        self._pending: tuple[torch.Tensor, torch.Tensor, int] | None = None
        self.frozen = False  # set by L0Gates.freeze_: test-time gates in training mode too

    @property
    def sampling(self) -> bool:
        """Whether a forward pass draws a gate sample: in training mode, unless frozen."""
        return self.training and not self.frozen

    def closed_value(self) -> float:
        """A ``log_alpha`` whose test-time gate is exactly 0 (well under logit(-gamma / (zeta - gamma)))."""
        threshold = -self.gamma / (self.zeta - self.gamma)
        return math.log(threshold) - math.log1p(-threshold) - 10.0

    @property
    def num_gates(self) -> int:
        return self.log_alpha.numel()

    def extra_repr(self) -> str:
        return f"num_gates={self.num_gates}, beta={self.beta:.4g}, gamma={self.gamma}, zeta={self.zeta}"

    # -- distribution ---------------------------------------------------------------------
    def prob_nonzero(self) -> torch.Tensor:
        """P(z != 0) = sigmoid(log_alpha - beta log(-gamma/zeta)), differentiable (eq. 12)."""
        return torch.sigmoid(self.log_alpha - self.beta * math.log(-self.gamma / self.zeta))

    def sample(self, generator: torch.Generator | None = None, u: torch.Tensor | None = None) -> torch.Tensor:
        """Draw one reparametrised gate sample z in [0, 1] (eq. 10), differentiable by autograd.

        ``u`` (uniform noise, one value per gate) is drawn unless given.
        """
        eps = 1e-6
        if u is None:
            u = torch.rand(
                self.log_alpha.shape, generator=generator, device=self.log_alpha.device, dtype=self.log_alpha.dtype
            )
        u = u.clamp(eps, 1.0 - eps)
        s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + self.log_alpha) / self.beta)
        return torch.clamp(s * (self.zeta - self.gamma) + self.gamma, 0.0, 1.0)

    def deterministic(self) -> torch.Tensor:
        """Test-time gate clamp(sigmoid(log_alpha)(zeta - gamma) + gamma, 0, 1) (eq. 13)."""
        return torch.clamp(torch.sigmoid(self.log_alpha) * (self.zeta - self.gamma) + self.gamma, 0.0, 1.0)

    @torch.no_grad()
    def active(self) -> torch.Tensor:
        """Boolean mask of gates that are non-zero at test time."""
        return self.deterministic() > 0

    @torch.no_grad()
    def sample_with_derivative(self, u: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One sample z (as :meth:`sample`, no autograd) and ``dz/dlog_alpha`` elementwise."""
        return _sample_with_derivative(self.log_alpha, self.beta, self.gamma, self.zeta, u)

    def __getstate__(self) -> dict:
        # The cached sample belongs to one forward pass (a non-leaf tensor): never copy it.
        state = self.__dict__.copy()
        state["_sample"] = None
        state["_pending"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        state.setdefault("_pending", None)  # modules pickled before it existed
        state.setdefault("frozen", False)
        super().__setstate__(state)

    # -- one sample per forward pass -------------------------------------------------------
    def _take(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The sample drawn ahead for this forward pass (by the model's hook), else a new one.

        A sample drawn ahead is used once, and only if ``log_alpha`` has not changed since.
        """
        pending, self._pending = self._pending, None
        if pending is not None and pending[2] == self.log_alpha._version:
            return pending[0], pending[1]
        return self.sample_with_derivative()

    def resample(self) -> None:
        z, dz = self._take()
        self._sample = _GateSample.apply(self.log_alpha, z, dz)

    def forward(self) -> torch.Tensor:
        """Current gate values: the sample of this forward pass in training mode, else z_test."""
        if not self.sampling:
            return self.deterministic()
        if self._sample is None:
            self.resample()
        assert self._sample is not None
        return self._sample


@torch.no_grad()
def _sample_with_derivative(
    log_alpha: torch.Tensor, beta: float, gamma: float, zeta: float, u: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """A gate sample z (eq. 10) and ``dz/dlog_alpha``, elementwise, without autograd.

    ``dz/dlog_alpha = (zeta - gamma) s (1 - s) / beta`` where the clamp is inactive, else 0.
    Where the clamp is exactly at a bound it counts as inactive, as in autograd's ``clamp``.
    Few operations (they run every step on every gate): each costs about the same whatever
    the size of the vector.
    """
    if u is None:
        u = torch.rand(log_alpha.shape, device=log_alpha.device, dtype=log_alpha.dtype)
    s = torch.logit(u, eps=1e-6).add_(log_alpha).mul_(1.0 / beta).sigmoid_()
    span = zeta - gamma
    raw = s.mul(span).add_(gamma)
    z = raw.clamp(0.0, 1.0)
    dz = torch.addcmul(s, s, s, value=-1.0).mul_(span / beta).mul_(z == raw)
    return z, dz


class _GateSample(torch.autograd.Function):
    """``z`` as a differentiable function of ``log_alpha``, with ``dz/dlog_alpha`` given.

    One autograd node instead of the seven of the sampling formula.
    """

    @staticmethod
    def forward(ctx, log_alpha, z, dz):  # type: ignore[override]
        ctx.save_for_backward(dz)
        return z

    @staticmethod
    def backward(ctx, grad_z):  # type: ignore[override]
        (dz,) = ctx.saved_tensors
        return grad_z * dz, None, None


class _Densities(torch.autograd.Function):
    """Expected and exact (test-time) density of a set of gates from one pass over their ``log_alpha``.

    ``weights[j]`` is gate j's share of the parameters. Expected density
    ``sum_j w_j sigmoid(log_alpha_j - beta log(-gamma / zeta))`` (eq. 12), differentiable;
    exact density ``sum_j w_j [z_test_j > 0]`` (eq. 13, the test of :meth:`HardConcreteGate.active`),
    not differentiable.
    """

    @staticmethod
    def forward(ctx, weights, gate, *log_alphas):  # type: ignore[override]
        log_alpha = torch.cat(log_alphas) if len(log_alphas) > 1 else log_alphas[0]
        p = torch.sigmoid(log_alpha - gate.beta * math.log(-gate.gamma / gate.zeta))
        expected = p @ weights
        # the same test as active(): clamp(v, 0, 1) > 0 exactly when v > 0
        active = torch.sigmoid(log_alpha).mul_(gate.zeta - gate.gamma).add_(gate.gamma) > 0
        exact = active.to(weights.dtype) @ weights
        ctx.mark_non_differentiable(exact)
        if any(ctx.needs_input_grad[2:]):
            ctx.save_for_backward(torch.addcmul(p, p, p, value=-1.0).mul_(weights))  # dp/dlog_alpha * w
            ctx.sizes = [t.numel() for t in log_alphas]
        return expected, exact

    @staticmethod
    def backward(ctx, grad_expected, grad_exact):  # type: ignore[override]
        (dp,) = ctx.saved_tensors
        grads = (dp * grad_expected).split(ctx.sizes)
        return (None, None, *(g if need else None for g, need in zip(grads, ctx.needs_input_grad[2:])))


def _one_vector(gates: Sequence[HardConcreteGate]) -> bool:
    """Whether ``gates`` can be computed on as one concatenated vector: same constants, dtype, device."""

    def key(g: HardConcreteGate) -> tuple:
        return (g.beta, g.gamma, g.zeta, g.log_alpha.dtype, g.log_alpha.device)

    return all(key(g) == key(gates[0]) for g in gates)


class _DrawSamples:
    """Forward pre-hook of the model :func:`attach_l0` was given: draws every gate's sample at once.

    Holds the gate modules themselves, so a deep copy of the model (which copies its hooks)
    draws for the copy's gates. Folding (:func:`~constrained_sparsity.graph.bake`) drops it.
    """

    sparsity_hook = True

    def __init__(self, gates: list[HardConcreteGate]) -> None:
        self.gates = gates
        self.flat = _one_vector(gates)

    def __call__(self, module: nn.Module, args: object) -> None:
        gates = [g for g in self.gates if g.sampling]
        if len(gates) < 2 or not self.flat:
            return  # each layer draws its own
        with torch.no_grad():
            log_alpha = torch.cat([g.log_alpha for g in gates])
            first = gates[0]
            z, dz = _sample_with_derivative(log_alpha, first.beta, first.gamma, first.zeta)
            sizes = [g.num_gates for g in gates]
            for g, zg, dzg in zip(gates, z.split(sizes), dz.split(sizes)):
                g._pending = (zg, dzg, g.log_alpha._version)


class _GateMultiply(nn.Module):
    """Parametrization ``X -> X * z`` with z broadcast to X's shape.

    The gate is held outside the module registry (it is registered once, on the host layer),
    so its ``log_alpha`` appears once in ``state_dict`` and ``parameters()``.
    """

    def __init__(self, gate: HardConcreteGate, view_shape: Sequence[int]) -> None:
        super().__init__()
        self.__dict__["gate"] = gate
        self.view_shape = tuple(view_shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate().view(self.view_shape)


_SKIP_MIN_WEIGHTS = 65536  # smaller weights: multiply by z, skip nothing
_SKIP_MAX_OPEN = 0.8  # skip columns only when at most this fraction is open


class _InputGatedLinear(torch.autograd.Function):
    """``linear(x * z, W, b)`` with ``z`` a gate sample, on the columns where ``z != 0`` only.

    Equal in value and gradients to the parametrized layer ``linear(x, W * z(log_alpha), b)``,
    but one autograd node instead of about fifteen small ones, and cheaper as the layer gets
    sparser: a column with ``z_j = 0`` contributes nothing to the output, receives a zero
    weight gradient (``dW = G * z``), and its gate gets no gradient either, because a
    hard-concrete gate is exactly 0 only where the clamp is active (``dz/dlog_alpha = 0``).
    ``dz`` is ``dz/dlog_alpha`` of the sample (0 where clamped), computed with it.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, log_alpha, z, dz):  # type: ignore[override]
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        # Gathering the open columns and scattering their gradients back costs a few passes
        # over the weight: worth it only for large layers with enough closed columns.
        full = weight.numel() < _SKIP_MIN_WEIGHTS
        if not full:
            idx = torch.nonzero(z).squeeze(1)
            full = idx.numel() > _SKIP_MAX_OPEN * z.numel()
        if full:
            idx = z.new_empty(0, dtype=torch.long)
            x_s, z_s, dz_s, w_s = x2, z, dz, weight
        else:
            x_s, z_s, dz_s = x2.index_select(1, idx), z.index_select(0, idx), dz.index_select(0, idx)
            w_s = weight.index_select(1, idx)
        w_eff = w_s * z_s
        out = torch.nn.functional.linear(x_s, w_eff, bias)
        ctx.save_for_backward(x_s, z_s, dz_s, w_s, w_eff, idx)
        ctx.full = full
        ctx.shapes = (x2.shape, weight.shape, z.shape)
        ctx.has_bias = bias is not None
        return out.reshape(*lead, out.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        x_s, z_s, dz_s, w_s, w_eff, idx = ctx.saved_tensors
        x_shape, w_shape, z_shape = ctx.shapes
        full = ctx.full
        g = grad_out.reshape(-1, grad_out.shape[-1])
        grad_x = grad_w = grad_b = grad_la = None
        if ctx.needs_input_grad[0]:
            gx = g @ w_eff
            grad_x = gx if full else g.new_zeros(x_shape).index_copy_(1, idx, gx)
            grad_x = grad_x.reshape(*grad_out.shape[:-1], x_shape[1])
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[3]:
            m = g.t() @ x_s  # gradient of the gated weight, active columns only
            if ctx.needs_input_grad[1]:
                gw = m * z_s
                grad_w = gw if full else m.new_zeros(w_shape).index_copy_(1, idx, gw)
            if ctx.needs_input_grad[3]:
                gla = (m * w_s).sum(0).mul_(dz_s)
                grad_la = gla if full else m.new_zeros(z_shape).index_copy_(0, idx, gla)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = g.sum(0)
        return grad_x, grad_w, grad_b, grad_la, None, None


def _input_gated_linear_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    # Bound as the instance's ``forward`` by attach_l0 (fast=True). In training mode the
    # gate sample and its derivative are drawn here, without autograd, and the gated matrix
    # product is one autograd node; ``self.weight`` (the parametrization) stays the public
    # gated weight. In eval mode the parametrized path is used.
    gate: HardConcreteGate = getattr(self, _GATE_ATTR)
    if not gate.sampling:
        return nn.functional.linear(x, self.weight, self.bias)
    z, dz = gate._take()
    gate._sample = z
    return _InputGatedLinear.apply(x, self.parametrizations.weight.original, self.bias, gate.log_alpha, z, dz)


def _resample_hook(module: nn.Module, args: object) -> None:
    gate = getattr(module, _GATE_ATTR)
    if gate.sampling:
        gate.resample()


@dataclass(frozen=True)
class LayerReport:
    """Per-layer state of the gates at test time."""

    name: str
    structure: str
    gates: int
    active_gates: int
    params_per_gate: int
    expected_density: float
    exact_density: float

    @property
    def params(self) -> int:
        return self.gates * self.params_per_gate

    @property
    def active_params(self) -> int:
        return self.active_gates * self.params_per_gate


@dataclass
class _GatedLayer:
    name: str
    module: nn.Module
    gate: HardConcreteGate
    structure: str
    params_per_gate: int
    hook: torch.utils.hooks.RemovableHandle | None  # the resampling pre-hook; None: the fast forward samples
    cost_per_gate: float = 0.0  # what a gate weighs in model-wise measures; params_per_gate unless set

    def __post_init__(self) -> None:
        self.cost_per_gate = self.cost_per_gate or float(self.params_per_gate)


def _resolve_structure(module: nn.Module, structure: str, name: str) -> str:
    if structure not in GATE_STRUCTURES:
        raise ValueError(f"structure={structure!r} for layer {name!r} should be one of {GATE_STRUCTURES}")
    if structure == "auto":
        return "input" if isinstance(module, nn.Linear) else "output"
    return structure


def _gate_layout(module: nn.Module, structure: str, name: str) -> tuple[int, int, tuple[int, ...], bool]:
    """Return (num_gates, params_per_gate, weight view shape, gates_bias)."""
    weight = module.weight
    extra = (1,) * (weight.dim() - 2)
    out_dim, in_dim = weight.shape[0], weight.shape[1]
    receptive = int(math.prod(weight.shape[2:]))
    has_bias = getattr(module, "bias", None) is not None
    if structure == "input":
        if getattr(module, "groups", 1) != 1:
            raise ValueError(f"layer {name!r}: input gates need groups=1")
        return in_dim, out_dim * receptive, (1, in_dim, *extra), False
    if structure == "output":
        return out_dim, in_dim * receptive + int(has_bias), (out_dim, 1, *extra), has_bias
    return weight.numel(), 1, tuple(weight.shape), False


def _active_float(gate: HardConcreteGate) -> torch.Tensor:
    return gate.active().to(gate.log_alpha.dtype)


@dataclass
class _Side:
    """The input or output units of a layer, in blocks of ``per`` units that open and close
    together; a block is open when all its gate factors are.

    A factor ``(gate, mode, per)`` says which gates open block ``u``: ``"same"`` gate ``u``;
    ``"any"`` any of gates ``u * per .. u * per + per - 1`` (the inputs of the next layer that
    read the unit, or a flattened channel's inputs of this layer).
    """

    size: int
    per: int = 1
    factors: list[tuple[HardConcreteGate, str, int]] = field(default_factory=list)

    def open(
        self, cache: dict[HardConcreteGate, torch.Tensor], value: Callable[[HardConcreteGate], torch.Tensor]
    ) -> torch.Tensor | float:
        """Expected number of open units, for gates open with probability ``value(gate)``."""
        if not self.factors:
            return float(self.size)
        total: torch.Tensor | None = None
        for gate, mode, per in self.factors:
            if gate not in cache:
                cache[gate] = value(gate)
            v = cache[gate]
            if mode == "any":
                v = 1.0 - torch.prod(1.0 - v.view(-1, per), dim=1)
            total = v if total is None else total * v
        assert total is not None
        return total.sum() * self.per


@dataclass
class _FlopTerm:
    """One gated layer of a chain: ``cost`` FLOPs per (open input, open output) pair."""

    name: str
    cost: float
    inputs: _Side
    outputs: _Side


def _flop_terms(model: nn.Module, layers: list[_GatedLayer], positions: dict[nn.Module, int]) -> list[_FlopTerm] | str:
    """The expected-FLOP terms of a chain of layers, or why ``model`` is not one."""
    try:
        chain = [layer.module for layer in parse_chain(model).layers]
    except ChainError as exc:
        return str(exc)
    gated = {layer.module: layer for layer in layers}
    for layer in layers:
        if layer.module not in chain:
            return f"gated layer {layer.name!r} is not a child of the model"
        if layer.structure == "weight":
            return f"layer {layer.name!r} has per-weight gates"
    shapes = [tuple(original_weight(m).shape) for m in chain]
    for k in range(1, len(chain)):
        (out_prev, *_), (_, in_next, *_) = shapes[k - 1], shapes[k]
        conv_to_linear = isinstance(chain[k - 1], nn.Conv2d) and isinstance(chain[k], nn.Linear)
        if isinstance(chain[k - 1], nn.Linear) and isinstance(chain[k], nn.Conv2d):
            return "a linear layer feeds a convolution"
        if (in_next % out_prev) if conv_to_linear else (in_next != out_prev):
            return f"layers {k - 1} and {k} of the chain do not connect ({out_prev} outputs, {in_next} inputs)"
    terms = []
    for k, m in enumerate(chain):
        layer = gated.get(m)
        if layer is None:
            continue  # only gated layers enter the measure
        n_out, n_in, *kernel = shapes[k]
        per_in = n_in // shapes[k - 1][0] if k > 0 else 1  # > 1: a flattened convolution's channels
        inputs, outputs = _Side(n_in, per_in), _Side(n_out)
        if layer.structure == "input":  # within a flattened channel, compaction keeps all or none
            inputs.factors.append((layer.gate, "any" if per_in > 1 else "same", per_in))
        else:
            outputs.factors.append((layer.gate, "same", 1))
        prev = gated.get(chain[k - 1]) if k > 0 else None
        if prev is not None and prev.structure == "output":
            inputs.factors.append((prev.gate, "same", 1))
        nxt = gated.get(chain[k + 1]) if k + 1 < len(chain) else None
        if nxt is not None and nxt.structure == "input":
            per = shapes[k + 1][1] // n_out
            outputs.factors.append((nxt.gate, "any" if per > 1 else "same", per))
        terms.append(_FlopTerm(layer.name, 2.0 * positions[m] * math.prod(kernel), inputs, outputs))
    return terms


@torch.no_grad()
def flop_weighting(
    layers: list[_GatedLayer], model: nn.Module, example: torch.Tensor
) -> tuple[dict[str, float], list[_FlopTerm] | None]:
    """How :meth:`L0Gates.weight_by_flops` weighs the gates of ``layers``: FLOPs per example.

    One forward pass of ``example`` (a batch of one, in eval mode) gives each gated
    layer's output size. FLOPs are ``2 x`` the multiply-adds of the gated layers.

    When ``model`` is a chain -- an ``nn.Sequential`` whose children are ``Linear`` /
    ``Conv2d`` layers (groups 1) with only ReLU, max-pooling, flattening, dropout or
    identity between them, gated per input or output unit -- the measures are the
    **expected FLOPs** of the gated layers over their dense FLOPs, in closed form,
    counting the units that :func:`~constrained_sparsity.compact.compact` keeps (with
    ``select_inputs``, as ``csparse compact`` runs it: a first linear layer loses its
    closed inputs). A
    layer multiplies its open inputs by its open outputs:

    * an input is open when its own input gate and the previous layer's output gate on
      it are open;
    * an output is open when its own output gate is open and the next layer reads it
      through at least one open input gate;
    * the inputs of a linear layer that a flattened convolution feeds open and close by
      channel (compaction removes whole channels): all of a channel's inputs are open
      when the channel's gate and at least one of their input gates are.

    Layer ``l`` with ``a_i`` the indicator of open input ``i``, ``b_o`` of open output
    ``o``, ``k_l`` = 2 x positions x kernel size::

        FLOPs_l = k_l * (sum_i a_i) * (sum_o b_o)

    Input and output sides depend on disjoint sets of independent gates, so
    ``E[FLOPs_l] = k_l * (sum_i E a_i) * (sum_o E b_o)``, each ``E a_i``, ``E b_o`` a
    product of ``P(z != 0)`` and of ``1 - prod(1 - P(z != 0))`` ("at least one open").
    The exact measure puts the test-time gates in the same formula: the FLOPs of the
    compact network's layers, unless every input of some layer is closed. Compaction
    then folds that layer's constant outputs into the next layer's bias and drops the
    next layer's inputs too, which the measure still counts: it is an upper bound.

    Any other model (or per-weight gates) falls back, with a warning, to a linear
    proxy: each gate weighs the FLOPs of its own layer that it switches off (a linear
    input neuron ``out_features`` multiply-adds per position, a conv output channel
    ``in * kh * kw`` per output pixel, ...), which counts the work of a unit whose
    neighbour is closed as if it were still done.

    Returns the linear proxy's cost per gate of every layer (set on the layers too) and the
    chain's terms (None: not a chain).
    """
    positions: dict[nn.Module, int] = {}  # output positions per example, of the last call
    for module, shape in layer_output_shapes(model, [layer.module for layer in layers], example[:1]):
        positions[module] = math.prod(shape[1:-1]) if isinstance(module, nn.Linear) else math.prod(shape[2:])
    costs = {}
    for layer in layers:
        if layer.module not in positions:
            raise ValueError(f"layer {layer.name!r} was not called by the model's forward pass")
        w = original_weight(layer.module)
        per_output = w[0].numel()  # multiply-adds of one output value (in/groups * kh * kw)
        if layer.structure == "input":
            cost = w.shape[0] * per_output / w.shape[1]
        elif layer.structure == "output":
            cost = per_output
        else:
            cost = 1
        layer.cost_per_gate = 2.0 * cost * positions[layer.module]
        costs[layer.name] = layer.cost_per_gate
    terms = _flop_terms(model, layers, positions)
    if isinstance(terms, str):
        warnings.warn(
            f"FLOP weighting: {terms}; the measures weight each gate by the FLOPs of its own layer "
            "(a linear proxy) instead of counting the expected FLOPs of a chain of layers",
            stacklevel=2,
        )
        terms = None
    return costs, terms


def _flop_densities(
    selected: list[_GatedLayer], flop_terms: list[_FlopTerm] | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Expected and exact FLOP densities of the chain's ``flop_terms`` of the ``selected`` layers."""
    names = {layer.name for layer in selected}
    terms = [t for t in flop_terms or () if t.name in names]
    probs: dict[HardConcreteGate, torch.Tensor] = {}
    actives: dict[HardConcreteGate, torch.Tensor] = {}
    first = selected[0].gate.log_alpha
    num = first.new_zeros(())
    with torch.no_grad():
        act = first.new_zeros(())
    den = 0.0
    for t in terms:
        num = num + t.cost * t.inputs.open(probs, HardConcreteGate.prob_nonzero) * t.outputs.open(
            probs, HardConcreteGate.prob_nonzero
        )
        with torch.no_grad():
            act += t.cost * t.inputs.open(actives, _active_float) * t.outputs.open(actives, _active_float)
        den += t.cost * t.inputs.size * t.outputs.size
    return num / den, act / den


class L0Report(MethodReport):
    """What :class:`L0Gates` logs and reports: exact and expected density per layer and model-wise."""

    @torch.no_grad()
    def metrics(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for row in self.method.report():
            out[f"density/{row.name}"] = row.exact_density
            out[f"density_expected/{row.name}"] = row.expected_density
        expected, exact = self.method.densities()
        out["density/model"] = float(exact)
        out["density_expected/model"] = float(expected)
        return out

    def measure_key(self, target: Target) -> str | None:
        if target.layers is None:
            return "density/model"
        return f"density/{target.layers[0]}" if len(target.layers) == 1 else None

    def rows(self) -> list[dict[str, Any]]:
        return [
            {
                "name": row.name,
                "structure": row.structure,
                "gates": row.gates,
                "active_gates": row.active_gates,
                "params": row.params,
                "active_params": row.active_params,
                "exact_density": row.exact_density,
                "expected_density": row.expected_density,
                "value": row.exact_density,
                "weighting": self.method.weighting,
            }
            for row in self.method.report()
        ]

    def describe(self, target: Target, surrogate: float | None, exact: float) -> dict[str, Any]:
        return {"epsilon": target.epsilon, "exact_density": exact, "expected_density": surrogate}

    @classmethod
    def format_target(cls, entry: dict[str, Any]) -> str:
        measured = entry["exact_density"] if entry["measure"] == "exact" else entry["expected_density"]
        return f"{entry['measure']} density {measured:.4f} <= {entry['epsilon']:.4f}?"

    @classmethod
    def format_rows(
        cls, rows: list[dict[str, Any]], targets: list[dict[str, Any]], measures: dict[str, Any]
    ) -> list[str]:
        """The gates per layer and model-wise: gates, active gates, exact and expected density, budget."""
        if not rows:
            return []
        by_layer = {t["layers"][0]: t for t in targets if isinstance(t["layers"], list) and len(t["layers"]) == 1}
        lines = [f"{'layer':<12}{'gates':>8}{'active':>8}{'density':>10}{'expected':>10}{'target':>8}"]
        for row in rows:
            target = by_layer.get(row["name"])
            eps = f"{target['epsilon']:.3f}" if target else "-"
            lines.append(
                f"{row['name']:<12}{row['gates']:>8}{row['active_gates']:>8}"
                f"{row['exact_density']:>10.3f}{row['expected_density']:>10.3f}{eps:>8}"
            )
        model_target = next((t for t in targets if t["layers"] == "model"), None)
        eps = f"{model_target['epsilon']:.3f}" if model_target else "-"
        params = sum(r["params"] for r in rows)
        active = sum(r["active_params"] for r in rows)
        weighting = rows[0].get("weighting", "params")
        lines.append(
            f"{'model':<12}{params:>8}{active:>8}"
            f"{measures['density/model']:>10.3f}{measures['density_expected/model']:>10.3f}{eps:>8}   "
            + ("(parameters)" if weighting == "params" else "(densities weighted by FLOPs, counts in parameters)")
        )
        return lines


class L0Gates(Projectable, Freezable, SparsityMethod):
    """The L0 gates attached to a model, with their sparsity measures: the ``l0`` method.

    Built by :func:`attach_l0`. Layer names are the model's ``named_modules`` names.
    """

    name = "l0"
    spec = MethodSpec(options=L0Options, equality=True)
    reporter = L0Report

    def __init__(self, layers: list[_GatedLayer]) -> None:
        if not layers:
            raise ValueError("no layer was gated: pass at least one nn.Linear / nn.Conv2d layer")
        self._layers = layers
        self._weights: dict[tuple, torch.Tensor] = {}  # per selection: k_j / sum k, one per gate
        self._draw_hook: torch.utils.hooks.RemovableHandle | None = None  # set by attach_l0
        self._weighting = "params"
        self._flop_terms: list[_FlopTerm] | None = None  # set by weight_by_flops on a chain

    # -- introspection ---------------------------------------------------------------------
    def layer_names(self) -> list[str]:
        return [layer.name for layer in self._layers]

    def __len__(self) -> int:
        return len(self._layers)

    def named_gates(self) -> Iterator[tuple[str, HardConcreteGate]]:
        for layer in self._layers:
            yield layer.name, layer.gate

    def parameters(self) -> Iterator[nn.Parameter]:
        """The gate parameters (``log_alpha`` of every gated layer)."""
        for layer in self._layers:
            yield layer.gate.log_alpha

    def _select(self, layers: Iterable[str] | None) -> list[_GatedLayer]:
        if layers is None:
            return self._layers
        wanted = list(layers)
        by_name = {layer.name: layer for layer in self._layers}
        unknown = [n for n in wanted if n not in by_name]
        if unknown:
            raise ValueError(f"layers={unknown} are not gated; gated layers are {self.layer_names()}")
        return [by_name[n] for n in wanted]

    @property
    def weighting(self) -> str:
        """What model-wise measures weight each gate by: ``"params"`` or ``"flops"``."""
        return self._weighting

    @torch.no_grad()
    def weight_by_flops(self, model: nn.Module, example: torch.Tensor) -> dict[str, float]:
        """Make model-wise measures count FLOPs per example instead of parameters (see
        :func:`flop_weighting`). Returns the linear proxy's cost per gate of every layer."""
        costs, terms = flop_weighting(self._layers, model, example)
        self._flop_terms = terms
        self._weighting = "flops"
        self._weights.clear()
        return costs

    # -- measures --------------------------------------------------------------------------
    def expected_density(self, layers: Iterable[str] | None = None) -> torch.Tensor:
        """Expected proportion of active parameters, sum_j k_j P(z_j != 0) / sum_j k_j.

        k_j is the number of parameters gate j controls (its FLOPs after
        :meth:`weight_by_flops`); over one layer this is the mean of P(z != 0).
        Differentiable with respect to ``log_alpha``.
        """
        return self.densities(layers)[0]

    @torch.no_grad()
    def exact_density(self, layers: Iterable[str] | None = None) -> torch.Tensor:
        """Proportion of parameters whose test-time gate is non-zero (no gradient)."""
        return self.densities(layers)[1]

    def densities(self, layers: Iterable[str] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(expected_density, exact_density)`` of the selected gates, computed together.

        The measures run at every training step: one pass over all the gates (a handful of
        tensor operations and one autograd node) instead of a handful per layer and measure.
        """
        selected = self._select(layers)
        if self._flop_terms is not None:
            return _flop_densities(selected, self._flop_terms)
        first = selected[0].gate
        if not _one_vector([g.gate for g in selected]):
            num = sum(layer.gate.prob_nonzero().sum() * layer.cost_per_gate for layer in selected)
            with torch.no_grad():
                active = sum(layer.gate.active().sum() * layer.cost_per_gate for layer in selected)
            den = sum(layer.gate.num_gates * layer.cost_per_gate for layer in selected)
            return num / den, active.to(num.dtype) / den  # type: ignore[union-attr, return-value]
        log_alphas = [g.gate.log_alpha for g in selected]
        key = (tuple(g.name for g in selected), log_alphas[0].dtype, log_alphas[0].device)
        weights = self._weights.get(key)
        if weights is None:
            counts = torch.cat(
                [torch.full((g.gate.num_gates,), g.cost_per_gate, dtype=torch.float64) for g in selected]
            )
            weights = (counts / counts.sum()).to(log_alphas[0].dtype).to(log_alphas[0].device)
            self._weights[key] = weights
        return _Densities.apply(weights, first, *log_alphas)

    @torch.no_grad()
    def report(self) -> list[LayerReport]:
        rows = []
        for layer in self._layers:
            active = int(layer.gate.active().sum())
            rows.append(
                LayerReport(
                    name=layer.name,
                    structure=layer.structure,
                    gates=layer.gate.num_gates,
                    active_gates=active,
                    params_per_gate=layer.params_per_gate,
                    expected_density=float(layer.gate.prob_nonzero().mean()),
                    exact_density=active / layer.gate.num_gates,
                )
            )
        return rows

    # -- finishing: a fixed pattern, projected onto the budget ---------------------------
    def freeze_(self) -> None:
        """Fix every gate at its test-time value, also in training mode; ``log_alpha`` stops training."""
        for layer in self._layers:
            layer.gate.frozen = True
            layer.gate.log_alpha.requires_grad_(False)
            layer.gate._sample = None
            layer.gate._pending = None

    @torch.no_grad()
    def project_(self, target: Target) -> dict[str, int]:
        """Close the open gates with the lowest keep-probability P(z != 0) until ``target`` holds.

        The fewest such gates: the measure never grows when a gate closes, so a binary search
        over how many of the sorted gates to close finds the smallest number that meets the
        budget (exactly the measure of the target: model-wise, per layer or FLOP-weighted).
        Returns how many gates were closed in each layer.
        """
        selected = self._select(target.layers)

        def value() -> float:
            expected, exact = self.densities(target.layers)
            return float(expected if target.measure == "expected" else exact)

        counts = close_least_likely_([layer.gate for layer in selected], value, target.epsilon)
        return {layer.name: n for layer, n in zip(selected, counts) if n}

    # -- the method interface ------------------------------------------------------------
    @classmethod
    def from_config(
        cls, model: nn.Module, options: Any, spec: BudgetSpec, context: BuildContext
    ) -> tuple[L0Gates, list[Target]]:
        o = options if options is not None else L0Options()
        example = torch.zeros(1, *context.input_shape, device=next(model.parameters()).device)
        try:
            gates = attach_l0(
                model,
                structure=o.structure,
                droprate_init=o.droprate_init,
                beta=o.beta,
                gamma=o.gamma,
                zeta=o.zeta,
                example=example,
            )
        except ValueError as exc:
            raise ConfigError(f"{context.prefix}method=l0: {exc}") from None
        try:
            parse_chain(model)
        except ChainError:
            warnings.warn(
                "l0 gates one layer's channels or neurons: on a network that is not a chain (BatchNorm, residual "
                "adds) its density is not the deployable network's and compaction removes no unit; l0_units gates "
                "the units of the dependency graph and counts the compact network",
                stacklevel=2,
            )
        if o.weighting == "flops":
            gates.weight_by_flops(model, torch.zeros(1, *context.input_shape))
        return gates, targets_from_spec(gates, spec, f"{context.prefix}targets")

    def measure(self, target: Target) -> tuple[torch.Tensor, torch.Tensor]:
        """``(expected density, exact density)`` of the target's layers (the whole model if none)."""
        return self.densities(target.layers)

    def detach(self, leave_parametrized: bool = True) -> None:
        """Remove the gates. With ``leave_parametrized`` the weights keep their test-time gating."""
        for layer in self._layers:
            layer.gate.eval()
            for tensor_name in ("weight", "bias"):
                if parametrize.is_parametrized(layer.module, tensor_name):
                    parametrize.remove_parametrizations(
                        layer.module, tensor_name, leave_parametrized=leave_parametrized
                    )
            if layer.hook is not None:
                layer.hook.remove()
            layer.module.__dict__.pop("forward", None)
            delattr(layer.module, _GATE_ATTR)
        if self._draw_hook is not None:
            self._draw_hook.remove()
            self._draw_hook = None
        self._layers = []


LayerSpec = Sequence[str] | Mapping[str, str] | None


def attach_l0(
    model: nn.Module,
    layers: LayerSpec = None,
    structure: str = "auto",
    droprate_init: float = 0.5,
    beta: float = 2.0 / 3.0,
    gamma: float = -0.1,
    zeta: float = 1.1,
    fast: bool = True,
    example: torch.Tensor | None = None,
) -> L0Gates:
    """Attach hard-concrete L0 gates to layers of ``model``.

    Args:
        model: any module.
        layers: names (from ``model.named_modules()``) of the ``nn.Linear`` / ``nn.Conv2d``
            layers to gate, a mapping name -> structure, or ``None`` for every such layer.
        structure: ``"input"``, ``"output"``, ``"weight"`` or ``"auto"`` (input-neuron gates
            for linear layers, output-channel gates for convolutions, as in Louizos et al.).
        droprate_init, beta, gamma, zeta: see :class:`HardConcreteGate`.
        fast: for input-gated ``nn.Linear`` layers, compute the forward and backward pass on
            the columns whose gate is non-zero only (same values and gradients as the
            parametrized weight; training gets faster as the layer gets sparser).
        example: one batch of inputs: a forward pass in eval mode (no gradient, no random
            draw) checks that every chosen layer is *called* by the model, since a gate acts
            where the layer runs. Without it only the layers of ``nn.MultiheadAttention`` (which
            reads its ``out_proj`` weight and never calls it) are refused.

    Raises:
        ValueError: a layer the model never calls (one line naming it), an unknown layer.

    Returns:
        The :class:`L0Gates` handle, in the order the layers appear in the model.
    """
    modules = dict(model.named_modules())
    if layers is None:
        chosen = {n: structure for n, m in modules.items() if isinstance(m, (nn.Linear, nn.Conv2d))}
    elif isinstance(layers, Mapping):
        chosen = dict(layers)
    else:
        chosen = {n: structure for n in layers}
    _check_reached(model, chosen, example)
    gated: list[_GatedLayer] = []
    for name, module in modules.items():  # model order, whatever order the user gave
        if name not in chosen:
            continue
        if not isinstance(module, (nn.Linear, nn.Conv2d)):
            raise TypeError(f"layer {name!r} is a {type(module).__name__}; L0 gates attach to nn.Linear / nn.Conv2d")
        if hasattr(module, _GATE_ATTR):
            raise ValueError(f"layer {name!r} already has L0 gates")
        kind = _resolve_structure(module, chosen[name], name)
        num_gates, ppg, view_shape, gates_bias = _gate_layout(module, kind, name)
        gate = HardConcreteGate(num_gates, droprate_init, beta, gamma, zeta).to(
            module.weight.device, module.weight.dtype
        )
        setattr(module, _GATE_ATTR, gate)
        parametrize.register_parametrization(module, "weight", _GateMultiply(gate, view_shape))
        if gates_bias:
            parametrize.register_parametrization(module, "bias", _GateMultiply(gate, (-1,)))
        if kind == "input" and isinstance(module, nn.Linear) and fast:
            module.forward = types.MethodType(_input_gated_linear_forward, module)
            hook = None  # a module without hooks takes nn.Module's fast call path
        else:
            hook = module.register_forward_pre_hook(_resample_hook)
        gated.append(_GatedLayer(name, module, gate, kind, ppg, hook))
    missing = sorted(set(chosen) - {g.name for g in gated})
    if missing:
        raise ValueError(f"layers={missing} not found in the model; available: {sorted(n for n in modules if n)}")
    handle = L0Gates(gated)
    handle._draw_hook = model.register_forward_pre_hook(_DrawSamples([g.gate for g in gated]))
    return handle


@torch.no_grad()
def close_least_likely_(gates: Sequence[HardConcreteGate], value: Callable[[], float], epsilon: float) -> list[int]:
    """Close the open gates with the lowest keep-probability P(z != 0) until ``value() <= epsilon``:
    the fewest such gates. The measure never grows when a gate closes, so a binary search over
    how many of the sorted gates to close finds the smallest number. Returns how many gates
    closed in each of ``gates`` (none if the budget already holds)."""
    if value() <= epsilon:
        return [0] * len(gates)
    candidates = []  # the gates open at test time, scored by P(z != 0)
    for gate in gates:
        open_gates = gate.active().nonzero().squeeze(1)
        candidates.append((open_gates, gate.prob_nonzero()[open_gates]))
    original = [gate.log_alpha.clone() for gate in gates]

    def shut(per_gate: list[torch.Tensor]) -> None:
        for gate, la, idx in zip(gates, original, per_gate):
            gate.log_alpha.copy_(la)
            gate.log_alpha[idx.to(la.device)] = gate.closed_value()

    return close_fewest_(candidates, shut, lambda: value() <= epsilon)


def _check_reached(model: nn.Module, chosen: Mapping[str, str], example: torch.Tensor | None) -> None:
    """Refuse a layer whose gate would never act: one its module uses without calling it
    (``nn.MultiheadAttention``'s ``out_proj``, ``F.linear(x, layer.weight)``). A gate draws its
    sample and scales the layer's weight when the layer is called; a weight read directly
    keeps the first sample, and the second step's backward pass fails."""
    modules = dict(model.named_modules())
    for name, module in modules.items():
        if isinstance(module, nn.MultiheadAttention):
            inside = sorted(n for n in chosen if n.startswith(f"{name}.") if n)
            if inside:
                raise ValueError(
                    f"layer {inside[0]!r}: nn.MultiheadAttention reads its weight without calling it, so a gate "
                    f"there would not act; leave the attention's layers out (layers=[...])"
                )
    if example is None:
        return
    called: set[str] = set()
    observe(model, example, pre={modules[n]: lambda _m, _a, n=n: called.add(n) for n in chosen if n in modules})
    never = [n for n in chosen if n in modules and n not in called]
    if never:
        raise ValueError(
            f"layer {never[0]!r} is not called in the model's forward pass (its weight is used directly, e.g. "
            f"F.linear(x, layer.weight)), so a gate there would not act; leave it out (layers=[...])"
        )


def fold_l0(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every L0 gate folded into its weights at the test-time value.

    Gated layers are replaced by plain ``nn.Linear`` / ``nn.Conv2d`` layers (no
    parametrization, hook or gate); the original model is left untouched. This is
    :func:`~constrained_sparsity.graph.bake`, which folds every method's parametrizations.
    """
    return bake(model)
