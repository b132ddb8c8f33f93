"""Typed run configuration: dataclasses validated on construction, built from nested dicts.

YAML is read at the edge (:func:`load_config`); ``key.sub=value`` overrides are applied to
the nested dict before validation. Unknown keys are refused with the closest valid key.

The ``sparsity`` section names a method (``sparsity.method``: a registered name or
``module:Class``); its options are further keys of the section, validated by the method's
own options dataclass. Methods that are declared beside it (``sparsity.layers``) are
sub-sections named after them.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.resources
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import torch
import yaml

from .data import DATASETS
from .errors import ConfigError, OptionError
from .files import config_text
from .methods import MEASURES, NONE, BudgetSpec, SparsityMethod, get_method, method_names
from .numbers import finite
from .problem import MODES, SCHEMES

__all__ = [
    "Config",
    "DataConfig",
    "FinishConfig",
    "ModelConfig",
    "OptimConfig",
    "SparsityConfig",
    "TrackingConfig",
    "TrainConfig",
    "apply_overrides",
    "config_from_dict",
    "describe_config",
    "load_config",
    "resolve_config",
    "shipped_configs",
]


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-3`` as a float (YAML 1.1 needs ``1.0e-3``)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)

MODELS = ("mlp", "lenet5", "convnet", "resnet20", "resnet32", "resnet56", "wrn16_4", "vit")
WANDB_MODES = ("auto", "online", "offline", "disabled")


def _fail(key: str, value: Any, allowed: str) -> ConfigError:
    return ConfigError(f"{key}={value!r}: {allowed}")


def _check_choice(key: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise _fail(key, value, f"should be one of {', '.join(map(str, choices))}")


def _check_positive(key: str, value: Any) -> None:
    if not (finite(value) and value > 0):
        raise _fail(key, value, "should be a number > 0")


def _check_nonnegative(key: str, value: Any) -> None:
    if not (finite(value) and value >= 0):
        raise _fail(key, value, "should be a finite number >= 0")


# A run's name becomes a directory name: one path component of plain characters.
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._+=-]{0,99}$")
# train.seed, seed + 1 and seed + 2 seed torch generators, which take integers below 2**63.
MAX_SEED = 2**63 - 3


def _check_name(key: str, value: Any) -> None:
    if not (isinstance(value, str) and _NAME.match(value)):
        raise _fail(key, value, "should be a name of letters, digits and . _ - + = (at most 100), not a path")


@dataclass
class DataConfig:
    name: str = "digits"
    root: str | None = None
    download: bool = False
    cache_dir: str | None = None
    mirror: str | None = None
    val_fraction: float = 0.0
    batch_size: int = 128  # the global batch: under torchrun each of N ranks trains on its 1/N slice
    eval_batch_size: int = 4096

    def __post_init__(self) -> None:
        _check_choice("data.name", self.name, DATASETS)
        if not (finite(self.val_fraction) and 0.0 <= self.val_fraction < 1.0):
            raise _fail("data.val_fraction", self.val_fraction, "should be in [0, 1)")
        _check_positive("data.batch_size", self.batch_size)
        _check_positive("data.eval_batch_size", self.eval_batch_size)


@dataclass
class ModelConfig:
    """``name``: a network of the project, or ``module:Class`` for a model class of your own
    (imported from the Python path, built with ``kwargs``; see ``training.build_model``)."""

    name: str = "mlp"
    hidden: list[int] = field(default_factory=lambda: [300, 100])
    activation: str = "relu"
    channels: list[int] = field(default_factory=lambda: [32, 64])  # convnet: its convolutions
    kwargs: dict[str, Any] = field(default_factory=dict)  # module:Class: its constructor's arguments

    def __post_init__(self) -> None:
        if isinstance(self.name, str) and ":" in self.name:
            module, _, qualname = self.name.partition(":")
            if not (module and qualname):
                raise _fail("model.name", self.name, "should be module:Class, e.g. mymodels:MyNet")
        else:
            if self.name not in MODELS:
                raise _fail("model.name", self.name, f"should be one of {', '.join(MODELS)}, or module:Class")
            if self.kwargs:
                raise _fail("model.kwargs", self.kwargs, "is for a model class of your own (model.name: module:Class)")
        _check_choice("model.activation", self.activation, ("relu", "tanh", "sigmoid"))
        for key, widths in (("model.hidden", self.hidden), ("model.channels", self.channels)):
            if any(width <= 0 for width in widths):
                raise _fail(key, widths, "widths should be positive integers")


@dataclass(frozen=True)
class DeclaredMethod:
    """A method the config declares: its class, its options and where it is declared."""

    cls: type[SparsityMethod]
    options: Any
    prefix: str  # "sparsity." or "sparsity.<section>."


@dataclass
class SparsityConfig:
    """What to make sparse and how much: the method, the mode, the budgets.

    ``options`` holds the options of ``method`` (the other keys of the ``sparsity`` section);
    ``sections`` those of methods declared beside it (``sparsity.layers: {...}``).
    """

    method: str = "l0"
    mode: str = "constrained"
    targets: float | list[float] = 0.5
    lambdas: None | float | list[float] = None
    measure: str | list[str] = "exact"
    lambda_init: float = 0.0
    dual_restarts: bool = True
    # Every budget an equality in the game (``Target.equality``): under the budget the
    # multiplier turns negative and reopens units; the run still ends at most at the budget.
    equality: bool = False
    options: Any = None
    sections: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        cls = self.method_class()
        if cls is not None and cls.spec.options is not None and self.options is None:
            self.options = cls.spec.options()
        _check_choice("sparsity.mode", self.mode, MODES)
        for eps in self.target_list():
            if not (finite(eps) and 0.0 <= eps <= 1.0):
                raise _fail("sparsity.targets", self.targets, f"epsilon {eps} is outside [0, 1]")
        lambdas = self.lambda_list()
        for lam in lambdas or []:
            if not (finite(lam) and lam >= 0):
                raise _fail("sparsity.lambdas", self.lambdas, f"lambda {lam} should be >= 0")
        if cls is not None and self.mode == "penalized":
            if lambdas is None:
                raise _fail("sparsity.lambdas", None, "penalized mode needs a lambda per target")
            if len(lambdas) not in (1, len(self.target_list())):
                raise _fail("sparsity.lambdas", self.lambdas, f"needs 1 or {len(self.target_list())} values")
        for declared in self.declarations():
            if self.mode not in declared.cls.spec.modes:
                how = (
                    "it meets its budget by construction: use mode projected"
                    if declared.cls.spec.modes == ("projected",)
                    else f"it runs in mode {' or '.join(declared.cls.spec.modes)}"
                )
                raise _fail("sparsity.mode", self.mode, f"method {declared.cls.name!r} has no such mode; {how}")
        for m in self.measure_list():
            _check_choice("sparsity.measure", m, MEASURES)
        if isinstance(self.measure, list) and len(self.measure) != len(self.target_list()):
            raise _fail("sparsity.measure", self.measure, f"needs one entry per target ({len(self.target_list())})")
        if not (finite(self.lambda_init) and self.lambda_init >= 0):
            raise _fail("sparsity.lambda_init", self.lambda_init, "should be a finite number >= 0")
        if self.equality:
            if self.mode != "constrained":
                raise _fail("sparsity.equality", True, f"needs mode constrained (the mode is {self.mode})")
            for declared in self.declarations():
                if not declared.cls.spec.equality:
                    raise _fail(
                        "sparsity.equality",
                        True,
                        f"method {declared.cls.name!r} cannot aim at its budget from below "
                        "(a negative multiplier does not reopen what it prunes)",
                    )

    def method_class(self) -> type[SparsityMethod] | None:
        """The class ``method`` names (``None`` for ``none``)."""
        return None if self.method == NONE else _method_class("sparsity.method", self.method)

    def declarations(self) -> list[DeclaredMethod]:
        """The declared methods: ``method`` first, then the sections in config order."""
        out = []
        cls = self.method_class()
        if cls is not None:
            out.append(DeclaredMethod(cls, self.options, "sparsity."))
        for name, options in self.sections.items():
            out.append(DeclaredMethod(get_method(name), options, f"sparsity.{name}."))
        return out

    def budget_spec(self) -> BudgetSpec:
        return BudgetSpec(
            mode=self.mode,
            targets=self.target_list(),
            per_layer=self.per_layer,
            lambdas=self.lambda_list(),
            measures=self.measure_list(),
            restarts=self.dual_restarts,
            raw_targets=self.targets,
        )

    @property
    def per_layer(self) -> bool:
        return isinstance(self.targets, list)

    def target_list(self) -> list[float]:
        return [float(t) for t in self.targets] if isinstance(self.targets, list) else [float(self.targets)]

    def lambda_list(self) -> list[float] | None:
        if self.lambdas is None:
            return None
        values = self.lambdas if isinstance(self.lambdas, list) else [self.lambdas]
        if len(values) == 1:
            values = values * len(self.target_list())
        return [float(v) for v in values]

    def measure_list(self) -> list[str]:
        if isinstance(self.measure, list):
            return list(self.measure)
        return [self.measure] * len(self.target_list())

    def to_dict(self) -> dict[str, Any]:
        """The section as a config file writes it: options flat, declared sections nested."""
        out: dict[str, Any] = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name in _GENERIC}
        if self.options is not None:
            out.update(dataclasses.asdict(self.options))
        for name, options in self.sections.items():
            out[name] = dataclasses.asdict(options) if options is not None else {}
        return out


_GENERIC = ("method", "mode", "targets", "lambdas", "measure", "lambda_init", "dual_restarts", "equality")


def _method_class(key: str, spec: Any) -> type[SparsityMethod]:
    if not isinstance(spec, str):
        raise _fail(key, spec, "should be a method name or module:Class")
    try:
        return get_method(spec)
    except ValueError as exc:
        raise _fail(key, spec, str(exc)) from None


def _sections() -> list[str]:
    """Methods declared as sections of ``sparsity`` (not as ``sparsity.method``)."""
    return [n for n in method_names() if not get_method(n).spec.primary]


def _build_sparsity(data: dict, prefix: str) -> SparsityConfig:
    spec = data.get("method", SparsityConfig.method)
    cls = None if spec == NONE else _method_class(f"{prefix}method", spec)
    if cls is not None and not cls.spec.primary:
        raise _fail(f"{prefix}method", spec, f"is declared as a section: {prefix}{spec}: {{...}}")
    option_names = (
        [f.name for f in dataclasses.fields(cls.spec.options)] if cls is not None and cls.spec.options else []
    )
    sections = _sections()
    generic: dict[str, Any] = {}
    options: dict[str, Any] = {}
    declared: dict[str, Any] = {}
    for key, value in data.items():
        if key in _GENERIC:
            generic[key] = value
        elif key in option_names:
            options[key] = value
        elif key in sections:
            declared[key] = value
        else:
            _unknown(key, [*_GENERIC, *option_names, *sections], prefix)
    kwargs = _kwargs(SparsityConfig, generic, prefix)
    if cls is not None and cls.spec.options is not None:
        kwargs["options"] = _build(cls.spec.options, options, prefix)
    kwargs["sections"] = {
        name: _build(get_method(name).spec.options, value, f"{prefix}{name}.") for name, value in declared.items()
    }
    return _construct(SparsityConfig, kwargs, prefix)


LR_SCHEDULES = ("constant", "cosine")


@dataclass
class PrimalConfig:
    name: str = "adam"
    lr: float = 1e-3
    gate_lr: float | None = None
    momentum: float = 0.0
    weight_decay: float = 0.0
    # Learning-rate schedule of the weights: "constant", or "cosine" from lr down to
    # lr * final_lr_factor over the run's steps. The gates keep gate_lr, so that they answer
    # the multiplier until the end (decaying them too left the last epochs just infeasible
    # with no way back: docs/benchmarks.md, tuning log).
    schedule: str = "constant"
    final_lr_factor: float = 0.0

    def __post_init__(self) -> None:
        _check_choice("optim.primal.name", self.name, ("adam", "sgd"))
        _check_choice("optim.primal.schedule", self.schedule, LR_SCHEDULES)
        if not 0.0 <= self.final_lr_factor <= 1.0:
            raise _fail("optim.primal.final_lr_factor", self.final_lr_factor, "should be in [0, 1]")
        _check_positive("optim.primal.lr", self.lr)
        if self.gate_lr is not None:
            _check_positive("optim.primal.gate_lr", self.gate_lr)
        _check_nonnegative("optim.primal.momentum", self.momentum)
        _check_nonnegative("optim.primal.weight_decay", self.weight_decay)


@dataclass
class DualConfig:
    name: str = "sgd"
    lr: float = 1e-2
    momentum: float = 0.0
    kp: float = 0.0
    ki: float = 1.0
    ema_nu: float = 0.0
    # The dual learning rate rises linearly from 0 to lr over this many epochs (0: none), so
    # that the multiplier waits for the weights to learn before it pushes.
    warmup_epochs: float = 0.0

    def __post_init__(self) -> None:
        _check_choice("optim.dual.name", self.name, ("sgd", "adam", "nupi"))
        _check_positive("optim.dual.lr", self.lr)
        _check_nonnegative("optim.dual.momentum", self.momentum)
        _check_nonnegative("optim.dual.kp", self.kp)
        _check_nonnegative("optim.dual.ki", self.ki)
        _check_nonnegative("optim.dual.warmup_epochs", self.warmup_epochs)
        if not (finite(self.ema_nu) and 0.0 <= self.ema_nu < 1.0):
            raise _fail("optim.dual.ema_nu", self.ema_nu, "should be in [0, 1)")


@dataclass
class OptimConfig:
    primal: PrimalConfig = field(default_factory=PrimalConfig)
    dual: DualConfig = field(default_factory=DualConfig)
    scheme: str = "alternating"

    def __post_init__(self) -> None:
        _check_choice("optim.scheme", self.scheme, SCHEMES)
        if self.scheme == "extrapolation" and self.dual.name == "nupi":
            raise _fail("optim.dual.name", "nupi", "cannot be combined with optim.scheme=extrapolation")


SELECT_MODES = ("last", "last_feasible", "best_feasible")


@dataclass
class FinishConfig:
    """The finishing phase after training: fix the sparsity pattern at its test-time value,
    close the units that contribute least until every budget holds, then fine-tune the
    remaining weights with the pattern frozen (docs/method.md).

    ``enabled``: null means on for constrained and projected runs, off for penalized ones
    unless the method ends with it (``MethodSpec.finishes``: rw_l1, rw_l2, focuss, lwc, dns).
    ``epochs``:
    fine-tuning epochs (null: 5 % of ``train.epochs``, at least 1). ``lr``: the fine-tuning
    learning rate (null: ``lr_factor`` x ``optim.primal.lr``), of a fresh optimizer of the
    training's kind (``optim.primal.name``: Adam, or SGD with its momentum).
    """

    enabled: bool | None = None
    epochs: int | None = None
    lr: float | None = None
    lr_factor: float = 1.0
    # The fine-tuning learning rate: a cosine from lr down to 0 over its steps, or constant.
    schedule: str = "cosine"

    def __post_init__(self) -> None:
        _check_choice("finish.schedule", self.schedule, LR_SCHEDULES)
        if self.epochs is not None and self.epochs < 0:
            raise _fail("finish.epochs", self.epochs, "should be an integer >= 0")
        if self.lr is not None:
            _check_positive("finish.lr", self.lr)
        _check_positive("finish.lr_factor", self.lr_factor)


@dataclass
class TrainConfig:
    epochs: int = 20
    seed: int = 0
    threads: int | None = None
    device: str = "cpu"
    deterministic: bool = False
    # Pruned units get exactly-zero gradients; Adam's moments then decay into subnormal
    # floats, which x86 CPUs process tens of times slower. Flushing them to zero costs
    # nothing measurable in accuracy (docs/benchmarks.md).
    flush_denormal: bool = True
    # Which iterate the run returns: the last one, the last one that met every budget, or
    # the feasible one with the lowest validation error (needs data.val_fraction > 0).
    select: str = "last"
    # Start from trained weights: a run directory (the network it returned) or a file with a
    # state_dict ({"model": state_dict} too); loaded before the sparsity method attaches.
    init_from: str | None = None

    def __post_init__(self) -> None:
        _check_choice("train.select", self.select, SELECT_MODES)
        if self.epochs < 0:
            raise _fail("train.epochs", self.epochs, "should be >= 0")
        if self.threads is not None and self.threads <= 0:
            raise _fail("train.threads", self.threads, "should be a positive integer")
        if not 0 <= self.seed <= MAX_SEED:
            raise _fail("train.seed", self.seed, f"should be an integer in [0, {MAX_SEED}]")
        try:
            torch.device(self.device)
        except (RuntimeError, ValueError):
            raise _fail("train.device", self.device, "not a device name (cpu, cuda, cuda:1, mps, ...)") from None


@dataclass
class TrackingConfig:
    wandb: str = "auto"
    project: str = "constrained_sparsity"
    entity: str | None = None
    group: str | None = None
    job_type: str | None = None
    out_dir: str = "runs"
    run_name: str | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        _check_choice("tracking.wandb", self.wandb, WANDB_MODES)
        if self.run_name is not None:
            _check_name("tracking.run_name", self.run_name)
        if not self.out_dir or "\x00" in self.out_dir:
            raise _fail("tracking.out_dir", self.out_dir, "should be a directory path")


@dataclass
class Config:
    """The whole run: data, model, sparsity declaration, optimizers, training, tracking."""

    name: str = "run"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    sparsity: SparsityConfig = field(default_factory=SparsityConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    finish: FinishConfig = field(default_factory=FinishConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def finishing(self, method_finishes: bool = False) -> tuple[bool, int, float]:
        """Whether the finishing phase runs, its fine-tuning epochs and learning rate.

        ``method_finishes``: a method of the run ends with the finishing phase whatever the
        mode (magnitude pruning to the budget and retraining is its last step).
        """
        f = self.finish
        enabled = f.enabled if f.enabled is not None else (method_finishes or self.sparsity.mode != "penalized")
        epochs = f.epochs if f.epochs is not None else max(1, math.ceil(0.05 * self.train.epochs))
        lr = f.lr if f.lr is not None else f.lr_factor * self.optim.primal.lr
        return enabled, epochs, lr

    def __post_init__(self) -> None:
        _check_name("name", self.name)
        if self.model.name == "lenet5" and self.data.name == "digits":
            raise _fail("model.name", "lenet5", "needs 28x28 images (mnist or fashion_mnist), not digits")
        if self.model.name == "convnet" and self.data.name == "digits" and len(self.model.channels) > 3:
            raise _fail("model.channels", self.model.channels, "8x8 digits allow at most 3 poolings")
        if self.train.select == "best_feasible" and self.data.val_fraction <= 0:
            raise _fail(
                "train.select", "best_feasible", "needs a validation split (data.val_fraction > 0) to rank iterates"
            )

    def to_dict(self) -> dict:
        """The resolved config as nested dicts, in the shape of a config file."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for key, value in out.items():
            if isinstance(value, SparsityConfig):
                out[key] = value.to_dict()
            elif dataclasses.is_dataclass(value):
                out[key] = dataclasses.asdict(value)
        return out


