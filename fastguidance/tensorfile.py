"""The pack's files: safetensors with one JSON metadata entry (DESIGN.md §3). Never pickle.

Every file the pack writes (reference weights, LinearAG coefficients, adapters, step predictors)
goes through :func:`save_tensor_file` (atomic, never overwrites unless asked) and is read back by
:func:`load_tensor_file`, which checks the format name and version before anything uses it.
:func:`read_tensor_file_header` makes the same checks, except the values', from the header alone: what a
node checks when a prompt is queued, so that a large file is not read on every queue (and again to run).
"""

from __future__ import annotations

import contextlib
import json
import math
import struct
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .errors import FastGuidanceError, TensorFileError
from .files import atomic_write

#: key of the JSON metadata in the safetensors header
METADATA_KEY = "fastguidance"
#: the largest header safetensors reads (its ``MAX_HEADER_SIZE``): a longer one is not a safetensors file
MAX_HEADER_BYTES = 100_000_000
#: safetensors' dtype names (a header's ``"dtype"``) that torch reads → (bits per value, floating point)
_DTYPES = {"F64": (64, True), "F32": (32, True), "F16": (16, True), "BF16": (16, True), "F8_E4M3": (8, True),
           "F8_E5M2": (8, True), "F8_E4M3FNUZ": (8, True), "F8_E5M2FNUZ": (8, True), "C64": (64, False),
           "I64": (64, False), "I32": (32, False), "I16": (16, False), "I8": (8, False), "U64": (64, False),
           "U32": (32, False), "U16": (16, False), "U8": (8, False), "BOOL": (8, False)}


@dataclass(frozen=True)
class TensorEntry:
    """What a file says of one tensor without its values: its shape and whether it holds floating-point numbers."""

    shape: tuple[int, ...]
    floating: bool

    @classmethod
    def of(cls, tensor: torch.Tensor) -> "TensorEntry":
        return cls(tuple(tensor.shape), tensor.is_floating_point())


def save_tensor_file(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, Any],
                     overwrite: bool = False) -> Path:
    """Write ``tensors`` (moved to the CPU) and ``metadata`` (must hold ``format`` and ``version``).

    Raises :class:`FileExistsError` when ``path`` exists and ``overwrite`` is false; the write is
    atomic (:func:`fastguidance.files.atomic_write`), so an interrupted write leaves no file.
    """
    path = Path(path)
    if "format" not in metadata or "version" not in metadata:
        raise ValueError("metadata must name its format and version")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; choose another name or allow overwriting")
    tensors = {key: value.detach().contiguous().cpu() for key, value in tensors.items()}
    header = {METADATA_KEY: json.dumps(metadata)}
    atomic_write(path, lambda temporary: save_file(tensors, str(temporary), metadata=header))
    return path


