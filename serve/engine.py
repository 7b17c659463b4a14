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
  5. one jitted call runs the decode block and the prefill block (each prefill chunk in
     whole rows of `prefill_width` tokens); rows that reached the end of their known tokens
     sample a token, task-head adapters answer after their prefill.
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
from valora_jax.runtime import ModelRunner, RowSpec, Sampling, bucket, compile_seconds, pack_block, split_row
from valora_jax.tokenizer import ByteTokenizer

log = logging.getLogger("valora.engine")


@functools.partial(jax.jit, donate_argnums=0)
def _place_rows(buffer: jax.Array, rows: jax.Array, start: jax.Array) -> jax.Array:
    """buffer [F, D] with rows [n, D] written from row `start` on (buffer donated)."""
    return jax.lax.dynamic_update_slice(buffer, rows.astype(buffer.dtype), (start, 0))


@dataclasses.dataclass(frozen=True)
class PreparedRequest:
    """A request checked against the model, tokenised, its images preprocessed (read-only
    pixels [N, H, W, 3]) and hashed (sha256 per image): what `Engine.prepare` returns."""

    request: Request
    prompt_ids: tuple[int, ...]
    image_rows: tuple[int, ...]
    pixels: np.ndarray
    digests: tuple[str, ...]


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
    features: tuple[jax.Array, ...] | None = None   # [P, D] per image, once encoded
    served: float = 0.0                       # seconds of the steps it ran in
    cancelled: bool = False
    digests: tuple[str, ...] = ()             # sha256 of each preprocessed image
    stream: object = None                     # incremental detokenizer for on_event
    adapter: tuple[str, int] | None = None    # (name, version) fixed at submission
    output_tokens: int = 1                    # the most it outputs: 1 for a task head's answer
    faults: int = 0                           # failed steps it ran in that lost the KV cache (two fail it)

    @property
    def pending(self) -> int:
        return len(self.state.tokens) - self.computed


