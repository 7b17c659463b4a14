"""bench/policy_sim.py: its traces follow e2e's workloads, and its table comes from the runs."""

import json

import numpy as np
import pytest

from bench.policy_sim import STEP_TIMES, logged_workloads, main, make_trace, replay, simulate, step_speed
from serve.policies import MergedOnlyPolicy, UnmergedPolicy, VLoRAPolicy


@pytest.mark.parametrize("arrivals, cv", [("poisson", 1.0), ("bursty", 2.0)])
def test_traces_have_the_workloads_rate_burstiness_and_outputs(arrivals, cv):
    trace = make_trace("video", "hot80", 10.0, n=4000, arrivals=arrivals)
    gaps = np.diff([0.0] + [t for t, *_ in trace])
    assert gaps.mean() == pytest.approx(0.1, rel=0.1) and gaps.std() / gaps.mean() == pytest.approx(cv, rel=0.1)
    assert np.mean([a == "a0" for _, a, _, _ in trace]) == pytest.approx(0.8, abs=0.03)
    assert {p for _, _, p, _ in trace} == {3510}
    assert all(out == 1 if int(a[1:]) % 2 else 4 <= out <= 12 for _, a, _, out in trace)
    assert make_trace("vqa", "uniform", 4.0, n=50, seed=3) == make_trace("vqa", "uniform", 4.0, n=50, seed=3)


def test_simulate_serves_every_request_and_charges_the_step_times():
    """One request alone: its prompt in one unmerged step, then a step per output token but the
    last (the prompt's step gives the first); merged-only pays the switch once."""
    trace = [(0.0, "a2", 626, 3)]
    vqa = STEP_TIMES["vqa"]
    prefill, decode = vqa("unmerged", None, [("a2", 626)]), vqa("unmerged", None, [("a2", 1)])
    got = simulate(UnmergedPolicy(), trace, vqa)
    assert got["token_latency"] == pytest.approx((prefill + 2 * decode) / 3)
    assert got["cold_p99"] == pytest.approx(prefill + 2 * decode)
    merged = simulate(MergedOnlyPolicy(), trace, vqa, switch=0.5)
    assert merged["token_latency"] == pytest.approx((0.5 + vqa("merged", "a2", [("a2", 626)])
                                                     + 2 * vqa("merged", "a2", [("a2", 1)])) / 3)


def test_main_writes_the_table_of_its_runs(tmp_path):
    out = tmp_path / "sim"
    main(["--kinds", "vqa", "--arrivals", "poisson", "--popularity", "hot80", "--rates", "4", "--traces", "2",
          "--requests", "12", "--out", str(out)])
    record = json.loads(out.with_suffix(".json").read_text())
    (point,) = record["points"]
    assert point["rate"] == 4.0 and set(point["ours_over"]) == {"unmerged", "punica", "dlora", "merged"}
    ours = [simulate(VLoRAPolicy(), make_trace("vqa", "hot80", 4.0, 12, seed=s), STEP_TIMES["vqa"])["token_latency"]
            for s in (0, 1)]
    assert point["token_latency_s"]["ours"] == pytest.approx(np.exp(np.mean(np.log(ours))))
    assert "| vqa | poisson | hot80 | 4 |" in out.with_suffix(".md").read_text()


STEP_FIELDS = ["start", "duration", "switch_time", "mode", "merged_adapter", "decode_rows", "prefill_rows", "tokens",
               "lora_tokens", "adapters", "compile_time", "load_time"]


