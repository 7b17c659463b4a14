"""GPU smoke of the whole model: kernel backends against the references, and step costs at 7B.

1. tiny preset with random adapters: `generate` with LoRA backend "pallas" and attention
   "pallas" gives the same greedy tokens as the reference backends, in every mode, and step
   logits agree within the bf16/f32 tolerance;
2. llava-1.5-7b shapes (random bf16 weights, 8 adapters of rank 16): compile time and run time
   of one decode step (64 rows) and one prefill step (4 x 576+64 tokens), so the engine's
   shape buckets can be sized against compile cost; and the decode step's time split into the
   LoRA branch (unmerged - merged), attention over 640 keys (640 - 16 keys, merged) and the rest;
   a decode step with 80% of its rows on one adapter, unmerged and in mixture mode;
   the prefill step's LoRA branch (unmerged - merged) and what the flash prefill kernel saves
   over the reference's dense masked attention (a twin runner with attention "reference").

  python bench/model_smoke.py --out bench/results/model_smoke
"""

import argparse
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from serve.config import EngineConfig  # noqa: E402
from serve.generate import Generator  # noqa: E402
from valora_jax import (AdapterPool, ModelRunner, Request, RowSpec, init_model, init_pages,  # noqa: E402
                        llava_1_5_7b, pack_block, random_adapter, tiny, use_serving_xla_flags)
from valora_jax.versions import stack_versions  # noqa: E402


def _tiny_agreement() -> dict:
    cfg = tiny()
    outputs, rng = {}, np.random.default_rng(0)
    images = [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(3)]
    requests = [Request("describe", [images[0]], adapter="a0", max_tokens=12),
                Request("count", [images[1], images[2]], adapter="a1", max_tokens=12),
                Request("base", [], adapter=None, max_tokens=12)]
    for name, kw in {"reference": {}, "pallas": {"backend": "pallas", "attention": "pallas"}}.items():
        runner = ModelRunner(init_model(cfg, seed=0), **kw)      # a runner owns (and donates) its arrays
        pool = AdapterPool(cfg, runner.module_shapes, runner.write_slot)
        for i, r in enumerate((8, 32)):
            pool.register(random_adapter(cfg, runner.module_shapes, f"a{i}", r, seed=i))
        gen = Generator(runner, pool)
        looped = Generator(runner, pool, config=EngineConfig(decode_loop=4))     # decode steps 4 to a call
        outputs[name] = {
            "unmerged": [c.token_ids for c in gen.generate(requests)],
            "decode_loop": [c.token_ids for c in looped.generate(requests)],
            "mixture": [c.token_ids for c in gen.generate(requests, mode="mixture", merged_adapter="a0")],
            "merged": [c.token_ids for c in gen.generate(requests[:1], mode="merged")],
        }
    same = {mode: outputs["pallas"][mode] == outputs["reference"][mode] for mode in outputs["reference"]}
    same["decode_loop_as_single_steps"] = outputs["pallas"]["decode_loop"] == outputs["reference"]["unmerged"]
    return {"same_greedy_tokens": same}


def _time_step(runner, cache, blocks, features, mode="unmerged"):
    t0 = time.perf_counter()
    out = runner.step(cache, blocks, features, mode=mode)
    jax.block_until_ready(out)
    compile_s = time.perf_counter() - t0
    cache = out[2]
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        out = runner.step(cache, blocks, features, mode=mode)
        jax.block_until_ready(out)
        cache = out[2]
        times.append(time.perf_counter() - t0)
    return cache, {"first_call_s": compile_s, "step_ms": 1e3 * float(np.median(times))}


