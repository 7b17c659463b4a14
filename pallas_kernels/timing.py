"""Bulk device timing for kernels (used by the tile profiler and bench/).

One host dispatch per timed call measures the launcher, not the kernel. So time_op runs

    for i in range(n): for args in arg_sets: out = fn(*args)     # one jitted fori_loop

over distinct argument sets (pass enough of them to exceed the L2 cache), each call made to
depend on the previous output (`_chain`: its last input array gets `+ (o != o)` for one output
element o, which is 0 but cannot be folded away), so XLA can neither drop a call whose result
is unused, merge calls, nor hoist one out of the loop. That costs one tiny extra kernel per
call: `harness_overhead` measures it. Reports the median over repeats of (wall time / calls).
"""

import concurrent.futures
import functools
import itertools
import time

import jax
import jax.numpy as jnp
import numpy as np


def _chain(args, out):
    """args with its last array plus (o != o), o = one element of out: a data dependency."""
    leaves, tree = jax.tree.flatten(args)
    o = jax.tree.leaves(out)[0].reshape(-1)[0]
    leaves[-1] = leaves[-1] + (o != o).astype(leaves[-1].dtype)
    return jax.tree.unflatten(tree, leaves)


def bulk_loop(fn, sets):
    """jit(run)(n, sets): n iterations of `for args in sets: out = fn(*_chain(args, out))`."""
    fn = jax.jit(fn)                     # traced and lowered once, called len(sets) times

    def run(n, sets):
        out = jax.eval_shape(fn, *sets[0])
        carry = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), out)

        def body(_, carry):
            for args in sets:
                carry = fn(*_chain(args, carry))
            return carry

        return jax.lax.fori_loop(0, n, body, carry)

    return jax.jit(run)


class BulkTimer:
    """fn's bulk loop over arg_sets (see the module docstring), compiled once, timed on demand.

    Each loop iteration makes max(unroll, len(arg_sets)) chained calls, on arg_sets topped up
    with device copies of them; the loop's own cost, a few us per iteration, is spread over
    them. fn must use its last input array (the one _chain perturbs; best a small one, e.g.
    the slot ids). compile() is safe to call from worker threads (see compile_all).
    """

    def __init__(self, fn, arg_sets, *, unroll: int = 16):
        copy = lambda args: jax.tree.map(lambda a: jnp.array(a, copy=True), args)
        self.sets = [arg_sets[i] if i < len(arg_sets) else copy(arg_sets[i % len(arg_sets)])
                     for i in range(max(unroll, len(arg_sets)))]
        self._lowered = bulk_loop(fn, self.sets).lower(jnp.int32(1), self.sets)
        self._compiled = None

    def compile(self) -> "BulkTimer":
        if self._compiled is None:
            self._compiled = self._lowered.compile()
        return self

    def seconds(self, *, target_s: float = 0.01, repeats: int = 3) -> float:
        """Median seconds per fn(*args) call; the trip count makes one timed run ~target_s."""
        f = self.compile()._compiled

        def wall(n):
            t0 = time.perf_counter()
            jax.block_until_ready(f(jnp.int32(n), self.sets))
            return time.perf_counter() - t0

        wall(1)                                           # warm up
        n = max(1, min(100_000, int(target_s / wall(1))))
        n = max(1, min(100_000, int(n * target_s / wall(n))))
        return float(np.median([wall(n) for _ in range(repeats)])) / (n * len(self.sets))


def compile_all(jobs, threads: int = 16):
    """Yield (key, compiled BulkTimer, or the exception making or compiling it raised) for
    (key, make_timer) jobs in order, compiled in batches.

    jobs is consumed lazily, `threads` at a time: make_timer() (tracing and lowering) runs on
    the caller's thread, then the batch compiles on `threads` workers (XLA/Triton compilation
    is the slow part), then its timers are yielded. Nothing compiles while the caller times
    (host contention would slow the timing loop's per-iteration launches).
    """
    def make_or_error(make):
        try:
            return make()
        except Exception as e:                    # e.g. an op refusing the shape while tracing
            return e

    jobs = iter(jobs)
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        while batch := [(key, make_or_error(make)) for key, make in itertools.islice(jobs, threads)]:
            futures = [(key, timer if isinstance(timer, Exception) else pool.submit(timer.compile))
                       for key, timer in batch]
            done = [(key, f if isinstance(f, Exception) else f.exception() or f.result()) for key, f in futures]
            del batch, futures                    # each timer (and its inputs) lives until yielded
            while done:
                yield done.pop(0)


def net_us(fns: dict, arg_sets, harness_s: float, *, unroll: int = 4, target_s: float = 0.05) -> dict:
    """{name: net microseconds per call of fns[name] over arg_sets (BulkTimer, less the harness's
    harness_s), or the error that made it fail, as one line}, every variant compiled by compile_all."""
    jobs = [(name, functools.partial(BulkTimer, fn, arg_sets, unroll=unroll)) for name, fn in fns.items()]
    return {name: f"{type(timer).__name__}: {str(timer).splitlines()[0][:160]}" if isinstance(timer, Exception)
            else (timer.seconds(target_s=target_s) - harness_s) * 1e6 for name, timer in compile_all(jobs)}


def time_op(fn, arg_sets, *, target_s: float = 0.01, repeats: int = 3, unroll: int = 16) -> float:
    """Median seconds per fn(*args) call (BulkTimer, compiled and timed at once)."""
    return BulkTimer(fn, arg_sets, unroll=unroll).seconds(target_s=target_s, repeats=repeats)


def harness_overhead(unroll: int = 16) -> float:
    """Seconds time_op adds per call (the chaining kernel and the amortised loop)."""
    slot = jnp.zeros((256,), jnp.int32)
    return time_op(lambda s: (s,), [(slot,)], unroll=unroll)


def copy_bandwidth(n_bytes: int = 4 << 30) -> float:
    """Measured device copy bandwidth, bytes read + written per second."""
    x, tick = jnp.ones((n_bytes // 4,), jnp.float32), jnp.zeros((1,), jnp.float32)
    seconds = time_op(lambda x, tick: x + tick, [(x, tick)], target_s=0.05, repeats=5, unroll=1)
    return 2 * n_bytes / seconds
