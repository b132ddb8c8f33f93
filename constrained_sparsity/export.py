"""Saving compact networks: a state_dict with an architecture description, and a
``torch.export`` program that loads without this package.

``model.pt`` holds ``{"architecture", "input_shape", "sparse", "meta", "state_dict"}``
(plain tensors; weights of layers with per-weight zeros as CSR where that is smaller) and is
read with ``torch.load(weights_only=True)``. ``model.pt2`` is ``torch.export.save`` of the
network, exported on the CPU in float32. ``architecture.json`` repeats the description.

A network that is not a chain (compacted through its unit graph, ``l0_units``) is saved as
``{"format": "units", "rebuild", "widths", "input_shape", "meta", "state_dict"}``: ``rebuild``
names its model (a ``model.name`` of the project, or the user's ``module:Class`` with its
``kwargs``, imported from the Python path as a config's would be), ``widths`` the sizes of
every Conv2d / Linear / BatchNorm, ``folded_batchnorm`` the BatchNorms folded into the layer
before them (``{BatchNorm: layer}``: an ``nn.Identity`` in their place, the layer given a
bias); loading builds that model, gives its layers the saved sizes and loads the weights --
no code is pickled.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import math
import re
import warnings
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .compact import CompactModel, SelectInputs, fast_pooling
from .errors import CheckpointError
from .files import first_line, load_torch_file
from .models import RESNETS, Attention, ViT, user_model

__all__ = [
    "architecture",
    "build_architecture",
    "check_architecture",
    "load_compact",
    "load_units",
    "save_compact",
    "save_sequential",
]

# The largest layer a saved description may declare (elements of one weight); no network this
# tool writes comes near it, and a hostile description cannot make loading allocate more.
MAX_LAYER_ELEMENTS = 1 << 31
_NAME = re.compile(r"^[A-Za-z0-9_]+$")
_PADDING_MODES = ("zeros", "reflect", "replicate", "circular")


def architecture(module: nn.Sequential) -> list[dict[str, Any]]:
    """The layers of a plain ``nn.Sequential`` as JSON-able dicts (see :func:`build_architecture`)."""
    arch = []
    for name, m in module.named_children():
        if isinstance(m, nn.Linear):
            arch.append(
                {"name": name, "type": "Linear", "in": m.in_features, "out": m.out_features, "bias": m.bias is not None}
            )
        elif isinstance(m, nn.Conv2d):
            arch.append(
                {
                    "name": name,
                    "type": "Conv2d",
                    "in": m.in_channels,
                    "out": m.out_channels,
                    "kernel": list(m.kernel_size),
                    "stride": list(m.stride),
                    "padding": m.padding if isinstance(m.padding, str) else list(m.padding),  # or "same" / "valid"
                    "dilation": list(m.dilation),
                    "padding_mode": m.padding_mode,
                    "bias": m.bias is not None,
                }
            )
        elif isinstance(m, nn.MaxPool2d):
            arch.append(
                {
                    "name": name,
                    "type": "MaxPool2d",
                    "kernel": m.kernel_size,
                    "stride": m.stride,
                    "padding": m.padding,
                    "dilation": m.dilation,
                    "ceil_mode": m.ceil_mode,
                }
            )
        elif isinstance(m, nn.Flatten):
            arch.append({"name": name, "type": "Flatten", "start_dim": m.start_dim, "end_dim": m.end_dim})
        elif isinstance(m, SelectInputs):
            arch.append({"name": name, "type": "SelectInputs", "index": m.index.tolist()})
        elif isinstance(m, nn.ReLU):
            arch.append({"name": name, "type": "ReLU"})
        else:  # Dropout / Identity are the identity at inference
            arch.append({"name": name, "type": "Identity"})
    return arch


def _tuple_or_int(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value  # JSON turns tuples into lists; ints, strings stay


def _is_int(v: Any, low: int = 0) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and low <= v < MAX_LAYER_ELEMENTS


def _int_or_pair(v: Any, low: int) -> bool:
    if isinstance(v, list):
        return len(v) == 2 and all(_is_int(x, low) for x in v)
    return _is_int(v, low)


def check_architecture(arch: Any) -> None:
    """Refuse a description that :func:`build_architecture` should not build (``ValueError``
    naming the entry): unknown layer types, missing or ill-typed settings, names that are not
    plain identifiers, layers larger than :data:`MAX_LAYER_ELEMENTS`."""
    if not isinstance(arch, list):
        raise ValueError("the architecture is not a list of layers")
    seen = set()
    for i, spec in enumerate(arch):
        where = f"architecture entry {i}"
        if not isinstance(spec, dict):
            raise ValueError(f"{where} is not a mapping")
        name, kind = spec.get("name"), spec.get("type")
        if not isinstance(name, str) or not _NAME.match(name) or name in seen:
            raise ValueError(f"{where}: name {name!r} is not a new plain identifier")
        seen.add(name)
        bad: list[str] = []
        if kind == "Linear":
            bad = [k for k in ("in", "out") if not _is_int(spec.get(k))]
            bad += [] if isinstance(spec.get("bias"), bool) else ["bias"]
            if not bad and spec["in"] * spec["out"] >= MAX_LAYER_ELEMENTS:
                bad = ["in x out"]
        elif kind == "Conv2d":
            bad = [k for k in ("in", "out") if not _is_int(spec.get(k), 1)]
            bad += [k for k in ("kernel", "stride") if not _int_or_pair(spec.get(k), 1)]
            bad += [] if _int_or_pair(spec.get("dilation", 1), 1) else ["dilation"]
            padding = spec.get("padding")
            bad += [] if padding in ("same", "valid") or _int_or_pair(padding, 0) else ["padding"]
            bad += [] if spec.get("padding_mode", "zeros") in _PADDING_MODES else ["padding_mode"]
            bad += [] if isinstance(spec.get("bias"), bool) else ["bias"]
            if not bad:
                kernel = spec["kernel"] if isinstance(spec["kernel"], list) else [spec["kernel"]] * 2
                if spec["in"] * spec["out"] * math.prod(kernel) >= MAX_LAYER_ELEMENTS:
                    bad = ["size"]
        elif kind == "MaxPool2d":
            bad = [k for k in ("kernel", "stride") if not _int_or_pair(spec.get(k), 1)]
            bad += [] if _int_or_pair(spec.get("padding", 0), 0) else ["padding"]
            bad += [] if _int_or_pair(spec.get("dilation", 1), 1) else ["dilation"]
            bad += [] if isinstance(spec.get("ceil_mode", False), bool) else ["ceil_mode"]
        elif kind == "Flatten":
            bad = [k for k in ("start_dim", "end_dim") if not _is_int(spec.get(k, 1), -8) or abs(spec.get(k, 1)) > 8]
        elif kind == "SelectInputs":
            index = spec.get("index")
            if not isinstance(index, list) or len(index) >= MAX_LAYER_ELEMENTS or not all(_is_int(v) for v in index):
                bad = ["index"]
        elif kind not in ("ReLU", "Identity"):
            raise ValueError(f"{where}: layer type {kind!r} is not one this tool writes")
        if bad:
            raise ValueError(f"{where} ({kind} {name!r}): bad {', '.join(bad)}")


def build_architecture(arch: list[dict[str, Any]]) -> nn.Sequential:
    """The ``nn.Sequential`` an :func:`architecture` describes (weights uninitialised).

    Check a description from a file with :func:`check_architecture` first.
    """
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    for spec in arch:
        kind = spec["type"]
        if kind == "Linear":
            layers[spec["name"]] = nn.Linear(spec["in"], spec["out"], bias=spec["bias"])
        elif kind == "Conv2d":
            layers[spec["name"]] = nn.Conv2d(
                spec["in"],
                spec["out"],
                tuple(spec["kernel"]),
                tuple(spec["stride"]),
                _tuple_or_int(spec["padding"]),  # a list, or "same" / "valid"
                tuple(spec.get("dilation", (1, 1))),  # files of earlier versions hold no dilation
                padding_mode=spec.get("padding_mode", "zeros"),
                bias=spec["bias"],
            )
        elif kind == "MaxPool2d":
            pool = nn.MaxPool2d(
                _tuple_or_int(spec["kernel"]),
                _tuple_or_int(spec["stride"]),
                _tuple_or_int(spec.get("padding", 0)),
                _tuple_or_int(spec.get("dilation", 1)),
                ceil_mode=spec.get("ceil_mode", False),
            )
            layers[spec["name"]] = fast_pooling(pool)
        elif kind == "Flatten":
            layers[spec["name"]] = nn.Flatten(spec.get("start_dim", 1), spec.get("end_dim", -1))
        elif kind == "SelectInputs":
            layers[spec["name"]] = SelectInputs(torch.tensor(spec["index"]))
        elif kind == "ReLU":
            layers[spec["name"]] = nn.ReLU()
        else:
            layers[spec["name"]] = nn.Identity()
    return nn.Sequential(layers)


def save_compact(
    compacted: CompactModel, out_dir: str | Path, input_shape: Sequence[int], meta: dict[str, Any] | None = None
) -> dict[str, Path]:
    """Write ``model.pt`` (architecture + state_dict), ``model.pt2`` (torch.export) and ``architecture.json``.

    Weights of layers with per-weight zeros are stored as CSR tensors when that is smaller.
    A network ``torch.export`` cannot export (a branch on its data, say) gets no ``model.pt2``
    (a warning says why, and the returned paths have no ``"program"``); ``model.pt`` loads it.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # float32 on the CPU on disk, whatever the caller's device; the caller's module untouched
    module = copy.deepcopy(compacted.module).float().cpu().eval()
    if not _describable(module):
        return _save_units(compacted, module, out, input_shape, meta)
    arch = architecture(module)
    state, stored_sparse = _sparse_state(module, compacted.sparse_weights)
    info = {"architecture": arch, "input_shape": list(input_shape), "sparse": stored_sparse, "meta": meta or {}}
    return _write(out, info, state, module, input_shape)


