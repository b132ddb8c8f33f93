"""The one rule for a number in a config, an option or an argument: a real number (an ``int``
or ``float``, never a ``bool``), finite, within bounds."""

from __future__ import annotations

import math
from typing import Any

__all__ = ["finite", "within"]


def finite(value: Any) -> bool:
    """A real number (not a bool) that is neither NaN nor infinite."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def within(
    value: Any,
    low: float | None = None,
    high: float | None = None,
    *,
    above: float | None = None,
    below: float | None = None,
) -> bool:
    """:func:`finite`, ``low <= value <= high`` and ``above < value < below`` (bounds left ``None``
    are not checked)."""
    return (
        finite(value)
        and (low is None or value >= low)
        and (high is None or value <= high)
        and (above is None or value > above)
        and (below is None or value < below)
    )
