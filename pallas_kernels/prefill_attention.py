"""Prefill attention over a row's KV pages, flash-style (Pallas, Triton lowering).

    out[b, i, h] = sum_{j <= pos[b, i], j < W S} softmax_j(q[b, i, h] . K[g, pt[b, j // S], j % S] / sqrt(Dh))
                                                 V[g, pt[b, j // S], j % S]
                   (g = h // (H / H_kv): grouped-query heads share their K/V head; S the page size;
                    pt[b] the row's page table of W pages, pt[b, j // S] clipped into 0..P-1)

Key j of a row is slot j % S of its page pt[b, j // S], so a query at position p attends keys
0..p: its earlier chunks and its own chunk up to itself. One program takes a block of one row's
queries for one head and streams K/V blocks, `pages_per_block` pages at a time gathered through
the row's page table, through an online softmax (running max, sum and float32 accumulator),
stopping after the block holding the block's largest position: the [Q, W S] scores never reach
memory, keys past the queries (the rest of the padded page table) are never read, and the
context is never gathered into a dense array. Whatever the cache holds past a row's largest
position, NaN included, never reaches its outputs. Queries with a negative position are padding:
their output is finite and unspecified.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from pallas_kernels.online_softmax import MASKED, init_carry, online_softmax_step


def _block(n: int, cap: int) -> int:
    """The block for a dimension of n: the power of two >= n, within [16, cap] (Triton dots need 16)."""
    return max(16, min(cap, 1 << (max(n, 1) - 1).bit_length()))


def _flash_kernel(table_ref, q_ref, k_ref, v_ref, pos_ref, o_ref, *, pages_per_block: int, scale: float):
    """table_ref [W] (the row's page table, whole blocks); q_ref [BQ, Dh]; k_ref/v_ref [P, S, Dh] (one
    K/V head's pages); pos_ref [BQ] -> o_ref [BQ, Dh]."""
    q = q_ref[...]
    pos = pos_ref[...]
    block_q, head_dim = q.shape
    block_k = pages_per_block * k_ref.shape[1]
    last = jnp.max(pos)
    n_blocks = jnp.minimum((last + block_k) // block_k, table_ref.shape[0] // pages_per_block)

    def body(j, carry):
        pages = table_ref[pl.ds(j * pages_per_block, pages_per_block)]                 # [pages_per_block]
        pages = jnp.clip(pages, 0, k_ref.shape[0] - 1)        # padding entries of the table are read too
        k = k_ref[pages].reshape(block_k, head_dim)
        v = v_ref[pages].reshape(block_k, head_dim)
        key = j * block_k + jnp.arange(block_k)                                         # [BK]
        s = jnp.dot(q, k.T, preferred_element_type=jnp.float32) * scale                 # [BQ, BK]
        s = jnp.where(key[None, :] <= pos[:, None], s, MASKED)
        v = jnp.where((key <= last)[:, None], v, 0)          # select: keys past every query stay out
        return online_softmax_step(carry, s, v)

    _, l, acc = jax.lax.fori_loop(0, n_blocks, body, init_carry(block_q, head_dim))
    o_ref[...] = (acc / jnp.where(l > 0, l, 1.0)[:, None]).astype(o_ref.dtype)


def _pages_per_block(block_k: int, page_size: int, width: int) -> int:
    """Whole pages per loop step: block_k keys (capped at the table's W S keys rounded up to a power
    of two, at least 16), and at least one page."""
    return max(1, _block(width * page_size, block_k) // page_size)


@functools.partial(jax.jit, static_argnames=("block_q", "block_k", "warps", "stages", "interpret"))
def _prefill_attention(q, k_pages, v_pages, page_table, positions, *, block_q: int, block_k: int, warps: int,
                       stages: int, interpret: bool):
    b, n_q, heads, head_dim = q.shape
    kv_heads, _, page_size, _ = k_pages.shape
    width = page_table.shape[1]
    pages_per_block = _pages_per_block(block_k, page_size, width)
    bq = _block(n_q, block_q)
    q_pad = -n_q % bq
    table = jnp.pad(page_table.astype(jnp.int32), ((0, 0), (0, -width % pages_per_block)))   # page 0: never used
    positions = jnp.minimum(positions.astype(jnp.int32), width * page_size - 1)   # keys past W S do not exist
    if q_pad:
        q = jnp.pad(q, ((0, 0), (0, q_pad), (0, 0), (0, 0)))
        positions = jnp.pad(positions, ((0, 0), (0, q_pad)), constant_values=-1)
    group = heads // kv_heads
    out = pl.pallas_call(
        functools.partial(_flash_kernel, pages_per_block=pages_per_block, scale=head_dim ** -0.5),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        grid=(b, heads, q.shape[1] // bq),
        in_specs=[pl.BlockSpec((None, table.shape[1]), lambda r, h, i: (r, 0)),
                  pl.BlockSpec((None, bq, None, head_dim), lambda r, h, i: (r, i, h, 0)),
                  pl.BlockSpec((None, *k_pages.shape[1:]), lambda r, h, i: (h // group, 0, 0, 0)),
                  pl.BlockSpec((None, *v_pages.shape[1:]), lambda r, h, i: (h // group, 0, 0, 0)),
                  pl.BlockSpec((None, bq), lambda r, h, i: (r, i))],
        out_specs=pl.BlockSpec((None, bq, None, head_dim), lambda r, h, i: (r, i, h, 0)),
        compiler_params=plt.CompilerParams(num_warps=warps, num_stages=stages),
        interpret=interpret,
        name="prefill_attention",
    )(table, q, k_pages, v_pages, positions)
    return out[:, :n_q].reshape(b, n_q, heads * head_dim)


def prefill_attention(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array, page_table: jax.Array,
                      positions: jax.Array, *, block_q: int = 64, block_k: int = 64, warps: int = 4, stages: int = 2,
                      interpret: bool = False) -> jax.Array:
    """`prefill_attention_reference` by one Pallas kernel (see the module docstring).

    Args:
      q: [B, Q, H, Dh] queries; k_pages, v_pages: [H_kv, P, S, Dh] the layer's cache (H a multiple
        of H_kv; Dh and S powers of two, Dh >= 16), all of one float dtype.
      page_table: [B, W] int32 page of each row's keys S*i..S*i+S-1 (entries past what a row's
        queries attend may be anything: they are clipped into 0..P-1 and masked).
      positions: [B, Q] int32, each query's position (< 0: padding; past W S - 1: as W S - 1).
      block_q: queries per program (a power of two >= 16; capped at Q rounded up to a power of two,
        Q padded to whole blocks).
      block_k: keys per loop step (a power of two >= 16; capped at W S rounded up to a power of two).
        A step loads max(1, block_k // S) whole pages: pages larger than the block make it one page.
        The table is padded to whole steps with page 0.
      warps, stages: the launch (the defaults were the fastest of bench/prefill_attention.py's
        launches at every LLaVA-1.5-7B shape on the H200, timed over gathered K/V: 1.3-2.5x faster
        than 8 warps).
      interpret: run in the Pallas interpreter (CPU tests).
    Returns: [B, Q, H * Dh] in q's dtype.
    Raises: ValueError for inconsistent shapes, dtypes or block sizes.
    """
    if q.ndim != 4 or k_pages.ndim != 4 or k_pages.shape != v_pages.shape:
        raise ValueError(f"q must be [B, Q, H, Dh] and k_pages, v_pages equal [H_kv, P, S, Dh]; got {q.shape}, "
                         f"{k_pages.shape}, {v_pages.shape}")
    b, n_q, heads, head_dim = q.shape
    kv_heads, _, page_size, _ = k_pages.shape
    if k_pages.shape[3] != head_dim or heads % kv_heads:
        raise ValueError(f"k/v pages {k_pages.shape} do not match q {q.shape} (same Dh, H a multiple of H_kv)")
    for name, size, least in (("head dim", head_dim, 16), ("page size", page_size, 1)):
        if size < least or size & (size - 1):
            raise ValueError(f"{name} {size} must be a power of two >= {least}")
    if not q.dtype == k_pages.dtype == v_pages.dtype:
        raise ValueError(f"q, k_pages, v_pages dtypes differ: {q.dtype}, {k_pages.dtype}, {v_pages.dtype}")
    if page_table.ndim != 2 or page_table.shape[0] != b or page_table.shape[1] < 1:
        raise ValueError(f"page_table shape {page_table.shape} != [B={b}, W >= 1]")
    if positions.shape != (b, n_q):
        raise ValueError(f"positions shape {positions.shape} != [B={b}, Q={n_q}]")
    for name, size in (("block_q", block_q), ("block_k", block_k)):
        if size < 16 or size & (size - 1):
            raise ValueError(f"{name}={size} must be a power of two >= 16")
    return _prefill_attention(q, k_pages, v_pages, page_table, positions, block_q=block_q, block_k=block_k,
                              warps=warps, stages=stages, interpret=interpret)


def prefill_attention_reference(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array, page_table: jax.Array,
                                positions: jax.Array) -> jax.Array:
    """The formula of the module docstring in plain jnp (the pages gathered into each row's dense
    [W S] context, float32 scores): [B, Q, H * Dh]."""
    b, n_q, heads, head_dim = q.shape
    kv_heads, n_pages, _, _ = k_pages.shape
    table = jnp.clip(page_table.astype(jnp.int32), 0, n_pages - 1)
    k, v = (p[:, table].transpose(1, 2, 3, 0, 4).reshape(b, -1, kv_heads, head_dim)    # [B, W S, H_kv, Dh]
            for p in (k_pages, v_pages))
    qg = q.reshape(b, n_q, kv_heads, heads // kv_heads, head_dim)
    s = jnp.einsum("bqkgd,bckd->bkgqc", qg, k, preferred_element_type=jnp.float32) * head_dim ** -0.5
    s = jnp.where(jnp.arange(k.shape[1])[None, None, None, None, :] <= positions[:, None, None, :, None], s, MASKED)
    p = jax.nn.softmax(s, axis=-1)
    reached = jnp.arange(k.shape[1])[None, :] <= jnp.max(positions, axis=1)[:, None]          # [B, W S]
    v = jnp.where(reached[:, :, None, None], v.astype(jnp.float32), 0.0)                        # select, not 0 * NaN
    out = jnp.einsum("bkgqc,bckd->bqkgd", p, v)
    return out.reshape(b, n_q, heads * head_dim).astype(q.dtype)
