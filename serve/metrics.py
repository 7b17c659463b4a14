"""Per-request and per-step serving metrics, and their summary.

Times are seconds on the engine's clock. A request's latency splits into queue time
(arrival -> first scheduled), time to first token, and time per output token.
"""

import dataclasses

import numpy as np

from valora_jax.lora import MODES


@dataclasses.dataclass
class RequestMetrics:
    adapter: str | None
    arrival: float
    prompt_tokens: int
    first_scheduled: float | None = None
    first_token: float | None = None
    finished: float | None = None
    output_tokens: int = 0
    preemptions: int = 0
    finish_reason: str | None = None

    @property
    def queue_time(self) -> float | None:
        return None if self.first_scheduled is None else self.first_scheduled - self.arrival

    @property
    def ttft(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.arrival

    @property
    def latency(self) -> float | None:
        return None if self.finished is None else self.finished - self.arrival

    @property
    def tpot(self) -> float | None:
        """Time per output token after the first."""
        if self.finished is None or self.first_token is None or self.output_tokens < 2:
            return None
        return (self.finished - self.first_token) / (self.output_tokens - 1)

    @property
    def token_latency(self) -> float | None:
        """End-to-end latency divided by output tokens (V-LoRA's average token latency)."""
        if self.latency is None:
            return None
        return self.latency / max(self.output_tokens, 1)


@dataclasses.dataclass(frozen=True)
class StepMetrics:
    start: float
    duration: float            # the whole step, switch and adapter loads included
    switch_time: float         # merging into the weights before the step
    mode: str
    merged_adapter: str | None
    decode_rows: int
    prefill_rows: int
    tokens: int                # valid tokens computed
    lora_tokens: float         # token-deltas the LoRA branch computed (CostModel units)
    adapters: int              # distinct adapters in the step
    compile_time: float = 0.0  # XLA compilation inside the step (a shape met for the first time)
    load_time: float = 0.0     # placing the step's adapters in slots, waiting for their copies (host time)
    kv_positions: int = 0      # cache positions the step's attention reads (each row's context + new tokens)
    padded_tokens: int = 0     # token positions the step's blocks hold, padding included (what the device runs)
    predicted_time: float = 0.0   # compute_time as the engine's step-time model (ours': the policy's) predicted
                                  # it before observing this step
    steps: int = 1             # decode steps the call ran (a decode loop: > 1, `tokens` counting all of them)

    @property
    def compute_time(self) -> float:
        """The step itself: its duration less the switch and the adapter loads before it."""
        return self.duration - self.switch_time - self.load_time


def _stats(values) -> dict:
    v = np.asarray([x for x in values if x is not None], np.float64)
    if not len(v):
        return {"mean": None, "p50": None, "p99": None}
    return {"mean": float(v.mean()), "p50": float(np.percentile(v, 50)), "p99": float(np.percentile(v, 99))}


def _step_means(steps: list[StepMetrics]) -> dict | None:
    """Mean compute time, rows, tokens and adapters of some steps (a decode loop's per step);
    None if none."""
    if not steps:
        return None
    mean = lambda f: float(np.mean([f(s) for s in steps]))
    return {"ms": 1e3 * mean(lambda s: s.compute_time / s.steps), "decode_rows": mean(lambda s: s.decode_rows),
            "prefill_rows": mean(lambda s: s.prefill_rows), "tokens": mean(lambda s: s.tokens / s.steps),
            "adapters": mean(lambda s: s.adapters)}


def summarize(requests: list[RequestMetrics], steps: list[StepMetrics]) -> dict:
    """Aggregate metrics: latency statistics, throughput and the mix of step modes."""
    done = [r for r in requests if r.finished is not None]
    span = (max(r.finished for r in done) - min(r.arrival for r in done)) if done else 0.0
    summed = sum(r.token_latency for r in done)
    return {
        "requests": len(requests), "finished": len(done),
        "token_latency": _stats(r.token_latency for r in done),
        # task-head answers output no token and count as one: their part of the average token latency
        "task_head_answers": sum(r.output_tokens == 0 for r in done),
        "task_head_share": sum(r.token_latency for r in done if r.output_tokens == 0) / summed if summed else None,
        "latency": _stats(r.latency for r in done),
        "ttft": _stats(r.ttft for r in done),
        "tpot": _stats(r.tpot for r in done),
        "queue_time": _stats(r.queue_time for r in done),
        "throughput_rps": len(done) / span if span > 0 else None,
        "output_tokens_per_s": sum(r.output_tokens for r in done) / span if span > 0 else None,
        "steps": sum(s.steps for s in steps),
        "mode_steps": {m: sum(s.steps for s in steps if s.mode == m) for m in MODES},
        "mode_step_means": {m: _step_means([s for s in steps if s.mode == m and not s.compile_time]) for m in MODES},
        "switches": sum(s.switch_time > 0 for s in steps),
        "switch_time": sum(s.switch_time for s in steps),
        "load_time": sum(s.load_time for s in steps),
        "compile_steps": sum(s.compile_time > 0 for s in steps),
        "compile_time": sum(s.compile_time for s in steps),
        "preemptions": sum(r.preemptions for r in requests),
    }
