"""From a config to the objects of a run: dataset, model, sparsity methods, problem, optimizers."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import Config
from ..data import Dataset, load_dataset
from ..errors import CheckpointError, ConfigError
from ..files import first_line, load_torch_file
from ..methods import BuildContext, SparsityMethod, Target
from ..models import MLP, RESNETS, ConvNet, LeNet5Caffe, ViT, user_model
from ..problem import DualOptimizer, PrimalOptimizer, SparsityProblem, build_optimizer

__all__ = [
    "build_methods",
    "build_model",
    "build_trainer",
    "dataset_for",
    "load_initial_weights",
    "nonnegative_inputs",
]


def build_model(cfg: Config, dataset: Dataset) -> nn.Module:
    """The config's network for the dataset's inputs and classes.

    ``model.name: module:Class`` builds a model class of your own, imported from the Python
    path (name only code you trust, as for ``import``), with ``model.kwargs``; its constructor's
    parameters named ``input_shape``, ``in_channels``, ``in_features`` and ``num_classes`` that
    ``kwargs`` leaves out are filled from the data. Its output for one example must be
    ``(1, num_classes)``.
    """
    shape = dataset.input_shape
    if ":" in cfg.model.name:
        return _user_model(cfg, dataset)
    if cfg.model.name == "lenet5" and shape[1:] != (28, 28):
        raise ConfigError(f"model.name='lenet5' needs 1x28x28 images; dataset {dataset.name!r} has {shape}")
    try:
        if cfg.model.name == "mlp":
            return MLP(int(math.prod(shape)), cfg.model.hidden, dataset.num_classes, cfg.model.activation)
        if cfg.model.name == "convnet":
            return ConvNet(shape, cfg.model.channels, cfg.model.hidden, dataset.num_classes)
        if cfg.model.name == "vit":
            if len(shape) != 3:
                raise ConfigError(f"model.name='vit' needs images (C, H, W); dataset has {shape}")
            return ViT(shape, dataset.num_classes)
        if cfg.model.name in RESNETS:
            if len(shape) != 3:
                raise ConfigError(f"model.name={cfg.model.name!r} needs images (C, H, W); dataset has {shape}")
            return RESNETS[cfg.model.name](shape[0], dataset.num_classes)
        return LeNet5Caffe(shape[0], dataset.num_classes)
    except (RuntimeError, MemoryError) as exc:  # e.g. model.hidden=[100000000]: more memory than there is
        raise ConfigError(
            f"model.hidden={cfg.model.hidden!r}: cannot allocate the network ({first_line(exc)})"
        ) from None


def _user_model(cfg: Config, dataset: Dataset) -> nn.Module:
    spec, shape = cfg.model.name, tuple(dataset.input_shape)
    try:
        model = user_model(spec, cfg.model.kwargs, shape, dataset.num_classes)
    except ValueError as exc:
        key = "model.kwargs" if "(...) failed" in str(exc) else "model.name"
        value = cfg.model.kwargs if key == "model.kwargs" else spec
        raise ConfigError(f"{key}={value!r}: {exc}") from None
    try:
        with torch.no_grad():
            out = model.eval()(dataset.train_x[:1].to(torch.get_default_dtype()))
        model.train()
    except Exception as exc:  # noqa: BLE001
        raise ConfigError(
            f"model.name={spec!r}: its forward fails on one {shape} example ({first_line(exc)})"
        ) from None
    if not (isinstance(out, torch.Tensor) and tuple(out.shape) == (1, dataset.num_classes)):
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ConfigError(f"model.name={spec!r}: one example gives {got}, expected (1, {dataset.num_classes}) logits")
    if not any(p.requires_grad for p in model.parameters()):
        raise ConfigError(f"model.name={spec!r}: the model has no trainable parameter")
    return model


def nonnegative_inputs(dataset: Dataset) -> bool:
    """Whether every training input is >= 0 (pixel intensities, say)."""
    return bool(dataset.train_x.min() >= 0)


def dataset_for(cfg: Config) -> Dataset:
    """The dataset a config names, with its split (downloads only if ``data.download``)."""
    d = cfg.data
    return load_dataset(
        d.name,
        root=d.root,
        download=d.download,
        cache_dir=d.cache_dir,
        mirror=d.mirror,
        val_fraction=d.val_fraction,
        seed=cfg.train.seed,
    )


def build_methods(cfg: Config, model: nn.Module, dataset: Dataset) -> tuple[list[SparsityMethod], list[Target]]:
    """Attach the sparsity methods the config declares to ``model``, with their targets.

    The method of ``sparsity.method`` comes first, then the sections (``sparsity.layers``)
    in the order the config gives them.
    """
    context = BuildContext(
        tuple(dataset.input_shape),
        nonnegative_inputs(dataset),
        steps_per_epoch=math.ceil(len(dataset.train_y) / cfg.data.batch_size),
        epochs=cfg.train.epochs,
    )
    spec = cfg.sparsity.budget_spec()
    methods: list[SparsityMethod] = []
    targets: list[Target] = []
    for declared in cfg.sparsity.declarations():
        built = declared.cls.from_config(model, declared.options, spec, replace(context, prefix=declared.prefix))
        if built is None:
            continue
        method, method_targets = built
        methods.append(method)
        targets.extend(method_targets)
    if cfg.sparsity.equality:
        targets = [replace(t, equality=True) for t in targets]
    return methods, targets


def _run_network(run_dir: Path) -> dict[str, torch.Tensor]:
    """The network a run directory returned, as plain weights: its config's model with its
    methods attached, the returned weights loaded (finished > selected > last checkpoint),
    then every parametrized layer baked at its eval-mode weights (L0 gates at their
    test-time values, theta = q * omega, W * T, pruning masks applied)."""
    from ..config import config_from_dict, read_config_dict
    from ..graph import bake
    from .checkpoint import CHECKPOINT, FINISHED, SELECTED

    try:
        cfg = config_from_dict(read_config_dict(run_dir / "config.yaml"))
    except (ConfigError, OSError) as exc:
        raise ConfigError(f"train.init_from={str(run_dir)!r}: its config.yaml: {first_line(exc)}") from None
    cfg = replace(cfg, train=replace(cfg.train, init_from=None))  # its own start is already in its weights
    model, _, _, _ = build_trainer(cfg, dataset_for(cfg))
    for name in (FINISHED, SELECTED, CHECKPOINT):  # in the order a run returns its network
        if (run_dir / name).is_file():
            data = load_torch_file(run_dir / name, "initial weights")
            break
    else:
        raise ConfigError(f"train.init_from={str(run_dir)!r}: no {CHECKPOINT} there")
    try:
        model.load_state_dict(data["model"])
    except (RuntimeError, KeyError, TypeError) as exc:
        raise ConfigError(f"train.init_from={str(run_dir)!r}: {first_line(exc)}") from None
    return {k: v.detach() for k, v in bake(model).state_dict().items()}


def _initial_state(source: Path) -> dict[str, torch.Tensor]:
    """The weights ``train.init_from`` names: a run directory's returned network, or a file."""
    if not source.exists():
        raise ConfigError(f"train.init_from={str(source)!r}: no such run directory or file")
    if source.is_dir():
        if not (source / "config.yaml").is_file():
            raise ConfigError(f"train.init_from={str(source)!r}: not a run directory (no config.yaml)")
        return _run_network(source)
    try:
        data = load_torch_file(source, "initial weights")
    except CheckpointError as exc:
        raise ConfigError(f"train.init_from={str(source)!r}: {exc}") from None
    state = data.get("model", data) if isinstance(data, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"train.init_from={str(source)!r}: holds no state_dict of tensors")
    return state