def load_tensor_file(path: str | Path, expected_format: str, version: int, missing_hint: str = "",
                     may_hold_nan: tuple[str, ...] = ()) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a file written by :func:`save_tensor_file`; :class:`TensorFileError` says what is wrong.

    Checked: readable safetensors, metadata an object of ``expected_format`` and ``version`` (a
    newer version says to update the pack), every floating tensor finite except those named in
    ``may_hold_nan`` (where NaN means "not measured").
    """
    path = _existing(path, missing_hint)
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = json.loads((handle.metadata() or {}).get(METADATA_KEY, "{}"))
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except (OSError, ValueError, RuntimeError, SafetensorError) as error:
        raise _unreadable(path, error) from None
    _check_metadata(path, metadata, expected_format, version)
    for key, tensor in tensors.items():
        finite = torch.isfinite(tensor) | (torch.isnan(tensor) if key in may_hold_nan else False)
        if tensor.is_floating_point() and not bool(finite.all()):
            raise TensorFileError(f"{path}: tensor {key!r} holds NaN or infinite values (a diverged training or a "
                                  "damaged file): make it again")
    return tensors, metadata


def read_tensor_file_header(path: str | Path, expected_format: str, version: int,
                            missing_hint: str = "") -> tuple[dict[str, TensorEntry], dict[str, Any]]:
    """What :func:`load_tensor_file` checks without reading a tensor: the header alone (its 8-byte length and
    the JSON after it), for checks that run often (every queued prompt) on files that may be large.

    Refused (:class:`TensorFileError` naming the file), as :func:`load_tensor_file` and safetensors refuse
    them: a header that is not safetensors' (length beyond the file or above its limit, not a JSON object,
    an entry without a known dtype, a shape or offsets that do not fit it, offsets that leave holes or
    overlap), a file whose size is not the header's plus its data (truncated or padded), metadata that
    is not an object of ``expected_format`` and ``version``. Not checked, since it needs the values:
    whether floating tensors are finite. Returns each tensor's :class:`TensorEntry` and the metadata.
    """
    path = _existing(path, missing_hint)
    try:
        with open(path, "rb") as handle:
            size = handle.seek(0, 2)
            handle.seek(0)
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise ValueError(f"{size} bytes, shorter than a header length")
            (length,) = struct.unpack("<Q", prefix)
            if length > MAX_HEADER_BYTES or 8 + length > size:
                raise ValueError(f"header length {length} in a file of {size} bytes")
            header = json.loads(handle.read(length).decode("utf-8"))
        entries, data_bytes, stored = _header_entries(header)
        if 8 + length + data_bytes != size:
            raise ValueError(f"the header describes {8 + length + data_bytes} bytes, the file has {size}")
        metadata = json.loads(stored.get(METADATA_KEY, "{}"))
    except (OSError, ValueError, TypeError, OverflowError, RecursionError) as error:
        raise _unreadable(path, error) from None
    _check_metadata(path, metadata, expected_format, version)
    return entries, metadata


def _header_entries(header: object) -> tuple[dict[str, TensorEntry], int, dict]:
    """The tensors a parsed safetensors header describes, the bytes of data they take, and its
    ``__metadata__``; ``ValueError`` where safetensors would refuse the header."""
    if not isinstance(header, dict):
        raise ValueError("the header is not a JSON object")
    stored = header.get("__metadata__")
    stored = {} if stored is None else stored
    if not isinstance(stored, dict) or not all(isinstance(value, str) for value in stored.values()):
        raise ValueError("__metadata__ is not an object of strings")
    entries: dict[str, TensorEntry] = {}
    spans = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype, shape, offsets = (info.get(key) for key in ("dtype", "shape", "data_offsets")) \
            if isinstance(info, dict) else (None, None, None)
        if dtype not in _DTYPES or not _naturals(shape) or not _naturals(offsets) or len(offsets) != 2:
            raise ValueError(f"tensor {name!r} has no valid dtype, shape and data_offsets")
        bits, floating = _DTYPES[dtype]
        if offsets[1] - offsets[0] != math.prod(shape) * bits // 8:
            raise ValueError(f"tensor {name!r}: its data_offsets do not fit {dtype} {shape}")
        entries[name] = TensorEntry(tuple(shape), floating)
        spans.append(tuple(offsets))
    end = 0
    for begin, stop in sorted(spans):  # back to back from 0, as safetensors writes and requires them
        if begin != end:
            raise ValueError("the tensors' data_offsets leave holes or overlap")
        end = stop
    return entries, end, stored


def _naturals(values: object) -> bool:
    return isinstance(values, list) and all(isinstance(value, int) and not isinstance(value, bool) and value >= 0
                                            for value in values)


def _existing(path: str | Path, missing_hint: str) -> Path:
    path = Path(path)
    if not path.is_file():
        raise TensorFileError(f"{path} does not exist" + (f": {missing_hint}" if missing_hint else ""))
    return path


def _unreadable(path: Path, error: Exception) -> TensorFileError:
    return TensorFileError(f"{path} is not a readable safetensors file ({error}); make it again or restore it")


def _check_metadata(path: Path, metadata: object, expected_format: str, version: int) -> None:
    if not isinstance(metadata, dict):
        raise TensorFileError(f"{path} has FastGuidance metadata of the wrong shape ({type(metadata).__name__}, "
                              "not an object): it was not written by FastGuidance; make it again")
    if metadata.get("format") != expected_format:
        raise TensorFileError(f"{path} holds {metadata.get('format')!r}, not {expected_format!r}: "
                              "pick a file of the right kind")
    found = metadata.get("version")
    if isinstance(found, int) and not isinstance(found, bool) and found > version:
        raise TensorFileError(f"{path} has format version {found}, made by a newer FastGuidance; this one reads "
                              f"{version}: update FastGuidance")
    if found != version:
        raise TensorFileError(f"{path} has format version {found!r}, this version of FastGuidance reads {version}: "
                              "make the file again")


@contextlib.contextmanager
def interpreting(path: str | Path, kind: str) -> Iterator[None]:
    """Turn any error met while making sense of a file's content into one :class:`TensorFileError`
    naming the file: content of the right format name and version can still be of any shape
    (hand-edited metadata, another program's file), and it must never reach the user as a raw
    ``KeyError``/``TypeError``/…"""
    try:
        yield
    except TensorFileError:
        raise
    except (FastGuidanceError, KeyError, TypeError, ValueError, AttributeError, IndexError, RuntimeError,
            OverflowError) as error:
        raise TensorFileError(f"{path} is not a valid {kind} file ({type(error).__name__}: {error}): "
                              "make it again") from None


def module_from_file(path: str | Path, kind: str, build: Callable[[], torch.nn.Module],
                     tensors: dict[str, torch.Tensor]) -> torch.nn.Module:
    """``build()`` with the file's ``tensors`` loaded, refused (:class:`TensorFileError`) unless they
    match what the metadata describes (:func:`require_tensors_fit`); the real module is only built once
    they do, so it is only as large as the file's tensors."""
    require_tensors_fit(path, kind, build, {key: TensorEntry.of(value) for key, value in tensors.items()})
    with interpreting(path, kind):
        module = build()
        module.load_state_dict(tensors)
    return module


def require_tensors_fit(path: str | Path, kind: str, build: Callable[[], torch.nn.Module],
                        found: Mapping[str, TensorEntry]) -> None:
    """Refuse (:class:`TensorFileError`) a file whose tensors (names, shapes, floating or not) are not the
    ones of the module its metadata describes. ``build()`` runs on the meta device, so metadata asking
    for an enormous module costs no memory; ``found`` comes from the tensors or from the header alone
    (:func:`read_tensor_file_header`)."""
    with interpreting(path, kind):
        with torch.device("meta"):
            skeleton = build()
        expected = skeleton.state_dict()
        if set(expected) != set(found):
            differing = sorted(set(expected) ^ set(found))[:4]
            raise TensorFileError(f"{path} is not a valid {kind} file: its tensors do not match its metadata "
                                  f"(differing: {differing}): make it again")
        for key, value in expected.items():
            entry = found[key]
            if entry.shape != tuple(value.shape) or entry.floating != value.is_floating_point():
                raise TensorFileError(f"{path} is not a valid {kind} file: tensor {key!r} is {entry.shape} "
                                      f"({'floating point' if entry.floating else 'not floating point'}), its "
                                      f"metadata needs {tuple(value.shape)} {value.dtype}: make it again")
