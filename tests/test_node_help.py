"""Every node has a help page for the frontend's help panel, and it is its section of docs/nodes.md (one source)."""

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from node_help import SOURCE, help_pages  # noqa: E402


def node_ids() -> set[str]:
    source = "".join(path.read_text(encoding="utf-8") for path in (ROOT / "nodes").glob("*.py"))
    return set(re.findall(r'node_id="(FastGuidance_\w+)"', source))


def test_every_node_has_a_help_page_made_from_its_section_of_the_node_docs():
    pages = help_pages(SOURCE.read_text(encoding="utf-8"))
    assert set(pages) == node_ids()
    for node_id, text in pages.items():
        page = ROOT / "js" / "docs" / f"{node_id}.md"
        assert page.is_file(), f"{page} is missing: run python scripts/node_help.py"
        assert page.read_text(encoding="utf-8") == text, f"{page} differs from docs/nodes.md: run python scripts/node_help.py"
        assert len(text.splitlines()) > 5 and text.startswith("# ")


def test_help_pages_are_only_for_existing_nodes():
    assert {path.stem for path in (ROOT / "js" / "docs").glob("*.md")} == node_ids()


def test_the_readme_links_every_help_page():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for node_id in node_ids():
        assert f"(js/docs/{node_id}.md)" in readme, f"the README's node list does not link {node_id}'s help page"
