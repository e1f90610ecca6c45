"""What a MODEL carries in its options and every clone of it must share, not copy."""

from __future__ import annotations


class SharedAcrossClones:
    """Base of every object the pack puts into a MODEL's ``model_options`` (patches, wrappers, settings,
    recorders): clones of the MODEL share it.

    ComfyUI 0.3.64's ``ModelPatcher.clone()`` deep-copies ``model_options``, so such an object would be
    copied on every clone, with whatever it holds: the adapters' weights, or a recorder whose copy the
    sampler fills while the node reads the original. 0.33 copies only the dicts and lists of the options
    and shares other objects; deriving from this class makes both hosts behave like 0.33 (COMFYUI.md §3).
    These objects hold settings or per-node state, never per-run state (that lives in the run object).
    """

    def __deepcopy__(self, memo: dict) -> "SharedAcrossClones":
        return self
