"""Deprecated module: Training lives in :mod:`constrained_sparsity.training`."""

import warnings

from .training import *  # noqa: F403
from .training import __all__  # noqa: F401

warnings.warn(
    "constrained_sparsity.train is deprecated; import constrained_sparsity.training", DeprecationWarning, stacklevel=2
)