class ImageCache:
    """LRU of image features [P, D] keyed by (pixel digest, vision adapter identity)."""

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

    # submission ---------------------------------------------------------------------------------
    def prepare(self, request: Request) -> PreparedRequest:
        """The CPU work of submitting `request`, safe on any thread (it reads only the model
        config and the tokenizer). Raises ValueError naming a bad value."""
        state = RequestState.prepare(request, self.runner.config, self.tokenizer)
        state.pixels.flags.writeable = False
        return PreparedRequest(request, tuple(state.prompt_ids), tuple(state.image_rows), state.pixels,
                               tuple(hashlib.sha256(px.tobytes()).hexdigest() for px in state.pixels))

    def submit(self, request: Request | PreparedRequest, on_event: Callable | None = None,
               request_id: str | None = None, arrival: float | None = None) -> str:
        """Validate (`prepare`, unless already prepared) and queue a request; returns its id.
        Raises ValueError (bad request, unknown adapter) or Overloaded (queue full) without
        changing anything. `arrival` (engine clock) backdates the request, for replaying traces
        whose arrivals fall inside a step."""
        prepared = request if isinstance(request, PreparedRequest) else self.prepare(request)
        request = prepared.request
        key = None if request.adapter is None else self.pool.key(request.adapter)
        state = RequestState(request, list(prepared.prompt_ids), list(prepared.image_rows), prepared.pixels)
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
        before = [(s.id, s.computed) for s in self._seqs.values()]
        if self.step() is None and before == [(s.id, s.computed) for s in self._seqs.values()]:
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
        """Run one scheduling step; None when there was nothing to run.

        The policy sees only requests whose adapter is ready (resident, or its device copy made):
        a request whose adapter is still being copied waits, and the others run meanwhile. Only
        when no request is ready does the step wait, for the first copy to finish (counted in its
        load_time)."""
        start, compiled_before = self.clock(), compile_seconds(this_thread=True)
        for seq in [s for s in self._seqs.values() if s.cancelled]:
            self._finish(seq, "cancelled")
        if not self._seqs:
            return None
        ready = lambda: [s for s in self._seqs.values() if s.adapter is None or self.pool.ready(s.adapter)]
        while not (runnable := ready()):          # nothing else to run: waiting for a copy stalls no one
            self.pool.wait_staged({s.adapter for s in self._seqs.values()}, first=True)
        now = self.clock()
        views = tuple(SeqView(s.id, s.adapter, s.metrics.arrival, s.pending, now - s.metrics.arrival - s.served,
                              s.output_tokens, s.computed, len(s.state.out)) for s in runnable)
        state = SchedulerState(now, views, self.merged_adapter, self.limits, self.allocator.num_free, self.cost)
        try:
            decision = self.policy.decide(state)
        except Exception as e:      # a scheduling fault fails no request: this step runs the plain schedule
            log.exception("policy %s failed; this step runs unmerged", type(self.policy).__name__)
            self.policy_failures += 1
            self.last_policy_error = f"{type(e).__name__}: {e}"
            decision = Decision("unmerged", None, pack(state))
        rows = [(self._seqs[i], n) for i, n in decision.rows]
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
                return None
            kv = sum(s.computed + n for s, n in rows)          # cache positions the (first) step's attention reads
            failures = self.step_failures
            try:
                self._encode_images([s for s, _ in rows], slots)
                padded = self._run(rows, slots, mode) if loop == 1 else self._run_loop(rows, slots, mode, loop)
            except Exception as e:        # a fault fails only the requests it belongs to
                rows, padded, loop = *self._isolate(rows, slots, e), 1
                mode = "unmerged"
                if not rows:
                    return None
            self.failing_steps = 0
        finally:
            for name in slots:
                self.pool.unpin(name)
        duration, compiled = self.clock() - start, compile_seconds(this_thread=True) - compiled_before
        for seq, _ in rows:
            seq.served += duration
        features = self.cost.features(mode, decision.merged_adapter, [(s.adapter, n) for s, n in rows], kv,
                                      self.limits.positions([n for _, n in rows]))
        step = StepMetrics(start, duration, switch, mode, decision.merged_adapter if mode != "unmerged" else None,
                           sum(n == 1 for _, n in rows), sum(n > 1 for _, n in rows), loop * sum(n for _, n in rows),
                           float(features[2]), len({s.adapter for s, _ in rows} - {None}), compiled, load, kv, padded,
                           loop * self.cost.step_time_of(mode, features), loop)
        if not compiled and failures == self.step_failures:   # a compiling or failed step says nothing
                                                               # about what the mode costs
            self.cost.observe(mode, features, step.compute_time / loop)
        self.step_metrics.append(step)
        return step

    def _isolate(self, rows, slots, error: Exception) -> tuple[list, int]:
        """After the step over `rows` raised `error`: each row again alone and unmerged (the step's
        mode or any row may be at fault); a row that fails alone fails its request, naming the
        error, and the others go on. When the failure consumed the KV cache (a fault on the
        device), the cache is rebuilt and every live request recomputes from its start instead,
        a request failing once it has been in two such steps. -> (the rows that ran, their
        padded positions); counts the failure (step_failures, failing_steps)."""
        log.exception("engine step over %d rows failed; retrying each alone", len(rows))
        self.step_failures += 1
        self.last_step_error = f"{type(error).__name__}: {error}"
        if self._recover_cache():
            for seq, _ in rows:
                seq.faults += 1
                if seq.faults >= 2 and seq.id in self._seqs:
                    self._finish(seq, "error", f"engine step failed: {self.last_step_error}")
            self.failing_steps += 1
            return [], 0
        ran, padded = [], 0
        for seq, n in rows:
            try:
                self._encode_images([seq], slots)
                padded += self._run([(seq, n)], slots, "unmerged")
                ran.append((seq, n))
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
        return ran, padded

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
        every live request and each has that many tokens still to output, else 1."""
        steps = self.config.decode_loop
        if steps == 1 or len(rows) != len(self._seqs):
            return 1
        decoding = lambda s, n: n == 1 and s.state.out and s.computed == len(s.state.tokens) - 1
        if all(decoding(s, n) and len(s.state.out) + steps <= s.state.request.max_tokens for s, n in rows):
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
        self.allocator.free(seq.pages)
        seq.pages, seq.computed = [], 0
        seq.metrics.preemptions += 1

    def _encode_images(self, seqs, slots) -> None:
        """Features for the images of requests starting now: from the cache, or encoded in one call."""
        todo = [s for s in seqs if s.features is None and len(s.state.pixels)]
        missing = {}
        for seq in todo:
            vkey = self._vision_key(seq.adapter)
            for digest, px in zip(seq.digests, seq.state.pixels):
                if self.images.get((digest, vkey)) is None:
                    missing[(digest, vkey)] = (px, slots.get(seq.adapter, -1) if vkey else -1)
        if missing:
            n = bucket(len(missing))
            pixels = np.zeros((n, *todo[0].state.pixels.shape[1:]), np.float32)
            pixels[: len(missing)] = [px for px, _ in missing.values()]
            slots_of_images = [s for _, s in missing.values()] + [PAD_SLOT] * (n - len(missing))
            feats = self.runner.encode_images(pixels, slots_of_images)
            for i, key in enumerate(missing):
                self.images.put(key, feats[i])
        for seq in todo:
            vkey = self._vision_key(seq.adapter)
            seq.features = tuple(self.images.get((d, vkey)) for d in seq.digests)

    def _image_features(self, placed, n_rows: int) -> jax.Array:
        """The step's image features [bucket(n_rows, min_features), D] (or [0, D] with none and no
        minimum), each (row, [P, D] image) placed at its row: one compile per step size, whatever
        the images' mix (concatenating them compiled once per combination of sizes)."""
        cfg = self.runner.config
        size = bucket(n_rows, self.config.min_features) if placed or self.config.min_features else 0
        feats = jnp.zeros((size, cfg.text.hidden_size), jnp.dtype(cfg.dtype))
        for row, image in placed:
            feats = _place_rows(feats, image, jnp.int32(row))
        return feats

    def _run(self, rows, slots, mode: str) -> int:
        """Run the rows in one model step; the token positions of its blocks, padding included."""
        now = self.clock()
        decode, prefill, features, offset = [], [], [], 0
        for seq, n in rows:
            seq.metrics.first_scheduled = seq.metrics.first_scheduled or now
            chunk = seq.state.tokens[seq.computed: seq.computed + n]
            image_rows = None
            if seq.features is not None and seq.computed < len(seq.state.prompt_ids):
                local = np.asarray(seq.state.image_rows + [-1] * len(seq.state.out))[seq.computed: seq.computed + n]
                if (local >= 0).any():
                    image_rows = np.where(local >= 0, local + offset, -1)
                    features += [(offset + i * f.shape[0], f) for i, f in enumerate(seq.features)]
                    offset += sum(f.shape[0] for f in seq.features)
            spec = RowSpec(chunk, seq.computed, image_rows, slots.get(seq.adapter, -1), seq.pages)
            (decode if n == 1 else prefill).append((seq, spec))
        feats = self._image_features(features, offset)
        cfg, blocks, row_index = self.config, [], []       # row_index: where each row's last token is
        if decode:                                         # (padding rows follow the decode block's)
            blocks.append(pack_block([sp for _, sp in decode], min_rows=cfg.min_rows, min_pages=cfg.min_pages))
            row_index += range(len(decode))
        if prefill:
            pieces = [split_row(spec, cfg.prefill_width) for _, spec in prefill]
            rows_of_pieces = [p for ps in pieces for p in ps]
            blocks.append(pack_block(rows_of_pieces, min_pages=cfg.min_pages, width=cfg.prefill_width))
            first = blocks[0].valid.shape[0] if decode else 0
            row_index += (first + np.cumsum([len(ps) for ps in pieces]) - 1).tolist()
        rows = [(seq, spec, i) for (seq, spec), i in zip(decode + prefill, row_index)]
        sampling = self._sampling([(seq, i) for seq, _, i in rows], sum(block.valid.shape[0] for block in blocks))
        hidden, tokens, self.cache = self.runner.sample_step(self.cache, blocks, feats, sampling,
                                                             self.tokenizer.vocab_size, mode)
        self._advance(rows, hidden, tokens)
        return sum(block.valid.size for block in blocks)

    def _run_loop(self, rows, slots, mode: str, steps: int) -> int:
        """Run the decode rows `steps` steps in one call (ModelRunner.decode_loop); the token
        positions it computed, padding included. A row's tokens after its stop are dropped."""
        specs = [RowSpec(seq.state.tokens[seq.computed:], seq.computed, None, slots.get(seq.adapter, -1), seq.pages)
                 for seq, _ in rows]
        block = pack_block(specs, min_rows=self.config.min_rows, min_pages=self.config.min_pages)
        sampling = self._sampling([(seq, i) for i, (seq, _) in enumerate(rows)], block.valid.shape[0])
        tokens, self.cache = self.runner.decode_loop(self.cache, block, sampling, self.tokenizer.vocab_size, steps,
                                                     mode)
        tokens, now = np.asarray(tokens), self.clock()
        for i, (seq, _) in enumerate(rows):
            for token in tokens[:, i]:
                seq.computed += 1
                self._emit(seq, int(token), now)
                if seq.state.finish is not None:
                    break
        return steps * block.valid.size

    @staticmethod
    def _sampling(rows, n: int) -> Sampling:
        """How each (seq, row index) of a step of n rows draws: as its request asks, at its step
        (tokens output so far); the other rows greedily (their tokens are dropped)."""
        sampling = Sampling.greedy(n)
        for seq, i in rows:
            request = seq.state.request
            sampling.temperature[i], sampling.top_p[i] = request.temperature, request.top_p
            sampling.seed[i], sampling.step[i] = request.seed, len(seq.state.out)
        return sampling

    def _advance(self, rows, hidden, tokens) -> None:
        """Rows that ended their known tokens take their sampled token (read back: the step's
        duration, what the step-time model learns, is its own), or their task head's label."""
        done_prefill = [(seq, i) for seq, spec, i in rows
                        if seq.computed + len(spec.tokens) == len(seq.state.tokens)]
        for seq, spec, _ in rows:
            seq.computed += len(spec.tokens)
        heads = {seq.id: self.pool.get(seq.adapter).head for seq, _ in done_prefill
                 if seq.adapter is not None and not seq.state.out and self.pool.get(seq.adapter).head is not None}
        tokens = np.asarray(tokens)
        hidden_np = np.asarray(hidden, np.float32) if heads else None
        now = self.clock()
        for seq, i in done_prefill:
            if seq.id in heads:
                seq.state.label, seq.state.finish = heads[seq.id].answer(hidden_np[i]), "stop"
                seq.metrics.first_token = seq.metrics.first_token or now
                self._finish(seq, "stop")
            else:
                self._emit(seq, int(tokens[i]), now)

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
