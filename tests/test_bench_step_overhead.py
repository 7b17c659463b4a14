"""bench/step_overhead.py's harness on the tiny preset (CPU, reference backends): each variant's
child process reports its times and the report names every variant."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import step_overhead  # noqa: E402


def test_step_overhead_reports_every_variant(tmp_path):
    step_overhead.main(["--preset", "tiny", "--variants", "default", "--out", str(tmp_path / "o")])
    report = json.loads((tmp_path / "o.json").read_text())
    r = report["results"]["default"]
    for mode in ("merged", "unmerged"):
        assert 0 < r[mode]["dispatch_ms"] <= r[mode]["step_ms"]
    assert r["arguments_only_ms"] > 0
    assert "| default | `` |" in (tmp_path / "o.md").read_text()


def test_step_overhead_rejects_unknown_variants(tmp_path):
    with pytest.raises(SystemExit, match="no_such"):
        step_overhead.main(["--variants", "default,no_such", "--out", str(tmp_path / "o")])
