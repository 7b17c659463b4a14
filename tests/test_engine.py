"""The serving engine on the micro model: outputs equal generate() alone under every policy and
across mode switches, adapter loads mid-stream, preemption, cancellation, faults, no leaks."""

import collections
import dataclasses

import jax
import numpy as np
import pytest

from conftest import random_image
from serve.config import EngineConfig, precompile, serving_config
from serve.engine import Engine, Overloaded
from serve.policies import SYSTEMS, CostModel, Decision, Policy, pack
from valora_jax import AdapterPool, Request, TaskHead, random_adapter
from valora_jax.adapters import layout_of
from valora_jax.lora import MODES
from valora_jax.blocks import bucket, fine_bucket
from valora_jax.runtime import compile_seconds_by_function

SMALL = EngineConfig(max_rows=4, token_budget=64, prefill_chunk=32, prefill_width=16, num_pages=64)
ADAPTERS = [None, "task0", "task1", "task2"]


def _requests(n=10, offset=0):
    return [Request(f"q{i} " + "w" * (i * 7 % 40), [random_image(i)] if i % 3 == 1 else [],
                    adapter=ADAPTERS[i % 4], max_tokens=2 + i % 4, seed=i,
                    temperature=0.7 if i % 5 == 4 else 0.0) for i in range(offset, offset + n)]


@pytest.fixture(scope="module")
def expected(oracle):
    """Each request generated alone by full recomputation (tests/oracle.py)."""
    return [oracle(r) for r in _requests(10)]


def _engine(generator, policy="ours", config=SMALL):
    return Engine(generator.runner, generator.pool, config=config, policy=policy)


@pytest.mark.parametrize("policy", sorted(SYSTEMS))
def test_every_policy_gives_each_request_its_solo_output(generator, expected, policy):
    engine = _engine(generator, policy)
    reqs = _requests(10)
    for want, got in zip(expected, engine.generate(reqs)):
        assert got.token_ids == want.token_ids and got.finish_reason == want.finish_reason
    assert engine.allocator.num_free == SMALL.num_pages - 1


class _Cycling(Policy):
    """unmerged -> mixture(task1) -> merged(task1's rows only) -> mixture(task2) -> ..."""

    def __init__(self):
        self.i = 0

    def decide(self, state):
        self.i += 1
        keys = sorted({s.adapter for s in state.seqs if s.adapter is not None})
        if not keys or self.i % 4 == 0:
            return Decision("unmerged", None, pack(state))
        a = keys[self.i % len(keys)]
        if self.i % 4 == 2:
            return Decision("merged", a, pack(state, eligible=lambda s: s.adapter == a))
        return Decision("mixture", a, pack(state, reserved=[a]))


def test_mode_switches_mid_stream_do_not_change_outputs(generator, expected):
    engine = _engine(generator, _Cycling())
    reqs = _requests(10)
    for want, got in zip(expected, engine.generate(reqs)):
        assert got.token_ids == want.token_ids
    modes = engine.summary()["mode_steps"]
    assert modes["merged"] and modes["mixture"] and modes["unmerged"] and engine.summary()["switches"] > 2


def test_calibration_measures_every_mode_and_leaves_a_clean_engine(generator, expected):
    engine = _engine(generator, "ours")
    observed = engine.calibrate(_requests(10, offset=10))
    assert observed == engine.cost.observed and all(len(obs) for obs in engine.cost._obs.values())
    assert not engine.step_metrics and not engine.request_metrics
    assert engine.allocator.num_free == SMALL.num_pages - 1
    for want, got in zip(expected, engine.generate(_requests(10))):
        assert got.token_ids == want.token_ids
    engine.submit(_requests(1)[0])
    with pytest.raises(RuntimeError, match="1 requests are live"):
        engine.calibrate(_requests(2))


def test_an_engine_serves_from_the_pages_of_one_that_is_done(generator, expected):
    """Reused KV pages hold the previous engine's keys and values: never read before written."""
    first = _engine(generator, "unmerged")
    first.generate(_requests(10, offset=10))
    second = Engine(generator.runner, generator.pool, config=SMALL, policy="ours", cache=first.cache)
    for want, got in zip(expected, second.generate(_requests(10))):
        assert got.token_ids == want.token_ids
    with pytest.raises(ValueError, match="cache does not match 32 pages"):
        Engine(generator.runner, generator.pool, config=dataclasses.replace(SMALL, num_pages=32), cache=second.cache)


