"""The online-softmax step the attention kernels share (flash attention's running statistics).

For query rows attending key blocks one at a time, the carry (m, l, acc) holds per row the
largest score so far, the sum of exp(score - m) and the float32 sum of exp(score - m) * value;
softmax-weighted values are acc / l once every block is in. Usable inside a Pallas kernel.
"""

import jax
import jax.numpy as jnp

MASKED = -1e30          # the score of a masked key: finite, so a fully masked block cannot make inf - inf


def init_carry(rows: int, head_dim: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(m [rows], l [rows], acc [rows, Dh]) before any block."""
    return (jnp.full((rows,), MASKED, jnp.float32), jnp.zeros((rows,), jnp.float32),
            jnp.zeros((rows, head_dim), jnp.float32))


def online_softmax_step(carry, s: jax.Array, v: jax.Array):
    """carry after one block: s [rows, BK] float32 scores (MASKED where masked), v [BK, Dh]."""
    m, l, acc = carry
    m_new = jnp.maximum(m, jnp.max(s, axis=1))
    p = jnp.exp(s - m_new[:, None])
    alpha = jnp.exp(m - m_new)
    acc = acc * alpha[:, None] + jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return m_new, l * alpha + jnp.sum(p, axis=1), acc
