"""What the Comfy registry publishes: thumbnails beside the workflows, .comfyignore, the changelog's formats."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_example_workflow_has_its_thumbnail_from_its_browser_picture():
    for workflow in sorted((ROOT / "example_workflows").glob("*.json")):
        thumbnail = workflow.with_suffix(".jpg")
        assert thumbnail.is_file(), f"{thumbnail.name} is missing: run python scripts/workflow_thumbnails.py"
        assert thumbnail.read_bytes()[:3] == b"\xff\xd8\xff", f"{thumbnail.name} is not a JPEG"
        picture = ROOT / "docs" / "images" / "workflows" / f"{workflow.stem}.png"
        assert picture.is_file(), f"{picture} (the browser test's picture the thumbnail is made from) is missing"
    stale = {path.stem for path in (ROOT / "example_workflows").glob("*.jpg")} - \
        {path.stem for path in (ROOT / "example_workflows").glob("*.json")}
    assert not stale, f"thumbnails without a workflow: {sorted(stale)}"


def test_comfyignore_keeps_tests_outputs_and_images_out_but_not_what_comfyui_loads():
    rules = [line.strip() for line in (ROOT / ".comfyignore").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    for needed in ("tests/", "docs/images/", "bench_out/", "node_modules/"):
        assert needed in rules, needed
    for loaded in ("nodes", "fastguidance", "js", "example_workflows", "__init__.py", "README.md", "LICENSE"):
        assert not any(rule.rstrip("/") == loaded for rule in rules), loaded


def test_the_changelog_lists_every_file_format_with_its_version():
    source = "".join(path.read_text(encoding="utf-8") for path in (ROOT / "fastguidance").rglob("*.py"))
    formats = set(re.findall(r'^\w*FORMAT = "(fastguidance[._]\w+)"', source, re.M))
    changelog = (ROOT / "CHANGELOG.md").read_text(encoding="utf-8")
    assert formats and all(f"`{name}`" in changelog for name in formats), formats
