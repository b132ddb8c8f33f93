"""Compaction: a trained sparse network becomes a smaller dense one of standard layers.

Masks that multiply by zero save nothing; :func:`compact` removes what the zeros make dead:

1. L0 gates are folded into the weights at their test-time values (:func:`fold_l0`), and
   mergeable layers of a layer-sparsity run are merged (:func:`merge_layers`).
2. In a chain of ``Linear`` / ``Conv2d`` layers separated by ReLU, max-pooling, flattening or
   dropout, a hidden unit (a linear output neuron, a conv output channel) is *dead* when
   nothing it computes is used -- every weight that reads it is 0 -- or when it computes a
   constant -- its incoming weights are all 0. A dead unit is removed from both layers; a
   constant unit ``relu(b_j)`` is first folded into the next layer's bias (for a conv,
   only when the next layer is linear or the constant is 0, which keeps it exact).
   The pass over the chain repeats until nothing changes: removing a layer's units can leave
   units of the layers before it unread.
   A linear layer may end with 0 units (the network then outputs the constant its biases
   give); a convolution whose every channel is pruned keeps one all-zero channel, with a
   warning, because PyTorch's ``Conv2d`` cannot have 0 output channels.
   Zero input columns of a first linear layer are removed only with ``select_inputs``
   (a :class:`SelectInputs` layer then picks the kept input features, so the module still
   takes the original input).
3. 2x2 max-pooling layers become :class:`MaxPool2x2` (an ``nn.MaxPool2d`` computing the
   same values as maxima of strided slices: PyTorch's CPU kernel for
   ``MaxPool2d`` on NCHW tensors took 3.5-5x longer here than LeNet-5's first convolution
   before it (batch 256), a cost that pruning later layers does not reduce;
   :func:`fast_pooling` gives any network the same layer, so that dense and compact
   networks are timed alike).
4. The result is an ``nn.Sequential`` of standard layers; :func:`save_compact` writes it as a
   state_dict plus an architecture description (weights of per-weight gated layers stored
   as CSR where that is smaller) and as a ``torch.export`` program that loads without this
   package.

Per-weight (unstructured) zeros do not shrink a dense layer and dense kernels run no faster
on them; the report says so.
"""

from __future__ import annotations

import copy
import json
import math
import statistics
import time
import warnings
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .hard_concrete import fold_l0, layer_output_shapes, plain_layer_like
from .layer_sparsity import merge_layers

__all__ = [
    "CompactModel",
    "MaxPool2x2",
    "SelectInputs",
    "active_inputs",
    "compact",
    "fast_pooling",
    "count_flops",
    "count_params",
    "describe",
    "load_compact",
    "measure_latency",
    "save_compact",
]

_BETWEEN = (nn.ReLU, nn.MaxPool2d, nn.Flatten, nn.Dropout, nn.Identity)


@dataclass
class CompactModel:
    """The compact network and what was removed."""

    module: nn.Sequential
    removed: dict[str, int] = field(default_factory=dict)  # layer -> units removed from its output
    sparse_weights: list[str] = field(default_factory=list)  # layers with per-weight zeros left


# -- counting ----------------------------------------------------------------------------------
def count_params(model: nn.Module, nonzero: bool = False) -> int:
    """Parameters of ``model`` (or only the non-zero ones)."""
    total = 0
    for p in model.parameters():
        total += int((p != 0).sum()) if nonzero else p.numel()
    return total


