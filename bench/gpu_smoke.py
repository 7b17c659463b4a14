"""ATMM, the swift merge, prefill, decode and segment attention on the GPU vs the references: the
checks of tests/test_atmm.py, tests/test_merge.py, tests/test_prefill_attention.py,
tests/test_decode_attention.py and tests/test_segment_attention.py, compiled for real.

Interpret mode does not enforce the GPU's constraints (power-of-2 blocks, dot shapes, the bf16
small-contraction trap), so this runs the same random problems, from tiny to LLaVA-sized, under
several tiles on the device. Usage:
python3 -m bench.gpu_smoke [--kernels atmm,merge,mosaic,attention,decode,segment]
(mosaic: the ATMM and merge grids on the Mosaic GPU kernels, 16-bit, on a Hopper)
(exit status 1 on any failure)
"""

import argparse
import dataclasses
import sys
import time
import traceback


from pallas_kernels import MergeTile, TileConfig
from pallas_kernels.tiling import MOSAIC_MERGE_TILE, heuristic_mosaic_tile
from pallas_kernels.testing import CASES as BASE_CASES
from pallas_kernels.testing import (ATTENTION_CASES, DECODE_CASES, FUSED_CASES, MERGE_CASES, MERGE_PARTS_CASES,
                                    SEGMENT_CASES, AttentionCase, Case, DecodeCase, MergeCase, MergePartsCase,
                                    SegmentCase, check, check_attention, check_segment_attention,
                                    check_decode_attention, check_fused, check_merge, check_merge_parts)
from valora_jax.versions import stack_versions, versions_line

CASES = BASE_CASES + [
    # LLaVA-sized
    Case(1, 4096, (4096,), 16, 8, rank=16, layout="uniform", dtype="bfloat16"),
    Case(64, 4096, (4096, 4096, 4096), 16, 64, rank=16, layout="distinct", dtype="bfloat16"),
    Case(64, 5120, (13824,), 128, 32, layout="uniform", dtype="bfloat16"),
    Case(256, 4096, (11008, 11008), 64, 16, layout="skewed", dtype="bfloat16", mixture=True),
    Case(1000, 4096, (4096,), 8, 8, rank=8, layout="segments", dtype="bfloat16"),
    Case(2304, 4096, (4096,), 128, 8, layout="segments", dtype="bfloat16", mixture=True, merged="absent"),
    Case(4096, 4096, (11008,), 16, 8, rank=16, layout="segments", dtype="bfloat16"),
    Case(600, 1024, (1024,), 32, 4, layout="segments", dtype="float32", mixture=True),
    Case(300, 1024, (1024,), 64, 4, layout="uniform", dtype="float16"),
]
TILES = [
    None,                                                               # the lookup
    TileConfig(shrink_block_t=1, block_k=128, split_k=8, expand_block_t=1, block_n=128),   # per token
    TileConfig(shrink_block_t=16, block_k=64, split_k=4, expand_block_t=16, block_n=64),
    TileConfig(shrink_block_t=64, block_k=128, split_k=1, shrink_warps=8, expand_block_t=64,
               block_n=256, expand_warps=8),
]
MOSAIC_TILES = [
    "heuristic",                                                        # heuristic_mosaic_tile per case
    TileConfig(shrink_block_t=64, block_k=128, split_k=4, shrink_stages=2, expand_block_t=64, block_n=64,
               kernel="mosaic"),
    TileConfig(shrink_block_t=64, block_k=64, split_k=1, shrink_stages=4, expand_block_t=64, block_n=256,
               kernel="mosaic"),
]
FUSED = FUSED_CASES + [                                                  # LLaVA-sized q/k/v and gate/up
    (Case(64, 4096, (4096, 4096, 4096), 16, 8, rank=16, layout="distinct", dtype="bfloat16"), (0, 4096, 8192), 12288),
    (Case(32, 4096, (4096, 1024, 1024), 16, 8, layout="uniform", dtype="bfloat16"), (0, 4096, 5120), 6144),
    (Case(256, 4096, (11008, 11008), 64, 16, layout="skewed", dtype="bfloat16", mixture=True), (0, 11008), 22016),
    (Case(1000, 4096, (4096, 4096), 16, 8, layout="segments", dtype="bfloat16"), (0, 8192), 12288),   # k untargeted
]


MERGES = MERGE_CASES + [MergeCase(4096, 11008, 64, 2, dtype="bfloat16"), MergeCase(5120, 13824, 128, 2, dtype="bfloat16"),
                        MergeCase(4096, 4096, 16, 2, dtype="bfloat16", tile=MergeTile(128, 128, 8)),
                        MergeCase(4096, 11008, 64, 2, dtype="bfloat16", tile=MergeTile(64, 256, 8, row_tiles=4, stages=3))]
MERGE_PARTS = MERGE_PARTS_CASES + [
    MergePartsCase(4096, (4096, 4096, 4096), (0, 4096, 8192), 12288, (64, 64, 64), 2, dtype="bfloat16", tile=None),
    MergePartsCase(4096, (11008, 11008), (0, 11008), 22016, (64, 16), 2, dtype="bfloat16", tile=None),
    MergePartsCase(4096, (4096, 1024), (0, 5120), 6144, (16, 16), 2, dtype="bfloat16", tile=None),
]

