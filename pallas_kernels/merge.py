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
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from pallas_kernels.atmm import _FLOAT_DTYPES, _cdiv, _ignore_aliased_inputs, _pad_rank
from pallas_kernels.lora_reference import LoraWeight
from pallas_kernels.tiling import MergeTile, pick_merge_tile


def merge_bytes(d_in: int, d_out: int, rank: int, itemsize: int = 2) -> int:
    """Bytes a merge must move: read W [D_in, D_out] and the slot's A [D_in, R], B [R, D_out];
    write W_m."""
    return itemsize * (2 * d_in * d_out + rank * (d_in + d_out))


def _merge_kernel(slot_ref, kernel_ref, a_ref, b_ref, scale_ref, rank_ref, out_ref, *, bm: int, bn: int,
                  row_tiles: int):
    """Row tiles i = program_id(0) * row_tiles + k, k < row_tiles, of column block j:
    out[rows_i, cols_j] = kernel + scale[s] * A[s][rows_i, :rank] @ B[s][:rank, cols_j]."""
    d_in, d_out = kernel_ref.shape
    rb = a_ref.shape[-1]
    first, j = pl.program_id(0) * row_tiles, pl.program_id(1)
    s = slot_ref[0]
    cols = j * bn + jnp.arange(bn)
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
        w = plt.load(kernel_ref.at[pl.ds(i * bm, bm), pl.ds(j * bn, bn)], mask=tile_ok, other=0)
        out = w.astype(jnp.float32) + scale * delta
        plt.store(out_ref.at[pl.ds(i * bm, bm), pl.ds(j * bn, bn)], out.astype(out_ref.dtype), mask=tile_ok)
        return carry

    if row_tiles == 1:
        tile(0, 0)
    else:
        jax.lax.fori_loop(0, row_tiles, tile, 0)


@functools.partial(jax.jit, static_argnames=("tile", "interpret", "poison"))
def _merge(kernel, w, slot, *, tile: MergeTile, interpret: bool, poison: bool = False):
    w = _pad_rank(w._replace(scale=w.scale.astype(jnp.float32), rank=w.rank.astype(jnp.int32)))
    args = [jnp.asarray(slot, jnp.int32).reshape(1), kernel, w.a, w.b, w.scale, w.rank]
    body = functools.partial(_merge_kernel, bm=tile.block_m, bn=tile.block_n, row_tiles=tile.row_tiles)
    aliases = {}
    if poison:                                  # tests: unwritten outputs stay NaN
        aliases = {len(args): 0}
        body = _ignore_aliased_inputs(body, len(args), 1)
        args.append(jnp.full(kernel.shape, jnp.nan, kernel.dtype))
    d_in, d_out = kernel.shape
    return pl.pallas_call(
        body,
        out_shape=jax.ShapeDtypeStruct(kernel.shape, kernel.dtype),
        grid=(_cdiv(d_in, tile.block_m * tile.row_tiles), _cdiv(d_out, tile.block_n)),
        input_output_aliases=aliases,
        compiler_params=plt.CompilerParams(num_warps=tile.warps, num_stages=tile.stages),
        interpret=interpret,
        name="lora_merge",
    )(*args)


def merge_weight(kernel: jax.Array, w: LoraWeight, slot, *, tile: MergeTile | None = None,
                 interpret: bool = False) -> jax.Array:
    """`merge_weight_reference` by one Pallas kernel (see the module docstring):

        W_m = kernel + scale[s] * A[s][:, :rank[s]] @ B[s][:rank[s], :]      (s = slot)
    float32 accumulation, rounded once to kernel's dtype; ranks above R count as R.

    Args:
      kernel: [D_in, D_out] float32 / bfloat16 / float16 base weight.
      w: LoraWeight with a [S, D_in, R] and b [S, R, D_out] in kernel's dtype, scale [S], rank [S].
      slot: int32 scalar, the slot to fold in (a host int is checked against [0, S)).
      tile: the launch; None: `pick_merge_tile` for this shape (the device's tuned table).
      interpret: run in the Pallas interpreter (CPU tests).
    Returns: [D_in, D_out] in kernel.dtype.
    Raises: ValueError for inconsistent shapes or dtypes, or a host slot outside [0, S).
    """
    if getattr(kernel, "ndim", None) != 2 or kernel.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"kernel must be a float [D_in, D_out] array, got "
                         f"{getattr(kernel, 'dtype', None)}{list(getattr(kernel, 'shape', ()))}")
    d_in, d_out = kernel.shape
    if not isinstance(w, LoraWeight) or w.a.ndim != 3 or w.a.shape[1] != d_in:
        raise ValueError(f"w.a must be [S, D_in={d_in}, R], got {getattr(getattr(w, 'a', None), 'shape', None)}")
    n_slots, _, r = w.a.shape
    if w.b.shape != (n_slots, r, d_out):
        raise ValueError(f"w.b shape {w.b.shape} != [S={n_slots}, R={r}, D_out={d_out}]")
    if w.a.dtype != kernel.dtype or w.b.dtype != kernel.dtype:
        raise ValueError(f"adapter dtypes {w.a.dtype}/{w.b.dtype} != kernel dtype {kernel.dtype}")
    if w.scale.shape != (n_slots,) or w.rank.shape != (n_slots,):
        raise ValueError(f"w.scale and w.rank must be [S={n_slots}], got {w.scale.shape} and {w.rank.shape}")
    if isinstance(slot, (int, np.integer)) and not 0 <= slot < n_slots:
        raise ValueError(f"slot {slot} outside [0, S={n_slots})")
    if tile is None:
        tile = pick_merge_tile(d_in, d_out, r, "interpret" if interpret else None)
    return _merge(kernel, w, slot, tile=tile, interpret=interpret)
