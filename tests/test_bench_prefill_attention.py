"""bench/prefill_attention.py off the GPU: its shapes count the keys their queries attend, its
inputs scatter every row's pages over the cache, every variant computes the same attention, and
the report shows failures beside the timings."""

import jax
import numpy as np

from bench import prefill_attention as bench


def test_attended_keys_follow_the_causal_chunk():
    assert bench.Shape(1, 4, 16, 0, 3).attended_keys() == 1 + 2 + 3
    assert bench.Shape(2, 4, 8, 6, 4).attended_keys() == 2 * (7 + 8 + 8 + 8)        # capped at the context


def test_inputs_give_each_row_its_own_pages():
    shape = bench.Shape(3, 8, 100, 0, 8)
    q, k, v, table, positions = bench._inputs(shape, seed=1)
    assert table.shape == (3, shape.width()) == (3, 7) and k.shape == v.shape == (bench.HEADS, 22, 16, bench.HEAD_DIM)
    assert sorted(np.asarray(table).ravel()) == list(range(1, 22))                  # every page once, page 0 none
    assert q.shape == (3, 8, bench.HEADS, bench.HEAD_DIM) and positions.shape == (3, 8)


def test_every_variant_computes_the_same_attention(monkeypatch):
    monkeypatch.setattr(bench, "HEADS", 2)
    monkeypatch.setattr(bench, "HEAD_DIM", 16)
    inputs = bench._inputs(bench.Shape(2, 32, 64, 20, 25), seed=0)
    outputs = {}
    for name, fn in bench.variants().items():
        kwargs = {} if name == "dense" else {"interpret": True}
        outputs[name] = np.asarray(fn(*inputs, **kwargs), np.float32)[:, :25]
    for name, out in outputs.items():
        np.testing.assert_allclose(out, outputs["dense"], atol=0.03, err_msg=name)


def test_report_lists_timings_ratios_and_failures():
    names = list(bench.variants())
    us = {n: 10.0 for n in names} | {"dense": 40.0, names[1]: "ValueError: too big"}
    result = {"command": "python bench/prefill_attention.py", "device": "Test GPU", "jax": jax.__version__,
              "harness_us": 1.0, "records": [{"label": "1x16 over 32 keys", "us": us, "best_flash": names[2],
                                               "dense_over_best": 4.0, "best_tflops": 12.3}]}
    text = bench.report(result)
    assert "| 1x16 over 32 keys | 40.0 | – | 10.0 |" in text and "| 4.00x | 12 |" in text
    assert f"- 1x16 over 32 keys, {names[1]}: ValueError: too big" in text
