"""Adapter validation and the adapter pool: LRU, pinning, full pool, re-registration."""

import dataclasses

import numpy as np
import pytest

from conftest import micro_config
from valora_jax import AdapterPool, PoolFull, TaskHead, make_adapter, random_adapter
from valora_jax.adapters import PackedAdapter, target_of


class _Slots:
    """Stands in for the runner's device writes: records which adapter each slot holds."""

    def __init__(self, n):
        self.held = [None] * n
        self.writes = 0

    def __call__(self, slot, adapter):
        self.held[slot] = None if adapter is None else adapter.name
        self.writes += 1


SHAPES = {"decoder.layers.0.q_proj": (8, 8), "decoder.layers.0.down_proj": (16, 8),
          "vision_tower.layers.0.fc1": (4, 16)}


def _pool(max_loras=2):
    cfg = micro_config(max_loras=max_loras)
    slots = _Slots(max_loras)
    pool = AdapterPool(cfg, SHAPES, slots)
    for i in range(5):
        pool.register(random_adapter(cfg, SHAPES, f"a{i}", rank=4, seed=i))
    return pool, slots, cfg


def test_target_names():
    assert target_of("decoder.layers.3.q_proj") == "q_proj"
    assert target_of("vision_tower.layers.0.fc1") == "vision.fc1"
    assert target_of("projector.linear_1") == "projector.linear_1"


def test_lru_eviction_and_slot_reuse():
    pool, slots, _ = _pool()
    assert pool.acquire(["a0"]) == {"a0": 0}
    assert pool.acquire(["a1", None]) == {"a1": 1}
    pool.acquire(["a0"])                                  # a0 now most recent
    assert pool.acquire(["a2"]) == {"a2": 1}              # evicts a1
    assert slots.held == ["a0", "a2"] and pool.resident == {("a0", 1): 0, ("a2", 1): 1}
    writes = slots.writes
    pool.acquire(["a0", "a2"])                            # resident: no device write
    assert slots.writes == writes


def test_pinning_and_full_pool_change_nothing():
    pool, slots, _ = _pool()
    pool.acquire(["a0", "a1"])
    pool.pin("a0")
    pool.pin("a1")
    before = (dict(pool.resident), list(slots.held), slots.writes)
    with pytest.raises(PoolFull, match="a2"):
        pool.acquire(["a2"])
    with pytest.raises(PoolFull):
        pool.acquire(["a0", "a2", "a3"])
    assert (pool.resident, slots.held, slots.writes) == before
    pool.unpin("a1")
    assert pool.acquire(["a2"]) == {"a2": 1}
    with pytest.raises(ValueError, match="not pinned"):
        pool.unpin("a3")
    with pytest.raises(ValueError, match="pinned"):
        pool.unregister("a0")


def test_unknown_adapter_rejected_before_any_write():
    pool, slots, _ = _pool()
    with pytest.raises(ValueError, match="'nope'"):
        pool.acquire(["a0", "nope"])
    assert slots.writes == 0 and pool.resident == {}


def test_reregistration_keeps_old_version_until_released():
    pool, slots, cfg = _pool()
    pool.acquire(["a0"])
    version = pool.register(random_adapter(cfg, SHAPES, "a0", rank=8, seed=99))
    assert version == 2 and pool.slot_of("a0") is None and pool.slot_of(("a0", 1)) == 0
    assert pool.acquire(["a0"]) == {"a0": 1} and pool.store["a0"].rank == 8
    assert pool.get(("a0", 1)).rank == 4                 # the old version still serves its requests
    pool.release(("a0", 1))
    assert slots.held == [None, "a0"]
    with pytest.raises(ValueError, match="version"):
        pool.acquire([("a0", 1)])
    pool.release(("a0", 2))                              # the current version is never released
    assert pool.slot_of("a0") == 1


def test_unregister_clears_slot():
    pool, slots, _ = _pool()
    pool.acquire(["a3"])
    pool.unregister("a3")
    assert slots.held == [None, None] and "a3" not in pool.store