def _logged_run(policy: str, latencies: list[float], decode_s: float = 0.02,
                requests=(("task0", 0.0, 626, 40), ("task3", 0.5, 630, 0))) -> dict:
    """A step log's run of vqa/bursty/hot80/2: its requests (adapter, arrival, prompt, output
    tokens; 0 for a task-head answer) finished `latencies` after arriving; among its steps, three
    decodes of 2 rows and 2 adapters took `decode_s` (plus a 5 ms adapter load in one), and a
    prefill, a switching and a compiling step of that shape each took a second."""
    step = lambda duration, prefill_rows=0, switch=0.0, compile_time=0.0, load=0.0: [
        0.0, duration, switch, "unmerged", None, 2, prefill_rows, 2, 2.0, 2, compile_time, load]
    decodes = [step(decode_s + load, load=load) for load in (0.0, 0.005, 0.0)]
    slow = [step(1.0, prefill_rows=1), step(1.0, switch=0.5), step(1.0, compile_time=0.9)]
    return {"kind": "vqa", "arrival": "bursty", "popularity": "hot80", "rate": 2.0, "policy": policy,
            "steps": decodes + slow, "requests": [[a, t, p, t, t, t + latency, out, 0, "length"]
                                                  for (a, t, p, out), latency in zip(requests, latencies)]}


def test_step_speed_compares_shapes_both_ran_weighted_by_ours_steps():
    ours = {("unmerged", 4, 2): [0.022] * 3, ("merged", 4, 0): [0.012] * 4 + [1.0], ("mixture", 1, 1): [0.5] * 9,
            ("unmerged", 8, 3): [0.1] * 2}
    base = {("unmerged", 4, 2): [0.020, 0.020, 0.9], ("merged", 4, 0): [0.010] * 3, ("unmerged", 8, 3): [0.2] * 9}
    # mixture: the baseline never ran it; (unmerged, 8, 3): ours ran it twice, fewer than min_steps
    assert step_speed(ours, base) == pytest.approx((3 * 1.1 + 5 * 1.2) / 8)
    assert step_speed({("mixture", 1, 1): [0.5] * 9}, base) is None


def test_replay_simulates_the_logged_requests_beside_what_was_measured(tmp_path):
    fields = {"requests": ["adapter", "arrival", "prompt_tokens", "first_scheduled", "first_token", "finished",
                           "output_tokens", "preemptions", "finish_reason"], "steps": STEP_FIELDS}
    log = {"fields": fields, "runs": [_logged_run("ours", [4.0, 0.3], decode_s=0.025),
                                      _logged_run("unmerged", [2.0, 0.1])]}
    (workload,) = logged_workloads(log).values()
    trace = [(0.0, "a0", 626, 40), (0.5, "a3", 630, 1)]
    assert workload["trace"] == trace
    assert workload["measured"] == pytest.approx({"ours": (4.0 / 40 + 0.3) / 2, "unmerged": (2.0 / 40 + 0.1) / 2})
    assert workload["decode_steps"]["ours"] == {("unmerged", 2, 2): pytest.approx([0.025] * 3)}
    (point,) = replay(log)
    sim = lambda policy: simulate(policy(), trace, STEP_TIMES["vqa"])["token_latency"]
    assert point["simulated"]["unmerged"] == pytest.approx(sim(VLoRAPolicy) / sim(UnmergedPolicy))
    assert point["measured"] == pytest.approx({"unmerged": (4.0 / 40 + 0.3) / (2.0 / 40 + 0.1)})
    assert point["step_speed"] == pytest.approx({"unmerged": 1.25})
    path = tmp_path / "steps.json"
    path.write_text(json.dumps(log))
    main(["--step-log", str(path), "--out", str(tmp_path / "replay")])
    assert "| unmerged | 1 |" in (tmp_path / "replay.md").read_text()      # one workload: no correlation
    assert (tmp_path / "replay.md").read_text().split("| unmerged | 1 |")[1].split(" | ")[2] == "–"
    behind = f"| vqa | bursty | hot80 | 2 | unmerged | {point['simulated']['unmerged']:.3f} | 2.667 | 1.250 |"
    assert behind in (tmp_path / "replay.md").read_text()       # measured behind: listed with its step speed
    other = _logged_run("dlora", [1.0, 1.0], requests=(("task0", 0.0, 626, 40), ("task5", 0.5, 630, 0)))
    with pytest.raises(ValueError, match="vqa/bursty/hot80/2.0 served different requests"):
        logged_workloads({"fields": fields, "runs": log["runs"] + [other]})
