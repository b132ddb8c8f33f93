"""The interface every sparsity method implements, and the generic sparsity target.

A method is shaped after ``torch.ao.pruning.BaseSparsifier`` (*prepare*: attach to a model;
*step*: what happens after each optimizer step; *squash_mask*: fold into plain layers) and
after Cooper's ``Multiplier`` ABC (a small abstract base with the math in one place):

==============================  ==========================================================
attach                          the constructor (or ``attach_*`` function) registers
                                parametrizations or hooks on an ordinary ``nn.Module``, so
                                ``model.state_dict()`` holds its state
:meth:`~SparsityMethod.measure`  for a target: the differentiable surrogate (or ``None``)
                                and the exact test-time measure -- all the problem needs to
                                build the Cooper ``ConstraintState``
:meth:`~SparsityMethod.after_step`  optional: after each step (mask updates, re-weighting)
``state_dict`` / ``load_state_dict``  whatever it keeps outside the model
==============================  ==========================================================

Twelve members in all (with ``name``, ``spec``, ``reporter``, ``from_config``,
``layer_names``, ``on_targets``, ``parameters``, ``check_target``). The rest is opt-in:

==============================  ==========================================================
``Proximal.proximal_step_``     after each primal step, strength ``lr x lambda`` (exact
                                zeros: layer, group sparsity)
``Freezable.freeze_``,          the finishing phase: fix the sparsity pattern at its
``Projectable.project_``        test-time value, then close the units that contribute least
                                until a budget holds exactly
``HasPhase.after_training``     a :class:`Phase` run by the same training loop (merge +
                                refit, prune + retrain)
``Foldable.fold``               a copy of the model with the method folded into plain
                                layers, where baking the parametrizations is not all
``UnitPruner.prune_units_``     compaction of any traced network
``reporter`` (a                 what it logs (``metrics``), the rows and target entries of
:class:`MethodReport`)          ``summary.json``, and how the report reads them back
==============================  ==========================================================

A capability is declared by inheriting it; callers ask ``isinstance`` (or use :func:`freeze_`,
:func:`report_of`). What configs and ``compare`` need to know is one
:class:`MethodSpec` value. The problem (:mod:`constrained_sparsity.problem`), the trainer,
the report, ``compare`` and ``compact`` talk to methods through this interface only.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from ..errors import ConfigError
from ..numbers import within

__all__ = [
    "MEASURES",
    "Foldable",
    "Freezable",
    "HasPhase",
    "MethodReport",
    "MethodSpec",
    "Projectable",
    "Proximal",
    "UnitPruner",
    "close_fewest_",
    "keep_largest",
    "select_layers",
    "kurtosis",
    "weight_metrics",
    "weight_rows",
    "WeightsReport",
    "BudgetSpec",
    "BuildContext",
    "Phase",
    "PhaseContext",
    "SparsityMethod",
    "Target",
    "default_target_name",
    "freeze_",
    "report_of",
    "targets_from_spec",
]

MEASURES = ("exact", "expected")


def kurtosis(weights: torch.Tensor) -> float:
    """``E[((W - mu) / sigma)^4]`` of a layer's weights (Fedorov & Rao, eq. 13): 3 for a
    Gaussian, larger for a distribution peaked at 0 with heavy tails."""
    w = weights.detach().double().flatten()
    std = w.std(unbiased=False)
    return float(((w - w.mean()) / std).pow(4).mean()) if std > 0 else float("nan")


@torch.no_grad()
def close_fewest_(
    candidates: Sequence[tuple[torch.Tensor, torch.Tensor]],
    shut: Callable[[list[torch.Tensor]], None],
    holds: Callable[[], bool],
) -> list[int]:
    """The projection of every method that closes units by a score: close the fewest, lowest
    scored, until ``holds()``.

    ``candidates[i]``: the indices of owner i's open units (an owner: a layer, a gate) and
    their scores. ``shut(per_owner)`` puts the state back as it was and closes exactly the
    units ``per_owner[i]`` of each owner. The units are sorted by score (ties by position,
    deterministically); as closing a unit never makes ``holds`` fail, a binary search over how
    many of them to close finds the fewest. Returns how many units each owner lost.
    """
    scores = torch.cat([s.detach().double().cpu() for _, s in candidates])
    owner = torch.cat([torch.full((len(idx),), i, dtype=torch.long) for i, (idx, _) in enumerate(candidates)])
    index = torch.cat([idx.detach().cpu().long() for idx, _ in candidates])
    order = torch.sort(scores, stable=True).indices
    owner_sorted, index_sorted = owner[order], index[order]

    def close(k: int) -> None:
        shut([index_sorted[:k][owner_sorted[:k] == i] for i in range(len(candidates))])

    lo, hi = 0, len(order)  # closing them all meets any budget >= 0
    while lo < hi:
        mid = (lo + hi) // 2
        close(mid)
        lo, hi = (lo, mid) if holds() else (mid + 1, hi)
    close(lo)
    return torch.bincount(owner_sorted[:lo], minlength=len(candidates)).tolist()


def select_layers(model: nn.Module, names: Sequence[str] | None, what: str) -> dict[str, nn.Module]:
    """The layers a method acts on, by name, in model order: ``names``, or every ``nn.Linear`` /
    ``nn.Conv2d`` when ``None``. ``ValueError`` naming the layers that are missing or of another
    type (``what``: the method, for the message), or when none is left."""
    modules = dict(model.named_modules())
    chosen = [n for n, m in modules.items() if isinstance(m, (nn.Linear, nn.Conv2d))] if names is None else names
    missing = sorted(n for n in set(chosen) if n not in modules)
    if missing:
        raise ValueError(f"layers={missing} not found in the model")
    wrong = [n for n in chosen if not isinstance(modules[n], (nn.Linear, nn.Conv2d))]
    if wrong or not chosen:
        raise ValueError(f"layers={wrong or list(chosen)}: {what} acts on nn.Linear / nn.Conv2d layers")
    return {n: modules[n] for n in modules if n in set(chosen)}


def keep_largest(scores: Sequence[torch.Tensor], keep: int) -> list[torch.Tensor]:
    """Boolean masks, one per tensor of ``scores``, that keep exactly the ``keep`` largest
    scores of them all (ties broken by position, deterministically): global magnitude pruning."""
    flat = torch.cat([s.detach().flatten().double() for s in scores])  # on the scores' device
    keep = max(0, min(int(keep), flat.numel()))
    chosen = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    chosen[torch.sort(-flat, stable=True).indices[:keep]] = True
    masks, start = [], 0
    for s in scores:
        masks.append(chosen[start : start + s.numel()].view(s.shape))
        start += s.numel()
    return masks


@dataclass(frozen=True)
class Target:
    """One declared budget: ``measure(layers) <= epsilon`` for one method.

    Args:
        epsilon: the budget, in the method's units (a proportion in [0, 1] for densities, a
            count for layer sparsity); the method checks its range.
        layers: layer names the measure covers; ``None`` for the whole model.
        measure: which measure moves the multiplier: ``"exact"`` (the test-time measure, a
            proxy constraint) or ``"expected"`` (the differentiable surrogate itself).
        lam: the frozen multiplier in penalized mode (ignored in constrained mode).
        name: constraint name used in metrics (``constraint/<name>/...``); ``None`` for the
            method's default (``l0_model``, ``l0_fc1``, ``layers``, ...).
        method: the method the budget is on: an attached method, its registered name, or
            ``None`` for the problem's first method.
        restarts: whether dual restarts may reset this multiplier (when the training step
            asks for restarts).
        equality: the game aims at the budget from both sides (``measure(layers) = epsilon``,
            a Cooper equality constraint: the multiplier turns negative while under the
            budget and reopens units). The budget the run is held to stays ``<= epsilon``:
            feasibility and the finishing phase are unchanged. Constrained mode, methods whose
            spec allows it (``MethodSpec.equality``); a dual restart resets its multiplier
            once the measure has crossed the budget (``SparsityProblem.dual_restart_``).
    """

    epsilon: float
    layers: tuple[str, ...] | None = None
    measure: str = "exact"
    lam: float | None = None
    name: str | None = None
    method: Any = None
    restarts: bool = True
    equality: bool = False

    def __post_init__(self) -> None:
        eps = self.epsilon
        if not within(eps, 0):
            raise ValueError(f"epsilon={eps!r} should be a finite number >= 0")
        if self.measure not in MEASURES:
            raise ValueError(f"measure={self.measure!r} should be one of {MEASURES}")
        if self.lam is not None and not within(self.lam, 0):
            raise ValueError(f"lam={self.lam!r} should be a finite number >= 0")
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(self.layers))


@dataclass(frozen=True)
class BudgetSpec:
    """The budgets a config declares for a method (``sparsity.targets`` and its companions)."""

    mode: str
    targets: list[float]
    per_layer: bool
    lambdas: list[float] | None
    measures: list[str]
    restarts: bool
    raw_targets: Any = None  # as written, for messages


@dataclass(frozen=True)
class BuildContext:
    """What building a method from a config may need to know about the data."""

    input_shape: tuple[int, ...]
    input_nonnegative: bool  # every training input is >= 0
    prefix: str = "sparsity."  # where the method is declared: error messages name prefix + key
    steps_per_epoch: int = 1  # training steps in an epoch (schedules in epochs become steps)
    epochs: int = 1  # epochs of the main training


@dataclass
class PhaseContext:
    """What a method's phase after training may use; the trainer provides it.

    ``error(module)`` is the test error of a network; ``max_output_difference(a, b)`` the
    largest absolute difference of two networks' outputs over the test set.
    """

    primal_lr: float
    others: bool  # other sparsity methods are attached (their zeros must be kept)
    error: Callable[[nn.Module], float]
    max_output_difference: Callable[[nn.Module, nn.Module], float]


@dataclass
class Phase:
    """A training phase after the main one, run by the same training loop.

    The trainer saves each of ``files`` (name -> network) into the run directory, trains
    ``model`` for ``epochs`` epochs on the task loss alone (Adam, learning rate ``lr``),
    keeping its zero weights at zero when ``keep_zeros`` (set back to 0 after every step,
    as in the finishing phase: :func:`~constrained_sparsity.graph.keep_zeros`), logs
    ``<name>/train_loss`` and ``<name>/test_error`` per epoch, and saves the
    result as ``<name>_model.pt``. ``info`` is what the method measured before the phase;
    the trainer adds ``<name>_epochs`` and ``test_error_<name>``.
    """

    name: str
    model: nn.Module
    epochs: int
    lr: float
    keep_zeros: bool = False
    info: dict[str, Any] = field(default_factory=dict)
    files: dict[str, nn.Module] = field(default_factory=dict)


@dataclass(frozen=True)
class MethodSpec:
    """What configs, ``compare`` and reports need to know about a method, in one value
    (``SparsityMethod.spec``).

    * ``options``: a dataclass of its config options (or ``None``: config errors name the key).
    * ``primary``: whether it can be ``sparsity.method`` (its options then sit in
      ``sparsity.*``); otherwise it is declared as a section ``sparsity.<name>``.
    * ``budget_key`` / ``lambda_key``: the config keys of its budget and penalized lambda,
      relative to where it is declared.
    * ``count_budget``: the budget is an integer count rather than a proportion (its one
      model-wise target is named after the method: ``layers``).
    * ``compare_tolerance``: how close to the budget a bisected penalty must land;
      ``lambda_range``: the bracket ``(lo, hi)`` that ``compare``'s bisection searches λ in
      unless told otherwise (the scale of the method's penalty: its first run is at the
      bracket's geometric middle).
    * ``finishes``: the method's algorithm ends with the finishing phase (prune to the
      budget, retrain with the pattern fixed) in every mode, penalized included.
    * ``modes``: the ``sparsity.mode`` values it runs in. A method with a penalty and a
      multiplier that moves it has ``constrained`` and ``penalized``; one that meets its
      budget by construction (a top-k mask) has only ``projected`` (no penalty to search:
      ``compare`` runs it once per budget).
    * ``equality``: its targets may be equalities (``Target.equality``, ``sparsity.equality``):
      its surrogate is an expected count of open units, so a negative multiplier reopens the
      units nearest to opening. Not for a norm penalty (a negative one grows the weights
      without bound) nor a proximal step (it has no negative strength).
    """

    options: type | None = None
    primary: bool = True
    budget_key: str = "targets"
    lambda_key: str = "lambdas"
    count_budget: bool = False
    compare_tolerance: float = 0.01
    lambda_range: tuple[float, float] = (1e-3, 1e2)
    finishes: bool = False
    modes: tuple[str, ...] = ("constrained", "penalized")
    equality: bool = False

    @property
    def budget_mode(self) -> str:
        """The mode of a run at a budget: ``constrained`` where the method has it, else its own
        (``projected`` for a method that meets its budget by construction)."""
        return "constrained" if "constrained" in self.modes else self.modes[0]

    @property
    def has_penalty(self) -> bool:
        """Whether a penalised run (a fixed lambda) means anything for this method."""
        return "penalized" in self.modes


class MethodReport:
    """What a method logs and reports: a method names a subclass as its ``reporter``.

    Two sides. An instance reads a live method (``reporter(method)``, :func:`report_of`):
    :meth:`metrics` each epoch, the metric key a target's exact measure is logged under, one
    row per layer for ``summary.json`` and a target's entries there. The class methods read
    those entries back from ``summary.json`` alone, with no method attached to a model (the
    report of ``csparse train``, ``csparse eval``).
    """

    measure_label: ClassVar[str] = "density"  # what the budget counts, in words

    def __init__(self, method: SparsityMethod) -> None:
        self.method = method

    # -- a live method ---------------------------------------------------------------------
    def metrics(self) -> dict[str, float]:
        """Metrics of the method's current state, by name (e.g. ``density/<layer>``)."""
        return {}

    def measure_key(self, target: Target) -> str | None:
        """The metric key that holds ``target``'s exact measure, if one does."""
        return None

    def rows(self) -> list[dict[str, Any]]:
        """One row per layer for the report and ``summary.json`` (each with ``name``)."""
        return []

    def describe(self, target: Target, surrogate: float | None, exact: float) -> dict[str, Any]:
        """Entries of ``target``'s summary beyond the generic ones."""
        return {}

    # -- summary.json alone ------------------------------------------------------------------
    @classmethod
    def format_target(cls, entry: dict[str, Any]) -> str:
        """``<measure> <value> <= <budget>?`` for a target's summary entry."""
        return f"{entry['measure']} {cls.measure_label} {entry['value']:.4g} <= {entry['budget']:.4g}?"

    @classmethod
    def format_rows(
        cls, rows: list[dict[str, Any]], targets: list[dict[str, Any]], measures: dict[str, Any]
    ) -> list[str]:
        """Report lines for this method's rows (a table per layer)."""
        return []

    @classmethod
    def format_phase(cls, name: str, info: dict[str, Any]) -> list[str]:
        """Report lines for what this method's phase ``name`` measured."""
        return []


