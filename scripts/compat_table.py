"""The compatibility table (docs/compatibility.md), generated from the real-host family tests so that it cannot drift.

``tests/comfy/test_families_host.py`` runs Adaptive Guidance, Compress Guidance and LinearAG on a tiny model
of every family in ``tests/comfy/host_models.FAMILIES``, as a patch (KSampler) and as a guider
(SamplerCustomAdvanced), on each supported host. This script turns the JUnit reports of those runs into
``tests/comfy/families_results.json`` (committed) and that file into that table; the CI test
``tests/test_compat_table.py`` checks that the table is what the committed results give and that
the results cover every family, method and path on both hosts.

    # on each host (COMFYUI_PATH and that host's Python; see COMFYUI.md §6):
    python -m pytest -m comfy tests/comfy/test_families_host.py --junitxml=/tmp/families-HOST.xml
    python scripts/compat_table.py record /tmp/families-0.33.0.xml /tmp/families-0.3.64.xml
    python scripts/compat_table.py write      # rewrites the table in docs/compatibility.md
    python scripts/compat_table.py check      # exit 1 when that table is out of date
"""

from __future__ import annotations

import json
import re
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "comfy"))

import host_models  # noqa: E402  (the family registry: names, usual workflows)

RESULTS = ROOT / "tests" / "comfy" / "families_results.json"
TABLE_FILE = ROOT / "docs" / "compatibility.md"
BEGIN, END = "<!-- compat-table:begin (scripts/compat_table.py) -->", "<!-- compat-table:end -->"
#: the hosts the pack is tested on: ComfyUI version → commit
HOSTS = {"0.33.0": "783545f6", "0.3.64": "a125cd84"}
METHODS = {"adaptive": "Adaptive Guidance", "compress": "Compress Guidance", "linear_ag": "LinearAG"}
PATHS = {"patch": "KSampler (patch)", "guider": "SamplerCustomAdvanced (guider)"}
CHECKS = {"test_parity_when_the_method_skips_nothing": "parity",
          "test_counted_evaluations_equal_the_run_record": "counts"}
CASE = re.compile(r"^(?P<test>\w+)\[(?P<family>\w+)-(?P<method>\w+)-(?P<path>\w+)\]$")


def expected_cases() -> list[str]:
    return [f"{family.key}-{method}-{path}" for family in host_models.FAMILIES for method in METHODS for path in PATHS]


def read_junit(path: Path) -> tuple[str, dict[str, dict[str, str]]]:
    """(ComfyUI version, {case: {check: outcome}}) of one JUnit report; outcome ``passed``, ``failed`` or
    ``skipped: reason``."""
    root = ElementTree.parse(path).getroot()
    version = next((prop.get("value") for prop in root.iter("property") if prop.get("name") == "comfyui_version"), None)
    if version not in HOSTS:
        raise SystemExit(f"{path}: ComfyUI version {version!r} is not one of the tested hosts {sorted(HOSTS)}")
    cases: dict[str, dict[str, str]] = {}
    for case in root.iter("testcase"):
        match = CASE.match(case.get("name", ""))
        if not match or match["test"] not in CHECKS:
            continue
        key = f"{match['family']}-{match['method']}-{match['path']}"
        skipped = case.find("skipped")
        if case.find("failure") is not None or case.find("error") is not None:
            outcome = "failed"
        elif skipped is not None:
            outcome = "skipped: " + skipped.get("message", "").removeprefix("Skipped: ")
        else:
            outcome = "passed"
        cases.setdefault(key, {})[CHECKS[match["test"]]] = outcome
    return version, cases


def record(paths: list[Path]) -> dict:
    """The results file's content from one JUnit report per host."""
    hosts = {}
    for path in paths:
        version, cases = read_junit(path)
        unknown = sorted(set(cases) - set(expected_cases()))
        if unknown:
            raise SystemExit(f"{path}: cases the table does not know: {unknown[:5]}")
        hosts[version] = {"commit": HOSTS[version], "cases": {key: cases[key] for key in sorted(cases)}}
    return {"command": "python -m pytest -m comfy tests/comfy/test_families_host.py --junitxml=FILE; "
                       "python scripts/compat_table.py record FILE...",
            "hosts": {version: hosts[version] for version in HOSTS if version in hosts}}


