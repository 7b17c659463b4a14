"""bench/pallas_copy.py off the GPU: its Pallas streaming kernel (interpreted) computes x + t for
every loop structure, rejects shapes it does not tile, and the report ranks what ran."""

import numpy as np
import jax.numpy as jnp
import pytest

from bench import pallas_copy


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("row_tiles", [1, 2])
def test_pallas_add_matches_xla(masked, row_tiles):
    rng = np.random.default_rng(row_tiles)
    x = jnp.asarray(rng.standard_normal((64, 48)), jnp.bfloat16)
    t = jnp.asarray([rng.standard_normal()], jnp.bfloat16)
    got = pallas_copy.pallas_add(x, t, bm=16, bn=16, warps=4, row_tiles=row_tiles, stages=1, masked=masked,
                                 interpret=True)
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(x + t, np.float32))


def test_pallas_add_rejects_partial_blocks():
    with pytest.raises(ValueError, match=r"\[64, 40\] is not a whole number of 32x16 blocks"):
        pallas_copy.pallas_add(jnp.zeros((64, 40), jnp.bfloat16), jnp.zeros((1,), jnp.bfloat16), bm=16, bn=16,
                               warps=4, row_tiles=2, stages=1, masked=False, interpret=True)


def test_report_ranks_variants_and_lists_failures():
    result = {"command": "python bench/pallas_copy.py", "device": "Test GPU", "jax": "0", "shape": [4, 8],
              "copy_bandwidth_TBps": 4.0,
              "variants": {"slow": {"us": 30.0, "tb_per_s": 1.0}, "fast": {"us": 10.0, "tb_per_s": 3.0},
                           "broken": {"error": "ValueError: no"}}}
    lines = pallas_copy.report(result).splitlines()
    rows = [line for line in lines if line.startswith("| ") and "variant" not in line and "---" not in line]
    assert rows == ["| fast | 10.0 | 3.00 |", "| slow | 30.0 | 1.00 |", "| broken | – | ValueError: no |"]


def test_grid_names_are_distinct_and_cover_masking():
    names = list(pallas_copy.variants())
    launches = len(pallas_copy.TILES) * len(pallas_copy.WARPS) * len(pallas_copy.LOOPS)
    assert len(names) == len(set(names)) == 1 + 2 * launches
    assert sum(name.endswith("masked") for name in names) == (len(names) - 1) // 2