def test_padded_shapes_change_nothing(generator, expected):
    engine = _engine(generator, "ours", dataclasses.replace(SMALL, min_rows=4, min_pages=8))
    for want, got in zip(expected, engine.generate(_requests(10))):
        assert got.token_ids == want.token_ids


def test_requests_prepared_on_other_threads_serve_like_plain_ones(generator, expected):
    """prepare() does a request's CPU work on any thread and queues nothing; submitting the
    result gives the output of submitting the request itself."""
    import concurrent.futures
    engine = _engine(generator, "ours")
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        prepared = list(pool.map(engine.prepare, _requests(10)))
    assert not engine.has_work
    with pytest.raises(ValueError):
        prepared[1].pixels[0, 0, 0, 0] = 1.0                       # read-only: a prepared request is reusable
    with pytest.raises(ValueError, match="prompt"):
        engine.prepare(Request(""))
    ids = [engine.submit(p) for p in prepared]
    ids.append(engine.submit(prepared[0]))                          # the same prepared request twice
    while engine.has_work:
        engine.step()
    for want, i in zip([*expected, expected[0]], ids):
        assert engine.result(i).token_ids == want.token_ids


@pytest.mark.parametrize("policy", ["slora", "punica"])
def test_preemption_under_kv_pressure_recomputes_exactly(oracle, generator, policy):
    """24-token outputs on a 9-page cache (72 tokens): prompts start only when their pages are
    free, then the growing decodes run out and preempt the newest requests, which recompute."""
    reqs = [Request(f"g{i} " + "w" * (i * 5 % 16), adapter=ADAPTERS[i % 4], max_tokens=24, seed=i) for i in range(6)]
    engine = _engine(generator, policy, dataclasses.replace(SMALL, num_pages=10))
    for req, got in zip(reqs, engine.generate(reqs)):
        assert got.token_ids == oracle(req).token_ids
    assert engine.summary()["preemptions"] > 0 and engine.allocator.num_free == 9


def test_adapter_loaded_and_replaced_mid_stream(oracle, generator, config):
    pool = generator.pool
    engine = _engine(generator)
    early = [engine.submit(r) for r in _requests(4)]
    engine.step()
    late_adapter = random_adapter(config, generator.runner.module_shapes, "late", 8, seed=77, std=0.2)
    engine.register_adapter(late_adapter)
    late = Request("a late adapter", [random_image(3)], adapter="late", max_tokens=4)
    late_id = engine.submit(late)
    engine.step()
    # replace task1 while its request runs: that request keeps version 1, new ones get version 2
    running_task1 = engine.submit(Request("task1 before", adapter="task1", max_tokens=5))
    engine.step()
    old = pool.get("task1")
    engine.register_adapter(random_adapter(config, generator.runner.module_shapes, "task1", 4, seed=78, std=0.2))
    new_task1 = engine.submit(Request("task1 before", adapter="task1", max_tokens=5))
    while engine.has_work:
        engine.step()
    assert engine.result(late_id).token_ids == oracle(late).token_ids
    new_out = oracle(Request("task1 before", adapter="task1", max_tokens=5))
    assert engine.result(new_task1).token_ids == new_out.token_ids
    pool.register(old)                                    # restore task1 for the other tests
    assert engine.result(running_task1).token_ids == \
        oracle(Request("task1 before", adapter="task1", max_tokens=5)).token_ids
    assert all(engine.result(i) for i in early)
    pool.unregister("late")


def test_image_features_are_not_reused_after_an_adapter_reload(oracle, generator, config):
    engine = _engine(generator)
    shapes = generator.runner.module_shapes
    engine.register_adapter(random_adapter(config, shapes, "vis", 4, seed=1, std=0.3))
    req = Request("look", [random_image(8)], adapter="vis", max_tokens=4)
    first = engine.generate([req])[0]
    cached = len(engine.images)
    engine.register_adapter(random_adapter(config, shapes, "vis", 4, seed=2, std=0.3))
    second = engine.generate([req])[0]
    assert len(engine.images) == cached                   # the old version's features were dropped
    assert second.token_ids == oracle(req).token_ids
    assert first.token_ids != second.token_ids
    generator.pool.unregister("vis")


def test_cancellation_frees_everything(generator):
    engine = _engine(generator)
    ids = [engine.submit(r) for r in _requests(6)]
    engine.step()
    assert engine.cancel(ids[0]) and engine.cancel(ids[5])
    while engine.has_work:
        engine.step()
    assert engine.result(ids[0]).finish_reason == "cancelled"
    assert engine.result(ids[5]).finish_reason == "cancelled"
    assert engine.allocator.num_free == SMALL.num_pages - 1 and not engine.cancel("req-unknown")


