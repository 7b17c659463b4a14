"""ATMM kernels vs the jnp reference (Pallas interpreter on CPU), fused linears (columns), input
validation, tile lookup."""

import dataclasses
import json
import os
import zlib

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import PAD_SLOT, TileConfig, lora_delta, lora_delta_reference, tiling
from pallas_kernels.merge import merge_bytes
from pallas_kernels.testing import CASES, FUSED_CASES, Case, check, check_fused, fused_reference, make_problem

SMALL = TileConfig(shrink_block_t=16, block_k=32, split_k=2, expand_block_t=16, block_n=32)
PER_TOKEN = TileConfig(shrink_block_t=1, block_k=32, split_k=2, expand_block_t=1, block_n=32)


def _id(c: Case) -> str:
    mix = f"-mix-{c.merged}" if c.mixture else ""
    return f"T{c.tokens}-D{c.d_in}x{'+'.join(map(str, c.d_outs))}-R{c.max_rank}-S{c.slots}-{c.layout}-{c.dtype}{mix}"


@pytest.mark.parametrize("case", CASES, ids=_id)
@pytest.mark.parametrize("tile", [SMALL, PER_TOKEN], ids=["blocked", "per-token"])
def test_matches_reference(case, tile):
    """Each case draws its data from its own stable seed (its id's CRC): a failure replays."""
    check(case, seed=zlib.crc32(_id(case).encode()), tile=tile, interpret=True)


@pytest.mark.parametrize("tile", [
    TileConfig(shrink_block_t=16, block_k=16, split_k=1, expand_block_t=32, block_n=16),
    TileConfig(shrink_block_t=64, block_k=64, split_k=4, expand_block_t=16, block_n=64),
    TileConfig(shrink_block_t=32, block_k=128, split_k=1, expand_block_t=64, block_n=128),
    TileConfig(shrink_block_t=1, block_k=16, split_k=4, expand_block_t=32, block_n=16),   # per-token shrink
    TileConfig(shrink_block_t=32, block_k=64, split_k=2, expand_block_t=1, block_n=64),   # per-token expand
], ids=lambda t: f"bt{t.shrink_block_t}-k{t.block_k}x{t.split_k}-et{t.expand_block_t}-n{t.block_n}")
def test_tiles_agree(tile):
    # D_in and D_out not multiples of the blocks; T not a multiple of the token blocks.
    check(Case(75, 80, (72, 24), 32, 7, layout="segments", mixture=True), seed=3, tile=tile,
          interpret=True)


def test_public_op_picks_a_tile_and_matches_weights():
    case = Case(20, 64, (32, 64, 16), 16, 4, layout="uniform", dtype="bfloat16")
    x, weights, slot, _ = make_problem(case, seed=7)
    got = lora_delta(x, list(weights), slot, interpret=True)
    want = lora_delta_reference(x, weights, slot)
    assert isinstance(got, tuple) and [g.shape for g in got] == [w.shape for w in want]
    assert all(g.dtype == x.dtype for g in got)
    for g, w in zip(got, want):
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32), atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("tile", [SMALL, PER_TOKEN], ids=["blocked", "per-token"])
@pytest.mark.parametrize("mixture", [False, True])
def test_base_is_accumulated_in_place(tile, mixture):
    check(Case(37, 64, (48, 80), 32, 5, layout="segments", dtype="bfloat16", mixture=mixture), seed=11,
          tile=tile, interpret=True, with_base=True)
    x, weights, slot, _ = make_problem(Case(8, 32, (16, 24), 16, 4), seed=1)
    base = (jnp.zeros((8, 16)), jnp.zeros((8, 24)))
    with pytest.raises(ValueError, match="base must be 2 arrays"):
        lora_delta(x, weights, slot, base=base[:1], interpret=True)
    with pytest.raises(ValueError, match="base must be"):
        lora_delta(x, weights, slot, base=(base[0], base[1].astype(jnp.bfloat16)), interpret=True)


def _fused_id(fused) -> str:
    case, columns, width = fused
    return f"{_id(case)}-at{'+'.join(map(str, columns))}-N{width}"


