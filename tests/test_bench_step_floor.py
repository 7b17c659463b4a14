"""bench/step_floor.py off the GPU: the floor counts the bytes and FLOPs a step must move and
do, the blocks are packed as serve packs them, and a tiny run reports every row."""

import numpy as np

from bench import step_floor as bench
from serve.config import serving_config
from valora_jax import tiny


def test_floor_counts_weights_adapters_kv_and_flops():
    cfg = tiny()
    text = cfg.text
    kv_token = text.num_layers * 2 * text.num_kv_heads * text.head_dim * 2
    sizes = {"layers": 1000, "lm_head": 100, "adapter": 10}
    decode = bench.floor_of(bench.StepShape("d", "unmerged", rows=4, keys=8, adapters=3), cfg, 4, [], 1.0, 1e30, sizes)
    assert decode["bytes"] == 1000 + 100 + 3 * 10 + 4 * 9 * kv_token and decode["bound"] == "memory"
    merged = bench.floor_of(bench.StepShape("d", "merged", rows=4, keys=8), cfg, 4, [], 1.0, 1e30, sizes)
    assert merged["bytes"] == decode["bytes"] - 30
    prefill = bench.floor_of(bench.StepShape("p", "merged", prefill=2, prompt=3), cfg, 0, [3, 3], 1e30, 1.0, sizes)
    attention = 4 * text.head_dim * text.num_heads * text.num_layers * 2 * (1 + 2 + 3)
    assert prefill["flops"] == 1000 * 6 + 100 * 2 + attention and prefill["bound"] == "compute"


def test_blocks_are_packed_as_the_serving_configuration_packs_them():
    config = serving_config(tiny(), "gpu")
    blocks, rows, used = bench.blocks_of(bench.StepShape("x", "merged", rows=-1, keys=40, prefill=2, prompt=600),
                                       config, 16, np.random.default_rng(0))
    decode, prefill = blocks
    assert rows == config.max_rows and decode.tokens.shape == (config.min_rows, 1)
    assert decode.page_table.shape[1] == config.min_pages
    assert prefill.tokens.shape == (12, 128)          # two chunks of 600 in 5 rows of 128 each, padded to 12
    assert used == 1 + rows * 3 + 2 * 38


def test_a_prefill_step_takes_what_the_token_budget_holds_at_whole_rows():
    config = serving_config(tiny(), "gpu")          # 2048 positions in rows of 128, 4 chunks
    assert bench.first_chunks(bench.StepShape("p", "merged", prefill=4, prompt=640), config) == [640, 640, 640, 128]
    assert bench.first_chunks(bench.StepShape("p", "merged", prefill=6, prompt=100), config) == [100] * 4
    assert bench.first_chunks(bench.StepShape("p", "merged", prefill=2, prompt=3000), config) == [2048]


def test_a_tiny_run_reports_every_row():
    shapes = [bench.StepShape("decode full x 16 keys, merged", "merged", rows=-1, keys=16),
              bench.StepShape("prefill 1 x 20, unmerged", "unmerged", prefill=1, prompt=20, adapters=2)]
    result = {"command": "python bench/step_floor.py", "device": "cpu", "jax": "0", "xla_flags": "",
              **bench.measure("tiny", 1, shapes)}
    text = bench.report(result)
    assert result["backend"] == "reference" and len(result["records"]) == 2
    assert all(r["step_ms"] > 0 and r["floor_ms"] > 0 for r in result["records"])
    decode, prefill = result["records"]
    assert all(decode[f"loop{k}_step_ms"] > 0 for k in bench.LOOPS) and not any("loop" in key for key in prefill)
    assert (decode["prefill_tokens"], prefill["prefill_tokens"], prefill["prefill_positions"]) == (0, 20, 64)
    assert "| decode full x 16 keys, merged | 32 |" in text and "| prefill 1 x 20, unmerged | 0 |" in text
