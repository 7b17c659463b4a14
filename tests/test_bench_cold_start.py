"""bench/cold_start.py off the GPU: two fresh processes start `valora serve`'s engine on the tiny
preset, the second on the compilation cache the first filled, and each answers a request."""

import json

from bench import cold_start as bench


def test_cold_and_warm_starts_report_their_phases(tmp_path):
    bench.main(["--model", "tiny", "--out", str(tmp_path / "cold_start")])
    result = json.loads((tmp_path / "cold_start.json").read_text())
    cold, warm = result["runs"]["cold"], result["runs"]["warm"]
    for run in (cold, warm):
        assert all(run[phase] > 0 for phase in bench.PHASES)
        assert abs(run["total_s"] - run["process_s"] - run["engine_s"] - run["first_answer_s"]) < 1e-6
        assert run["versions"]["backend"] == "cpu" and not run["precompile"]
    assert cold["compile_s"] > warm["compile_s"]      # the second start loads what the first compiled
    text = (tmp_path / "cold_start.md").read_text()
    assert "| empty compilation cache |" in text and "| cache of the start before |" in text
