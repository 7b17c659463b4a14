"""The paged flash prefill-attention kernel (interpreted) against its reference: ragged query
positions, padding queries and rows, scattered and shuffled pages, garbage and out-of-range
page-table entries, NaN past what rows attend, grouped-query heads, page sizes below, at and above
the key block, three dtypes; the reference against a per-query softmax; the errors for bad input."""

import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import prefill_attention, prefill_attention_reference
from pallas_kernels.testing import ATTENTION_CASES, AttentionCase, attention_problem, check_attention

INTERPRET = {"block_q": 16, "block_k": 16, "interpret": True}


@pytest.mark.parametrize("case", ATTENTION_CASES, ids=str)
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_reference(case, seed):
    check_attention(case, seed=seed, interpret=True)


def test_problems_hold_what_the_cases_promise():
    """attention_problem's rows: one of padding only, one attending every page column, the others'
    pages scattered (not one run), no page shared, NaN on every page and slot no row attends."""
    case = AttentionCase(4, 12, 64, page_size=8)
    _, k, _, table, positions = attention_problem(case, seed=2)
    table, positions, k = np.asarray(table), np.asarray(positions), np.asarray(k)
    assert (positions[1] < 0).all() and positions[3].max() >= case.width() * case.page_size - 1
    attended = np.zeros(k.shape[1:3], bool)                                          # [P, S]
    owned = []
    for r in range(case.rows):
        last = min(positions[r].max(), case.width() * case.page_size - 1)
        keys = np.arange(last + 1)
        attended[table[r, keys // case.page_size], keys % case.page_size] = True
        owned += list(np.unique(table[r, keys // case.page_size]))
    assert len(owned) == len(set(owned)) and owned and not (np.diff(table[3]) == 1).all()
    assert np.isnan(k[:, ~attended]).all() and not np.isnan(k[:, attended]).any()
    assert ((table < 0) | (table >= k.shape[1])).any()                              # out-of-range entries


def test_each_query_sees_exactly_the_keys_up_to_its_position():
    """One-hot values make the output the attention weights themselves: a query at position p
    spreads its weight over keys 0..p, read through a shuffled page table, and puts nothing on
    later ones."""
    page_size, width, queries = 4, 8, 8
    keys = width * page_size
    table = np.random.default_rng(0).permutation(np.arange(1, width + 1))             # page 0 unused
    v = np.full((1, width + 1, page_size, 32), np.nan, np.float32)
    for j in range(keys):
        v[0, table[j // page_size], j % page_size] = np.eye(keys, 32)[j]             # key j -> e_j
    k = np.where(np.isnan(v), np.nan, 0).astype(np.float32)                          # uniform scores
    q = jnp.ones((1, queries, 1, 32), jnp.float32)
    positions = jnp.asarray([[3, 4, 5, 6, 20, 31, 40, -1]], jnp.int32)
    args = (q, jnp.asarray(k), jnp.asarray(v), jnp.asarray(table[None], jnp.int32), positions)
    for out in (prefill_attention(*args, **INTERPRET), prefill_attention_reference(*args)):
        out = np.asarray(out)[0]
        for i, p in enumerate([3, 4, 5, 6, 20, 31, 40]):
            seen = min(p, keys - 1) + 1
            np.testing.assert_allclose(out[i, :seen], 1 / seen, rtol=1e-6)
            assert not out[i, seen:].any()
        assert np.isfinite(out[7]).all()                                              # padding: finite


@pytest.mark.parametrize("block_k", [16, 32, 64])
def test_rows_of_padding_and_the_key_block_change_nothing(block_k):
    """A row of padding queries gives finite output and leaves the other rows as they are; every
    key block (pages per step 1, 2 and 4 of 16 keys, capped at the table) gives one answer."""
    q, k, v, table, positions = attention_problem(AttentionCase(3, 20, 64, head_dim=16), seed=4)
    positions = positions.at[0].set(-1)
    got = np.asarray(prefill_attention(q, k, v, table, positions, block_q=16, block_k=block_k, interpret=True))
    want = np.asarray(prefill_attention_reference(q, k, v, table, positions))
    assert np.isfinite(got).all()
    real = np.asarray(positions) >= 0
    np.testing.assert_allclose(got[real], want[real], rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("change, message", [
    (dict(head_dim=8), "head dim 8 must be a power of two >= 16"),
    (dict(kv_heads=3), "H a multiple of H_kv"),
    (dict(page_size=12), "page size 12 must be a power of two >= 1"),
    (dict(k_dtype=jnp.bfloat16), "dtypes differ"),
    (dict(table=(3, 2)), r"page_table shape \(3, 2\) != \[B=2, W >= 1\]"),
    (dict(table=(2, 0)), r"page_table shape \(2, 0\) != \[B=2, W >= 1\]"),
    (dict(positions=(2, 3)), r"positions shape \(2, 3\) != \[B=2, Q=4\]"),
    (dict(block_q=24), "block_q=24 must be a power of two >= 16"),
    (dict(block_k=8), "block_k=8 must be a power of two >= 16"),
])
def test_bad_input_is_refused_by_name(change, message):
    dh, kv, ps = change.get("head_dim", 16), change.get("kv_heads", 2), change.get("page_size", 16)
    q = jnp.zeros((2, 4, 4, dh), jnp.float32)
    k = jnp.zeros((kv, 5, ps, dh), change.get("k_dtype", jnp.float32))
    v = jnp.zeros((kv, 5, ps, dh), jnp.float32)
    if "k_dtype" in change:
        v = v.astype(change["k_dtype"])
    table = jnp.zeros(change.get("table", (2, 2)), jnp.int32)
    positions = jnp.zeros(change.get("positions", (2, 4)), jnp.int32)
    with pytest.raises(ValueError, match=message):
        prefill_attention(q, k, v, table, positions, block_q=change.get("block_q", 16),
                          block_k=change.get("block_k", 16), interpret=True)


def test_reference_equals_a_per_query_softmax():
    """Key j of the row is slot j % S of page table[j // S]; out-of-range entries clip into the cache."""
    rng = np.random.default_rng(5)
    q = rng.standard_normal((1, 3, 2, 16)).astype(np.float32)
    k, v = (rng.standard_normal((1, 6, 4, 16)).astype(np.float32) for _ in range(2))
    table = np.asarray([[4, 1, 3, 9]], np.int32)                                     # 9 clips to page 5
    positions = np.asarray([[0, 6, 14]], np.int32)
    got = np.asarray(prefill_attention_reference(*map(jnp.asarray, (q, k, v, table, positions))))
    page = np.minimum(table[0], 5)
    keys = np.stack([k[0, page[j // 4], j % 4] for j in range(16)])
    values = np.stack([v[0, page[j // 4], j % 4] for j in range(16)])
    for i, p in enumerate(positions[0]):
        for h in range(2):
            s = keys[:p + 1] @ q[0, i, h] / 4.0
            w = np.exp(s - s.max()) / np.exp(s - s.max()).sum()
            np.testing.assert_allclose(got[0, i, h * 16:(h + 1) * 16], w @ values[:p + 1], rtol=1e-5, atol=1e-6)


def test_nan_past_every_query_never_reaches_the_output():
    """Pages and slots past a row's last query position (the rest of its padded page table) may
    hold NaN: the kernel and the reference mask them by select, and give what clean pages give."""
    q, k, v, table, positions = attention_problem(AttentionCase(3, 16, 48, heads=4, kv_heads=1, head_dim=16), seed=3)
    clean = [jnp.nan_to_num(t, nan=7.0) for t in (k, v)]
    real = np.asarray(positions) >= 0
    for fn, kw in ((prefill_attention, INTERPRET), (prefill_attention_reference, {})):
        got = np.asarray(fn(q, k, v, table, positions, **kw))
        assert np.isfinite(got[real]).all()
        np.testing.assert_allclose(got[real], np.asarray(fn(q, *clean, table, positions, **kw))[real], rtol=1e-6)