def count_flops(model: nn.Module, input_shape: Sequence[int]) -> int:
    """FLOPs per example of the ``Linear`` and ``Conv2d`` layers: 2 x multiply-accumulates.

    Bias additions, activations and pooling are not counted. Zero weights count like any
    other (a dense kernel multiplies them).
    """
    layers = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    flops = 0
    for m, shape in layer_output_shapes(model, layers, torch.zeros(1, *input_shape)):
        if isinstance(m, nn.Linear):
            flops += 2 * m.in_features * m.out_features * math.prod(shape[1:-1])
        else:
            kh, kw = m.kernel_size
            flops += 2 * shape[1] * shape[2] * shape[3] * (m.in_channels // m.groups) * kh * kw
    return flops


def describe(model: nn.Sequential, input_shape: Sequence[int]) -> str:
    """Widths of the network, e.g. ``784-300-100-10`` or ``conv 20-50 | fc 800-500-10``."""
    convs = [m.out_channels for m in model if isinstance(m, nn.Conv2d)]
    linears = [m for m in model if isinstance(m, nn.Linear)]
    fc = "-".join(str(w) for w in [linears[0].in_features, *(m.out_features for m in linears)]) if linears else ""
    if convs:
        return f"conv {'-'.join(str(c) for c in convs)} | fc {fc}"
    return fc


# -- compaction --------------------------------------------------------------------------------
def _chain(model: nn.Module) -> list[tuple[str, nn.Module]]:
    if not isinstance(model, nn.Sequential):
        raise TypeError(
            f"compaction needs an nn.Sequential of Linear / Conv2d layers with ReLU, MaxPool2d, Flatten or "
            f"Dropout between them (got {type(model).__name__})"
        )
    items = list(model.named_children())
    for name, m in items:
        if not isinstance(m, (nn.Linear, nn.Conv2d, SelectInputs, *_BETWEEN)):
            raise TypeError(
                f"compaction cannot see through module {name!r} ({type(m).__name__}); supported between layers: "
                "ReLU, MaxPool2d, Flatten, Dropout, Identity"
            )
        if isinstance(m, nn.Conv2d) and m.groups != 1:
            raise TypeError(f"layer {name!r}: grouped convolutions are not compacted")
    return items


@torch.no_grad()
def compact(
    model: nn.Module,
    input_shape: Sequence[int],
    merge: bool = False,
    input_nonnegative: bool = False,
    select_inputs: bool = False,
) -> CompactModel:
    """The smaller dense network equivalent to ``model`` at test time (see the module doc).

    Args:
        model: an ``nn.Sequential`` (gated by :func:`attach_l0` or not); left untouched.
        input_shape: shape of one example, e.g. ``(1, 28, 28)``.
        merge: merge layers whose parameters are all non-negative first (layer sparsity).
        input_nonnegative: for ``merge``: the input is >= 0, so the first layer may merge.
        select_inputs: when the first layer is linear (after an optional ``Flatten``), drop
            its zero input columns too, behind a :class:`SelectInputs` layer that picks the
            kept input features (``torch.index_select``); the module still takes the
            original input. This is the architecture of the L0 paper's tables (e.g.
            784-300-100 -> 198-233-100 counts the selected inputs).
    """
    folded = fold_l0(model)
    if merge:
        folded = merge_layers(folded, input_nonnegative=input_nonnegative)  # type: ignore[arg-type]
    items = _chain(folded)
    positions = [i for i, (_, m) in enumerate(items) if isinstance(m, (nn.Linear, nn.Conv2d))]
    removed: dict[str, int] = {}
    changed = True
    while changed:  # removing a layer's units can leave units of the layers before it unread
        changed = False
        for i, j in zip(positions[:-1], positions[1:]):
            changed |= _remove_dead_units(items, i, j, removed)
    if select_inputs:
        items = _select_inputs(items)
    module = fast_pooling(nn.Sequential(OrderedDict(items))).eval()
    sparse = [
        n
        for n, m in module.named_children()
        if isinstance(m, (nn.Linear, nn.Conv2d))
        and bool(m.weight.any())  # not an empty layer, nor one a blank channel feeds
        and float((m.weight == 0).float().mean()) > 0.5
    ]
    return CompactModel(module, removed, sparse)


def _remove_dead_units(items: list[tuple[str, nn.Module]], i: int, j: int, removed: dict[str, int]) -> bool:
    """Remove the dead units of layer ``items[i]`` and their inputs of ``items[j]``, the next
    linear / conv layer; ``removed`` counts them. Whether anything changed."""
    (name, layer), (next_name, nxt) = items[i], items[j]
    between = [m for _, m in items[i + 1 : j]]
    units = layer.weight.shape[0]
    if units == 0:
        return False  # a linear layer with nothing left
    # The next layer's weights grouped by the unit they read: (out, units, inputs per unit).
    if isinstance(nxt, nn.Linear):
        if nxt.in_features % units:
            return False  # not a plain flatten of this layer's output
        w_next = nxt.weight.view(nxt.out_features, units, nxt.in_features // units)
        const_ok_anyway = True  # a constant input folds exactly into a linear bias
    else:
        w_next = nxt.weight.flatten(2)
        const_ok_anyway = tuple(nxt.padding) == (0, 0)  # every window sees the whole constant map
    unused = (w_next == 0).all(dim=2).all(dim=0)
    zero_in = (layer.weight.flatten(1) == 0).all(dim=1)
    bias = layer.bias if layer.bias is not None else torch.zeros(units, dtype=layer.weight.dtype)
    const = torch.relu(bias) if any(isinstance(m, nn.ReLU) for m in between) else bias
    constant = zero_in & ((const == 0) | const_ok_anyway)
    dead = unused | constant
    if not bool(dead.any()):
        return False
    keep = (~dead).nonzero().squeeze(1)
    blank = isinstance(layer, nn.Conv2d) and keep.numel() == 0
    if blank and units == 1 and not (layer.weight.any() or bias.any() or w_next.any()):
        return False  # already the blank channel of an earlier pass
    fold = dead & ~unused & (const != 0)
    if bool(fold.any()):  # the constant output of a unit with no input goes into the next bias
        contribution = (w_next[:, fold, :].sum(dim=2) * const[fold]).sum(dim=1)
        if nxt.bias is None:
            nxt.bias = nn.Parameter(torch.zeros(nxt.weight.shape[0], dtype=nxt.weight.dtype))
        nxt.bias.add_(contribution)
    if blank:  # torch's conv2d rejects 0 output channels: keep one that outputs exactly 0
        keep = torch.zeros(1, dtype=torch.long)
        warnings.warn(
            f"compact: every output channel of {name!r} is pruned; it keeps one all-zero channel, "
            "because PyTorch's Conv2d cannot have 0 output channels (the outputs are unchanged)",
            stacklevel=4,  # the caller of compact, past torch.no_grad's wrapper
        )
    shrunk = _shrink_out(layer, keep)
    shrunk_next = _shrink_in(nxt, keep, w_next.shape[2] if isinstance(nxt, nn.Linear) else 1)
    if blank:  # its contribution, if any, is already in the next layer's bias
        with torch.no_grad():
            shrunk.weight.zero_()
            if shrunk.bias is not None:
                shrunk.bias.zero_()
            shrunk_next.weight.zero_()  # reads the blank channel only
    items[i], items[j] = (name, shrunk), (next_name, shrunk_next)
    removed[name] = removed.get(name, 0) + units - keep.numel()
    return True


class MaxPool2x2(nn.MaxPool2d):
    """``nn.MaxPool2d(2)`` (stride 2, no padding, floor mode) as the maximum of strided slices.

    The same values as ``nn.MaxPool2d(2)`` (a maximum is exact, NaN propagates in both), in a
    fraction of the time of PyTorch's CPU kernel on NCHW tensors; ``torch.export`` records
    it as slices and ``maximum``, standard operators.
    """

    def __init__(self) -> None:
        super().__init__(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2] // 2 * 2, x.shape[-1] // 2 * 2
        x = x[..., :h, :w]
        rows = torch.maximum(x[..., 0::2, :], x[..., 1::2, :])  # pairs of whole rows first: contiguous reads
        return torch.maximum(rows[..., 0::2], rows[..., 1::2])


def _is_plain_2x2_pool(m: nn.Module) -> bool:
    if not isinstance(m, nn.MaxPool2d) or m.return_indices or m.ceil_mode:
        return False
    pair = lambda v: tuple(v) if isinstance(v, (tuple, list)) else (v, v)  # noqa: E731
    return (
        pair(m.kernel_size) == (2, 2)
        and pair(m.stride) == (2, 2)
        and pair(m.padding) == (0, 0)
        and pair(m.dilation) == (1, 1)
    )


def fast_pooling(model: nn.Module) -> nn.Module:
    """``model`` (changed in place, and returned) with every plain 2x2 max-pooling as :class:`MaxPool2x2`.

    In an ``nn.Sequential``, a ReLU directly followed by a max-pooling also swaps places with
    it: ``relu(maxpool(x)) == maxpool(relu(x))`` exactly (ReLU is monotone), and the ReLU
    then runs on a quarter of the values.
    """
    if _is_plain_2x2_pool(model) and not isinstance(model, MaxPool2x2):
        return MaxPool2x2()
    for name, child in list(model.named_children()):
        setattr(model, name, fast_pooling(child))
    if isinstance(model, nn.Sequential):
        items = list(model._modules.items())
        for i in range(len(items) - 1):
            (a_name, a), (b_name, b) = items[i], items[i + 1]
            if type(a) is nn.ReLU and isinstance(b, nn.MaxPool2d) and not b.return_indices:
                items[i], items[i + 1] = (b_name, b), (a_name, a)
        model._modules.clear()
        model._modules.update(items)
    return model


class SelectInputs(nn.Module):
    """Flatten the input and keep the features at ``index`` (the first layer's open inputs)."""

    def __init__(self, index: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("index", index.to(torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1).index_select(1, self.index)


def _select_inputs(items: list[tuple[str, nn.Module]]) -> list[tuple[str, nn.Module]]:
    first = next(i for i, (_, m) in enumerate(items) if isinstance(m, (nn.Linear, nn.Conv2d)))
    layer = items[first][1]
    if not isinstance(layer, nn.Linear) or any(not isinstance(m, nn.Flatten) for _, m in items[:first]):
        return items  # inputs of a convolution stay as they are
    keep = (layer.weight != 0).any(dim=0).nonzero().squeeze(1)
    shrunk = plain_layer_like(layer, layer.weight.index_select(1, keep), layer.bias)
    return [("select", SelectInputs(keep)), (items[first][0], shrunk), *items[first + 1 :]]


def _shrink_out(layer: nn.Module, keep: torch.Tensor) -> nn.Module:
    bias = layer.bias.index_select(0, keep) if layer.bias is not None else None
    return plain_layer_like(layer, layer.weight.index_select(0, keep), bias)


def _shrink_in(layer: nn.Module, keep: torch.Tensor, per_unit: int) -> nn.Module:
    if isinstance(layer, nn.Linear):  # each kept unit feeds per_unit consecutive inputs (Flatten)
        keep = (keep.view(-1, 1) * per_unit + torch.arange(per_unit).view(1, -1)).reshape(-1)
    return plain_layer_like(layer, layer.weight.index_select(1, keep), layer.bias)


# -- saving and loading ------------------------------------------------------------------------
def _architecture(module: nn.Sequential) -> list[dict[str, Any]]:
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


def _build(arch: list[dict[str, Any]]) -> nn.Sequential:
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
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    module = copy.deepcopy(compacted.module).float().eval()  # float32 on disk; the caller's module untouched
    arch = _architecture(module)
    state: dict[str, torch.Tensor] = {}
    stored_sparse = []
    for key, value in module.state_dict().items():
        value = value.detach().clone()
        if key.endswith("weight") and key.split(".")[0] in compacted.sparse_weights:
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
    info = {"architecture": arch, "input_shape": list(input_shape), "sparse": stored_sparse, "meta": meta or {}}
    paths = {"model": out / "model.pt", "program": out / "model.pt2", "architecture": out / "architecture.json"}
    tmp = paths["model"].with_suffix(".tmp")
    torch.save({**info, "state_dict": state}, tmp)
    tmp.replace(paths["model"])
    paths["architecture"].write_text(json.dumps(info, indent=2))
    example = torch.zeros(2, *input_shape)
    batch = torch.export.Dim("batch", min=1, max=1 << 20)
    program = torch.export.export(module, (example,), dynamic_shapes=({0: batch},))
    torch.export.save(program, paths["program"])
    return paths


def load_compact(path: str | Path) -> tuple[nn.Sequential, dict[str, Any]]:
    """Load ``model.pt`` written by :func:`save_compact`: the module and its description."""
    data = torch.load(path, map_location="cpu", weights_only=True)
    module = _build(data["architecture"])
    state = {}
    shapes = {s["key"]: s["shape"] for s in data["sparse"]}
    for key, value in data["state_dict"].items():
        state[key] = value.to_dense().reshape(shapes[key]) if key in shapes else value
    module.load_state_dict(state)
    info = {k: v for k, v in data.items() if k != "state_dict"}
    return module.eval(), info


def measure_latency(
    model: nn.Module, input_shape: Sequence[int], batch: int, threads: int, repeats: int = 30, warmup: int = 5
) -> float:
    """Median seconds of one forward pass (eval mode, no autograd) at ``batch`` on ``threads``."""
    from .train import set_training

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        set_training(model, False)
        x = torch.rand(batch, *input_shape)
        times = []
        with torch.inference_mode():
            for _ in range(warmup):
                model(x)
            for _ in range(repeats):
                t0 = time.perf_counter()
                model(x)
                times.append(time.perf_counter() - t0)
        return statistics.median(times)
    finally:
        torch.set_num_threads(previous)


# -- run directories ---------------------------------------------------------------------------
def load_trained(run_dir: str | Path) -> tuple[Any, nn.Module, Any]:
    """``(config, model, dataset)`` of a finished run: the returned iterate, gates attached.

    The weights are those the run reported: ``selected_model.pt`` when ``train.select``
    kept an earlier iterate, else the last checkpoint.
    """
    from .checkpoint import load_checkpoint
    from .config import config_from_dict, read_config_dict
    from .errors import ConfigError
    from .train import CHECKPOINT, SELECTED, build_trainer, dataset_for

    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file() or not (run_dir / CHECKPOINT).is_file():
        raise ConfigError(f"{run_dir}: not a run directory (needs config.yaml and {CHECKPOINT})")
    cfg = config_from_dict(read_config_dict(run_dir / "config.yaml"))
    dataset = dataset_for(cfg)
    model, _, _, _ = build_trainer(cfg, dataset)
    summary = run_dir / "summary.json"
    selected = json.loads(summary.read_text()).get("selected_epoch") if summary.is_file() else None
    source = run_dir / SELECTED if selected is not None and (run_dir / SELECTED).is_file() else run_dir / CHECKPOINT
    model.load_state_dict(load_checkpoint(source)["model"])
    return cfg, model.eval(), dataset


def active_inputs(module: nn.Module, input_shape: Sequence[int]) -> list[int]:
    """Input features of each linear layer that can change the output (the L0 paper's widths).

    A feature counts when some weight reads it and the layers before can make it vary: a
    feature from a removed unit or channel (one that is always 0 or constant) does not. So
    these are the read columns of each linear layer of
    ``compact(module, input_shape, select_inputs=True)``. After a flattened convolution
    they count single features (LeNet-5's fc1 reads 45 of 800 in the paper's table), which
    can be fewer than the kept channels' positions that the compact layer holds.
    """
    small = compact(module, input_shape, select_inputs=True).module
    return [int((m.weight != 0).any(dim=0).sum()) for m in small.modules() if isinstance(m, nn.Linear)]


def compact_trained(model: nn.Module, cfg: Any, dataset: Any, select_inputs: bool = True) -> CompactModel:
    """:func:`compact` with what a run's config says: merge after layer sparsity, its input sign."""
    from .train import input_nonnegative

    return compact(
        model,
        tuple(dataset.input_shape),
        merge=cfg.sparsity.layers.enabled,
        input_nonnegative=input_nonnegative(cfg, dataset),
        select_inputs=select_inputs,
    )


def size_summary(dense: nn.Sequential, small: nn.Sequential, input_shape: Sequence[int]) -> dict[str, Any]:
    """Architecture, parameters and FLOPs per example of a network and its compact version."""
    return {
        "architecture_before": describe(dense, input_shape),
        "architecture_after": describe(small, input_shape),
        "params_before": count_params(dense),
        "params_after": count_params(small),
        "flops_before": count_flops(dense, input_shape),
        "flops_after": count_flops(small, input_shape),
    }


def compact_run(run_dir: str | Path, out_dir: str | Path | None = None, select_inputs: bool = True) -> dict[str, Any]:
    """Compact the network of a run directory into ``out_dir`` (default ``RUN_DIR/compact``)."""
    from .train import error_rate

    run_dir = Path(run_dir)
    cfg, model, dataset = load_trained(run_dir)
    shape = tuple(dataset.input_shape)
    source = "trained network"
    if (run_dir / "refit_model.pt").is_file():  # layer sparsity: the merged, refitted network
        model, _ = load_compact(run_dir / "refit_model.pt")
        source = "refit_model.pt (merged and refitted)"
    compacted = compact_trained(model, cfg, dataset, select_inputs)
    folded = fold_l0(model)
    x = dataset.test_x[:512]
    with torch.no_grad():
        diff = float((model(x) - compacted.module(x)).abs().max())
    meta = {"run_dir": str(run_dir), "dataset": cfg.data.name, "root": cfg.data.root}
    paths = save_compact(compacted, Path(out_dir) if out_dir else run_dir / "compact", shape, meta)
    bs = cfg.data.eval_batch_size
    report = {
        "source": source,
        "paths": {k: str(v) for k, v in paths.items()},
        **size_summary(folded, compacted.module, shape),  # type: ignore[arg-type]
        "active_inputs_before": active_inputs(folded, shape),
        "nonzero_params_after": count_params(compacted.module, nonzero=True),
        "test_error_gated": error_rate(model, dataset.test_x, dataset.test_y, bs),  # the source network
        "test_error_compact": error_rate(compacted.module, dataset.test_x, dataset.test_y, bs),
        "max_abs_diff": diff,
        "removed_units": compacted.removed,
        "unstructured_layers": compacted.sparse_weights,
    }
    (Path(paths["model"]).parent / "report.json").write_text(json.dumps(report, indent=2))
    return report


def format_compact_report(r: dict[str, Any]) -> str:
    lines = [
        f"compacted: {r['source']}",
        f"architecture: {r['architecture_before']}  ->  {r['architecture_after']}",
        "active inputs per linear layer (features that can vary, the L0 paper's widths): "
        + "-".join(map(str, r["active_inputs_before"])),
        f"parameters: {r['params_before']} -> {r['params_after']} ({r['nonzero_params_after']} non-zero)",
        f"FLOPs per example: {r['flops_before']} -> {r['flops_after']} "
        f"(ratio {r['flops_after'] / max(r['flops_before'], 1):.3f})",
        f"test error: gated {100 * r['test_error_gated']:.2f} %, compact {100 * r['test_error_compact']:.2f} % "
        f"(max |output difference| {r['max_abs_diff']:.2e})",
    ]
    if r["unstructured_layers"]:
        lines.append(
            f"layers {r['unstructured_layers']} keep per-weight zeros: stored as CSR where smaller, but dense "
            "kernels multiply the zeros, so they gain no speed from them"
        )
    lines.append(f"written: {r['paths']['model']} (state_dict + architecture), {r['paths']['program']} (torch.export)")
    return "\n".join(lines)


def evaluate(
    path: str | Path, batches: Sequence[int] = (1, 256), threads: Sequence[int] = (1, 2), repeats: int = 30
) -> list[dict[str, Any]]:
    """Test error, parameters, FLOPs per example and latency of the networks at ``path``.

    ``path`` is a run directory (the original network with its gates folded in, and its
    compact version: ``RUN_DIR/compact/model.pt`` if written, else compacted now) or a
    compact model written by :func:`save_compact` (``model.pt`` or the ``model.pt2`` program).
    """
    from .data import load_dataset
    from .errors import ConfigError
    from .train import error_rate

    path = Path(path)
    networks: list[tuple[str, nn.Module]] = []
    structure: nn.Sequential | None = None  # of a torch.export program: its layers, from architecture.json
    if path.is_dir():
        cfg, model, dataset = load_trained(path)
        shape = tuple(dataset.input_shape)
        networks.append(("original (gates folded)", fast_pooling(fold_l0(model))))  # pooled as the compact one
        if (path / "refit_model.pt").is_file():
            networks.append(("merged + refit", load_compact(path / "refit_model.pt")[0]))
        saved = path / "compact" / "model.pt"
        if saved.is_file():
            networks.append(("compact", load_compact(saved)[0]))
        else:
            networks.append(("compact", compact_trained(model, cfg, dataset).module))
    elif path.suffix in (".pt", ".pt2") and path.is_file():
        description = path.with_name("architecture.json")
        if path.suffix == ".pt":
            module, info = load_compact(path)
        else:
            if not description.is_file():
                raise ConfigError(f"{path}: no architecture.json beside it to say which data it was trained on")
            info = json.loads(description.read_text())
            module = torch.export.load(path).module()
            structure = _build(info["architecture"])
        meta = info.get("meta", {})
        if "dataset" not in meta:
            raise ConfigError(f"{path}: the description names no dataset")
        dataset = load_dataset(meta["dataset"], root=meta.get("root"))
        shape = tuple(info["input_shape"])
        networks.append((f"compact ({path.name})", module))
    else:
        raise ConfigError(f"{path}: expected a run directory or a compact model (model.pt / model.pt2)")
    rows = []
    for name, module in networks:
        if isinstance(module, nn.Sequential):
            module = module.float()
        row: dict[str, Any] = {"network": name}
        layers = module if isinstance(module, nn.Sequential) else structure
        row["architecture"] = describe(layers, shape) if layers is not None else "-"
        row["params"] = count_params(module)
        row["nonzero_params"] = count_params(module, nonzero=True)
        row["flops"] = count_flops(layers, shape) if layers is not None else None
        row["test_error"] = error_rate(module, dataset.test_x, dataset.test_y, 1024)
        for b in batches:
            for t in threads:
                row[f"latency_ms/b{b}/t{t}"] = 1e3 * measure_latency(module, shape, b, t, repeats=repeats)
        rows.append(row)
    return rows


def format_eval(rows: list[dict[str, Any]]) -> str:
    keys = [k for k in rows[0] if k.startswith("latency_ms/")]
    head = "| network | architecture | params (non-zero) | FLOPs/example | test error | " + " | ".join(
        k.replace("latency_ms/", "ms ").replace("/", " ") for k in keys
    )
    lines = [head + " |", "|" + "---|" * (5 + len(keys))]
    for r in rows:
        flops = "-" if r["flops"] is None else str(r["flops"])
        lat = " | ".join(f"{r[k]:.3f}" for k in keys)
        lines.append(
            f"| {r['network']} | {r['architecture']} | {r['params']} ({r['nonzero_params']}) | {flops} | "
            f"{100 * r['test_error']:.2f} % | {lat} |"
        )
    return "\n".join(lines)
