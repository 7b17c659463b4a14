"""The Mosaic GPU swift merge (MergeTile(kernel="mosaic")) against the references in GPU interpret
mode on CPU, with the Triton merge's own checks (testing.check_merge / check_merge_parts):
ragged shapes (the padded path) and shapes on the blocks (the direct path: several row tiles per
program, a ragged last program, BM 128), mixed ranks with empty slots and R not a power of 2, 1 to 3
parts with gaps, bfloat16 and float16; float32 and bad input refused; the lowering for an H100
(no GPU here: lowering only)."""

import dataclasses
import functools
import os
import zlib

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import (LoraWeight, MergeTile, merge_parts, merge_parts_reference, merge_weight,
                            merge_weight_reference, testing)
from pallas_kernels.testing import MERGE_CASES, MERGE_PARTS_CASES, MergeCase, MergePartsCase, lowered_for


def _half(cases):
    """The cases in 16-bit floats (float32 ones alternate bfloat16 / float16: the Mosaic merge's
    dtypes) on Mosaic tiles of the same shape (a fresh output is NaN when interpreted: an unwritten
    element fails the check)."""
    return [dataclasses.replace(c, tile=dataclasses.replace(c.tile, kernel="mosaic"),
                                dtype=c.dtype if c.dtype != "float32" else ("bfloat16", "float16")[k % 2])
            for k, c in enumerate(cases)]


M = functools.partial(MergeTile, kernel="mosaic")
WEIGHT_CASES = _half(MERGE_CASES[1:4]) + [                                  # ragged, R < 16, R 128
    MergeCase(192, 96, 16, 3, "bfloat16", M(64, 32, row_tiles=2, stages=2)),   # ragged last program
    MergeCase(128, 160, 48, 3, "float16", M(128, 256, stages=2)),              # BM 128, BN 32 divides 160
    MergeCase(64, 256, 128, 2, "bfloat16", M(16, 256)),                        # block_m raised to 64, R 128
]
PARTS_CASES = _half(MERGE_PARTS_CASES[1:3] + MERGE_PARTS_CASES[4:]) + [     # ragged, row loop, gaps, order
    MergePartsCase(128, (64, 32), (32, 128), 192, (24, 16), 3, "bfloat16",
                   tile=M(64, 64, row_tiles=2, stages=2)),                    # gaps on both sides
    MergePartsCase(192, (64, 32, 32), (0, 96, 160), 224, (16, 8, 48), 3, "float16",
                   tile=M(64, 128, row_tiles=3, stages=3)),                   # q/k/v, two gaps
]


def _weight_id(c: MergeCase) -> str:
    t = c.tile
    return f"D{c.d_in}x{c.d_out}-R{c.max_rank}-S{c.slots}-{c.dtype}-{t.block_m}x{t.block_n}x{t.row_tiles}s{t.stages}"


def _parts_id(c: MergePartsCase) -> str:
    parts = "+".join(f"{d}r{r}@{col}" for d, r, col in zip(c.d_outs, c.ranks, c.columns))
    t = c.tile
    return f"D{c.d_in}-{parts}-N{c.width}-{c.dtype}-{t.block_m}x{t.block_n}x{t.row_tiles}s{t.stages}"


@pytest.mark.parametrize("case", WEIGHT_CASES, ids=_weight_id)
def test_merge_weight_matches_reference(case):
    """Each case draws its data from its own stable seed (its id's CRC): a failure replays."""
    testing.check_merge(case, seed=zlib.crc32(_weight_id(case).encode()), interpret=True)


@pytest.mark.parametrize("case", PARTS_CASES, ids=_parts_id)
def test_merge_parts_matches_reference(case):
    """Parts' columns merged; merged's copy is NaN there and must be overwritten, the other columns
    must come back bit for bit."""
    testing.check_merge_parts(case, seed=zlib.crc32(_parts_id(case).encode()), interpret=True)


def _fused(dtype=jnp.bfloat16):
    """kernel, merged [64, 128]; parts q [0, 64) rank 16 and v [96, 128) R 24 (k [64, 96) left out);
    v's slot 2 asks rank 29 > R: counts as R."""
    rng = np.random.default_rng(5)

    def normal(*shape):
        return jnp.asarray(rng.normal(size=shape), dtype)

    parts = [LoraWeight(normal(3, 64, r), normal(3, r, d), jnp.asarray([1.0, 0.5, 2.0]), jnp.asarray(rank, jnp.int32))
             for d, r, rank in ((64, 16, [16, 0, 5]), (32, 24, [3, 24, 29]))]
    return normal(64, 128), normal(64, 128), parts, [0, 96]


