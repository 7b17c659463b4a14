"""The flash prefill-attention kernel (interpreted) against its reference: ragged query and context
lengths, grouped-query heads, padding queries, positions past the context, three dtypes; and
the errors for bad input."""

import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import prefill_attention, prefill_attention_reference
from pallas_kernels.testing import ATTENTION_CASES, check_attention


@pytest.mark.parametrize("case", ATTENTION_CASES, ids=str)
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_reference(case, seed):
    check_attention(case, seed=seed, interpret=True)


def test_each_query_sees_exactly_the_keys_up_to_its_position():
    """One-hot values make the output the attention weights themselves: a query at position p
    spreads its weight over keys 0..p and puts nothing on later ones."""
    context, queries = 32, 8
    v = jnp.zeros((1, context, 1, 32), jnp.float32).at[0, :, 0, :].set(jnp.eye(context, 32))  # key j -> e_j
    k = jnp.zeros((1, context, 1, 32), jnp.float32)                                   # uniform scores
    q = jnp.ones((1, queries, 1, 32), jnp.float32)
    positions = jnp.asarray([[3, 4, 5, 6, 20, 31, 40, -1]], jnp.int32)
    out = np.asarray(prefill_attention(q, k, v, positions, block_q=16, block_k=16, interpret=True))[0]
    for i, p in enumerate([3, 4, 5, 6, 20, 31, 40]):
        seen = min(p, context - 1) + 1
        np.testing.assert_allclose(out[i, :seen], 1 / seen, rtol=1e-6)
        assert not out[i, seen:].any()
    assert np.isfinite(out[7]).all()                                                  # padding: finite


@pytest.mark.parametrize("change, message", [
    (dict(head_dim=8), "head dim 8 must be a power of two >= 16"),
    (dict(kv_heads=3), "H a multiple of H_kv"),
    (dict(k_dtype=jnp.bfloat16), "dtypes differ"),
    (dict(positions=(2, 3)), r"positions shape \(2, 3\) != \[B=2, Q=4\]"),
    (dict(block_q=24), "block_q=24 must be a power of two >= 16"),
    (dict(block_k=8), "block_k=8 must be a power of two >= 16"),
])
def test_bad_input_is_refused_by_name(change, message):
    dh, kv = change.get("head_dim", 16), change.get("kv_heads", 2)
    q = jnp.zeros((2, 4, 4, dh), jnp.float32)
    k = jnp.zeros((2, 16, kv, dh), change.get("k_dtype", jnp.float32))
    v = jnp.zeros((2, 16, kv, dh), jnp.float32)
    if "k_dtype" in change:
        v = v.astype(change["k_dtype"])
    positions = jnp.zeros(change.get("positions", (2, 4)), jnp.int32)
    with pytest.raises(ValueError, match=message):
        prefill_attention(q, k, v, positions, block_q=change.get("block_q", 16), block_k=change.get("block_k", 16),
                          interpret=True)


def test_reference_equals_a_per_query_softmax():
    rng = np.random.default_rng(5)
    q, k, v = (rng.standard_normal(s).astype(np.float32) for s in ((1, 3, 2, 16), (1, 10, 1, 16), (1, 10, 1, 16)))
    positions = np.asarray([[0, 4, 9]], np.int32)
    got = np.asarray(prefill_attention_reference(*map(jnp.asarray, (q, k, v, positions))))
    for i, p in enumerate(positions[0]):
        for h in range(2):
            s = k[0, :p + 1, 0] @ q[0, i, h] / 4.0
            w = np.exp(s - s.max()) / np.exp(s - s.max()).sum()
            np.testing.assert_allclose(got[0, i, h * 16:(h + 1) * 16], w @ v[0, :p + 1, 0], rtol=1e-5, atol=1e-6)


def test_nan_in_keys_past_every_query_never_reaches_the_output():
    """Keys past a row's last query position (the rest of its padded page table) may hold NaN:
    the kernel and the reference mask them by select."""
    rng = np.random.default_rng(3)
    q = jnp.asarray(rng.standard_normal((2, 16, 2, 16)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((2, 48, 1, 16)), jnp.float32) for _ in range(2))
    positions = jnp.asarray([np.arange(10, 26), np.r_[np.arange(3, 15), [-1] * 4]], jnp.int32)
    beyond = (jnp.arange(48)[None, :] > jnp.max(positions, axis=1)[:, None])[:, :, None, None]
    dirty = [jnp.where(beyond, jnp.nan, t) for t in (k, v)]
    for fn, kw in ((prefill_attention, {"block_q": 16, "block_k": 16, "interpret": True}),
                   (prefill_attention_reference, {})):
        got = np.asarray(fn(q, *dirty, positions, **kw))
        assert np.isfinite(got[0]).all() and np.isfinite(got[1, :12]).all()
        np.testing.assert_allclose(got[0], np.asarray(fn(q, k, v, positions, **kw))[0], rtol=1e-6)
