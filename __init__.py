"""FastGuidance, a ComfyUI node pack that makes classifier-free guidance cheaper.

ComfyUI imports this file and reads ``comfy_entrypoint`` (V3 nodes) and ``WEB_DIRECTORY``.
Outside ComfyUI (pytest, the command line) importing it must not fail, so the node glue is only
imported where ComfyUI's API is present; the core lives in ``fastguidance/`` and needs no host.
"""

import importlib.util

WEB_DIRECTORY = "./js"

if importlib.util.find_spec("comfy_api") is not None:
    from .nodes import comfy_entrypoint

    __all__ = ["WEB_DIRECTORY", "comfy_entrypoint"]
else:
    __all__ = ["WEB_DIRECTORY"]
