"""The serving engine: continuous batching over the jitted steps, with mode orchestration.

Each `step()`:
  1. the policy picks a mode (unmerged | merged a | mixture a) and the rows to run
     (decode rows and prefill chunks, within the engine's limits);
  2. the rows' adapters are placed in device slots (a failed load fails only its requests)
     and, if the merged adapter changes, every targeted weight is re-merged in one call;
  3. KV pages are allocated for the new tokens (policies start a prompt only when the pages
     of all of it are free), preempting (for recompute) the newest requests when the running
     ones outgrow the cache;
  4. images of newly started requests are encoded (cached by image hash and vision adapter);
  5. one jitted call is dispatched for the decode block and the prefill block (each prefill
     chunk in whole rows of `prefill_width` tokens); rows that reached the end of their known
     tokens sample a token, task-head adapters answer after their prefill;
  6. the tokens of the step dispatched before are read and applied (stop rules, streams), while
     the device runs this one: a decode row whose token is still on the device takes it there
     (runtime.Feed), so the host's work on a step overlaps the device's on the step before.
Requests are submitted at any time (`submit`) and followed through `result` or an
`on_event(request_id, text_delta, completion)` callback (completion is set on the last one).
A request's CPU work (checks, tokenisation, image preprocessing and hashing) can be done first
on any thread (`prepare`), so that the thread stepping the engine does not wait for it.
"""

import collections
import dataclasses
import functools
import hashlib
import itertools
import logging
import math
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from serve.config import EngineConfig
from serve.metrics import RequestMetrics, StepMetrics, summarize
from serve.policies import (SYSTEMS, BatchLimits, CostModel, Decision, Policy, ProbePolicy, SchedulerState,
                            SeqView, pack)
from valora_jax.adapters import Adapter, AdapterPool, PoolFull
from valora_jax.kv_cache import PageAllocator, init_pages
from valora_jax.lora import PAD_SLOT
from valora_jax.request import Completion, Request, RequestState
from valora_jax.blocks import RowSpec, bucket, pack_block, split_row
from valora_jax.runtime import Feed, ImageFeatures, ModelRunner, Sampling, compile_seconds
from valora_jax.tokenizer import ByteTokenizer

log = logging.getLogger("valora.engine")


@functools.partial(jax.jit, donate_argnums=0, static_argnums=4)
def _copy_rows(buffer: jax.Array, source: jax.Array, src: jax.Array, dst: jax.Array, size: int,
               count: jax.Array) -> jax.Array:
    """buffer [F, D] (donated) with rows src..src+count-1 of source [R, D] written from row dst
    on (count <= size; one compile per buffer, source and size bucket, whatever the offsets)."""
    i = jnp.arange(size)
    rows = jnp.take(source, jnp.minimum(src + i, source.shape[0] - 1), axis=0).astype(buffer.dtype)
    return buffer.at[jnp.where(i < count, dst + i, buffer.shape[0])].set(rows, mode="drop", unique_indices=True)


@dataclasses.dataclass(frozen=True)
class PreparedRequest:
    """A request checked against the model, tokenised, its images preprocessed (read-only
    pixels: RequestState's) and hashed (sha256 per image): what `Engine.prepare` returns."""

    request: Request
    prompt_ids: tuple[int, ...]
    image_rows: tuple[int, ...]
    pixels: np.ndarray | tuple[np.ndarray, ...]
    digests: tuple[str, ...]
    grids: tuple[tuple[int, int, int], ...] = ()
    rope: np.ndarray | None = None
    rope_delta: int = 0


class Overloaded(RuntimeError):
    """The queue is full; the request was not accepted (the server answers 429)."""


class AdapterInUse(RuntimeError):
    """An adapter cannot be removed while live requests use it (the server answers 409)."""


@dataclasses.dataclass
class _Seq:
    id: str
    state: RequestState
    metrics: RequestMetrics
    on_event: Callable | None
    pages: list[int] = dataclasses.field(default_factory=list)
    computed: int = 0                         # tokens whose keys/values are in the cache
    features: tuple[ImageFeatures, ...] | None = None   # per image, once encoded
    served: float = 0.0                       # seconds of the steps it ran in
    cancelled: bool = False
    digests: tuple[str, ...] = ()             # sha256 of each preprocessed image
    stream: object = None                     # incremental detokenizer for on_event
    adapter: tuple[str, int] | None = None    # (name, version) fixed at submission
    output_tokens: int = 1                    # the most it outputs: 1 for a task head's answer
    faults: int = 0                           # failed steps it ran in that lost the KV cache (two fail it)
    inflight: int = 0                         # its tokens sampled by the dispatched step, not read yet
    inflight_row: int = -1                    # where the last of them stands in that step's tokens
    epoch: int = 0                            # bumped when it recomputes: tokens of older steps are dropped

    @property
    def pending(self) -> int:
        """Tokens not yet in the KV cache (the last in-flight token counts, as it will be known)."""
        return len(self.state.tokens) + self.inflight - self.computed

    @property
    def generated(self) -> int:
        """Tokens it has output, those in flight included."""
        return len(self.state.out) + self.inflight