def test_failing_adapter_load_fails_only_its_requests(oracle, generator, config, monkeypatch):
    engine = _engine(generator)
    engine.register_adapter(random_adapter(config, generator.runner.module_shapes, "broken", 4, seed=5))
    write = generator.pool._write_slot

    def failing_write(slot, adapter):
        if adapter is not None and adapter.name == "broken":
            raise RuntimeError("device write failed")
        write(slot, adapter)

    monkeypatch.setattr(generator.pool, "_write_slot", failing_write)
    good = _requests(3)
    ids = [engine.submit(Request("doomed", adapter="broken", max_tokens=3))] + [engine.submit(r) for r in good]
    while engine.has_work:
        engine.step()
    failed = engine.result(ids[0])
    assert failed.finish_reason == "error" and "device write failed" in failed.error
    for i, r in zip(ids[1:], good):
        assert engine.result(i).token_ids == oracle(r).token_ids
    generator.pool.unregister("broken")


def _faulty_step(generator, monkeypatch, fails):
    """runner.sample_step raising RuntimeError("device fault") whenever fails(blocks, mode) holds."""
    step = generator.runner.sample_step

    def faulty(cache, blocks, features, sampling, vocab_size, mode="unmerged", **kw):
        if fails(blocks, mode):
            raise RuntimeError("device fault")
        return step(cache, blocks, features, sampling, vocab_size, mode, **kw)

    monkeypatch.setattr(generator.runner, "sample_step", faulty)


def test_a_step_fault_fails_only_the_requests_it_belongs_to(generator, expected, monkeypatch):
    """A step that raises is retried row by row: the rows of the request that breaks it fail
    (naming the error); every other request, batched with it before, gets its solo answer."""
    engine = _engine(generator, "unmerged")
    slot = lambda: generator.pool.slot_of(("task2", generator.pool.versions["task2"]))
    _faulty_step(generator, monkeypatch, lambda blocks, mode: any(
        (np.asarray(b.slot)[np.asarray(b.valid).any(axis=1)] == slot()).any() for b in blocks))
    reqs = _requests(6)
    results = engine.generate(reqs)
    for r, want, got in zip(reqs, expected, results):
        if r.adapter == "task2":
            assert got.finish_reason == "error" and "device fault" in got.error
        else:
            assert got.token_ids == want.token_ids and got.finish_reason == want.finish_reason
    assert engine.step_failures > 0 and "device fault" in engine.last_step_error
    assert engine.failing_steps == 0 and engine.allocator.num_free == SMALL.num_pages - 1


def test_a_fault_of_a_mode_reruns_its_rows_unmerged(generator, expected, monkeypatch):
    """Steps that fail only in merged or mixture mode are rerun unmerged: every request gets its
    solo answer."""
    _faulty_step(generator, monkeypatch, lambda blocks, mode: mode != "unmerged")
    engine = Engine(generator.runner, generator.pool, config=SMALL, policy=_Cycling())
    for want, got in zip(expected, engine.generate(_requests(6))):
        assert got.token_ids == want.token_ids and got.finish_reason == want.finish_reason
    assert engine.step_failures > 0 == engine.failing_steps


def test_a_fault_that_consumes_the_kv_cache_recomputes_every_request(generator, expected, monkeypatch):
    """A device fault after the cache was donated: the engine rebuilds the cache and every live
    request recomputes from its start, with the same answers; nothing leaks."""
    step, calls = generator.runner.sample_step, []

    def consuming(cache, blocks, features, sampling, vocab_size, mode="unmerged", **kw):
        calls.append(mode)
        if len(calls) == 4:                       # a step mid-run, some requests decoding
            for leaf in jax.tree.leaves(cache):
                leaf.delete()
            raise RuntimeError("device fault")
        return step(cache, blocks, features, sampling, vocab_size, mode, **kw)

    monkeypatch.setattr(generator.runner, "sample_step", consuming)
    engine = _engine(generator, "unmerged")
    for want, got in zip(expected, engine.generate(_requests(10))):
        assert got.token_ids == want.token_ids and got.finish_reason == want.finish_reason
    assert engine.step_failures == 1 and engine.allocator.num_free == SMALL.num_pages - 1
    assert sum(m.preemptions for m in engine.request_metrics) > 0