@pytest.mark.parametrize("fused", FUSED_CASES, ids=_fused_id)
@pytest.mark.parametrize("tile,mixture", [(SMALL, True), (PER_TOKEN, False), (PER_TOKEN, True)],
                         ids=["blocked-mixture", "per-token-unmerged", "per-token-mixture"])
def test_fused_columns_match_reference(fused, mixture, tile):
    """Parts of one fused base [T, N]: each part's deltas land in its columns, the rest stay base's.
    (Blocked tiles run mixture mode only: its own-adapter token set is the whole unmerged path.)"""
    case, columns, width = fused
    case = dataclasses.replace(case, mixture=mixture)
    check_fused(case, columns, width, seed=zlib.crc32(_fused_id((case, columns, width)).encode()), tile=tile,
                interpret=True)


@pytest.mark.parametrize("tile", [
    SMALL, PER_TOKEN,
    TileConfig(shrink_block_t=1, block_k=16, split_k=4, expand_block_t=32, block_n=16),   # per-token shrink
    TileConfig(shrink_block_t=32, block_k=64, split_k=2, expand_block_t=1, block_n=64),   # per-token expand
], ids=["blocked", "per-token", "mixed-bt1-et32", "mixed-bt32-et1"])
@pytest.mark.parametrize("mixture", [False, True], ids=["unmerged", "mixture"])
def test_fused_columns_every_kind_of_token(tile, mixture):
    """Padding (PAD_SLOT), base-model (-1) and empty-slot (rank 0) tokens next to adapters, k untargeted."""
    slot = np.array([PAD_SLOT, -1, 0, 1, 1, 2, PAD_SLOT, 3, 0, -1, 2, 2, 3, 1, PAD_SLOT, 0, 1, -1], np.int32)
    case = Case(len(slot), 48, (40, 24), 24, 4, layout="segments", mixture=mixture)     # q 40 | k 24 | v 24
    check_fused(case, (0, 64), 88, seed=5, tile=tile, interpret=True, slot=slot)


def test_fused_public_op_and_errors():
    case = Case(12, 32, (32, 16, 16), 16, 3, layout="uniform", dtype="bfloat16")
    x, weights, slot, _ = make_problem(case, seed=2)
    base = jnp.asarray(np.random.default_rng(4).normal(size=(12, 64)), jnp.bfloat16)
    got = lora_delta(x, list(weights), slot, base=[base], columns=[0, 32, 48], interpret=True)
    assert isinstance(got, tuple) and len(got) == 1 and got[0].shape == (12, 64) and got[0].dtype == x.dtype
    want = fused_reference(x, weights, slot, -1, base, (0, 32, 48))
    np.testing.assert_allclose(np.asarray(got[0], np.float32), np.asarray(want, np.float32), atol=3e-2, rtol=3e-2)

    def bad(match, **kw):
        kw = {"base": [base], "columns": [0, 32, 48], **kw}
        with pytest.raises(ValueError, match=match):
            lora_delta(x, weights, slot, interpret=True, **kw)

    bad(r"columns has 2 entries for 3 weights", columns=[0, 32])
    bad(r"columns\[1\]=32\.0 must be a static int", columns=[0, 32.0, 48])
    bad(r"columns\[2\]=50: part 2's columns \[50, 66\) outside \[0, N=64\)", columns=[0, 32, 50])
    bad(r"columns\[0\]=-1", columns=[-1, 32, 48])
    bad(r"columns\[0\]=0 and columns\[1\]=24: part ranges \[0, 32\) and \[24, 40\) overlap", columns=[0, 24, 48])
    bad(r"base must be a sequence of one .* got NoneType", base=None)
    bad(r"base must be a sequence of one .* got ArrayImpl", base=base)
    bad(r"base must be a sequence of one .* got 2 arrays", base=[base, base])
    bad(r"base must be one \[T=12, N\] array in bfloat16, got float32", base=[base.astype(jnp.float32)])
    bad(r"base must be one \[T=12, N\] array in bfloat16, got bfloat16\[11, 64\]", base=[base[:11]])
    bad(r"base must be one \[T=12, N\] array", base=[base[0]])


