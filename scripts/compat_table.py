"""The compatibility tables, generated from the real-host family tests so that they cannot drift: the full one
in docs/compatibility.md and the README's summary by family group.

``tests/comfy/test_families_host.py`` runs Adaptive Guidance, Compress Guidance and LinearAG on a tiny model
of every family in ``tests/comfy/host_models.FAMILIES``, as a patch (KSampler) and as a guider
(SamplerCustomAdvanced), on each supported host. This script turns the JUnit reports of those runs into
``tests/comfy/families_results.json`` (committed) and that file into both tables; the CI test
``tests/test_compat_table.py`` checks that the tables are what the committed results give and that
the results cover every family, method and path on both hosts.

    # on each host (COMFYUI_PATH and that host's Python; see COMFYUI.md §6):
    python -m pytest -m comfy tests/comfy/test_families_host.py --junitxml=/tmp/families-HOST.xml
    python scripts/compat_table.py record /tmp/families-0.33.0.xml /tmp/families-0.3.64.xml
    python scripts/compat_table.py write      # rewrites the tables in docs/compatibility.md and README.md
    python scripts/compat_table.py check      # exit 1 when either is out of date
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
README = ROOT / "README.md"
SUMMARY_BEGIN, SUMMARY_END = "<!-- family-summary:begin (scripts/compat_table.py) -->", "<!-- family-summary:end -->"
#: the README's rows: families grouped as users name them (every family of the registry in one group), what
#: guidance adapters do there (tests/comfy/test_adapter_families_host.py) and what a user should know (the
#: adapter training estimates are docs/benchmarks.md's)
SUMMARY_ROWS = [
    ("SD 1.x, SDXL", ("sd15", "sdxl"), "✓",
     "adapter training: SDXL at 1024² fits 24 GB at batch 1 (estimated)"),
    ("SD3.x", ("sd3",), "✓", ""),
    ("Flux (cfg > 1), Chroma", ("flux", "chroma"), "✓ Flux (double blocks); Chroma: same blocks, untested",
     "Flux dev at cfg 1 has nothing to skip"),
    ("Qwen-Image", ("qwen_image",), "✓",
     "adapter training needs 80 GB, fp8 weights and `gradient_checkpointing` (estimated)"),
    ("Wan 2.1, Wan 2.2 (A14B two models, 5B)", ("wan21", "wan22_a14b", "wan22_5b"), "✓",
     "Wan 2.2: patch both models; one adapter file per model"),
    ("HunyuanVideo 1.0 / 1.5, LTX-Video", ("hunyuan_video", "hunyuan_video_15", "ltxv"),
     "HunyuanVideo: double blocks, untested; LTX-Video: refused", ""),
    ("Lumina 2, Z-Image, HiDream", ("lumina2", "z_image", "hidream"), "refused, with the supported list", ""),
]
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


def summary(results: dict) -> str:
    """The README's table: per family group, whether the three methods passed every check on both hosts."""
    families = {family.key: family for family in host_models.FAMILIES}
    newest, oldest = list(HOSTS)
    lines = ["| family | Adaptive Guidance, Compress Guidance, LinearAG | guidance adapters | notes |",
             "| --- | --- | --- | --- |"]
    for label, keys, adapters, note in SUMMARY_ROWS:
        failed, newest_only = [], []
        for key in keys:
            outcomes = {host: [value for method in METHODS for path in PATHS
                               for value in results["hosts"][host]["cases"][f"{key}-{method}-{path}"].values()]
                        for host in HOSTS}
            if any(value != "passed" for value in outcomes[newest]) or any(value == "failed" for value in outcomes[oldest]):
                failed.append(families[key].name)
            elif any(value != "passed" for value in outcomes[oldest]):
                newest_only.append(families[key].name)
        if failed:
            cell = "✗ " + ", ".join(failed) + " (see docs/compatibility.md)"
        else:
            cell = "✓" + (f" ({', '.join(newest_only)} on {newest.rsplit('.', 1)[0]} only)" if newest_only else "")
        lines.append(f"| {label} | {cell} | {adapters} | {note} |")
    return "\n".join(lines)


def between(text: str, begin: str, end: str) -> str:
    start, stop = text.index(begin) + len(begin), text.index(end)
    return text[start:stop].strip("\n")


def replaced_between(text: str, begin: str, end: str, table: str) -> str:
    start, stop = text.index(begin) + len(begin), text.index(end)
    return text[:start] + "\n" + table + "\n" + text[stop:]


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
    files = {TABLE_FILE: (BEGIN, END, render(results)), README: (SUMMARY_BEGIN, SUMMARY_END, summary(results))}
    if command == "write":
        for path, (begin, end, table) in files.items():
            path.write_text(replaced_between(path.read_text(), begin, end, table))
        return 0
    if command == "check":
        stale = [path.name for path, (begin, end, table) in files.items() if between(path.read_text(), begin, end) != table]
        for name in stale:
            print(f"{name}'s compatibility table is out of date: run python scripts/compat_table.py write", file=sys.stderr)
        return 1 if stale else 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