ATTENTION = ATTENTION_CASES + [                                         # LLaVA-sized: 32 heads of 128
    AttentionCase(2, 512, 4096, 32, 32, 128, "bfloat16"),
    AttentionCase(1, 1024, 1024, 32, 32, 128, "bfloat16", block_q=128, block_k=128),
    AttentionCase(3, 300, 2000, 32, 8, 128, "bfloat16", block_q=64, block_k=32),
    AttentionCase(1, 256, 640, 32, 32, 128, "float32"),
]

DECODE = DECODE_CASES + [                                               # LLaVA-sized: 32 heads of 128
    DecodeCase(64, 64, 4200, 32, 32, 128, dtype="bfloat16"),
    DecodeCase(1, 256, 300, 32, 32, 128, dtype="bfloat16"),
    DecodeCase(16, 32, 600, 32, 8, 128, dtype="bfloat16", pages_per_block=16, splits=3),
    DecodeCase(8, 16, 200, 32, 32, 128, dtype="float32", pages_per_block=4),
]

SEGMENT = SEGMENT_CASES + [                                             # the Qwen2.5-VL tower: 16 heads of 80
    SegmentCase((64,) * 128, 16, 80, "bfloat16", block_q=64, block_k=64),         # windowed, 8192 patches
    SegmentCase((5120, 2048, 1024), 16, 80, "bfloat16", block_q=64, block_k=64),  # full attention, frames
    SegmentCase((1000, 36, 3000), 16, 80, "float32", block_q=32, block_k=64),
]


def _mosaic_merge(case):
    """A merge case on the Mosaic kernel (its default tile where the case has none), in 16-bit floats."""
    tile = MOSAIC_MERGE_TILE if case.tile is None else dataclasses.replace(case.tile, kernel="mosaic")
    return dataclasses.replace(case, tile=tile, dtype="bfloat16" if case.dtype == "float32" else case.dtype)


def _run(label: str, fn) -> bool:
    t0 = time.perf_counter()
    try:
        status, ok = f"ok   err {fn():.2e}", True
    except Exception as e:                                              # report every failure
        status, ok = f"FAIL {type(e).__name__}: {str(e).splitlines()[0][:200]}", False
        if not isinstance(e, AssertionError):
            traceback.print_exc()
    print(f"{status:60s} {time.perf_counter() - t0:5.1f}s  {label}", flush=True)
    return ok


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    known = {"atmm", "merge", "mosaic", "attention", "decode", "segment"}
    p.add_argument("--kernels", default="atmm,merge,attention,decode,segment",
                   help=f"which checks: {', '.join(sorted(known))}")
    kernels = set(p.parse_args(argv).kernels.split(","))
    if not kernels <= known:
        p.error(f"unknown kernels {sorted(kernels - known)}; choose from {', '.join(sorted(known))}")
    versions = stack_versions()
    print(f"{versions_line(versions)} on {versions['device']}", flush=True)
    results = []
    if "atmm" in kernels:
        results += [_run(f"{case}  tile={tile}", lambda case=case, tile=tile: check(
            case, seed=case.tokens + 7, tile=tile, with_base=tile is None)) for case in CASES for tile in TILES]
        results += [_run(f"{case} columns={columns}  tile={tile}", lambda case=case, c=columns, w=width, tile=tile:
                         check_fused(case, c, w, seed=case.tokens + 9, tile=tile))
                    for case, columns, width in FUSED for tile in TILES]
    if "mosaic" in kernels:                                             # 16-bit floats: wgmma operands
        half = [c if c.dtype != "float32" else dataclasses.replace(c, dtype="bfloat16") for c in CASES]
        tile_for = lambda case, tile: heuristic_mosaic_tile(case.tokens, case.d_in, case.max_rank) \
            if tile == "heuristic" else tile
        results += [_run(f"{case}  tile={tile}", lambda case=case, tile=tile: check(
            case, seed=case.tokens + 7, tile=tile_for(case, tile), with_base=tile == "heuristic"))
            for case in half for tile in MOSAIC_TILES]
        results += [_run(f"{case} columns={columns}  tile={tile}", lambda case=case, c=columns, w=width, tile=tile:
                         check_fused(case, c, w, seed=case.tokens + 9, tile=tile_for(case, tile)))
                    for case, columns, width in FUSED if case.dtype != "float32" for tile in MOSAIC_TILES]
        results += [_run(f"{case} mosaic", lambda case=case: check_merge(_mosaic_merge(case), seed=case.d_in))
                    for case in MERGES]
        results += [_run(f"{case} mosaic", lambda case=case: check_merge_parts(_mosaic_merge(case), seed=case.d_in))
                    for case in MERGE_PARTS]
    if "merge" in kernels:
        results += [_run(str(case), lambda case=case: check_merge(case, seed=case.d_in)) for case in MERGES]
        results += [_run(str(case), lambda case=case: check_merge_parts(case, seed=case.d_in)) for case in MERGE_PARTS]
    if "attention" in kernels:
        results += [_run(str(case), lambda case=case: check_attention(case, seed=case.context)) for case in ATTENTION]
    if "decode" in kernels:
        results += [_run(str(case), lambda case=case: check_decode_attention(case, seed=case.pages)) for case in DECODE]
    if "segment" in kernels:
        results += [_run(str(case)[:200], lambda case=case: check_segment_attention(case, seed=len(case.lengths)))
                    for case in SEGMENT]
    failures = results.count(False)
    print(f"{failures} failures", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
