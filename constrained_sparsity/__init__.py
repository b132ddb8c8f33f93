"""constrained_sparsity: train sparse networks to a sparsity budget declared as a constraint.

The budget is a Lagrangian constraint solved by gradient descent-ascent on its multiplier
(Cooper 1.0); penalized training is the same game with the multiplier frozen.

Typical use::

    import constrained_sparsity as cs
    gates = cs.attach_l0(model)                        # L0 gates on every Linear / Conv2d
    problem = cs.SparsityProblem(model, gates, [cs.Target(epsilon=0.3)])
    opt = cs.build_optimizer(problem)
    for x, y in data:
        cs.train_step(problem, opt, x, y)
"""

from .compact import compact, evaluate, load_compact, save_compact
from .compare import bisect_lambda, compare
from .config import Config, load_config
from .data import Dataset, load_dataset
from .errors import ConfigError, CSparseError, DataError, TrainingDiverged, TrainingInterrupted
from .hard_concrete import HardConcreteGate, L0Gates, LayerReport, attach_l0, fold_l0
from .layer_sparsity import LayerSparsity, attach_layer_sparsity, merge_layers
from .models import MLP, LeNet5Caffe
from .problem import (
    DualOptimizer,
    LayerTarget,
    PrimalOptimizer,
    SparsityProblem,
    Target,
    build_optimizer,
    scheduled_lr,
    train_step,
)
from .train import RunResult, error_rate, format_report, run

__version__ = "0.1.0"

__all__ = [
    "CSparseError",
    "Config",
    "ConfigError",
    "DataError",
    "Dataset",
    "DualOptimizer",
    "HardConcreteGate",
    "L0Gates",
    "LayerReport",
    "LayerSparsity",
    "LayerTarget",
    "LeNet5Caffe",
    "MLP",
    "PrimalOptimizer",
    "RunResult",
    "SparsityProblem",
    "Target",
    "TrainingDiverged",
    "TrainingInterrupted",
    "attach_l0",
    "attach_layer_sparsity",
    "bisect_lambda",
    "compact",
    "compare",
    "evaluate",
    "fold_l0",
    "load_compact",
    "merge_layers",
    "save_compact",
    "build_optimizer",
    "error_rate",
    "format_report",
    "load_config",
    "load_dataset",
    "run",
    "scheduled_lr",
    "train_step",
]