@pytest.mark.parametrize("change,message", [
    (lambda cfg, a: {"base_id": "other@123"}, "other@123"),
    (lambda cfg, a: {"weights": {**a.weights, "decoder.layers.0.up_proj": a.weights["decoder.layers.0.q_proj"]}},
     "up_proj"),
    (lambda cfg, a: {"weights": {**a.weights, "decoder.layers.0.q_proj": (np.zeros((7, 4)), np.zeros((4, 8)))}},
     r"\(7, 4\)"),
    (lambda cfg, a: {"weights": {p: (np.zeros((i, 40)), np.zeros((40, o))) for p, (i, o) in SHAPES.items()},
                     "scales": {p: 1.0 for p in SHAPES}}, "rank 40"),
    (lambda cfg, a: {"name": ""}, "name"),
    (lambda cfg, a: {"weights": {p: (a_.astype(np.int32), b_) for p, (a_, b_) in a.weights.items()}}, "int32"),
    (lambda cfg, a: {"scales": {**a.scales, "decoder.layers.0.q_proj": float("nan")}},
     r"q_proj'?: scale nan is not a finite number within \+-10000"),
    (lambda cfg, a: {"scales": {**a.scales, "decoder.layers.0.q_proj": 1e30}}, r"scale 1e\+30"),
    (lambda cfg, a: {"scales": {**a.scales, "decoder.layers.0.q_proj": "2"}}, "scale '2'"),
    (lambda cfg, a: {"weights": {**a.weights, "decoder.layers.0.q_proj": (
        np.where(np.arange(4) == 2, np.inf, a.weights["decoder.layers.0.q_proj"][0]),
        a.weights["decoder.layers.0.q_proj"][1])}}, r"q_proj'?: A holds \d+ non-finite values"),
    (lambda cfg, a: {"weights": {**a.weights, "decoder.layers.0.q_proj": (
        a.weights["decoder.layers.0.q_proj"][0], 1e6 * np.ones_like(a.weights["decoder.layers.0.q_proj"][1]))}},
     r"B holds values up to 1e\+06"),
    (lambda cfg, a: {"alpha": float("inf")}, "alpha inf is not finite"),
    (lambda cfg, a: {"head": TaskHead(np.zeros((cfg.text.hidden_size, 2)), np.zeros(3), ("x", "y"))}, r"bias \(3,\)"),
    (lambda cfg, a: {"head": TaskHead(np.full((cfg.text.hidden_size, 2), np.nan), np.zeros(2), ("x", "y"))},
     "task head kernel holds"),
])
def test_bad_adapters_rejected_and_pool_unchanged(change, message):
    pool, slots, cfg = _pool()
    good = random_adapter(cfg, SHAPES, "bad", rank=4, seed=0)
    store = dict(pool.store)
    with pytest.raises(ValueError, match=message):
        pool.register(dataclasses.replace(good, **change(cfg, good)))
    assert pool.store == store and slots.writes == 0


def test_make_adapter_scales():
    cfg = micro_config()
    a = make_adapter("x", cfg.base_id, {"decoder.layers.0.q_proj": (np.ones((8, 4)), np.ones((4, 8)))}, alpha=8)
    assert a.scales == {"decoder.layers.0.q_proj": 2.0} and a.rank == 4 and a.targets == ("q_proj",)


def test_staged_adapters_are_written_from_device_copies():
    pool, slots, _ = _pool()
    written = []
    pool._write_slot = lambda slot, adapter: written.append(adapter)
    pool.stage("a3")
    pool.stage("a3")                                     # idempotent
    pool.acquire(["a3"])
    import jax
    assert isinstance(written[0].buffer, jax.Array) and isinstance(written[0].scales, jax.Array)
    np.testing.assert_array_equal(written[0].weights["decoder.layers.0.q_proj"][0],
                                  pool.get("a3").weights["decoder.layers.0.q_proj"][0])
    pool.acquire(["a0"])
    pool.acquire(["a1"])                                 # evicts a3 (two slots)
    assert pool.slot_of("a3") is None
    pool.acquire(["a3"])                                 # back from the device copy, not the host
    assert written[-1] is written[0]
    pool.acquire(["a2"])                                 # never staged: from the host
    assert isinstance(written[-1].buffer, np.ndarray)
    pool.max_staged = 4
    for name in ("a0", "a1", "a2"):
        pool.stage(name)
    pool.stage("a3")                                     # already staged: nothing happens
    assert list(pool._staged) == [("a3", 1), ("a0", 1), ("a1", 1), ("a2", 1)]
    pool.wait_staged(["a0", "a1", "a2", "a3"])
    pool.stage("a4")                                     # a fifth copy drops the least recently used
    assert list(pool._staged) == [("a0", 1), ("a1", 1), ("a2", 1), ("a4", 1)]


