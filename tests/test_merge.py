"""The swift-merge kernels (interpret mode) against their references: ragged tiles, mixed ranks,
R < 16 and not a power of 2, an empty slot, every dtype; fused weights (merge_parts) with parts of
different widths and ranks and parts left out; bad input."""

import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import (LoraWeight, MergeTile, merge_parts, merge_parts_reference, merge_weight,
                            merge_weight_reference)
from pallas_kernels.testing import MERGE_CASES, MERGE_PARTS_CASES, check_merge, check_merge_parts


@pytest.mark.parametrize("case", MERGE_CASES, ids=str)
def test_merge_kernel_matches_reference(case):
    check_merge(case, seed=case.d_in + case.max_rank, interpret=True)


def test_public_merge_uses_the_given_slot_on_the_device():
    rng = np.random.default_rng(3)
    kernel = jnp.asarray(rng.normal(size=(32, 48)), jnp.float32)
    w = LoraWeight(jnp.asarray(rng.normal(size=(2, 32, 16)), jnp.float32),
                   jnp.asarray(rng.normal(size=(2, 16, 48)), jnp.float32),
                   jnp.asarray([0.5, 2.0], jnp.float32), jnp.asarray([16, 4], jnp.int32))
    for s in (0, 1):
        got = merge_weight(kernel, w, jnp.int32(s), tile=MergeTile(16, 16, 4), interpret=True)
        np.testing.assert_allclose(got, merge_weight_reference(kernel, w, jnp.int32(s)), rtol=1e-5, atol=1e-5)


def test_merge_rejects_bad_input():
    kernel = jnp.zeros((32, 48), jnp.float32)
    w = LoraWeight(jnp.zeros((2, 32, 16)), jnp.zeros((2, 16, 48)), jnp.ones(2), jnp.full(2, 16, jnp.int32))
    with pytest.raises(ValueError, match="slot 2 outside"):
        merge_weight(kernel, w, 2, interpret=True)
    with pytest.raises(ValueError, match="D_in=40"):
        merge_weight(jnp.zeros((40, 48)), w, 0, interpret=True)
    with pytest.raises(ValueError, match="w.b shape"):
        merge_weight(kernel, w._replace(b=jnp.zeros((2, 16, 40))), 0, interpret=True)
    with pytest.raises(ValueError, match="dtypes"):
        merge_weight(kernel.astype(jnp.bfloat16), w, 0, interpret=True)
    with pytest.raises(ValueError, match="block_n=24"):
        merge_weight(kernel, w, 0, tile=MergeTile(block_n=24), interpret=True)


def _parts_id(case) -> str:
    return (f"D{case.d_in}-{'+'.join(f'{d}r{r}@{c}' for d, r, c in zip(case.d_outs, case.ranks, case.columns))}"
            f"-N{case.width}-{case.dtype}")


@pytest.mark.parametrize("case", MERGE_PARTS_CASES, ids=_parts_id)
def test_merge_parts_matches_reference(case):
    check_merge_parts(case, seed=case.d_in + case.width, interpret=True)


def _fused(dtype=jnp.float32):
    """kernel, merged [32, 96]; parts q [0, 48) rank 16 and v [64, 96) rank 8 (k [48, 64) left out)."""
    rng = np.random.default_rng(5)
    normal = lambda *shape: jnp.asarray(rng.normal(size=shape), dtype)
    parts = [LoraWeight(normal(3, 32, r), normal(3, r, d), jnp.asarray([1.0, 0.5, 2.0]), jnp.asarray(rank, jnp.int32))
             for d, r, rank in ((48, 16, [16, 0, 5]), (32, 8, [3, 8, 0]))]
    return normal(32, 96), normal(32, 96), parts, [0, 64]


def test_public_merge_parts_uses_the_given_slot_and_keeps_other_columns():
    kernel, merged, parts, columns = _fused()
    for s in (0, 1, 2):                                   # slot 1 empty in q, slot 2 empty in v
        got = merge_parts(kernel, merged, parts, columns, jnp.int32(s), tile=MergeTile(16, 16, 4), interpret=True)
        want = merge_parts_reference(kernel, merged, parts, columns, jnp.int32(s))
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
        assert np.array_equal(got[:, 48:64], merged[:, 48:64])
    got = merge_parts(kernel, merged, parts, columns, 1, interpret=True)     # a host slot, the picked tile
    np.testing.assert_array_equal(got[:, :48], kernel[:, :48])


