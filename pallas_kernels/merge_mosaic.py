"""Swift merge on Mosaic GPU (Hopper): `merge.merge_parts`'s semantics with TMA copies and wgmma
(merge.py runs it for a MergeTile(kernel="mosaic")).

    out[:, c_p : c_p + D_out_p] = kernel[:, c_p : c_p + D_out_p]
                                  + scale_p[s] * A_p[s][:, :rank_p[s]] @ B_p[s][:rank_p[s], :]
    out[:, n]                   = merged[:, n] for every column n no part owns        (written over merged)

kernel, merged [D_in, N]; part p: A_p [S, D_in, R_p], B_p [S, R_p, D_out_p], scale_p [S], rank_p [S],
at static column c_p; s = slot (read on the device: one compiled merge serves every slot).

One launch, grid (row programs, column blocks of all parts). Program (i, t) serves the [BN]-wide
column block t - tile_offsets[p] of the part p owning block t: it loads that block of B_p[s] ([RB, BN],
RB = R_p padded to a power of 2 >= 16) once by TMA, then a TMA pipeline `stages` deep runs down its
`row_tiles` row tiles [BM, BN] of W: per tile, the [BM, RB] rows of A_p[s] (columns >= rank zeroed
in shared memory), one wgmma [BM, RB] x [RB, BN] with float32 accumulation, W + scale * product
rounded once into W's buffer and stored by TMA: W is read once and written once. BM = max(64,
block_m) (a warpgroup's wgmma); BN = the largest power of 2 <= block_n dividing every part's width
and column (capped so the accumulator and the shared memory fit). Shapes off the blocks (D_in % BM,
no such BN >= 16) take a padded copy of the parts' columns, then a scatter back: serving widths never
do. bfloat16 and float16 only (wgmma operands); adapter padding beyond a rank must be finite.
"""

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.atmm import _pad_rank
from pallas_kernels.atmm_mosaic import DTYPES, SMEM_BYTES, _launch, _pad_to, _pow2_divisor, _swizzled
from pallas_kernels.tiling import MergeTile

WGMMA_M = 64
"""Rows of one warpgroup's wgmma: block_m is raised to it."""
ACC_ELEMENTS = 64 * 256
"""Largest [BM, BN] float32 accumulator (128 registers a thread of the warpgroup)."""
MAX_BLOCK_N = 256
"""wgmma's largest N."""


def _part_tiles(j, c0: int, slot_ref, kernel_ref, a_ref, b_ref, scale_ref, rank_ref, out_ref, *, first, count,
                bm: int, bn: int, stages: int):
    """Row tiles first + k, k < count, of the part's column block j (part-local; weight columns c0 + j * BN):
    out[rows, cols] = kernel[rows, cols] + scale[s] * A[s][rows, :rank[s]] @ B[s][:rank[s], block j]."""
    rb, dtype = a_ref.shape[-1], kernel_ref.dtype
    s = slot_ref[0]
    column_block = c0 // bn + j
    operand = _swizzled(min(rb, bn), dtype)                    # both wgmma operands share the swizzle

    def scoped(b_s, b_bar):
        plgpu.copy_gmem_to_smem(b_ref.at[s, :, pl.ds(j * bn, bn)], b_s, b_bar)   # in flight with the first tiles

        def tile(index, w_s, a_s):
            (k,) = index
            pl.when(k == 0)(lambda: plgpu.barrier_wait(b_bar))
            inner = plgpu.broadcasted_iota(jnp.int32, (bm, rb), 1, layout=plgpu.Layout.WGMMA) < rank_ref[s]
            a_s[...] = jnp.where(inner, a_s[...], 0).astype(dtype)
            plgpu.commit_smem()

            def product(acc):
                plgpu.wgmma(acc, a_s, b_s)
                plgpu.wgmma_wait(0)
                return acc[...]

            delta = pl.run_scoped(product, plgpu.ACC((bm, bn), jnp.float32))
            w_s[...] = (w_s[...].astype(jnp.float32) + scale_ref[s] * delta).astype(dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(w_s, out_ref.at[pl.ds((first + k) * bm, bm), pl.ds(column_block * bn, bn)])
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)   # the pipeline refills this slot next

        plgpu.emit_pipeline(
            tile, grid=(count,), max_concurrent_steps=stages,
            in_specs=[plgpu.BlockSpec((bm, bn), lambda k: (first + k, column_block), transforms=_swizzled(bn, dtype)),
                      plgpu.BlockSpec((bm, rb), lambda k: (first + k, 0), transforms=operand)],
        )(kernel_ref, a_ref.at[s])
        plgpu.wait_smem_to_gmem(0)

    pl.run_scoped(scoped, plgpu.SMEM((rb, bn), dtype, transforms=operand), plgpu.Barrier(num_arrivals=1))


def _merge_body(slot_ref, kernel_ref, *refs, bm: int, bn: int, row_tiles: int, stages: tuple, columns: tuple,
                tile_offsets: tuple):
    """Program (i, t): row tiles i * row_tiles + k of column block t, in the part that owns it.
    refs: a, b, scale, rank (one per part), then out."""
    n_parts = len(columns)
    groups = [refs[k * n_parts:(k + 1) * n_parts] for k in range(4)]
    out_ref = refs[4 * n_parts]
    n_row_tiles = kernel_ref.shape[0] // bm
    i, t = jax.lax.axis_index("i"), jax.lax.axis_index("t")
    first = i * row_tiles
    count = row_tiles if n_row_tiles % row_tiles == 0 else jnp.minimum(row_tiles, n_row_tiles - first)
    for p, (c0, *part_refs) in enumerate(zip(columns, *groups)):
        lo, hi = tile_offsets[p], tile_offsets[p + 1]
        part = functools.partial(_part_tiles, t - lo, c0, slot_ref, kernel_ref, *part_refs, out_ref, first=first,
                                 count=count, bm=bm, bn=bn, stages=stages[p])
        if n_parts == 1:
            part()
        else:
            pl.when((t >= lo) & (t < hi))(part)


