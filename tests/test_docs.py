"""The README and docs/ link only to files and headings that exist (as GitHub renders them)."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", ROOT / "CHANGELOG.md"] + sorted((ROOT / "docs").glob("*.md"))
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)|<img src=\"([^\"]+)\"")
FENCE = re.compile(r"^```.*?^```", re.M | re.S)


def heading_anchors(path: Path) -> set[str]:
    """GitHub's anchors of a Markdown file's headings: lower case, punctuation other than '-' and '_' dropped,
    spaces turned into '-' (a repeated heading gets '-1', '-2', …)."""
    anchors, seen = set(), {}
    for heading in re.findall(r"^#{1,6} (.+)$", FENCE.sub("", path.read_text(encoding="utf-8")), re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        anchors.add(slug if count == 0 else f"{slug}-{count}")
    return anchors


def local_links(page: Path) -> list[str]:
    text = FENCE.sub("", page.read_text(encoding="utf-8"))
    links = [first or second for first, second in LINK.findall(text)]
    return [link for link in links if not re.match(r"[a-z]+:", link)]


@pytest.mark.parametrize("page", PAGES, ids=lambda path: str(path.relative_to(ROOT)))
def test_every_local_link_reaches_a_file_and_heading(page):
    broken = []
    for link in local_links(page):
        target, _, anchor = link.partition("#")
        path = (page.parent / target).resolve() if target else page
        if not path.exists():
            broken.append(f"{link}: no file {path.relative_to(ROOT) if ROOT in path.parents else path}")
        elif anchor and path.suffix == ".md" and anchor not in heading_anchors(path):
            broken.append(f"{link}: no heading with that anchor in {path.name}")
    assert not broken, f"{page.relative_to(ROOT)}: " + "; ".join(broken)


def test_the_anchor_rule_matches_github():
    sample = ROOT / "docs" / "benchmarks.md"
    assert "agd-and-linearag-against-the-papers-claims-where-the-gaps-come-from" in heading_anchors(sample)
    assert "training-guidance-adapters-time-and-memory" in heading_anchors(sample)


def test_the_readme_is_a_front_page():
    """Issue 23: about 250 lines for users; the rest lives in docs/."""
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 300, f"the README has {len(lines)} lines: move what only some readers need to docs/"
    for page in ("nodes", "workflows", "compatibility", "methods", "benchmarks", "development"):
        assert f"(docs/{page}.md)" in "\n".join(lines), f"the README does not link docs/{page}.md"


#: the README's results rows → the bench's method label in docs/benchmarks.md's measured table
README_BENCH_ROWS = {
    "CFG": "cfg", "no guidance": "none", "Adaptive Guidance (defaults)": "ag (defaults)",
    "Compress Guidance (defaults)": "compg (defaults)", "LinearAG (defaults)": "linear_ag (defaults)",
    "Step Predictor (defaults)": "adadiff (defaults)", "Step Predictor + Adaptive Guidance": "adadiff+ag",
    "Step Predictor + Compress Guidance (rate 2)": "adadiff+compg rate=2.0",
    "guidance adapters (defaults)": "agd (defaults)",
    "CFG window, first 70% of steps (what users run without this pack)": "cfg_window fraction=0.7",
}


def bench_rows() -> dict[str, list[str]]:
    """docs/benchmarks.md's measured table (between the bench markers, written by ``--update-table``), by method."""
    text = (ROOT / "docs" / "benchmarks.md").read_text(encoding="utf-8")
    block = text.split("<!-- bench:start -->", 1)[1].split("<!-- bench:end -->", 1)[0]
    return {cells[0]: cells for cells in (line.split(" | ") for line in block.splitlines() if " | " in line)}


def test_the_readme_results_are_the_measured_table():
    """The README's key rows quote docs/benchmarks.md's table: evaluations, adherence, Δ CFG and SSIM to CFG."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    measured = bench_rows()
    header = measured["method"]
    column = {name: header.index(name) for name in ("evals/img", "SSIM→cfg [95% CI]", "adherence % [95% CI]",
                                                    "Δ cfg [95% CI]")}
    for label, method in README_BENCH_ROWS.items():
        row = measured[method]
        ssim = row[column["SSIM→cfg [95% CI]"]].split(" ")[0]
        expected = (f"| {label} | {row[column['evals/img']]} | {row[column['adherence % [95% CI]']]} | "
                    f"{row[column['Δ cfg [95% CI]']].strip()} | {ssim} |").replace("|  |", "| |")
        assert expected in readme, f"the README's row for {label} is not the measured {method}: {expected}"


#: the README's "which method" rows → the bench's method label
README_METHOD_ROWS = {"Adaptive Guidance": "ag (defaults)", "Compress Guidance": "compg (defaults)",
                      "LinearAG": "linear_ag (defaults)", "Step Predictor (AdaDiff)": "adadiff (defaults)",
                      "Step Predictor + Adaptive Guidance": "adadiff+ag", "Guidance adapters (AGD)": "agd (defaults)"}


def test_the_readme_method_table_quotes_the_measured_savings():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Which method for which model", 1)[1].split("\n## ", 1)[0]
    lines = {line.split(" | ")[0][2:]: line for line in section.splitlines() if line.startswith("| ")}
    measured = bench_rows()
    header = measured["method"]
    for label, method in README_METHOD_ROWS.items():
        row, line = measured[method], lines[label]
        evals, delta = row[header.index("evals/img")], row[header.index("Δ cfg [95% CI]")].strip()
        assert line.startswith(f"| {label} | {evals} (") and f"| {delta}" in line, (label, evals, delta, line)
