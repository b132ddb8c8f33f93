"""Deprecated module: The L0 method (hard-concrete gates) lives in :mod:`constrained_sparsity.methods.l0`."""

import warnings

from .methods.l0 import *  # noqa: F403
from .methods.l0 import __all__  # noqa: F401

warnings.warn(
    "constrained_sparsity.hard_concrete is deprecated; import constrained_sparsity.methods.l0",
    DeprecationWarning,
    stacklevel=2,
)
