"""The engine's configuration, and what `valora serve` runs on each platform.

`EngineConfig` holds the engine's limits (rows, token budget, prefill rows, KV pages, queue) and
the padding minimums that bound its step shapes; `serving_config` is the configuration `valora
serve` runs and the benchmarks measure; `precompile` compiles every step shape a configuration
meets before serving.
"""

import dataclasses

import jax
import jax.numpy as jnp

from valora_jax.config import LMMConfig
from valora_jax.kv_cache import init_pages
from valora_jax.lora import MODES
from valora_jax.blocks import bucket, fine_bucket
from valora_jax.runtime import ModelRunner, compile_lowered
from valora_jax.tokenizer import ByteTokenizer


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    max_rows: int = 32
    """Most sequences in one step (decode rows + prefill rows)."""
    token_budget: int = 512
    """Most token positions in one step: a decode row counts one, a prefill chunk its whole
    rows of `prefill_width` (what the step computes, padding included)."""
    prefill_chunk: int = 256
    """Longest prefill chunk of one sequence in one step (a multiple of prefill_width)."""
    prefill_width: int = 64
    """Tokens per row of the prefill block: a chunk takes ceil(tokens / width) rows of its
    sequence, so a step computes each chunk rounded up to whole rows, and the block's rows are
    padded to `prefill_rows` (few shapes to compile). Chunks that leave part of a prompt for
    later steps are whole rows."""
    max_prefill_rows: int = 4
    """Most prefill chunks (one per sequence) in one step."""
    num_pages: int = 512
    """KV-cache pages (page 0 is reserved)."""
    max_queue: int = 256
    """Requests waiting to start beyond this are refused with Overloaded."""
    image_cache_size: int = 256
    """Image embeddings kept, least recently used evicted."""
    min_rows: int = 1
    """Decode blocks, and the rows sampled per step, are padded to at least this many rows
    (fewer step shapes to compile)."""
    min_pages: int = 1
    """Page tables are padded to at least this many columns (likewise)."""
    min_features: int = 0
    """Image-feature rows passed to a step are padded to at least this many (likewise)."""
    encoder_batches: tuple[int, ...] = ()
    """Image counts the vision encoder is compiled for ahead (`precompile`)."""
    precompile: bool = False
    """Compile every step shape (step_shapes) and encoder batch before serving (`precompile`):
    with minimums that cover every row, serving then compiles nothing."""
    per_layer_switch: bool = False
    """Merge and unmerge one targeted weight at a time (dLoRA's switch) instead of in one call."""
    decode_loop: int = 1
    """Decode steps run in one device call (`ModelRunner.decode_loop`, its dispatch paid once) when
    a step's rows are decodes of every live request, each with that many tokens still to output;
    1: every step its own call. The tokens of a loop stream together, and a request that arrives
    meanwhile starts after it."""

    def __post_init__(self):
        for name in ("max_rows", "token_budget", "prefill_chunk", "prefill_width", "max_prefill_rows", "max_queue",
                     "decode_loop"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.precompile and self.min_rows < self.max_rows:
            raise ValueError(f"precompile needs min_rows ({self.min_rows}) >= max_rows ({self.max_rows}): decode "
                             "blocks of fewer rows would compile while serving")
        if self.prefill_chunk % self.prefill_width or self.token_budget < self.prefill_width:
            raise ValueError(f"prefill_chunk ({self.prefill_chunk}) must be a multiple of prefill_width "
                             f"({self.prefill_width}), and token_budget ({self.token_budget}) at least one row")

    @property
    def max_step_rows(self) -> int:
        """The most rows a step's blocks hold (decode rows, padded, and prefill rows): the length of
        the token vector a step hands the next one (runtime.Feed)."""
        return bucket(self.max_rows, self.min_rows) + self.token_budget // self.prefill_width

    def prefill_rows(self, rows: int) -> int:
        """The rows a prefill block of `rows` rows is padded to: blocks.fine_bucket(rows), at most
        the rows the token budget holds."""
        return min(fine_bucket(rows), self.token_budget // self.prefill_width)

    def step_shapes(self, modes) -> list:
        """The step variants (ModelRunner.lower_steps' shapes) an engine of this config meets
        when its minimums cover every row (decode rows, prefill tokens, pages, image features):
        (blocks, n_features, mode) with blocks = (decode,), (prefill,) or (decode, prefill), each
        (rows, tokens, pages) padded as Engine packs them."""
        pages = bucket(self.min_pages)
        decode = (bucket(self.max_rows, self.min_rows), 1, pages)
        row_counts = sorted({self.prefill_rows(n) for n in range(1, self.token_budget // self.prefill_width + 1)})
        prefills = [(rows, self.prefill_width, pages) for rows in row_counts]
        blocks = [(decode,)] + [(p,) for p in prefills] + [(decode, p) for p in prefills]
        features = bucket(0, self.min_features) if self.min_features else 0
        return [(b, features, mode) for b in blocks for mode in modes]


def serving_config(model: LMMConfig, platform: str | None = None, max_images: int = 8,
                   **overrides) -> EngineConfig:
    """The engine configuration `valora serve` runs and bench/e2e.py measures, for `model` on
    `platform` (default: JAX's) and requests of at most `max_images` images, with `overrides`
    replacing fields.

    On a GPU: steps of up to 32 decode rows and 2048 token positions (4 prefill chunks in rows of
    128), page tables of at least 256 pages (4096 keys), room for the image features of 4 prompts
    of max_images images, 4096 KV pages, and every step shape and encoder batch of 1-16 images
    compiled before serving, so that serving compiles no step. Elsewhere (CPU): EngineConfig's
    small defaults, shapes compiled as they come."""
    if (platform or jax.default_backend()) != "gpu":
        return dataclasses.replace(EngineConfig(), **overrides)
    prefill_rows = 4
    base = EngineConfig(max_rows=32, token_budget=2048, prefill_chunk=2048, prefill_width=128,
                        max_prefill_rows=prefill_rows, num_pages=4096, min_rows=32, min_pages=256,
                        min_features=prefill_rows * max_images * model.tokens_per_image,
                        encoder_batches=(1, 2, 4, 8, 16), precompile=True)
    return dataclasses.replace(base, **overrides)


def precompile(runner: ModelRunner, config: EngineConfig, modes=MODES, threads: int = 8,
               vocab_size: int = ByteTokenizer().vocab_size, layouts=()) -> int:
    """Compile the step variants an engine of `config` on `runner` meets in `modes`
    (EngineConfig.step_shapes; sampling from `vocab_size` ids, its tokenizer's), its encoder
    batches, the slot writes of adapters of `layouts` (adapters.layout_of) and of an empty slot,
    and the merge where `modes` merge, several at a time; how many compiled. Compiled
    executables land in the runner's jit caches, where the calls find them."""
    cfg = runner.config
    cache = jax.eval_shape(lambda: init_pages(cfg.text, config.num_pages, cfg.page_size, jnp.dtype(cfg.dtype)))
    feed = config.max_step_rows
    lowered = (runner.lower_steps(cache, config.step_shapes(modes), vocab_size, feed)
               + runner.lower_encoder(config.encoder_batches) + runner.lower_writes(((), *layouts)))
    if set(modes) - {"unmerged"}:
        lowered += runner.lower_merge()
    if config.decode_loop > 1:
        decode = [(rows, pages, mode) for ((rows, _, pages),), _, mode in config.step_shapes(modes)[:len(modes)]]
        lowered += runner.lower_decode_loops(cache, decode, vocab_size, config.decode_loop, feed)
    return compile_lowered(lowered, threads)
