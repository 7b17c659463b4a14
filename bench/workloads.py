"""Request traces for end-to-end benchmarks, and their replay through an engine.

A trace is a list of (arrival seconds, Request). Arrivals are Poisson or bursty (gamma
inter-arrival times with coefficient of variation 2); adapter popularity is one hot adapter
taking 50/60/80% of requests (the rest uniform), Zipf(1.5) or uniform. Two request kinds:
  vqa    one image, a ~50-token question, 40-120 output tokens;
  video  6 frames; adapters with a task head answer in one pass, others give 4-12 tokens.
`replay` feeds a trace to an engine in real time, except that idle gaps before the next
arrival are skipped on the engine's clock (every step still runs for real).
"""

import dataclasses
import gc
import time

import numpy as np

from valora_jax import Request

POPULARITY = ("hot50", "hot60", "hot80", "zipf1.5", "uniform")
ARRIVALS = ("poisson", "bursty")
KINDS = ("vqa", "video")
IMAGES = {"vqa": 1, "video": 6}       # images (frames) per request of each kind


@dataclasses.dataclass(frozen=True)
class Workload:
    kind: str = "vqa"
    rate: float = 4.0                 # requests per second
    arrival: str = "poisson"
    popularity: str = "hot80"
    num_requests: int = 100
    seed: int = 0

    def __post_init__(self):
        for name, value, allowed in (("kind", self.kind, KINDS), ("arrival", self.arrival, ARRIVALS),
                                     ("popularity", self.popularity, POPULARITY)):
            if value not in allowed:
                raise ValueError(f"unknown {name} {value!r}; expected one of {allowed}")
        if self.rate <= 0 or self.num_requests < 1:
            raise ValueError(f"need rate > 0 and num_requests >= 1, got {self.rate}, {self.num_requests}")


def arrival_times(w: Workload, rng: np.random.Generator) -> np.ndarray:
    """Arrival seconds [num_requests], mean rate w.rate."""
    if w.arrival == "poisson":
        gaps = rng.exponential(1.0 / w.rate, w.num_requests)
    else:                                          # gamma with cv = 2: shape 1/cv^2
        shape = 0.25
        gaps = rng.gamma(shape, 1.0 / (w.rate * shape), w.num_requests)
    return np.cumsum(gaps) - gaps[0]


def adapter_probabilities(popularity: str, n: int) -> np.ndarray:
    if popularity.startswith("hot"):
        hot = int(popularity[3:]) / 100
        p = np.full(n, (1 - hot) / max(n - 1, 1))
        p[0] = hot if n > 1 else 1.0
    elif popularity.startswith("zipf"):
        p = 1.0 / np.arange(1, n + 1) ** float(popularity[4:])
    else:
        p = np.ones(n)
    return p / p.sum()


def make_trace(w: Workload, adapters: list[str], image_size: int, headed: set[str] = frozenset()
               ) -> list[tuple[float, Request]]:
    """The workload's requests over `adapters` (adapters[0] is the hot one)."""
    rng = np.random.default_rng(w.seed)
    times = arrival_times(w, rng)
    choice = rng.choice(len(adapters), w.num_requests, p=adapter_probabilities(w.popularity, len(adapters)))
    words = ["where", "is", "the", "red", "car", "count", "people", "near", "door", "what", "colour", "left"]
    trace = []
    for t, a in zip(times, choice):
        name = adapters[a]
        images = [rng.integers(0, 256, (image_size, image_size, 3), dtype=np.uint8) for _ in range(IMAGES[w.kind])]
        question = " ".join(rng.choice(words, 10))          # ~50 byte tokens
        if w.kind == "vqa":
            max_tokens = int(rng.integers(40, 121))
        else:
            max_tokens = 1 if name in headed else int(rng.integers(4, 13))
        trace.append((float(t), Request(question, images, adapter=name, max_tokens=max_tokens, ignore_eos=True,
                                        seed=int(rng.integers(1 << 31)))))
    return trace


class SkippingClock:
    """perf_counter plus the idle time skipped so far."""

    def __init__(self):
        self.offset = -time.perf_counter()

    def __call__(self) -> float:
        return time.perf_counter() + self.offset

    def skip_to(self, t: float) -> None:
        self.offset += max(0.0, t - self())

    def restart(self) -> None:
        """Read 0 now."""
        self.offset = -time.perf_counter()


class GcPauses:
    """Python's garbage collections while in use (`with GcPauses(clock) as gc_pauses:`): their
    total and longest time, and each one of at least `log_s` as [clock time, seconds, generation]
    (a collection stops every thread, the serving loop's too)."""

    def __init__(self, clock, log_s: float = 1e-3):
        self.clock, self.log_s = clock, log_s
        self.total_s, self.max_s, self.pauses = 0.0, 0.0, []
        self._started = (0.0, 0.0)

    def _on_gc(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._started = (time.perf_counter(), self.clock())
            return
        seconds = time.perf_counter() - self._started[0]
        self.total_s, self.max_s = self.total_s + seconds, max(self.max_s, seconds)
        if seconds >= self.log_s:
            self.pauses.append([self._started[1], seconds, info["generation"]])

    def __enter__(self) -> "GcPauses":
        gc.callbacks.append(self._on_gc)
        return self

    def __exit__(self, *exc) -> None:
        gc.callbacks.remove(self._on_gc)


def replay(engine, trace: list[tuple[float, Request]], clock: SkippingClock) -> list[str]:
    """Submit each request when the clock reaches its arrival (backdated to it) and step the
    engine until everything finished; returns the request ids in trace order. Requests are
    prepared (checked, tokenised, images preprocessed and hashed) beforehand, as a server's
    request threads prepare them beside the engine's (`Engine.prepare`); the clock starts at 0
    once they are, so no request waits for another's preparation."""
    trace = [(t, engine.prepare(r)) for t, r in trace]
    clock.restart()
    ids, i = [], 0
    while i < len(trace) or engine.has_work:
        now = clock()
        while i < len(trace) and trace[i][0] <= now:
            ids.append(engine.submit(trace[i][1], arrival=trace[i][0]))
            i += 1
        if engine.has_work:
            engine.step()
        elif i < len(trace):
            clock.skip_to(trace[i][0])
    return ids