def report_of(method: SparsityMethod) -> MethodReport:
    """The reporter of a live method."""
    return type(method).reporter(method)


class WeightsReport(MethodReport):
    """The report of the methods that prune single weights (``rw_l1``, ``rw_l2``, ``focuss``,
    ``lwc``, ``dns``): non-zero weights per layer, model-wise, and each layer's kurtosis. A
    subclass says which tensors are the effective weights (:meth:`weights`) and, where a
    weight counts as zero before it is exactly 0, which are non-zero (:meth:`nonzero`)."""

    def weights(self) -> dict[str, torch.Tensor]:
        """The effective weight of each layer, by name, in layer order."""
        raise NotImplementedError

    def nonzero(self, weight: torch.Tensor) -> torch.Tensor:
        """Where ``weight`` counts as non-zero."""
        return weight.ne(0)

    @torch.no_grad()
    def rows(self) -> list[dict[str, Any]]:
        return self._rows(self.weights())

    def _rows(self, weights: dict[str, torch.Tensor]) -> list[dict[str, Any]]:
        rows = []
        for name, w in weights.items():
            nonzero, n = int(self.nonzero(w).sum()), w.numel()
            rows.append(
                {
                    "name": name,
                    "params": n,
                    "active_params": nonzero,
                    "exact_density": nonzero / n,
                    "value": nonzero / n,
                }
            )
        return rows

    @torch.no_grad()
    def metrics(self) -> dict[str, float]:
        weights = self.weights()  # once: for DNS each is a weight times its mask
        return weight_metrics(self._rows(weights), weights)

    def measure_key(self, target: Target) -> str | None:
        return "density/model" if target.layers is None else f"density/{target.layers[0]}"

    def describe(self, target: Target, surrogate: float | None, exact: float) -> dict[str, Any]:
        return {"epsilon": target.epsilon, "exact_density": exact}

    @classmethod
    def format_target(cls, entry: dict[str, Any]) -> str:
        return f"non-zero weights {entry['exact_density']:.4f} <= {entry['epsilon']:.4f}?"

    @classmethod
    def format_rows(
        cls, rows: list[dict[str, Any]], targets: list[dict[str, Any]], measures: dict[str, Any]
    ) -> list[str]:
        return weight_rows(rows, measures)