def _good():
    x, weights, slot, _ = make_problem(Case(8, 32, (16,), 16, 4), seed=1)
    return x, weights[0], slot


@pytest.mark.parametrize("mutate, match", [
    (lambda x, w, s: (x[None], w, s, -1), "x must be"),
    (lambda x, w, s: (x.astype(jnp.int32), w, s, -1), "dtype int32"),
    (lambda x, w, s: (x, w._replace(a=w.a[:, :16]), s, -1), r"\.a shape"),
    (lambda x, w, s: (x, w._replace(b=w.b[:, :8]), s, -1), r"\.b shape"),
    (lambda x, w, s: (x, w._replace(b=w.b[:2]), s, -1), r"\.b shape"),
    (lambda x, w, s: (x, w._replace(a=w.a.astype(jnp.bfloat16)), s, -1), "a dtype bfloat16"),
    (lambda x, w, s: (x, w._replace(scale=w.scale[:3]), s, -1), "scale"),
    (lambda x, w, s: (x, w._replace(rank=w.rank.astype(jnp.float32)), s, -1), "rank must be int"),
    (lambda x, w, s: (x, w._replace(rank=np.array([0, 4, 17, 2], np.int32)), s, -1), r"rank \[0, 4, 17, 2\]"),
    (lambda x, w, s: (x, w, s.astype(jnp.float32), -1), "slot must be int32"),
    (lambda x, w, s: (x, w, s[:5], -1), r"slot must be int32 \[T=8\]"),
    (lambda x, w, s: (x, w, np.array([0, 1, 4, -1, 2, -3, 0, 0], np.int32), -1), r"slot ids \[-3, 4\]"),
    (lambda x, w, s: (x, w, s, 4), "merged_slot 4"),
    (lambda x, w, s: (x, w, s, jnp.zeros((2,), jnp.int32)), "merged_slot must be"),
])
def test_bad_inputs_raise_before_launch(mutate, match):
    x, w, s, m = mutate(*_good())
    with pytest.raises(ValueError, match=match):
        lora_delta(x, [w], s, m, mixture=True, interpret=True)


def test_empty_weights_and_bad_tiles_raise():
    x, w, s = _good()
    with pytest.raises(ValueError, match="weights is empty"):
        lora_delta(x, [], s, interpret=True)
    with pytest.raises(ValueError, match="block_n=96"):
        TileConfig(block_n=96)
    with pytest.raises(ValueError, match="shrink_block_t=8"):
        TileConfig(shrink_block_t=8)
    with pytest.raises(ValueError, match="expand_block_t=2"):
        TileConfig(expand_block_t=2)


def _write_table(tmp_path, monkeypatch, entries, merge=(), **fields):
    table = {"device": "Test GPU", "entries": [{"key": k, "tile": t.to_dict()} for k, t in entries],
             "merge": [{"key": k, "tile": t.to_dict()} for k, t in merge], **fields}
    (tmp_path / "Test_GPU.json").write_text(json.dumps(table))
    monkeypatch.setattr(tiling, "CONFIG_DIR", tmp_path)
    tiling._table_file.cache_clear()


def test_tile_lookup_nearest_bucket_then_heuristic(tmp_path, monkeypatch):
    key = dict(d_in=4096, d_out=4096, rank=16)
    decode, prefill = TileConfig(split_k=16, block_n=64), TileConfig(shrink_block_t=64, expand_block_t=64)
    _write_table(tmp_path, monkeypatch, [({**key, "tokens": 16, "adapters": 16}, decode),
                                         ({**key, "tokens": 4096, "adapters": 8}, prefill)])
    assert tiling.pick_tile(16, 4096, 4096, 16, 16, device_kind="Test GPU") == decode
    assert tiling.pick_tile(24, 5120, 11008, 64, 8, device_kind="Test GPU") == decode
    assert tiling.pick_tile(3000, 4096, 4096, 128, 64, device_kind="Test GPU") == prefill
    far = tiling.pick_tile(256, 4096, 4096, 16, 16, device_kind="Test GPU")     # no bucket near T
    assert far == tiling.heuristic_tile(256, 4096, 4096, 16, 16)
    per_token = TileConfig(shrink_block_t=1, split_k=2, expand_block_t=1, block_n=128)   # a tuned T = 256 tile
    _write_table(tmp_path, monkeypatch, [({**key, "tokens": 256, "adapters": 64}, per_token)])
    assert tiling.pick_tile(256, 4096, 4096, 16, 64, device_kind="Test GPU") == per_token
    blocked = tiling.pick_tile(512, 4096, 4096, 16, 8, device_kind="Test GPU")  # within an octave, but prefill-sized
    assert blocked == tiling.heuristic_tile(512, 4096, 4096, 16, 8) and blocked.shrink_block_t > 1
    tiling._table_file.cache_clear()