def _llava_steps() -> dict:
    cfg = llava_1_5_7b(max_loras=8, max_rank=16)
    t0 = time.perf_counter()
    runner = ModelRunner(init_model(cfg, seed=0), backend="pallas", attention="pallas")
    init_s = time.perf_counter() - t0
    for s in range(8):
        runner.write_slot(s, random_adapter(cfg, runner.module_shapes, f"a{s}", 16, seed=s, std=0.01))
    cache = init_pages(cfg.text, 4096, cfg.page_size, jnp.bfloat16)
    d = cfg.text.hidden_size
    empty = jnp.zeros((0, d), jnp.bfloat16)
    rng = np.random.default_rng(0)
    ctx = 640
    decode = pack_block([RowSpec([int(rng.integers(0, 32000))], ctx, None, i % 8,
                                 list(range(1 + 48 * i, 1 + 48 * i + 41))) for i in range(64)])
    prefill = pack_block([RowSpec(rng.integers(0, 32000, 640).tolist(), 0, None, i % 8,
                                  list(range(3200 + 48 * i, 3200 + 48 * i + 40))) for i in range(4)], min_tokens=16)
    short = pack_block([RowSpec([int(rng.integers(0, 32000))], 15, None, i % 8, [1 + i])
                        for i in range(64)], min_pages=64)              # same page-table width, 16 keys
    hot = pack_block([RowSpec([int(rng.integers(0, 32000))], ctx, None, 0 if i % 5 else 1 + i % 7,
                              list(range(1 + 48 * i, 1 + 48 * i + 41))) for i in range(64)])   # 80% adapter 0
    cache, dec = _time_step(runner, cache, [decode], empty)
    cache, dec_short = _time_step(runner, cache, [short], empty)
    cache, pre = _time_step(runner, cache, [prefill], empty)
    cache, both = _time_step(runner, cache, [decode, prefill], empty)
    cache, pre_dense = _time_step(runner.twin(attention="reference"), cache, [prefill], empty)
    runner.merge(0)
    cache, dec_merged = _time_step(runner, cache, [decode], empty, mode="merged")
    cache, dec_merged_short = _time_step(runner, cache, [short], empty, mode="merged")
    cache, pre_merged = _time_step(runner, cache, [prefill], empty, mode="merged")
    cache, hot_unmerged = _time_step(runner, cache, [hot], empty)
    cache, hot_mixture = _time_step(runner, cache, [hot], empty, mode="mixture")
    ms = lambda r: r["step_ms"]
    return {"init_s": init_s, "decode_64": dec, "decode_64_context_16": dec_short, "decode_64_merged": dec_merged,
            "decode_64_merged_context_16": dec_merged_short, "prefill_4x640": pre, "decode_64_plus_prefill": both,
            "prefill_4x640_dense_attention": pre_dense, "prefill_4x640_merged": pre_merged,
            # 80% of the rows on adapter 0: unmerged, and mixture with adapter 0 merged
            "decode_64_hot80": hot_unmerged, "decode_64_hot80_mixture": hot_mixture,
            # where a 64-row decode step's and a 4-row prefill step's time goes (differences of the runs above)
            "decode_64_breakdown_ms": {"lora_branch": ms(dec) - ms(dec_merged),
                                       "attention_over_640_keys": ms(dec_merged) - ms(dec_merged_short),
                                       "rest_of_step": ms(dec_merged_short)},
            "prefill_4x640_breakdown_ms": {"lora_branch": ms(pre) - ms(pre_merged),
                                           "flash_saves_over_dense_attention": ms(pre_dense) - ms(pre)}}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench/results/model_smoke")
    ap.add_argument("--skip-7b", action="store_true")
    args = ap.parse_args(argv)
    xla_flags = use_serving_xla_flags()
    result = {"command": "python " + " ".join(sys.argv), "device": jax.devices()[0].device_kind,
              **stack_versions(), "xla_flags": xla_flags, "tiny": _tiny_agreement()}
    print(json.dumps(result["tiny"]), flush=True)
    if not args.skip_7b:
        result["llava_1_5_7b"] = _llava_steps()
        print(json.dumps(result["llava_1_5_7b"], indent=1), flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