def load_initial_weights(model: nn.Module, source: str | Path) -> None:
    """Load the weights of a trained network into ``model`` before a method attaches.

    ``source``: a run directory (the network it returned, with its sparsity baked in) or a
    file holding a state_dict (or ``{"model": state_dict}``) of the same architecture.
    A sparsity method's own state (gates, masks, scales) is not carried over.
    """
    state = _initial_state(Path(source))
    wanted = model.state_dict()
    missing = sorted(set(wanted) - set(state))
    wrong = sorted(k for k in wanted if k in state and state[k].shape != wanted[k].shape)
    if missing or wrong:
        raise ConfigError(
            f"train.init_from={str(source)!r}: does not fit the model "
            f"({'missing ' + ', '.join(missing[:3]) if missing else 'shapes differ: ' + ', '.join(wrong[:3])})"
        )
    with torch.no_grad():
        for key, value in wanted.items():
            value.copy_(state[key])


def build_trainer(
    cfg: Config, dataset: Dataset, device: torch.device | str = "cpu"
) -> tuple[nn.Module, list[SparsityMethod], SparsityProblem, Any]:
    """Model, attached methods, problem and optimizers of a config, as a run builds them."""
    model = build_model(cfg, dataset).to(device)
    if cfg.train.init_from:
        load_initial_weights(model, cfg.train.init_from)
    methods, targets = build_methods(cfg, model, dataset)
    try:
        problem = SparsityProblem(model, methods, targets, mode=cfg.sparsity.mode, lambda_init=cfg.sparsity.lambda_init)
    except ValueError as exc:
        raise ConfigError(f"sparsity: {exc}") from None
    problem.to(device)
    p, d = cfg.optim.primal, cfg.optim.dual
    optimizers = build_optimizer(
        problem,
        PrimalOptimizer(p.name, p.lr, p.gate_lr, p.momentum, p.weight_decay),
        DualOptimizer(d.name, d.lr, d.momentum, d.kp, d.ki, d.ema_nu),
        scheme=cfg.optim.scheme,
    )
    return model, methods, problem, optimizers