class SparsityMethod(ABC):
    """Base class of sparsity methods (see the module docstring for the contract).

    Class attributes: ``name`` (registered name, and the prefix of its default target
    names), ``spec`` (a :class:`MethodSpec`: its options and what configs and ``compare`` need
    to know) and ``reporter`` (a :class:`MethodReport`: what it logs and how the report reads
    its entries of ``summary.json``). What a method can do beyond the core is declared by the
    capabilities it inherits: :class:`Proximal`, :class:`Projectable`, :class:`Freezable`,
    :class:`Foldable`, :class:`HasPhase`, :class:`UnitPruner`.
    """

    name: ClassVar[str] = ""
    spec: ClassVar[MethodSpec] = MethodSpec()
    reporter: ClassVar[type[MethodReport]] = MethodReport

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """A capability's method defined without the capability would never be called: refuse it."""
        super().__init_subclass__(**kwargs)
        for member, capability in CAPABILITY_MEMBERS.items():
            if member in vars(cls) and not any(c.__name__ == capability for c in cls.__mro__):
                raise TypeError(
                    f"{cls.__qualname__} defines {member} but does not inherit constrained_sparsity.{capability}: "
                    f"declare it, class {cls.__name__}({capability}, SparsityMethod)"
                )
        for member in REPORTER_MEMBERS:
            if member in vars(cls):
                raise TypeError(
                    f"{cls.__qualname__} defines {member}: what a method logs and reports is its reporter's "
                    f"(a MethodReport subclass named by `reporter = ...`)"
                )
        if "options" in vars(cls):
            raise TypeError(f"{cls.__qualname__} defines options: declare them as spec = MethodSpec(options=...)")

    # -- building ------------------------------------------------------------------------
    @classmethod
    def from_config(
        cls, model: nn.Module, options: Any, spec: BudgetSpec, context: BuildContext
    ) -> tuple[SparsityMethod, list[Target]] | None:
        """Attach the method to ``model`` as a config declares it, with its targets.

        ``options`` is an instance of ``cls.spec.options`` (or ``None``). Returns ``None`` when
        the options declare nothing to attach. Raise :class:`~constrained_sparsity.errors.ConfigError`
        naming the config key for bad input. The default builds the method with no
        arguments besides the model and takes the budgets of ``spec``
        (:func:`targets_from_spec`).
        """
        method = cls(model)  # type: ignore[call-arg]
        return method, targets_from_spec(method, spec, f"{context.prefix}targets")

    # -- what the problem needs ------------------------------------------------------------
    def layer_names(self) -> list[str]:
        """Names of the layers the method acts on (per-layer targets follow this order)."""
        return []

    def on_targets(self, targets: list[Target]) -> None:  # noqa: B027 - most methods need not know
        """Called by the problem with this method's targets, resolved (a method that meets its
        budgets by construction, a top-k mask, reads them here)."""

    def parameters(self) -> Iterator[nn.Parameter]:
        """The method's own trainable parameters (gates, scales): optimised in their own
        parameter group (``optim.primal.gate_lr``), without weight decay."""
        return iter(())

    def check_target(self, target: Target) -> None:
        """Refuse a target this method cannot measure (``ValueError`` naming the value).

        The default: a proportion in [0, 1], on layers of :meth:`layer_names`.
        """
        if target.epsilon > 1:
            raise ValueError(f"epsilon={target.epsilon!r} should be a number in [0, 1]")
        if target.layers is not None:
            unknown = [n for n in target.layers if n not in self.layer_names()]
            if unknown:
                raise ValueError(f"layers={unknown} are not gated; gated layers are {self.layer_names()}")

    @abstractmethod
    def measure(self, target: Target) -> tuple[torch.Tensor | None, torch.Tensor]:
        """``(surrogate, exact)`` of ``target``'s measure now.

        ``surrogate`` is differentiable in the parameters it should move, or ``None`` when a
        proximal step moves them instead; ``exact`` is the test-time measure (no gradient).
        Both are tensors on the model's device.
        """

    def after_step(self) -> None:  # noqa: B027 - an optional hook: doing nothing is the default
        """Called after every training step (primal, dual and proximal steps done)."""

    # -- state outside the model ---------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            raise ValueError(f"{type(self).__name__} keeps no state outside the model; got keys {sorted(state)}")


