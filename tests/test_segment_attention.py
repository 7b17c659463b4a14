"""The segment-attention kernel (interpreted) against its reference: runs of random lengths (one
position, one block, spanning blocks), a single segment, padding to whole blocks, a head
dimension that is not a power of two (Qwen's 80), three dtypes; the reference against a
per-segment softmax; its key-block bounds; the errors for bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.segment_attention import segment_attention, segment_attention_reference, segment_bounds
from pallas_kernels.testing import SEGMENT_CASES, SegmentCase, check_segment_attention, segment_problem


def problem(lengths, heads, head_dim, dtype, seed):
    return segment_problem(SegmentCase(tuple(lengths), heads, head_dim, dtype), seed)


@pytest.mark.parametrize("case", SEGMENT_CASES, ids=str)
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_reference(case, seed):
    check_segment_attention(case, seed=seed, interpret=True)


def test_reference_is_a_softmax_within_each_segment():
    q, k, v, segment = problem((5, 9, 2), 2, 16, "float32", seed=3)
    out = np.asarray(segment_attention_reference(q, k, v, segment))
    q, k, v, segment = (np.asarray(a) for a in (q, k, v, segment))
    for i in range(len(segment)):
        same = segment == segment[i]
        for h in range(2):
            s = k[same, h] @ q[i, h] / 4.0
            w = np.exp(s - s.max())
            np.testing.assert_allclose(out[i, h], (w / w.sum()) @ v[same, h], rtol=1e-5, atol=1e-6)


def test_outputs_of_a_segment_ignore_every_other_segment():
    """Changing one run's keys and values leaves the other runs' outputs bit-identical, those
    whose query blocks read that run's keys (masked) included."""
    q, k, v, segment = problem((40, 50, 38), 2, 32, "float32", seed=4)
    args = {"block_q": 16, "block_k": 16, "interpret": True}
    before = np.asarray(segment_attention(q, k, v, segment, **args))
    k2, v2 = k.at[96:].set(7.0), v.at[96:].set(-3.0)            # the third run, past the second's blocks
    after = np.asarray(segment_attention(q, k2, v2, segment, **args))
    np.testing.assert_array_equal(before[:90], after[:90])
    assert not np.allclose(before[90:], after[90:])


def test_segment_bounds():
    start, end = segment_bounds(jnp.asarray([4, 4, -1, 7, 7, 7, 4], jnp.int32))
    assert start.tolist() == [0, 0, 2, 3, 3, 3, 6] and end.tolist() == [2, 2, 3, 6, 6, 6, 7]


def test_empty_sequence():
    q = jnp.zeros((0, 2, 16), jnp.float32)
    assert segment_attention(q, q, q, jnp.zeros((0,), jnp.int32), interpret=True).shape == (0, 2, 16)


@pytest.mark.parametrize("change, message", [
    (lambda q, k, v, s: (q, k[:-1], v, s), "equal"),
    (lambda q, k, v, s: (q, k, v.astype(jnp.bfloat16), s), "dtypes differ"),
    (lambda q, k, v, s: (q, k, v, s[:-1]), "segment shape"),
    (lambda q, k, v, s: (q[0], k[0], v[0], s), "equal"),
])
def test_bad_input_is_named(change, message):
    args = change(*problem((3, 4), 2, 16, "float32", seed=0))
    with pytest.raises(ValueError, match=message):
        segment_attention(*args, interpret=True)


@pytest.mark.parametrize("block", [8, 48])
def test_bad_blocks_are_named(block):
    with pytest.raises(ValueError, match=f"block_q={block}"):
        segment_attention(*problem((3, 4), 2, 16, "float32", seed=0), block_q=block, interpret=True)


def test_jits_with_segments_as_data():
    """One compile serves any layout of runs of the same total length."""
    q, k, v, _ = problem((32,), 2, 16, "float32", seed=5)
    fn = jax.jit(lambda s: segment_attention(q, k, v, s, block_q=16, block_k=16, interpret=True))
    for lengths in ((32,), (1, 31), (10, 10, 12)):
        s = jnp.asarray(np.repeat(np.arange(len(lengths)), lengths), jnp.int32)
        np.testing.assert_allclose(fn(s), segment_attention_reference(q, k, v, s), atol=2e-5, rtol=2e-5)