_DESCRIBED = (nn.Linear, nn.Conv2d, nn.MaxPool2d, nn.Flatten, SelectInputs, nn.ReLU, nn.Dropout, nn.Identity)


def _describable(module: nn.Module) -> bool:
    """Whether :func:`architecture` describes ``module`` whole (a chain of the layers it knows)."""
    return isinstance(module, nn.Sequential) and all(isinstance(m, _DESCRIBED) for m in module.children())


def _sparse_state(module: nn.Module, sparse_layers: Sequence[str]) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """``module``'s state_dict, the weights of ``sparse_layers`` as CSR where that is smaller."""
    state: dict[str, torch.Tensor] = {}
    stored_sparse = []
    for key, value in module.state_dict().items():
        value = value.detach().clone()
        if key.endswith(".weight") and key.rsplit(".", 1)[0] in sparse_layers:
            flat = value.reshape(value.shape[0], -1)
            with warnings.catch_warnings():  # "sparse CSR support is in beta"
                warnings.simplefilter("ignore", UserWarning)
                csr = flat.to_sparse_csr()
            csr_bytes = sum(t.numel() * t.element_size() for t in (csr.values(), csr.col_indices(), csr.crow_indices()))
            if csr_bytes < value.numel() * value.element_size():
                state[key] = csr
                stored_sparse.append({"key": key, "shape": list(value.shape)})
                continue
        state[key] = value
    return state, stored_sparse


