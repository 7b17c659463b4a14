"""A serving step against its physical floor: the steps `valora serve` runs on this machine.

  python bench/step_floor.py --out bench/results/step_floor

The runner and the block shapes are serve's (backends `auto`, `serve.config.serving_config`:
decode blocks padded to its max_rows, page tables to its min_pages, prefill chunks in rows of
its prefill_width), on a LLaVA-1.5-7B preset with random weights and 8 adapters of rank 16 in
the pool. Each row times `steps` back-to-back steps (the cache passed on, nothing waited for
in between): the time per step is the larger of the host's dispatch and
the device's work. Each row also times steps waited for one by one (as the engine waits for
each step's tokens before it dispatches the next) and the host time until such a call returns,
and each decode-only row its steps run several to a call (a decode loop: one dispatch for them).

Floors, measured in the same run: memory-bound steps (decode) move at least every base weight
they multiply by, the K/V bytes their rows read and write and, unmerged, the adapters' A and B,
at the measured device copy rate; compute-bound steps (prefill) do at least 2 FLOPs per weight
per token plus attention's 4 Dh H per attended key, at the measured bf16 matmul rate.
"""

import argparse
import dataclasses
import sys
import time
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import save_result  # noqa: E402
from pallas_kernels.timing import copy_bandwidth, time_op  # noqa: E402
from serve.config import serving_config  # noqa: E402
from valora_jax import PRESETS, ModelRunner, RowSpec, init_model, init_pages, pack_block, random_adapter  # noqa: E402
from valora_jax.blocks import split_row  # noqa: E402
from valora_jax.runtime import Sampling, use_serving_xla_flags  # noqa: E402
from valora_jax.versions import stack_versions, versions_line  # noqa: E402

ADAPTERS, RANK = 8, 16
LOOPS = (8,)
"""Decode steps per call timed for each full decode block (ModelRunner.decode_loop, EngineConfig.decode_loop)."""


@dataclasses.dataclass(frozen=True)
class StepShape:
    """`rows` decode rows at `keys` keys each (and / or `prefill` prompts of `prompt` tokens), on
    `adapters` distinct adapters, in `mode`."""

    name: str
    mode: str
    rows: int = 0
    keys: int = 0
    prefill: int = 0
    prompt: int = 0
    adapters: int = ADAPTERS


SHAPES = [
    StepShape("decode full x 16 keys, merged", "merged", rows=-1, keys=16),
    StepShape("decode full x 16 keys, unmerged", "unmerged", rows=-1, keys=16),
    StepShape("decode full x 640 keys, merged", "merged", rows=-1, keys=640),
    StepShape("decode full x 640 keys, unmerged", "unmerged", rows=-1, keys=640),
    StepShape("decode 1 x 16 keys, merged", "merged", rows=1, keys=16, adapters=1),
    StepShape("prefill 4 x 640 (first step), merged", "merged", prefill=4, prompt=640),
    StepShape("prefill 4 x 640 (first step), unmerged", "unmerged", prefill=4, prompt=640),
]
"""rows=-1: the serving configuration's max_rows (a full decode block). A prefill step takes the
chunks of the prompts that the serving configuration's token budget holds (`first_chunks`)."""


