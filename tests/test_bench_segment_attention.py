"""bench/segment_attention.py off the GPU: its shapes are tower calls cut into runs, every
variant computes the same attention, and the report shows floors, ratios and failures."""

import jax
import numpy as np

from bench import segment_attention as bench


def test_shapes_are_tower_calls():
    for shape in bench.SHAPES:
        assert sum(shape.runs) <= 8192 and all(n % 4 == 0 for n in shape.runs)      # whole merge units
    assert bench.Shape("s", (3, 5)).attended_pairs() == 9 + 25
    q, k, v, segment = bench._inputs(bench.Shape("s", (3, 5)), seed=0)
    assert q.shape == (8, bench.HEADS, bench.HEAD_DIM) and segment.tolist() == [0] * 3 + [1] * 5


def test_every_variant_computes_the_same_attention(monkeypatch):
    monkeypatch.setattr(bench, "HEADS", 2)
    inputs = bench._inputs(bench.Shape("s", (20, 64, 7)), seed=1)
    want = np.asarray(bench.variants()["dense"](*inputs), np.float32)
    for name, fn in bench.variants().items():
        got = np.asarray(fn(*inputs, **({} if name == "dense" else {"interpret": True})), np.float32)
        np.testing.assert_allclose(got, want, atol=0.03, err_msg=name)


def test_report_lists_timings_floors_ratios_and_failures():
    names = list(bench.variants())
    us = {n: 10.0 for n in names} | {"dense": 40.0, names[1]: "ValueError: too big"}
    result = {"command": "python bench/segment_attention.py", "device": "Test GPU", "jax": jax.__version__,
              "harness_us": 1.0, "matmul_tflops": 700.0,
              "records": [{"label": "w: 128 patches in 2 runs of 64", "us": us, "best_flash": names[2],
                           "floor_us": 5.0, "best_over_floor": 2.0, "dense_over_best": 4.0}]}
    text = bench.report(result)
    assert "| w: 128 patches in 2 runs of 64 | 40.0 | – | 10.0 |" in text and "| 5.0 | 2.00x | 4.00x |" in text
    assert f"- w: 128 patches in 2 runs of 64, {names[1]}: ValueError: too big" in text and "700 TFLOP/s" in text


def test_flash_timings_pick_the_fastest_flash_launch_that_ran():
    from bench import flash_timings

    def broken(*args):
        raise ValueError("no such launch")

    sets = [bench._inputs(bench.Shape("s", (8, 8)), seed=2)]
    fns = {"dense": bench.segment_attention_reference, "flash broken": broken,
           "flash interpreted": lambda *a: bench.segment_attention(*a, interpret=True)}
    t = flash_timings(fns, sets, harness_s=0.0)
    assert t["best_flash"] == "flash interpreted" and t["us"]["flash broken"] == "ValueError: no such launch"
    assert t["dense_over_best"] == t["us"]["dense"] / t["us"]["flash interpreted"] > 0
    assert flash_timings({"flash broken": broken}, sets, 0.0) == {
        "us": {"flash broken": "ValueError: no such launch"}, "best_flash": None, "dense_over_best": None}
