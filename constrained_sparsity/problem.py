"""The Lagrangian min-max game of sparsity targets, on Cooper 1.0.

For task loss f and targets c = 1..m with measures g_c and budgets eps_c::

    min_{theta, phi} max_{lambda >= 0}  f(theta, phi) + sum_c lambda_c (g_c(theta, phi) - eps_c)

(Gallego-Posada, Ramirez & Erraqabi 2021, the constrained-L0 Lagrangian). In *constrained*
mode lambda_c is learned by projected gradient ascent (Cooper's dual optimizer). In
*penalized* mode lambda_c is frozen at the user's value and the game reduces to
``f + lambda_c * g_c`` (the eps_c term is a constant): one code path for both.

Measures are proxy constraints: a method's differentiable surrogate moves the primal
variables; the multiplier moves with the exact (test-time) measure by default, so that
"feasible" means the deployed network meets the budget. A method without a surrogate acts
through a proximal step after each primal step, with strength ``primal_lr x lambda``.
The problem knows methods only through :class:`~constrained_sparsity.methods.SparsityMethod`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import cooper
import torch
import torch.nn.functional as F
from torch import nn

from .methods.base import Projectable, Proximal, SparsityMethod, Target, default_target_name, freeze_
from .numbers import within

__all__ = [
    "MODES",
    "DualOptimizer",
    "OptimizerSet",
    "PrimalOptimizer",
    "SCHEMES",
    "SparsityProblem",
    "StepResult",
    "Target",
    "build_optimizer",
    "scheduled_lr",
    "train_step",
]

MODES = ("constrained", "penalized", "projected")
SCHEMES = ("alternating", "alternating_primal_dual", "simultaneous", "extrapolation")


def _as_methods(methods: SparsityMethod | Sequence[SparsityMethod] | None) -> list[SparsityMethod]:
    if methods is None:
        return []
    if isinstance(methods, SparsityMethod):
        return [methods]
    out = list(methods)
    for m in out:
        if not isinstance(m, SparsityMethod):
            raise TypeError(f"methods: {m!r} is not a SparsityMethod")
    return out


class SparsityProblem(cooper.ConstrainedMinimizationProblem):
    """Cooper CMP: task loss plus one constraint per :class:`Target`: an inequality, or an
    equality where the target asks for one (``Target.equality``).

    Args:
        model: the network (with its sparsity methods attached).
        methods: the attached method(s) (e.g. the :class:`~constrained_sparsity.L0Gates`
            handle returned by :func:`~constrained_sparsity.attach_l0`), or ``None`` for a
            dense baseline with no constraint.
        targets: the declared budgets. A target names its method (``Target.method``: the
            instance or its name); ``None`` means the first method.
        mode: ``"constrained"`` (learned multipliers), ``"penalized"`` (frozen at
            ``Target.lam``) or ``"projected"`` (the method meets the budget by construction,
            a top-k mask: every multiplier stays 0, the constraint is still reported).
        loss_fn: ``loss_fn(outputs, labels)``; cross-entropy by default.
        lambda_init: initial multiplier in constrained mode.
    """

    def __init__(
        self,
        model: nn.Module,
        methods: SparsityMethod | Sequence[SparsityMethod] | None = None,
        targets: Sequence[Target] = (),
        mode: str = "constrained",
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
        lambda_init: float = 0.0,
    ) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode={mode!r} should be one of {MODES}")
        if not within(lambda_init, 0):
            raise ValueError(f"lambda_init={lambda_init} should be a finite number >= 0")
        self.methods = _as_methods(methods)
        self.model = model
        # More than one process: the forward pass goes through the DistributedDataParallel
        # wrapper of ``model`` (its gradients are averaged over the ranks), and the loss of this
        # rank's slice of the batch is weighted (``distributed.shard``). None: ``model``, unweighted.
        self.forward_module: nn.Module | None = None
        self.batch_weight: float | None = None
        self.mode = mode
        self.loss_fn = loss_fn
        self.targets = tuple(self._resolve(t) for t in targets)
        names = [t.name for t in self.targets]
        if len(set(names)) != len(names):
            raise ValueError(f"target names {names} must be unique")
        for method in {id(t.method): t.method for t in self.targets}.values():
            modes = type(method).spec.modes
            if mode not in modes:  # as a config asking for it is refused
                how = (
                    "it meets its budget by construction: use mode='projected'"
                    if modes == ("projected",)
                    else f"it runs in mode {' or '.join(modes)}"
                )
                raise ValueError(f"mode={mode!r}: method {method.name!r} has no such mode; {how}")
        for target in self.targets:
            if target.equality and mode != "constrained":
                raise ValueError(f"target {target.name!r}: an equality target needs mode='constrained', not {mode!r}")
            if target.equality and not type(target.method).spec.equality:
                raise ValueError(
                    f"target {target.name!r}: method {target.method.name!r} cannot aim at its budget from below "
                    "(a negative multiplier does not reopen what it prunes); use an inequality (equality=False)"
                )
        for method in self.methods:
            method.on_targets([t for t in self.targets if t.method is method])
        self._constraints_in_order: list[cooper.Constraint] = []
        for target in self.targets:
            if mode == "penalized":
                if target.lam is None:
                    raise ValueError(f"target {target.name!r}: penalized mode needs a lambda (lam=...)")
                init = target.lam
            else:
                init = lambda_init if mode == "constrained" else 0.0
            constraint = cooper.Constraint(
                constraint_type=cooper.ConstraintType.EQUALITY if target.equality else cooper.ConstraintType.INEQUALITY,
                formulation_type=cooper.formulations.Lagrangian,
                multiplier=cooper.multipliers.DenseMultiplier(init=torch.tensor([float(init)])),
            )
            setattr(self, target.name, constraint)
            self._constraints_in_order.append(constraint)

    def _resolve(self, target: Target) -> Target:
        """``target`` with its method instance and name filled in, checked by its method."""
        if not isinstance(target, Target):
            raise TypeError(f"targets: {target!r} is not a Target")
        spec = target.method
        if isinstance(spec, SparsityMethod):
            if spec not in self.methods:
                raise ValueError(f"target {target.name or ''!r}: its method {type(spec).__name__} is not attached")
            method = spec
        elif spec is None:
            if not self.methods:
                raise ValueError("a target was declared but no sparsity method is attached")
            method = self.methods[0]
        else:
            found = [m for m in self.methods if m.name == spec]
            if not found:
                raise ValueError(
                    f"a target for method {spec!r} was declared but no such method is attached "
                    f"(attached: {[m.name for m in self.methods]})"
                )
            method = found[0]
        method.check_target(target)
        return replace(target, method=method, name=target.name or default_target_name(method, target))

    @property
    def learns_multipliers(self) -> bool:
        return self.mode == "constrained"

    def ordered_constraints(self) -> list[tuple[Target, cooper.Constraint]]:
        """(target, constraint) pairs in declaration order (checkpoint slots follow it)."""
        return list(zip(self.targets, self._constraints_in_order))

    def multiplier_values(self) -> dict[str, float]:
        return {t.name: float(c.multiplier.weight.detach()[0]) for t, c in self.ordered_constraints()}

    def _constraint_states(self) -> dict[cooper.Constraint, cooper.ConstraintState]:
        states = {}
        for target, constraint in self.ordered_constraints():
            surrogate, exact = target.method.measure(target)
            if surrogate is None:  # no differentiable term: the method acts through its proximal step
                violation = exact - target.epsilon
                strict = violation
            else:
                violation = surrogate - target.epsilon
                strict = exact - target.epsilon if target.measure == "exact" else None
            states[constraint] = cooper.ConstraintState(
                violation=violation, strict_violation=strict, contributes_to_dual_update=self.learns_multipliers
            )
        return states

    def compute_cmp_state(self, inputs: torch.Tensor, labels: torch.Tensor) -> cooper.CMPState:
        outputs = (self.forward_module or self.model)(inputs)
        weight = self.batch_weight
        if weight is None:
            loss = self.loss_fn(outputs, labels)
        elif len(labels) == 0:  # a rank with no examples in this batch: no gradient, still in the graph
            loss = outputs.sum() * 0.0
        else:
            loss = self.loss_fn(outputs, labels) * weight
        return cooper.CMPState(loss=loss, observed_constraints=self._constraint_states())

    def compute_violations(self, inputs: torch.Tensor, labels: torch.Tensor) -> cooper.CMPState:
        # The measures depend on the sparsity parameters only, not on the data: no forward pass.
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

    def project_(self) -> tuple[dict[str, dict[str, int]], list[str]]:
        """Meet every budget exactly, the pattern fixed: freeze each method's pattern at its
        test-time value (L0 gates deterministic, masks no longer updated), then, for every
        target still over its budget, let its method close what its projection rule names (L0:
        the open gates least likely to be non-zero; CGES: the weakest groups; the per-weight
        methods: the smallest magnitudes).

        The finishing phase of a run starts with this; in your own loop, call it once training
        is done (then fine-tune with the zeros kept, if you like). Returns what each projected
        target closed (per layer), and the targets whose method cannot project (left as they
        are).
        """
        for method in self.methods:
            freeze_(method)
        closed: dict[str, dict[str, int]] = {}
        unprojected: list[str] = []
        for target in self.targets:
            if self.violations()[target.name][1] <= 0:
                continue
            if not isinstance(target.method, Projectable):
                unprojected.append(target.name)
                continue
            closed[target.name] = target.method.project_(target)
        return closed, unprojected

    def feasible(self) -> bool:
        """Whether the current network meets every budget (strict violations <= 0)."""
        return all(strict <= 0 for _, strict in self.violations().values())

    @torch.no_grad()
    def proximal_step_(self, lr: float) -> None:
        """Every method's proximal step, per target: strength ``lr * lambda`` when lambda > 0."""
        for target, constraint in self.ordered_constraints():
            if isinstance(target.method, Proximal):
                lam = float(constraint.multiplier.weight.detach()[0])
                if lam > 0:
                    target.method.proximal_step_(target, lr * lam)

    @torch.no_grad()
    def dual_restart_(self, cmp_state: cooper.CMPState, dual_optimizer: torch.optim.Optimizer | None) -> list[str]:
        """Reset to 0 the multipliers of strictly satisfied constraints, with their optimizer state.

        Dual restarts (Gallego-Posada et al. 2021; removed from Cooper 1.0): once a budget is
        met, the pressure it put on the parameters is released at once instead of decaying.
        An equality's multiplier is negative under its budget by design: it is reset when it
        pushes the wrong way, once the measure has crossed the budget (λ > 0 under it, λ < 0
        over it), so that the pressure that carried it across does not carry it further.
        Targets with ``restarts=False`` are left alone. Returns the names of the constraints
        that were restarted.
        """
        if not self.learns_multipliers:
            return []
        restarted = []
        for target, constraint in self.ordered_constraints():
            if not target.restarts:
                continue
            state = cmp_state.observed_constraints.get(constraint)
            if state is None:
                continue
            _, strict = state.extract_violations()
            if target.equality:
                crossed = bool((strict * constraint.multiplier.weight < 0).all())
            else:
                crossed = bool((strict < 0).all())
            if crossed:
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
class OptimizerSet:
    """A Cooper optimizer with the dual optimizer it steps (``None`` without constraints)."""

    cooper_optimizer: cooper.optim.CooperOptimizer
    dual_optimizer: torch.optim.Optimizer | None
    scheme: str

    @property
    def primal_lr(self) -> float:
        """The learning rate of the weights (first parameter group), read at every step."""
        return float(self.cooper_optimizer.primal_optimizers[0].param_groups[0]["lr"])