def first_chunks(shape: StepShape, config) -> list[int]:
    """The tokens of each prompt that a prefill-only first step computes, as serve.policies.pack
    fills it: oldest first, within the token budget, prefill_chunk and max_prefill_rows, a chunk
    that stops inside its prompt ending at a whole row of prefill_width."""
    chunks, left, width = [], config.token_budget, config.prefill_width
    for _ in range(min(shape.prefill, config.max_prefill_rows)):
        n = min(shape.prompt, config.prefill_chunk, left)
        n = n if n == shape.prompt else n // width * width
        if n < 1:
            break
        chunks.append(n)
        left -= -(-n // width) * width
    return chunks


def blocks_of(shape: StepShape, config, page_size: int, rng):
    """The step's blocks as the engine packs them, each row on its own pages after page 0."""
    blocks, next_page = [], 1

    def pages(n_keys):
        nonlocal next_page
        n = -(-n_keys // page_size)
        next_page += n
        return list(range(next_page - n, next_page))

    rows = config.max_rows if shape.rows == -1 else shape.rows
    if rows:
        specs = [RowSpec([int(rng.integers(0, 32000))], shape.keys - 1, None, i % shape.adapters,
                         pages(shape.keys + max(LOOPS))) for i in range(rows)]
        blocks.append(pack_block(specs, min_rows=config.min_rows, min_pages=config.min_pages))
    if shape.prefill:
        specs = [RowSpec(rng.integers(0, 32000, n).tolist(), 0, None, i % shape.adapters, pages(shape.prompt))
                 for i, n in enumerate(first_chunks(shape, config))]
        pieces = [p for spec in specs for p in split_row(spec, config.prefill_width)]
        blocks.append(pack_block(pieces, min_rows=config.prefill_rows(len(pieces)), min_pages=config.min_pages,
                                 width=config.prefill_width))
    return blocks, rows, next_page


def floor_of(shape: StepShape, cfg, rows: int, chunks: list[int], copy_rate: float, matmul_rate: float,
             sizes: dict) -> dict:
    """{"bytes", "flops", "floor_ms", "bound"} of the step: `rows` decode rows and prefill `chunks`
    (tokens of each prompt from its start). sizes: bytes of the decoder layers' weights, the LM
    head and one adapter's A and B (all bfloat16)."""
    text = cfg.text
    kv_token = text.num_layers * 2 * text.num_kv_heads * text.head_dim * 2           # bytes of one key + value
    prompts = sum(chunks)
    bytes_ = sizes["layers"] + sizes["lm_head"] + (shape.mode != "merged") * sizes["adapter"] * shape.adapters
    bytes_ += rows * (shape.keys + 1) * kv_token + 2 * prompts * kv_token
    attended = rows * shape.keys + sum(n * (n + 1) // 2 for n in chunks)
    flops = (sizes["layers"] * (rows + prompts) + sizes["lm_head"] * (rows + len(chunks))   # 2 FLOPs / 2 bytes
             + 4 * text.head_dim * text.num_heads * text.num_layers * attended)
    memory_s, compute_s = bytes_ / copy_rate, flops / matmul_rate
    return {"bytes": bytes_, "flops": flops, "floor_ms": 1e3 * max(memory_s, compute_s),
            "bound": "memory" if memory_s >= compute_s else "compute"}


def _matmul_rate() -> float:
    """Measured bf16 matmul FLOP/s (8192^3, chained calls)."""
    n = 8192
    a = [jnp.ones((n, n), jnp.bfloat16) * (i + 1) for i in range(2)]
    seconds = time_op(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.bfloat16), [(a[0], a[1])],
                      target_s=0.05, unroll=4)
    return 2 * n ** 3 / seconds


def _time_steps(runner, cache, blocks, features, mode: str, steps: int):
    """(cache, {"step_ms": back to back, "blocking_step_ms": each step waited for, as the engine
    waits for its tokens today, "dispatch_ms": host time until a call returns, medians}), of the
    step the engine runs: sampling each row's next token inside it."""
    sampling = Sampling.greedy(sum(block.valid.shape[0] for block in blocks))
    vocab = runner.config.text.vocab_size
    step = lambda cache: runner.sample_step(cache, blocks, features, sampling, vocab, mode)
    out = step(cache)                                               # compiles
    jax.block_until_ready(out)
    cache, dispatch, blocking = out[2], [], []
    for _ in range(steps):
        t0 = time.perf_counter()
        out = step(cache)
        t1 = time.perf_counter()
        jax.block_until_ready(out)
        dispatch.append(t1 - t0)
        blocking.append(time.perf_counter() - t0)
        cache = out[2]
    t0 = time.perf_counter()
    for _ in range(steps):
        out = step(cache)
        cache = out[2]
    jax.block_until_ready(out)
    ms = lambda seconds: 1e3 * float(np.median(seconds))
    return cache, {"step_ms": 1e3 * (time.perf_counter() - t0) / steps, "blocking_step_ms": ms(blocking),
                   "dispatch_ms": ms(dispatch)}


def _time_loop(runner, cache, block, mode: str, loop: int, steps: int):
    """(cache, ms a step) of decode steps run `loop` to a call, the calls back to back."""
    sampling = Sampling.greedy(block.valid.shape[0])
    run = lambda cache: runner.decode_loop(cache, block, sampling, runner.config.text.vocab_size, loop, mode)
    out = run(cache)                                                # compiles
    jax.block_until_ready(out)
    cache, calls = out[2], max(1, steps // loop)
    t0 = time.perf_counter()
    for _ in range(calls):
        out = run(cache)
        cache = out[2]
    jax.block_until_ready(out)
    return cache, 1e3 * (time.perf_counter() - t0) / (calls * loop)


class Setup(NamedTuple):
    """What every measured step shares: serve's runner on the preset with ADAPTERS adapters in its
    pool (slot 0 merged), its configuration, an empty cache of its pages, the measured rates."""

    cfg: object
    config: object
    runner: ModelRunner
    cache: object
    empty: jax.Array
    sizes: dict
    copy_rate: float
    matmul_rate: float


def setup(preset: str) -> Setup:
    on_gpu = jax.default_backend() == "gpu"
    copy_rate = copy_bandwidth() if on_gpu else 1e11        # measured before the model takes the memory
    matmul_rate = _matmul_rate() if on_gpu else 1e12
    cfg = PRESETS[preset](max_loras=ADAPTERS, max_rank=RANK)
    config = serving_config(cfg)
    runner = ModelRunner(init_model(cfg, seed=0))
    for s in range(ADAPTERS):
        runner.write_slot(s, random_adapter(cfg, runner.module_shapes, f"a{s}", RANK, seed=s, std=0.01))
    runner.merge(0)
    model = runner.model()
    nbytes = lambda tree: sum(a.nbytes for a in jax.tree.leaves(tree))
    sizes = {"layers": nbytes(nnx.state(model.decoder.layers, nnx.Param)), "lm_head": model.decoder.lm_head[...].nbytes,
             "adapter": sum(a.nbytes for a in jax.tree.leaves(runner.lora) if a.ndim == 3) // ADAPTERS}
    del model
    cache = init_pages(cfg.text, config.num_pages, cfg.page_size, jnp.dtype(cfg.dtype))
    empty = jnp.zeros((0, cfg.text.hidden_size), jnp.dtype(cfg.dtype))
    return Setup(cfg, config, runner, cache, empty, sizes, copy_rate, matmul_rate)


def measure(preset: str, steps: int, shapes=SHAPES) -> dict:
    ctx = setup(preset)
    cfg, config, runner, cache, empty = ctx.cfg, ctx.config, ctx.runner, ctx.cache, ctx.empty
    copy_rate, matmul_rate, sizes = ctx.copy_rate, ctx.matmul_rate, ctx.sizes
    rng, records = np.random.default_rng(0), []
    for shape in shapes:
        blocks, rows, used = blocks_of(shape, config, cfg.page_size, rng)
        if used > config.num_pages:
            raise ValueError(f"{shape.name} needs {used} pages; the serving configuration has {config.num_pages}")
        cache, times = _time_steps(runner, cache, blocks, empty, shape.mode, steps)
        for loop in LOOPS if shape.rows == -1 and not shape.prefill else ():
            cache, times[f"loop{loop}_step_ms"] = _time_loop(runner, cache, blocks[0], shape.mode, loop, steps)
        chunks = first_chunks(shape, config)
        floor = floor_of(shape, cfg, rows, chunks, copy_rate, matmul_rate, sizes)
        records.append({**dataclasses.asdict(shape), "rows": rows, **times, **floor, "prefill_tokens": sum(chunks),
                        "prefill_positions": int(blocks[-1].valid.size) if chunks else 0,
                        "over_floor": times["step_ms"] / floor["floor_ms"]})
        print(f"{shape.name:36s} {times['step_ms']:8.2f} ms back to back, {times['blocking_step_ms']:8.2f} waited "
              f"for (dispatch {times['dispatch_ms']:6.2f}), floor {floor['floor_ms']:7.2f} ms ({floor['bound']}): "
              f"{times['step_ms'] / floor['floor_ms']:.2f}x; in loops "
              f"{', '.join(f'of {k}: {times[f'loop{k}_step_ms']:.2f}' for k in LOOPS if f'loop{k}_step_ms' in times)}",
              flush=True)
    return {"preset": preset, "engine_config": dataclasses.asdict(config), "backend": runner.backend,
            "attention": runner.attention, "copy_bytes_per_s": copy_rate, "matmul_flops_per_s": matmul_rate,
            "sizes": sizes, "records": records}


def report(result: dict) -> str:
    lines = [f"# A serving step against its floor ({result['preset']}, serve's configuration), {result['device']}, "
             f"{versions_line(result)}", "",
             f"`{result['command']}` · backends {result['backend']} / {result['attention']} · copy "
             f"{result['copy_bytes_per_s'] / 1e12:.2f} TB/s · bf16 matmul {result['matmul_flops_per_s'] / 1e12:.0f} "
             f"TFLOP/s · XLA_FLAGS `{result['xla_flags']}`", "",
             "| step | rows | step ms, back to back | step ms, waited for | host dispatch ms | floor ms | bound "
             "| back to back / floor | " + " | ".join(f"ms a step, {k} a call (/ floor)" for k in LOOPS) + " |",
             "|---|---|---|---|---|---|---|---|" + "---|" * len(LOOPS)]
    for r in result["records"]:
        loops = [f"{r[f'loop{k}_step_ms']:.2f} ({r[f'loop{k}_step_ms'] / r['floor_ms']:.2f}x)"
                 if f"loop{k}_step_ms" in r else "–" for k in LOOPS]
        lines.append(f"| {r['name']} | {r['rows']} | {r['step_ms']:.2f} | {r['blocking_step_ms']:.2f} "
                     f"| {r['dispatch_ms']:.2f} | {r['floor_ms']:.2f} | {r['bound']} | {r['over_floor']:.2f}x | "
                     + " | ".join(loops) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="llava-1.5-7b", choices=sorted(PRESETS))
    ap.add_argument("--steps", type=int, default=20, help="back-to-back steps timed per row")
    ap.add_argument("--out", default="bench/results/step_floor")
    args = ap.parse_args(argv)
    xla_flags = use_serving_xla_flags()
    result = {"command": "python " + " ".join(sys.argv), **stack_versions(), "xla_flags": xla_flags,
              "date": time.strftime("%Y-%m-%d"), **measure(args.preset, args.steps)}
    save_result(args.out, result, report(result))


if __name__ == "__main__":
    main()
