"""The model's device state and its jitted functions: steps, image encoding, slot writes, merging.

`ModelRunner` splits an `LMM` into base params, LoRA slots and merged weights, and compiles
  step(cache, blocks, mode)     one prefill/decode step over the paged cache (cache donated)
  sample_step(..., sampling)    the same step, each row's next token sampled inside it (serving)
  decode_loop(..., steps)       several decode steps in one call, each feeding its tokens to the next
  encode_images(pixels, slots)  vision tower + projector
  write_slot(slot, adapter)     place an adapter's weights in a device slot (slots donated)
  merge(slot)                   fold a slot's adapter into every targeted weight in one call
The blocks a step takes are packed on the host by `valora_jax.blocks`.
"""

import collections
import concurrent.futures
import contextlib
import dataclasses
import functools
import gc
import os
import threading
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import monitoring

from pallas_kernels.tiling import device_kernels, runs_mosaic
from valora_jax.adapters import Adapter, Layout, PackedAdapter, unpack
from valora_jax.blocks import bucket
from valora_jax.decoder import ATTENTION_BACKENDS, Block
from valora_jax.lora import (BACKEND_KERNELS, BACKENDS, MODES, PAD_SLOT, LoraContext, LoraSlot, LoraWeight,
                             MergedWeight, adapter_slots, merge_parts, merged_kernel, module_path, module_shapes,
                             targeted_linears)
from valora_jax.model import LMM, split_model
from valora_jax.qwen_vision import Grid, PatchLayout, patch_layout
from valora_jax.sampling import sample


_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
_compile_seconds_by_thread: collections.Counter = collections.Counter()
_compile_seconds_by_function: collections.Counter = collections.Counter()


def _count_compile(event: str, seconds: float, fun_name: str = "?", **_) -> None:
    if event == _COMPILE_EVENT:       # reported on the thread that compiled
        _compile_seconds_by_thread[threading.get_ident()] += seconds
        _compile_seconds_by_function[fun_name] += seconds


monitoring.register_event_duration_secs_listener(_count_compile)


def compile_seconds(this_thread: bool = False) -> float:
    """Seconds this process (or, with this_thread, the calling thread alone) has spent in XLA
    compilation so far, loading compiled executables from the persistent cache included: the
    difference over a step tells whether the step compiled, whatever other threads compile."""
    if this_thread:
        return _compile_seconds_by_thread[threading.get_ident()]
    return sum(_compile_seconds_by_thread.values())


def compile_seconds_by_function() -> collections.Counter:
    """compile_seconds() split by jitted function name (a copy)."""
    return collections.Counter(_compile_seconds_by_function)


def compile_lowered(lowered, threads: int = 8) -> int:
    """Compile jax Lowered objects on `threads` workers (XLA compiles in parallel); their count."""
    lowered = list(lowered)
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda low: low.compile(), lowered))
    return len(lowered)


# XLA flags the serving entry points run with: CUDA-graph command buffers make a 7B decode step
# slower (bench/results/step_overhead.md: 15.2 -> 12.1 ms merged, 21.1 -> 16.2 ms unmerged without them)
SERVING_XLA_FLAGS = {"--xla_gpu_enable_command_buffer": ""}
# A serving process owns its GPU: XLA's allocator may take 90% of its memory instead of 75%. At 7B
# the weights, their merged copies and 32 GiB of KV pages take 62 GiB, and a step's activations
# and a benchmark's second (static-tile) runner come on top.
SERVING_ENV = {"XLA_PYTHON_CLIENT_MEM_FRACTION": "0.90"}


def use_serving_xla_flags() -> str:
    """Add each of SERVING_XLA_FLAGS that $XLA_FLAGS does not already set, and each of SERVING_ENV
    the environment does not set (the user's value wins); the resulting $XLA_FLAGS. XLA reads them
    once per process, so call this before the first computation."""
    for name, value in SERVING_ENV.items():
        os.environ.setdefault(name, value)
    flags = os.environ.get("XLA_FLAGS", "").split()
    named = {flag.split("=", 1)[0] for flag in flags}
    flags += [f"{name}={value}" for name, value in SERVING_XLA_FLAGS.items() if name not in named]
    os.environ["XLA_FLAGS"] = " ".join(flags)
    return os.environ["XLA_FLAGS"]