def test_tile_lookup_sees_only_the_asked_kernels(tmp_path, monkeypatch):
    """A table names the kernels its device runs by default; a lookup for one kernel never returns
    the other's tile, and falls back to that kernel's heuristic."""
    key = dict(tokens=64, d_in=4096, d_out=6144, rank=16, adapters=8)
    triton, mosaic = TileConfig(split_k=8), TileConfig(shrink_block_t=64, expand_block_t=64, split_k=4, kernel="mosaic")
    _write_table(tmp_path, monkeypatch, [(key, triton), (key, mosaic)], kernel="mosaic")
    assert tiling.device_kernels("Test GPU") == "mosaic" and tiling.device_kernels("No table GPU") == "triton"
    assert tiling.pick_tile(64, 4096, 6144, 16, 8, device_kind="Test GPU") == mosaic
    assert tiling.pick_tile(64, 4096, 6144, 16, 8, device_kind="Test GPU", kernels="triton") == triton
    far = tiling.pick_tile(4096, 4096, 6144, 16, 8, device_kind="Test GPU")
    assert far == tiling.heuristic_mosaic_tile(4096, 4096, 16) and far.kernel == "mosaic"
    assert tiling.pick_tile(64, 4096, 6144, 16, 8, device_kind="No table GPU").kernel == "triton"
    with pytest.raises(ValueError, match="kernels 'cuda' must be one of"):
        tiling.pick_tile(64, 4096, 6144, 16, 8, device_kind="Test GPU", kernels="cuda")
    tiling._table_file.cache_clear()


def test_merge_tile_lookup_nearest_shape_then_default(tmp_path, monkeypatch):
    square, wide = tiling.MergeTile(32, 512, 4), tiling.MergeTile(128, 256, 8)
    _write_table(tmp_path, monkeypatch, [], merge=[({"d_in": 4096, "d_out": 4096, "rank": 64}, square),
                                                   ({"d_in": 4096, "d_out": 11008, "rank": 64}, wide)])
    assert tiling.pick_merge_tile(4096, 4096, 16, device_kind="Test GPU") == square
    assert tiling.pick_merge_tile(5120, 13824, 128, device_kind="Test GPU") == wide
    assert tiling.pick_merge_tile(4096, 4096, 64, device_kind="No table GPU") == tiling.MergeTile()
    assert tiling.pick_merge_tile(4096, 4096, 64, device_kind="Test GPU", kernels="mosaic") == tiling.MOSAIC_MERGE_TILE
    with pytest.raises(ValueError, match="block_n=96"):
        tiling.MergeTile(block_n=96)
    with pytest.raises(ValueError, match="warps=3"):
        tiling.MergeTile(warps=3)
    tiling._table_file.cache_clear()


@pytest.mark.parametrize("tokens", [1, 7, 64, 300, 4096, 100000])
@pytest.mark.parametrize("adapters", [1, 64])
@pytest.mark.parametrize("d_in, rank", [(4096, 64), (4096, 24), (48, 24), (5120, 128), (1024, 8)])
def test_heuristic_tiles_are_valid(tokens, adapters, d_in, rank):
    t = tiling.pick_tile(tokens, d_in, 11008, rank, min(adapters, tokens), device_kind="no such device")
    assert isinstance(t, TileConfig) and t.split_k * t.block_k <= max(d_in, t.block_k)