# -- building from dicts ---------------------------------------------------------------------
def _type_ok(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if hint is Any:
        return True
    if origin in (Union, types.UnionType):
        return any(_type_ok(value, arg) for arg in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if origin is list:
        (item,) = typing.get_args(hint)
        return isinstance(value, list) and all(_type_ok(v, item) for v in value)
    if origin is dict:
        return isinstance(value, dict) and all(isinstance(k, str) for k in value)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _describe(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(hint))
    if origin is list:
        return f"a list of {_describe(typing.get_args(hint)[0])}"
    if origin is dict:
        return "a mapping of names to values"
    return "null" if hint is type(None) else getattr(hint, "__name__", str(hint))


def _unknown(key: Any, names: list[str], prefix: str) -> None:
    close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.5)
    hint = f"; did you mean {prefix}{close[0]}?" if close else f"; valid keys: {', '.join(names)}"
    full = f"{prefix}{key}"
    raise ConfigError(f"unknown config key {full!r}{hint}")


def _kwargs(cls: type, data: dict, prefix: str) -> dict[str, Any]:
    """``data`` checked against ``cls``'s fields and types; nested dataclasses built."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in names:
            _unknown(key, names, prefix)
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = _build(hint, value, f"{full}.")
        else:
            if not _type_ok(value, hint):
                raise ConfigError(f"{full}={value!r}: should be {_describe(hint)}")
            kwargs[key] = value
    return kwargs


def _construct(cls: type, kwargs: dict[str, Any], prefix: str) -> Any:
    try:
        return cls(**kwargs)
    except OptionError as exc:  # a method's option: its key is relative to where it is declared
        raise ConfigError(f"{prefix}{exc.key}={exc.value!r}: {exc.allowed}") from None
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: {exc}") from None


def _build(cls: type, data: Any, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}={data!r}: should be a mapping of keys to values")
    if cls is SparsityConfig:
        return _build_sparsity(data, prefix)
    return _construct(cls, _kwargs(cls, data, prefix), prefix)


def config_from_dict(data: dict) -> Config:
    """Validate a nested dict and build a :class:`Config` (raises :class:`ConfigError`)."""
    return _build(Config, data, "")


def _parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key=value, e.g. train.epochs=5")
    key, raw = text.split("=", 1)
    if not key:
        raise ConfigError(f"override {text!r}: empty key")
    try:
        value = yaml.load(raw, Loader=_Loader) if raw != "" else None
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``a.b=value`` overrides (values parsed as YAML) to a nested dict, in place."""
    for text in overrides:
        path, value = _parse_override(text)
        node = data
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: {part!r} is not a section")
            node = child
        node[path[-1]] = value
    return data


def read_config_dict(path: str | Path) -> dict:
    """The mapping in a YAML config file (safe loading: plain values only, no objects)."""
    path = Path(path)
    text = config_text(path)
    try:
        data = yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {str(exc).splitlines()[0]}") from None
    except RecursionError:
        raise ConfigError(f"{path}: invalid YAML: nested too deeply") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level should be a mapping of keys to values")
    return data


def shipped_configs() -> dict[str, Path]:
    """The configs shipped with the package (``constrained_sparsity/configs``), by name."""
    folder = Path(str(importlib.resources.files("constrained_sparsity") / "configs"))
    return {p.stem: p for p in sorted(folder.glob("*.yaml"))} if folder.is_dir() else {}


def describe_config(path: Path) -> str:
    """The first comment line of a config file: its one-line description."""
    for line in config_text(path).splitlines():
        if line.startswith("#"):
            return line.lstrip("#").strip()
        if line.strip():
            break
    return ""


def resolve_config(name: str | Path) -> tuple[Path, str]:
    """The config file ``name`` means, and where it was found.

    A file wins (``"file"``); otherwise the shipped config of that name, with or without
    ``.yaml`` (``"shipped"``).
    """
    path = Path(name)
    if path.is_file():
        return path, "file"
    shipped = shipped_configs()
    stem = path.name[: -len(".yaml")] if path.name.endswith(".yaml") else path.name
    if str(path.parent) == "." and stem in shipped:
        return shipped[stem], "shipped"
    if path.exists() or path.suffix or len(path.parts) > 1:
        return path, "file"  # reading it says what is wrong with it
    close = difflib.get_close_matches(stem, list(shipped), n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]}?" if close else "; csparse configs lists the shipped ones"
    raise ConfigError(f"no config file or shipped config named {str(name)!r}{hint}")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config -- a file, or a shipped config by name -- (or start from the
    defaults), apply overrides, validate."""
    data = read_config_dict(resolve_config(path)[0]) if path is not None else {}
    return config_from_dict(apply_overrides(data, list(overrides or [])))
