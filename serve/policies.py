"""Orchestration policies: each step, which requests run and in which mode; and the serving
systems compared (a policy plus the engine mechanics it runs on).

Every policy answers `decide(state) -> Decision` from a read-only snapshot of the live requests
(and the engine's step-time model) and does nothing else: the engine acts on the decision.
  ours    (V-LoRA)   per step the one of unmerged, mixture(a) and merged(a) that adds the
                     least total latency under a cost model of measured step times, amortising
                     merge switches, with a starvation bound on how long any request waits;
  unmerged           always unmerged, chunked prefill mixed with decodes, adaptive tiles (the
                     schedule of S-LoRA on our kernel: what ours gains by orchestration alone);
  slora              the same schedule on the static-tile kernel (SYSTEMS: a policy + mechanics);
  punica             always unmerged, static-tile kernel, prefill steps separate from decodes,
                     new prompts admitted while the running batch has room;
  dlora              merge the top adapter when its requests >= alpha * batch, unmerge when
                     <= beta * batch; no mixture; layer-by-layer switch (SYSTEMS);
  merged             one adapter at a time, merged, first come first served by adapter.
The engine owns the packing limits (rows, token budget, chunk, adapter slots, KV pages); `pack`
fills a batch within them, decodes before prefills, oldest requests first (ours orders all rows
by Smith's rule; the baselines keep their systems' first come, first served).
"""

import abc
import collections
import dataclasses
import functools
import math
from typing import Any, Callable, Sequence

import numpy as np

from valora_jax.lora import MODES


@dataclasses.dataclass(frozen=True)
class SeqView:
    """What a policy sees of a live request: pending = tokens not yet in the KV cache
    (1 while decoding); waited = seconds it has been live outside the steps that ran (in the
    queue, and through the steps it was left out of: its starvation credit); output_tokens =
    the most tokens it outputs (1 for a task head's one-pass answer, else its max_tokens): its
    latency counts 1/output_tokens in average token latency; context = tokens already in the KV
    cache (what its attention reads besides its own new tokens); generated = tokens it has
    output so far."""

    id: str
    adapter: str | None
    arrival: float
    pending: int
    waited: float
    output_tokens: int = 1
    context: int = 0
    generated: int = 0

    @property
    def work_left(self) -> int:
        """Tokens it still has to run through the model, at most: its pending tokens, then one
        per output token it may still produce."""
        return self.pending + max(self.output_tokens - self.generated - 1, 0)


