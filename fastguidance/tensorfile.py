"""The pack's files: safetensors with one JSON metadata entry (DESIGN.md §3). Never pickle.

Every file the pack writes (reference weights, LinearAG coefficients, adapters, step predictors)
goes through :func:`save_tensor_file` (atomic, never overwrites unless asked) and is read back by
:func:`load_tensor_file`, which checks the format name and version before anything uses it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .errors import TensorFileError
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


def load_tensor_file(path: str | Path, expected_format: str, version: int,
                     missing_hint: str = "") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a file written by :func:`save_tensor_file`; :class:`TensorFileError` says what is wrong."""
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
    if metadata.get("format") != expected_format:
        raise TensorFileError(f"{path} holds {metadata.get('format')!r}, not {expected_format!r}: "
                              "pick a file of the right kind")
    if metadata.get("version") != version:
        raise TensorFileError(f"{path} has format version {metadata.get('version')}, this version of "
                              f"FastGuidance reads {version}: make the file again")
    return tensors, metadata
