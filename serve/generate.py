"""Batch generation for scripts and `valora generate`: `Generator.generate(requests)` runs a
call's requests to completion on the serving engine, in a mode the caller fixes.

A thin front: the engine does the batching (continuous, chunked prefill), image encoding,
sampling and stops, exactly as `valora serve` does; the Generator only pins every step of a
call to one mode (policies.FixedModePolicy).
"""

from typing import Sequence

from serve.config import EngineConfig
from serve.engine import Engine
from serve.policies import FixedModePolicy
from valora_jax.adapters import AdapterPool
from valora_jax.lora import MODES
from valora_jax.request import Completion, Request
from valora_jax.runtime import ModelRunner


class Generator:
    """Runs batches of requests on a ModelRunner with its adapter pool, on an engine of its own
    (`config`, default EngineConfig with `num_pages` KV pages)."""

    def __init__(self, runner: ModelRunner, pool: AdapterPool, tokenizer=None, num_pages: int = 256,
                 config: EngineConfig | None = None):
        config = config or EngineConfig(num_pages=num_pages)
        self.engine = Engine(runner, pool, config=config, policy=FixedModePolicy("unmerged"), tokenizer=tokenizer)
        self.runner, self.pool, self.tokenizer = runner, pool, self.engine.tokenizer

    @property
    def allocator(self):
        return self.engine.allocator

    def generate(self, requests: Sequence[Request], mode: str = "unmerged",
                 merged_adapter: str | None = None) -> list[Completion]:
        """Complete every request (in order). mode "merged" folds the (single) adapter of the
        requests into the weights; "mixture" folds `merged_adapter` in and serves the other
        requests through deLoRA. Raises ValueError naming the first bad request or argument,
        before any request runs."""
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")
        names = {r.adapter for r in requests}
        if mode == "merged":
            if len(names) != 1 or None in names:
                raise ValueError(f"merged mode needs every request on one adapter, got {sorted(map(str, names))}")
            merged_adapter = next(iter(names))
        if mode != "unmerged" and merged_adapter is None:
            raise ValueError(f"mode {mode!r} needs merged_adapter")
        merged = self.pool.key(merged_adapter) if mode != "unmerged" else None     # unknown: ValueError
        self.engine.policy = FixedModePolicy(mode, merged)
        return self.engine.generate(list(requests))