def missing_cases(results: dict) -> list[str]:
    """Cases of the registry that the results lack (a family added without rerunning the tests)."""
    return [f"{version}: {key} {check}" for version in HOSTS for key in expected_cases() for check in CHECKS.values()
            if check not in results["hosts"].get(version, {}).get("cases", {}).get(key, {})]


def _cell(outcomes: dict[str, str], skip_notes: dict[str, int]) -> str:
    values = set(outcomes.values())
    if values == {"passed"}:
        return "✓"
    if any(value == "failed" for value in values):
        return "✗ " + ", ".join(check for check, value in outcomes.items() if value == "failed") + " failed"
    reason = next(value for value in values if value.startswith("skipped"))[len("skipped: "):]
    number = skip_notes.setdefault(reason, len(skip_notes) + 1)
    return f"skipped ({number})"


def render(results: dict) -> str:
    """The markdown table (and its notes) of the results."""
    versions = list(HOSTS)
    header = ["Family", "Usual workflow: sampler · scheduler · steps · cfg", "Method"]
    header += [f"{PATHS[path].split(' ')[0]} {version}" for path in PATHS for version in versions]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    skip_notes: dict[str, int] = {}
    for family in host_models.FAMILIES:
        usual = family.usual
        workflow = f"{usual.sampler} · {usual.scheduler} · {usual.steps} · {usual.cfg:g}"
        for index, (method, method_name) in enumerate(METHODS.items()):
            row = [family.name if index == 0 else "", workflow if index == 0 else "", method_name]
            for path in PATHS:
                for version in versions:
                    outcomes = results["hosts"][version]["cases"][f"{family.key}-{method}-{path}"]
                    row.append(_cell(outcomes, skip_notes))
            lines.append("| " + " | ".join(row) + " |")
    commits = ", ".join(f"{version} ({results['hosts'][version]['commit']})" for version in versions)
    lines += ["", f"✓: parity 0.0 with the stock sampler when the method skips nothing, and the diffusion model's "
                  f"counted forward passes equal the run record with settings that skip; hosts {commits}. "
                  f"KSampler: the MODEL patch node in the stock KSampler (KSamplerAdvanced for the two-model "
                  f"workflow); SamplerCustomAdvanced: the GUIDER node (LinearAG: its patched MODEL in the stock "
                  f"CFGGuider)."]
    if skip_notes:
        lines.append("")
    for reason, number in skip_notes.items():
        lines.append(f"- ({number}) {reason}")
    lines += ["", "Where the usual settings come from, and what else the family's workflows use:", ""]
    for family in host_models.FAMILIES:
        note = f"; {family.usual.note}" if family.usual.note else ""
        lines.append(f"- {family.name}: `{family.usual.template}`{note}.")
    return "\n".join(lines)


def readme_table(text: str) -> str:
    start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
    return text[start:end].strip("\n")


def main(argv: list[str]) -> int:
    command = argv[0] if argv else "check"
    if command == "record":
        RESULTS.write_text(json.dumps(record([Path(p) for p in argv[1:]]), indent=1, ensure_ascii=False) + "\n")
        return 0
    results = json.loads(RESULTS.read_text())
    missing = missing_cases(results)
    if missing:
        print(f"{RESULTS.name} lacks {len(missing)} cases (rerun the family tests), e.g. {missing[:3]}", file=sys.stderr)
        return 1
    table = render(results)
    text = TABLE_FILE.read_text()
    if command == "write":
        start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
        TABLE_FILE.write_text(text[:start] + "\n" + table + "\n" + text[end:])
        return 0
    if command == "check":
        if readme_table(text) != table:
            print("docs/compatibility.md's table is out of date: run python scripts/compat_table.py write",
                  file=sys.stderr)
            return 1
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
