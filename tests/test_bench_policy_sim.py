"""bench/policy_sim.py: its traces follow e2e's workloads, and its table comes from the runs."""

import json

import numpy as np
import pytest

from bench.policy_sim import STEP_TIMES, main, make_trace, simulate
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
    main(["--kinds", "vqa", "--popularity", "hot80", "--rates", "4", "--traces", "2", "--requests", "12",
          "--out", str(out)])
    record = json.loads(out.with_suffix(".json").read_text())
    (point,) = record["points"]
    assert point["rate"] == 4.0 and set(point["ours_over"]) == {"unmerged", "punica", "dlora", "merged"}
    ours = [simulate(VLoRAPolicy(), make_trace("vqa", "hot80", 4.0, 12, seed=s), STEP_TIMES["vqa"])["token_latency"]
            for s in (0, 1)]
    assert point["token_latency_s"]["ours"] == pytest.approx(np.exp(np.mean(np.log(ours))))
    assert "| vqa | poisson | hot80 | 4 |" in out.with_suffix(".md").read_text()
