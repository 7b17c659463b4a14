"""Policies on hand-made scheduler states (no model): packing limits, mode decisions, starvation."""

import dataclasses
import numpy as np
import pytest

from bench.policy_sim import STEP_TIMES, make_trace, run_system
from serve.policies import (SYSTEMS, BatchLimits, CostModel, DLoRAPolicy, MergedOnlyPolicy, ProbePolicy,
                            PunicaPolicy, SchedulerState, SeqView, UnmergedPolicy, VLoRAPolicy, admission_room, pack)

LIMITS = BatchLimits(max_rows=8, token_budget=64, prefill_chunk=16, max_adapters=3)


def _state(adapters_pending, now=0.0, merged=None, limits=LIMITS, waited=None, cost=None):
    """One SeqView per (adapter, pending); arrival = index; waited[i] seconds waited (default 0);
    cost: the engine's step-time model."""
    seqs = tuple(SeqView(f"r{i}", a, float(i) * 1e-3, p, waited[i] if waited else 0.0)
                 for i, (a, p) in enumerate(adapters_pending))
    return SchedulerState(now, seqs, merged, limits, cost=cost)


def test_pack_respects_rows_budget_chunk_and_slots():
    state = _state([("a", 1), ("b", 40), ("c", 1), ("d", 1), (None, 1), ("a", 30), ("e", 5)])
    rows = dict(pack(state))
    assert rows == {"r0": 1, "r2": 1, "r3": 1, "r4": 1, "r5": 16}   # b and e find no slot; chunk 16
    tight = _state([("a", 1)] * 3 + [("a", 50)] * 2, limits=BatchLimits(4, 20, 16, 3))
    assert dict(pack(tight)) == {"r0": 1, "r1": 1, "r2": 1, "r3": 16}
    one_prefill = BatchLimits(8, 64, 16, 8, max_prefill_rows=1)
    assert dict(pack(_state([("a", 9), ("b", 1), ("c", 5)], limits=one_prefill))) == {"r1": 1, "r0": 9}
    assert dict(pack(_state([("a", 1), ("b", 1)]), reserved=["x", "y", "z"])) == {}
    assert dict(pack(_state([(None, 1), ("b", 1)]), reserved=["x", "y", "z"])) == {"r0": 1}


def test_pack_counts_prefill_chunks_in_whole_rows():
    """Prefill rows of 8 tokens, a budget of 40 positions: a chunk costs its whole rows, and one
    that stops inside its prompt ends at a row boundary; positions are what the engine lays out
    (one per decode row)."""
    rows8 = BatchLimits(max_rows=8, token_budget=40, prefill_chunk=32, max_adapters=8, prefill_width=8)
    rows = dict(pack(_state([("a", 1), ("b", 5), ("c", 13), ("d", 30)], limits=rows8)))
    assert rows == {"r0": 1, "r1": 5, "r2": 13, "r3": 8}            # 1 + 8 + 16 + 8 positions of the 40
    assert rows8.positions(list(rows.values())) == 1 + 8 + 16 + 8
    # a whole prompt of 12 takes 2 rows (16 positions): beside a decode, 15 are left, so one row of it runs
    sixteen = dataclasses.replace(rows8, token_budget=16)
    assert dict(pack(_state([("b", 12)], limits=sixteen))) == {"r0": 12}
    assert dict(pack(_state([("a", 1), ("b", 12)], limits=sixteen))) == {"r0": 1, "r1": 8}
    assert dict(pack(_state([("a", 1), ("b", 12)], limits=dataclasses.replace(sixteen, prefill_width=1)))) == \
        {"r0": 1, "r1": 12}