@pytest.mark.parametrize("mutate, match", [
    (lambda k, m, p, c: (k[0], m, p, c, 0), r"kernel must be a float \[D_in, D_out\] array, got float32\[96\]"),
    (lambda k, m, p, c: (k.astype(jnp.int32), m, p, c, 0), "kernel must be a float"),
    (lambda k, m, p, c: (k, m[:, :80], p, c, 0),
     r"merged must be \[D_in=32, N=96\] in float32 like kernel, got float32\[32, 80\]"),
    (lambda k, m, p, c: (k, m.astype(jnp.bfloat16), p, c, 0), "merged must be .* got bfloat16"),
    (lambda k, m, p, c: (k, m, [], [], 0), "parts is empty"),
    (lambda k, m, p, c: (k, m, [p[0], p[1].a], c, 0), r"parts\[1\] is ArrayImpl, expected LoraWeight"),
    (lambda k, m, p, c: (k, m, [p[0], p[1]._replace(a=p[1].a[:, :16])], c, 0), r"parts\[1\]\.a must be \[S, D_in=32"),
    (lambda k, m, p, c: (k, m, [p[0], p[1]._replace(a=p[1].a[:2], b=p[1].b[:2], scale=p[1].scale[:2],
                                                    rank=p[1].rank[:2])], c, 0), r"parts\[1\]\.a .* S=2 != S=3"),
    (lambda k, m, p, c: (k, m, [p[0]._replace(b=p[0].b[:, :4])], c[:1], 0), r"parts\[0\]\.b shape"),
    (lambda k, m, p, c: (k, m, [p[0], p[1]._replace(b=p[1].b.astype(jnp.bfloat16))], c, 0),
     r"parts\[1\] adapter dtypes float32/bfloat16 != kernel dtype float32"),
    (lambda k, m, p, c: (k, m, [p[0]._replace(rank=p[0].rank[:2])], c[:1], 0), r"parts\[0\]\.scale and"),
    (lambda k, m, p, c: (k, m, p, [0], 0), "columns has 1 entries for 2 parts"),
    (lambda k, m, p, c: (k, m, p, [0, np.float32(64)], 0), r"columns\[1\]=.*64.* must be a static int"),
    (lambda k, m, p, c: (k, m, p, [0, 70], 0), r"columns\[1\]=70: part 1's columns \[70, 102\) outside \[0, N=96\)"),
    (lambda k, m, p, c: (k, m, p, [-4, 64], 0), r"columns\[0\]=-4"),
    (lambda k, m, p, c: (k, m, p, [16, 0], 0),
     r"columns\[1\]=0 and columns\[0\]=16: part ranges \[0, 32\) and \[16, 64\) overlap"),
    (lambda k, m, p, c: (k, m, p, [0, 47], 0), r"columns\[0\]=0 and columns\[1\]=47.* overlap"),
    (lambda k, m, p, c: (k, m, p, c, 3), r"slot 3 outside \[0, S=3\)"),
    (lambda k, m, p, c: (k, m, p, c, -1), "slot -1 outside"),
])
def test_merge_parts_rejects_bad_input(mutate, match):
    kernel, merged, parts, columns, slot = mutate(*_fused())
    with pytest.raises(ValueError, match=match):
        merge_parts(kernel, merged, parts, columns, slot, interpret=True)


def test_merge_parts_matches_merge_weight_on_the_whole_weight():
    """One part over every column is merge_weight, bit for bit (the same kernel, one part)."""
    rng = np.random.default_rng(8)
    kernel = jnp.asarray(rng.normal(size=(48, 80)), jnp.bfloat16)
    w = LoraWeight(jnp.asarray(rng.normal(size=(2, 48, 24)), jnp.bfloat16),
                   jnp.asarray(rng.normal(size=(2, 24, 80)), jnp.bfloat16), jnp.asarray([1.0, 0.25]),
                   jnp.asarray([24, 7], jnp.int32))
    tile = MergeTile(16, 32, 4)
    got = merge_parts(kernel, jnp.full_like(kernel, jnp.nan), [w], [0], 1, tile=tile, interpret=True)
    assert np.array_equal(np.asarray(got, np.float32),
                          np.asarray(merge_weight(kernel, w, 1, tile=tile, interpret=True), np.float32))
