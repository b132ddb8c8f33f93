"""constrained_sparsity: train sparse networks to a sparsity budget declared as a constraint.

The budget is a Lagrangian constraint solved by gradient descent-ascent on its multiplier
(Cooper 1.0); penalized training is the same game with the multiplier frozen. Sparsity
methods (L0 gates, layer sparsity, or your own) plug in through one interface,
:class:`SparsityMethod`.

Typical use::

    import constrained_sparsity as cs
    gates = cs.attach_l0(model)                        # L0 gates on every Linear / Conv2d
    problem = cs.SparsityProblem(model, gates, [cs.Target(epsilon=0.3)])
    opt = cs.build_optimizer(problem)
    for x, y in data:
        cs.train_step(problem, opt, x, y)
"""

from .compact import compact, count_flops, count_params
from .compare import bisect_lambda, compare, compare_methods, joint_search
from .config import Config, load_config
from .data import Dataset, load_dataset
from .errors import (
    CheckpointError,
    ConfigError,
    CSparseError,
    DataError,
    NetworkError,
    OptionError,
    TrainingDiverged,
    TrainingInterrupted,
)
from .evaluation import error_rate
from .export import load_compact, save_compact
from .methods import (
    CGES,
    CGESUnits,
    Foldable,
    Freezable,
    HardConcreteGate,
    HasPhase,
    L0Gates,
    L0Units,
    LayerReport,
    LayerSparsity,
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
    attach_ast,
    attach_cges,
    attach_cges_units,
    attach_dns,
    attach_l0,
    attach_l0_units,
    attach_layer_sparsity,
    attach_lwc,
    fold_l0,
    get_method,
    merge_layers,
    register_method,
    report_of,
    targets_from_spec,
)
from .models import MLP, ConvNet, LeNet5Caffe, ResNet
from .problem import (
    DualOptimizer,
    PrimalOptimizer,
    SparsityProblem,
    build_optimizer,
    scheduled_lr,
    train_step,
)
from .runs import evaluate
from .training import RunResult, format_report, run

__version__ = "0.1.0"

__all__ = [
    "CGES",
    "CGESUnits",
    "CSparseError",
    "CheckpointError",
    "Config",
    "ConfigError",
    "ConvNet",
    "DataError",
    "NetworkError",
    "Dataset",
    "DualOptimizer",
    "HardConcreteGate",
    "L0Gates",
    "L0Units",
    "LayerReport",
    "LayerSparsity",
    "LeNet5Caffe",
    "ResNet",
    "MLP",
    "OptionError",
    "Phase",
    "PhaseContext",
    "PrimalOptimizer",
    "RunResult",
    "Foldable",
    "Freezable",
    "HasPhase",
    "MethodReport",
    "MethodSpec",
    "Projectable",
    "Proximal",
    "SparsityMethod",
    "UnitPruner",
    "WeightsReport",
    "SparsityProblem",
    "Target",
    "TrainingDiverged",
    "TrainingInterrupted",
    "attach_ast",
    "attach_cges",
    "attach_cges_units",
    "attach_dns",
    "attach_l0",
    "attach_l0_units",
    "attach_layer_sparsity",
    "attach_lwc",
    "bisect_lambda",
    "compare_methods",
    "joint_search",
    "build_optimizer",
    "compact",
    "count_flops",
    "count_params",
    "compare",
    "error_rate",
    "evaluate",
    "fold_l0",
    "format_report",
    "get_method",
    "report_of",
    "targets_from_spec",
    "load_compact",
    "load_config",
    "load_dataset",
    "merge_layers",
    "register_method",
    "run",
    "save_compact",
    "scheduled_lr",
    "train_step",
]