def test_pack_starts_a_prompt_only_if_its_pages_fit_after_the_running_requests():
    """Page size 4. Running: a decode at a page boundary (context 8: needs 1 page) and a prompt
    half prefilled (context 6, 10 left: pages for 16 tokens minus the 2 it holds = 2 more). With
    6 free pages, 3 are left for new prompts: the 12-token one (3 pages) starts, the 9-token one
    behind it (3 pages) waits, the 2-token one (1 page) would fit but the room is spent."""
    limits = BatchLimits(max_rows=8, token_budget=64, prefill_chunk=16, max_adapters=8, page_size=4)
    seqs = (SeqView("dec", "a", 0.0, 1, 0.0, context=8), SeqView("half", "a", 0.1, 10, 0.0, context=6),
            SeqView("p12", "b", 0.2, 12, 0.0), SeqView("p9", "c", 0.3, 9, 0.0), SeqView("p2", "d", 0.4, 2, 0.0))
    assert admission_room(SchedulerState(0.0, seqs, None, limits, free_pages=6)) == 3
    assert dict(pack(SchedulerState(0.0, seqs, None, limits, free_pages=6))) == {"dec": 1, "half": 10, "p12": 12}
    assert dict(pack(SchedulerState(0.0, seqs, None, limits, free_pages=7))) == {"dec": 1, "half": 10, "p12": 12,
                                                                                 "p2": 2}
    # requests already in the cache are packed even with no page free (the engine preempts for them)
    assert dict(pack(SchedulerState(0.0, seqs, None, limits, free_pages=0))) == {"dec": 1, "half": 10}
    assert admission_room(SchedulerState(0.0, seqs, None, limits)) is None      # unbounded


def test_slora_and_punica():
    state = _state([("a", 1), ("b", 40), ("c", 1)])
    assert SYSTEMS["slora"].policy().decide(state).rows == (("r0", 1), ("r2", 1), ("r1", 16))
    assert SYSTEMS["slora"].backend("pallas") == SYSTEMS["punica"].backend("pallas") == "pallas-static"
    assert SYSTEMS["ours"].backend("pallas") == "pallas" and SYSTEMS["slora"].backend("reference") == "reference"
    punica = PunicaPolicy().decide(state)
    assert punica.mode == "unmerged" and punica.rows == (("r1", 40),)       # whole prompt, alone
    assert PunicaPolicy().decide(_state([("a", 1), ("c", 1)])).rows == (("r0", 1), ("r1", 1))
    # with 7 of 8 rows decoding, one prompt starts; with all 8 decoding, none does
    seven = PunicaPolicy().decide(_state([("a", 1)] * 7 + [("b", 40), ("c", 30)]))
    assert seven.rows == (("r7", 40),)
    full = PunicaPolicy().decide(_state([("a", 1)] * 8 + [("b", 40)]))
    assert full.rows == tuple((f"r{i}", 1) for i in range(8))


def test_probe_cycles_through_the_modes_on_the_top_adapter():
    probe = ProbePolicy()
    state = _state([("a", 1), ("b", 1), ("a", 1), (None, 1)])
    decisions = [probe.decide(state) for _ in range(4)]
    assert [(d.mode, d.merged_adapter) for d in decisions] == [
        ("unmerged", None), ("merged", "a"), ("mixture", "a"), ("unmerged", None)]
    assert decisions[1].rows == (("r0", 1), ("r2", 1)) and len(decisions[2].rows) == 4


def test_dlora_merges_at_alpha_and_unmerges_at_beta():
    policy = DLoRAPolicy(alpha=1.0, beta=0.5)
    assert policy.decide(_state([("a", 1), ("a", 1), ("b", 1)])).mode == "unmerged"
    merged = policy.decide(_state([("a", 1), ("a", 1), ("a", 1)]))
    assert merged.mode == "merged" and merged.merged_adapter == "a"
    stay = policy.decide(_state([("a", 1), ("a", 1), ("a", 1), ("b", 1), ("c", 1)]))     # 3 > 0.5 * 5
    assert stay.mode == "merged" and [i for i, _ in stay.rows] == ["r0", "r1", "r2"]   # others wait
    assert policy.decide(_state([("a", 1), ("b", 1), ("c", 1)])).mode == "unmerged"  # 1 <= 1.5
    # a's prompts wait for KV pages that b's running prompt holds: b's runs, unmerged
    hot = DLoRAPolicy()
    seqs = (SeqView("b0", "b", 0.0, 20, 0.0, 8, context=40),) + tuple(SeqView(f"a{i}", "a", 0.1, 40, 0.1, 8)
                                                                      for i in range(3))
    three_rows = BatchLimits(max_rows=3, token_budget=64, prefill_chunk=16, max_adapters=3)   # a fills the batch
    stuck = hot.decide(SchedulerState(0.2, seqs, None, three_rows, free_pages=2))
    assert hot.merged == "a" and stuck.mode == "unmerged" and stuck.rows == (("b0", 16),)