def test_ranks_above_r_and_one_part_is_merge_weight():
    kernel, merged, parts, columns = _fused()
    tile = M(64, 32)
    got = merge_parts(kernel, merged, parts, columns, 2, tile=tile, interpret=True)
    with jax.default_matmul_precision("highest"):
        want = merge_parts_reference(kernel, merged, parts, columns, jnp.int32(2))
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=2e-2, atol=2e-2)
    whole = merge_parts(kernel, jnp.full_like(kernel, jnp.nan), parts[:1], [0], 0, tile=tile, interpret=True)
    assert np.array_equal(np.asarray(whole[:, :64], np.float32),
                          np.asarray(merge_weight(kernel[:, :64], parts[0], 0, tile=tile, interpret=True), np.float32))
    np.testing.assert_allclose(np.asarray(whole[:, :64], np.float32),
                               np.asarray(merge_weight_reference(kernel[:, :64], parts[0], jnp.int32(0)), np.float32),
                               rtol=2e-2, atol=2e-2)


def test_float32_is_refused_and_the_kernels_are_picked_by_name():
    kernel, merged, parts, columns = _fused(jnp.float32)
    match = "Mosaic merge needs a bfloat16 or float16 kernel .*got float32"
    with pytest.raises(ValueError, match=match):
        merge_parts(kernel, merged, parts, columns, 0, tile=M(), interpret=True)
    with pytest.raises(ValueError, match=match):
        merge_weight(kernel[:, :64], parts[0], 0, interpret=True, kernels="mosaic")     # the mosaic default tile
    with pytest.raises(ValueError, match="kernels 'cuda' must be one of"):
        merge_weight(kernel[:, :64], parts[0], 0, interpret=True, kernels="cuda")
    with pytest.raises(ValueError, match="MergeTile.kernel='cuda' must be one of"):
        MergeTile(kernel="cuda")


def _lowered(fn, *args) -> str:
    return lowered_for("NVIDIA H100 80GB HBM3", fn, *args)


@pytest.mark.parametrize("dtype, d_in, widths, ranks, columns, width, tile", [
    ("bfloat16", 4096, (4096, 1024, 1024), (64, 16, 64), (0, 4096, 5120), 6144, M()),      # q/k/v
    ("bfloat16", 4096, (11008, 11008), (128, 128), (0, 11008), 22016, M(128, 256, row_tiles=4, stages=3)),
    ("float16", 3584, (3584, 512), (16, 16), (0, 4096), 4608, M(64, 128, row_tiles=3, stages=2)),  # q, v
    ("bfloat16", 18944, (3584,), (64,), (0,), 3584, M(64, 256, row_tiles=4, stages=2)),       # down
    ("bfloat16", 100, (96, 40), (24, 8), (0, 136), 176, M(64, 64, row_tiles=2, stages=2)),   # ragged: padded
], ids=["qkv", "gate-up-r128", "qwen-q-v-f16", "qwen-down", "ragged"])
def test_lowers_for_hopper_in_one_launch(dtype, d_in, widths, ranks, columns, width, tile):
    """One mosaic_gpu kernel per merge; serving shapes write over merged (aliased) with no padding
    copies, a ragged one pads (and scatters back)."""
    parts = tuple(LoraWeight(jnp.zeros((4, d_in, r), dtype), jnp.zeros((4, r, d), dtype), jnp.ones(4),
                             jnp.full(4, r, jnp.int32)) for d, r in zip(widths, ranks))
    kernel = jnp.zeros((d_in, width), dtype)
    on_blocks = d_in % 64 == 0
    text = _lowered(lambda k, m, p, s: merge_parts(k, m, p, columns, s, tile=tile), kernel, kernel, parts,
                    jnp.int32(1))
    assert text.count("custom_call @mosaic_gpu") == 1
    assert ("output_operand_alias" in text) == on_blocks
    assert ("stablehlo.pad" in text) == (not on_blocks)
    if len(parts) == 1:
        text = _lowered(functools.partial(merge_weight, tile=tile), kernel, parts[0], jnp.int32(1))
        assert text.count("custom_call @mosaic_gpu") == 1 and "stablehlo.pad" not in text
