"""Swift merge: one adapter slot folded into a base weight in a single pass over the weight.

    merge_weight(kernel, w, slot) = kernel + scale[s] * A[s][:, :rank[s]] @ B[s][:rank[s], :]

A program takes `row_tiles` [BM, BN] tiles of the weight down one column block: it loads the
adapter's [RB, BN] columns of B once (RB = the slots' rank padded to a power of two >= 16;
rows beyond rank[s] masked to zero), then per tile reads that tile of W and the [BM, RB] rows
of A, makes one dot with float32 accumulation and writes the tile of W_m rounded once: W is
read once and W_m written once, the bytes a merge has to move, where XLA's `W + A @ B` may
write and re-read the product. The tile shape comes from the device's tuned table
(`MergeTile`, `pick_merge_tile`). The slot is read on the device, so one compiled merge serves
every slot.

A MergeTile(kernel="mosaic") runs the same merge on Mosaic GPU instead (`merge_mosaic.py`: TMA
pipelines and wgmma, Hopper).

`merge_parts` does the same for a fused weight [D_in, N] (q/k/v, gate/up) in one launch: each
part p with an adapter (A_p [S, D_in, R_p], B_p [S, R_p, D_out_p]) is folded into its columns
[columns[p], columns[p] + D_out_p) from the base kernel; the other columns keep the merged copy's
values (the output is written over it). `merge_weight` is its one-part case.
"""

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from pallas_kernels.atmm import _FLOAT_DTYPES, _cdiv, _check_columns, _ignore_aliased_inputs, _pad_rank
from pallas_kernels.lora_reference import LoraWeight
from pallas_kernels.merge_mosaic import merge_mosaic
from pallas_kernels.tiling import MergeTile, pick_merge_tile


def merge_bytes(d_in: int, d_out: int, rank: int, itemsize: int = 2) -> int:
    """Bytes a merge must move: read W [D_in, D_out] and the slot's A [D_in, R], B [R, D_out];
    write W_m."""
    return itemsize * (2 * d_in * d_out + rank * (d_in + d_out))


def _merge_part(j, c0: int, slot_ref, kernel_ref, a_ref, b_ref, scale_ref, rank_ref, out_ref, *, first,
                bm: int, bn: int, row_tiles: int):
    """Row tiles i = first + k, k < row_tiles, of the part's column block j (part-local columns
    cols_j, at c0 + cols_j of the weight):
    out[rows_i, c0 + cols_j] = kernel[rows_i, c0 + cols_j] + scale[s] * A[s][rows_i, :rank] @ B[s][:rank, cols_j]."""
    d_in, d_out = kernel_ref.shape[0], b_ref.shape[-1]
    rb = a_ref.shape[-1]
    s = slot_ref[0]
    cols = j * bn + jnp.arange(bn)                                             # [BN], within the part
    inner = jnp.arange(rb) < jnp.minimum(rank_ref[s], rb)                      # [RB]
    b = plt.load(b_ref.at[s, :, pl.ds(j * bn, bn)], mask=inner[:, None] & (cols < d_out)[None, :],
                 other=0)                                                      # [RB, BN], once
    scale = scale_ref[s]

    def tile(k, carry):
        i = first + k
        rows = i * bm + jnp.arange(bm)
        tile_ok = (rows < d_in)[:, None] & (cols < d_out)[None, :]             # [BM, BN]
        a = plt.load(a_ref.at[s, pl.ds(i * bm, bm), :], mask=(rows < d_in)[:, None] & inner[None, :],
                     other=0)                                                  # [BM, RB]
        delta = jnp.dot(a, b, preferred_element_type=jnp.float32)             # [BM, BN]
        w = plt.load(kernel_ref.at[pl.ds(i * bm, bm), pl.ds(c0 + j * bn, bn)], mask=tile_ok, other=0)
        out = w.astype(jnp.float32) + scale * delta
        plt.store(out_ref.at[pl.ds(i * bm, bm), pl.ds(c0 + j * bn, bn)], out.astype(out_ref.dtype),
                  mask=tile_ok)
        return carry

    if row_tiles == 1:
        tile(0, 0)
    else:
        jax.lax.fori_loop(0, row_tiles, tile, 0)


def _merge_kernel(slot_ref, kernel_ref, *refs, bm: int, bn: int, row_tiles: int, columns: tuple,
                  tile_offsets: tuple):
    """Program (i, tile): the row tiles program_id(0) * row_tiles + k, k < row_tiles, of the column
    block `tile`, which belongs to the part p with tile_offsets[p] <= tile < tile_offsets[p + 1]
    (its block tile - tile_offsets[p]). refs: a, b, scale, rank (one per part), then out."""
    n_parts = len(columns)
    groups = [refs[k * n_parts:(k + 1) * n_parts] for k in range(4)]
    out_ref = refs[4 * n_parts]
    first, tile = pl.program_id(0) * row_tiles, pl.program_id(1)
    for p, (c0, a_ref, b_ref, scale_ref, rank_ref) in enumerate(zip(columns, *groups)):
        lo, hi = tile_offsets[p], tile_offsets[p + 1]
        part = functools.partial(_merge_part, tile - lo if lo else tile, c0, slot_ref, kernel_ref, a_ref, b_ref,
                                 scale_ref, rank_ref, out_ref, first=first, bm=bm, bn=bn, row_tiles=row_tiles)
        if n_parts == 1:
            part()
        else:
            pl.when((tile >= lo) & (tile < hi))(part)