def test_committed_tables_parse():
    for path in tiling.CONFIG_DIR.glob("*.json"):
        data = json.loads(path.read_text())
        for e in data["entries"]:
            assert set(e["key"]) == {"tokens", "d_in", "d_out", "rank", "adapters"}
            TileConfig.from_dict(e["tile"])


def test_timing_loop_keeps_every_call():
    # XLA drops a call whose result is unused: the harness must chain every call to the next.
    from pallas_kernels.timing import bulk_loop
    sets = [(jnp.full((32, 32), float(i)), jnp.ones((32, 32)), jnp.zeros((4,), jnp.int32)) for i in range(5)]
    fn = lambda x, w, s: (x @ w + s[0],)
    hlo = bulk_loop(fn, sets).lower(jnp.int32(2), sets).compile().as_text()
    assert hlo.count(" dot(") == len(sets)


def test_compile_all_yields_in_order_and_lazily():
    from pallas_kernels.timing import BulkTimer, compile_all
    made = []

    def job(n):
        def make():
            made.append(n)
            return BulkTimer(lambda x, s: (x * n + s[0],), [(jnp.ones((8, 8)), jnp.zeros((1,)))], unroll=2)
        return n, make

    timers = compile_all((job(n) for n in range(5)), threads=2)
    key, first = next(timers)
    assert key == 0 and made == [0, 1]             # no more than `threads` made ahead
    assert first.seconds(target_s=1e-4, repeats=1) > 0
    assert [k for k, _ in timers] == [1, 2, 3, 4]


def test_compile_all_reports_a_job_that_fails_to_trace_and_goes_on():
    from pallas_kernels.timing import BulkTimer, compile_all

    def make(n):
        if n == 1:
            raise NotImplementedError("shape not supported")
        return BulkTimer(lambda x, s: (x * n + s[0],), [(jnp.ones((8, 8)), jnp.zeros((1,)))], unroll=2)

    out = dict(compile_all(((n, lambda n=n: make(n)) for n in range(3)), threads=2))
    assert isinstance(out[1], NotImplementedError) and "not supported" in str(out[1])
    assert out[0].seconds(target_s=1e-4, repeats=1) > 0 and out[2].seconds(target_s=1e-4, repeats=1) > 0


def test_net_us_times_every_variant_and_names_a_failing_one():
    from pallas_kernels.timing import net_us

    def bad(x, s):
        raise ValueError("too big\nsecond line")

    sets = [(jnp.ones((8, 8)), jnp.zeros((1,)))]
    out = net_us({"good": lambda x, s: (x * 2 + s[0],), "bad": bad}, sets, harness_s=0.0, target_s=1e-4)
    assert out["good"] > 0 and out["bad"] == "ValueError: too big"


def test_tuner_candidates_are_valid_tiles():
    from pallas_kernels import tune
    for bt, bk, split, warps in tune.SHRINK:
        TileConfig(shrink_block_t=bt, block_k=bk, split_k=split, shrink_warps=warps)
    for bt, bn, warps in tune.EXPAND:
        TileConfig(expand_block_t=bt, block_n=bn, expand_warps=warps)
    assert len(set(tune.SHRINK)) == len(tune.SHRINK) and len(set(tune.EXPAND)) == len(tune.EXPAND)


def test_tuner_pairs_shrink_and_expand_by_total_time():
    from pallas_kernels import tune
    fast_shrink, slower_shrink = (1, 128, 32, 4), (1, 128, 8, 4)
    shrink = {fast_shrink: 10e-6, slower_shrink: 12e-6, (1, 256, 8, 4): 15e-6, (16, 128, 4, 4): 20e-6}
    assert tune._split_finalists(shrink) == [32, 8, 4]
    result = {"shrink": {(64, 128): shrink},
              "expand": {(64, 128, 4096, 32): {(1, 128, 4): 30e-6, (1, 256, 4): 35e-6},   # re-reads 32 partial sums
                         (64, 128, 4096, 8): {(1, 128, 4): 14e-6},
                         (64, 128, 4096, 4): {(1, 128, 4): 13e-6}}}
    assert tune.best_pairs(result) == {(64, 128, 4096): (slower_shrink, 12e-6, (1, 128, 4), 14e-6)}
    table = tune.build_table(result, "test")
    (entry,) = table["entries"]
    assert entry["tile"]["split_k"] == 8 and entry["shrink_us"] == 12.0 and entry["expand_us"] == 14.0
    assert entry["command"] == "test"


