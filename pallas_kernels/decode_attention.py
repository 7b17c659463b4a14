"""Paged decode attention: one query per row over the row's KV pages (Pallas, Triton lowering).

    out[b, h] = sum_{j < L[b]} softmax_j(q[b, h] . K[g, pt[b, j // S], j % S] / sqrt(Dh)) V[g, pt[b, j // S], j % S]
                (g = h // (H / H_kv): grouped-query heads share their K/V head; S the page size;
                 L[b] = lengths[b]; a row of length 0 attends nothing and gets 0; whatever the cache holds past
    a row's length, NaN included, never reaches its output)

Grid (row, K/V head, split): a program loads the G query heads that share one K/V head and
streams its split of the row's keys, `pages_per_block` pages at a time gathered through the
page table, through an online softmax (running max, sum and float32 accumulator). Keys at or
past the row's length are never read: a program whose split starts past them writes an empty
partial. A jnp epilogue combines the splits. Splitting the keys keeps every SM busy when rows
x heads are few (one long request) without costing many rows anything.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from pallas_kernels.online_softmax import MASKED, init_carry, online_softmax_step

_MIN_GROUP = 16          # Triton dots need 16 rows: the query heads of a group are padded to it
_TARGET_PROGRAMS = 512   # enough programs for ~4 per SM on an H100/H200 (132 SMs)


def _decode_kernel(lengths_ref, table_ref, q_ref, k_ref, v_ref, acc_ref, m_ref, l_ref, *,
                   pages_per_block: int, blocks_per_split: int, scale: float):
    """lengths_ref [1]; table_ref [W] (the row's page table); q_ref [G, Dh]; k_ref/v_ref [P, S, Dh]
    (one K/V head's pages) -> acc_ref [G, Dh] (unnormalised), m_ref/l_ref [G] (running max, sum)."""
    q = q_ref[...]
    group, head_dim = q.shape
    block_k = pages_per_block * k_ref.shape[1]
    length = lengths_ref[0]
    first = pl.program_id(2) * blocks_per_split
    last = jnp.minimum(first + blocks_per_split, (length + block_k - 1) // block_k)

    def body(j, carry):
        pages = table_ref[pl.ds(j * pages_per_block, pages_per_block)]                 # [pages_per_block]
        pages = jnp.clip(pages, 0, k_ref.shape[0] - 1)       # the block's pages past the length are read
        k = k_ref[pages].reshape(block_k, head_dim)
        v = v_ref[pages].reshape(block_k, head_dim)
        attended = j * block_k + jnp.arange(block_k) < length                            # [BK]
        s = jnp.dot(q, k.T, preferred_element_type=jnp.float32) * scale                 # [G, BK]
        s = jnp.where(attended[None, :], s, MASKED)
        v = jnp.where(attended[:, None], v, 0)      # masked by select: garbage past the length stays out
        return online_softmax_step(carry, s, v)

    m, l, acc = jax.lax.fori_loop(first, jnp.maximum(first, last), body, init_carry(group, head_dim))
    acc_ref[...], m_ref[...], l_ref[...] = acc, m, l


def _splits(rows: int, kv_heads: int, blocks: int) -> int:
    """Key splits per (row, K/V head): enough programs to fill the GPU, at most one per key block."""
    return max(1, min(blocks, -(-_TARGET_PROGRAMS // (rows * kv_heads))))


@functools.partial(jax.jit, static_argnames=("pages_per_block", "splits", "warps", "stages", "interpret"))
def _decode_attention(q, k_pages, v_pages, page_table, lengths, *, pages_per_block: int, splits: int | None,
                      warps: int, stages: int, interpret: bool):
    rows, heads, head_dim = q.shape
    kv_heads, _, page_size, _ = k_pages.shape
    group = heads // kv_heads
    padded_group = max(_MIN_GROUP, 1 << (group - 1).bit_length())
    blocks = -(-page_table.shape[1] // pages_per_block)
    splits = splits or _splits(rows, kv_heads, blocks)
    blocks_per_split = -(-blocks // splits)
    width = splits * blocks_per_split * pages_per_block
    table = jnp.pad(page_table.astype(jnp.int32), ((0, 0), (0, width - page_table.shape[1])))
    lengths = jnp.minimum(lengths.astype(jnp.int32), page_table.shape[1] * page_size)    # keys past the table
    q = q.reshape(rows, kv_heads, group, head_dim)
    q = jnp.pad(q, ((0, 0), (0, 0), (0, padded_group - group), (0, 0)))                # [B, H_kv, Gp, Dh]
    partial_shape = (rows, kv_heads, splits, padded_group)
    acc, m, l = pl.pallas_call(
        functools.partial(_decode_kernel, pages_per_block=pages_per_block, blocks_per_split=blocks_per_split,
                          scale=head_dim ** -0.5),
        out_shape=(jax.ShapeDtypeStruct((*partial_shape, head_dim), jnp.float32),
                   jax.ShapeDtypeStruct(partial_shape, jnp.float32),
                   jax.ShapeDtypeStruct(partial_shape, jnp.float32)),
        grid=(rows, kv_heads, splits),
        in_specs=[pl.BlockSpec((1,), lambda b, g, s: (b,)),
                  pl.BlockSpec((None, width), lambda b, g, s: (b, 0)),
                  pl.BlockSpec((None, None, padded_group, head_dim), lambda b, g, s: (b, g, 0, 0)),
                  pl.BlockSpec((None, *k_pages.shape[1:]), lambda b, g, s: (g, 0, 0, 0)),
                  pl.BlockSpec((None, *v_pages.shape[1:]), lambda b, g, s: (g, 0, 0, 0))],
        out_specs=(pl.BlockSpec((None, None, None, padded_group, head_dim), lambda b, g, s: (b, g, s, 0, 0)),
                   pl.BlockSpec((None, None, None, padded_group), lambda b, g, s: (b, g, s, 0)),
                   pl.BlockSpec((None, None, None, padded_group), lambda b, g, s: (b, g, s, 0))),
        compiler_params=plt.CompilerParams(num_warps=warps, num_stages=stages),
        interpret=interpret,
        name="decode_attention",
    )(lengths, table, q, k_pages, v_pages)
    weight = jnp.exp(m - jnp.max(m, axis=2, keepdims=True))                            # [B, H_kv, splits, Gp]
    total = jnp.sum(weight * l, axis=2)                                                # [B, H_kv, Gp]
    out = jnp.sum(weight[..., None] * acc, axis=2) / jnp.where(total > 0, total, 1.0)[..., None]
    return out[:, :, :group].reshape(rows, heads * head_dim).astype(q.dtype)


def decode_attention(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array, page_table: jax.Array,
                     lengths: jax.Array, *, pages_per_block: int = 4, splits: int | None = None, warps: int = 4,
                     stages: int = 2, interpret: bool = False) -> jax.Array:
    """`decode_attention_reference` by one Pallas kernel and a combine (see the module docstring).

    Args:
      q: [B, H, Dh] one query per row (unscaled); k_pages, v_pages: [H_kv, P, S, Dh] the cache
        (H a multiple of H_kv; Dh and S powers of two, Dh >= 16), all of one float dtype.
      page_table: [B, W] int32 page of each row's keys S*i..S*i+S-1 (the keys past the row's
        length are masked; their pages may be read, clamped into 0..P-1); lengths: [B] int32 keys
        each row attends (0..W*S).
      pages_per_block: pages per loop step (a power of two); splits: key splits per (row, K/V
        head) (None: enough programs to fill the GPU); warps, stages: the launch. The defaults
        were the fastest of bench/decode_attention.py's launches at nearly every shape on an H100.
      interpret: run in the Pallas interpreter (CPU tests).
    Returns: [B, H * Dh] in q's dtype.
    Raises: ValueError for inconsistent shapes, dtypes or launch parameters.
    """
    if q.ndim != 3 or k_pages.ndim != 4 or k_pages.shape != v_pages.shape:
        raise ValueError(f"q must be [B, H, Dh] and k_pages, v_pages equal [H_kv, P, S, Dh]; got {q.shape}, "
                         f"{k_pages.shape}, {v_pages.shape}")
    rows, heads, head_dim = q.shape
    kv_heads, _, page_size, _ = k_pages.shape
    if k_pages.shape[3] != head_dim or heads % kv_heads:
        raise ValueError(f"k/v pages {k_pages.shape} do not match q {q.shape} (same Dh, H a multiple of H_kv)")
    for name, size, least in (("head dim", head_dim, 16), ("page size", page_size, 1),
                              ("pages_per_block", pages_per_block, 1)):
        if size < least or size & (size - 1):
            raise ValueError(f"{name} {size} must be a power of two >= {least}")
    if not q.dtype == k_pages.dtype == v_pages.dtype:
        raise ValueError(f"q, k_pages, v_pages dtypes differ: {q.dtype}, {k_pages.dtype}, {v_pages.dtype}")
    if page_table.ndim != 2 or page_table.shape[0] != rows or lengths.shape != (rows,):
        raise ValueError(f"page_table {page_table.shape} must be [B={rows}, W] and lengths {lengths.shape} [B]")
    if splits is not None and splits < 1:
        raise ValueError(f"splits={splits} must be >= 1")
    return _decode_attention(q, k_pages, v_pages, page_table, lengths, pages_per_block=pages_per_block,
                             splits=splits, warps=warps, stages=stages, interpret=interpret)


def decode_attention_reference(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array, page_table: jax.Array,
                               lengths: jax.Array) -> jax.Array:
    """The formula of the module docstring in plain jnp (float32 scores): [B, H * Dh]."""
    rows, heads, head_dim = q.shape
    kv_heads, _, page_size, _ = k_pages.shape
    keys, values = (p[:, page_table].reshape(kv_heads, rows, -1, head_dim)                         # [H_kv, B, C, Dh]
                    for p in (k_pages, v_pages))
    qg = q.reshape(rows, kv_heads, heads // kv_heads, head_dim)
    s = jnp.einsum("bkgd,kbcd->bkgc", qg, keys, preferred_element_type=jnp.float32) * head_dim ** -0.5
    attended = jnp.arange(keys.shape[2])[None, :] < lengths[:, None]                            # [B, C]
    s = jnp.where(attended[:, None, None, :], s, MASKED)
    p = jnp.where(attended[:, None, None, :], jax.nn.softmax(s, axis=-1), 0.0)
    values = jnp.where(attended[None, :, :, None], values.astype(jnp.float32), 0.0)     # select, not 0 * NaN
    out = jnp.einsum("bkgc,kbcd->bkgd", p, values)
    return out.reshape(rows, heads * head_dim).astype(q.dtype)
