"""The compatibility table (docs/compatibility.md) is what the committed real-host family results give (scripts/compat_table.py)."""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import compat_table  # noqa: E402


def results():
    import json
    return json.loads(compat_table.RESULTS.read_text())


def test_the_results_cover_every_family_method_and_path_on_both_hosts():
    recorded = results()
    assert list(recorded["hosts"]) == list(compat_table.HOSTS)
    assert compat_table.missing_cases(recorded) == [], "rerun tests/comfy/test_families_host.py and record"
    for version, host in recorded["hosts"].items():
        assert host["commit"] == compat_table.HOSTS[version]


def test_the_tables_are_generated_from_the_results():
    full = compat_table.between(compat_table.TABLE_FILE.read_text(), compat_table.BEGIN, compat_table.END)
    assert full == compat_table.render(results()), \
        "docs/compatibility.md's table is out of date: python scripts/compat_table.py write"
    summary = compat_table.between(compat_table.README.read_text(), compat_table.SUMMARY_BEGIN, compat_table.SUMMARY_END)
    assert summary == compat_table.summary(results()), \
        "README.md's family table is out of date: python scripts/compat_table.py write"


def test_the_readme_summary_groups_every_family_once():
    grouped = [key for _, keys, _, _ in compat_table.SUMMARY_ROWS for key in keys]
    assert sorted(grouped) == sorted(family.key for family in compat_table.host_models.FAMILIES)


def test_a_family_that_fails_or_exists_only_on_the_newest_host_is_named_in_the_summary():
    recorded = results()
    recorded["hosts"]["0.33.0"]["cases"]["sd3-compress-guider"]["counts"] = "failed"
    for check in recorded["hosts"]["0.3.64"]["cases"]["qwen_image-adaptive-patch"]:
        recorded["hosts"]["0.3.64"]["cases"]["qwen_image-adaptive-patch"][check] = "skipped: not in this host"
    table = compat_table.summary(recorded)
    assert "| SD3.x | ✗ SD3.x (MMDiT) (see docs/compatibility.md) |" in table
    assert "| Qwen-Image | ✓ (Qwen-Image on 0.33 only) |" in table


def test_every_family_has_a_row_per_method():
    table = compat_table.render(results())
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| Family")]
    assert len(rows) == len(compat_table.host_models.FAMILIES) * len(compat_table.METHODS)
    for family in compat_table.host_models.FAMILIES:
        assert f"| {family.name} | {family.usual.sampler} · " in table


JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest">
<properties><property name="comfyui_version" value="0.3.64"/></properties>
<testcase classname="t" name="test_parity_when_the_method_skips_nothing[sd15-adaptive-patch]"/>
<testcase classname="t" name="test_counted_evaluations_equal_the_run_record[sd15-adaptive-patch]">
<failure message="boom">trace</failure></testcase>
<testcase classname="t" name="test_parity_when_the_method_skips_nothing[z_image-compress-guider]">
<skipped type="pytest.skip" message="Z-Image cannot be built on ComfyUI 0.3.64: no ZImage">skip</skipped></testcase>
<testcase classname="t" name="test_something_else[sd15-adaptive-patch]"/>
</testsuite></testsuites>"""


def test_junit_outcomes_are_read_per_case_and_check(tmp_path):
    path = tmp_path / "report.xml"
    path.write_text(JUNIT)
    version, cases = compat_table.read_junit(path)
    assert version == "0.3.64"
    assert cases == {"sd15-adaptive-patch": {"parity": "passed", "counts": "failed"},
                     "z_image-compress-guider": {"parity": "skipped: Z-Image cannot be built on ComfyUI 0.3.64: no ZImage"}}
    failed = compat_table._cell(cases["sd15-adaptive-patch"], {})
    assert failed == "✗ counts failed"


def test_a_report_of_an_untested_host_is_refused(tmp_path):
    import pytest

    path = tmp_path / "report.xml"
    path.write_text(JUNIT.replace('value="0.3.64"', 'value="0.40.0"'))
    with pytest.raises(SystemExit, match="0.40.0"):
        compat_table.read_junit(path)