@dataclasses.dataclass(frozen=True)
class BatchLimits:
    max_rows: int                 # sequences per step
    token_budget: int             # token positions per step: a decode row counts 1, a prefill chunk its rows
    prefill_chunk: int            # longest prefill chunk per sequence per step
    max_adapters: int             # distinct adapters per step (device slots)
    page_size: int = 16           # tokens per KV page
    max_prefill_rows: int | None = None   # prefill chunks per step (None: up to max_rows)
    prefill_width: int = 1        # tokens per prefill block row (a chunk takes whole rows)

    def pages(self, tokens: int) -> int:
        """KV pages that hold `tokens` tokens."""
        return -(-tokens // self.page_size)

    def prefill_positions(self, tokens: int) -> int:
        """Token positions a prefill chunk of `tokens` takes: its whole rows."""
        return -(-tokens // self.prefill_width) * self.prefill_width

    def positions(self, tokens: Sequence[int]) -> int:
        """Token positions a step of rows of these token counts computes, as the engine lays
        them out: one per decode row, each prefill chunk's whole rows. (The decode block's
        padding rows are left out: a fixed shape, whose cost a step's fixed term takes.)"""
        return sum(self.prefill_positions(n) if n > 1 else n for n in tokens)


@dataclasses.dataclass(frozen=True)
class SchedulerState:
    now: float
    seqs: tuple[SeqView, ...]     # in arrival order
    merged_adapter: str | None    # adapter currently folded into the merged weights
    limits: BatchLimits
    free_pages: int | None = None  # KV pages free now (None: no bound)
    cost: "CostModel | None" = None   # the engine's step-time model, to read (None: its prior)


def admission_room(state: SchedulerState) -> int | None:
    """KV pages a request not yet in the cache may take: the free pages less those the requests
    already in it need to reach the end of their known tokens (the rest of a prompt, a decode's
    next token). None: no bound."""
    if state.free_pages is None:
        return None
    pages = state.limits.pages
    return state.free_pages - sum(pages(s.context + s.pending) - pages(s.context) for s in state.seqs if s.context)


@dataclasses.dataclass(frozen=True)
class Decision:
    mode: str                                 # "unmerged" | "merged" | "mixture"
    merged_adapter: str | None
    rows: tuple[tuple[str, int], ...]         # (request id, tokens to compute this step)


def pack(state: SchedulerState, eligible: Callable[[SeqView], bool] = lambda s: True,
         reserved: Sequence[str] = (), prefill: bool = True, decode: bool = True,
         chunk: int | None = None, order: Callable[[SeqView], Any] | None = None
         ) -> tuple[tuple[str, int], ...]:
    """Fill one step: decode rows first, then prefill chunks, each oldest first (or every row in
    `order`'s order when given, a stable sort: a prefill chunk placed before decode rows leaves a
    token for each that can still follow), within the limits; a chunk that leaves part of its
    prompt for later ends at a whole prefill row. `reserved` adapters take slots up
    front (the merged adapter in mixture mode). A request not yet in the KV cache
    starts only if the pages of its whole prompt fit in the admission room, so new prompts do
    not preempt the requests already running (which may preempt each other when the cache is
    full, newest first: the engine's rule)."""
    lim = state.limits
    chunk = chunk or lim.prefill_chunk
    adapters, rows, tokens, prefill_rows = set(reserved), [], 0, 0
    room = admission_room(state)
    room = math.inf if room is None else room
    decodes = [s for s in state.seqs if s.pending == 1] if decode else []
    prefills = [s for s in state.seqs if s.pending > 1] if prefill else []
    ordered = sorted(decodes + prefills, key=order) if order else decodes + prefills
    decodes_behind = len(decodes)                 # decode rows not yet considered
    for s in ordered:
        decodes_behind -= s.pending == 1
        if len(rows) == lim.max_rows or tokens >= lim.token_budget:
            break
        if not eligible(s) or (s.adapter is not None and s.adapter not in adapters
                               and len(adapters) >= lim.max_adapters):
            continue
        if s.pending > 1 and prefill_rows == (lim.max_prefill_rows or lim.max_rows):
            continue
        keep = min(decodes_behind, lim.max_rows - len(rows) - 1) if s.pending > 1 else 0
        left = lim.token_budget - tokens - keep
        n = min(s.pending, chunk, left)
        if n > 1 and (n < s.pending or lim.prefill_positions(n) > left):    # stops inside its prompt:
            n = n // lim.prefill_width * lim.prefill_width                  # at a whole row
        need = 0 if s.context else lim.pages(s.pending)      # joining the cache: its whole prompt
        if n < 1 or need > max(room, 0):
            continue
        room -= need
        rows.append((s.id, n))
        tokens += lim.positions([n])
        prefill_rows += s.pending > 1
        if s.adapter is not None:
            adapters.add(s.adapter)
    return tuple(rows)


class CostModel:
    """Step time per mode = fixed + per_token * positions (the token positions the step computes,
    prefill chunks in whole rows: BatchLimits.positions) + per_lora_token * lora_units
    + per_adapter * adapters (adapters the LoRA branch reads; none in merged mode)
    + per_kv * kv (cache positions the rows' attention reads: each row's context plus its new
    tokens; without this term, long-context decode rows, whose count follows the adapters',
    would be charged to the LoRA branch).

    Refitted online (every 8 steps) in two levels, each a fit of least relative error pulled
    towards a prior by `prior_weight` pseudo-steps (`_fit`; steps that compiled never reach it):
    shared coefficients over the steps of every mode, towards the initial prior; then each
    mode's own, over its last `window` steps, towards the shared ones. A mode seen rarely or
    only at one step shape (collinear features) thus borrows what the others measured, instead
    of extrapolating from a degenerate fit or trusting an untested prior."""

    def __init__(self, fixed: float = 2e-3, per_token: float = 2e-5, per_lora_token: float = 5e-6,
                 per_adapter: float = 5e-5, per_kv: float = 2e-7, switch: float = 5e-3, window: int = 256,
                 prior_weight: float = 0.25):
        self.prior = np.array([fixed, per_token, per_lora_token, per_adapter, per_kv])
        self.shared = self.prior.copy()
        self.coef = {mode: self.prior.copy() for mode in MODES}
        self.switch, self.prior_weight = switch, prior_weight
        self._obs = {mode: collections.deque(maxlen=window) for mode in MODES}
        self.observed = 0                 # steps observed so far

    @staticmethod
    def lora_units(mode: str, merged: str | None, rows: Sequence[tuple[str | None, int]]) -> float:
        """Token-deltas the LoRA branch computes: unmerged, one per adapter token; mixture, none
        for the merged adapter's tokens, two (own + subtract) for other adapters', one for base
        tokens; merged, none."""
        if mode == "merged":
            return 0.0
        if mode == "unmerged":
            return float(sum(n for a, n in rows if a is not None))
        return float(sum(0 if a == merged else (2 * n if a is not None else n) for a, n in rows))

    @staticmethod
    def features(mode: str, merged: str | None, rows: Sequence[tuple[str | None, int]], kv: int = 0,
                 positions: int | None = None) -> np.ndarray:
        """[1, positions, lora_units, adapters, kv] of a step (positions: its tokens when not given)."""
        adapters = 0 if mode == "merged" else len({a for a, _ in rows if a is not None}
                                                   | ({merged} if mode == "mixture" else set()))
        positions = sum(n for _, n in rows) if positions is None else positions
        return np.array([1.0, positions, CostModel.lora_units(mode, merged, rows), adapters, kv])

    def step_time(self, mode: str, merged: str | None, rows: Sequence[tuple[str | None, int]], kv: int = 0,
                  positions: int | None = None) -> float:
        return self.step_time_of(mode, self.features(mode, merged, rows, kv, positions))

    MIN_STEP_S = 1e-5
    """No step is priced below this (a fit may drive every coefficient to 0)."""

    def step_time_of(self, mode: str, features: np.ndarray) -> float:
        """Seconds a step of these `features` takes in `mode`, as the model stands (>= MIN_STEP_S)."""
        return max(float(features @ self.coef[mode]), self.MIN_STEP_S)

    def observe(self, mode: str, features: np.ndarray, seconds: float) -> None:
        self._obs[mode].append((*features, seconds))
        self.observed += 1
        if self.observed % 8:
            return
        every = [o for obs in self._obs.values() for o in obs]
        self.shared = self._fit(np.asarray(every, np.float64), self.prior)
        for m, obs in self._obs.items():
            self.coef[m] = self._fit(np.asarray(obs, np.float64), self.shared) if len(obs) >= 8 else self.shared

    @property
    def observations(self) -> dict[str, list[list[float]]]:
        """The steps the current fits draw on, per mode: [features..., seconds] each (what a replay
        of the model over a step log starts from)."""
        return {mode: [list(map(float, o)) for o in obs] for mode, obs in self._obs.items()}

    def _fit(self, data: np.ndarray, prior: np.ndarray) -> np.ndarray:
        """Non-negative coefficients for rows [features..., seconds] minimising the steps'
        relative errors in absolute value (iteratively reweighted least squares: a stall a
        hundred times a step's time pulls no harder than any other error, and the few long
        steps, which carry the per-token terms, count as much as the many short ones), plus
        `prior_weight` rows pulling each coefficient to `prior` (scaled by its feature's typical
        size); a coefficient that comes out negative is fixed at 0 and the rest solved again."""
        x, y = data[:, :-1], np.maximum(data[:, -1], 1e-6)
        scale = np.maximum(np.median(np.abs(x), axis=0), 1.0) * np.sqrt(self.prior_weight) / np.median(y)

        def solve(weight):
            coef, free = np.zeros(x.shape[1]), np.ones(x.shape[1], bool)
            while free.any():
                a = np.vstack([x[:, free] * weight[:, None], np.diag(scale[free])])
                b = np.concatenate([y * weight, (scale * prior)[free]])
                coef[free] = np.linalg.lstsq(a, b, rcond=None)[0]
                if coef.min() >= 0:
                    break
                free[np.argmin(coef)], coef[np.argmin(coef)] = False, 0.0
            return coef

        weight = 1.0 / y
        for _ in range(3):
            coef = solve(weight)
            relative = np.abs(y - x @ coef) / y
            weight = 1.0 / (y * np.sqrt(np.maximum(relative, 0.01)))
        return coef if np.all(np.isfinite(coef)) else prior

    def observe_switch(self, seconds: float) -> None:
        self.switch = 0.5 * self.switch + 0.5 * seconds


class Policy(abc.ABC):
    """decide(state) -> Decision, and nothing else (a policy may keep its own schedule's state)."""

    name = "base"

    @abc.abstractmethod
    def decide(self, state: SchedulerState) -> Decision:
        """The mode and rows of the next step."""


def _top_adapter(seqs: Sequence[SeqView]) -> str | None:
    counts = collections.Counter(s.adapter for s in seqs if s.adapter is not None)
    return counts.most_common(1)[0][0] if counts else None


class UnmergedPolicy(Policy):
    name = "unmerged"

    def decide(self, state):
        return Decision("unmerged", None, pack(state))


class PunicaPolicy(Policy):
    """Prefill steps (whole prompts, up to the token budget) run apart from decode steps; a
    prefill starts only while fewer than max_rows requests are decoding (the running batch)."""

    name = "punica"

    def decide(self, state):
        room = state.limits.max_rows - sum(s.pending == 1 for s in state.seqs)
        rows = pack(dataclasses.replace(state, limits=dataclasses.replace(state.limits, max_rows=room)),
                    decode=False, chunk=state.limits.token_budget) if room > 0 else ()
        return Decision("unmerged", None, rows or pack(state, prefill=False))


class DLoRAPolicy(Policy):
    name = "dlora"

    def __init__(self, alpha: float = 1.0, beta: float = 0.5):
        self.alpha, self.beta, self.merged = alpha, beta, None

    def decide(self, state):
        batch = min(len(state.seqs), state.limits.max_rows)
        count = collections.Counter(s.adapter for s in state.seqs)
        if self.merged is not None and count[self.merged] <= self.beta * batch:
            self.merged = None
        top = _top_adapter(state.seqs)
        if self.merged is None and top is not None and count[top] >= self.alpha * batch:
            self.merged = top
        m = self.merged
        rows = pack(state, eligible=lambda s: s.adapter == m) if m is not None else ()
        # none of its requests can run (their prompts wait for KV pages others hold): unmerged
        return Decision("merged", m, rows) if rows else Decision("unmerged", None, pack(state))


class MergedOnlyPolicy(Policy):
    """Serve the oldest request's adapter, merged, until none of its requests remain."""

    name = "merged"

    def __init__(self):
        self.current: str | None = None
        self.started = False

    def decide(self, state):
        live = {s.adapter for s in state.seqs}
        if not self.started or self.current not in live:
            self.current, self.started = state.seqs[0].adapter, True
        a = self.current
        rows = pack(state, eligible=lambda s: s.adapter == a)
        return Decision("unmerged" if a is None else "merged", a, rows)


class VLoRAPolicy(Policy):
    """Per step, the candidate that adds the least average token latency (V-LoRA's metric: each
    request's latency over its output tokens, so a request weighs w = 1/output_tokens), relative
    to running every packable row R_u unmerged (time t_u). While R_u holds every live request:

        dL(c) = W_live * (t_c + t_E - t_u) + W_E * t_c

    with E = the rows of R_u that candidate c leaves out, t_E the time of a step of those rows
    alone and W the summed weights: work left out is not saved but done in a step of its own
    later, so every live request waits for that step's extra cost, and the rows left out wait
    through this step as well. So merged(a) wins when (nearly) every request is a's, mixture(a)
    when a dominates, and neither leaves out a one-pass task-head request (w = 1) lightly.
    Under load (requests beyond R_u), steps run back to back whatever is chosen, and what
    counts is the time per unit of work:

        dL(c) = W_live * (t_c - U(c) * t_u / U(u))

    with U(rows) = their unmerged cost with each row's share of a full step's fixed cost: a
    merged step of the hot adapter's rows wins when it does the same work in less time, while
    one of a few rows does not. Candidates: unmerged, mixture(a) and merged(a) for the top
    adapter and the currently merged one; times come from the cost model, with a merge switch
    amortised over `horizon` steps; mixture(a) only where it computes fewer LoRA token-deltas than
    unmerged on its rows (a's tokens outnumber the others'), for otherwise it does more LoRA work
    in more kernel launches, whatever the cost model predicts. Rows are packed by Smith's rule
    (least work left per weight first, `SeqView.work_left`): decodes and one-pass (task-head)
    prompts together (a visual-QA answer's prompt before the decode rows of long generations,
    which then wait a step when the rows are full; a clip's long prompt after short decodes),
    then the prompts of generations.
    A request's wait is its time live outside the steps that ran (`SeqView.waited`), so a
    request left out again and again, a token at a time, runs out of credit once, not once per
    token. One that has waited longer than `starvation_bound` seconds goes before the others of
    its group (a generation's prompt thus before the other generations' prompts, still after the
    decodes and one-pass prompts: when the rows are full, these keep their rows), and merged(a)
    is ruled out while any request the unmerged step would serve, of another adapter, has waited
    that long. A generation's prompt that has waited longer than `overdue_bound` joins the
    decodes and one-pass prompts, where its credit puts it before those that have not waited
    past the starvation bound (under overload, a stream of one-pass prompts kept it waiting)."""

    name = "ours"

    def __init__(self, starvation_bound: float = 0.5, overdue_bound: float = 2.0, horizon: int = 16):
        self.starvation_bound, self.overdue_bound, self.horizon = starvation_bound, overdue_bound, horizon

    def decide(self, state):
        cost = state.cost or CostModel()
        adapter_of = {s.id: s.adapter for s in state.seqs}
        weight = {s.id: 1.0 / s.output_tokens for s in state.seqs}
        context = {s.id: s.context for s in state.seqs}

        def step_time(mode, a, rows):
            t = cost.step_time(mode, a, [(adapter_of[i], n) for i, n in rows],
                                    kv=sum(context[i] + n for i, n in rows),
                                    positions=state.limits.positions([n for _, n in rows]))
            return t + (cost.switch / self.horizon if mode != "unmerged" and a != state.merged_adapter else 0.0)

        def does_less_lora_work(a, rows):      # else mixture(a) runs more LoRA deltas, in more launches, than
            rows = [(adapter_of[i], n) for i, n in rows]     # unmerged on the same rows: never faster
            return CostModel.lora_units("mixture", a, rows) < CostModel.lora_units("unmerged", None, rows)

        starving = lambda s: s.waited > self.starvation_bound
        smith = lambda s: s.work_left * s.output_tokens
        order = lambda s: (s.pending > 1 and s.output_tokens > 1 and s.waited <= self.overdue_bound, not starving(s),
                           smith(s))
        fill = functools.partial(pack, state, order=order)
        unmerged = fill()
        t_u = step_time("unmerged", None, unmerged)
        in_unmerged = {i for i, _ in unmerged}
        serves_unmerged = [s for s in state.seqs if s.id in in_unmerged]
        saturated = len(in_unmerged) < len(state.seqs)          # more steps follow whatever runs now
        live = sum(weight.values())
        # a batch's work: what its rows would cost unmerged, each with its share of a full step's fixed cost
        empty = step_time("unmerged", None, [])
        work = lambda rows: step_time("unmerged", None, rows) - empty + empty * len(rows) / state.limits.max_rows
        unmerged_work = work(unmerged) if unmerged else 0.0
        seconds_per_work = t_u / unmerged_work if unmerged_work > 0 else 0.0
        best, best_dl = Decision("unmerged", None, unmerged), 0.0
        for a in dict.fromkeys(x for x in (_top_adapter(state.seqs), state.merged_adapter) if x is not None):
            candidates = [("mixture", fill(reserved=[a]))]
            if not any(starving(s) for s in serves_unmerged if s.adapter != a):
                candidates.append(("merged", fill(eligible=lambda s, a=a: s.adapter == a)))
            for mode, rows in candidates:
                if not rows or (mode == "mixture" and not does_less_lora_work(a, rows)):
                    continue
                chosen = {i for i, _ in rows}
                left_out = [(i, n) for i, n in unmerged if i not in chosen]
                t_c, w_e = step_time(mode, a, rows), sum(weight[i] for i, _ in left_out)
                if saturated:    # steps follow back to back: what counts is the time per unit of work, and
                    # the rows left out wait through this step while those taken in their place do not
                    w_i = sum(weight[i] for i in chosen - in_unmerged)
                    dl = live * (t_c - work(rows) * seconds_per_work) + w_e * t_c - w_i * t_u
                else:            # left-out rows cost a step of their own later, and wait through this one
                    t_e = step_time("unmerged", None, left_out) if left_out else 0.0
                    dl = live * (t_c + t_e - t_u) + w_e * t_c
                if dl < best_dl:
                    best, best_dl = Decision(mode, a, rows), dl
        return best


class ProbePolicy(Policy):
    """A calibration schedule, not a serving policy: steps cycle through unmerged, merged(a) and
    mixture(a) for the top adapter, so that the engine's step-time model (which it feeds every
    step) measures each mode at the batch shapes of the trace it runs, as a server does at
    start-up before ours schedules with that model. Switches are merges of the same (top)
    adapter, so they are rare."""

    name = "probe"

    def __init__(self):
        self._steps = 0

    def decide(self, state):
        mode, self._steps = MODES[self._steps % len(MODES)], self._steps + 1
        a = _top_adapter(state.seqs)
        if mode == "unmerged" or a is None:
            return Decision("unmerged", None, pack(state))
        rows = pack(state, eligible=lambda s: s.adapter == a) if mode == "merged" else pack(state, reserved=[a])
        return Decision(mode, a, rows)


class FixedModePolicy(Policy):
    """Every step in one mode, for callers that fix it (serve.generate.Generator): unmerged, or
    merged / mixture with `adapter` folded in (merged runs only that adapter's requests)."""

    name = "fixed"

    def __init__(self, mode: str, adapter=None):
        if mode not in MODES or (mode != "unmerged") != (adapter is not None):
            raise ValueError(f"mode {mode!r} with adapter {adapter!r}: merged and mixture need one, unmerged none")
        self.mode, self.adapter = mode, adapter

    def decide(self, state):
        a = self.adapter
        if self.mode == "merged":
            return Decision("merged", a, pack(state, eligible=lambda s: s.adapter == a))
        return Decision(self.mode, a, pack(state, reserved=[a] if a is not None else ()))


@dataclasses.dataclass(frozen=True)
class ServingSystem:
    """A serving system to compare: its scheduling policy and the engine mechanics it runs on."""

    policy: Callable[[], Policy]
    static_tiles: bool = False
    """The LoRA kernel with one fixed tile (static-tiling servers): the runner's "pallas-static"."""
    per_layer_switch: bool = False
    """Merge and unmerge one weight at a time (dLoRA) instead of in one call (EngineConfig)."""

    def backend(self, backend: str) -> str:
        """The LoRA backend this system runs where `backend` would run ours."""
        compiled = backend in ("pallas", "pallas-triton", "pallas-mosaic")
        return "pallas-static" if self.static_tiles and compiled else backend


SYSTEMS: dict[str, ServingSystem] = {
    "ours": ServingSystem(VLoRAPolicy), "unmerged": ServingSystem(UnmergedPolicy),
    "slora": ServingSystem(UnmergedPolicy, static_tiles=True), "punica": ServingSystem(PunicaPolicy, static_tiles=True),
    "dlora": ServingSystem(DLoRAPolicy, per_layer_switch=True), "merged": ServingSystem(MergedOnlyPolicy),
}
"""`valora serve --policy` and bench/e2e.py's systems, by name."""
