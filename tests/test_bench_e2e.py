"""bench/e2e.py's harness end to end on the tiny preset (CPU, reference backends): every policy
serves every request of the workload, the report and step log are written, a workload that fails
leaves nothing behind, --append adds only the workloads the results lack, and --rerun measures
named ones again."""

import dataclasses
import gzip
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import e2e, e2e_steps  # noqa: E402
from serve.metrics import RequestMetrics, StepMetrics  # noqa: E402

ARGS = ["--preset", "tiny", "--backend", "reference", "--attention", "reference", "--policies", "ours,unmerged",
        "--kinds", "vqa", "--arrivals", "poisson", "--popularity", "hot80", "--requests", "3",
        "--warmup-requests", "2", "--probe-requests", "4", "--adapters", "3", "--max-loras", "4", "--ranks", "8,16",
        "--num-pages", "256", "--max-rows", "2", "--prefill-chunk", "32", "--token-budget", "32", "--min-rows", "2",
        "--prefill-width", "16", "--min-pages", "16", "--min-features", "256", "--compile-threads", "2",
        "--encoder-batches", "1"]


def test_e2e_serves_every_request_skips_a_failed_workload_appends_missing_ones_and_reruns(tmp_path, monkeypatch):
    out, log = tmp_path / "e2e", tmp_path / "steps.json"
    run_one, failed = e2e.run_one, []

    def failing_once(runner, pool, system, trace, *rest):
        if len(trace) == 3 and not failed and system == "unmerged":     # the first measured workload
            failed.append(system)
            raise RuntimeError("out of memory")
        return run_one(runner, pool, system, trace, *rest)

    monkeypatch.setattr(e2e, "run_one", failing_once)
    e2e.main(ARGS + ["--rates", "16,8,4", "--out", str(out), "--step-log", str(log)])
    first = json.loads(out.with_suffix(".json").read_text())
    runs = [(r["policy"], r["rate"], r["completed"]) for r in first["runs"]]
    assert failed and runs == [("ours", 4.0, 3), ("unmerged", 4.0, 3), ("ours", 8.0, 3), ("unmerged", 8.0, 3)]
    # nothing of rate 16 kept
    assert first["ratios"]["unmerged"]["geomean_ours_over_base"] > 0
    table = out.with_suffix(".md").read_text().splitlines()
    assert "| vqa | poisson | hot80 | 8.0 | ours |" in "\n".join(table)
    assert len({row.count("|") for row in table if row.startswith(("| kind |", "| vqa |"))}) == 1   # cells = columns
    steps = json.loads(log.read_text())
    assert len(steps["runs"]) == 4 and all(run["steps"] and len(run["requests"]) == 3 for run in steps["runs"])

    monkeypatch.setattr(e2e, "run_one", run_one)
    e2e.main(ARGS + ["--workloads", "vqa/poisson/hot80/16,vqa/poisson/hot80/8", "--rerun", "vqa/poisson/hot80/8",
                     "--kinds", "video", "--out", str(out), "--step-log", str(log), "--append"])   # warms up for vqa
    second = json.loads(out.with_suffix(".json").read_text())
    assert [(r["policy"], r["rate"]) for r in second["runs"]] == [(p, rate) for rate in (4.0, 8.0, 16.0)
                                                                 for p in ("ours", "unmerged")]
    assert second["runs"][:2] == first["runs"][:2]                 # kept
    assert second["runs"][2:4] != first["runs"][2:4]               # measured again (--rerun)
    assert all(r["attempts"] == 1 for r in second["runs"])      # no step compiled: warmed up for vqa
    assert len(second["meta"]["calibrations"]) == 2
    for c in second["meta"]["calibrations"]:            # the probe's steps, for replays of ours' model
        rows = [row for obs in c["observations"].values() for row in obs]
        assert len(rows) == c["observed_steps"] > 0 and all(len(row) == 6 and row[-1] > 0 for row in rows)
    assert len(json.loads(log.read_text())["runs"]) == 6
    e2e_steps.main([str(log), "--out", str(tmp_path / "times")])
    summary = json.loads((tmp_path / "times.json").read_text())
    assert set(summary) == {"vqa/ours", "vqa/unmerged"} and all(e["runs"] == 3 for e in summary.values())
    assert all(e["gc_s"] is not None and e["model_abs_error_ms"] is not None     # every run logs its collections
               for e in summary.values())                                        # and the model's predictions
    gz = tmp_path / "steps.json.gz"                                      # as committed
    gz.write_bytes(gzip.compress(log.read_bytes()))
    e2e_steps.main([str(gz), "--out", str(tmp_path / "times_gz")])
    assert json.loads((tmp_path / "times_gz.json").read_text()) == summary
    assert "Runs measured on cpu, jax " in (tmp_path / "times.md").read_text()      # and with what


def test_e2e_names_a_bad_workload(capsys):
    with pytest.raises(SystemExit):
        e2e.main(ARGS + ["--workloads", "vqa/poisson/hot90/16"])
    err = capsys.readouterr().err
    assert "workload 'vqa/poisson/hot90/16'" in err and "unknown popularity 'hot90'" in err