def test_merged_only_serves_one_adapter_until_it_drains():
    policy = MergedOnlyPolicy()
    d = policy.decide(_state([("b", 1), ("a", 1), ("b", 5)]))
    assert (d.mode, d.merged_adapter, [i for i, _ in d.rows]) == ("merged", "b", ["r0", "r2"])
    d = policy.decide(_state([("a", 1), ("b", 1), ("c", 1)]))
    assert d.merged_adapter == "b"
    d = policy.decide(_state([("a", 1), ("c", 1)]))
    assert d.merged_adapter == "a"
    d = policy.decide(_state([(None, 1), ("c", 1)]))
    assert d.mode == "unmerged" and d.rows == (("r0", 1),)


def _costly_lora():
    return CostModel(fixed=1e-3, per_token=1e-5, per_lora_token=4e-5, per_adapter=1e-4, switch=1e-3)


def test_ours_merges_a_single_adapter_workload():
    d = VLoRAPolicy().decide(_state([("a", 1)] * 6, cost=_costly_lora()))
    assert d.mode == "merged" and d.merged_adapter == "a" and len(d.rows) == 6


def test_ours_uses_mixture_when_one_adapter_dominates():
    d = VLoRAPolicy().decide(_state([("a", 1)] * 6 + [("b", 1)], cost=_costly_lora()))
    assert d.mode in ("mixture", "merged") and d.merged_adapter == "a"
    if d.mode == "merged":
        assert len(d.rows) == 6
    balanced = VLoRAPolicy().decide(_state([("a", 1), ("b", 1), ("c", 1), (None, 1)] * 2, cost=_costly_lora()))
    assert balanced.mode == "unmerged" and len(balanced.rows) == 8


def test_ours_runs_mixture_only_where_it_does_less_lora_work():
    """A model that predicts mixture steps far cheaper than unmerged ones (as ill-fitted ones did)
    still gets no mixture(a) where a's tokens do not outnumber the others' (plus base tokens):
    there mixture runs more LoRA deltas than unmerged, in more launches."""
    cost = _costly_lora()
    cost.coef["mixture"] = cost.coef["mixture"] * np.array([0.1, 1, 0, 0, 1])    # mixture "almost free"
    minority = _state([("a", 1), ("a", 1), ("b", 1), ("c", 1), (None, 1)], merged="a", cost=cost)
    d = VLoRAPolicy().decide(minority)
    assert d.mode != "mixture" and len(d.rows) == 5
    even = _state([("a", 1)] * 2 + [("b", 1), (None, 1)], merged="a", cost=cost)   # units: unmerged 3, mixture 2 + 1
    assert VLoRAPolicy().decide(even).mode != "mixture"
    more = _state([("a", 1)] * 3 + [("b", 1), (None, 1)], merged="a", cost=cost)   # unmerged 4, mixture 3
    assert VLoRAPolicy().decide(more).mode == "mixture"


def test_ours_does_not_defer_a_prefill_to_speed_up_decodes():
    """Two decodes of 'a' and a long prefill of 'b': merged(a) alone would make this step much
    faster, but b's prompt still needs a step of its own later, which every request waits for."""
    cost = CostModel(fixed=25e-3, per_token=4e-5, per_lora_token=2e-6, per_adapter=1e-4, switch=1e-2)
    limits = BatchLimits(max_rows=8, token_budget=2048, prefill_chunk=1024, max_adapters=4)
    d = VLoRAPolicy().decide(_state([("a", 1), ("a", 1), ("b", 626)], limits=limits, cost=cost))
    assert sorted(i for i, _ in d.rows) == ["r0", "r1", "r2"]
    only_a = VLoRAPolicy().decide(_state([("a", 1), ("a", 1), ("a", 626)], limits=limits, cost=cost))
    assert only_a.mode == "merged" and len(only_a.rows) == 3


