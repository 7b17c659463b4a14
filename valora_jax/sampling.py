"""Token sampling: greedy, temperature and nucleus (top-p), with per-request seeds.

A request's random stream depends only on its own seed and on how many tokens it has
generated, never on which other requests share the batch.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np


def sample(logits: jax.Array, temperature: jax.Array, top_p: jax.Array, seed: jax.Array,
           step: jax.Array) -> jax.Array:
    """Next token per row.

    logits [B, V] float32; temperature [B] (0 = greedy); top_p [B] in (0, 1];
    seed [B] uint32; step [B] int32 (tokens generated so far) -> tokens [B] int32.
        greedy:  argmax(logits)
        else:    sample from softmax(logits / T) restricted to the smallest set of
                 most-probable tokens whose mass reaches top_p
    """
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    scaled = logits / jnp.maximum(temperature, 1e-6)[:, None]
    order = jnp.argsort(-scaled, axis=-1)                                   # [B, V]
    sorted_logits = jnp.take_along_axis(scaled, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs                        # exclusive cumsum
    sorted_logits = jnp.where(mass_before < top_p[:, None], sorted_logits, -jnp.inf)

    def draw(seed_b, step_b, row):
        key = jax.random.fold_in(jax.random.key(seed_b), step_b)
        return jax.random.categorical(key, row)

    choice = jax.vmap(draw)(seed, step, sorted_logits)                       # index into sorted
    sampled = jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)
    return jnp.where(temperature > 0, sampled, greedy)


@functools.partial(jax.jit, static_argnames="vocab_size")
def _sample_rows(logits, rows, temperature, top_p, seed, step, *, vocab_size: int):
    """sample() over logits[rows], ids >= vocab_size masked; rows [N] int32."""
    return sample(logits[rows].at[:, vocab_size:].set(-jnp.inf), temperature, top_p, seed, step)


def make_sampler(vocab_size: int, min_rows: int = 1):
    """sampler(logits [R, V], states, rows=None) -> np.ndarray [len(states)] of next tokens for
    logits[rows] (default: the first len(states) rows), drawing with each RequestState's own
    temperature, top_p, seed and step (= tokens generated so far); logits of ids >= vocab_size
    (padding rows of the embedding table) are never drawn. The row count is padded to a power
    of two >= min_rows, so a server compiles one sampler per bucket, shared by every sampler."""

    from valora_jax.runtime import bucket      # runtime samples inside its steps with sample()

    def sampler(logits: jax.Array, states, rows=None) -> np.ndarray:
        n = len(states)
        rows = np.arange(n) if rows is None else np.asarray(rows)
        pad = bucket(n, min_rows) - n
        reqs = [st.request for st in states]
        rows = np.concatenate([rows, np.zeros(pad, rows.dtype)]).astype(np.int32)
        temperature = np.array([r.temperature for r in reqs] + [0.0] * pad, np.float32)
        top_p = np.array([r.top_p for r in reqs] + [1.0] * pad, np.float32)
        seed = np.array([r.seed for r in reqs] + [0] * pad, np.uint32)
        step = np.array([len(st.out) for st in states] + [0] * pad, np.int32)
        return np.asarray(_sample_rows(logits, rows, temperature, top_p, seed, step, vocab_size=vocab_size))[:n]

    return sampler

