"""The swift-merge kernel (interpret mode) against its reference: ragged tiles, mixed ranks,
R < 16 and not a power of 2, an empty slot, every dtype; bad input."""

import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import LoraWeight, MergeTile, merge_weight, merge_weight_reference
from pallas_kernels.testing import MERGE_CASES, check_merge


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