@contextlib.contextmanager
def frozen_heap():
    """Keep the objects alive on entry (model, compiled steps, adapters, a benchmark's earlier
    results) out of Python's garbage collections until exit (`gc.freeze`), so that a collection
    while serving scans only what serving allocated: a full collection over the whole heap
    stops the serving loop for seconds. Garbage is collected on entry; on exit the objects are
    unfrozen, so later collections free those that became garbage. Yields how many were frozen."""
    gc.collect()
    gc.freeze()
    try:
        yield gc.get_freeze_count()
    finally:
        gc.unfreeze()


def resolve_backends(backend: str = "auto", attention: str = "auto") -> tuple[str, str]:
    """The concrete (LoRA, attention) backends on this process's JAX platform.

    "auto" picks the Pallas kernels ("pallas") on a GPU and the plain-jnp references elsewhere.
    An explicit choice is honoured or refused, never replaced: the compiled kernels ("pallas",
    "pallas-triton", "pallas-mosaic", "pallas-static") need a GPU, the Mosaic GPU ones a Hopper
    (compute capability 9.x); "reference" and the "-interpret" backends run anywhere.
    Raises ValueError naming an unknown or impossible choice."""
    platform = jax.default_backend()
    resolved = []
    for kind, choice, known in (("LoRA", backend, BACKENDS), ("attention", attention, ATTENTION_BACKENDS)):
        if choice == "auto":
            choice = "pallas" if platform == "gpu" else "reference"
        elif choice not in known:
            raise ValueError(f"unknown {kind} backend {choice!r}; expected 'auto' or one of {known}")
        elif choice in ("pallas", "pallas-triton", "pallas-mosaic", "pallas-static") and platform != "gpu":
            raise ValueError(f"{kind} backend {choice!r} runs compiled GPU kernels, but JAX's platform here is "
                             f"{platform!r}; choose 'auto', 'reference' or 'pallas-interpret'")
        elif choice == "pallas-mosaic" and not runs_mosaic():
            raise ValueError(f"LoRA backend 'pallas-mosaic' runs Mosaic GPU kernels for Hopper (compute capability "
                             f"9.x), but this GPU is {_device_name()}; choose 'pallas-triton' or 'pallas'")
        resolved.append(choice)
    return resolved[0], resolved[1]


def _device_name() -> str:
    device = jax.devices()[0]
    return f"{device.device_kind} (compute capability {getattr(device, 'compute_capability', 'unknown')})"


def lora_kernels(backend: str) -> str | None:
    """The ATMM kernels a LoRA backend runs ("triton" / "mosaic"), None for the reference."""
    if backend == "pallas":
        return device_kernels(jax.devices()[0].device_kind)
    return BACKEND_KERNELS.get(backend)


class Sampling(NamedTuple):
    """How to draw the next token of each output row of a step (the blocks' rows in order; see
    sampling.sample): temperature [R] float32 (0: greedy), top_p [R] float32, seed [R] uint32,
    step [R] int32 (tokens the row's request has generated so far)."""

    temperature: np.ndarray
    top_p: np.ndarray
    seed: np.ndarray
    step: np.ndarray

    @classmethod
    def greedy(cls, rows: int) -> "Sampling":
        return cls(np.zeros(rows, np.float32), np.ones(rows, np.float32), np.zeros(rows, np.uint32),
                   np.zeros(rows, np.int32))


@dataclasses.dataclass(frozen=True)
class ImageFeatures:
    """One image's features, left on the device: rows [start, start + count) of `rows` [R, D],
    the encoder's output for the call that encoded it (with other images). len() = count."""

    rows: jax.Array
    start: int
    count: int

    def __len__(self) -> int:
        return self.count


class Feed(NamedTuple):
    """Tokens a step takes from the device rather than the host (the engine dispatches a step
    before it has read the tokens of the one before): tokens [L] int32, the padded output of an
    earlier step given a feed of L tokens; index [B] int32 per row of the step's first block,
    which must be a decode block (one token a row): the entry of `tokens` that is the row's token,
    -1 where the block's own token stands."""

    tokens: jax.Array
    index: np.ndarray


def _fed(block: Block, feed: Feed | None) -> Block:
    """The decode block with its fed rows' tokens taken from feed.tokens."""
    if feed is None or not feed.index.shape[0]:
        return block
    fed = jnp.where(feed.index >= 0, feed.tokens[jnp.maximum(feed.index, 0)], block.tokens[:, 0])
    return block._replace(tokens=fed[:, None])


