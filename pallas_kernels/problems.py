"""Serving-shaped ATMM problems for timing (the tile profiler and bench/kernels.py).

Tokens come as requests: `requests` contiguous runs of equal length (decode: one token per
request), each request's adapter drawn from the `adapters` slots by a distribution:
uniform, skewed (80% of the requests use one hot adapter) or distinct (request r -> r % S).
"""

import dataclasses

import jax.numpy as jnp
import numpy as np

from pallas_kernels.lora_reference import LoraWeight

RANK_MIX = (16, 32, 64, 128)


@dataclasses.dataclass(frozen=True)
class Shape:
    """One timed problem."""

    tokens: int
    d_in: int
    d_out: int
    rank: int | str = 16
    """Every adapter's rank, or 'mixed' (ranks cycle through RANK_MIX with R = 128)."""
    adapters: int = 8
    """Slots S of the pool; all of them hold an adapter."""
    dist: str = "uniform"
    requests: int | None = None
    """Requests in the batch; None = one per token up to T = 256 (decode), else T // 640 (prefill
    with 576 image tokens per request)."""
    n_weights: int = 1
    """Weights sharing x (3 = q/k/v)."""

    @property
    def max_rank(self) -> int:
        return 128 if self.rank == "mixed" else int(self.rank)

    @property
    def n_requests(self) -> int:
        if self.requests is not None:
            return self.requests
        return self.tokens if self.tokens <= 256 else max(1, self.tokens // 640)

    def ranks(self) -> np.ndarray:
        if self.rank == "mixed":
            return np.resize(np.array(RANK_MIX), self.adapters)
        return np.full(self.adapters, int(self.rank))

    def slot(self, seed: int = 0) -> np.ndarray:
        rng = np.random.default_rng(seed)
        n, s = self.n_requests, self.adapters
        if self.dist == "distinct":
            per_req = np.arange(n) % s
        elif self.dist == "skewed":
            per_req = np.where(rng.random(n) < 0.8, 0, rng.integers(0, s, n))
        else:
            per_req = rng.integers(0, s, n)
        lengths = np.full(n, self.tokens // n)
        lengths[: self.tokens - lengths.sum()] += 1
        return np.repeat(per_req, lengths).astype(np.int32)

    def used_slots(self, seed: int = 0) -> np.ndarray:
        return np.unique(self.slot(seed))

    def label(self) -> str:
        w = f"x{self.n_weights}" if self.n_weights > 1 else ""
        return (f"T{self.tokens} {self.d_in}->{self.d_out}{w} r{self.rank} "
                f"S{self.adapters} {self.dist} req{self.n_requests}")


def make_inputs(shape: Shape, seed: int = 0, dtype=jnp.bfloat16):
    """(x [T, D_in], weights, slot [T]) with random data; padding beyond each rank is zero."""
    rng = np.random.default_rng(seed)
    r, s, ranks = shape.max_rank, shape.adapters, shape.ranks()
    keep = (np.arange(r)[None, :] < ranks[:, None])                      # [S, R]
    x = jnp.asarray(rng.standard_normal((shape.tokens, shape.d_in), np.float32), dtype)
    weights = []
    for _ in range(shape.n_weights):
        a = rng.standard_normal((s, shape.d_in, r), np.float32) * keep[:, None, :] / np.sqrt(shape.d_in)
        b = rng.standard_normal((s, r, shape.d_out), np.float32) * keep[:, :, None] / np.sqrt(r)
        weights.append(LoraWeight(jnp.asarray(a, dtype), jnp.asarray(b, dtype),
                                  jnp.full((s,), 2.0, jnp.float32), jnp.asarray(ranks, jnp.int32)))
    return x, tuple(weights), jnp.asarray(shape.slot(seed))


def floor_bytes(shape: Shape, seed: int = 0, itemsize: int = 2) -> int:
    """Bytes that must move: x, the used adapters at their true rank, the outputs, the slot ids."""
    used = shape.used_slots(seed)
    rank_sum = int(shape.ranks()[used].sum())
    per_weight = rank_sum * (shape.d_in + shape.d_out) + shape.tokens * shape.d_out
    return itemsize * (shape.tokens * shape.d_in + shape.n_weights * per_weight) + 4 * shape.tokens


def flops(shape: Shape, seed: int = 0) -> int:
    """Useful floating-point work: 2 * r(t) * (D_in + D_out) per token t and weight, r(t) the true
    rank of the token's adapter."""
    per_token_rank = int(shape.ranks()[shape.slot(seed)].sum())
    return 2 * per_token_rank * (shape.d_in + shape.d_out) * shape.n_weights
