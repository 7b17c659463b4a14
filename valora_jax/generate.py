"""Batch generation: `Generator.generate(requests)` for (images, prompt, adapter) requests.

Requests of a call run together in one static batch: one prefill step for all prompts, then
decode steps until every request has stopped (stop token, stop string or max_tokens).
Requests whose adapter has a task head are answered from the prefill's last hidden state.
Shapes are bucketed (batch, prompt length, pages, images) so repeated calls reuse compiled
steps. Continuous batching on the same steps lives in the serving engine (serve/).
"""

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from valora_jax.adapters import AdapterPool
from valora_jax.kv_cache import PageAllocator, init_pages
from valora_jax.lora import MODES
from valora_jax.request import Completion, Request, RequestState
from valora_jax.runtime import ModelRunner, RowSpec, pack_block
from valora_jax.sampling import make_sampler
from valora_jax.tokenizer import ByteTokenizer


@dataclasses.dataclass
class _Row:
    state: RequestState
    pages: list[int]
    slot: int
    feature_offset: int           # first row of this request's images in the step's image features


class Generator:
    """Runs batches of requests on a ModelRunner with its adapter pool and a paged KV cache."""

    def __init__(self, runner: ModelRunner, pool: AdapterPool, tokenizer=None, num_pages: int = 256):
        self.runner, self.pool = runner, pool
        self.tokenizer = tokenizer or ByteTokenizer()
        cfg = runner.config
        if self.tokenizer.vocab_size > cfg.text.vocab_size:
            raise ValueError(f"tokenizer vocabulary {self.tokenizer.vocab_size} exceeds the model's "
                             f"{cfg.text.vocab_size}")
        self.allocator = PageAllocator(num_pages, cfg.page_size)
        self.cache = init_pages(cfg.text, num_pages, cfg.page_size, jnp.dtype(cfg.dtype))
        self._sample = make_sampler(self.tokenizer.vocab_size)

    def generate(self, requests: Sequence[Request], mode: str = "unmerged",
                 merged_adapter: str | None = None) -> list[Completion]:
        """Complete every request. mode "merged" folds the (single) adapter into the weights;
        "mixture" folds `merged_adapter` in and serves the other requests through deLoRA."""
        if not requests:
            return []
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")
        states = [RequestState.prepare(r, self.runner.config, self.tokenizer) for r in requests]
        names = {r.adapter for r in requests}
        if mode == "merged":
            if len(names) != 1 or None in names:
                raise ValueError(f"merged mode needs every request on one adapter, got {sorted(map(str, names))}")
            merged_adapter = next(iter(names))
        if mode != "unmerged" and merged_adapter is None:
            raise ValueError(f"mode {mode!r} needs merged_adapter")
        slots = self.pool.acquire([*names, merged_adapter])
        for n in slots:
            self.pool.pin(n)
        rows: list[_Row] = []
        try:
            if mode != "unmerged":
                self.runner.merge(slots[merged_adapter])
            offset = 0
            for st in states:
                need = self.allocator.pages_for(len(st.prompt_ids) + st.request.max_tokens)
                rows.append(_Row(st, self.allocator.allocate(need), slots.get(st.request.adapter, -1), offset))
                offset += len(st.pixels) * self.runner.config.tokens_per_image
            self._run(rows, self._encode_images(rows), mode)
        finally:
            for row in rows:
                self.allocator.free(row.pages)
            for n in slots:
                self.pool.unpin(n)
        return [row.state.completion(self.tokenizer) for row in rows]

    def _encode_images(self, rows: list[_Row]) -> jax.Array:
        """Every image of the batch through the vision tower (each with its request's adapter)
        -> features [N*P, D]."""
        pixels = [px for r in rows for px in r.state.pixels]
        if not pixels:
            return jnp.zeros((0, self.runner.config.text.hidden_size), jnp.dtype(self.runner.config.dtype))
        slots = [r.slot for r in rows for _ in r.state.pixels]
        feats = self.runner.encode_images(np.stack(pixels), slots)
        return feats.reshape(-1, feats.shape[-1])

    def _run(self, rows: list[_Row], features, mode: str) -> None:
        prompt = [RowSpec(r.state.prompt_ids, 0, [i + r.feature_offset if i >= 0 else -1 for i in r.state.image_rows],
                          r.slot, r.pages) for r in rows]
        hidden, logits, self.cache = self.runner.step(self.cache, [pack_block(prompt, min_tokens=16)], features, mode)
        self._answer_heads(rows, hidden)
        no_features = features[:0]
        while True:
            tokens = self._sample(logits, [r.state for r in rows])
            for r, t in zip(rows, tokens):
                if r.state.finish is None:
                    r.state.append(int(t), self.tokenizer)
            # finished rows stay in the block as padding so its shape is unchanged
            decode = [RowSpec(r.state.out[-1:] if r.state.finish is None else [], len(r.state.tokens) - 1,
                              [-1], r.slot, r.pages) for r in rows]
            if all(r.state.finish is not None for r in rows):
                return
            _, logits, self.cache = self.runner.step(self.cache, [pack_block(decode)], no_features, mode)

    def _answer_heads(self, rows: list[_Row], hidden: jax.Array) -> None:
        hidden = np.asarray(hidden, np.float32)
        for i, r in enumerate(rows):
            adapter = r.state.request.adapter
            head = self.pool.store[adapter].head if adapter else None
            if head is not None:
                r.state.label, r.state.finish = head.answer(hidden[i]), "stop"