def test_ours_under_load_merges_when_the_hot_adapter_fills_the_step():
    """More requests than rows: the cold rows a merged step leaves out are replaced by queued hot
    rows, so merged(a) wins on time per unit of work; the same two cold rows with nothing queued
    behind them would need a step of their own, and a merged step of a few rows never wins."""
    policy, cost = VLoRAPolicy(), _costly_lora()
    loaded = policy.decide(_state([("b", 1)] * 2 + [("a", 1)] * 12, cost=cost))
    assert loaded.mode == "merged" and loaded.merged_adapter == "a" and len(loaded.rows) == LIMITS.max_rows
    light = policy.decide(_state([("b", 1)] * 2 + [("a", 1)] * 6, cost=cost))
    assert light.mode != "merged" and len(light.rows) == 8
    wide = BatchLimits(max_rows=8, token_budget=64, prefill_chunk=16, max_adapters=16)
    spread = policy.decide(_state([("a", 1)] * 2 + [(f"c{i}", 1) for i in range(12)], limits=wide, cost=cost))
    assert spread.mode != "merged" and len(spread.rows) == 8


def test_ours_never_merges_out_a_starving_request():
    policy, cost = VLoRAPolicy(starvation_bound=0.2), _costly_lora()
    adapters = [("a", 1)] * 7 + [("b", 1)]
    assert policy.decide(_state(adapters, now=1.0, waited=[0.0] * 7 + [0.1], cost=cost)).mode != "unmerged"
    d = policy.decide(_state(adapters, now=1.0, waited=[0.0] * 7 + [0.3], cost=cost))
    assert d.mode in ("mixture", "unmerged") and "r7" in [i for i, _ in d.rows]


def test_ours_packs_by_smiths_rule_and_starving_requests_first():
    """A task-head request (one output) prefills before an older generation of 80 tokens, which
    the baselines serve first, also once the generation has waited past the starvation bound
    (the head's prompt is a whole request, the generation's only its start; the generation
    still gets the budget left), but not once it is overdue. Among generations, Smith's rule
    puts the shorter first until the other has waited past the starvation bound."""
    limits = BatchLimits(max_rows=8, token_budget=700, prefill_chunk=700, max_adapters=4)
    seqs = (SeqView("gen", "b", 0.0, 626, 0.2, 80), SeqView("head", "c", 0.1, 626, 0.1, 1))
    waited = lambda views, s: (dataclasses.replace(views[0], waited=s),) + views[1:]
    ours, cost = VLoRAPolicy(starvation_bound=0.5, overdue_bound=2.0), _costly_lora()
    rows = lambda now, views, lim=limits: ours.decide(SchedulerState(now, views, None, lim, cost=cost)).rows
    assert rows(0.2, seqs) == (("head", 626), ("gen", 74))
    assert rows(0.6, waited(seqs, 0.6)) == (("head", 626), ("gen", 74))
    assert rows(2.1, waited(seqs, 2.1)) == (("gen", 626), ("head", 74))
    assert UnmergedPolicy().decide(SchedulerState(0.2, seqs, None, limits)).rows == (("gen", 626), ("head", 74))
    gens = (SeqView("old", "b", 0.0, 626, 0.2, 80), SeqView("short", "b", 0.1, 300, 0.1, 40))
    assert rows(0.2, gens) == (("short", 300), ("old", 400))
    assert rows(0.6, waited(gens, 0.6)) == (("old", 626), ("short", 74))
    # rows full of decodes: the one-pass prompt takes the row of the decode with the most work
    # left per weight; a clip's long one-pass prompt (3456 tokens) waits behind short decodes
    full = dataclasses.replace(limits, max_rows=4, token_budget=4096, prefill_chunk=4096)
    decodes = tuple(SeqView(f"d{g}", "b", 0.0, 1, 0.1, 80, context=700, generated=g) for g in (10, 70, 40, 20))
    head = SeqView("head", "c", 0.1, 626, 0.1, 1)
    assert rows(0.2, decodes + (head,), full) == (("head", 626), ("d70", 1), ("d40", 1), ("d20", 1))
    assert UnmergedPolicy().decide(SchedulerState(0.2, decodes + (head,), None, full)).rows == tuple(
        (f"d{g}", 1) for g in (10, 70, 40, 20))
    short = tuple(dataclasses.replace(d, output_tokens=8, generated=g) for d, g in zip(decodes, range(4)))
    clip = dataclasses.replace(head, pending=3456)
    assert [i for i, _ in rows(0.2, short + (clip,), full)] == ["d20", "d40", "d70", "d10"]


