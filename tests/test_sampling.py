"""Sampling: greedy, temperature, top-p, per-request seeds."""

import jax.numpy as jnp
import numpy as np

from valora_jax.sampling import sample


def _run(logits, temperature, top_p, seeds, step=0):
    """One draw per row; row i uses seeds[i] (an int gives every row the same seed)."""
    b = logits.shape[0]
    seeds = np.broadcast_to(np.asarray(seeds, np.uint32), (b,))
    return np.asarray(sample(jnp.asarray(logits, jnp.float32), jnp.full((b,), temperature, jnp.float32),
                             jnp.full((b,), top_p, jnp.float32), jnp.asarray(seeds), jnp.full((b,), step, jnp.int32)))


def test_greedy_is_argmax():
    logits = np.random.default_rng(0).standard_normal((5, 50))
    np.testing.assert_array_equal(_run(logits, 0.0, 1.0, 0), logits.argmax(-1))


def test_tiny_top_p_is_argmax():
    logits = np.random.default_rng(1).standard_normal((5, 50)) * 3
    np.testing.assert_array_equal(_run(logits, 1.0, 1e-6, np.arange(5)), logits.argmax(-1))


def test_top_p_keeps_only_the_nucleus():
    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]] * 400))
    draws = _run(logits, 1.0, 0.7, np.arange(400))
    assert set(draws.tolist()) == {0, 1}              # 0.5 + 0.3 reaches 0.7; 2 and 3 never drawn


def test_samples_follow_the_distribution():
    p = np.array([0.6, 0.3, 0.1])
    draws = _run(np.log(np.tile(p, (3000, 1))), 1.0, 1.0, np.arange(3000))
    np.testing.assert_allclose(np.bincount(draws, minlength=3) / 3000, p, atol=0.03)
    hot = _run(np.log(np.tile(p, (3000, 1))), 0.25, 1.0, np.arange(3000))   # p^4, renormalised
    np.testing.assert_allclose(np.bincount(hot, minlength=3) / 3000, p**4 / (p**4).sum(), atol=0.03)


def test_stream_depends_on_seed_and_step_only():
    logits = np.zeros((1, 1000))
    a = [_run(logits, 1.0, 1.0, 5, step)[0] for step in range(6)]
    b = [_run(np.zeros((4, 1000)), 1.0, 1.0, [5, 1, 2, 3], step)[0] for step in range(6)]
    c = [_run(logits, 1.0, 1.0, 6, step)[0] for step in range(6)]
    assert a == b and a != c and len(set(a)) > 1