def test_step_times_summary_of_a_known_log():
    """Steps' compute time by mode and shape (compiling steps left out), loads, switches, the
    loop's time between steps while a request is live (not while none is), garbage collections
    (and those inside each of the longest steps), the step-time model's errors where the log has
    its predictions, the longest steps."""
    step = lambda start, dur, mode, dec, pre, switch=0.0, compile_time=0.0, load=0.0, predicted=(): [
        start, dur, switch, mode, None, dec, pre, 10, 0.0, 1, compile_time, load, 0, 0, *predicted]
    request = lambda arrival, finished: ["a", arrival, 5, arrival, arrival, finished, 1, 0, "length"]
    steps = [step(0.0, 0.10, "merged", 2, 1, switch=0.02, load=0.03, predicted=[0.06]),    # compute 0.05
             step(0.20, 0.01, "merged", 2, 0),                            # 0.10 s gap, a request live
             step(0.21, 0.03, "merged", 2, 0),
             step(5.00, 2.00, "unmerged", 1, 0, compile_time=1.5),       # gap with nothing live: not counted
             step(7.00, 0.02, "unmerged", 1, 0)]
    log = {"fields": {"steps": [f.name for f in dataclasses.fields(StepMetrics)],
                      "requests": [f.name for f in dataclasses.fields(RequestMetrics)]},
           "runs": [{"kind": "vqa", "policy": "ours", "steps": steps,
                     "requests": [request(0.0, 0.3), request(4.9, 7.02)],
                     "gc_pauses": [[0.05, 0.04, 2], [3.0, 0.002, 0]]}]}      # in the first step; between steps
    e = e2e_steps.summarize([log])["vqa/ours"]
    assert e["shapes"] == {"merged, 1 prefill rows": [1, 50.0, 10.0], "merged, decode only": [2, 20.0, None],
                           "unmerged, decode only": [1, 20.0, None]}
    assert e["model_abs_error_ms"] == 10.0
    assert (e["runs"], round(e["load_s"], 6), round(e["switch_s"], 6), round(e["live_gap_s"], 6)) == (1, 0.03, 0.02, 0.1)
    assert (e["switches"], e["switch_median_ms"]) == (1, 20.0)
    assert (round(e["gc_s"], 6), e["gc_longest_ms"]) == (0.042, 40.0)
    assert e["longest"] == [[2000.0, "unmerged", 1, 0, 1, 0.0], [100.0, "merged", 2, 1, 1, 40.0],
                            [30.0, "merged", 2, 0, 1, 0.0]]
    assert "| vqa/ours | 1 | merged, 1 prefill rows: 1 x 50.0 (model +10.0);" in e2e_steps.table({"vqa/ours": e})
    assert "| 0.03 | 0.02 (1, 20.0) | 0.10 |" in e2e_steps.table({"vqa/ours": e})


def _run(policy, rate, kind="vqa"):
    latency = {"mean": 1.0 if policy == "ours" else 2.0, "p99": 3.0}
    return {"kind": kind, "arrival": "poisson", "popularity": "hot80", "rate": rate, "num_requests": 3, "seed": 0,
            "policy": policy, "token_latency": latency, "latency": latency, "ttft": latency, "cold_p99": 1.0,
            "throughput_rps": 1.0, "mode_steps": {"merged": 0, "mixture": 0, "unmerged": 1}, "switches": 0,
            "compile_steps": 0}


def test_processes_sharing_the_results_keep_each_others_runs(tmp_path):
    """Two processes (one a GPU) save into one file with --append: each save keeps the other's runs,
    replaces its own, and the table lists them in grid order."""
    out = tmp_path / "e2e.json"
    args = e2e.argparse.Namespace(append=True, step_log=None, preset="tiny", policies="ours,unmerged")
    video = [_run("ours", 4.0, "video"), _run("unmerged", 4.0, "video")]
    e2e._save(out, video, {"commands": ["video"], "calibrations": [{"a": 1}]}, [], args)
    e2e._save(out, [_run("unmerged", 2.0), _run("ours", 2.0)], {"commands": ["vqa"], "calibrations": [{"a": 2}]},
              [], args)
    redone = dict(_run("ours", 4.0, "video"), cold_p99=0.5)
    e2e._save(out, [redone], {"commands": ["video"], "calibrations": [{"a": 1}]}, [], args)
    saved = json.loads(out.read_text())
    assert [(r["kind"], r["policy"], r["cold_p99"]) for r in saved["runs"]] == [
        ("vqa", "ours", 1.0), ("vqa", "unmerged", 1.0), ("video", "ours", 0.5), ("video", "unmerged", 1.0)]
    assert saved["meta"]["commands"] == ["video", "vqa"] and saved["meta"]["calibrations"] == [{"a": 1}, {"a": 2}]
    assert saved["ratios"]["unmerged"]["geomean_ours_over_base"] == 0.5
