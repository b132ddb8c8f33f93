"""Reading the files a user points the tool at: one place, no code run, one-line refusals.

Every reader here turns what can go wrong with a file -- missing, a directory, unreadable,
not UTF-8, truncated, corrupt, of another program, hostile -- into a
:class:`~constrained_sparsity.errors.CSparseError` whose message names the file and the
reason in one line (the command line prints it and exits with code 2). Nothing is ever
unpickled: ``.pt`` files are read with ``torch.load(weights_only=True)``, and a
``torch.export`` archive (``.pt2``) is read as a zip file, its weights as raw bytes; the
archive is never handed to ``torch.export.load``, which unpickles weights marked as
pickled and evaluates the program's symbolic expressions with ``sympy.sympify``.
"""

from __future__ import annotations

import json
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointError, ConfigError

__all__ = ["first_line", "load_torch_file", "read_json", "read_jsonl", "read_pt2_weights", "read_text"]

# Larger than any file this tool writes; a declared size over it is refused before reading.
MAX_TENSOR_BYTES = 1 << 32


def first_line(exc: BaseException) -> str:
    """The informative first line of an exception's message (with its type when it is terse)."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    if lines and lines[0].startswith("Error(s) in loading state_dict") and len(lines) > 1:
        return lines[1]  # torch's load_state_dict: the first mismatch, not the heading
    if not lines or len(lines[0]) < 12:
        return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
    return lines[0]


def read_text(path: str | Path, what: str, error: type[Exception] = CheckpointError) -> str:
    """The UTF-8 text of ``path`` (``what`` names the file in messages)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise error(f"{what} not found: {path}") from None
    except IsADirectoryError:
        raise error(f"{what} {path} is a directory, not a file") from None
    except OSError as exc:
        raise error(f"cannot read {what} {path}: {exc.strerror or first_line(exc)}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise error(f"{path}: {what} is not UTF-8 text (byte {exc.start}: 0x{data[exc.start]:02x})") from None


def read_json(path: str | Path, what: str) -> Any:
    """The JSON value in ``path``; refused in one line when it is not JSON."""
    text = read_text(path, what)
    try:
        return json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise CheckpointError(f"{path}: {what} is not valid JSON ({first_line(exc)})") from None


def read_jsonl(path: str | Path) -> tuple[list[dict[str, Any]], int, int]:
    """The rows of a JSON-lines log, and where the good part ends.

    Returns ``(rows, good_bytes, total_bytes)``: the rows read in order up to the first line
    that is not a complete JSON object (a write cut short, say), and the byte length of
    those lines; what follows is left to the caller.
    """
    data = Path(path).read_bytes()
    rows: list[dict[str, Any]] = []
    good = 0
    for line in data.splitlines(keepends=True):
        if not line.endswith(b"\n"):
            break  # the last line, cut short
        try:
            row = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
            break
        if not isinstance(row, dict):
            break
        rows.append(row)
        good += len(line)
    return rows, good, len(data)


def _unpickler_reason(exc: Exception) -> str:
    """What torch's weights-only unpickler objected to: its line naming a GLOBAL (an object it
    would not build) or an unsupported operand (bytes that are no pickle), else the first line."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    named = [line for line in lines if "GLOBAL" in line or line.startswith("Unsupported operand")]
    return named[0] if named else first_line(exc)


def load_torch_file(path: str | Path, what: str) -> Any:
    """``torch.load(path, map_location="cpu", weights_only=True)``, refused in one line on failure.

    ``weights_only`` unpickles tensors, containers and numbers only: a file that holds
    anything else (code, an object of another program) is refused, not run.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{what} not found: {path}")
    if path.is_dir():
        raise CheckpointError(f"{what} {path} is a directory, not a file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        reason = _unpickler_reason(exc)
        if reason.startswith("Unsupported operand"):  # not an object it refused: bytes that are no pickle
            raise CheckpointError(f"{path}: not a readable {what}; truncated or corrupt? ({reason})") from None
        raise CheckpointError(
            f"{path}: {what} holds more than tensors, refused (weights_only loading: {reason})"
        ) from None
    except Exception as exc:  # noqa: BLE001 - torch.load fails in many ways on a damaged file; all mean the same
        raise CheckpointError(f"{path}: not a readable {what}; truncated or corrupt? ({first_line(exc)})") from None


# -- torch.export archives, read as zip files ---------------------------------------------------
_DTYPES = {  # torch.export's scalar type codes, the ones a network's weights can have
    1: torch.uint8,
    4: torch.int32,
    5: torch.int64,
    6: torch.float16,
    7: torch.float32,
    8: torch.float64,
    12: torch.bool,
    13: torch.bfloat16,
}
_STRIDED = 7  # tensor_meta.layout of a dense tensor
_NAME = re.compile(r"^[A-Za-z0-9_]+$")


def _int(value: Any, where: str) -> int:
    """``{"as_int": n}`` (torch.export's serialised int) or a plain int."""
    if isinstance(value, dict) and set(value) == {"as_int"}:
        value = value["as_int"]
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{where}: {value!r} is not an integer")
    return value


def _tensor_from_meta(raw: bytes, meta: Any, where: str) -> torch.Tensor:
    if not isinstance(meta, dict):
        raise ValueError(f"{where}: no tensor description")
    dtype = _DTYPES.get(meta.get("dtype"))
    if dtype is None:
        raise ValueError(f"{where}: dtype code {meta.get('dtype')!r} is not a tensor type of a network's weights")
    if meta.get("layout", _STRIDED) != _STRIDED:
        raise ValueError(f"{where}: not a dense tensor")
    sizes = [_int(s, where) for s in meta.get("sizes", [])]
    strides = [_int(s, where) for s in meta.get("strides", [])]
    offset = _int(meta.get("storage_offset", 0), where)
    if len(sizes) != len(strides) or any(s < 0 for s in sizes) or any(s < 0 for s in strides) or offset < 0:
        raise ValueError(f"{where}: sizes {sizes}, strides {strides}, offset {offset} do not describe a tensor")
    element = torch.empty((), dtype=dtype).element_size()
    if len(raw) % element:
        raise ValueError(f"{where}: {len(raw)} bytes is not a whole number of {dtype} values")
    numel = len(raw) // element
    last = offset + sum((n - 1) * s for n, s in zip(sizes, strides)) if all(sizes) else -1
    if last >= numel:
        raise ValueError(f"{where}: sizes {sizes} and strides {strides} reach past its {numel} stored values")
    flat = torch.frombuffer(bytearray(raw), dtype=dtype) if numel else torch.empty(0, dtype=dtype)
    return torch.as_strided(flat, sizes, strides, offset).clone()


def read_pt2_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The weights and buffers stored in a ``torch.export`` archive, read without running it.

    The archive must be one ``torch.export.save`` writes for a network of plain tensors:
    every weight stored as raw bytes, no constant, no pickled payload (a file whose weights
    or constants are marked as pickles is refused: loading it with ``torch.export.load``
    would unpickle them with ``weights_only=False``, which can run code).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"program not found: {path}" if not path.exists() else f"{path} is not a file")
    try:
        with zipfile.ZipFile(path) as archive:
            return _pt2_weights(archive, path)
    except CheckpointError:
        raise
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError) as exc:
        raise CheckpointError(f"{path}: not a torch.export archive (not a zip file: {first_line(exc)})") from None
    except (ValueError, KeyError, TypeError, RecursionError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: not a torch.export archive of a network ({first_line(exc)})") from None


def _pt2_weights(archive: zipfile.ZipFile, path: Path) -> dict[str, torch.Tensor]:
    names = archive.namelist()
    roots = {name.split("/", 1)[0] for name in names}
    if len(roots) != 1:
        raise ValueError("its files are not under one folder")
    root = roots.pop()

    def read(name: str, limit: int = MAX_TENSOR_BYTES) -> bytes:
        info = archive.getinfo(f"{root}/{name}")
        if info.file_size > limit:
            raise ValueError(f"{name} declares {info.file_size} bytes")
        return archive.read(info)

    if read("archive_format", 64).decode() != "pt2":
        raise ValueError("archive_format is not 'pt2'")
    configs = [n for n in names if n.startswith(f"{root}/data/weights/") and n.endswith("_weights_config.json")]
    if len(configs) != 1:
        raise ValueError("it holds no single weights description (data/weights/*_weights_config.json)")
    model = configs[0][len(f"{root}/data/weights/") : -len("_weights_config.json")]
    weights = json.loads(read(f"data/weights/{model}_weights_config.json", 1 << 26))
    constants_name = f"data/constants/{model}_constants_config.json"
    constants = json.loads(read(constants_name, 1 << 26)) if f"{root}/{constants_name}" in names else {"config": {}}
    for kind, config in (("weights", weights), ("constants", constants)):
        if not isinstance(config, dict) or not isinstance(config.get("config"), dict):
            raise ValueError(f"the {kind} description is not a mapping")
        pickled = sorted(k for k, v in config["config"].items() if not isinstance(v, dict) or v.get("use_pickle"))
        if pickled:
            raise CheckpointError(
                f"{path}: refused: its {kind} {pickled[:3]} are stored as pickles, which loading would run as "
                "code (csparse never writes pickled weights)"
            )
    if constants["config"]:
        raise CheckpointError(
            f"{path}: refused: it holds constants {sorted(constants['config'])[:3]}; "
            "the networks csparse writes hold none"
        )
    state: dict[str, torch.Tensor] = {}
    for fqn, meta in weights["config"].items():
        file = meta.get("path_name")
        if not isinstance(fqn, str) or not all(_NAME.match(part) for part in fqn.split(".")):
            raise ValueError(f"weight name {fqn!r}")
        if not isinstance(file, str) or not _NAME.match(file):
            raise ValueError(f"weight {fqn}: file name {file!r}")
        state[fqn] = _tensor_from_meta(read(f"data/weights/{file}"), meta.get("tensor_meta"), f"weight {fqn}")
    return state


def config_text(path: str | Path) -> str:
    """The text of a config file (:class:`ConfigError` when it cannot be read as UTF-8 text)."""
    return read_text(path, "config file", ConfigError)