def targets_from_spec(method: SparsityMethod, spec: BudgetSpec, key: str = "sparsity.targets") -> list[Target]:
    """``sparsity.targets`` as targets of ``method``: one model-wise budget, or one per layer
    of its :meth:`~SparsityMethod.layer_names` (named ``<name>_model`` / ``<name>_<layer>``)."""
    eps = spec.targets
    lams: Sequence[float | None] = spec.lambdas or [None] * len(eps)
    if spec.per_layer:
        names = method.layer_names()
        if len(eps) != len(names):
            raise ConfigError(f"{key}={spec.raw_targets!r}: {len(eps)} values for {len(names)} gated layers {names}")
        return [
            Target(e, (n,), m, lam, f"{method.name}_{n}", method, spec.restarts)
            for e, n, m, lam in zip(eps, names, spec.measures, lams)
        ]
    return [Target(eps[0], None, spec.measures[0], lams[0], f"{method.name}_model", method, spec.restarts)]


def default_target_name(method: SparsityMethod, target: Target) -> str:
    """A target's name when none is given: ``<method>_model`` or ``<method>_<layers>``; a
    count budget's model-wise target is named after the method (``layers``)."""
    if target.layers is None:
        return method.name if method.spec.count_budget else f"{method.name}_model"
    return f"{method.name}_{'_'.join(target.layers)}"


