"""The Pallas kernels lower to Triton for an H200 (lowering only: no GPU here, nothing runs).

Interpret mode does not apply the Triton lowering's rules (block shapes, supported primitives,
scalar indexing); this catches what breaks them before a GPU run. PTX compilation and results
are bench/gpu_smoke.py's job.
"""

import functools
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax.numpy as jnp
import pytest

from pallas_kernels.atmm import _lora_delta
from pallas_kernels.testing import Case, lowered_for, make_problem
from pallas_kernels.tiling import TileConfig, heuristic_tile

def triton_launches(fn, *args) -> int:
    """How many Triton kernels jit(fn)(*args) launches, lowered for an H200."""
    return lowered_for("NVIDIA H200", fn, *args).count("__gpu$xla.gpu.triton")


@pytest.mark.parametrize("case, tile", [
    (Case(16, 4096, (4096, 1024), 16, 8, dtype="bfloat16"), heuristic_tile(16, 4096, 5120, 16, 8)),
    (Case(64, 4096, (11008,), 128, 8, dtype="bfloat16", mixture=True), heuristic_tile(64, 4096, 11008, 128, 8)),
    (Case(300, 4096, (4096,), 64, 8, dtype="bfloat16"), heuristic_tile(300, 4096, 4096, 64, 8)),
    (Case(40, 96, (80,), 32, 4, dtype="float32", mixture=True),
     TileConfig(shrink_block_t=1, block_k=64, split_k=2, expand_block_t=16, block_n=32)),
], ids=["decode-qkv", "decode-r128-mixture", "prefill", "ragged-mixed-tiles"])
@pytest.mark.parametrize("with_base", [False, True], ids=["delta", "base"])
def test_kernels_lower_to_triton(case, tile, with_base):
    x, weights, slot, merged = make_problem(case, seed=0)
    base = tuple(jnp.zeros((case.tokens, d), x.dtype) for d in case.d_outs) if with_base else None
    fn = functools.partial(_lora_delta, mixture=case.mixture, tile=tile, interpret=False)
    assert triton_launches(fn, x, weights, slot, jnp.int32(merged), base) == 2    # one shrink, one expand


@pytest.mark.parametrize("case, columns, width, tile", [
    (Case(16, 4096, (4096, 1024, 1024), 16, 8, dtype="bfloat16"), (0, 4096, 5120), 6144,
     heuristic_tile(16, 4096, 6144, 16, 8)),
    (Case(64, 4096, (11008, 11008), 64, 8, dtype="bfloat16", mixture=True), (0, 11008), 22016,
     heuristic_tile(64, 4096, 22016, 64, 8)),
    (Case(300, 4096, (4096, 1024), 64, 8, dtype="bfloat16"), (0, 5120), 6144, heuristic_tile(300, 4096, 5120, 64, 8)),
    (Case(40, 96, (80, 40), 32, 4, dtype="float32", mixture=True), (0, 120), 160,
     TileConfig(shrink_block_t=1, block_k=64, split_k=2, expand_block_t=16, block_n=32)),
    (Case(40, 96, (80, 40), 32, 4, dtype="float32"), (0, 120), 160,
     TileConfig(shrink_block_t=16, block_k=64, split_k=2, expand_block_t=1, block_n=32)),
], ids=["decode-qkv", "decode-gate-up-mixture", "prefill-q-v", "ragged-blocked-expand", "ragged-per-token-expand"])
def test_fused_columns_lower_to_triton(case, columns, width, tile):
    x, weights, slot, merged = make_problem(case, seed=0)
    fn = functools.partial(_lora_delta, mixture=case.mixture, tile=tile, interpret=False, columns=columns)
    base = (jnp.zeros((case.tokens, width), x.dtype),)
    assert triton_launches(fn, x, weights, slot, jnp.int32(merged), base) == 2    # one shrink, one expand


@pytest.mark.parametrize("dtype, d_in, d_out, r", [("bfloat16", 4096, 11008, 64), ("float32", 100, 300, 24)])
@pytest.mark.parametrize("row_tiles, stages", [(1, 1), (4, 3)])
def test_merge_kernel_lowers_to_triton(dtype, d_in, d_out, r, row_tiles, stages):
    from pallas_kernels.lora_reference import LoraWeight
    from pallas_kernels.merge import _merge
    from pallas_kernels.tiling import MergeTile
    kernel = jnp.zeros((d_in, d_out), dtype)
    w = LoraWeight(jnp.zeros((4, d_in, r), dtype), jnp.zeros((4, r, d_out), dtype), jnp.ones(4), jnp.full(4, r))
    tile = MergeTile(row_tiles=row_tiles, stages=stages)
    fn = functools.partial(_merge, tile=tile, interpret=False)
    assert triton_launches(fn, kernel, w, jnp.int32(1)) == 1


