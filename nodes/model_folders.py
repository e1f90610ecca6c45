"""The pack's folders under ComfyUI's ``models/`` (DESIGN.md §3), registered with the host's folder_paths.

Registration is idempotent and keeps paths a user added for the same name (extra_model_paths.yaml),
so files in every configured folder show up in the loaders' lists.
"""

from __future__ import annotations

import os

import folder_paths

from ..fastguidance.errors import InvalidInputError
from ..fastguidance.validation import portable_file_name

LINEAR_AG = "fastguidance_linear_ag"
ADAPTERS = "fastguidance_adapters"
STEP_PREDICTORS = "fastguidance_step_predictors"
PRESETS = "fastguidance_presets"
EXTENSIONS = {".safetensors"}


def register(name: str) -> None:
    """Make ``models/<name>/`` a model folder of the host (once; later calls change nothing)."""
    default = os.path.join(folder_paths.models_dir, name)
    if name in folder_paths.folder_names_and_paths:
        paths, extensions = folder_paths.folder_names_and_paths[name]
        if default not in paths:
            folder_paths.add_model_folder_path(name, default)
        return
    folder_paths.folder_names_and_paths[name] = ([default], set(EXTENSIONS))


def files(name: str) -> list[str]:
    """The files of a pack folder, for a loader's list."""
    register(name)
    return folder_paths.get_filename_list(name)


def existing_file(name: str, filename: str, input_name: str, made_by: str) -> str:
    """The full path of a file a loader input names, or an error naming the input and the node that makes it."""
    register(name)
    path = folder_paths.get_full_path(name, filename)
    if path is None:
        raise InvalidInputError(input_name, filename, f"pick a file from models/{name}/ ({made_by})")
    return path


def new_file(name: str, filename: str, overwrite: bool) -> str:
    """Where a trainer or calibration writes ``filename`` (first configured folder of ``name``).

    An existing file of that name, in any configured folder, is refused unless ``overwrite``.
    """
    stem = portable_file_name(filename)
    register(name)
    if not overwrite and folder_paths.get_full_path(name, stem) is not None:
        raise InvalidInputError("filename", filename, f"{stem} already exists in models/{name}: "
                                                      "choose another name or turn on overwrite")
    return os.path.join(folder_paths.get_folder_paths(name)[0], stem)
