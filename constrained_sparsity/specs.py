"""``module:Class``: a class a config names by where it lives on the Python path (a user's own
model or sparsity method). Importing runs the module's code, as ``import`` would: a config
names only code its user trusts."""

from __future__ import annotations

import importlib

__all__ = ["import_spec"]


def import_spec(spec: str) -> object:
    """The object ``module:qualified.name`` names.

    Raises:
        ValueError: the module does not import, or has no such name (one line each).
    """
    module_name, _, qualname = spec.partition(":")
    try:
        obj: object = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"cannot import module {module_name!r} ({exc})") from None
    for part in qualname.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"module {module_name!r} has no {qualname!r}")
        obj = getattr(obj, part)
    return obj