def test_ours_bounds_waiting_in_a_simulated_skewed_workload():
    """Scheduler-only simulation: hot adapter 'a' gets 90% of requests; a cold request's whole
    wait (time live outside its steps: in the queue and through the steps it sat out) stays
    within the starvation bound plus two steps, however many steps it takes."""
    rng = np.random.default_rng(0)
    cost = _costly_lora()
    policy = VLoRAPolicy(starvation_bound=0.05)
    now, seqs, waits, served = 0.0, {}, [], 0
    for i in range(400):
        seqs[f"r{i}"] = ["a" if rng.random() < 0.9 else "b", 1 + int(rng.integers(0, 30)), now, 0.0]
        if i % 4:
            continue
        for _ in range(3):
            views = tuple(SeqView(k, a, arr, p, now - arr - ran) for k, (a, p, arr, ran) in seqs.items())
            d = policy.decide(SchedulerState(now, views, None, LIMITS, cost=cost))
            step = cost.step_time(d.mode, d.merged_adapter, [(seqs[k][0], n) for k, n in d.rows])
            now += step
            for k, n in d.rows:
                seqs[k][1] -= n
                seqs[k][3] += step
                if seqs[k][1] <= 0:
                    if seqs[k][0] == "b":
                        waits.append(now - seqs[k][2] - seqs[k][3])
                    del seqs[k]
                    served += 1
    assert served > 300 and len(waits) > 20
    assert max(waits) <= 0.05 + 2 * cost.step_time("unmerged", None, [("a", 16)] * 8)


def test_cost_model_learns_each_mode_and_ignores_outliers():
    truth = {"unmerged": np.array([3e-3, 1e-5, 2e-5, 4e-4, 3e-7]), "mixture": np.array([4e-3, 1e-5, 6e-5, 4e-4, 3e-7])}
    model = CostModel()
    rng = np.random.default_rng(1)
    for i in range(64):
        for mode, coef in truth.items():
            x = np.array([1.0, rng.integers(1, 512), rng.integers(0, 512), rng.integers(0, 8), rng.integers(0, 20000)])
            seconds = float(x @ coef) + (5.0 if i % 16 == 3 else 0.0)        # a few compile stalls
            model.observe(mode, x, seconds)
    probe = np.array([[1.0, rng.integers(1, 512), rng.integers(0, 512), rng.integers(0, 8), rng.integers(0, 20000)]
                      for _ in range(32)])
    for mode, coef in truth.items():             # one pseudo-step of prior: close, not exact
        np.testing.assert_allclose(model.coef[mode], coef, rtol=0.1)
        np.testing.assert_allclose(probe @ model.coef[mode], probe @ coef, rtol=0.02)
    np.testing.assert_allclose(model.coef["merged"], model.shared)       # never observed: the shared fit
    assert not np.allclose(model.shared, CostModel().prior)
    rows = [("a", 30), ("b", 2)]
    assert model.step_time("mixture", "a", rows, kv=900) == pytest.approx(
        CostModel.features("mixture", "a", rows, kv=900) @ truth["mixture"], rel=0.02)


