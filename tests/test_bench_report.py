"""The benchmark prose (bench/results/README.md, README.md's Benchmarks block) is what bench/report.py renders
from the committed results."""

import json
import shutil

import pytest

from bench import report


def test_committed_prose_matches_the_results():
    assert report.differences() == []


def test_unknown_placeholder_is_named():
    with pytest.raises(report.UnknownPlaceholder, match="switch.no_such_value"):
        report.render("fused: {{switch.fused_ms}} ms, {{switch.no_such_value}}", report.values())


def test_unknown_placeholder_in_a_template_is_reported(tmp_path):
    for template, target, _ in report.PAGES:
        (tmp_path / template).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(report.ROOT / template, tmp_path / template)
        shutil.copy(report.ROOT / target, tmp_path / target)
    template = tmp_path / report.PAGES[0][0]
    template.write_text(template.read_text() + "\n{{kernels.typo}}\n")
    problems = report.differences(root=tmp_path)
    assert any("kernels.typo" in p for p in problems), problems


def test_a_changed_result_changes_the_text(tmp_path):
    for path in report.RESULTS.glob("*.json"):
        shutil.copy(path, tmp_path / path.name)
    switch = json.loads((tmp_path / "switch.json").read_text())
    switch["backends"]["pallas"]["fused_ms"]["median"] = 9.5
    switch["backends"]["pallas"]["fused_over_floor"] = 9.5 / switch["floor_ms"]
    (tmp_path / "switch.json").write_text(json.dumps(switch))

    committed, changed = report.values(), report.values(tmp_path)
    assert changed["switch.fused_ms"] == "9.5" != committed["switch.fused_ms"]
    assert changed["switch.verdict"] == "met" != committed["switch.verdict"]
    template = (report.ROOT / report.PAGES[0][0]).read_text()
    text = report.render(template, changed)
    assert text != report.render(template, committed)
    assert "Fused swift merge: 9.5 ms" in text