def test_tuner_sweep_orchestration_with_stub_timings(monkeypatch):
    """The sweep's bookkeeping on made-up times (no GPU): every bucket gets an entry, tiles fit."""
    from pallas_kernels import tune

    def fake_time_all(jobs, make_timer, bar):
        bar.update(len(jobs))
        return {(key, cand): 1e-6 * (1 + sum(cand) % 7) for key, cand in jobs}

    monkeypatch.setattr(tune, "_time_all", fake_time_all)
    monkeypatch.setattr(tune, "_shrink_sets", lambda tokens, rank: None)
    monkeypatch.setattr(tune, "_expand_sets", lambda tokens, rank, d_out, split: None)
    result = tune.sweep(budget_s=1e9, tokens_list=(1, 64, 1024))
    table = tune.build_table(result, "test")
    keys = {(e["key"]["tokens"], e["key"]["rank"], e["key"]["d_out"]) for e in table["entries"]}
    assert keys == {(t, r, o) for t in (1, 64, 1024) for r in tune.RANKS for o in tune.D_OUTS}
    for e in table["entries"]:
        tile = TileConfig.from_dict(e["tile"])
        assert tune._fits(tile.shrink_block_t, e["key"]["tokens"]) and tune._fits(tile.expand_block_t, e["key"]["tokens"])


def test_merge_sweep_writes_the_fastest_tile_and_keeps_the_atmm_entries(tmp_path, monkeypatch):
    """`tune --merge` on made-up times (no GPU): one entry per weight shape and rank, the fastest
    candidate with its bandwidth; the table's ATMM entries stay, and an ATMM sweep keeps the merge ones."""
    from pallas_kernels import tune

    def fake_time_all(jobs, make_timer, bar):
        bar.update(len(jobs))
        return {(key, cand): 1e-6 * (10 + cand[0] % 7 + cand[1] % 5 + cand[2]) for key, cand in jobs}

    monkeypatch.setattr(tune, "_time_all", fake_time_all)
    monkeypatch.setattr(tune, "_merge_sets", lambda *shape: None)
    out = tmp_path / "table.json"
    atmm_entry = {"key": {"tokens": 1, "d_in": 4096, "d_out": 4096, "rank": 16, "adapters": 1},
                  "tile": TileConfig().to_dict()}
    out.write_text(json.dumps({"device": "cpu", "entries": [atmm_entry]}))
    tune.main(["--merge", "--out", str(out)])
    table = json.loads(out.read_text())
    assert table["entries"] == [atmm_entry]
    assert {(e["key"]["d_in"], e["key"]["d_out"], e["key"]["rank"]) for e in table["merge"]} == {
        (i, o, r) for i, o in tune.MERGE_SHAPES for r in tune.MERGE_RANKS}
    fastest = min(tune.MERGE, key=lambda c: c[0] % 7 + c[1] % 5 + c[2])
    entry = table["merge"][0]
    assert tiling.MergeTile(**entry["tile"]) == tiling.MergeTile(*fastest) and entry["command"].endswith("--merge --out "
                                                                                                         + str(out))
    key = entry["key"]
    assert entry["tb_per_s"] == round(merge_bytes(key["d_in"], key["d_out"], key["rank"]) / (entry["us"] * 1e-6)
                                      / 1e12, 3)
    monkeypatch.setattr(tune, "_shrink_sets", lambda tokens, rank: None)
    monkeypatch.setattr(tune, "_expand_sets", lambda tokens, rank, d_out, split: None)
    tune.main(["--tokens", "16", "--out", str(out)])
    again = json.loads(out.read_text())
    assert again["merge"] == table["merge"] and atmm_entry in again["entries"] and len(again["entries"]) > 1