def _padded(tokens: jax.Array, feed: Feed | None) -> jax.Array:
    """A step's tokens [R], padded to feed's L with zeros when it has a feed (to feed the next)."""
    return tokens if feed is None else jnp.zeros(feed.tokens.shape, tokens.dtype).at[: tokens.shape[0]].set(tokens)


def _feed_spec(tokens: int | None, first: Block) -> Feed | None:
    """The abstract Feed of `tokens` tokens for a step whose first block is `first` (abstract)."""
    if tokens is None:
        return None
    rows = first.tokens.shape[0] if first.tokens.shape[1] == 1 else 0
    return Feed(jax.ShapeDtypeStruct((tokens,), jnp.int32), jax.ShapeDtypeStruct((rows,), jnp.int32))


def token_slots(blocks: Sequence[Block]) -> jax.Array:
    """[sum of B*Q] int32: each token's adapter slot, its row's, PAD_SLOT for the padding tokens
    (which then cost the LoRA branch nothing, in mixture mode too)."""
    return jnp.concatenate([jnp.where(blk.valid, blk.slot[:, None], PAD_SLOT).reshape(-1) for blk in blocks])


def _abstract(tree):
    """The tree with each array replaced by its shape and dtype (what lowering needs; also safe
    to take while another thread donates the arrays)."""
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), tree)


def _path_key(path) -> tuple[str, str]:
    """(module path, variable name) of a flat nnx-state leaf's key path (which ends [variable].value)."""
    return module_path(k.key for k in path[:-2]), path[-2].key


def _flat_state(name: str, doc: str) -> property:
    """A runner attribute kept as flat leaves (what the jitted functions take: passing nnx states
    would flatten thousands of leaves in Python on every call) and seen as an nnx state."""
    def get(self):
        return jax.tree.unflatten(self._defs[name], self._leaves[name])

    def set(self, state):
        leaves, treedef = jax.tree.flatten(state)
        if name in self._defs and treedef != self._defs[name]:
            raise ValueError(f"{name} must keep the structure of the runner's model")
        self._defs[name], self._leaves[name] = treedef, tuple(leaves)

    return property(get, set, doc=doc)