def test_cost_model_keeps_the_few_long_steps_that_carry_the_per_token_cost():
    """Decode steps (1-32 rows, ~20 ms) with one prefill step in 20 (1,024-4,096 positions,
    ~80-190 ms) and some noise: the per-position cost shows only in the prefill steps, whose
    errors dwarf the decode steps' in seconds. The fit keeps them (it weighs relative errors)
    and predicts a prefill within 10%; a 2 s stall moves nothing."""
    truth = np.array([15e-3, 30e-6, 10e-6, 2e-4, 3e-7])
    model, rng = CostModel(), np.random.default_rng(4)
    for i in range(400):
        if i % 20 == 7:
            p = 1024 * int(rng.integers(1, 5))
            x = np.array([1.0, p, 0.7 * p, rng.integers(1, 4), p])
        else:
            r = int(rng.integers(1, 33))
            x = np.array([1.0, r, r, rng.integers(1, 9), r * rng.integers(600, 800)])
        model.observe("unmerged", x, float(x @ truth) + rng.normal(0, 1e-3) + (2.0 if i == 300 else 0.0))
    prefill, decode = np.array([1.0, 3072, 2048, 2, 3072]), np.array([1.0, 16, 16, 6, 16 * 700])
    assert model.coef["unmerged"] @ prefill == pytest.approx(prefill @ truth, rel=0.1)
    assert model.coef["unmerged"] @ decode == pytest.approx(decode @ truth, rel=0.1)


def test_cost_model_extrapolates_a_mode_seen_at_one_shape_from_the_others():
    """Merged steps all of 4 decode rows (collinear features): the time of a 512-token merged
    prefill comes from the per-token cost the unmerged steps measured, not a degenerate fit."""
    truth = np.array([5e-3, 4e-5, 2e-5, 3e-4, 0.0])
    model = CostModel()
    rng = np.random.default_rng(0)
    for i in range(96):
        x = np.array([1.0, rng.integers(1, 1024), 0, rng.integers(1, 8), 0])
        x[2] = rng.integers(0, x[1] + 1)
        model.observe("unmerged", x, float(x @ truth) + (3.0 if i == 1 else 0.0))
        merged = np.array([1.0, 4.0, 0.0, 0.0, 0.0])
        model.observe("merged", merged, float(merged @ truth) + (2.0 if i == 0 else 0.0))
    predicted = model.step_time("merged", "a", [("a", 512)])
    assert predicted == pytest.approx(5e-3 + 512 * 4e-5, rel=0.1)
    assert model.step_time("merged", "a", [("a", 1)] * 4) == pytest.approx(5e-3 + 4 * 4e-5, rel=0.05)


def test_cost_model_charges_long_contexts_to_attention_not_to_adapters():
    """Decode steps whose rows each attend over 3,000-4,000 cached tokens, one adapter a row:
    attention (0.3 us a position) is what grows with the rows. The model learns that per
    position, not per adapter, and so charges a merged step of the same rows the same attention."""
    truth = np.array([15e-3, 4e-5, 6e-6, 1e-4, 3e-7])
    model = CostModel()
    rng = np.random.default_rng(2)
    for _ in range(64):
        n = int(rng.integers(1, 17))
        rows = [(f"a{i}", 1) for i in range(n)]
        kv = n * int(rng.integers(3000, 4000))
        for mode in ("unmerged", "merged"):
            x = CostModel.features(mode, "a0", rows, kv)
            model.observe(mode, x, float(x @ truth))
    assert model.coef["unmerged"][3] < 2e-4                                  # per adapter
    assert model.coef["unmerged"][4] == pytest.approx(3e-7, rel=0.1)
    rows = [(f"a{i}", 1) for i in range(8)]
    assert model.step_time("merged", "a0", rows, kv=8 * 3500) == pytest.approx(15e-3 + 8 * 4e-5 + 8 * 3500 * 3e-7, rel=0.05)


def test_lora_units_per_mode():
    rows = [("a", 4), ("b", 2), (None, 3)]
    assert CostModel.lora_units("unmerged", None, rows) == 6
    assert CostModel.lora_units("mixture", "a", rows) == 2 * 2 + 3
    assert CostModel.lora_units("merged", "a", rows) == 0


COLD_P99_BOUND = 2.0   # the e2e benchmark's target: a cold adapter's p99 latency, ours / always-unmerged