@dataclasses.dataclass
class _Dispatched:
    """A step on the device whose tokens the host has not read yet. takes: (seq, row, tokens, epoch)
    for each row whose step ends its known tokens (row: its column of `tokens`; tokens: how many it
    samples; epoch: the request's, at dispatch); tokens: [steps, R] device array ([R]: one step); feed: the next
    step's feed tokens [L]; hidden [R, D] when some row answers with a task head (heads: seq id
    -> head); metrics: StepMetrics fields but the duration."""

    takes: list
    tokens: jax.Array
    feed: jax.Array
    hidden: jax.Array | None
    heads: dict
    metrics: dict
    seqs: list                    # every row's request
    features: np.ndarray | None = None   # what the step-time model learns it from (None: nothing)


class ImageCache:
    """LRU of image features (ImageFeatures) keyed by (pixel digest, vision adapter identity). A
    Qwen-VL image's features keep its encoder call's output alive (at most ENCODER_PATCHES / 4
    rows) until the last image of that call leaves."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._entries: collections.OrderedDict = collections.OrderedDict()

    def get(self, key):
        if key in self._entries:
            self._entries.move_to_end(key)
            return self._entries[key]
        return None

    def put(self, key, features) -> None:
        self._entries[key] = features
        self._entries.move_to_end(key)
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)

    def drop_version(self, adapter_key: tuple[str, int]) -> None:
        """Forget the features computed with that adapter version."""
        for key in [k for k in self._entries if k[1] == adapter_key]:
            del self._entries[key]

    def __len__(self) -> int:
        return len(self._entries)


class Engine:
    def __init__(self, runner: ModelRunner, pool: AdapterPool, *, config: EngineConfig = EngineConfig(),
                 policy: Policy | str = "ours", cost: CostModel | None = None, tokenizer=None,
                 clock: Callable[[], float] = time.perf_counter, cache=None):
        """policy: a Policy, or the name of a serving system (policies.SYSTEMS), which brings its
        policy and its switch strategy (its static tiles are the runner's backend, which must
        match: ServingSystem.backend). cost: the step-time model the engine feeds with every step
        and the policy reads (a calibrated one, or the prior when None). cache: KV pages to serve
        from (init_pages of this config's num_pages), such as those of an engine that is done
        (`engine.cache`), whose contents are never read before written; new pages when None."""
        if isinstance(policy, str):
            if policy not in SYSTEMS:
                raise ValueError(f"unknown policy {policy!r}; expected one of {sorted(SYSTEMS)}")
            system = SYSTEMS[policy]
            if system.backend(runner.backend) != runner.backend:
                raise ValueError(f"policy {policy!r} runs the static-tile kernel: build its runner with backend "
                                 f"{system.backend(runner.backend)!r}, not {runner.backend!r}")
            policy, config = system.policy(), dataclasses.replace(config, per_layer_switch=system.per_layer_switch)
        self.runner, self.pool, self.config, self.clock = runner, pool, config, clock
        self.policy, self.cost = policy, cost or CostModel()
        self.tokenizer = tokenizer or ByteTokenizer()
        cfg = runner.config
        self.allocator = PageAllocator(config.num_pages, cfg.page_size)
        pages = lambda: init_pages(cfg.text, config.num_pages, cfg.page_size, jnp.dtype(cfg.dtype))
        shapes = lambda tree: [(a.shape, a.dtype) for a in jax.tree.leaves(tree)]
        if cache is not None and shapes(cache) != shapes(jax.eval_shape(pages)):
            raise ValueError(f"cache does not match {config.num_pages} pages of this model: {shapes(cache)[:2]}...")
        self.cache = pages() if cache is None else cache
        self._new_cache = pages
        self.images = ImageCache(config.image_cache_size)
        self.limits = BatchLimits(config.max_rows, config.token_budget, config.prefill_chunk, cfg.lora.max_loras,
                                  cfg.page_size, config.max_prefill_rows, config.prefill_width)
        self._seqs: dict[str, _Seq] = {}                  # live, in arrival order
        self._results: dict[str, Completion] = {}
        self._ids = itertools.count()
        self.request_metrics: list[RequestMetrics] = []
        self.step_metrics: list[StepMetrics] = []
        self.policy_failures, self.last_policy_error = 0, None     # decisions that raised (see step)
        self.step_failures, self.last_step_error = 0, None         # model steps that raised (see _isolate)
        self.failing_steps = 0             # consecutive steps none of whose rows ran (a device or model fault)
        self._pending: _Dispatched | None = None      # the dispatched step whose tokens are not read yet
        self._no_feed = jnp.zeros((config.max_step_rows,), jnp.int32)
        self._last_read: float | None = None           # when the last step's tokens were read

    # submission ---------------------------------------------------------------------------------
    def prepare(self, request: Request) -> PreparedRequest:
        """The CPU work of submitting `request`, safe on any thread (it reads only the model
        config and the tokenizer). Raises ValueError naming a bad value."""
        state = RequestState.prepare(request, self.runner.config, self.tokenizer)
        for array in [*(state.pixels if isinstance(state.pixels, tuple) else [state.pixels]), state.rope]:
            if array is not None:
                array.flags.writeable = False
        digests = tuple(hashlib.sha256(px.tobytes() + str(px.shape).encode()).hexdigest() for px in state.pixels)
        return PreparedRequest(request, tuple(state.prompt_ids), tuple(state.image_rows), state.pixels, digests,
                               state.grids, state.rope, state.rope_delta)

    def submit(self, request: Request | PreparedRequest, on_event: Callable | None = None,
               request_id: str | None = None, arrival: float | None = None) -> str:
        """Validate (`prepare`, unless already prepared) and queue a request; returns its id.
        Raises ValueError (bad request, unknown adapter) or Overloaded (queue full) without
        changing anything. `arrival` (engine clock) backdates the request, for replaying traces
        whose arrivals fall inside a step."""
        prepared = request if isinstance(request, PreparedRequest) else self.prepare(request)
        request = prepared.request
        key = None if request.adapter is None else self.pool.key(request.adapter)
        state = RequestState(request, list(prepared.prompt_ids), list(prepared.image_rows), prepared.pixels,
                             grids=prepared.grids, rope=prepared.rope, rope_delta=prepared.rope_delta)
        one_pass = key is not None and self.pool.get(key).head is not None
        most = len(state.prompt_ids) + (1 if one_pass else request.max_tokens)
        usable = self.allocator.num_pages - 1                   # page 0 is the null page
        if self.allocator.pages_for(most) > usable:
            raise ValueError(f"prompt of {len(state.prompt_ids)} tokens + max_tokens {request.max_tokens} needs "
                             f"{self.allocator.pages_for(most)} KV pages; the cache has {usable}")
        if request_id is not None and (request_id in self._seqs or request_id in self._results):
            raise ValueError(f"request id {request_id!r} is already in use")
        if self.waiting >= self.config.max_queue:
            raise Overloaded(f"{self.config.max_queue} requests are already waiting")
        rid = request_id or f"req-{next(self._ids)}"
        now = self.clock() if arrival is None else arrival
        metrics = RequestMetrics(request.adapter, now, len(state.prompt_ids))
        self._seqs[rid] = _Seq(rid, state, metrics, on_event, digests=prepared.digests,
                               stream=self.tokenizer.stream_decoder(), adapter=key,
                               output_tokens=1 if one_pass else request.max_tokens)
        self.request_metrics.append(metrics)
        if key is not None:
            self.pool.stage(key)          # overlap the host-to-device copy with running steps
        return rid

    def cancel(self, request_id: str) -> bool:
        """Stop a live request at the next step boundary; False if it is not live."""
        seq = self._seqs.get(request_id)
        if seq is None:
            return False
        seq.cancelled = True
        return True

    def result(self, request_id: str, pop: bool = False) -> Completion | None:
        """The completion of a finished request (None while live or unknown); `pop` forgets it."""
        return self._results.pop(request_id, None) if pop else self._results.get(request_id)

    @property
    def has_work(self) -> bool:
        return bool(self._seqs)

    @property
    def waiting(self) -> int:
        """Live requests that have not started (the queue that max_queue bounds)."""
        return sum(s.computed == 0 for s in self._seqs.values())

    @property
    def live(self) -> int:
        return len(self._seqs)

    def generate(self, requests: list[Request]) -> list[Completion]:
        """Submit every request, run until all finish, return completions in order. A bad
        request raises ValueError naming it before any of them is queued; beyond the queue's
        room, requests are submitted as earlier ones start."""
        prepared = [self.prepare(r) for r in requests]
        for p in prepared:
            if p.request.adapter is not None:
                self.pool.key(p.request.adapter)
        ids = []
        try:
            for p in prepared:
                while self.waiting >= self.config.max_queue:
                    self._step_or_raise()
                ids.append(self.submit(p))
            while any(i in self._seqs for i in ids):
                self._step_or_raise()
            if not self._seqs:
                self._read_pending()         # a step of rows whose requests had ended
        except BaseException:
            for i in ids:                    # nothing of a failed call stays queued
                self.cancel(i)
            self.step()
            for i in ids:
                self._results.pop(i, None)
            raise
        return [self._results.pop(i) for i in ids]

    def _step_or_raise(self) -> None:
        """step(); RuntimeError if it ran nothing and changed nothing (the policy schedules none
        of the live requests: running on would never end)."""
        progress = lambda: [(s.id, s.computed, s.inflight) for s in self._seqs.values()]
        before = progress()
        if self.step() is None and before == progress():
            raise RuntimeError(f"policy {type(self.policy).__name__} scheduled none of {len(before)} live requests")

    def calibrate(self, requests: list[Request], passes: int = 2) -> int:
        """Run `requests` `passes` times on this idle engine under the probe schedule
        (policies.ProbePolicy), whose steps of every mode feed the engine's step-time model, as a
        server does before it takes traffic. The first pass mostly compiles the steps those shapes
        need (compiling steps are not observed); later ones measure. Their results and metrics
        are dropped; returns the steps observed."""
        if self._seqs:
            raise RuntimeError(f"calibrate needs an idle engine; {len(self._seqs)} requests are live")
        policy, observed = self.policy, self.cost.observed
        self.policy = ProbePolicy()
        try:
            for _ in range(passes):
                self.generate(requests)
        finally:
            self.policy = policy
            self.request_metrics.clear()
            self.step_metrics.clear()
        return self.cost.observed - observed

    # adapters -----------------------------------------------------------------------------------
    def register_adapter(self, adapter: Adapter) -> int:
        """Load or replace an adapter while serving. Requests submitted before a replacement keep
        the version they started with; image features of older versions are dropped with them."""
        old = self.pool.versions.get(adapter.name)
        version = self.pool.register(adapter)
        if old is not None:
            self._release_if_unused((adapter.name, old))
        return version

    def unregister_adapter(self, name: str) -> None:
        """Remove an adapter name; ValueError if unknown, AdapterInUse while live requests use its
        current version (requests on replaced versions keep theirs)."""
        key = self.pool.key(name)
        users = sum(s.adapter == key for s in self._seqs.values())
        if users:
            raise AdapterInUse(f"adapter {name!r} is used by {users} live requests")
        self.pool.unregister(name)
        self.images.drop_version(key)

    def _release_if_unused(self, key: tuple[str, int]) -> None:
        """Forget a replaced adapter version (slot, cached image features) once no request uses it."""
        current = key[0] in self.pool.store and self.pool.versions[key[0]] == key[1]
        if not current and all(s.adapter != key for s in self._seqs.values()):
            self.pool.release(key)
            self.images.drop_version(key)

    def _vision_key(self, key: tuple[str, int] | None):
        """The adapter identity image features depend on: None unless it adapts the vision side."""
        if key is None or all(p.startswith("decoder.") for p in self.pool.get(key).weights):
            return None
        return key

    @property
    def merged_adapter(self) -> tuple[str, int] | None:
        """(adapter, version) the runner's merged weights hold, None when they hold none."""
        slot = self.runner.merged_slot
        return next((key for key, s in self.pool.resident.items() if s == slot), None) if slot >= 0 else None

    # the step -----------------------------------------------------------------------------------
    def step(self) -> StepMetrics | None:
        """Run one scheduling step: decide, dispatch the step to the device, then read the tokens
        of the step dispatched before it (so the host's work on a step overlaps the device's
        work on the one before). Returns the metrics of the step whose tokens were read (None
        when none was).

        The policy sees only requests whose adapter is ready (resident, or its device copy made):
        a request whose adapter is still being copied waits, and the others run meanwhile. Only
        when no request is ready does the step wait, for the first copy to finish (counted in its
        load_time). A request whose in-flight token is certain to end it (its last token, a task
        head's answer) waits for that token to be read."""
        start, compiled_before = self.clock(), compile_seconds(this_thread=True)
        for seq in [s for s in self._seqs.values() if s.cancelled]:
            self._finish(seq, "cancelled")
        ready = lambda: [s for s in self._seqs.values()
                         if not self._ends_when_read(s) and (s.adapter is None or self.pool.ready(s.adapter))]
        while not (runnable := ready()):          # nothing else to run: waiting for a copy stalls no one
            if self._pending is not None or not self._seqs:
                return self._read_pending()
            self.pool.wait_staged({s.adapter for s in self._seqs.values()}, first=True)
        now = self.clock()
        views = tuple(SeqView(s.id, s.adapter, s.metrics.arrival, s.pending, now - s.metrics.arrival - s.served,
                              s.output_tokens, s.computed, s.generated) for s in runnable)
        state = SchedulerState(now, views, self.merged_adapter, self.limits, self.allocator.num_free, self.cost)
        try:
            decision = self.policy.decide(state)
        except Exception as e:      # a scheduling fault fails no request: this step runs the plain schedule
            log.exception("policy %s failed; this step runs unmerged", type(self.policy).__name__)
            self.policy_failures += 1
            self.last_policy_error = f"{type(e).__name__}: {e}"
            decision = Decision("unmerged", None, pack(state))
        rows = [(self._seqs[i], n) for i, n in decision.rows]
        read = None
        if any(s.inflight and not (n == 1 and s.pending == 1) for s, n in rows):
            read = self._read_pending()          # a row that recomputes needs its in-flight tokens first
            rows = [(s, n) for s, n in rows if s.id in self._seqs]
        placing = self.clock()
        slots = self._place_adapters(rows, decision.merged_adapter if decision.mode != "unmerged" else None)
        load = (now - start) + (self.clock() - placing)
        rows = [(s, n) for s, n in rows if s.id in self._seqs]        # failed loads dropped
        mode = decision.mode
        if mode != "unmerged" and decision.merged_adapter not in slots:
            mode = "unmerged"            # the merged adapter could not be placed: plain LoRA is exact too
        try:
            switch = self._switch(mode, decision.merged_adapter, slots)
            loop = self._loop_steps(rows)
            kept = self._allocate_pages(rows, ahead=loop)
            loop = loop if len(kept) == len(rows) else 1
            rows = kept
            if not rows:
                return self._read_pending() or read
            kv = sum(s.computed + n for s, n in rows)          # cache positions the (first) step's attention reads
            features = self.cost.features(mode, decision.merged_adapter, [(s.adapter, n) for s, n in rows], kv,
                                          self.limits.positions([n for _, n in rows]))
            failures = self.step_failures
            try:
                self._encode_images([s for s, _ in rows], slots)
                dispatched = self._run(rows, slots, mode) if loop == 1 else self._run_loop(rows, slots, mode, loop)
            except Exception as e:        # a fault fails only the requests it belongs to
                return self._isolate(rows, slots, e) or read
            self.failing_steps = 0
        finally:
            for name in slots:
                self.pool.unpin(name)
        compiled = compile_seconds(this_thread=True) - compiled_before
        dispatched.features = features if not compiled and failures == self.step_failures else None
        dispatched.metrics.update(
            start=start, switch_time=switch, mode=mode,
            merged_adapter=decision.merged_adapter if mode != "unmerged" else None,
            lora_tokens=float(features[2]), compile_time=compiled, load_time=load, kv_positions=kv,
            predicted_time=loop * self.cost.step_time_of(mode, features), steps=loop)
        previous, self._pending = self._pending, dispatched
        return self._read(previous, between=switch + load + compiled, learn=not (switch or compiled)) or read

    @property
    def in_flight(self) -> bool:
        """Whether a dispatched step's tokens are still to be read (the next step() reads them)."""
        return self._pending is not None

    def _ends_when_read(self, seq: _Seq) -> bool:
        """Its in-flight tokens end it (its last token, or a task head's answer): it waits for them."""
        return seq.inflight > 0 and seq.generated >= seq.output_tokens

    def _read_pending(self) -> StepMetrics | None:
        pending, self._pending = self._pending, None
        return self._read(pending)

    def _read(self, d: _Dispatched | None, between: float = 0.0, learn: bool = True) -> StepMetrics | None:
        """Wait for a dispatched step and apply its tokens: each row's under its request's stop
        rules (a request that recomputes since drops them), task heads' answers; its metrics
        recorded. Its duration: its own switch and adapter loads, and the time from its dispatch,
        or from the read of the step before when that came later (steps follow back to back),
        to its read, less `between`, the seconds another step's switch, loads and compiles took in
        that time. The step-time model learns from it unless `learn` is False. None for None, or
        when reading raised (_lost)."""
        if d is None:
            return None
        try:
            tokens = np.asarray(d.tokens).reshape(d.metrics["steps"], -1)
            hidden = np.asarray(d.hidden, np.float32) if d.heads else None
        except Exception as e:        # a fault on the device shows when its results are read
            self._lost(d, e)
            return None
        now = self.clock()
        for seq, row, count, epoch in d.takes:
            if seq.epoch != epoch:
                continue
            seq.inflight -= count
            if seq.id not in self._seqs:
                continue
            if seq.id in d.heads:
                seq.state.label = d.heads[seq.id].answer(hidden[row])
                seq.metrics.first_token = seq.metrics.first_token or now
                self._finish(seq, "stop")
                continue
            for token in tokens[:count, row]:
                self._emit(seq, int(token), now)
                if seq.state.finish is not None:
                    break
        begin = max(d.metrics["start"], self._last_read or -math.inf)
        own = d.metrics["switch_time"] + d.metrics["load_time"] if begin > d.metrics["start"] else 0.0
        duration = own + max(now - begin - between, 0.0)
        self._last_read = now
        for seq in d.seqs:
            seq.served += duration
        step = StepMetrics(duration=duration, **d.metrics)
        if d.features is not None and learn and step.compute_time > 0:
            # a compiling or failed step says nothing about what the mode costs, nor one whose time
            # another step's switch or compile overlapped
            self.cost.observe(step.mode, d.features, step.compute_time / step.steps)
        self.step_metrics.append(step)
        return step

    def _lost(self, d: _Dispatched, error: Exception) -> None:
        """A dispatched step failed on the device (seen when its tokens were read): its requests
        recompute from their start (the cache is rebuilt if the fault consumed it), and one in
        its second such step fails, naming the error."""
        log.exception("reading an engine step over %d rows failed", len(d.seqs))
        self.step_failures += 1
        self.failing_steps += 1
        self.last_step_error = f"{type(error).__name__}: {error}"
        self._recover_cache()
        for seq in d.seqs:
            seq.faults += 1
            if seq.id in self._seqs:
                if seq.faults >= 2:
                    self._finish(seq, "error", f"engine step failed: {self.last_step_error}")
                elif seq.pages or seq.inflight:
                    self._preempt(seq)

    def _isolate(self, rows, slots, error: Exception) -> StepMetrics | None:
        """After dispatching the step over `rows` raised `error`: the step before it is read, then
        each row runs again alone and unmerged (the step's mode or any row may be at fault); a
        row that fails alone fails its request, naming the error, and the others go on. When the
        failure consumed the KV cache (a fault on the device), the cache is rebuilt and every live
        request recomputes from its start instead, a request failing once it has been in two
        such steps. Counts the failure (step_failures, failing_steps); -> the metrics of the last
        step read."""
        log.exception("engine step over %d rows failed; retrying each alone", len(rows))
        self.step_failures += 1
        self.last_step_error = f"{type(error).__name__}: {error}"
        epochs = {seq.id: seq.epoch for seq, _ in rows}
        read = self._read_pending()             # (a request it makes recompute gave up its pages: left out)
        rows = [(seq, n) for seq, n in rows if seq.id in self._seqs and seq.epoch == epochs[seq.id]]
        if self._recover_cache():
            for seq, _ in rows:
                seq.faults += 1
                if seq.faults >= 2 and seq.id in self._seqs:
                    self._finish(seq, "error", f"engine step failed: {self.last_step_error}")
            self.failing_steps += 1
            return read
        ran = False
        for seq, n in rows:
            if seq.id not in self._seqs:
                continue
            try:
                self._encode_images([seq], slots)
                read = self._read(self._run([(seq, n)], slots, "unmerged")) or read
                ran = True
            except Exception as e:
                log.exception("request %s failed alone", seq.id)
                seq.faults += 1
                lost = self._recover_cache()     # a fault on the device: every request recomputes
                if seq.id in self._seqs and (not lost or seq.faults >= 2):
                    self._finish(seq, "error", f"engine step failed: {type(e).__name__}: {e}")
                if lost:
                    break
        if not ran:
            self.failing_steps += 1
        return read

    def _recover_cache(self) -> bool:
        """Whether a failed call consumed the KV cache (its buffers were donated); if so a fresh
        cache replaces it and every live request gives up its pages to recompute from its start."""
        if not any(leaf.is_deleted() for leaf in jax.tree.leaves(self.cache)):
            return False
        self.cache = self._new_cache()
        for seq in self._seqs.values():
            if seq.pages:
                self._preempt(seq)
        return True

    def _place_adapters(self, rows, merged: str | None) -> dict[str, int]:
        """Acquire and pin every adapter of the step; a load that fails fails its requests."""
        slots = {}
        for name in dict.fromkeys([merged] + [s.adapter for s, _ in rows]):
            if name is None:
                continue
            try:
                slots[name] = self.pool.acquire([name])[name]
                self.pool.pin(name)
            except PoolFull:
                continue                              # the policy over-asked: those rows wait
            except Exception as e:                    # a broken adapter fails only its own requests
                for seq in [s for s in self._seqs.values() if s.adapter == name]:
                    self._finish(seq, "error", f"loading adapter {name!r} failed: {e}")
        return slots

    def _switch(self, mode: str, merged: str | None, slots: dict[str, int]) -> float:
        """Bring the merged weights to `merged` if the mode needs it; returns the seconds spent."""
        if mode == "unmerged":
            return 0.0
        if self.runner.merged_slot == slots[merged]:
            return 0.0
        t0, compiled_before = self.clock(), compile_seconds(this_thread=True)
        if self.config.per_layer_switch:
            self.runner.merge_per_layer(slots[merged])
        else:
            self.runner.merge(slots[merged])
        self.runner.wait_merged()
        seconds = self.clock() - t0
        if compile_seconds(this_thread=True) == compiled_before:
            self.cost.observe_switch(seconds)
        return seconds

    def _loop_steps(self, rows) -> int:
        """The decode steps the rows run in one call: config.decode_loop when they are decodes of
        every live request (but those whose in-flight tokens end them) and each has that many
        tokens still to output, else 1."""
        steps = self.config.decode_loop
        if steps == 1 or len(rows) != sum(not self._ends_when_read(s) for s in self._seqs.values()):
            return 1
        decoding = lambda s, n: n == 1 and s.generated and s.pending == 1
        if all(decoding(s, n) and s.generated + steps <= s.state.request.max_tokens for s, n in rows):
            return steps
        return 1

    def _allocate_pages(self, rows, ahead: int = 1):
        """Pages for every row's new tokens (at least `ahead` of them); when the cache is full,
        preempt the newest live requests (they recompute later), dropping rows that still do not
        fit."""
        kept = []
        for seq, n in rows:
            need = self.allocator.pages_for(seq.computed + max(n, ahead)) - len(seq.pages)
            while need > self.allocator.num_free:
                victims = [s for s in reversed(self._seqs.values())
                           if s.pages and s is not seq and all(s is not k for k, _ in kept)]
                if not victims:
                    break
                self._preempt(victims[0])
            if need <= self.allocator.num_free:
                seq.pages += self.allocator.allocate(max(need, 0))
                kept.append((seq, n))
        return kept

    def _preempt(self, seq: _Seq) -> None:
        """Free its pages: it recomputes from its start, its tokens still in flight dropped (drawn
        again alike: sampling depends only on the request and its step)."""
        self.allocator.free(seq.pages)
        seq.pages, seq.computed, seq.inflight, seq.epoch = [], 0, 0, seq.epoch + 1
        seq.metrics.preemptions += 1

    def _encode_images(self, seqs, slots) -> None:
        """Features for the images of requests starting now: from the cache, or encoded in one call."""
        todo = [s for s in seqs if s.features is None and len(s.state.pixels)]
        missing = {}
        for seq in todo:
            vkey = self._vision_key(seq.adapter)
            for digest, px, grid in itertools.zip_longest(seq.digests, seq.state.pixels, seq.state.grids):
                if self.images.get((digest, vkey)) is None:
                    missing[(digest, vkey)] = (px, grid, slots.get(seq.adapter, -1) if vkey else -1)
        if missing and self.runner.config.is_qwen:            # images of any size
            feats = self.runner.encode_patches([px for px, _, _ in missing.values()],
                                               [grid for _, grid, _ in missing.values()],
                                               [s for _, _, s in missing.values()])
        elif missing:
            n = bucket(len(missing))
            pixels = np.zeros((n, *todo[0].state.pixels.shape[1:]), np.float32)
            pixels[: len(missing)] = [px for px, _, _ in missing.values()]
            slots_of_images = [s for _, _, s in missing.values()] + [PAD_SLOT] * (n - len(missing))
            encoded = self.runner.encode_images(pixels, slots_of_images)           # [n, P, D]
            feats = [ImageFeatures(encoded[i], 0, encoded.shape[1]) for i in range(len(missing))]
        for key, f in zip(missing, feats if missing else ()):
            self.images.put(key, f)
        for seq in todo:
            vkey = self._vision_key(seq.adapter)
            seq.features = tuple(self.images.get((d, vkey)) for d in seq.digests)

    def _image_features(self, placed, n_rows: int) -> jax.Array:
        """The step's image features [bucket(n_rows, min_features), D] (or [0, D] with none and no
        minimum), each (row, ImageFeatures) placed at its row on the device: compiles bounded by
        the step sizes and the encoder's batch buckets, whatever the images' mix and sizes."""
        cfg = self.runner.config
        size = bucket(n_rows, self.config.min_features) if placed or self.config.min_features else 0
        feats = jnp.zeros((size, cfg.text.hidden_size), jnp.dtype(cfg.dtype))
        for row, image in placed:
            feats = _copy_rows(feats, image.rows, jnp.int32(image.start), jnp.int32(row), bucket(image.count),
                               jnp.int32(image.count))
        return feats

    def _run(self, rows, slots, mode: str) -> _Dispatched:
        """Dispatch the rows as one model step (a row of a request whose token is still in flight
        takes it from the step before, on the device: runtime.Feed); the rows that reach the end
        of their known tokens sample their next token (or answer with their task head), read later
        (_read)."""
        now = self.clock()
        decode, prefill, features, offset = [], [], [], 0
        for seq, n in rows:
            seq.metrics.first_scheduled = seq.metrics.first_scheduled or now
            chunk = [0] if seq.inflight else seq.state.tokens[seq.computed: seq.computed + n]   # [0]: fed
            image_rows = None
            if seq.features is not None and seq.computed < len(seq.state.prompt_ids):
                local = np.asarray(seq.state.image_rows + [-1] * len(seq.state.out))[seq.computed: seq.computed + n]
                if (local >= 0).any():
                    image_rows = np.where(local >= 0, local + offset, -1)
                    starts = offset + np.cumsum([0] + [len(f) for f in seq.features[:-1]])
                    features += [(int(start), f) for start, f in zip(starts, seq.features)]
                    offset += sum(len(f) for f in seq.features)
            spec = RowSpec(chunk, seq.computed, image_rows, slots.get(seq.adapter, -1), seq.pages,
                           seq.state.rope_positions(seq.computed, len(chunk)))
            (decode if n == 1 else prefill).append((seq, spec))
        feats = self._image_features(features, offset)
        cfg, blocks, row_index = self.config, [], []       # row_index: where each row's last token is
        if decode:                                         # (padding rows follow the decode block's)
            blocks.append(pack_block([sp for _, sp in decode], min_rows=cfg.min_rows, min_pages=cfg.min_pages))
            row_index += range(len(decode))
        if prefill:
            pieces = [split_row(spec, cfg.prefill_width) for _, spec in prefill]
            rows_of_pieces = [p for ps in pieces for p in ps]
            blocks.append(pack_block(rows_of_pieces, min_rows=cfg.prefill_rows(len(rows_of_pieces)),
                                     min_pages=cfg.min_pages, width=cfg.prefill_width))
            first = blocks[0].valid.shape[0] if decode else 0
            row_index += (first + np.cumsum([len(ps) for ps in pieces]) - 1).tolist()
        rows = [(seq, spec, i) for (seq, spec), i in zip(decode + prefill, row_index)]
        sampling = self._sampling([(seq, i) for seq, _, i in rows], sum(block.valid.shape[0] for block in blocks))
        feed = self._feed([seq for seq, _ in decode], blocks[0].valid.shape[0] if decode else 0)
        hidden, tokens, self.cache = self.runner.sample_step(self.cache, blocks, feats, sampling,
                                                             self.tokenizer.vocab_size, mode, feed=feed)
        takes, heads = [], {}
        for seq, spec, i in rows:
            if seq.pending == len(spec.tokens):   # it reaches the end of its known tokens: it samples
                head = self.pool.get(seq.adapter).head if seq.adapter is not None and not seq.generated else None
                if head is not None:
                    heads[seq.id] = head
                takes.append((seq, i, 1, seq.epoch))
                seq.inflight, seq.inflight_row = seq.inflight + 1, i
            seq.computed += len(spec.tokens)
        metrics = self._metrics(mode, [(seq, len(spec.tokens)) for seq, spec, _ in rows], 1,
                                sum(block.valid.size for block in blocks))
        return _Dispatched(takes, tokens, tokens, hidden if heads else None, heads, metrics,
                           [seq for seq, _, _ in rows])

    def _run_loop(self, rows, slots, mode: str, steps: int) -> _Dispatched:
        """Dispatch the decode rows `steps` steps in one call (ModelRunner.decode_loop); their
        tokens are read later (_read), a row's tokens after its stop dropped."""
        specs = [RowSpec([0] if seq.inflight else seq.state.tokens[seq.computed:], seq.computed, None,
                         slots.get(seq.adapter, -1), seq.pages, seq.state.rope_positions(seq.computed, 1))
                 for seq, _ in rows]
        block = pack_block(specs, min_rows=self.config.min_rows, min_pages=self.config.min_pages)
        sampling = self._sampling([(seq, i) for i, (seq, _) in enumerate(rows)], block.valid.shape[0])
        feed = self._feed([seq for seq, _ in rows], block.valid.shape[0])
        tokens, last, self.cache = self.runner.decode_loop(self.cache, block, sampling, self.tokenizer.vocab_size,
                                                           steps, mode, feed=feed)
        takes = []
        for i, (seq, _) in enumerate(rows):
            takes.append((seq, i, steps, seq.epoch))
            seq.inflight, seq.inflight_row = seq.inflight + steps, i
            seq.computed += steps
        metrics = self._metrics(mode, [(seq, 1) for seq, _ in rows], steps, steps * block.valid.size)
        return _Dispatched(takes, tokens, last, None, {}, metrics, [seq for seq, _ in rows])

    def _feed(self, decode: list, rows: int) -> Feed:
        """The feed of a step whose decode block holds `decode` (then padding, `rows` in all): each
        in-flight request's token from the tokens of the step before."""
        index = np.full(rows, -1, np.int32)
        index[: len(decode)] = [seq.inflight_row if seq.inflight else -1 for seq in decode]
        return Feed(self._pending.feed if self._pending is not None else self._no_feed, index)

    def _metrics(self, mode: str, rows, steps: int, padded: int) -> dict:
        """StepMetrics fields (but the duration) of a step dispatched now over rows (seq, tokens)
        for `steps` steps; the scheduling step fills in what it knows besides."""
        return dict(start=self.clock(), switch_time=0.0, mode=mode, merged_adapter=None,
                    decode_rows=sum(n == 1 for _, n in rows), prefill_rows=sum(n > 1 for _, n in rows),
                    tokens=steps * sum(n for _, n in rows), lora_tokens=0.0,
                    adapters=len({s.adapter for s, _ in rows} - {None}), padded_tokens=padded, steps=steps)

    def _sampling(self, rows, n: int) -> Sampling:
        """How each (seq, row index) of a step of n rows draws: as its request asks, at its step
        (tokens output so far, those in flight included); the other rows greedily (their tokens
        are dropped)."""
        sampling = Sampling.greedy(n)
        for seq, i in rows:
            request = seq.state.request
            sampling.temperature[i], sampling.top_p[i] = request.temperature, request.top_p
            sampling.seed[i], sampling.step[i] = request.seed, seq.generated
        return sampling

    def _emit(self, seq: _Seq, token: int, now: float) -> None:
        """A row's sampled token: recorded under its request's stop rules, streamed, and the
        request finished when a rule fires."""
        seq.state.append(token, self.tokenizer)
        seq.metrics.first_token = seq.metrics.first_token or now
        seq.metrics.output_tokens = len(seq.state.out)
        if seq.on_event is not None and seq.state.out and seq.state.finish is None:
            seq.on_event(seq.id, seq.stream.push(seq.state.out[-1]), None)
        if seq.state.finish is not None:
            self._finish(seq, seq.state.finish)

    def _finish(self, seq: _Seq, reason: str, error: str | None = None) -> None:
        seq.state.finish, seq.state.error = reason, error
        if seq.pages:
            self.allocator.free(seq.pages)
            seq.pages = []
        completion = seq.state.completion(self.tokenizer)
        seq.metrics.finished, seq.metrics.finish_reason = self.clock(), reason
        seq.metrics.output_tokens = len(seq.state.out)
        del self._seqs[seq.id]
        if seq.adapter is not None:
            self._release_if_unused(seq.adapter)
        self._results[seq.id] = completion
        if seq.on_event is not None:
            seq.on_event(seq.id, "", completion)

    def summary(self) -> dict:
        return summarize(self.request_metrics, self.step_metrics)