class ModelRunner:
    """Owns the device state of one model and the jitted functions over it.

    Slot writes and merges donate the previous LoRA-slot and merged-weight buffers, so two
    runners must not share those arrays: build each runner from its own model (or copy them)."""

    params = _flat_state("params", "The base weights (an nnx state).")
    lora = _flat_state("lora", "The adapter slots of every targeted linear (an nnx state).")
    merged = _flat_state("merged", "The merged copies of the targeted weights (an nnx state).")

    def __init__(self, model: LMM, *, backend: str = "auto", attention: str = "auto"):
        """backend: the LoRA branch's ("auto" or one of lora.BACKENDS); attention: paged attention's
        ("auto" or one of decoder.ATTENTION_BACKENDS: "pallas" = the paged decode-attention kernel
        for decode rows and the flash prefill kernel for prefill chunks); resolve_backends says
        what "auto" picks and which choices run here. `backend` and `attention` hold the result."""
        self.config = model.config
        self.backend, self.attention = resolve_backends(backend, attention)
        self.module_shapes = module_shapes(model)
        self._defs, self._leaves = {}, {}
        self.graphdef, self.params, self.lora, self.merged = split_model(model)
        self.merged_slot = -1          # slot whose adapter the merged weights hold (-1: none yet)
        self._step = jax.jit(self._step_impl, static_argnames="mode", donate_argnames="cache")
        self._sample_step = jax.jit(self._sample_step_impl, static_argnames=("mode", "vocab_size"),
                                    donate_argnames="cache")
        self._decode_loop = jax.jit(self._decode_loop_impl, static_argnames=("mode", "vocab_size", "steps"),
                                    donate_argnames="cache")
        self._encode = jax.jit(self._encode_impl, static_argnames="mode")
        self._encode_patches = jax.jit(self._encode_patches_impl, static_argnames="mode")
        self._write = jax.jit(self._write_impl, static_argnames="layout", donate_argnames="lora")
        self._merge = jax.jit(self._merge_impl, donate_argnames="merged", keep_unused=True)
        self._merge_one = jax.jit(self._merge_one_impl, static_argnames=("columns", "whole"),
                                  donate_argnames="merged")

    def model(self) -> LMM:
        """A module view of the current state (for eager use in tests and tools)."""
        return self._model(*self._state_leaves())

    def twin(self, backend: str | None = None, attention: str | None = None) -> "ModelRunner":
        """A runner on the same base weights (shared, never written) with its own copies of the
        adapter slots and merged weights, optionally on other backends."""
        twin = ModelRunner(self.model(), backend=backend or self.backend, attention=attention or self.attention)
        twin.lora, twin.merged = jax.tree.map(jnp.copy, (twin.lora, twin.merged))
        twin.merged_slot = self.merged_slot
        return twin

    def wait_merged(self) -> None:
        """Block until the last merge has finished (what a timed switch waits for)."""
        jax.block_until_ready(self._leaves["merged"])

    def _state_leaves(self) -> tuple:
        return self._leaves["params"], self._leaves["lora"], self._leaves["merged"]

    def _decoder_leaves(self, mode: str) -> tuple:
        """The leaves a step in `mode` reads (_step_index), as (params, lora, merged) tuples: the
        fewer arrays a call passes, the cheaper its dispatch. Picked again only after a slot write
        or merge replaced the leaves, not on every step."""
        state = self._state_leaves()
        picked = self.__dict__.setdefault("_decoder_picked", {}).get(mode)
        if picked is None or any(a is not b for a, b in zip(picked[0], state)):
            picked = self._decoder_picked[mode] = (state, tuple(
                tuple(leaves[i] for i in self._step_index[mode][name])
                for name, leaves in zip(("params", "lora", "merged"), state)))
        return picked[1]

    @functools.cached_property
    def _step_index(self) -> dict[str, dict[str, tuple[int, ...]]]:
        """{mode: {state name: indices of the leaves a step in that mode reads}}: the decoder's
        (the vision tower's are not passed), less the adapter slots in merged mode, the merged
        copies in unmerged mode, and the base kernels that a merged copy stands in for in merged
        and mixture modes."""
        paths = {name: [(path[0].key, _path_key(path)) for path, _ in
                        jax.tree_util.tree_flatten_with_path(getattr(self, name))[0]]
                 for name in ("params", "lora", "merged")}
        replaced = {(module_path(path), "kernel") for path, lin in targeted_linears(self.model())
                    if lin.merged is not None}
        reads = {"unmerged": ("params", "lora"), "merged": ("params", "merged"),
                 "mixture": ("params", "lora", "merged")}
        return {mode: {name: tuple(i for i, (top, key) in enumerate(p)
                                   if top == "decoder" and name in reads[mode]
                                   and not (mode != "unmerged" and name == "params" and key in replaced))
                       for name, p in paths.items()} for mode in MODES}

    # jitted bodies ---------------------------------------------------------------------------
    def _ctx(self, slot, merged_slot, mode) -> LoraContext:
        return LoraContext(slot, merged_slot, mode, self.backend)

    def _model(self, params, lora, merged) -> LMM:
        """The module from flat leaves (inside the jitted bodies: unflattened at trace time)."""
        states = [jax.tree.unflatten(self._defs[n], leaves)
                  for n, leaves in (("params", params), ("lora", lora), ("merged", merged))]
        return nnx.merge(self.graphdef, *states)

    def _decoder_model(self, params, lora, merged, mode: str) -> LMM:
        """The module from the leaves a step in `mode` reads (_decoder_leaves); the others are None."""
        full = []
        for name, leaves in (("params", params), ("lora", lora), ("merged", merged)):
            given = dict(zip(self._step_index[mode][name], leaves))
            full.append(tuple(given.get(i) for i in range(len(self._leaves[name]))))
        return self._model(*full)

    def _step_impl(self, params, lora, merged, cache, blocks, image_features, merged_slot, mode: str):
        """A step over the leaves a step in `mode` reads (params, lora, merged: _decoder_leaves)."""
        model = self._decoder_model(params, lora, merged, mode)
        return model.step(cache, blocks, image_features, self._ctx(token_slots(blocks), merged_slot, mode),
                          self.attention)

    def _sample_step_impl(self, params, lora, merged, cache, blocks, image_features, merged_slot, sampling, feed,
                          mode: str, vocab_size: int):
        blocks = (_fed(blocks[0], feed), *blocks[1:])
        hidden, logits, cache = self._step_impl(params, lora, merged, cache, blocks, image_features, merged_slot,
                                                mode)
        return hidden, _padded(sample(logits.at[:, vocab_size:].set(-jnp.inf), *sampling), feed), cache

    def _decode_loop_impl(self, params, lora, merged, cache, block, merged_slot, sampling, feed, mode: str,
                          vocab_size: int, steps: int):
        block = _fed(block, feed)
        model = self._decoder_model(params, lora, merged, mode)
        ctx = self._ctx(token_slots([block]), merged_slot, mode)
        no_features = jnp.zeros((0, self.config.text.hidden_size), jnp.dtype(self.config.dtype))

        def one_step(i, carry):
            cache, block, sampling, out = carry
            _, logits, cache = model.step(cache, [block], no_features, ctx, self.attention)
            tokens = sample(logits.at[:, vocab_size:].set(-jnp.inf), *sampling)
            block = block._replace(tokens=tokens[:, None], positions=block.positions + 1,
                                   rope_positions=None if block.rope_positions is None else block.rope_positions + 1)
            return cache, block, sampling._replace(step=sampling.step + 1), out.at[i].set(tokens)

        out = jnp.zeros((steps, block.tokens.shape[0]), jnp.int32)
        cache, *_, out = jax.lax.fori_loop(0, steps, one_step, (cache, block, sampling, out))
        return out, _padded(out[-1], feed), cache

    def _encode_impl(self, params, lora, merged, pixels, slot, merged_slot, mode):
        model = self._model(params, lora, merged)
        return model.encode_images(pixels, self._ctx(slot, merged_slot, mode))

    def _encode_patches_impl(self, params, lora, merged, patches, layout, slot, merged_slot, mode):
        model = self._model(params, lora, merged)
        return model.visual(patches, layout, self._ctx(slot, merged_slot, mode), self.attention)

    def _write_impl(self, params, lora, merged, slot, buffer, scales, layout: Layout):
        model = self._model(params, lora, merged)
        modules = unpack(buffer, scales, layout)
        for key, slots in adapter_slots(model):
            a, b, scale = modules.get(key, (None, None, None))
            if a is None:   # module the adapter does not touch: an all-zero, rank-0 slot
                a, b, scale = jnp.zeros((slots.d_in, 0)), jnp.zeros((0, slots.d_out)), jnp.float32(0)
            r, r_max = a.shape[1], slots.lora_a.shape[-1]
            dt = slots.lora_a.dtype
            slots.lora_a[...] = slots.lora_a[...].at[slot].set(jnp.pad(a.astype(dt), ((0, 0), (0, r_max - r))))
            slots.lora_b[...] = slots.lora_b[...].at[slot].set(jnp.pad(b.astype(dt), ((0, r_max - r), (0, 0))))
            slots.lora_scale[...] = slots.lora_scale[...].at[slot].set(scale)
            slots.lora_rank[...] = slots.lora_rank[...].at[slot].set(r)
        return tuple(jax.tree.leaves(nnx.state(model, LoraSlot)))

    def _merge_impl(self, params, lora, merged, slot):
        model = self._model(params, lora, merged)
        for _, lin in targeted_linears(model):
            lin.merged[...] = merged_kernel(lin, slot, self.backend)
        return tuple(jax.tree.leaves(nnx.state(model, MergedWeight)))

    def _merge_one_impl(self, merged, kernel, weights, slot, columns: tuple[int, ...], whole: bool):
        """merged_kernel over flat leaves (whole: every part of the weight is targeted)."""
        return merge_parts(kernel, merged if whole else kernel, weights, columns, slot, self.backend)

    # public API ------------------------------------------------------------------------------
    def step(self, cache, blocks: Sequence[Block], image_features, mode: str = "unmerged"):
        """Run the blocks (each with a page table) through the model in one call.

        -> (hidden [R, D], logits [R, V] float32, new cache) for the last valid token of each of
        the R rows, blocks in order. The cache passed in is consumed."""
        return self._step(*self._decoder_leaves(mode), cache, tuple(blocks), image_features,
                          self._merged_slot_for(mode), mode=mode)

    def sample_step(self, cache, blocks: Sequence[Block], image_features, sampling: Sampling, vocab_size: int,
                    mode: str = "unmerged", feed: Feed | None = None):
        """step() that also draws each row's next token in the same call (so the host reads R token
        ids, not R x V logits): -> (hidden [R, D], tokens [R] int32 < vocab_size, new cache). With
        a `feed` of L tokens, the first block's fed rows take their tokens from it, and the tokens
        come back padded to [L] (to feed the next step)."""
        merged_slot = self._merged_slot_for(mode)
        return self._sample_step(*self._decoder_leaves(mode), cache, tuple(blocks), image_features, merged_slot,
                                 Sampling(*(np.asarray(a) for a in sampling)), self._checked(feed, blocks[0]),
                                 mode=mode, vocab_size=vocab_size)

    def decode_loop(self, cache, block: Block, sampling: Sampling, vocab_size: int, steps: int,
                    mode: str = "unmerged", feed: Feed | None = None):
        """`steps` decode steps of one decode block (one token a row) in one call, each step's
        sampled tokens the next one's input at the next position: -> (tokens [steps, R] int32,
        the last step's tokens (padded to [L] given a feed of L tokens, as sample_step), new
        cache). Every row runs every step (a caller drops the tokens after a row's stop); each
        row's page table must already hold its `steps` new positions. The dispatch of one call is
        paid once for all the steps."""
        if block.tokens.shape[1] != 1:
            raise ValueError(f"a decode loop runs one token a row, got a block of {block.tokens.shape[1]}")
        return self._decode_loop(*self._decoder_leaves(mode), cache, block, self._merged_slot_for(mode),
                                 Sampling(*(np.asarray(a) for a in sampling)), self._checked(feed, block),
                                 mode=mode, vocab_size=vocab_size, steps=steps)

    @staticmethod
    def _checked(feed: Feed | None, first: Block) -> Feed | None:
        if feed is None:
            return None
        index = np.asarray(feed.index, np.int32)
        rows = first.tokens.shape[0] if first.tokens.shape[1] == 1 else 0
        if index.shape != (rows,) or (index >= feed.tokens.shape[0]).any():
            raise ValueError(f"feed index {index.tolist()} does not fit a first block of {rows} one-token rows "
                             f"and {feed.tokens.shape[0]} fed tokens")
        return Feed(feed.tokens, index)

    def _merged_slot_for(self, mode: str) -> jax.Array:
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")
        if mode != "unmerged" and self.merged_slot < 0:
            raise ValueError(f"mode {mode!r} needs a merged adapter; call merge(slot) first")
        return jnp.int32(self.merged_slot if mode != "unmerged" else -1)

    def precompile(self, cache, shapes, threads: int = 8) -> int:
        """Compile step variants ahead of their first use, several at a time: `compile_lowered`
        of `lower_steps`. Returns the number of variants compiled."""
        return compile_lowered(self.lower_steps(cache, shapes), threads)

    def lower_steps(self, cache, shapes, vocab_size: int | None = None, feed: int | None = None) -> list:
        """The step variants `shapes`, traced and lowered (not compiled): of sample_step with
        `vocab_size` when given (and a feed of `feed` tokens, when given), else of step.

        shapes: (blocks, n_features, mode) per variant, blocks a tuple of (rows, tokens, pages) per
        block, as pack_block makes them; cache: the cache the steps will run on (only its shapes
        are used). Once compiled, the first real step of each variant finds its executable in
        the jit's caches."""
        spec = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype)
        cache = _abstract(cache)
        d = self.config.text.hidden_size
        lowered = []
        for blocks, n_features, mode in shapes:
            blocks = tuple(self._block_spec(b, q, w) for b, q, w in blocks)
            args = (*self._decoder_leaves(mode), cache, blocks, spec((n_features, d), jnp.dtype(self.config.dtype)),
                    spec((), jnp.int32))
            if vocab_size is None:
                lowered.append(self._step.lower(*args, mode=mode))
            else:
                rows = sum(blk.slot.shape[0] for blk in blocks)
                sampling = Sampling(*(spec((rows,), a.dtype) for a in Sampling.greedy(1)))
                lowered.append(self._sample_step.lower(*args, sampling, _feed_spec(feed, blocks[0]), mode=mode,
                                                       vocab_size=vocab_size))
        return lowered

    def lower_decode_loops(self, cache, shapes, vocab_size: int, steps: int, feed: int | None = None) -> list:
        """decode_loop variants of `steps` steps (with a feed of `feed` tokens, when given),
        traced and lowered as `lower_steps` does: shapes (rows, pages, mode) per variant, a decode
        block of `rows` rows of one token over page tables of `pages` columns."""
        spec = jax.ShapeDtypeStruct
        cache = _abstract(cache)
        lowered = []
        for b, w, mode in shapes:
            block = self._block_spec(b, 1, w)
            sampling = Sampling(*(spec((b,), a.dtype) for a in Sampling.greedy(1)))
            lowered.append(self._decode_loop.lower(*self._decoder_leaves(mode), cache, block, spec((), jnp.int32),
                                                   sampling, _feed_spec(feed, block), mode=mode,
                                                   vocab_size=vocab_size, steps=steps))
        return lowered

    def _block_spec(self, rows: int, tokens: int, pages: int) -> Block:
        """The shapes and dtypes of a block of pack_block (M-RoPE positions where the model has them)."""
        spec = jax.ShapeDtypeStruct
        i32 = lambda *shape: spec(shape, jnp.int32)
        rope = i32(rows, tokens, 3) if self.config.text.mrope_section else None
        return Block(i32(rows, tokens), i32(rows, tokens), spec((rows, tokens), jnp.bool_), i32(rows, tokens),
                     i32(rows), i32(rows, pages), rope)

    def lower_writes(self, layouts) -> list:
        """write_slot of adapters of each distinct layout in `layouts` (adapters.Layout; () is the
        write that clears a slot), traced and lowered (not compiled), as `lower_steps` does."""
        spec, state = jax.ShapeDtypeStruct, _abstract(self._state_leaves())
        return [self._write.lower(*state, spec((), jnp.int32),
                                  spec((sum((d_in + d_out) * r for _, d_in, r, d_out in layout),),
                                       jnp.dtype(self.config.dtype)),
                                  spec((len(layout),), jnp.float32), layout=layout)
                for layout in dict.fromkeys(layouts)]

    def lower_merge(self) -> list:
        """merge, traced and lowered (not compiled), as `lower_steps` does."""
        return [self._merge.lower(*_abstract(self._state_leaves()), jax.ShapeDtypeStruct((), jnp.int32))]

    def lower_encoder(self, counts, mode: str = "unmerged") -> list:
        """The encoder on batches of each of `counts` images, traced and lowered (not compiled),
        as `lower_steps` does for steps. Qwen-VL: on every patch bucket encode_patches may use
        for up to max(counts) of the largest images."""
        spec, v = jax.ShapeDtypeStruct, self.config.vision
        if self.config.is_qwen:
            most = min(self.ENCODER_PATCHES, max(counts) * v.max_tokens_per_image * v.spatial_merge_size ** 2)
            sizes = [1 << k for k in range(6, self._patch_bucket(most).bit_length())]
            i32 = lambda *shape: spec(shape, jnp.int32)
            layout = lambda n: PatchLayout(i32(n), i32(n), i32(n), i32(2, n), i32(n // v.spatial_merge_size ** 2))
            return [self._encode_patches.lower(*self._state_leaves(), spec((n, v.patch_dim), jnp.float32), layout(n),
                                               i32(n), i32(), mode=mode) for n in sizes]
        size = v.image_size
        return [self._encode.lower(*self._state_leaves(), spec((n, size, size, 3), jnp.float32), spec((n,), jnp.int32),
                                   spec((), jnp.int32), mode=mode) for n in counts]

    def encode_images(self, pixels, slot, mode: str = "unmerged") -> jax.Array:
        """LLaVA: pixels [N, H, W, 3], slot [N] -> features [N, P, D]."""
        return self._encode(*self._state_leaves(), pixels, jnp.asarray(slot, jnp.int32),
                            jnp.int32(self.merged_slot), mode=mode)

    ENCODER_PATCHES = 8192
    """Qwen-VL: the most patches one tower call takes."""

    def _patch_bucket(self, n: int) -> int:
        return min(bucket(n, 64), max(self.ENCODER_PATCHES, n))

    def encode_patches(self, patches: Sequence[np.ndarray], grids: Sequence[Grid], slot,
                       mode: str = "unmerged") -> list[ImageFeatures]:
        """Qwen-VL: each image's patches [t*h*w, C*T*p*p] of `grids`, slot [N] (vision adapter
        per image) -> each image's features (t*h*w / m^2 rows of D, left on the device: nothing
        waits for the encoder). Images run together,
        up to ENCODER_PATCHES patches a call (an image larger than that alone), packed into a
        bucketed number of patches: one compile per bucket, whatever the mix of sizes."""
        v = self.config.vision
        units, out = v.spatial_merge_size ** 2, []
        groups, group, total = [], [], 0
        for i, p in enumerate(patches):
            if group and total + len(p) > self.ENCODER_PATCHES:
                groups.append(group)
                group, total = [], 0
            group.append(i)
            total += len(p)
        groups += [group] if group else []
        for group in groups:
            sizes = [len(patches[i]) for i in group]
            n, padded = sum(sizes), self._patch_bucket(sum(sizes))
            layout = patch_layout(v, [grids[i] for i in group]).padded(padded, units)
            buffer = np.zeros((padded, v.patch_dim), np.float32)
            buffer[:n] = np.concatenate([patches[i] for i in group])
            slots = np.full(padded, PAD_SLOT, np.int32)
            slots[:n] = np.repeat(np.asarray(slot, np.int32)[group], sizes)
            feats = self._encode_patches(*self._state_leaves(), buffer, layout, slots,
                                         jnp.int32(self.merged_slot), mode=mode)
            starts = np.cumsum([0, *sizes]) // units
            out += [ImageFeatures(feats, int(a), int(b - a)) for a, b in zip(starts[:-1], starts[1:])]
        return out

    def write_slot(self, slot: int, adapter: Adapter | PackedAdapter | None) -> None:
        """Place `adapter` (or nothing) in device slot `slot` of every targeted module."""
        if not 0 <= slot < self.config.lora.max_loras:
            raise ValueError(f"slot {slot} outside 0..{self.config.lora.max_loras - 1}")
        dtype = jnp.dtype(self.config.dtype)
        if isinstance(adapter, Adapter):
            adapter = PackedAdapter.of(adapter, dtype)
        buffer, scales, layout = (jnp.zeros(0, dtype), jnp.zeros(0), ()) if adapter is None else \
            (jnp.asarray(adapter.buffer), jnp.asarray(adapter.scales), adapter.layout)
        self._leaves["lora"] = self._write(*self._state_leaves(), jnp.int32(slot), buffer, scales, layout=layout)
        if slot == self.merged_slot:
            self.merged_slot = -1     # the merged weights no longer match that slot

    def _check_mergeable(self, slot: int) -> None:
        if not self.config.lora.mergeable:
            raise ValueError("this model was built with LoraConfig.mergeable=False")
        if not 0 <= slot < self.config.lora.max_loras:
            raise ValueError(f"slot {slot} outside 0..{self.config.lora.max_loras - 1}")

    def merge(self, slot: int) -> None:
        """Merged weights := base + the adapter in `slot`, every targeted layer, one call.

        The base weights are only read: unmerging is switching back to mode "unmerged"."""
        self._check_mergeable(slot)
        if slot != self.merged_slot:
            self._leaves["merged"] = self._merge(*self._state_leaves(), jnp.int32(slot))
            self.merged_slot = slot

    def merge_per_layer(self, slot: int) -> None:
        """The same result as merge(slot), one dispatch per targeted weight (the dLoRA-style
        switch, kept as a baseline), straight over the flat leaves: no host work but the
        dispatches."""
        self._check_mergeable(slot)
        params, lora, merged = self._leaves["params"], self._leaves["lora"], list(self._leaves["merged"])
        self.merged_slot, device_slot = -1, jnp.int32(slot)
        for m, k, parts, columns, whole in self._layer_leaves:
            weights = tuple(LoraWeight(*(lora[i] for i in part)) for part in parts)
            merged[m] = self._merge_one(merged[m], params[k], weights, device_slot, columns=columns, whole=whole)
        self._leaves["merged"] = tuple(merged)
        self.merged_slot = slot

    @functools.cached_property
    def _layer_leaves(self) -> list[tuple[int, int, tuple[tuple[int, ...], ...], tuple[int, ...], bool]]:
        """Per targeted weight, the indices of its leaves: (merged, kernel in params, per targeted
        part (lora_a, lora_b, lora_scale, lora_rank) in lora), the parts' first columns, and
        whether every part of it is targeted."""
        def index(name):     # {(module path, variable name): leaf index}
            paths = jax.tree_util.tree_flatten_with_path(getattr(self, name))[0]
            return {_path_key(path): i for i, (path, _) in enumerate(paths)}
        params, lora, merged = index("params"), index("lora"), index("merged")
        return [(merged[(module_path(path), "merged")], params[(module_path(path), "kernel")],
                 tuple(tuple(lora[(module_path((*path, part.attribute)), v)]
                             for v in ("lora_a", "lora_b", "lora_scale", "lora_rank")) for part, _ in lin.slots()),
                 tuple(part.start for part, _ in lin.slots()), len(lin.targeted_parts) == len(lin.parts))
                for path, lin in targeted_linears(self.model())]