def _write(
    out: Path, info: dict[str, Any], state: dict[str, torch.Tensor], module: nn.Module, input_shape: Sequence[int]
) -> dict[str, Path]:
    """``model.pt`` (description + state_dict, written atomically), ``architecture.json`` (the
    description) and ``model.pt2`` (the ``torch.export`` program)."""
    paths = {"model": out / "model.pt", "program": out / "model.pt2", "architecture": out / "architecture.json"}
    tmp = paths["model"].with_suffix(".tmp")
    torch.save({**info, "state_dict": state}, tmp)
    tmp.replace(paths["model"])
    paths["architecture"].write_text(json.dumps(info, indent=2))
    try:
        with _held_back():
            program = _exported(module, input_shape)
    except Exception as exc:  # noqa: BLE001 - torch.export refuses networks in many ways; each is a reason
        paths.pop("program").unlink(missing_ok=True)  # no program of another network left beside model.pt
        warnings.warn(
            f"model.pt2 not written: torch.export cannot export the {type(module).__name__} ({first_line(exc)}); "
            "model.pt holds the network",
            stacklevel=3,
        )
        return paths
    torch.export.save(program, paths["program"])
    return paths


@contextlib.contextmanager
def _held_back() -> Iterator[None]:
    """What ``torch.export`` prints (the graph of a network it cannot export) and logs (through
    torch's own handlers), held back: a failure is said in one line."""
    names = ["torch", *(n for n in logging.root.manager.loggerDict if n.startswith("torch."))]
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL + 1)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _exported(module: nn.Module, input_shape: Sequence[int]) -> torch.export.ExportedProgram:
    example = torch.zeros(2, *input_shape)
    batch = torch.export.Dim("batch", min=1, max=1 << 20)
    return torch.export.export(module, (example,), dynamic_shapes=({0: batch},))


def _widths(module: nn.Module) -> dict[str, dict[str, int]]:
    """The sizes of every layer units change: what turns a freshly built model into the compact one."""
    out = {}
    for name, m in module.named_modules():
        if isinstance(m, Attention):  # its heads: the rows of q, k, v it keeps
            out[name] = {"heads": m.heads}
        elif isinstance(m, nn.Conv2d):
            out[name] = {"in": m.in_channels, "out": m.out_channels, "groups": m.groups}
        elif isinstance(m, nn.Linear):
            out[name] = {"in": m.in_features, "out": m.out_features}
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            out[name] = {"out": m.num_features}
    return out