def _primal_param_groups(model: nn.Module, methods: Sequence[SparsityMethod], cfg: PrimalOptimizer) -> list[dict]:
    """The model's weights, then (if any) the methods' own parameters at ``gate_lr``, no weight decay."""
    own = [p for m in methods for p in m.parameters()]
    own_ids = {id(p) for p in own}
    weights = [p for p in model.parameters() if p.requires_grad and id(p) not in own_ids]
    groups = [{"params": weights, "weight_decay": cfg.weight_decay}]
    if own:
        groups.append({"params": own, "weight_decay": 0.0, "lr": cfg.gate_lr or cfg.lr})
    return groups


def build_optimizer(
    problem: SparsityProblem,
    primal: PrimalOptimizer = PrimalOptimizer(),
    dual: DualOptimizer = DualOptimizer(),
    scheme: str = "alternating",
) -> OptimizerSet:
    """Build the Cooper optimizer for ``problem``.

    Schemes: ``alternating`` (dual step first, then primal, same cost as simultaneous; the
    Cooper default), ``alternating_primal_dual`` (primal first; the dual step re-measures the
    gates, which needs no forward pass), ``simultaneous`` and ``extrapolation`` (extragradient
    on both sides; two forward/backward passes per step).
    """
    if scheme not in SCHEMES:
        raise ValueError(f"scheme={scheme!r} should be one of {SCHEMES}")
    for settings in (primal, dual):
        for key in ("lr", "gate_lr", "momentum", "weight_decay", "kp", "ki", "ema_nu"):
            value = getattr(settings, key, 0.0)
            if value is not None and not within(value, 0):
                raise ValueError(f"{type(settings).__name__}.{key}={value!r} should be a finite number >= 0")
        if not settings.lr > 0:
            raise ValueError(f"{type(settings).__name__}.lr={settings.lr!r} should be > 0")
    groups = _primal_param_groups(problem.model, problem.methods, primal)
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
        return OptimizerSet(cooper.optim.UnconstrainedOptimizer(problem, primal_opt), None, scheme)
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
    return OptimizerSet(opt, dual_opt, scheme)


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
    optimizers: OptimizerSet,
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
    problem.proximal_step_(optimizers.primal_lr)
    restarted: list[str] = []
    if dual_restarts:
        restarted = problem.dual_restart_(rollout.cmp_state, optimizers.dual_optimizer)
    for method in problem.methods:
        method.after_step()
    lagrangian = rollout.primal_lagrangian_store.lagrangian
    return StepResult(
        loss=rollout.loss.detach(),
        lagrangian=(lagrangian.detach() if lagrangian is not None else rollout.loss.detach()),
        restarted=restarted,
    )