def test_a_fault_seen_when_a_step_is_read_recomputes_its_requests(oracle, generator, expected, monkeypatch):
    """A step's tokens are read after the next step is dispatched: a fault that shows only then
    (here its tokens are gone) makes that step's requests recompute, with the same answers, and
    a request cancelled while its token is in flight leaves nothing behind."""
    step, calls = generator.runner.sample_step, []

    def lost(*args, **kw):
        hidden, tokens, cache = step(*args, **kw)
        calls.append(1)
        if len(calls) == 3:
            tokens.delete()
        return hidden, tokens, cache

    monkeypatch.setattr(generator.runner, "sample_step", lost)
    engine = _engine(generator, "unmerged")
    ids = [engine.submit(r) for r in _requests(6)]
    cancelled = engine.submit(Request("cancel me", adapter="task1", max_tokens=30))
    while engine.has_work:
        if len(calls) >= 4 and engine.in_flight:
            engine.cancel(cancelled)
        engine.step()
    for i, want in zip(ids, expected):
        assert engine.result(i).token_ids == want.token_ids and engine.result(i).finish_reason == want.finish_reason
    assert engine.result(cancelled).finish_reason == "cancelled"
    assert engine.step_failures >= 1 and "deleted" in engine.last_step_error
    assert sum(m.preemptions for m in engine.request_metrics) > 0
    assert engine.allocator.num_free == SMALL.num_pages - 1 and not engine.in_flight