def test_mosaic_sweep_joins_the_triton_entries_and_names_the_faster_default(tmp_path, monkeypatch):
    """`tune --kernel mosaic` on made-up times (no GPU): a Mosaic entry per swept bucket (the
    fastest pipeline, then the fastest output width under it) beside the Triton entries, which
    stay; the table's default kernel is the one faster over the buckets both hold. `--merge` adds
    the Mosaic merge's tiles beside the Triton ones in the same way."""
    from pallas_kernels import tune

    def fake_time_all(jobs, make_timer, bar):
        bar.update(len(jobs))
        return {(key, cand): 1e-6 * (5 + (cand[1] != 4) + (cand[3] != 256)) for key, cand in jobs}

    monkeypatch.setattr(tune, "_time_all", fake_time_all)
    monkeypatch.setattr(tune, "_mosaic_sets", lambda tokens, rank, d_out: None)
    key = {"tokens": 16, "d_in": 4096, "d_out": 4096, "rank": 16, "adapters": 16}
    triton = {"key": key, "tile": TileConfig().to_dict(), "shrink_us": 4.0, "expand_us": 4.0}
    out = tmp_path / "table.json"
    out.write_text(json.dumps({"device": "cpu", "entries": [triton], "merge": []}))
    tune.main(["--kernel", "mosaic", "--tokens", "16", "--out", str(out)])
    table = json.loads(out.read_text())
    mosaic = [e for e in table["entries"] if e["tile"]["kernel"] == "mosaic"]
    assert triton in table["entries"] and len(mosaic) == len(tune.RANKS) * len(tune.D_OUTS)
    tile = TileConfig.from_dict(mosaic[0]["tile"])
    assert (tile.split_k, tile.block_n, mosaic[0]["us"]) == (4, 256, 5.0)
    assert table["kernel"] == "mosaic"                                 # 5 us against the Triton entry's 8
    assert tune.default_kernels([triton, {**mosaic[0], "key": key, "us": 9.0}]) == "triton"
    assert tune.default_kernels([triton]) == "triton"
    triton_merge = {"key": {"d_in": 4096, "d_out": 4096, "rank": 64}, "tile": tiling.MergeTile().to_dict()}
    out.write_text(json.dumps({**table, "merge": [triton_merge]}))
    monkeypatch.setattr(tune, "_merge_sets", lambda *shape: None)
    tune.main(["--kernel", "mosaic", "--merge", "--out", str(out)])
    merged = json.loads(out.read_text())
    assert merged["entries"] == table["entries"] and merged["kernel"] == "mosaic" and triton_merge in merged["merge"]
    mosaic_merge = [tiling.MergeTile(**e["tile"]) for e in merged["merge"] if e["tile"]["kernel"] == "mosaic"]
    assert len(mosaic_merge) == len(tune.MERGE_SHAPES) * len(tune.MERGE_RANKS)


def test_tuner_saves_each_bucket_as_it_finishes(tmp_path, monkeypatch):
    """A sweep cut off in its second bucket (a device call's time limit) leaves the first one in
    the table, beside the buckets it did not sweep."""
    from pallas_kernels import tune

    buckets_started = []

    def fake_time_all(jobs, make_timer, bar):
        bar.update(len(jobs))
        return {(key, cand): 1e-6 * (1 + sum(cand) % 7) for key, cand in jobs}

    def fake_shrink_sets(tokens, rank):
        buckets_started.append(tokens)
        if tokens == 64:
            raise KeyboardInterrupt("time limit")

    monkeypatch.setattr(tune, "_time_all", fake_time_all)
    monkeypatch.setattr(tune, "_shrink_sets", fake_shrink_sets)
    monkeypatch.setattr(tune, "_expand_sets", lambda tokens, rank, d_out, split: None)
    out = tmp_path / "table.json"
    kept = {"key": {"tokens": 4096, "d_in": 4096, "d_out": 4096, "rank": 16, "adapters": 64},
            "tile": TileConfig().to_dict()}
    out.write_text(json.dumps({"device": "cpu", "entries": [kept], "merge": []}))
    with pytest.raises(KeyboardInterrupt):
        tune.main(["--tokens", "16", "64", "--out", str(out)])
    table = json.loads(out.read_text())
    assert 64 in buckets_started and kept in table["entries"]
    assert {e["key"]["tokens"] for e in table["entries"]} == {16, 4096}
