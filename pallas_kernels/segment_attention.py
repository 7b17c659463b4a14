"""Attention within segments of one packed sequence, flash-style (Pallas, Triton lowering).

    out[i, h] = sum_{j : seg[j] = seg[i]} softmax_j(q[i, h] . k[j, h] / sqrt(Dh)) v[j, h]

The vision tower of the Qwen-VL family attends within each image's frame, or within a window of
it, over the patches of several images of any sizes packed into one call. A segment is one
contiguous run of positions (the tower orders its patches so that windows and frames are runs):
one program takes a block of queries of one head and streams only the key blocks that overlap
its queries' segments, from the first query's segment start to the last one's end, through an
online softmax (running max, sum and float32 accumulator), masking keys of other segments. The
[P, P] scores never reach memory, and a windowed layer reads about one window of keys a query
instead of the whole sequence. The head dimension is zero-padded to a power of two (Qwen's 80 to
128) for the Triton dots: the scores and outputs are unchanged.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from pallas_kernels.online_softmax import MASKED, init_carry, online_softmax_step
from pallas_kernels.prefill_attention import _block

PADDING = -2 ** 31
"""The segment of the positions the kernel pads the sequence with (attend only each other)."""


def segment_bounds(segment: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(start [P], end [P]) int32: the first position of each position's run of equal segment ids
    and one past its last."""
    p = segment.shape[0]
    idx = jnp.arange(p, dtype=jnp.int32)
    first = jnp.concatenate([jnp.ones((1,), bool), segment[1:] != segment[:-1]])
    last = jnp.concatenate([segment[1:] != segment[:-1], jnp.ones((1,), bool)])
    start = jax.lax.cummax(jnp.where(first, idx, 0))
    end = jax.lax.cummin(jnp.where(last, idx + 1, p), reverse=True)
    return start, end


def _segment_kernel(q_ref, k_ref, v_ref, seg_q_ref, seg_k_ref, start_ref, end_ref, o_ref, *, block_k: int,
                    scale: float):
    """q_ref [BQ, Dh]; k_ref, v_ref [P, Dh] (one head); seg_q_ref, start_ref, end_ref [BQ];
    seg_k_ref [P] -> o_ref [BQ, Dh]."""
    q = q_ref[...]
    seg_q = seg_q_ref[...]
    block_q, head_dim = q.shape
    first = jnp.min(start_ref[...]) // block_k                    # key blocks overlapping the queries' runs
    stop = (jnp.max(end_ref[...]) + block_k - 1) // block_k

    def body(j, carry):
        keys = pl.ds(j * block_k, block_k)
        k, v, seg_k = k_ref[keys, :], v_ref[keys, :], seg_k_ref[keys]
        s = jnp.dot(q, k.T, preferred_element_type=jnp.float32) * scale                 # [BQ, BK]
        s = jnp.where(seg_q[:, None] == seg_k[None, :], s, MASKED)
        return online_softmax_step(carry, s, v)

    _, l, acc = jax.lax.fori_loop(first, stop, body, init_carry(block_q, head_dim))
    o_ref[...] = (acc / jnp.where(l > 0, l, 1.0)[:, None]).astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("block_q", "block_k", "warps", "stages", "interpret"))
def _segment_attention(q, k, v, segment, *, block_q: int, block_k: int, warps: int, stages: int, interpret: bool):
    p, heads, head_dim = q.shape
    dh = _block(head_dim, 1 << 30)
    bq, bk = _block(p, block_q), _block(p, block_k)
    padded = -(-p // max(bq, bk)) * max(bq, bk)
    pad = lambda x: jnp.pad(x, ((0, padded - p), (0, 0), (0, dh - head_dim)))
    q, k, v = pad(q), pad(k), pad(v)
    segment = jnp.pad(segment.astype(jnp.int32), (0, padded - p), constant_values=PADDING)
    start, end = segment_bounds(segment)
    by_query = pl.BlockSpec((bq,), lambda h, i: (i,))
    whole_head = pl.BlockSpec((padded, None, dh), lambda h, i: (0, h, 0))
    out = pl.pallas_call(
        functools.partial(_segment_kernel, block_k=bk, scale=head_dim ** -0.5),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        grid=(heads, padded // bq),
        in_specs=[pl.BlockSpec((bq, None, dh), lambda h, i: (i, h, 0)), whole_head, whole_head, by_query,
                  pl.BlockSpec((padded,), lambda h, i: (0,)), by_query, by_query],
        out_specs=pl.BlockSpec((bq, None, dh), lambda h, i: (i, h, 0)),
        compiler_params=plt.CompilerParams(num_warps=warps, num_stages=stages),
        interpret=interpret,
        name="segment_attention",
    )(q, k, v, segment, segment, start, end)
    return out[:p, :, :head_dim]


def segment_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment: jax.Array, *, block_q: int = 64,
                      block_k: int = 64, warps: int = 4, stages: int = 2, interpret: bool = False) -> jax.Array:
    """`segment_attention_reference` by one Pallas kernel (see the module docstring).

    Args:
      q, k, v: [P, H, Dh] of one float dtype (any Dh: padded to a power of two >= 16 inside).
      segment: [P] int32, each position's segment; a segment must be one contiguous run of
        positions (a run's id may not recur later: it would attend only its own run).
      block_q, block_k: queries per program and keys per loop step (powers of two >= 16, capped
        at P rounded up to a power of two; P padded to whole blocks).
      warps, stages: the Triton launch.
      interpret: run in the Pallas interpreter (CPU tests).
    Returns: [P, H, Dh] in q's dtype.
    Raises: ValueError for inconsistent shapes, dtypes or block sizes.
    """
    if q.ndim != 3 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(f"q, k, v must be equal [P, H, Dh]; got {q.shape}, {k.shape}, {v.shape}")
    if not q.dtype == k.dtype == v.dtype:
        raise ValueError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if segment.shape != q.shape[:1]:
        raise ValueError(f"segment shape {segment.shape} != [P={q.shape[0]}]")
    for name, size in (("block_q", block_q), ("block_k", block_k)):
        if size < 16 or size & (size - 1):
            raise ValueError(f"{name}={size} must be a power of two >= 16")
    if q.shape[0] == 0:
        return q
    return _segment_attention(q, k, v, segment, block_q=block_q, block_k=block_k, warps=warps, stages=stages,
                              interpret=interpret)


def segment_attention_reference(q: jax.Array, k: jax.Array, v: jax.Array, segment: jax.Array) -> jax.Array:
    """The formula of the module docstring in plain jnp (dense float32 scores [H, P, P], keys of
    other segments masked): [P, H, Dh] in q's dtype. Any segment ids, runs or not."""
    scores = jnp.einsum("QHd,KHd->HQK", q, k, preferred_element_type=jnp.float32) * q.shape[-1] ** -0.5
    scores = jnp.where((segment[:, None] == segment[None, :])[None], scores, MASKED)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum("HQK,KHd->QHd", probs, v)
