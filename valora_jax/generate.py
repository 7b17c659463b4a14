"""Batch generation: `Generator.generate(requests)` for (images, prompt, adapter) requests.

Requests of a call run together in one static batch: one prefill step for all prompts, then
decode steps until every request has stopped (stop token, stop string or max_tokens).
Requests whose adapter has a task head are answered from the prefill's last hidden state.
Shapes are bucketed (batch, prompt length, pages, images) so repeated calls reuse compiled
steps. Continuous batching on the same steps lives in the serving engine.
"""

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from valora_jax.adapters import AdapterPool
from valora_jax.decoder import NULL_PAGE, Block
from valora_jax.image import preprocess_batch
from valora_jax.kv_cache import PageAllocator, init_pages
from valora_jax.lora import MODES
from valora_jax.runtime import ModelRunner, bucket
from valora_jax.sampling import sample
from valora_jax.tokenizer import ByteTokenizer


@dataclasses.dataclass(frozen=True)
class Request:
    """prompt: the user's text; images: image sources (bytes, path, PIL image, HxWx3 uint8 array),
    placed before the text; adapter: adapter name or None for the base model."""

    prompt: str
    images: Sequence[Any] = ()
    adapter: str | None = None
    max_tokens: int = 32
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    stop: Sequence[str] = ()


@dataclasses.dataclass(frozen=True)
class Completion:
    text: str
    token_ids: tuple[int, ...]
    finish_reason: str            # "stop" | "length"
    prompt_tokens: int
    label: str | None = None      # the task head's answer, for adapters with a head


@dataclasses.dataclass
class _Row:
    request: Request
    ids: list[int]                # prompt ids, images expanded
    image_rows: list[int]         # per prompt token: row of the image features or -1
    pages: list[int]
    slot: int
    out: list[int] = dataclasses.field(default_factory=list)
    finish: str | None = None
    label: str | None = None


