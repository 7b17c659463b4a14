"""Prefill attention over a row's gathered context, flash-style (Pallas, Triton lowering).

    out[b, i, h] = sum_{j <= pos[b, i], j < C} softmax_j(q[b, i, h] . k[b, j, g] / sqrt(Dh)) v[b, j, g]
                   (g = h // (H / H_kv): grouped-query heads share their K/V head)

Key j of a row sits at position j (the context gathered from the row's pages in order), so a
query at position p attends keys 0..p: its earlier chunks and its own chunk up to itself. One
program takes a block of one row's queries for one head and streams K/V blocks through an
online softmax (running max, sum and float32 accumulator), stopping after the block holding
the block's largest position: the [Q, C] scores never reach memory, and keys past the queries
(the rest of the padded page table) are never read. Queries with a negative position are
padding: their output is finite and unspecified.
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


def _flash_kernel(q_ref, k_ref, v_ref, pos_ref, o_ref, *, block_k: int, scale: float):
    """q_ref [BQ, Dh], k_ref/v_ref [C, Dh] (one row's K/V head), pos_ref [BQ] -> o_ref [BQ, Dh]."""
    q = q_ref[...]
    pos = pos_ref[...]
    block_q, head_dim = q.shape
    n_blocks = jnp.minimum((jnp.max(pos) + block_k) // block_k, k_ref.shape[0] // block_k)

    def body(j, carry):
        keys = pl.ds(j * block_k, block_k)
        k, v = k_ref[keys, :], v_ref[keys, :]
        key = j * block_k + jnp.arange(block_k)                                         # [BK]
        s = jnp.dot(q, k.T, preferred_element_type=jnp.float32) * scale                 # [BQ, BK]
        s = jnp.where(key[None, :] <= pos[:, None], s, MASKED)
        v = jnp.where((key <= jnp.max(pos))[:, None], v, 0)    # select: keys past every query stay out
        return online_softmax_step(carry, s, v)

    _, l, acc = jax.lax.fori_loop(0, n_blocks, body, init_carry(block_q, head_dim))
    o_ref[...] = (acc / jnp.where(l > 0, l, 1.0)[:, None]).astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("block_q", "block_k", "warps", "stages", "interpret"))
def _prefill_attention(q, k, v, positions, *, block_q: int, block_k: int, warps: int, stages: int,
                       interpret: bool):
    b, n_q, heads, head_dim = q.shape
    context, kv_heads = k.shape[1], k.shape[2]
    bq, bk = _block(n_q, block_q), _block(context, block_k)
    q_pad, c_pad = -n_q % bq, -context % bk
    positions = jnp.minimum(positions.astype(jnp.int32), context - 1)     # keys past C do not exist
    if q_pad:
        q = jnp.pad(q, ((0, 0), (0, q_pad), (0, 0), (0, 0)))
        positions = jnp.pad(positions, ((0, 0), (0, q_pad)), constant_values=-1)
    if c_pad:
        k, v = (jnp.pad(t, ((0, 0), (0, c_pad), (0, 0), (0, 0))) for t in (k, v))
    group = heads // kv_heads
    out = pl.pallas_call(
        functools.partial(_flash_kernel, block_k=bk, scale=head_dim ** -0.5),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        grid=(b, heads, q.shape[1] // bq),
        in_specs=[pl.BlockSpec((None, bq, None, head_dim), lambda r, h, i: (r, i, h, 0)),
                  pl.BlockSpec((None, k.shape[1], None, head_dim), lambda r, h, i: (r, 0, h // group, 0)),
                  pl.BlockSpec((None, k.shape[1], None, head_dim), lambda r, h, i: (r, 0, h // group, 0)),
                  pl.BlockSpec((None, bq), lambda r, h, i: (r, i))],
        out_specs=pl.BlockSpec((None, bq, None, head_dim), lambda r, h, i: (r, i, h, 0)),
        compiler_params=plt.CompilerParams(num_warps=warps, num_stages=stages),
        interpret=interpret,
        name="prefill_attention",
    )(q, k, v, positions)
    return out[:, :n_q].reshape(b, n_q, heads * head_dim)


def prefill_attention(q: jax.Array, k: jax.Array, v: jax.Array, positions: jax.Array, *, block_q: int = 64,
                      block_k: int = 64, warps: int = 4, stages: int = 2,
                      interpret: bool = False) -> jax.Array:
    """`prefill_attention_reference` by one Pallas kernel (see the module docstring).

    Args:
      q: [B, Q, H, Dh] queries; k, v: [B, C, H_kv, Dh] each row's context in position order
        (H a multiple of H_kv; Dh a power of two >= 16), all of one float dtype.
      positions: [B, Q] int32, each query's position (< 0: padding).
      block_q, block_k: queries per program and keys per loop step (powers of two >= 16; capped
        at Q and C rounded up to powers of two, Q and C padded to whole blocks).
      warps, stages: the launch (the defaults were the fastest of bench/prefill_attention.py's
        launches at every LLaVA-1.5-7B shape on the H200, 1.3-2.5x faster than 8 warps).
      interpret: run in the Pallas interpreter (CPU tests).
    Returns: [B, Q, H * Dh] in q's dtype.
    Raises: ValueError for inconsistent shapes, dtypes or block sizes.
    """
    if q.ndim != 4 or k.ndim != 4 or k.shape != v.shape:
        raise ValueError(f"q must be [B, Q, H, Dh] and k, v equal [B, C, H_kv, Dh]; got {q.shape}, {k.shape}, "
                         f"{v.shape}")
    b, n_q, heads, head_dim = q.shape
    if k.shape[0] != b or k.shape[3] != head_dim or heads % k.shape[2]:
        raise ValueError(f"k/v {k.shape} do not match q {q.shape} (same B and Dh, H a multiple of H_kv)")
    if head_dim < 16 or head_dim & (head_dim - 1):
        raise ValueError(f"head dim {head_dim} must be a power of two >= 16")
    if not q.dtype == k.dtype == v.dtype:
        raise ValueError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if positions.shape != (b, n_q):
        raise ValueError(f"positions shape {positions.shape} != [B={b}, Q={n_q}]")
    for name, size in (("block_q", block_q), ("block_k", block_k)):
        if size < 16 or size & (size - 1):
            raise ValueError(f"{name}={size} must be a power of two >= 16")
    return _prefill_attention(q, k, v, positions, block_q=block_q, block_k=block_k, warps=warps, stages=stages,
                              interpret=interpret)


def prefill_attention_reference(q: jax.Array, k: jax.Array, v: jax.Array, positions: jax.Array) -> jax.Array:
    """The formula of the module docstring in plain jnp (float32 scores): [B, Q, H * Dh]."""
    b, n_q, heads, head_dim = q.shape
    kv_heads = k.shape[2]
    qg = q.reshape(b, n_q, kv_heads, heads // kv_heads, head_dim)
    s = jnp.einsum("bqkgd,bckd->bkgqc", qg, k, preferred_element_type=jnp.float32) * head_dim ** -0.5
    s = jnp.where(jnp.arange(k.shape[1])[None, None, None, None, :] <= positions[:, None, None, :, None], s, MASKED)
    p = jax.nn.softmax(s, axis=-1)
    reached = jnp.arange(k.shape[1])[None, :] <= jnp.max(positions, axis=1)[:, None]          # [B, C]
    v = jnp.where(reached[:, :, None, None], v.astype(jnp.float32), 0.0)                        # select, not 0 * NaN
    out = jnp.einsum("bkgqc,bckd->bqkgd", p, v)
    return out.reshape(b, n_q, heads * head_dim).astype(q.dtype)