def _save_units(
    compacted: CompactModel, module: nn.Module, out: Path, input_shape: Sequence[int], meta: dict[str, Any] | None
) -> dict[str, Path]:
    """A network compacted through its unit graph: how to build its model (``rebuild``), every
    layer's sizes and the state_dict; no code is pickled."""
    if compacted.rebuild is None:
        raise ValueError(
            f"a {type(module).__name__} (not an nn.Sequential) is saved with how to build it again: "
            "CompactModel.rebuild = {'name': model.name, 'kwargs': {...}, 'input_shape': [...], 'num_classes': n}"
        )
    state, stored_sparse = _sparse_state(module, compacted.sparse_weights)
    info = {
        "format": "units",
        "rebuild": compacted.rebuild,
        "widths": _widths(module),
        "folded_batchnorm": dict(compacted.folded_batchnorm),
        "input_shape": list(input_shape),
        "sparse": stored_sparse,
        "meta": meta or {},
    }
    return _write(out, info, state, module, input_shape)


def _resize_(module: nn.Module, widths: dict[str, dict[str, int]]) -> None:
    """Give ``module``'s layers the saved sizes (uninitialised weights, to be loaded)."""
    layers = dict(module.named_modules())
    unknown = sorted(set(widths) - set(layers))
    if unknown:
        raise ValueError(f"the saved layers {unknown[:3]} are not in the rebuilt model")
    for name, w in widths.items():
        m = layers[name]
        if not (
            isinstance(w, dict) and all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in w.values())
        ):
            raise ValueError(f"layer {name}: sizes {w} should be positive integers")
        if w.get("out", 1) * w.get("in", 1) * math.prod(getattr(m, "kernel_size", (1,))) > MAX_LAYER_ELEMENTS:
            raise ValueError(f"layer {name}: sizes {w} are larger than any network this tool writes")
        if isinstance(m, Attention):
            if "heads" not in w:
                raise ValueError(f"layer {name}: an attention's sizes name its heads")
            m.heads = w["heads"]
        elif isinstance(m, nn.Conv2d):
            m.in_channels, m.out_channels, m.groups = w["in"], w["out"], w.get("groups", 1)
            m.weight = nn.Parameter(torch.empty(w["out"], w["in"] // m.groups, *m.kernel_size))
            if m.bias is not None:
                m.bias = nn.Parameter(torch.empty(w["out"]))
        elif isinstance(m, nn.Linear):
            m.in_features, m.out_features = w["in"], w["out"]
            m.weight = nn.Parameter(torch.empty(w["out"], w["in"]))
            if m.bias is not None:
                m.bias = nn.Parameter(torch.empty(w["out"]))
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.num_features = w["out"]
            if m.affine:
                m.weight, m.bias = nn.Parameter(torch.empty(w["out"])), nn.Parameter(torch.empty(w["out"]))
            if m.track_running_stats:
                m.running_mean, m.running_var = torch.zeros(w["out"]), torch.ones(w["out"])
        else:
            raise ValueError(f"layer {name} ({type(m).__name__}) is not a layer units resize")


def _unfold_batchnorm_(module: nn.Module, folded: Any) -> None:
    """Give a rebuilt model the shape of one whose BatchNorms were folded (``{BatchNorm: layer}``):
    an ``nn.Identity`` in each BatchNorm's place, a bias on the layer it was folded into."""
    if not (isinstance(folded, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in folded.items())):
        raise ValueError("its folded_batchnorm entry should map BatchNorm names to layer names")
    layers = dict(module.named_modules())
    for bn_name, layer_name in folded.items():
        bn, layer = layers.get(bn_name), layers.get(layer_name)
        if not (isinstance(bn, nn.modules.batchnorm._BatchNorm) and isinstance(layer, (nn.Conv2d, nn.Linear))):
            raise ValueError(f"folded BatchNorm {bn_name!r} into {layer_name!r}: not a BatchNorm and a layer there")
        if layer.bias is None:
            layer.bias = nn.Parameter(torch.empty(layer.weight.shape[0]))
        parent, _, child = bn_name.rpartition(".")
        setattr(module.get_submodule(parent), child, nn.Identity())


def load_units(data: dict[str, Any]) -> tuple[nn.Module, dict[str, Any]]:
    """The network a ``format: units`` description and its ``state_dict`` give (``ValueError`` if they do not fit)."""
    spec = data.get("rebuild")
    if not (isinstance(spec, dict) and isinstance(spec.get("name"), str) and isinstance(data.get("widths"), dict)):
        raise ValueError("its description (rebuild, widths) is malformed")
    name, shape, classes = spec["name"], tuple(spec.get("input_shape", ())), spec.get("num_classes")
    if not (shape and all(isinstance(v, int) and v > 0 for v in shape) and isinstance(classes, int) and classes > 0):
        raise ValueError("its rebuild entry lacks input_shape / num_classes")
    if name in RESNETS:
        module = RESNETS[name](shape[0], classes)
    elif name == "vit":
        module = ViT(shape, classes)
    elif ":" in name:  # a model class of the user's: imported as the config's model.name would be
        module = user_model(name, dict(spec.get("kwargs") or {}), shape, classes)
    else:
        raise ValueError(f"model {name!r} is not one it can build")
    _resize_(module, data["widths"])
    _unfold_batchnorm_(module, data.get("folded_batchnorm", {}))
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    sparse = {s.get("key"): s.get("shape") for s in data.get("sparse", []) if isinstance(s, dict)}
    state = {}
    for key, value in data["state_dict"].items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"{key} is not a tensor")
        if key in sparse:
            if not (value.layout == torch.sparse_csr and list(expected.get(key, ())) == sparse[key]):
                raise ValueError(f"sparse weight {key}: shape {sparse[key]} does not match {expected.get(key)}")
            value = value.to_dense().reshape(sparse[key])
        state[key] = value
    try:
        module.load_state_dict(state)
    except RuntimeError as exc:
        raise ValueError(f"its weights do not fit the saved sizes ({str(exc).splitlines()[0]})") from None
    info = {k: v for k, v in data.items() if k != "state_dict"}
    return module.eval(), info


def load_compact(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """Load ``model.pt`` written by :func:`save_compact`: the module and its description.

    Read with ``weights_only=True``; the description is checked and every stored tensor
    must have the shape the description gives it before anything is built.

    Raises:
        CheckpointError: the file is not such a network (one line naming it).
    """
    data = load_torch_file(path, "saved network")
    if isinstance(data, dict) and data.get("format") == "units" and isinstance(data.get("state_dict"), dict):
        try:
            return load_units(data)
        except ValueError as exc:
            raise CheckpointError(f"{path}: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("state_dict"), dict) or "architecture" not in data:
        raise CheckpointError(f"{path}: not a network saved by csparse (no architecture and state_dict)")
    try:
        return _load_checked(data)
    except ValueError as exc:
        raise CheckpointError(f"{path}: {exc}") from None


def _load_checked(data: dict[str, Any]) -> tuple[nn.Sequential, dict[str, Any]]:
    check_architecture(data["architecture"])
    sparse = data.get("sparse", [])
    if not isinstance(sparse, list) or not all(isinstance(s, dict) and isinstance(s.get("key"), str) for s in sparse):
        raise ValueError("the list of sparse weights is malformed")
    shapes = {s["key"]: s.get("shape") for s in sparse}
    with torch.device("meta"):  # shapes only: nothing is allocated
        expected = {k: tuple(v.shape) for k, v in build_architecture(data["architecture"]).state_dict().items()}
    stored = data["state_dict"]
    if set(stored) != set(expected):
        raise ValueError(f"its weights {sorted(set(stored) ^ set(expected))[:4]} do not match its architecture")
    state = {}
    for key, value in stored.items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"{key} is not a tensor")
        if key in shapes:
            shape = shapes[key]
            if not (isinstance(shape, list) and tuple(shape) == expected[key] and value.layout == torch.sparse_csr):
                raise ValueError(f"sparse weight {key}: shape {shape} does not match {expected[key]}")
            if tuple(value.shape) != (shape[0], math.prod(shape[1:])):
                raise ValueError(f"sparse weight {key}: stored shape {tuple(value.shape)} does not match {shape}")
            value = value.to_dense().reshape(shape)
        elif tuple(value.shape) != expected[key] or value.layout != torch.strided:
            raise ValueError(f"{key}: shape {tuple(value.shape)}, its architecture says {expected[key]}")
        state[key] = value
    module = build_architecture(data["architecture"])
    module.load_state_dict(state)
    info = {k: v for k, v in data.items() if k != "state_dict"}
    return module.eval(), info


def save_sequential(model: nn.Sequential, path: str | Path) -> None:
    """``{"architecture": [...], "sparse": [], "state_dict": ...}`` (CPU tensors), readable by :func:`load_compact`."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save({"architecture": architecture(model), "sparse": [], "state_dict": state}, tmp)
    tmp.replace(path)
