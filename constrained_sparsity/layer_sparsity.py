"""Deprecated module: The layer-sparsity method lives in :mod:`constrained_sparsity.methods.layers`."""

import warnings

from .methods.layers import *  # noqa: F403
from .methods.layers import __all__  # noqa: F401

warnings.warn(
    "constrained_sparsity.layer_sparsity is deprecated; import constrained_sparsity.methods.layers",
    DeprecationWarning,
    stacklevel=2,
)
