"""Token sampling: greedy, temperature and nucleus (top-p), with per-request seeds.

A request's random stream depends only on its own seed and on how many tokens it has
generated, never on which other requests share the batch.
"""

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
