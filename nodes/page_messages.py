"""Messages from the pack's nodes to the page (the frontend files in ``js/`` listen for them).

Sent with the host's ``PromptServer.instance.send_sync`` to every open page; silent where no server
runs (tests that call ``execute`` directly, the command line).
"""

from __future__ import annotations

import os
from typing import Any

#: a node of the pack wrote a file a loader node lists (js/file_lists.js refreshes the page's lists)
FILE_EVENT = "fastguidance.file"


def send_to_page(event: str, data: dict[str, Any]) -> bool:
    """Send ``data`` as ``event`` to the open pages; False where no server runs."""
    try:
        from server import PromptServer
    except ImportError:
        return False
    instance = getattr(PromptServer, "instance", None)
    if instance is None:
        return False
    instance.send_sync(event, data)
    return True


def file_written(folder: str, path: str) -> bool:
    """Tell the page that ``path`` (a file of the pack folder ``folder``) is on disk: without it a loader
    naming the file stays outlined red (frontend 1.49) or does not list it (1.27) until the page reloads."""
    return send_to_page(FILE_EVENT, {"folder": folder, "file": os.path.basename(path)})
