"""bench/adapter_copy.py's harness on the tiny preset (CPU): every variant is timed alone and beside
the serving loop, or named unavailable, and the table shows each."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import adapter_copy  # noqa: E402


def test_adapter_copy_reports_every_variant(tmp_path):
    adapter_copy.main(["--preset", "tiny", "--ranks", "4,8", "--repeats", "2", "--out", str(tmp_path / "c")])
    report = json.loads((tmp_path / "c.json").read_text())
    r = report["results"]
    assert r["modules"] > 0 and r["loop_calls_per_s_alone"] > 0
    assert list(r["ranks"]) == ["4", "8"] and r["ranks"]["8"]["megabytes"] == 2 * r["ranks"]["4"]["megabytes"]
    for row in r["ranks"].values():
        for name in ("per_module", "packed"):
            v = row[name]
            assert v["alone_ms"] > 0 and v["beside_loop_ms"] > 0 and v["loop_rate_vs_alone"] > 0
        assert "unavailable" in row["packed_pinned"] or row["packed_pinned"]["alone_ms"] > 0
    text = (tmp_path / "c.md").read_text()
    assert all(f"| {name} |" in text for name in adapter_copy.VARIANTS)