class Generator:
    """Runs batches of requests on a ModelRunner with its adapter pool and a paged KV cache."""

    def __init__(self, runner: ModelRunner, pool: AdapterPool, tokenizer: ByteTokenizer | None = None,
                 num_pages: int = 256):
        self.runner, self.pool = runner, pool
        self.tokenizer = tokenizer or ByteTokenizer()
        cfg = runner.config
        if self.tokenizer.vocab_size > cfg.text.vocab_size:
            raise ValueError(f"tokenizer vocabulary {self.tokenizer.vocab_size} exceeds the model's "
                             f"{cfg.text.vocab_size}")
        self.allocator = PageAllocator(num_pages, cfg.page_size)
        self.cache = init_pages(cfg.text, num_pages, cfg.page_size, jnp.dtype(cfg.dtype))
        vocab = self.tokenizer.vocab_size
        self._sample = jax.jit(lambda logits, *args: sample(logits.at[:, vocab:].set(-jnp.inf), *args))

    def _prepare(self, req: Request) -> tuple[list[int], list[np.ndarray]]:
        cfg = self.runner.config
        if not isinstance(req.prompt, str) or not req.prompt.strip():
            raise ValueError(f"prompt must be non-empty text, got {req.prompt!r}")
        if req.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {req.max_tokens}")
        if req.temperature < 0 or not 0 < req.top_p <= 1:
            raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got {req.temperature}, {req.top_p}")
        v = cfg.vision
        pixels = preprocess_batch(list(req.images), size=v.image_size, mean=v.image_mean, std=v.image_std)
        ids = self.tokenizer.expand_image_tokens(self.tokenizer.prompt_ids(req.prompt, len(req.images)),
                                                 cfg.tokens_per_image)
        if len(ids) + req.max_tokens > cfg.text.max_position:
            raise ValueError(f"prompt of {len(ids)} tokens + max_tokens {req.max_tokens} exceeds the "
                             f"context of {cfg.text.max_position} tokens")
        return ids, list(pixels)

    def generate(self, requests: Sequence[Request], mode: str = "unmerged",
                 merged_adapter: str | None = None) -> list[Completion]:
        """Complete every request. mode "merged" folds the (single) adapter into the weights;
        "mixture" folds `merged_adapter` in and serves the other requests through deLoRA."""
        if not requests:
            return []
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")
        prepared = [self._prepare(r) for r in requests]          # validates everything first
        names = {r.adapter for r in requests}
        if mode == "merged":
            if len(names) != 1 or None in names:
                raise ValueError(f"merged mode needs every request on one adapter, got {sorted(map(str, names))}")
            merged_adapter = next(iter(names))
        if mode != "unmerged" and merged_adapter is None:
            raise ValueError(f"mode {mode!r} needs merged_adapter")
        slots = self.pool.acquire([*names, merged_adapter])
        pinned = list(slots)
        for n in pinned:
            self.pool.pin(n)
        rows: list[_Row] = []
        try:
            if mode != "unmerged":
                self.runner.merge(slots[merged_adapter])
            features = self._encode_images(requests, prepared, slots, mode)
            first_row = 0
            for req, (ids, pixels) in zip(requests, prepared):
                image_rows, k = [], 0
                for t in ids:
                    image_rows.append(first_row + k if t == self.tokenizer.image_id else -1)
                    k += t == self.tokenizer.image_id
                first_row += len(pixels) * self.runner.config.tokens_per_image
                pages = self.allocator.allocate(self.allocator.pages_for(len(ids) + req.max_tokens))
                rows.append(_Row(req, ids, image_rows, pages, slots.get(req.adapter, -1)))
            self._run(rows, features, mode)
        finally:
            for row in rows:
                self.allocator.free(row.pages)
            for n in pinned:
                self.pool.unpin(n)
        return [self._completion(row) for row in rows]

    def _encode_images(self, requests, prepared, slots, mode) -> jax.Array:
        cfg = self.runner.config
        pixels = [p for _, px in prepared for p in px]
        image_slots = [slots.get(r.adapter, -1) for r, (_, px) in zip(requests, prepared) for _ in px]
        if not pixels:
            return jnp.zeros((0, cfg.text.hidden_size), jnp.dtype(cfg.dtype))
        n = bucket(len(pixels))
        batch = np.zeros((n, *pixels[0].shape), np.float32)
        batch[: len(pixels)] = pixels
        feats = self.runner.encode_images(batch, image_slots + [-1] * (n - len(pixels)), mode)
        return feats.reshape(-1, feats.shape[-1])                 # [N*P, D]

    def _run(self, rows: list[_Row], features, mode: str) -> None:
        b = bucket(len(rows))
        width = bucket(max(len(r.pages) for r in rows))
        page_table = np.full((b, width), NULL_PAGE, np.int32)
        for i, r in enumerate(rows):
            page_table[i, : len(r.pages)] = r.pages
        slot = np.full((b,), -1, np.int32)
        slot[: len(rows)] = [r.slot for r in rows]
        q = bucket(max(len(r.ids) for r in rows), 16)
        block = {k: np.zeros((b, q), np.int32) for k in ("tokens", "positions")}
        block["image_rows"] = np.full((b, q), -1, np.int32)
        valid = np.zeros((b, q), bool)
        for i, r in enumerate(rows):
            n = len(r.ids)
            block["tokens"][i, :n], block["image_rows"][i, :n] = r.ids, r.image_rows
            block["positions"][i, :n], valid[i, :n] = np.arange(n), True
        prefill = Block(block["tokens"], block["positions"], valid, block["image_rows"], slot, page_table)
        hidden, logits, self.cache = self.runner.step(self.cache, [prefill], features, mode)
        self._answer_heads(rows, hidden)
        params = self._sampling_params(rows, b)
        no_features = features[:0]
        while True:
            tokens = np.asarray(self._sample(logits, *params, jnp.asarray(self._steps(rows, b))))
            for i, r in enumerate(rows):
                if r.finish is None:
                    self._append(r, int(tokens[i]))
            live = [i for i, r in enumerate(rows) if r.finish is None]
            if not live:
                return
            positions = np.zeros((b, 1), np.int32)
            valid = np.zeros((b, 1), bool)
            toks = np.zeros((b, 1), np.int32)
            for i in live:
                positions[i, 0] = len(rows[i].ids) + len(rows[i].out) - 1
                toks[i, 0], valid[i, 0] = rows[i].out[-1], True
            decode = Block(toks, positions, valid, np.full((b, 1), -1, np.int32), slot, page_table)
            _, logits, self.cache = self.runner.step(self.cache, [decode], no_features, mode)

    def _answer_heads(self, rows: list[_Row], hidden: jax.Array) -> None:
        hidden = np.asarray(hidden, np.float32)
        for i, r in enumerate(rows):
            head = self.pool.store[r.request.adapter].head if r.request.adapter else None
            if head is not None:
                scores = hidden[i] @ head.kernel + head.bias
                r.label, r.finish = head.labels[int(np.argmax(scores))], "stop"

    def _sampling_params(self, rows: list[_Row], b: int):
        pad = b - len(rows)
        temp = np.array([r.request.temperature for r in rows] + [0.0] * pad, np.float32)
        top_p = np.array([r.request.top_p for r in rows] + [1.0] * pad, np.float32)
        seed = np.array([r.request.seed for r in rows] + [0] * pad, np.uint32)
        return jnp.asarray(temp), jnp.asarray(top_p), jnp.asarray(seed)

    @staticmethod
    def _steps(rows: list[_Row], b: int) -> np.ndarray:
        return np.array([len(r.out) for r in rows] + [0] * (b - len(rows)), np.int32)

    def _append(self, row: _Row, token: int) -> None:
        req = row.request
        if token in self.tokenizer.stop_ids:
            row.finish = "stop"
            return
        row.out.append(token)
        if req.stop and any(s in self.tokenizer.decode(row.out) for s in req.stop):
            row.finish = "stop"
        elif len(row.out) >= req.max_tokens:
            row.finish = "length"

    def _completion(self, row: _Row) -> Completion:
        if row.label is not None:
            return Completion(row.label, (), "stop", len(row.ids), label=row.label)
        out = self.tokenizer.decode(row.out)
        for s in row.request.stop:
            if s in out:
                out = out[: out.index(s)]
        return Completion(out, tuple(row.out), row.finish or "length", len(row.ids))