def _merge_call(kernel, parts, slot, columns: tuple, *, tile: MergeTile, interpret: bool, over=None):
    """One pallas_call of _merge_kernel: parts (rank-padded) folded into kernel at columns; the
    output is written over `over` (aliased, never read: columns no part owns keep its values),
    or into a fresh buffer."""
    parts = [_pad_rank(w._replace(scale=w.scale.astype(jnp.float32), rank=w.rank.astype(jnp.int32)))
             for w in parts]
    bm, bn = tile.block_m, tile.block_n
    offsets = tuple(int(t) for t in np.cumsum([0] + [_cdiv(w.b.shape[-1], bn) for w in parts]))
    args = [jnp.asarray(slot, jnp.int32).reshape(1), kernel, *[w.a for w in parts], *[w.b for w in parts],
            *[w.scale for w in parts], *[w.rank for w in parts]]
    body = functools.partial(_merge_kernel, bm=bm, bn=bn, row_tiles=tile.row_tiles, columns=columns,
                             tile_offsets=offsets)
    aliases = {}
    if over is not None:
        aliases = {len(args): 0}
        body = _ignore_aliased_inputs(body, len(args), 1)
        args.append(over)
    return pl.pallas_call(
        body,
        out_shape=jax.ShapeDtypeStruct(kernel.shape, kernel.dtype),
        grid=(_cdiv(kernel.shape[0], bm * tile.row_tiles), offsets[-1]),
        input_output_aliases=aliases,
        compiler_params=plt.CompilerParams(num_warps=tile.warps, num_stages=tile.stages),
        interpret=interpret,
        name="lora_merge",
    )(*args)


@functools.partial(jax.jit, static_argnames=("tile", "interpret", "poison"))
def _merge(kernel, w, slot, *, tile: MergeTile, interpret: bool, poison: bool = False):
    if tile.kernel == "mosaic":                     # a fresh output: NaN when interpreted
        return merge_mosaic(kernel, None, (w,), slot, columns=(0,), tile=tile, interpret=interpret)
    over = jnp.full(kernel.shape, jnp.nan, kernel.dtype) if poison else None   # tests: unwritten stays NaN
    return _merge_call(kernel, [w], slot, (0,), tile=tile, interpret=interpret, over=over)


@functools.partial(jax.jit, static_argnames=("columns", "tile", "interpret"))
def _merge_parts(kernel, merged, parts, slot, *, columns: tuple, tile: MergeTile, interpret: bool):
    if tile.kernel == "mosaic":
        return merge_mosaic(kernel, merged, parts, slot, columns=columns, tile=tile, interpret=interpret)
    return _merge_call(kernel, parts, slot, columns, tile=tile, interpret=interpret, over=merged)


def _check_kernel(kernel, name: str = "kernel"):
    if getattr(kernel, "ndim", None) != 2 or kernel.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"{name} must be a float [D_in, D_out] array, got "
                         f"{getattr(kernel, 'dtype', None)}{list(getattr(kernel, 'shape', ()))}")


def _check_adapter(kernel, w, d_out: int, name: str, n_slots: int | None = None) -> int:
    """Checks one LoraWeight against kernel [D_in, *] and its width d_out; returns its S."""
    d_in = kernel.shape[0]
    if not isinstance(w, LoraWeight) or w.a.ndim != 3 or w.a.shape[1] != d_in:
        raise ValueError(f"{name}.a must be [S, D_in={d_in}, R], got "
                         f"{getattr(getattr(w, 'a', None), 'shape', None)}")
    s, _, r = w.a.shape
    if n_slots is not None and s != n_slots:
        raise ValueError(f"{name}.a shape {w.a.shape}: S={s} != S={n_slots} of the other parts")
    if w.b.shape != (s, r, d_out):
        raise ValueError(f"{name}.b shape {w.b.shape} != [S={s}, R={r}, D_out={d_out}]")
    if w.a.dtype != kernel.dtype or w.b.dtype != kernel.dtype:
        raise ValueError(f"{name} adapter dtypes {w.a.dtype}/{w.b.dtype} != kernel dtype {kernel.dtype}")
    if w.scale.shape != (s,) or w.rank.shape != (s,):
        raise ValueError(f"{name}.scale and {name}.rank must be [S={s}], got {w.scale.shape} and {w.rank.shape}")
    return s


def _check_slot(slot, n_slots: int):
    if isinstance(slot, (int, np.integer)) and not 0 <= slot < n_slots:
        raise ValueError(f"slot {slot} outside [0, S={n_slots})")


