"""The paged decode-attention kernel (interpreted) against its reference: ragged lengths (idle
rows, one key, whole tables), grouped-query heads, key splits that end past a row's length,
garbage page ids past the length, three dtypes; and the errors for bad input."""

import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.decode_attention import decode_attention, decode_attention_reference
from pallas_kernels.testing import DECODE_CASES, DecodeCase, check_decode_attention, decode_problem


@pytest.mark.parametrize("case", DECODE_CASES, ids=str)
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_reference(case, seed):
    check_decode_attention(case, seed=seed, interpret=True)


@pytest.mark.parametrize("splits", [1, 2, 5])
def test_splits_do_not_change_the_answer(splits):
    case = DecodeCase(3, 10, 40, page_size=4, pages_per_block=2)
    args = decode_problem(case, seed=3)
    one = decode_attention(*args, pages_per_block=2, splits=1, interpret=True)
    np.testing.assert_allclose(decode_attention(*args, pages_per_block=2, splits=splits, interpret=True), one,
                               rtol=1e-5, atol=1e-6)


def test_a_row_sees_exactly_its_first_length_keys():
    """One-hot values make the output the attention weights: a row of length n spreads its weight
    evenly over keys 0..n-1 (equal scores) and puts nothing on later ones, wherever its pages lie."""
    page, width, head_dim = 4, 4, 16
    keys = width * page
    v = jnp.zeros((1, width, page, head_dim), jnp.float32).at[0].set(jnp.eye(keys, head_dim).reshape(width, page, -1))
    k = jnp.zeros_like(v)
    q = jnp.ones((3, 1, head_dim), jnp.float32)
    table = jnp.asarray([[0, 1, 2, 3], [0, 1, 2, 3], [0, 1, 2, 3]], jnp.int32)
    out = np.asarray(decode_attention(q, k, v, table, jnp.asarray([1, 6, 16]), pages_per_block=2, splits=2,
                                      interpret=True))
    for row, n in enumerate((1, 6, 16)):
        np.testing.assert_allclose(out[row, :n], 1 / n, rtol=1e-6)
        assert not out[row, n:].any()


@pytest.mark.parametrize("change, message", [
    (dict(head_dim=8), "head dim 8 must be a power of two >= 16"),
    (dict(kv_heads=3), "H a multiple of H_kv"),
    (dict(k_dtype=jnp.bfloat16), "dtypes differ"),
    (dict(lengths=(3,)), r"lengths \(3,\) \[B\]"),
    (dict(page_size=6), "page size 6 must be a power of two"),
    (dict(pages_per_block=3), "pages_per_block 3 must be a power of two"),
    (dict(splits=0), "splits=0 must be >= 1"),
])
def test_bad_input_is_refused_by_name(change, message):
    dh, kv, ps = change.get("head_dim", 16), change.get("kv_heads", 2), change.get("page_size", 4)
    q = jnp.zeros((2, 4, dh), jnp.float32)
    k = jnp.zeros((kv, 8, ps, dh), change.get("k_dtype", jnp.float32))
    v = k.astype(k.dtype)
    with pytest.raises(ValueError, match=message):
        decode_attention(q, k, v, jnp.zeros((2, 4), jnp.int32), jnp.zeros(change.get("lengths", (2,)), jnp.int32),
                         pages_per_block=change.get("pages_per_block", 2), splits=change.get("splits"),
                         interpret=True)


def test_reference_equals_a_per_row_softmax():
    rng = np.random.default_rng(5)
    q = rng.standard_normal((2, 2, 16)).astype(np.float32)
    k, v = (rng.standard_normal((1, 6, 2, 16)).astype(np.float32) for _ in range(2))
    table, lengths = np.asarray([[4, 1, 5], [0, 2, 3]], np.int32), np.asarray([5, 2], np.int32)
    got = np.asarray(decode_attention_reference(*map(jnp.asarray, (q, k, v, table, lengths))))
    for r in range(2):
        keys, values = k[0, table[r]].reshape(-1, 16)[: lengths[r]], v[0, table[r]].reshape(-1, 16)[: lengths[r]]
        for h in range(2):
            s = keys @ q[r, h] / 4.0
            w = np.exp(s - s.max()) / np.exp(s - s.max()).sum()
            np.testing.assert_allclose(got[r, h * 16:(h + 1) * 16], w @ values, rtol=1e-5, atol=1e-6)


def test_nan_in_pages_past_a_rows_length_never_reaches_its_output():
    """Freed pages, the null page and the tail of a row's last page may hold anything, NaN
    included (another request's leftovers): masking is by select, so the output is the same."""
    case = DecodeCase(4, 6, 40, page_size=4, pages_per_block=4, splits=2)
    q, k, v, table, lengths = decode_problem(case, seed=4)
    keys = np.arange(case.width * case.page_size)
    used = np.zeros((case.pages, case.page_size), bool)
    for row, n in enumerate(np.asarray(lengths)):
        for key in keys[:n]:
            used[int(table[row, key // case.page_size]), key % case.page_size] = True
    poison = lambda pages: jnp.where(jnp.asarray(used)[None, :, :, None], pages, jnp.nan)
    clean = decode_attention(q, k, v, table, lengths, pages_per_block=4, splits=2, interpret=True)
    dirty = decode_attention(q, poison(k), poison(v), table, lengths, pages_per_block=4, splits=2, interpret=True)
    assert np.isfinite(np.asarray(dirty)).all()
    np.testing.assert_array_equal(np.asarray(dirty), np.asarray(clean))
    safe = jnp.where(jnp.arange(case.width)[None, :] * case.page_size < lengths[:, None], table, 0)
    np.testing.assert_allclose(decode_attention_reference(q, poison(k), poison(v), safe, lengths),
                               decode_attention_reference(q, k, v, safe, lengths), rtol=1e-6)