def weight_metrics(rows: list[dict[str, Any]], weights: dict[str, torch.Tensor]) -> dict[str, float]:
    """``density/<layer>`` (non-zero weights), ``density/model`` and ``kurtosis/<layer>``."""
    out: dict[str, float] = {}
    for row in rows:
        out[f"density/{row['name']}"] = row["exact_density"]
    out["density/model"] = sum(r["active_params"] for r in rows) / sum(r["params"] for r in rows)
    for name, w in weights.items():
        out[f"kurtosis/{name}"] = kurtosis(w)
    return out


def weight_rows(rows: list[dict[str, Any]], measures: dict[str, Any]) -> list[str]:
    """A report table of non-zero weights per layer and model-wise."""
    if not rows:
        return []
    lines = [f"{'layer':<12}{'weights':>10}{'non-zero':>10}{'density':>10}{'kurtosis':>10}"]
    for r in rows:
        k = measures.get(f"kurtosis/{r['name']}", float("nan"))
        lines.append(f"{r['name']:<12}{r['params']:>10}{r['active_params']:>10}{r['exact_density']:>10.4f}{k:>10.1f}")
    params, active = sum(r["params"] for r in rows), sum(r["active_params"] for r in rows)
    lines.append(f"{'model':<12}{params:>10}{active:>10}{active / params:>10.4f}")
    return lines