@pytest.mark.parametrize("shape, blocks", [((2, 512, 32, 32, 128, 16, 256), (64, 64)),
                                           ((3, 300, 8, 2, 64, 16, 125), (128, 32)),
                                           ((2, 40, 4, 4, 32, 64, 3), (16, 16)), ((1, 1, 4, 4, 16, 8, 1), (64, 64))],
                         ids=["llava-chunks", "gqa-ragged", "page-over-block", "one-query"])
def test_prefill_attention_lowers_to_triton(shape, blocks):
    from pallas_kernels.prefill_attention import _prefill_attention
    rows, queries, heads, kv_heads, head_dim, page_size, width = shape
    q = jnp.zeros((rows, queries, heads, head_dim), jnp.bfloat16)
    pages = jnp.zeros((kv_heads, 2 * rows * width + 1, page_size, head_dim), jnp.bfloat16)
    fn = functools.partial(_prefill_attention, block_q=blocks[0], block_k=blocks[1], warps=8, stages=2,
                           interpret=False)
    table, positions = jnp.zeros((rows, width), jnp.int32), jnp.zeros((rows, queries), jnp.int32)
    assert triton_launches(fn, q, pages, pages, table, positions) == 1


@pytest.mark.parametrize("masked", [False, True])
def test_streaming_bench_kernel_lowers_to_triton(masked):
    from bench.pallas_copy import pallas_add
    fn = functools.partial(pallas_add, bm=64, bn=256, warps=4, row_tiles=4, stages=3, masked=masked)
    assert triton_launches(fn, jnp.zeros((4096, 11008), jnp.bfloat16), jnp.zeros((1,), jnp.bfloat16)) == 1


@pytest.mark.parametrize("shape, pages_per_block", [((64, 32, 32, 128, 16, 64), 8), ((3, 28, 4, 128, 16, 300), 4),
                                                    ((1, 8, 1, 64, 32, 2), 1)],
                         ids=["llava-decode", "gqa-odd-width", "one-row"])
def test_decode_attention_lowers_to_triton(shape, pages_per_block):
    from pallas_kernels.decode_attention import _decode_attention
    rows, heads, kv_heads, head_dim, page_size, width = shape
    q = jnp.zeros((rows, heads, head_dim), jnp.bfloat16)
    pages = jnp.zeros((kv_heads, 2 * rows * width, page_size, head_dim), jnp.bfloat16)
    fn = functools.partial(_decode_attention, pages_per_block=pages_per_block, splits=None, warps=4, stages=2,
                           interpret=False)
    assert triton_launches(fn, q, pages, pages, jnp.zeros((rows, width), jnp.int32), jnp.zeros((rows,), jnp.int32)) == 1


@pytest.mark.parametrize("dtype, d_in, widths, ranks, columns, width", [
    ("bfloat16", 4096, (4096, 1024, 1024), (64, 16, 64), (0, 4096, 5120), 6144),      # q/k/v
    ("bfloat16", 4096, (11008, 11008), (64, 64), (0, 11008), 22016),                  # gate/up
    ("float32", 100, (96, 40), (24, 8), (0, 136), 176),                                # q, v only, ragged
])
@pytest.mark.parametrize("row_tiles, stages", [(1, 1), (4, 3)])
def test_merge_parts_lowers_to_triton(dtype, d_in, widths, ranks, columns, width, row_tiles, stages):
    from pallas_kernels.lora_reference import LoraWeight
    from pallas_kernels.merge import _merge_parts
    from pallas_kernels.tiling import MergeTile
    kernel = jnp.zeros((d_in, width), dtype)
    parts = [LoraWeight(jnp.zeros((4, d_in, r), dtype), jnp.zeros((4, r, d), dtype), jnp.ones(4), jnp.full(4, r))
             for d, r in zip(widths, ranks)]
    fn = functools.partial(_merge_parts, columns=columns, tile=MergeTile(row_tiles=row_tiles, stages=stages),
                           interpret=False)
    assert triton_launches(fn, kernel, kernel, parts, jnp.int32(1)) == 1


@pytest.mark.parametrize("p, heads, head_dim, blocks", [(8192, 16, 80, (64, 64)), (300, 2, 16, (16, 32)),
                                                        (5, 1, 128, (64, 64))], ids=["qwen-tower", "ragged", "tiny"])
def test_segment_attention_lowers_to_triton(p, heads, head_dim, blocks):
    from pallas_kernels.segment_attention import _segment_attention
    q = jnp.zeros((p, heads, head_dim), jnp.bfloat16)
    fn = functools.partial(_segment_attention, block_q=blocks[0], block_k=blocks[1], warps=4, stages=2,
                           interpret=False)
    assert triton_launches(fn, q, q, q, jnp.zeros((p,), jnp.int32)) == 1
