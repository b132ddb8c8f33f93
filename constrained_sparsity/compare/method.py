"""How a comparison talks to the compared method: its overrides in, its measures out."""

from __future__ import annotations

import json
import math
from typing import Any

from ..config import Config, DeclaredMethod
from ..errors import ConfigError
from ..methods import method_spec
from ..numbers import within
from ..training import RunResult

__all__ = ["ComparedMethod", "method_of", "parse_budget", "parse_lambda", "slug"]


def parse_budget(text: str) -> float | list[float]:
    """``"0.3"`` -> 0.3 (model-wise); ``"0.5,0.3,0.8"`` -> a per-layer list."""
    try:
        values = [float(v) for v in str(text).split(",")]
    except ValueError:
        raise ConfigError(f"--targets {text!r}: expected a number or comma-separated numbers") from None
    if not all(math.isfinite(v) for v in values):
        raise ConfigError(f"--targets {text!r}: budgets should be finite numbers")
    return values[0] if len(values) == 1 and "," not in str(text) else values


def parse_lambda(text: str) -> float:
    """One value of ``--lambdas``: a finite number >= 0."""
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"--lambdas {text!r}: expected a number") from None
    if not within(value, 0):
        raise ConfigError(f"--lambdas {text!r}: every λ should be a finite number >= 0")
    return value


def slug(budget: Any) -> str:
    if isinstance(budget, list):
        return "_".join(f"{b:g}" for b in budget)
    return f"{float(budget):g}"


class ComparedMethod:
    """How a comparison talks to the compared method: overrides in, measures out.

    Everything comes from the method's class attributes and from the runs' target entries
    (``summary.json``'s ``targets``): no method is named here.
    """

    def __init__(self, declared: DeclaredMethod) -> None:
        self.cls = declared.cls
        self.prefix = declared.prefix
        spec = declared.cls.spec
        self.tol = spec.compare_tolerance
        self.spec = method_spec(declared.cls)
        self.names: list[str] = []  # target names, learnt from the first run
        label = declared.cls.reporter.measure_label
        self.label = label if spec.count_budget else f"exact {label}"
        # the mode of its runs at a budget: constrained, or projected for a method that meets
        # its budget by construction (it has no penalty, so no lambda to search)
        self.own_mode = spec.budget_mode
        self.has_penalty = spec.has_penalty

    def _budget(self, budget: Any) -> str:
        if self.cls.spec.count_budget:
            values = budget if isinstance(budget, list) else [budget]
            if not all(float(b).is_integer() for b in values):
                raise ConfigError(
                    f"--targets {slug(budget)}: {self.cls.reporter.measure_label} budgets are whole numbers"
                )
            return json.dumps([int(b) for b in budget] if isinstance(budget, list) else int(budget))
        return json.dumps(budget)

    def constrained(self, budget: Any) -> list[str]:
        return [f"sparsity.mode={self.own_mode}", f"{self.prefix}{self.cls.spec.budget_key}={self._budget(budget)}"]

    def penalized(self, budget: Any, lam: list[float]) -> list[str]:
        lams = json.dumps(lam if isinstance(budget, list) else lam[0])
        return [
            "sparsity.mode=penalized",
            "sparsity.equality=false",  # the penalty has a fixed lambda: no side to aim from
            f"{self.prefix}{self.cls.spec.budget_key}={self._budget(budget)}",
            f"{self.prefix}{self.cls.spec.lambda_key}={lams}",
        ]

    def _targets(self, result: RunResult) -> list[dict[str, Any]]:
        found = [t for t in result.targets if t["method"] == self.spec]
        if not self.names:
            self.names = [t["name"] for t in found]
        return found

    def measure(self, result: RunResult, budget: Any) -> list[float]:
        return [float(t["exact"]) for t in self._targets(result)]

    def history_measure(self, row: dict[str, Any], result: RunResult) -> list[float]:
        return [
            float(row.get(t["metric"], float("nan"))) if t["metric"] else float("nan") for t in self._targets(result)
        ]

    def multiplier_keys(self, result: RunResult) -> list[str]:
        return [f"constraint/{t['name']}/multiplier" for t in self._targets(result)]

    def per_layer(self, result: RunResult) -> dict[str, Any]:
        rows = [r for r in result.layers if r.get("method") == self.spec]
        return {r["name"]: round(float(r["value"]), 4) for r in rows if "value" in r}

    def budgets(self, budget: Any) -> list[float]:
        return [float(b) for b in budget] if isinstance(budget, list) else [float(budget)]


def method_of(cfg: Config) -> ComparedMethod:
    declared = cfg.sparsity.declarations()
    if len(declared) > 1:
        names = ", ".join(d.cls.name for d in declared)
        raise ConfigError(f"compare: the config declares budgets for several methods ({names}); compare one at a time")
    if not declared:
        raise ConfigError(
            "compare: the config declares no sparsity budget (sparsity.method, or a section such as sparsity.layers)"
        )
    return ComparedMethod(declared[0])