def test_ready_means_no_copy_to_wait_for_and_copies_under_way_are_kept(monkeypatch):
    import threading
    from valora_jax import adapters
    pool, slots, _ = _pool()
    copy_may_finish, to_device = threading.Event(), adapters.PackedAdapter.to_device
    monkeypatch.setattr(adapters.PackedAdapter, "to_device", lambda a: (copy_may_finish.wait(), to_device(a))[1])
    pool.acquire(["a0"])
    assert pool.ready("a0")                              # resident
    assert not pool.ready("a1") and ("a1", 1) in pool._staged   # not ready: its copy has started
    pool.max_staged = 1
    pool.stage("a2")
    assert list(pool._staged) == [("a1", 1), ("a2", 1)]  # over the limit, but no copy is dropped under way
    copy_may_finish.set()
    pool.wait_staged(["a1", "a2"])
    assert pool.ready("a1") and pool.ready("a2")
    pool.stage("a3")
    pool.wait_staged(["a3"])
    assert list(pool._staged) == [("a3", 1)]            # finished copies beyond the limit: oldest dropped
    with pytest.raises(ValueError, match="unknown adapter 'nope'"):
        pool.ready("nope")


def test_a_failed_staging_copy_fails_the_acquire_and_is_retried(monkeypatch):
    import jax
    pool, slots, _ = _pool()
    device_put = jax.device_put
    monkeypatch.setattr(jax, "device_put", lambda x: (_ for _ in ()).throw(RuntimeError("out of memory")))
    pool.stage("a3")
    with pytest.raises(RuntimeError, match="out of memory"):
        pool.acquire(["a3"])
    assert pool.slot_of("a3") is None and ("a3", 1) not in pool._staged
    monkeypatch.setattr(jax, "device_put", device_put)
    pool.stage("a3")
    assert pool.acquire(["a3"]) == {"a3": 0}


def test_evict_all_forgets_placements_but_refuses_while_pinned():
    pool, slots, _ = _pool()
    pool.acquire(["a0", "a1"])
    pool.stage("a3")
    pool.pin("a1")
    pool.unpin("a1")                                   # no longer pinned: not named
    pool.pin("a0")
    with pytest.raises(ValueError, match=r"adapters \[\('a0', 1\)\] are pinned"):
        pool.evict_all()
    assert pool.resident == {("a0", 1): 0, ("a1", 1): 1} and pool._staged
    pool.unpin("a0")
    pool.evict_all()
    assert pool.resident == {} and not pool._staged
    writes = slots.writes
    assert pool.acquire(["a1"]) == {"a1": 0} and slots.writes == writes + 1   # rewritten, not trusted


def test_packed_adapters_hold_every_module_in_one_buffer():
    cfg = micro_config()
    rng = np.random.default_rng(0)
    weights = {"decoder.layers.0.q_proj": (rng.standard_normal((8, 4)), rng.standard_normal((4, 8))),
               "vision_tower.layers.0.fc1": (rng.standard_normal((4, 2)), rng.standard_normal((2, 16))),
               "decoder.layers.0.down_proj": (rng.standard_normal((16, 3)), rng.standard_normal((3, 8)))}
    adapter = make_adapter("mixed", cfg.base_id, weights, alpha=6)
    packed = PackedAdapter.of(adapter, np.float32)
    assert packed.buffer.shape == (8 * 4 + 4 * 8 + 4 * 2 + 2 * 16 + 16 * 3 + 3 * 8,)
    assert packed.layout == (("decoder.layers.0.down_proj", 16, 3, 8), ("decoder.layers.0.q_proj", 8, 4, 8),
                             ("vision_tower.layers.0.fc1", 4, 2, 16))
    np.testing.assert_array_equal(packed.scales, [2.0, 1.5, 3.0])
    for path, (a, b) in packed.weights.items():
        np.testing.assert_allclose(a, weights[path][0].astype(np.float32))
        np.testing.assert_allclose(b, weights[path][1].astype(np.float32))
        assert np.shares_memory(a, packed.buffer) and np.shares_memory(b, packed.buffer)
    on_device = packed.to_device()
    import jax
    assert isinstance(on_device.buffer, jax.Array) and on_device.layout == packed.layout
    np.testing.assert_array_equal(np.asarray(on_device.buffer), packed.buffer)


def test_the_store_keeps_one_copy_of_the_weights():
    pool, _, _ = _pool()
    a, b = pool.get("a2").weights["decoder.layers.0.down_proj"]
    assert np.shares_memory(a, pool._packed[("a2", 1)].buffer) and np.shares_memory(b, pool._packed[("a2", 1)].buffer)


def test_register_stores_weights_in_the_model_dtype():
    cfg = micro_config(dtype="bfloat16")
    pool = AdapterPool(cfg, SHAPES, _Slots(2))
    adapter = random_adapter(cfg, SHAPES, "a", rank=4, seed=0)
    pool.register(adapter)
    stored = pool.get("a").weights["decoder.layers.0.q_proj"]
    assert all(str(w.dtype) == "bfloat16" for w in stored)
    np.testing.assert_array_equal(np.asarray(stored[0], np.float32),
                                  np.asarray(adapter.weights["decoder.layers.0.q_proj"][0]).astype(stored[0].dtype)
                                  .astype(np.float32))
