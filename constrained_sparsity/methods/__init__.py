"""Sparsity methods: one module each, behind one interface (:mod:`.base`), found by name.

``sparsity.method`` in a config takes a registered name (``l0``; ``layers`` is declared as
the section ``sparsity.layers``) or ``module:Class`` for a method importable on the Python
path -- a user's own subclass of :class:`SparsityMethod`, used without registering it.
:func:`register_method` adds a class under its ``name``.
"""

from __future__ import annotations

import dataclasses
import difflib

from ..specs import import_spec
from .base import (
    MEASURES,
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
    UnitPruner,
    WeightsReport,
    report_of,
    targets_from_spec,
)
from .cges import CGES, CGESOptions, attach_cges
from .cges_units import CGESUnits, CGESUnitsOptions, attach_cges_units
from .dns import DNS, DNSOptions, attach_dns
from .l0 import HardConcreteGate, L0Gates, L0Options, LayerReport, attach_l0, fold_l0
from .l0_units import L0Units, L0UnitsOptions, attach_l0_units
from .layers import LayersOptions, LayerSparsity, attach_layer_sparsity, merge_layers
from .lwc import LWC, LWCOptions, attach_lwc
from .reweighted import FOCUSS, ASTOptions, ReweightedL1, ReweightedL2, attach_ast

__all__ = [
    "ASTOptions",
    "DNS",
    "DNSOptions",
    "FOCUSS",
    "LWC",
    "LWCOptions",
    "MEASURES",
    "ReweightedL1",
    "ReweightedL2",
    "NONE",
    "BudgetSpec",
    "BuildContext",
    "CGES",
    "CGESOptions",
    "CGESUnits",
    "CGESUnitsOptions",
    "HardConcreteGate",
    "L0Gates",
    "L0Options",
    "L0Units",
    "L0UnitsOptions",
    "LayerReport",
    "LayerSparsity",
    "LayersOptions",
    "Phase",
    "PhaseContext",
    "Foldable",
    "Freezable",
    "HasPhase",
    "MethodReport",
    "WeightsReport",
    "report_of",
    "targets_from_spec",
    "MethodSpec",
    "Projectable",
    "Proximal",
    "SparsityMethod",
    "UnitPruner",
    "Target",
    "attach_ast",
    "attach_cges",
    "attach_cges_units",
    "attach_dns",
    "attach_l0",
    "attach_l0_units",
    "attach_layer_sparsity",
    "attach_lwc",
    "fold_l0",
    "get_method",
    "merge_layers",
    "method_names",
    "method_spec",
    "register_method",
]

NONE = "none"  # sparsity.method: none -- a dense network (or only sections such as sparsity.layers)

_REGISTRY: dict[str, type[SparsityMethod]] = {}


def _check_options(cls: type[SparsityMethod]) -> None:
    options = cls.spec.options
    if options is not None and not (isinstance(options, type) and dataclasses.is_dataclass(options)):
        raise ValueError(f"{cls.__qualname__}.spec.options={options!r} should be a dataclass or None")


def register_method(cls: type[SparsityMethod]) -> type[SparsityMethod]:
    """Register ``cls`` under ``cls.name`` (usable as a class decorator)."""
    if not (isinstance(cls, type) and issubclass(cls, SparsityMethod)):
        raise TypeError(f"{cls!r} is not a subclass of SparsityMethod")
    if not cls.name or cls.name == NONE or ":" in cls.name:
        raise ValueError(f"{cls.__name__}.name={cls.name!r}: a method needs a name, not {NONE!r} and without ':'")
    _check_options(cls)
    taken = _REGISTRY.get(cls.name)
    if taken is not None and taken is not cls:
        raise ValueError(f"method name {cls.name!r} is taken by {taken.__module__}.{taken.__qualname__}")
    _REGISTRY[cls.name] = cls
    return cls


register_method(L0Gates)
register_method(L0Units)
register_method(LayerSparsity)
register_method(CGES)
register_method(CGESUnits)
register_method(ReweightedL1)
register_method(ReweightedL2)
register_method(FOCUSS)
register_method(LWC)
register_method(DNS)


def method_names() -> list[str]:
    """The registered method names."""
    return sorted(_REGISTRY)


def get_method(spec: str) -> type[SparsityMethod]:
    """The method class ``spec`` names: a registered name or ``module:Class``.

    Raises:
        ValueError: unknown name (with the closest registered one), a module that does not
            import, or a class that is not a :class:`SparsityMethod`.
    """
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"method={spec!r} should be a registered name or module:Class")
    if ":" not in spec:
        if spec in _REGISTRY:
            return _REGISTRY[spec]
        close = difflib.get_close_matches(spec, list(_REGISTRY), n=1, cutoff=0.5)
        hint = f"did you mean {close[0]}? " if close else ""
        primary = [n for n in method_names() if _REGISTRY[n].spec.primary]
        sections = [n for n in method_names() if not _REGISTRY[n].spec.primary]
        raise ValueError(
            f"unknown method; {hint}methods: {', '.join(primary)}"
            + (f" (declared as sections: {', '.join(sections)})" if sections else "")
            + f", {NONE}, or module:Class for a method of your own"
        )
    qualname = spec.partition(":")[2]
    obj = import_spec(spec)
    if not (isinstance(obj, type) and issubclass(obj, SparsityMethod)):
        raise ValueError(f"{qualname} is not a subclass of constrained_sparsity.methods.SparsityMethod")
    if not obj.name:
        raise ValueError(f"{qualname}.name is empty: a method needs a name (the prefix of its metrics)")
    _check_options(obj)
    return obj


def method_spec(method: SparsityMethod | type[SparsityMethod]) -> str:
    """How a config names ``method``: its registered name, or ``module:Class``."""
    cls = method if isinstance(method, type) else type(method)
    if _REGISTRY.get(cls.name) is cls:
        return cls.name
    return f"{cls.__module__}:{cls.__qualname__}"
