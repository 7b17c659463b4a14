"""The engine behind the HTTP server: one background thread owns the Engine.

The Engine is not thread-safe, so every call into it runs on that thread: request handlers
queue commands (`run` / `call`) that the thread executes between steps, and the thread steps
while there is work and otherwise sleeps on a condition. Engine events reach asyncio through
`loop.call_soon_threadsafe` into one asyncio.Queue per request. The thread also feeds the
Prometheus metrics (request latencies, steps, mode switches, queue depth, adapter slots).

    handler --run(fn)--> commands --engine thread: fn(engine); step(); metrics--> events --> queue
"""

import asyncio
import concurrent.futures
import dataclasses
import logging
import threading
import time
from typing import Any, Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from serve.engine import Engine
from valora_jax.adapters import Adapter, layout_of
from valora_jax.request import Completion, Request
from valora_jax.runtime import compile_lowered

log = logging.getLogger("valora.serve")

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120, 300)
_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)


class ShuttingDown(RuntimeError):
    """The service no longer accepts requests (the server answers 503)."""


class UnknownModel(ValueError):
    """A request named a model that is neither the base model nor a loaded adapter (404)."""


class _Metrics:
    """The Prometheus series, in their own registry (several servers may live in one process)."""

    def __init__(self, max_loras: int):
        r = self.registry = CollectorRegistry()
        self.finished = Counter("valora_requests_finished", "Requests the engine finished, by finish reason",
                                ["finish_reason"], registry=r)
        self.http = Counter("valora_http_requests", "HTTP requests by endpoint and status code",
                            ["endpoint", "status"], registry=r)
        self.latency = Histogram("valora_request_latency_seconds", "Arrival to completion",
                                 buckets=_LATENCY_BUCKETS, registry=r)
        self.queue_time = Histogram("valora_request_queue_seconds", "Arrival to first scheduled step",
                                    buckets=_LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("valora_time_to_first_token_seconds", "Arrival to first output token",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("valora_time_per_output_token_seconds", "Time per output token after the first",
                              buckets=_TOKEN_BUCKETS, registry=r)
        self.steps = Counter("valora_steps", "Engine steps, by mode", ["mode"], registry=r)
        self.switches = Counter("valora_mode_switches", "Steps that re-merged the weights first", registry=r)
        self.switch_time = Counter("valora_mode_switch_seconds", "Time spent merging weights", registry=r)
        self.load_time = Counter("valora_adapter_load_seconds", "Time spent placing adapters in device slots",
                                 registry=r)
        self.compiling_steps = Counter("valora_compiling_steps", "Steps that compiled a shape while serving "
                                       "(one start-up did not precompile)", registry=r)
        self.compile_time = Counter("valora_compile_seconds", "XLA compilation inside serving steps", registry=r)
        self.preemptions = Counter("valora_preemptions", "Requests preempted for KV-cache pages", registry=r)
        self.output_tokens = Counter("valora_output_tokens", "Generated tokens", registry=r)
        self.waiting = Gauge("valora_queue_depth", "Requests waiting to start", registry=r)
        self.running = Gauge("valora_running_requests", "Requests started and not finished", registry=r)
        self.kv_pages_used = Gauge("valora_kv_pages_used", "KV-cache pages held by live requests", registry=r)
        self.slots_used = Gauge("valora_adapter_slots_used", "Device adapter slots holding an adapter", registry=r)
        self.slots = Gauge("valora_adapter_slots", "Device adapter slots (max_loras)", registry=r)
        self.adapters = Gauge("valora_adapters_loaded", "Adapters registered (host store)", registry=r)
        self.step_failures = Counter("valora_step_failures", "Engine steps that raised (each then retried row by "
                                     "row, failing only the requests that fail alone)", registry=r)
        self.policy_failures = Counter("valora_policy_failures",
                                       "Scheduling decisions that raised (those steps ran unmerged)", registry=r)
        self.slots.set(max_loras)


class EngineService:
    """Runs an Engine on one background thread; asyncio handlers talk to it through `run`,
    `submit` and `cancel`. `model_name` is the base model's name in the API."""

    def __init__(self, engine: Engine, model_name: str | None = None, stall_after_s: float = 120.0):
        """stall_after_s: a step running longer than this makes `health` report the engine stalled."""
        self.engine, self.stall_after_s = engine, stall_after_s
        self.model_name = model_name or engine.runner.config.name
        self.metrics = _Metrics(engine.runner.config.lora.max_loras)
        self.adapters: tuple[str, ...] = tuple(sorted(engine.pool.store))   # snapshot, replaced on change
        self.queued = 0                        # requests waiting to start (snapshot, engine thread)
        self.admitting = 0                     # requests being prepared or submitted (event loop)
        self.last_error: str | None = None
        self._failing_steps = 0                # steps failed in a row (0 once one succeeds)
        self._step_started: float | None = None    # time.monotonic() of the step under way
        self._policy_failures = 0              # engine.policy_failures already counted
        self._step_failures = 0                # engine.step_failures already counted
        self._cond = threading.Condition()
        self._commands: list[tuple[Callable[[Engine], Any], concurrent.futures.Future]] = []
        self._live: set[str] = set()           # ids submitted and not finished (engine thread only)
        self._failed: dict[str, str] = {}      # request id -> why the engine failed it
        self._thread: threading.Thread | None = None
        self._draining = False
        self._stopping = False
        self._exited = False
        self._update_gauges()

    # lifecycle ----------------------------------------------------------------------------------
    def start(self) -> None:
        with self._cond:
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="valora-engine", daemon=True)
                self._thread.start()

    def begin_drain(self) -> None:
        """Refuse new requests (ShuttingDown); live ones run to completion."""
        self._draining = True

    def stop(self, timeout: float | None = None) -> None:
        """Refuse new requests, let the thread finish every live request, and join it."""
        self._draining = True
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def draining(self) -> bool:
        return self._draining

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    def health(self) -> tuple[bool, dict]:
        """(healthy, report): unhealthy while shutting down, while the last step failed (raised, or
        ran none of its rows: Engine.failing_steps), or while a step has run longer than
        stall_after_s."""
        started = self._step_started
        running = time.monotonic() - started if started is not None else 0.0
        failing = self._failing_steps + self.engine.failing_steps
        report = {"model": self.model_name, "adapters": len(self.adapters),
                  "last_error": self.last_error or self.engine.last_step_error,
                  "failing_steps": failing, "step_running_s": round(running, 3)}
        if self._draining or not self.alive:
            return False, {"status": "shutting down", **report}
        if failing:
            return False, {"status": "failing", **report}
        if running > self.stall_after_s:
            return False, {"status": "stalled", **report}
        return True, {"status": "ok", **report}

    # commands -----------------------------------------------------------------------------------
    def call(self, fn: Callable[[Engine], Any]) -> concurrent.futures.Future:
        """Queue fn(engine) for the engine thread; the future carries its result or exception.
        Raises ShuttingDown once the thread has exited (or before it started)."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._cond:
            if self._exited or self._thread is None:
                raise ShuttingDown("the server is shutting down")
            self._commands.append((fn, future))
            self._cond.notify()
        return future

    async def run(self, fn: Callable[[Engine], Any]) -> Any:
        """Await fn(engine) run on the engine thread."""
        return await asyncio.wrap_future(self.call(fn))

    async def submit(self, request: Request, request_id: str) -> asyncio.Queue:
        """Queue a request; returns the asyncio.Queue that receives (text_delta, completion | None)
        events, the completion on the last. Raises UnknownModel, ValueError, Overloaded, ShuttingDown."""
        if self._draining:
            raise ShuttingDown("the server is shutting down")
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def on_event(rid: str, delta: str, completion: Completion | None) -> None:   # engine thread
            try:
                if completion is not None:
                    self.engine.result(rid, pop=True)
                    self._live.discard(rid)
                    if rid in self._failed:
                        completion = dataclasses.replace(completion, finish_reason="error",
                                                         error=self._failed.pop(rid))
                loop.call_soon_threadsafe(events.put_nowait, (delta, completion))
            except RuntimeError:        # the event loop is closed: nobody is listening any more
                pass

        prepared = await asyncio.to_thread(self.engine.prepare, request)   # its CPU work, off the engine thread

        def submit(engine: Engine) -> str:
            if request.adapter is not None and request.adapter not in engine.pool.store:
                raise UnknownModel(f"the model {request.adapter!r} does not exist; models: "
                                   f"{[self.model_name, *sorted(engine.pool.store)]}")
            rid = engine.submit(prepared, on_event, request_id)
            self._live.add(rid)
            return rid

        await self.run(submit)
        return events

    def cancel(self, request_id: str) -> None:
        """Cancel a live request (no-op if it finished); does not wait."""
        try:
            self.call(lambda engine: engine.cancel(request_id))
        except ShuttingDown:
            pass

    async def register_adapter(self, adapter: Adapter) -> int:
        """Load or replace an adapter; returns its version. Where the engine precompiles, the slot
        write of the adapter's layout is compiled before this returns, on a thread of its own (a
        write of a new layout then stalls no step)."""
        def register(engine: Engine) -> int:
            version = engine.register_adapter(adapter)          # validates: a bad adapter compiles nothing
            self.adapters = tuple(sorted(engine.pool.store))
            return version

        version = await self.run(register)
        if self.engine.config.precompile:
            await asyncio.to_thread(compile_lowered, self.engine.runner.lower_writes([layout_of(adapter)]), 1)
        return version

    async def unregister_adapter(self, name: str) -> None:
        """Raises UnknownModel, or AdapterInUse while live requests use it."""
        def unregister(engine: Engine) -> None:
            if name not in engine.pool.store:
                raise UnknownModel(f"adapter {name!r} is not loaded; loaded: {sorted(engine.pool.store)}")
            engine.unregister_adapter(name)
            self.adapters = tuple(sorted(engine.pool.store))

        await self.run(unregister)

    # the engine thread --------------------------------------------------------------------------
    def _loop(self) -> None:
        idle = False
        while True:
            with self._cond:
                while not self._commands and not self._stopping and (idle or not self.engine.has_work):
                    self._cond.wait(0.005 if idle else None)
                    idle = False
                commands, self._commands = self._commands, []
                if self._stopping and not commands and not self.engine.has_work:
                    self._exited = True
                    return
            for fn, future in commands:
                if future.set_running_or_notify_cancel():
                    try:
                        future.set_result(fn(self.engine))
                    except BaseException as e:     # handed to the caller
                        future.set_exception(e)
            idle = self.engine.has_work and self._step() is None and not self.engine.in_flight
            try:
                self._update_gauges()
            except Exception:                      # metrics must never stop the engine
                log.exception("updating metrics failed")

    def _step(self):
        """One engine step; if it raises, every live request fails with the error (a scheduling
        fault fails none: the engine runs that step unmerged)."""
        self._step_started = time.monotonic()
        try:
            step = self.engine.step()
            if step is not None:                   # a step that ran: the engine works again
                self._failing_steps = 0
            return step
        except Exception as e:
            log.exception("engine step failed")
            self.last_error = f"{type(e).__name__}: {e}"
            self._failing_steps += 1
            self.metrics.step_failures.inc()
            for rid in list(self._live):
                self._failed[rid] = f"engine step failed: {self.last_error}"
                self.engine.cancel(rid)
            return None
        finally:
            self._step_started = None

    def _update_gauges(self) -> None:
        """Move finished request metrics and step metrics into Prometheus (the engine's lists stay short)."""
        m, engine = self.metrics, self.engine
        for s in engine.step_metrics:
            m.steps.labels(s.mode).inc(s.steps)
            if s.switch_time > 0:
                m.switches.inc()
                m.switch_time.inc(s.switch_time)
            m.load_time.inc(s.load_time)
            if s.compile_time > 0:
                m.compiling_steps.inc()
                m.compile_time.inc(s.compile_time)
                log.warning("a %s step of %d decode and %d prefill rows compiled for %.2f s while serving",
                            s.mode, s.decode_rows, s.prefill_rows, s.compile_time)
        engine.step_metrics.clear()
        if engine.policy_failures > self._policy_failures:
            m.policy_failures.inc(engine.policy_failures - self._policy_failures)
            self._policy_failures = engine.policy_failures
            self.last_error = f"policy: {engine.last_policy_error}"
        if engine.step_failures > self._step_failures:
            m.step_failures.inc(engine.step_failures - self._step_failures)
            self._step_failures = engine.step_failures
        live = []
        for r in engine.request_metrics:
            if r.finished is None:
                live.append(r)
                continue
            m.finished.labels(r.finish_reason).inc()
            m.preemptions.inc(r.preemptions)
            m.output_tokens.inc(r.output_tokens)
            for hist, value in ((m.latency, r.latency), (m.queue_time, r.queue_time), (m.ttft, r.ttft),
                                (m.tpot, r.tpot)):
                if value is not None:
                    hist.observe(value)
        engine.request_metrics[:] = live
        m.kv_pages_used.set(engine.allocator.num_pages - 1 - engine.allocator.num_free)
        waiting = self.queued = engine.waiting
        m.waiting.set(waiting)
        m.running.set(engine.live - waiting)
        m.slots_used.set(len(engine.pool.resident))
        m.adapters.set(len(engine.pool.store))
        self.adapters = tuple(sorted(engine.pool.store))
