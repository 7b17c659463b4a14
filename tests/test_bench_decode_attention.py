"""bench/decode_attention.py off the GPU: its inputs are the pages the rows need, scattered, its
floor counts the K/V bytes the rows read, every variant computes the same attention, and the
report shows floors, shares and failures beside the timings."""

import jax
import numpy as np

from bench import decode_attention as bench


def test_inputs_scatter_exactly_the_pages_the_rows_need(monkeypatch):
    monkeypatch.setattr(bench, "HEAD_DIM", 16)
    shape = bench.Shape(3, 40, heads=4, kv_heads=2)
    q, k, v, table, lengths = bench._inputs(shape, seed=0)
    assert shape.width() == 4 and table.shape == (3, 4) and k.shape == (2, 1 + 3 * 4, bench.PAGE, 16)
    assert sorted(np.asarray(table).ravel()) == list(range(1, 13))                 # page 0 stays the null page
    assert np.asarray(lengths).tolist() == [40, 40, 40]
    assert bench._floor_bytes(shape, [(q, k, v, table, lengths)]) == 3 * 40 * 2 * 16 * 2 * 2


def test_every_variant_computes_the_same_attention(monkeypatch):
    monkeypatch.setattr(bench, "HEAD_DIM", 16)
    args = bench._inputs(bench.Shape(3, 50, heads=4, kv_heads=2, ragged=True), seed=1)
    want = np.asarray(bench.decode_attention_reference(*args), np.float32)
    for name, fn in bench.variants().items():
        kwargs = {} if name == "gather+dense" else {"interpret": True}
        np.testing.assert_allclose(np.asarray(fn(*args, **kwargs), np.float32), want, atol=0.03, err_msg=name)


def test_report_lists_floors_shares_and_failures():
    names = list(bench.variants())
    us = {n: 10.0 for n in names} | {"gather+dense": 40.0, names[2]: "ValueError: too big"}
    result = {"command": "python bench/decode_attention.py", "device": "Test GPU", "jax": jax.__version__,
              "harness_us": 1.0, "copy_bytes_per_s": 4e12,
              "records": [{"label": "64 rows x 640 keys", "us": us, "floor_us": 8.0, "best": names[1],
                           "default_of_floor": 0.8, "best_of_floor": 0.8, "rel_error": {"default": 3e-3}}]}
    text = bench.report(result)
    assert "| 64 rows x 640 keys | 8.0 | 40.0 | 10.0 | – | 10.0 |" in text and "| 80% | default | 80% |" in text
    assert f"- 64 rows x 640 keys, {names[2]}: ValueError: too big" in text and "3.00e-03" in text
