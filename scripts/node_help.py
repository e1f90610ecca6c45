"""Write each node's help page (``js/docs/<node id>.md``) from its section of the README.

The ComfyUI frontend (1.27.10 and later) shows ``/extensions/<pack>/docs/<node id>.md`` in the node's
help panel; the pack's web folder is ``js/``. The README stays the one place the nodes are
documented: a CI test (``tests/test_node_help.py``) fails when a page differs from its section.

    python scripts/node_help.py
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEADING = re.compile(r"^### (?P<title>.+?) — `(?P<node_id>FastGuidance_\w+)`$", re.M)
FOOTER = ("\n---\nFrom the FastGuidance README (measured results, example workflows and known limits are "
          "there too).\n")


def help_pages(readme: str) -> dict[str, str]:
    """Node id → help page: the README section of that node, under its display name."""
    pages = {}
    for match in HEADING.finditer(readme):
        rest = readme[match.end():]
        end = re.search(r"^#{2,3} ", rest, re.M)
        body = rest[: end.start() if end else len(rest)].strip()
        pages[match["node_id"]] = f"# {match['title']}\n\n{body}\n{FOOTER}"
    return pages


def main() -> None:
    folder = ROOT / "js" / "docs"
    folder.mkdir(exist_ok=True)
    pages = help_pages((ROOT / "README.md").read_text(encoding="utf-8"))
    for stale in folder.glob("*.md"):
        if stale.stem not in pages:
            stale.unlink()
    for node_id, text in pages.items():
        (folder / f"{node_id}.md").write_text(text, encoding="utf-8")
    print(f"wrote {len(pages)} help pages to {folder}", file=sys.stderr)


if __name__ == "__main__":
    main()
