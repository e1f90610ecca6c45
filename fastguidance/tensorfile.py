"""The pack's files: safetensors with one JSON metadata entry (DESIGN.md §3). Never pickle.

Every file the pack writes (reference weights, LinearAG coefficients, adapters, step predictors)
goes through :func:`save_tensor_file` (atomic, never overwrites unless asked) and is read back by
:func:`load_tensor_file`, which checks the format name and version before anything uses it.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .errors import FastGuidanceError, TensorFileError
from .files import atomic_write

#: key of the JSON metadata in the safetensors header
METADATA_KEY = "fastguidance"


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
    path = Path(path)
    if not path.is_file():
        raise TensorFileError(f"{path} does not exist" + (f": {missing_hint}" if missing_hint else ""))
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = json.loads((handle.metadata() or {}).get(METADATA_KEY, "{}"))
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except (OSError, ValueError, RuntimeError, SafetensorError) as error:
        raise TensorFileError(f"{path} is not a readable safetensors file ({error}); "
                              "make it again or restore it") from None
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
    for key, tensor in tensors.items():
        finite = torch.isfinite(tensor) | (torch.isnan(tensor) if key in may_hold_nan else False)
        if tensor.is_floating_point() and not bool(finite.all()):
            raise TensorFileError(f"{path}: tensor {key!r} holds NaN or infinite values (a diverged training or a "
                                  "damaged file): make it again")
    return tensors, metadata


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
    match what the metadata describes: built first on the meta device, so metadata asking for an
    enormous module costs no memory, and the real one is only as large as the file's tensors."""
    with interpreting(path, kind):
        with torch.device("meta"):
            skeleton = build()
        expected = skeleton.state_dict()
        if set(expected) != set(tensors):
            differing = sorted(set(expected) ^ set(tensors))[:4]
            raise TensorFileError(f"{path} is not a valid {kind} file: its tensors do not match its metadata "
                                  f"(differing: {differing}): make it again")
        for key, value in expected.items():
            found = tensors[key]
            if tuple(found.shape) != tuple(value.shape) or found.is_floating_point() != value.is_floating_point():
                raise TensorFileError(f"{path} is not a valid {kind} file: tensor {key!r} is {tuple(found.shape)} "
                                      f"{found.dtype}, its metadata needs {tuple(value.shape)} {value.dtype}: "
                                      "make it again")
        module = build()
        module.load_state_dict(tensors)
    return module