# -- capabilities: what a method can do beyond the core, declared by inheriting them ---------------
class Proximal(ABC):
    """A method that acts through a proximal step after each primal step (exact zeros: group
    and layer sparsity). The problem calls it for each of the method's targets."""

    @abstractmethod
    def proximal_step_(self, target: Target, strength: float) -> None:
        """In place, after each primal step: the proximal step of ``target``'s regulariser
        with strength ``primal_lr x lambda`` (called only when lambda > 0)."""


class Projectable(ABC):
    """A method that can meet a budget exactly by closing units (the finishing phase, and
    ``SparsityProblem.project_`` in a user's loop)."""

    @abstractmethod
    def project_(self, target: Target) -> dict[str, int]:
        """Close the units that contribute least -- by the method's own rule -- until ``target``
        holds exactly; return how many were closed per layer. Called by the finishing phase
        after :meth:`Freezable.freeze_`, only on a target that is over its budget."""


class Freezable(ABC):
    """A method whose sparsity pattern lives in its own parameters or masks: the finishing
    phase fixes it before training the remaining weights (a method whose pattern is its
    weights, as CGES's, has nothing to fix)."""

    @abstractmethod
    def freeze_(self) -> None:
        """Fix the sparsity pattern at its test-time value for the finishing phase: from now on
        training moves the remaining weights only (the method's own parameters stop, and
        ``after_step`` keeps the pattern if the weights could change it)."""


