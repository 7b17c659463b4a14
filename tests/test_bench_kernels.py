"""bench/kernels.py off the GPU: its baselines compute the LoRA delta, and its report shows
every variant that ran, the ones that did not (with the reason), and the targets."""

import json

import jax
import numpy as np
import pytest

from bench import kernels
from pallas_kernels import lora_delta_reference
from pallas_kernels.problems import Shape, make_inputs


@pytest.mark.parametrize("shape", [Shape(7, 64, 96, 16, 3), Shape(5, 64, 48, "mixed", 4, "skewed", n_weights=2),
                                   Shape(1, 32, 32, 16, 2)], ids=lambda s: s.label())
@pytest.mark.parametrize("variant", ["ragged_dot", "gather_einsum", "dense_loop"])
def test_baselines_compute_the_lora_delta(shape, variant):
    x, weights, slot = make_inputs(shape, seed=3)
    slot = slot.at[0].set(-1)                                   # a token without adapter
    fn = kernels._variants(shape, kernels.STATIC_TILE)[variant]
    with jax.default_matmul_precision("highest"):
        got, want = fn(x, weights, slot), lora_delta_reference(x, weights, slot)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32), rtol=0.05, atol=0.05)


def _record(shape: str, us: dict, errors: dict | None = None) -> dict:
    return {"shape": shape, "tokens": 4096, "floor_us": 20.0, "flops": 1e9, "us": us, "errors": errors or {}}


def test_report_lists_variants_failures_and_targets(tmp_path):
    records = [_record("T4096 a", {"atmm": 30.0, "atmm_mosaic": 20.0, "atmm_static": 40.0, "ragged_dot": 300.0,
                                   "tokamax_triton": 90.0},
                       {"tokamax_mosaic": "NotImplementedError: N=16 below the kernel's minimum"}),
               _record("T4096 b", {"atmm": 50.0, "atmm_static": 60.0, "ragged_dot": 400.0, "tokamax_triton": 70.0})]
    layers = [{"tokens": 4096, "context": None, "us": {"base": 100.0, "lora": 105.0}, "ratio": 1.05}]
    result = {"device": "Test GPU", "jax": jax.__version__, "date": "today", "command": "python3 -m bench.kernels",
              "copy_bandwidth_TBps": 4.0, "harness_overhead_us": 0.0, "static_tile": {}, "tokamax": "tokamax 0",
              "records": records, "layers": layers}
    result["summary"] = kernels.summarize(records, layers, 0.0)
    assert result["summary"]["atmm_vs_tokamax_triton_geomean"] == pytest.approx((3.0 * 1.4) ** 0.5)
    assert result["summary"]["atmm_vs_tokamax_mosaic_geomean"] is None
    assert result["summary"]["atmm_vs_mosaic_geomean"] == pytest.approx(20.0 / 30.0)     # the shapes it ran on
    assert result["summary"]["mosaic_prefill_floor_fraction_min"] == pytest.approx(1.0)
    assert result["summary"]["atmm_vs_triton_geomean"] is None
    kernels.write_report(result, tmp_path, "k")
    table = (tmp_path / "k.md").read_text()
    assert "| tokamax_mosaic | tokamax_triton |" in table and "gather_einsum" not in table
    assert "| atmm | atmm_mosaic | atmm_static |" in table
    assert "tokamax_mosaic on 1 shapes, e.g. T4096 a: NotImplementedError: N=16" in table
    assert "| layer_T4096_ratio | 1.05 | <= 1.1 | yes |" in table
    assert "| atmm_vs_ragged_dot_geomean |" in table and json.loads((tmp_path / "k.json").read_text())["tokamax"]
