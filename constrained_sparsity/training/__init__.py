"""Training: from a config to a trained, checkpointed, logged run (the edge of the library).

:func:`run` owns data, logging, checkpoints and the console; :mod:`.loop` plays every phase
of a run through one epoch loop; :mod:`.build` makes the run's objects from a config.
"""

from .build import build_methods, build_model, build_trainer, dataset_for, nonnegative_inputs
from .checkpoint import CHECKPOINT, CHECKPOINT_VERSION, FINISHED, SELECTED, load_checkpoint, save_checkpoint
from .report import format_report
from .run import RunResult, run

__all__ = [
    "CHECKPOINT",
    "CHECKPOINT_VERSION",
    "FINISHED",
    "SELECTED",
    "RunResult",
    "build_methods",
    "build_model",
    "build_trainer",
    "dataset_for",
    "format_report",
    "load_checkpoint",
    "nonnegative_inputs",
    "run",
    "save_checkpoint",
]