def merge_weight(kernel: jax.Array, w: LoraWeight, slot, *, tile: MergeTile | None = None,
                 interpret: bool = False, kernels: str | None = None) -> jax.Array:
    """`merge_weight_reference` by one Pallas kernel (see the module docstring):

        W_m = kernel + scale[s] * A[s][:, :rank[s]] @ B[s][:rank[s], :]      (s = slot)
    float32 accumulation, rounded once to kernel's dtype; ranks above R count as R.

    Args:
      kernel: [D_in, D_out] float32 / bfloat16 / float16 base weight.
      w: LoraWeight with a [S, D_in, R] and b [S, R, D_out] in kernel's dtype, scale [S], rank [S].
      slot: int32 scalar, the slot to fold in (a host int is checked against [0, S)).
      tile: the launch and its kernel (Triton or Mosaic GPU: bfloat16 / float16 only); None:
        `pick_merge_tile` for this shape (the device's tuned table).
      interpret: run in the Pallas interpreter (CPU tests).
      kernels: with tile None, whose tile: "triton", "mosaic" or None = the device's.
    Returns: [D_in, D_out] in kernel.dtype.
    Raises: ValueError for inconsistent shapes or dtypes, or a host slot outside [0, S).
    """
    _check_kernel(kernel)
    d_in, d_out = kernel.shape
    n_slots = _check_adapter(kernel, w, d_out, "w")
    _check_slot(slot, n_slots)
    if tile is None:
        tile = pick_merge_tile(d_in, d_out, w.a.shape[-1], "interpret" if interpret else None, kernels)
    return _merge(kernel, w, slot, tile=tile, interpret=interpret)


def merge_parts(kernel: jax.Array, merged: jax.Array, parts: Sequence[LoraWeight], columns: Sequence[int], slot,
                *, tile: MergeTile | None = None, interpret: bool = False, kernels: str | None = None) -> jax.Array:
    """`merge_parts_reference` by one Pallas kernel: one slot folded into the parts of a fused weight.

        out[:, c_p : c_p + D_out_p] = kernel[:, c_p : c_p + D_out_p]
                                      + scale_p[s] * A_p[s][:, :rank_p[s]] @ B_p[s][:rank_p[s], :]
        out[:, n]                   = merged[:, n] for every column n no listed part owns
    (c_p = columns[p], s = slot), float32 accumulation, rounded once to kernel's dtype; ranks above
    R_p count as R_p. The result is written over merged's buffer (inside a jit that donates
    merged, only the parts' columns move).

    Args:
      kernel: [D_in, N] float32 / bfloat16 / float16 fused base weight (read only).
      merged: [D_in, N] in kernel's dtype, the current merged copy.
      parts: LoraWeights with a [S, D_in, R_p] and b [S, R_p, D_out_p] in kernel's dtype, scale [S],
        rank [S], the same S (R_p may differ).
      columns: static ints, part p's first column; the ranges [columns[p], columns[p] + D_out_p)
        must lie in [0, N) and not overlap.
      slot: int32 scalar, the slot to fold in (a host int is checked against [0, S)).
      tile: the launch and its kernel (Triton or Mosaic GPU: bfloat16 / float16 only); None:
        `pick_merge_tile` for D_in, the parts' total width and largest R.
      interpret: run in the Pallas interpreter (CPU tests).
      kernels: with tile None, whose tile: "triton", "mosaic" or None = the device's.
    Returns: [D_in, N] in kernel.dtype.
    Raises: ValueError for inconsistent shapes or dtypes, bad columns, or a host slot outside [0, S).
    """
    _check_kernel(kernel)
    d_in, n = kernel.shape
    if getattr(merged, "shape", None) != kernel.shape or getattr(merged, "dtype", None) != kernel.dtype:
        raise ValueError(f"merged must be [D_in={d_in}, N={n}] in {kernel.dtype} like kernel, got "
                         f"{getattr(merged, 'dtype', None)}{list(getattr(merged, 'shape', ()))}")
    parts = tuple(parts)
    if not parts:
        raise ValueError("parts is empty")
    if not all(isinstance(w, LoraWeight) for w in parts):
        bad = next(k for k, w in enumerate(parts) if not isinstance(w, LoraWeight))
        raise ValueError(f"parts[{bad}] is {type(parts[bad]).__name__}, expected LoraWeight")
    widths = [w.b.shape[-1] if getattr(w.b, "ndim", 0) == 3 else -1 for w in parts]
    n_slots = None
    for k, (w, d) in enumerate(zip(parts, widths)):
        n_slots = _check_adapter(kernel, w, d, f"parts[{k}]", n_slots)
    columns = _check_columns(columns, widths, n, "parts")
    _check_slot(slot, n_slots)
    if tile is None:
        tile = pick_merge_tile(d_in, sum(widths), max(w.a.shape[-1] for w in parts),
                               "interpret" if interpret else None, kernels)
    return _merge_parts(kernel, merged, parts, slot, columns=columns, tile=tile, interpret=interpret)