def test_adapter_load_time_is_recorded_apart_from_the_step(generator, monkeypatch):
    """A step's slot writes count as its load_time; the step-time model learns from the rest.
    Steps record the cache positions their attention reads, and the token positions (padding
    included) their blocks hold."""
    import time
    engine = _engine(generator, "unmerged")
    engine.generate([Request("x", adapter="task1", max_tokens=2)])      # the step shapes, compiled
    generator.pool.evict_all()
    write = generator.pool._write_slot
    monkeypatch.setattr(generator.pool, "_write_slot", lambda slot, adapter: (time.sleep(0.2), write(slot, adapter)))
    observed = []
    monkeypatch.setattr(engine.cost, "observe", lambda mode, features, seconds: observed.append(seconds))
    engine.submit(Request("x", adapter="task1", max_tokens=2))
    assert engine.step() is None and engine.in_flight     # dispatched: the next step() reads its tokens
    first = engine.step()
    assert not first.compile_time
    assert first.load_time >= 0.2 and first.compute_time == first.duration - first.load_time
    assert observed[0] == first.compute_time < first.duration - 0.2
    assert first.kv_positions == first.tokens                      # the prompt reads only itself
    width = engine.config.prefill_width                           # the prompt in whole prefill rows
    assert first.padded_tokens == -(-first.tokens // width) * width == engine.limits.positions([first.tokens])
    assert first.padded_tokens > first.tokens
    while engine.has_work:
        step = engine.step()
        assert step.load_time < 0.2                                # resident now: nothing written
        assert step.kv_positions == first.tokens + 1               # the decode row: prompt + its token
        assert step.padded_tokens == bucket(1, engine.config.min_rows)
    assert engine.summary()["load_time"] >= 0.2


def test_requests_of_an_adapter_still_being_copied_wait_while_others_run(oracle, generator, monkeypatch):
    """A host-to-device adapter copy holds up only its own requests; with nothing else to run,
    the step waits for it."""
    import threading
    from valora_jax import adapters
    engine = _engine(generator, "unmerged")
    generator.pool.evict_all()
    copy_may_finish, to_device = threading.Event(), adapters.PackedAdapter.to_device
    monkeypatch.setattr(adapters.PackedAdapter, "to_device", lambda a: (copy_may_finish.wait(), to_device(a))[1])
    running = engine.submit(Request("x", adapter="task1", max_tokens=4))
    threading.Timer(0.3, copy_may_finish.set).start()
    engine.step()                                               # task1 alone: waits for its copy
    copy_may_finish.clear()
    waiting = engine.submit(Request("y", adapter="task2", max_tokens=2))
    while engine.result(running) is None:
        engine.step()
    first, *others = engine.step_metrics
    assert first.load_time >= 0.2 and others
    assert all(s.adapters == 1 and s.load_time < 0.1 for s in others)   # task2's copy is under way: not in them
    assert generator.pool.slot_of("task2") is None and engine.live == 1
    copy_may_finish.set()
    while engine.has_work:
        engine.step()
    for rid, request in [(running, Request("x", adapter="task1", max_tokens=4)),
                         (waiting, Request("y", adapter="task2", max_tokens=2))]:
        assert engine.result(rid).token_ids == oracle(request).token_ids


def test_with_nothing_ready_a_step_waits_for_the_first_copy_only(oracle, generator, monkeypatch):
    import threading
    from valora_jax import adapters
    engine = _engine(generator, "unmerged")
    engine.generate([Request("x", adapter="task1", max_tokens=2), Request("y", adapter="task2", max_tokens=2)])
    generator.pool.evict_all()                                 # (the step shapes and slot writes compiled)
    held = {"task1": threading.Event(), "task2": threading.Event()}
    to_device = adapters.PackedAdapter.to_device
    monkeypatch.setattr(adapters.PackedAdapter, "to_device", lambda a: (held[a.name].wait(), to_device(a))[1])
    first = engine.submit(Request("x", adapter="task1", max_tokens=2))
    second = engine.submit(Request("y", adapter="task2", max_tokens=2))
    threading.Timer(0.2, held["task1"].set).start()
    threading.Timer(2.0, held["task2"].set).start()           # (a step waiting for both takes 2 s)
    warm_up = len(engine.step_metrics)
    engine.step()
    held["task2"].set()
    while engine.has_work:
        engine.step()
    step = engine.step_metrics[warm_up]
    assert step.adapters == 1 and 0.1 < step.load_time < 1.0      # task1's copy, not task2's (held)
    for rid, request in [(first, Request("x", adapter="task1", max_tokens=2)),
                         (second, Request("y", adapter="task2", max_tokens=2))]:
        assert engine.result(rid).token_ids == oracle(request).token_ids


def test_submission_errors_and_overload(generator):
    engine = _engine(generator, config=dataclasses.replace(SMALL, max_queue=3))
    with pytest.raises(ValueError, match="'nope'"):
        engine.submit(Request("hi", adapter="nope"))
    with pytest.raises(ValueError, match="prompt"):
        engine.submit(Request(""))
    with pytest.raises(ValueError, match="needs 64 KV pages; the cache has 63"):
        engine.submit(Request("hi", max_tokens=500))
    ids = [engine.submit(Request(f"r{i}", max_tokens=2)) for i in range(3)]
    with pytest.raises(Overloaded):
        engine.submit(Request("one too many", max_tokens=2))
    with pytest.raises(ValueError, match="in use"):
        engine.submit(Request("dup"), request_id=ids[0])
    while engine.has_work:
        engine.step()
    assert all(engine.result(i).finish_reason in ("stop", "length") for i in ids)


def test_generate_queues_nothing_of_a_bad_call_and_waits_for_queue_room(generator):
    engine = _engine(generator, config=dataclasses.replace(SMALL, max_queue=2))
    for bad, message in ((Request("", max_tokens=2), "prompt"), (Request("hi", adapter="nope"), "'nope'"),
                         (Request("hi", max_tokens=500), "KV pages")):
        with pytest.raises(ValueError, match=message):
            engine.generate([Request("fine", max_tokens=2), bad])
        assert not engine.has_work and engine.allocator.num_free == SMALL.num_pages - 1
    done = engine.generate([Request(f"r{i}", max_tokens=2) for i in range(5)])     # more than the queue holds
    assert [c.finish_reason in ("stop", "length") for c in done] == [True] * 5


def test_generate_refuses_to_spin_on_a_policy_that_schedules_nothing(generator):
    class Idle(Policy):
        def decide(self, state):
            return Decision("unmerged", None, ())

    engine = _engine(generator, Idle())
    with pytest.raises(RuntimeError, match="Idle scheduled none of 1 live requests"):
        engine.generate([Request("hi", max_tokens=2)])
    assert not engine.has_work


def test_task_head_requests_finish_after_prefill(oracle, generator, config):
    engine = _engine(generator)
    rng = np.random.default_rng(1)
    head = TaskHead(rng.standard_normal((config.text.hidden_size, 4)).astype(np.float32), np.zeros(4, np.float32),
                    ("0", "1", "2", "3"))
    engine.register_adapter(dataclasses.replace(generator.pool.get("task2"), name="counter", head=head))
    req = Request("how many?", [random_image(2)], adapter="counter")
    rid = engine.submit(req)
    other = engine.submit(Request("chat", adapter="task0", max_tokens=3))
    generator.pool.wait_staged(["counter", "task0"])   # both ready: the first step serves both
    seen = []                                          # what the policy is told each request outputs
    decide = engine.policy.decide
    engine.policy.decide = lambda state: seen.append({s.id: s.output_tokens for s in state.seqs}) or decide(state)
    engine.step()                                      # both prefills dispatched; read by the next step
    engine.step()
    assert seen[0] == {rid: 1, other: 3} and rid not in seen[1]     # its answer in flight: it ends with it
    assert engine.result(rid).label in head.labels and engine.result(other) is None
    assert engine.result(rid).label == oracle(req).label
    while engine.has_work:
        engine.step()
    summary, answer, chat = engine.summary(), engine.request_metrics[0], engine.request_metrics[1]
    assert summary["task_head_answers"] == 1
    assert summary["task_head_share"] == pytest.approx(answer.latency / (answer.latency + chat.token_latency))
    generator.pool.unregister("counter")


def test_streaming_events_concatenate_to_the_completion(generator):
    engine = _engine(generator)
    events = []
    req = Request("stream this", max_tokens=6, temperature=1.0, seed=3)
    rid = engine.submit(req, on_event=lambda i, text, done: events.append((i, text, done)))
    while engine.has_work:
        engine.step()
    assert events[-1][2] is not None and all(e[2] is None for e in events[:-1])
    streamed = "".join(t for _, t, _ in events)
    assert engine.result(rid).text.startswith(streamed.rstrip("\ufffd"))


def test_no_page_leaks_after_1000_requests(generator):
    engine = _engine(generator, "unmerged", dataclasses.replace(SMALL, max_rows=32, token_budget=512, num_pages=96,
                                                           max_queue=1000))
    reqs = [Request(f"#{i}", adapter=ADAPTERS[i % 4], max_tokens=1 + i % 2) for i in range(1000)]
    ids = [engine.submit(r) for r in reqs]
    for i in ids[::97]:
        engine.cancel(i)
    while engine.has_work:
        engine.step()
    assert engine.allocator.num_free == 95
    assert sum(engine.result(i) is not None for i in ids) == 1000


def test_compiling_steps_are_flagged_and_not_learnt_from(generator):
    """Rows padded to a size no other test uses: the first steps compile; they are flagged and
    the cost model learns only from the others (not from a step read while the next one compiled)."""
    engine = _engine(generator, "ours", dataclasses.replace(SMALL, min_rows=8, min_pages=24))
    before = compile_seconds_by_function()
    engine.generate([dataclasses.replace(r, max_tokens=12) for r in _requests(6)])
    steps = engine.step_metrics
    compiled = [s for s in steps if s.compile_time > 0]
    assert compiled and len(compiled) < len(steps)
    by_function = compile_seconds_by_function() - before
    assert by_function["jit(_sample_step_impl)"] > 0
    assert sum(by_function.values()) == pytest.approx(sum(s.compile_time for s in compiled))
    learnt = sum(len(obs) for obs in engine.cost._obs.values())     # neither a compiling step nor one whose
    assert len(steps) - 2 * len(compiled) <= learnt <= len(steps) - len(compiled)   # time a compile overlapped
    assert engine.summary()["compile_steps"] == len(compiled)


def test_steps_record_what_the_step_time_model_predicted_before_observing_them(generator):
    """The prediction a step records is the model's when the step is dispatched: a model that knows
    only a fixed 10 ms predicts exactly that for every step until its first refit (after eight
    observed steps, the eighth read once the ninth is dispatched: both still record 10 ms), and
    something else after."""
    cost = CostModel(fixed=0.01, per_token=0.0, per_lora_token=0.0, per_adapter=0.0, per_kv=0.0)
    engine = Engine(generator.runner, generator.pool, config=SMALL, policy="ours", cost=cost)
    engine.generate([dataclasses.replace(r, max_tokens=12) for r in _requests(6)])
    observed = [s for s in engine.step_metrics if not s.compile_time]
    assert [s.predicted_time for s in observed[:9]] == [0.01] * 9
    assert any(s.predicted_time != 0.01 for s in observed[9:])


def test_policies_know_the_positions_each_step_computes(generator, monkeypatch):
    """BatchLimits.positions (what ours' step-time model reads) is what the engine lays out:
    prefill chunks in whole rows of prefill_width (a chunk longer than a row spans several),
    one position per decode row, whose block is padded to min_rows."""
    config = dataclasses.replace(SMALL, min_rows=4)
    engine = _engine(generator, config=config)
    seen, run = [], engine._run

    def recording(rows, slots, mode):
        dispatched = run(rows, slots, mode)
        seen.append(([n for _, n in rows], dispatched.metrics["padded_tokens"]))
        return dispatched

    monkeypatch.setattr(engine, "_run", recording)
    engine.generate(_requests(10))
    assert any(n > config.prefill_width for ns, _ in seen for n in ns)
    for ns, padded in seen:
        decodes = ns.count(1)
        assert padded == engine.limits.positions(ns) - decodes + (bucket(decodes, 4) if decodes else 0)
        assert padded - (bucket(decodes, 4) if decodes else 0) == sum(-(-n // 16) * 16 for n in ns if n > 1)
    with pytest.raises(ValueError, match=r"prefill_chunk \(40\) must be a multiple of prefill_width \(16\)"):
        dataclasses.replace(SMALL, prefill_chunk=40)


def test_step_shapes_cover_every_step_the_engine_runs(generator, monkeypatch):
    """EngineConfig.step_shapes mirrors how the engine pads blocks: with minimums that cover every
    row, each step a run makes is one of them (so precompiling them leaves nothing to compile)."""
    config = dataclasses.replace(SMALL, min_rows=4, min_pages=16, min_features=64)
    shapes = set(config.step_shapes(MODES))
    seen, step = [], generator.runner.sample_step

    def recording(cache, blocks, features, sampling, vocab_size, mode="unmerged", **kw):
        seen.append((tuple((*b.tokens.shape, b.page_table.shape[1]) for b in blocks), features.shape[0], mode))
        return step(cache, blocks, features, sampling, vocab_size, mode, **kw)

    monkeypatch.setattr(generator.runner, "sample_step", recording)
    _engine(generator, config=config).generate(_requests(10))
    assert seen and set(seen) <= shapes, set(seen) - shapes


def test_prefill_blocks_pad_their_rows_to_a_few_counts():
    """A prefill block's rows are padded to 1, 2, 3, 4, 6, 8, 12, ... (at most a third of them
    padding), never past the rows the token budget holds; step_shapes lists exactly those."""
    assert [fine_bucket(n) for n in range(1, 18)] == [1, 2, 3, 4, 6, 6, 8, 8, 12, 12, 12, 12, 16, 16, 16, 16, 24]
    config = EngineConfig(token_budget=640, prefill_width=64)                # 10 rows at most
    assert [config.prefill_rows(n) for n in range(1, 11)] == [1, 2, 3, 4, 6, 6, 8, 8, 10, 10]
    prefill_rows = {rows for blocks, _, _ in config.step_shapes(("unmerged",)) for rows, q, _ in blocks if q == 64}
    assert prefill_rows == {1, 2, 3, 4, 6, 8, 10}


def test_serving_config_is_the_small_default_off_a_gpu_and_precompiled_shapes_on_one(config):
    assert serving_config(config, "cpu") == EngineConfig()
    assert serving_config(config, "cpu", max_queue=3).max_queue == 3
    gpu = serving_config(config, "gpu")
    assert gpu.precompile and gpu.min_rows == gpu.max_rows and gpu.encoder_batches
    assert gpu.min_features == 4 * 8 * config.tokens_per_image
    assert serving_config(config, "gpu", max_images=2).min_features == 4 * 2 * config.tokens_per_image
    with pytest.raises(ValueError, match=r"precompile needs min_rows \(1\) >= max_rows \(32\)"):
        serving_config(config, "gpu", min_rows=1)


def test_precompiled_steps_and_encoder_batches_do_not_compile_while_serving(generator):
    """precompile compiles every step shape and encoder batch an engine of its config meets (decode,
    prefill and both blocks; image batches) and the slot writes of its adapters' layouts, into the
    runner's own jit caches: serving then compiles no step, no encoder call and no slot write."""
    config = dataclasses.replace(SMALL, token_budget=32, min_rows=4, min_pages=16, min_features=64,
                                 encoder_batches=(1, 2, 4), precompile=True, decode_loop=2)
    runner = generator.runner.twin()                         # its own jit caches: nothing compiled yet
    pool = AdapterPool(runner.config, runner.module_shapes, runner.write_slot)
    for name in ADAPTERS[1:]:
        pool.register(generator.pool.store[name])
    model_calls = lambda: {f: s for f, s in compile_seconds_by_function().items() if f in STEP_FUNCTIONS}
    before = model_calls()
    layouts = {layout_of(a) for a in pool.store.values()}
    assert len(layouts) > 1                                  # adapters of several ranks
    assert precompile(runner, config, ("unmerged",), layouts=layouts) == \
        len(config.step_shapes(("unmerged",))) + 3 + 1 + len(layouts) + 1
    compiled = model_calls()
    assert all(compiled.get(f, 0) > before.get(f, 0) for f in STEP_FUNCTIONS)
    engine = Engine(runner, pool, config=config, policy="unmerged")
    engine.generate(_requests(12) + [Request("long", max_tokens=8)])
    assert len(engine.step_metrics) > 5 and model_calls() == compiled
    assert any(s.steps == 2 for s in engine.step_metrics)


STEP_FUNCTIONS = ("jit(_sample_step_impl)", "jit(_encode_impl)", "jit(_decode_loop_impl)", "jit(_write_impl)")


def test_precompile_compiles_the_merge_where_its_modes_merge(generator):
    runner = generator.runner.twin()
    calls = lambda: compile_seconds_by_function()["jit(_merge_impl)"]
    before = calls()
    precompile(runner, dataclasses.replace(SMALL, max_rows=1, token_budget=16), ("merged",))
    compiled = calls()
    assert compiled > before
    runner.merge(1)
    assert calls() == compiled


def test_decode_loops_give_each_request_its_oracle_output(oracle, generator):
    """Decode steps run four to a call once every live request decodes with four tokens to go;
    tokens past a stop are dropped, streams carry every token, a late request starts after the loop."""
    reqs = [Request("loop a", [random_image(4)], adapter="task0", max_tokens=11),
            Request("loop b", adapter="task1", max_tokens=9, temperature=0.8, seed=5),
            Request("loop c", adapter=None, max_tokens=10)]
    engine = _engine(generator, "ours", dataclasses.replace(SMALL, decode_loop=4))
    streamed = collections.defaultdict(str)
    ids = [engine.submit(r, on_event=lambda i, text, done: streamed.__setitem__(i, streamed[i] + text)) for r in reqs]
    while engine.has_work:
        if engine.step_metrics and engine.step_metrics[-1].steps == 4 and len(ids) == 3:
            ids.append(engine.submit(Request("late", adapter="task2", max_tokens=3)))
        engine.step()
    loops = [s for s in engine.step_metrics if s.steps > 1]
    assert loops and all(s.steps == 4 and s.tokens == 4 * s.decode_rows and not s.prefill_rows for s in loops)
    for req, i in zip(reqs + [Request("late", adapter="task2", max_tokens=3)], ids):
        got, want = engine.result(i), oracle(req)
        assert got.token_ids == want.token_ids and got.finish_reason == want.finish_reason
        assert got.text.startswith(streamed[i]) and len(streamed[i]) >= len(got.text) - 4   # all but the last token
    stop = engine.result(ids[2]).text[3:5]
    if stop:           # a stop string inside a loop: the tokens after it are dropped
        cut = _engine(generator, "ours", dataclasses.replace(SMALL, decode_loop=4)).generate(
            [dataclasses.replace(reqs[2], stop=[stop])])[0]
        assert cut.finish_reason == "stop" and engine.result(ids[2]).text.startswith(cut.text) and stop not in cut.text
    assert engine.summary()["steps"] == sum(s.steps for s in engine.step_metrics)
    assert engine.allocator.num_free == SMALL.num_pages - 1


def test_a_named_system_brings_its_switch_and_needs_its_kernel(generator, monkeypatch):
    """Engine(policy=name) runs the serving system's policy and switch; a static-tile system on a
    runner of the adaptive kernel is refused, as is an unknown name."""
    assert _engine(generator, "dlora").config.per_layer_switch and not _engine(generator, "ours").config.per_layer_switch
    monkeypatch.setattr(generator.runner, "backend", "pallas")
    with pytest.raises(ValueError, match="policy 'slora' runs the static-tile kernel: build its runner with backend "
                                         "'pallas-static'"):
        _engine(generator, "slora")
    with pytest.raises(ValueError, match="unknown policy 'fast'"):
        _engine(generator, "fast")


def test_a_policy_that_raises_fails_no_request(generator, expected):
    """A scheduling fault is the engine's to absorb: the step runs the plain unmerged schedule,
    every request still gets its own answer, and the failures are counted."""
    class Broken(Policy):
        def decide(self, state):
            raise ZeroDivisionError("float division by zero")

    engine = Engine(generator.runner, generator.pool, config=SMALL, policy=Broken())
    for want, got in zip(expected, engine.generate(_requests(10))):
        assert got.token_ids == want.token_ids and got.finish_reason != "error"
    assert engine.policy_failures == len(engine.step_metrics) > 0
    assert engine.last_policy_error == "ZeroDivisionError: float division by zero"
