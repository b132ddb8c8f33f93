"""The Lagrangian min-max game of sparsity targets, on Cooper 1.0.

For task loss f and targets c = 1..m with measures g_c and budgets eps_c::

    min_{theta, phi} max_{lambda >= 0}  f(theta, phi) + sum_c lambda_c (g_c(theta, phi) - eps_c)

(Gallego-Posada, Ramirez & Erraqabi 2021, the constrained-L0 Lagrangian). In *constrained*
mode lambda_c is learned by projected gradient ascent (Cooper's dual optimizer). In
*penalized* mode lambda_c is frozen at the user's value and the game reduces to
``f + lambda_c * g_c`` (the eps_c term is a constant): one code path for both.

Measures are proxy constraints: the differentiable expected density moves the primal
variables; the multiplier moves with the exact (test-time) density by default, so that
"feasible" means the deployed network meets the budget.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import cooper
import torch
import torch.nn.functional as F
from torch import nn

from .hard_concrete import L0Gates
from .layer_sparsity import LayerSparsity

__all__ = [
    "DualOptimizer",
    "LayerTarget",
    "PrimalOptimizer",
    "SCHEMES",
    "SparsityProblem",
    "StepResult",
    "Target",
    "build_optimizer",
    "scheduled_lr",
    "train_step",
]

MODES = ("constrained", "penalized")
MEASURES = ("exact", "expected")
SCHEMES = ("alternating", "alternating_primal_dual", "simultaneous", "extrapolation")


@dataclass(frozen=True)
class Target:
    """One declared sparsity budget: ``density(layers) <= epsilon``.

    Args:
        epsilon: the budget, a proportion of active parameters in [0, 1].
        layers: gated layer names the measure covers; ``None`` for the whole model
            (parameter-weighted over all gated layers).
        measure: which measure moves the multiplier: ``"exact"`` (test-time density, a proxy
            constraint) or ``"expected"`` (the surrogate itself, as in the paper).
        lam: the frozen multiplier in penalized mode (ignored in constrained mode).
        name: constraint name used in metrics (``constraint/<name>/...``).
    """

    epsilon: float
    layers: tuple[str, ...] | None = None
    measure: str = "exact"
    lam: float | None = None
    name: str = "l0_model"

    def __post_init__(self) -> None:
        if not (isinstance(self.epsilon, (int, float)) and 0.0 <= self.epsilon <= 1.0):
            raise ValueError(f"epsilon={self.epsilon!r} should be a number in [0, 1]")
        if self.measure not in MEASURES:
            raise ValueError(f"measure={self.measure!r} should be one of {MEASURES}")
        if self.lam is not None and (not math.isfinite(self.lam) or self.lam < 0):
            raise ValueError(f"lam={self.lam!r} should be a finite number >= 0")
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(self.layers))


@dataclass(frozen=True)
class LayerTarget:
    """A budget on depth: at most ``max_layers`` linear layers once mergeable layers are merged.

    The exact depth moves the multiplier (``strict_violation = depth - max_layers``); the
    weights feel the budget through the proximal step on the negative parts, of strength
    ``primal_lr * lambda * r_j`` (Hebiri & Lederer 2020), applied after every primal step.

    Args:
        max_layers: k, the most linear layers the merged network may have.
        lam: the frozen multiplier in penalized mode.
        restarts: reset the multiplier to 0 when the depth is strictly under k.
        name: constraint name used in metrics.
    """

    max_layers: int
    lam: float | None = None
    restarts: bool = False
    name: str = "layers"

    def __post_init__(self) -> None:
        if isinstance(self.max_layers, bool) or not isinstance(self.max_layers, int) or self.max_layers < 0:
            raise ValueError(f"max_layers={self.max_layers!r} should be an integer >= 0")
        if self.lam is not None and (not math.isfinite(self.lam) or self.lam < 0):
            raise ValueError(f"lam={self.lam!r} should be a finite number >= 0")


class SparsityProblem(cooper.ConstrainedMinimizationProblem):
    """Cooper CMP: task loss plus one inequality constraint per :class:`Target`.

    Args:
        model: the network (with gates attached).
        gates: the :class:`L0Gates` handle returned by :func:`attach_l0`, or ``None`` for a
            dense baseline with no constraint.
        targets: the declared budgets.
        mode: ``"constrained"`` (learned multipliers) or ``"penalized"`` (frozen at
            ``Target.lam``).
        loss_fn: ``loss_fn(outputs, labels)``; cross-entropy by default.
        lambda_init: initial multiplier in constrained mode.
    """

    def __init__(
        self,
        model: nn.Module,
        gates: L0Gates | None,
        targets: Sequence[Target | LayerTarget] = (),
        mode: str = "constrained",
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
        lambda_init: float = 0.0,
        layers: LayerSparsity | None = None,
    ) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode={mode!r} should be one of {MODES}")
        if lambda_init < 0:
            raise ValueError(f"lambda_init={lambda_init} should be >= 0")
        if any(isinstance(t, Target) for t in targets) and gates is None:
            raise ValueError("L0 targets were declared but no gates are attached")
        if any(isinstance(t, LayerTarget) for t in targets):
            if layers is None:
                raise ValueError("a LayerTarget was declared but no layer sparsity is attached (layers=...)")
            for t in targets:
                if isinstance(t, LayerTarget) and not layers.min_depth <= t.max_layers <= layers.num_linear:
                    raise ValueError(
                        f"max_layers={t.max_layers} should be between {layers.min_depth} (every regularised "
                        f"layer merged) and {layers.num_linear} (the number of linear layers)"
                    )
        names = [t.name for t in targets]
        if len(set(names)) != len(names):
            raise ValueError(f"target names {names} must be unique")
        self.model = model
        self.gates = gates
        self.layers = layers
        self.mode = mode
        self.loss_fn = loss_fn
        self.targets = tuple(targets)
        self._constraints_in_order: list[cooper.Constraint] = []
        for target in self.targets:
            if isinstance(target, Target) and gates is not None and target.layers is not None:
                gates.expected_density(target.layers)  # validates the layer names
            if mode == "penalized":
                if target.lam is None:
                    raise ValueError(f"target {target.name!r}: penalized mode needs a lambda (lam=...)")
                init = target.lam
            else:
                init = lambda_init
            constraint = cooper.Constraint(
                constraint_type=cooper.ConstraintType.INEQUALITY,
                formulation_type=cooper.formulations.Lagrangian,
                multiplier=cooper.multipliers.DenseMultiplier(init=torch.tensor([float(init)])),
            )
            setattr(self, target.name, constraint)
            self._constraints_in_order.append(constraint)

    @property
    def learns_multipliers(self) -> bool:
        return self.mode == "constrained"

    def ordered_constraints(self) -> list[tuple[Target | LayerTarget, cooper.Constraint]]:
        """(target, constraint) pairs in declaration order (checkpoint slots follow it)."""
        return list(zip(self.targets, self._constraints_in_order))

    def multiplier_values(self) -> dict[str, float]:
        return {t.name: float(c.multiplier.weight.detach()[0]) for t, c in self.ordered_constraints()}

    def _constraint_states(self) -> dict[cooper.Constraint, cooper.ConstraintState]:
        states = {}
        for target, constraint in self.ordered_constraints():
            if isinstance(target, LayerTarget):
                # No differentiable term: the regulariser acts through the proximal step.
                excess = torch.tensor([float(self.layers.depth() - target.max_layers)])  # type: ignore[union-attr]
                states[constraint] = cooper.ConstraintState(
                    violation=excess, strict_violation=excess, contributes_to_dual_update=self.learns_multipliers
                )
                continue
            expected, exact = self.gates.densities(target.layers)  # type: ignore[union-attr]
            strict = exact - target.epsilon if target.measure == "exact" else None
            states[constraint] = cooper.ConstraintState(
                violation=expected - target.epsilon,
                strict_violation=strict,
                contributes_to_dual_update=self.learns_multipliers,
            )
        return states

    def compute_cmp_state(self, inputs: torch.Tensor, labels: torch.Tensor) -> cooper.CMPState:
        outputs = self.model(inputs)
        loss = self.loss_fn(outputs, labels)
        return cooper.CMPState(loss=loss, observed_constraints=self._constraint_states())

    def compute_violations(self, inputs: torch.Tensor, labels: torch.Tensor) -> cooper.CMPState:
        # The measures depend on the gates only, not on the data: no forward pass needed.
        return cooper.CMPState(loss=None, observed_constraints=self._constraint_states())

    @torch.no_grad()
    def violations(self) -> dict[str, tuple[float, float]]:
        """``(violation, strict_violation)`` of every target now, by name, in declaration order.

        The same constraint states the training step builds: the violation is the measure
        that moves the primal variables, the strict one the measure that moves the
        multiplier (equal to the violation when there is no proxy). A target is met when its
        strict violation is <= 0, as in :meth:`feasible`.
        """
        states = self._constraint_states()
        out = {}
        for target, constraint in self.ordered_constraints():
            violation, strict = states[constraint].extract_violations()
            out[target.name] = (float(violation.max()), float(strict.max()))
        return out

    def feasible(self) -> bool:
        """Whether the current network meets every budget (strict violations <= 0)."""
        return all(strict <= 0 for _, strict in self.violations().values())

    @torch.no_grad()
    def proximal_step_(self, lr: float) -> None:
        """The proximal step of every layer-sparsity target: threshold ``lr * lambda * r_j``."""
        if self.layers is None:
            return
        for target, constraint in self.ordered_constraints():
            if isinstance(target, LayerTarget):
                lam = float(constraint.multiplier.weight.detach()[0])
                if lam > 0:
                    self.layers.prox_(lr * lam)

    @torch.no_grad()
    def dual_restart_(self, cmp_state: cooper.CMPState, dual_optimizer: torch.optim.Optimizer | None) -> list[str]:
        """Reset to 0 the multipliers of strictly satisfied constraints, with their optimizer state.

        Dual restarts (Gallego-Posada et al. 2021; removed from Cooper 1.0): once a budget is
        met, the pressure it put on the gates is released at once instead of decaying.
        Returns the names of the constraints that were restarted.
        """
        if not self.learns_multipliers:
            return []
        restarted = []
        for target, constraint in self.ordered_constraints():
            if isinstance(target, LayerTarget) and not target.restarts:
                continue
            state = cmp_state.observed_constraints.get(constraint)
            if state is None:
                continue
            _, strict = state.extract_violations()
            if bool((strict < 0).all()):
                weight = constraint.multiplier.weight
                weight.zero_()
                if dual_optimizer is not None:
                    dual_optimizer.state.pop(weight, None)
                restarted.append(target.name)
        return restarted


@dataclass
class PrimalOptimizer:
    """Primal optimizer settings. ``gate_lr`` defaults to ``lr``; weight decay skips the gates."""

    name: str = "adam"
    lr: float = 1e-3
    gate_lr: float | None = None
    momentum: float = 0.0
    weight_decay: float = 0.0


@dataclass
class DualOptimizer:
    """Dual optimizer settings: ``sgd`` (plain gradient ascent), ``adam`` or ``nupi``."""

    name: str = "sgd"
    lr: float = 1e-2
    momentum: float = 0.0
    kp: float = 0.0
    ki: float = 1.0
    ema_nu: float = 0.0


@dataclass
class _OptimizerSet:
    cooper_optimizer: cooper.optim.CooperOptimizer
    dual_optimizer: torch.optim.Optimizer | None
    scheme: str

    @property
    def primal_lr(self) -> float:
        """The learning rate of the weights (first parameter group), read at every step."""
        return float(self.cooper_optimizer.primal_optimizers[0].param_groups[0]["lr"])


def _primal_param_groups(model: nn.Module, gates: L0Gates | None, cfg: PrimalOptimizer) -> list[dict]:
    gate_ids = {id(p) for p in gates.parameters()} if gates is not None else set()
    weights = [p for p in model.parameters() if p.requires_grad and id(p) not in gate_ids]
    groups = [{"params": weights, "weight_decay": cfg.weight_decay}]
    if gates is not None:
        groups.append({"params": list(gates.parameters()), "weight_decay": 0.0, "lr": cfg.gate_lr or cfg.lr})
    return groups


def build_optimizer(
    problem: SparsityProblem,
    primal: PrimalOptimizer = PrimalOptimizer(),
    dual: DualOptimizer = DualOptimizer(),
    scheme: str = "alternating",
) -> _OptimizerSet:
    """Build the Cooper optimizer for ``problem``.

    Schemes: ``alternating`` (dual step first, then primal, same cost as simultaneous; the
    Cooper default), ``alternating_primal_dual`` (primal first; the dual step re-measures the
    gates, which needs no forward pass), ``simultaneous`` and ``extrapolation`` (extragradient
    on both sides; two forward/backward passes per step).
    """
    if scheme not in SCHEMES:
        raise ValueError(f"scheme={scheme!r} should be one of {SCHEMES}")
    groups = _primal_param_groups(problem.model, problem.gates, primal)
    extra = scheme == "extrapolation"
    if primal.name == "adam":
        cls = cooper.optim.ExtraAdam if extra else torch.optim.Adam
        primal_opt = cls(groups, lr=primal.lr, **({} if extra else {"fused": True}))
    elif primal.name == "sgd":
        cls = cooper.optim.ExtraSGD if extra else torch.optim.SGD
        primal_opt = cls(groups, lr=primal.lr, momentum=primal.momentum)
    else:
        raise ValueError(f"primal optimizer name={primal.name!r} should be 'adam' or 'sgd'")

    multipliers = [c.multiplier.weight for _, c in problem.ordered_constraints()]
    if not multipliers:
        return _OptimizerSet(cooper.optim.UnconstrainedOptimizer(problem, primal_opt), None, scheme)
    if dual.name == "sgd":
        cls = cooper.optim.ExtraSGD if extra else torch.optim.SGD
        dual_opt = cls(multipliers, lr=dual.lr, momentum=dual.momentum, maximize=True)
    elif dual.name == "adam":  # ascent steps of about lr whatever the violation's size
        cls = cooper.optim.ExtraAdam if extra else torch.optim.Adam
        dual_opt = cls(multipliers, lr=dual.lr, maximize=True, **({} if extra else {"fused": True}))
    elif dual.name == "nupi":
        if extra:
            raise ValueError("dual optimizer 'nupi' cannot be combined with scheme='extrapolation'")
        dual_opt = cooper.optim.nuPI(multipliers, lr=dual.lr, Kp=dual.kp, Ki=dual.ki, ema_nu=dual.ema_nu, maximize=True)
    else:
        raise ValueError(f"dual optimizer name={dual.name!r} should be 'sgd', 'adam' or 'nupi'")
    cls_by_scheme = {
        "alternating": cooper.optim.AlternatingDualPrimalOptimizer,
        "alternating_primal_dual": cooper.optim.AlternatingPrimalDualOptimizer,
        "simultaneous": cooper.optim.SimultaneousOptimizer,
        "extrapolation": cooper.optim.ExtrapolationConstrainedOptimizer,
    }
    opt = cls_by_scheme[scheme](problem, primal_optimizers=primal_opt, dual_optimizers=dual_opt)
    return _OptimizerSet(opt, dual_opt, scheme)


def scheduled_lr(
    lr: float, step: int, total_steps: int, schedule: str = "constant", final_factor: float = 0.0
) -> float:
    """The learning rate at ``step`` (0-based) of ``total_steps``.

    ``"constant"``: ``lr``. ``"cosine"``: ``lr * (f + (1 - f) (1 + cos(pi t)) / 2)`` with
    ``t = step / total_steps`` and ``f = final_factor`` (Loshchilov & Hutter, SGDR, without
    restarts). A function of the step alone, so a resumed run continues the same curve.
    """
    if schedule == "constant" or total_steps <= 0:
        return lr
    if schedule != "cosine":
        raise ValueError(f"schedule={schedule!r} should be 'constant' or 'cosine'")
    t = min(max(step / total_steps, 0.0), 1.0)
    return lr * (final_factor + (1.0 - final_factor) * 0.5 * (1.0 + math.cos(math.pi * t)))


class StepResult(dict):
    """What one training step measured: ``loss``, ``lagrangian`` (tensors) and ``restarted``."""


def train_step(
    problem: SparsityProblem,
    optimizers: _OptimizerSet,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    dual_restarts: bool = True,
) -> StepResult:
    """One step of the game: Cooper's ``roll`` on a mini-batch, then dual restarts.

    Returns a dict with the task ``loss`` and the primal ``lagrangian`` (detached tensors;
    no host synchronisation) and the names of ``restarted`` multipliers.
    """
    kwargs = {"inputs": inputs, "labels": labels}
    if optimizers.scheme == "alternating_primal_dual":
        rollout = optimizers.cooper_optimizer.roll(compute_cmp_state_kwargs=kwargs, compute_violations_kwargs=kwargs)
    else:
        rollout = optimizers.cooper_optimizer.roll(compute_cmp_state_kwargs=kwargs)
    if problem.layers is not None:
        problem.proximal_step_(optimizers.primal_lr)
    restarted: list[str] = []
    if dual_restarts:
        restarted = problem.dual_restart_(rollout.cmp_state, optimizers.dual_optimizer)
    lagrangian = rollout.primal_lagrangian_store.lagrangian
    return StepResult(
        loss=rollout.loss.detach(),
        lagrangian=(lagrangian.detach() if lagrangian is not None else rollout.loss.detach()),
        restarted=restarted,
    )
