"""Benchmark traces: arrival statistics, popularity, determinism, and replay through an engine."""

import gc
import time
import weakref

import numpy as np
import pytest

from bench.workloads import GcPauses, SkippingClock, Workload, adapter_probabilities, arrival_times, make_trace, replay
from serve.config import EngineConfig
from serve.engine import Engine
from valora_jax.runtime import frozen_heap


@pytest.mark.parametrize("arrival,cv", [("poisson", 1.0), ("bursty", 2.0)])
def test_arrival_rate_and_burstiness(arrival, cv):
    times = arrival_times(Workload(rate=5.0, arrival=arrival, num_requests=20000), np.random.default_rng(0))
    gaps = np.diff(times)
    assert times[0] == 0 and np.all(gaps >= 0)
    assert gaps.mean() == pytest.approx(0.2, rel=0.05)
    assert gaps.std() / gaps.mean() == pytest.approx(cv, rel=0.1)


def test_popularity():
    np.testing.assert_allclose(adapter_probabilities("hot80", 5), [0.8, 0.05, 0.05, 0.05, 0.05])
    z = adapter_probabilities("zipf1.5", 4)
    np.testing.assert_allclose(z[0] / z[1], 2 ** 1.5)
    np.testing.assert_allclose(adapter_probabilities("uniform", 4), 0.25)
    with pytest.raises(ValueError, match="'hot90'"):
        Workload(popularity="hot90")


def test_traces_are_deterministic_and_shaped_by_kind():
    names = ["hot", "b", "c"]
    w = Workload(kind="video", num_requests=30, seed=3)
    a, b = make_trace(w, names, 16, headed={"b"}), make_trace(w, names, 16, headed={"b"})
    assert [t for t, _ in a] == [t for t, _ in b] and [r.adapter for _, r in a] == [r.adapter for _, r in b]
    assert all(len(r.images) == 6 and r.ignore_eos for _, r in a)
    assert all(r.max_tokens == 1 for _, r in a if r.adapter == "b")
    vqa = make_trace(Workload(kind="vqa", num_requests=30), names, 16)
    assert all(len(r.images) == 1 and 40 <= r.max_tokens <= 120 for _, r in vqa)


def test_replay_completes_every_request_with_backdated_arrivals(generator):
    names = ["task0", "task1", "task2"]
    trace = make_trace(Workload(rate=50.0, num_requests=6, seed=1), names, 32)
    trace = [(t, r.__class__(**{**r.__dict__, "max_tokens": 3})) for t, r in trace]
    clock = SkippingClock()
    engine = Engine(generator.runner, generator.pool, policy="ours", clock=clock,
                    config=EngineConfig(max_rows=4, token_budget=256, prefill_chunk=64, num_pages=64))
    ids = replay(engine, trace, clock)
    assert len(ids) == 6 and all(engine.result(i).finish_reason == "length" for i in ids)
    assert [m.arrival for m in engine.request_metrics] == [t for t, _ in trace]
    assert all(len(engine.result(i).token_ids) == 3 for i in ids)


def test_replay_starts_the_clock_once_requests_are_prepared(generator):
    """Preparing the trace takes 1.2 s here; the first step must still come right after the
    first arrival, not after the preparation."""
    trace = make_trace(Workload(rate=50.0, num_requests=6, seed=2), ["task0", "task1"], 32)
    trace = [(t, r.__class__(**{**r.__dict__, "max_tokens": 2})) for t, r in trace]
    clock = SkippingClock()
    engine = Engine(generator.runner, generator.pool, policy="unmerged", clock=clock,
                    config=EngineConfig(max_rows=4, token_budget=256, prefill_chunk=64, num_pages=64))
    prepare = engine.prepare
    engine.prepare = lambda r: (time.sleep(0.2), prepare(r))[1]
    replay(engine, trace, clock)
    assert engine.step_metrics[0].start - trace[0][0] < 0.6


def test_gc_pauses_records_collections_while_in_use_only():
    with GcPauses(clock=lambda: 7.0, log_s=0.0) as pauses:
        gc.collect()
    assert pauses.pauses and pauses.pauses[-1][0] == 7.0 and pauses.pauses[-1][2] == 2
    assert pauses.total_s >= pauses.max_s > 0 and pauses.max_s == max(p[1] for p in pauses.pauses)
    seen = len(pauses.pauses)
    gc.collect()                                   # after the block: not recorded
    assert len(pauses.pauses) == seen and pauses._on_gc not in gc.callbacks


class _Node:
    """A reference cycle: only a garbage collection frees it."""

    def __init__(self):
        self.me = self


def test_frozen_heap_keeps_what_was_alive_on_entry_out_of_collections_until_exit():
    garbage, alive = _Node(), _Node()
    garbage_ref, alive_ref = weakref.ref(garbage), weakref.ref(alive)
    del garbage
    with frozen_heap() as frozen:
        assert garbage_ref() is None                 # collected on entry
        assert frozen > 0
        del alive
        gc.collect()
        assert alive_ref() is not None               # frozen: a collection does not scan it
        new = _Node()
        new_ref = weakref.ref(new)
        del new
        gc.collect()
        assert new_ref() is None                     # what the block allocated is collected
    assert gc.get_freeze_count() == 0
    gc.collect()
    assert alive_ref() is None                       # unfrozen on exit: freed by the next collection
