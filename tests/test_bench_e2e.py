"""bench/e2e.py's harness end to end on the tiny preset (CPU, reference backends): every policy
serves every request of the workload, the report and step log are written, and --append adds
only the workloads the results lack."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import e2e  # noqa: E402

ARGS = ["--preset", "tiny", "--backend", "reference", "--attention", "reference", "--policies", "ours,unmerged",
        "--kinds", "vqa", "--arrivals", "poisson", "--popularity", "hot80", "--requests", "3",
        "--warmup-requests", "2", "--adapters", "3", "--max-loras", "4", "--ranks", "8,16", "--num-pages", "256",
        "--max-rows", "2", "--prefill-chunk", "32", "--token-budget", "64", "--min-rows", "2",
        "--min-prefill-tokens", "32", "--min-pages", "16", "--min-features", "0", "--compile-threads", "2"]


def test_e2e_serves_every_request_and_appends_only_missing_workloads(tmp_path):
    out, log = tmp_path / "e2e", tmp_path / "steps.json"
    e2e.main(ARGS + ["--rates", "16", "--out", str(out), "--step-log", str(log)])
    first = json.loads(out.with_suffix(".json").read_text())
    runs = [(r["policy"], r["rate"], r["completed"]) for r in first["runs"]]
    assert runs == [("ours", 16.0, 3), ("unmerged", 16.0, 3)]
    assert first["ratios"]["unmerged"]["geomean_ours_over_base"] > 0
    assert "| vqa | poisson | hot80 | 16.0 | ours |" in out.with_suffix(".md").read_text()
    steps = json.loads(log.read_text())
    assert len(steps["runs"]) == 2 and all(run["steps"] and len(run["requests"]) == 3 for run in steps["runs"])

    e2e.main(ARGS + ["--rates", "16,8", "--out", str(out), "--step-log", str(log), "--append"])
    second = json.loads(out.with_suffix(".json").read_text())
    assert [(r["policy"], r["rate"]) for r in second["runs"]] == [("ours", 16.0), ("unmerged", 16.0),
                                                                 ("ours", 8.0), ("unmerged", 8.0)]
    assert second["runs"][:2] == first["runs"] and len(second["meta"]["commands"]) == 2
    assert len(json.loads(log.read_text())["runs"]) == 4