@pytest.mark.parametrize("popularity", ["hot80", "uniform"])
def test_ours_under_load_is_faster_than_unmerged_without_starving_cold_adapters(popularity):
    """16 req/s keeps more requests live than a step holds. Ours is faster than always-unmerged
    on the same trace (with a hot adapter it serves it merged at the cheaper step time, and
    weighs requests by their outputs either way), and merged steps stop once a cold request has
    waited past the starvation bound, which keeps the cold requests' p99 within the benchmark's
    bound of always-unmerged's."""
    trace = make_trace("vqa", popularity, 16.0, heads=False)
    ours = run_system("ours", trace, STEP_TIMES["vqa"], switch=0.015)
    unmerged = run_system("unmerged", trace, STEP_TIMES["vqa"], switch=0.015)
    assert ours["token_latency"] < unmerged["token_latency"], (ours, unmerged)
    assert ours["cold_p99"] <= COLD_P99_BOUND * unmerged["cold_p99"], (ours, unmerged)


@pytest.mark.parametrize("popularity", ["hot80", "zipf1.5", "uniform"])
def test_ours_is_never_worse_than_the_baselines_in_a_simulated_7b_server(popularity):
    """Step costs shaped like LLaVA-7B's (25 ms per step, 40 us per token, a cheap LoRA branch;
    the static-tile baselines' LoRA tokens cost 10x): ours, learning those costs online, is
    within 3% of the best baseline at every rate and beats S-LoRA- and Punica-like at the highest."""
    limits = BatchLimits(max_rows=32, token_budget=2048, prefill_chunk=1024, max_adapters=16)
    shape = dict(fixed=25e-3, per_token=4e-5, per_adapter=1e-4)
    for rate in (2.0, 16.0):
        trace = make_trace("vqa", popularity, rate, heads=False)
        latency = {}
        for name in ("ours", "slora", "punica", "dlora", "merged"):
            cost = CostModel(**shape, per_lora_token=2e-5 if SYSTEMS[name].static_tiles else 2e-6)
            latency[name] = run_system(name, trace, cost.step_time, switch=0.01, limits=limits)["token_latency"]
        best = min(v for k, v in latency.items() if k != "ours")
        assert latency["ours"] <= 1.03 * best, latency
        if rate == 16.0:
            assert latency["ours"] < min(latency["slora"], latency["punica"]), latency


@pytest.mark.parametrize("popularity", ["hot80", "uniform"])
def test_ours_serves_task_head_answers_first_in_a_simulated_7b_server(popularity):
    """Half the adapters answer through a task head: one output token, so these requests weigh
    the most in average token latency. With H200-shaped step costs, ours (Smith's rule for
    prefills, each request weighed by 1/its output) is faster than always-unmerged at every rate
    (also under overload, where always-unmerged's task-head answers wait behind the live
    decodes), and faster than dLoRA-like wherever an adapter is hot; at uniform popularity, where
    at 2 req/s the two merge the same lone adapters (dLoRA-like's switch costs what ours does),
    within 2% of it. In geometric mean over four traces, as under overload one trace's token
    latency swings by up to 3x with the order requests happen to be served in."""
    for rate in (2.0, 10.0, 16.0):
        ratios = []
        for seed in range(4):
            trace = make_trace("vqa", popularity, rate, heads=True, seed=seed)
            latency = {name: run_system(name, trace, STEP_TIMES["vqa"], switch=0.015)["token_latency"]
                       for name in ("ours", "unmerged", "dlora")}
            ratios.append([latency["ours"] / latency["unmerged"], latency["ours"] / latency["dlora"]])
        over_unmerged, over_dlora = np.exp(np.log(ratios).mean(axis=0))
        assert over_unmerged < 1.0, (rate, ratios)
        assert over_dlora < (1.0 if popularity == "hot80" else 1.02), (rate, ratios)


def test_a_cost_model_fitted_to_zero_never_prices_a_step_at_zero():
    """A fit may drive every coefficient to 0 (base rows on a loaded CPU): no step is then free,
    and ours still decides (it once divided by the zero-priced work of the unmerged rows)."""
    cost = CostModel(fixed=0.0, per_token=0.0, per_lora_token=0.0, per_adapter=0.0, per_kv=0.0, switch=0.0)
    assert cost.step_time("unmerged", None, [(None, 1)] * 4) == CostModel.MIN_STEP_S
    d = VLoRAPolicy().decide(_state([(None, 1)] * 4 + [("a", 1)] * 2, cost=cost))
    assert len(d.rows) == 6
