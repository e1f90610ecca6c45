"""Write each node's help page (``js/docs/<node id>.md``) from its section of ``docs/nodes.md``.

The ComfyUI frontend (1.27.10 and later) shows ``/extensions/<pack>/docs/<node id>.md`` in the node's
help panel; the pack's web folder is ``js/``. ``docs/nodes.md`` stays the one place the nodes are
documented (the README links to these pages): a CI test (``tests/test_node_help.py``) fails when a page differs from its section.

    python scripts/node_help.py
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "docs" / "nodes.md"
HEADING = re.compile(r"^## (?P<title>.+?) — `(?P<node_id>FastGuidance_\w+)`$", re.M)
FOOTER = ("\n---\nFrom FastGuidance's docs/nodes.md (the README has the quick start and limits; docs/ the methods, "
          "benchmarks and compatibility).\n")


def help_pages(source: str) -> dict[str, str]:
    """Node id → help page: the section of that node in ``docs/nodes.md``, under its display name."""
    pages = {}
    for match in HEADING.finditer(source):
        rest = source[match.end():]
        end = re.search(r"^#{1,2} ", rest, re.M)
        body = rest[: end.start() if end else len(rest)].strip()
        pages[match["node_id"]] = f"# {match['title']}\n\n{body}\n{FOOTER}"
    return pages


def main() -> None:
    folder = ROOT / "js" / "docs"
    folder.mkdir(exist_ok=True)
    pages = help_pages(SOURCE.read_text(encoding="utf-8"))
    for stale in folder.glob("*.md"):
        if stale.stem not in pages:
            stale.unlink()
    for node_id, text in pages.items():
        (folder / f"{node_id}.md").write_text(text, encoding="utf-8")
    print(f"wrote {len(pages)} help pages to {folder}", file=sys.stderr)


if __name__ == "__main__":
    main()