def _smem_bytes(bm: int, bn: int, rb: int, stages: int, itemsize: int) -> int:
    """Shared memory of a program: the B tile and `stages` [BM, BN] W and [BM, RB] A tiles."""
    return itemsize * (rb * bn + stages * bm * (bn + rb))


def _block_n(tile: MergeTile, bm: int, widths: Sequence[int], columns: Sequence[int], rbs: Sequence[int],
             itemsize: int) -> int | None:
    """The largest power of 2 <= block_n (and the caps) dividing every width and column whose one-stage
    program fits SMEM_BYTES; None if below 16."""
    cap = min(tile.block_n, MAX_BLOCK_N, ACC_ELEMENTS // bm)
    bn = _pow2_divisor(int(np.gcd.reduce([*widths, *columns])), cap)
    while bn >= 16 and _smem_bytes(bm, bn, max(rbs), 1, itemsize) > SMEM_BYTES:
        bn //= 2
    return bn if bn >= 16 else None


def _launch_merge(kernel, out, parts, columns: tuple, slot, *, bm: int, bn: int, tile: MergeTile, interpret: bool):
    """One launch of _merge_body (shapes on the blocks): out (an array: written over it, aliased; a
    ShapeDtypeStruct: a fresh buffer)."""
    rbs = [w.a.shape[-1] for w in parts]
    stages = tuple(max([1] + [k for k in range(1, tile.stages + 1)
                              if _smem_bytes(bm, bn, rb, k, kernel.dtype.itemsize) <= SMEM_BYTES]) for rb in rbs)
    offsets = tuple(int(t) for t in np.cumsum([0] + [w.b.shape[-1] // bn for w in parts]))
    n_row_tiles = kernel.shape[0] // bm
    row_tiles = min(tile.row_tiles, n_row_tiles)
    body = functools.partial(_merge_body, bm=bm, bn=bn, row_tiles=row_tiles, stages=stages, columns=columns,
                             tile_offsets=offsets)
    args = (jnp.asarray(slot, jnp.int32).reshape(1), kernel, *[w.a for w in parts], *[w.b for w in parts],
            *[w.scale for w in parts], *[w.rank for w in parts])
    (merged,) = _launch(body, args, [out], grid=(pl.cdiv(n_row_tiles, row_tiles), offsets[-1]), names=("i", "t"),
                        interpret=interpret, in_place=not isinstance(out, jax.ShapeDtypeStruct))
    return merged


def merge_mosaic(kernel, merged, parts, slot, *, columns: tuple, tile: MergeTile, interpret: bool):
    """`merge.merge_parts` on the Mosaic kernel (traced inside merge.py's jitted calls; arguments
    already validated); merged None: `merge.merge_weight`'s fresh output, one part at column 0."""
    if kernel.dtype not in DTYPES:
        raise ValueError(f"the Mosaic merge needs a bfloat16 or float16 kernel (wgmma operands), got {kernel.dtype}: "
                         "use a triton MergeTile for float32")
    parts = [_pad_rank(w._replace(scale=w.scale.astype(jnp.float32), rank=w.rank.astype(jnp.int32)))
             for w in parts]
    (d_in, n), itemsize = kernel.shape, kernel.dtype.itemsize
    widths, rbs = [w.b.shape[-1] for w in parts], [w.a.shape[-1] for w in parts]
    bm = max(WGMMA_M, tile.block_m)
    bn = _block_n(tile, bm, widths, columns, rbs, itemsize)
    launch = functools.partial(_launch_merge, tile=tile, interpret=interpret, bm=bm)
    if bn is not None and d_in % bm == 0:
        out = merged if merged is not None else jax.ShapeDtypeStruct(kernel.shape, kernel.dtype)
        return launch(kernel, out, parts, columns, slot, bn=bn)
    # Off the blocks: the parts' columns side by side, each padded to whole blocks, merged into a fresh
    # buffer, then written back at their columns.
    if bn is None:
        bn = _block_n(tile, bm, [max(16, 1 << (min(widths) - 1).bit_length())], [], rbs, itemsize) or 16
    d_pad, n_pads = pl.cdiv(d_in, bm) * bm, [pl.cdiv(d, bn) * bn for d in widths]
    compact = jnp.concatenate([_pad_to(kernel[:, c:c + d], (d_pad, m)) for c, d, m in zip(columns, widths, n_pads)],
                              axis=1)
    n_slots = parts[0].a.shape[0]
    parts = [w._replace(a=_pad_to(w.a, (n_slots, d_pad, rb)), b=_pad_to(w.b, (n_slots, rb, m)))
             for w, rb, m in zip(parts, rbs, n_pads)]
    starts = tuple(int(c) for c in np.cumsum([0] + n_pads[:-1]))
    y = launch(compact, jax.ShapeDtypeStruct(compact.shape, kernel.dtype), parts, starts, slot, bn=bn)
    if merged is None:
        return y[:d_in, :n]
    for c, d, start in zip(columns, widths, starts):
        merged = merged.at[:, c:c + d].set(y[:d_in, start:start + d])
    return merged