class Foldable(ABC):
    """A method whose fold into plain layers is more than baking its parametrizations (gates
    folded into BatchNorm, layers merged): compaction starts from its :meth:`fold`."""

    @abstractmethod
    def fold(self, model: nn.Module) -> nn.Module:
        """A copy of ``model`` with this method folded into plain layers (the model untouched)."""


def freeze_(method: SparsityMethod) -> None:
    """Fix ``method``'s sparsity pattern for the finishing phase (nothing to fix unless it is
    :class:`Freezable`)."""
    if isinstance(method, Freezable):
        method.freeze_()


class HasPhase(ABC):
    """A method whose algorithm goes on after the main training with a phase of its own
    (merge and refit), run by the trainer's epoch loop."""

    @abstractmethod
    def after_training(self, model: nn.Module, context: PhaseContext) -> Phase | None:
        """The phase after the main training (e.g. merge and refit), or ``None``."""


class UnitPruner(ABC):
    """A method whose units come from the network's dependency graph: compaction removes its
    closed units from any traced network (not only from chains)."""

    @abstractmethod
    def prune_units_(self, folded: nn.Module) -> dict[str, int]:
        """Remove the closed units from ``folded`` (the model folded, :func:`constrained_sparsity.compact.fold`),
        in place; how many units each group lost."""


CAPABILITY_MEMBERS = {
    "proximal_step_": "Proximal",
    "project_": "Projectable",
    "freeze_": "Freezable",
    "fold": "Foldable",
    "after_training": "HasPhase",
    "prune_units_": "UnitPruner",
}
REPORTER_MEMBERS = (
    "metrics",
    "measure_key",
    "report_rows",
    "describe_target",
    "format_target",
    "format_rows",
    "format_phase",
)
