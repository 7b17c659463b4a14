"""bench/switch.py on the tiny preset (CPU, reference merge): every switch is timed, the merged
weights of every path agree with the reference merge, and the base is never written."""

import json
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import switch  # noqa: E402
from pallas_kernels import LoraWeight, merge_parts_reference  # noqa: E402


def test_switch_reports_every_path_and_checks_them(tmp_path, monkeypatch):
    measure = switch.copy_bandwidth
    monkeypatch.setattr(switch, "copy_bandwidth", lambda: measure(64 << 20))     # not 4 GB on a CPU
    switch.main(["--preset", "tiny", "--backends", "reference", "--rank", "16", "--repeats", "2",
                 "--out", str(tmp_path / "s")])
    result = json.loads((tmp_path / "s.json").read_text())
    assert result["base_bit_identical"] and result["backends"]["reference"]["fused_equals_per_layer"]
    assert result["gemm_addend"]["max_abs_diff_vs_reference"] < 1e-5 and result["floor_ms"] > 0
    table = (tmp_path / "s.md").read_text()
    assert "| fused (one call, donated) | XLA, one GEMM with W as its addend |" in table


def test_gemm_addend_merge_folds_in_the_slot_up_to_its_rank():
    """Each part's adapter lands in its columns of the fused weight (the columns between parts,
    a part without an adapter, stay the kernel's)."""
    rng = np.random.default_rng(0)
    kernel = jnp.asarray(rng.standard_normal((24, 72)), jnp.float32)
    parts = [LoraWeight(jnp.asarray(rng.standard_normal((2, 24, 16)), jnp.float32),
                        jnp.asarray(rng.standard_normal((2, 16, width)), jnp.float32),
                        jnp.asarray([0.5, 2.0], jnp.float32), jnp.asarray(ranks, jnp.int32))
             for width, ranks in ((40, [16, 5]), (20, [3, 16]))]
    for slot in (0, 1):
        np.testing.assert_allclose(switch.gemm_addend_merge(kernel, parts, (0, 52), jnp.int32(slot)),
                                   merge_parts_reference(kernel, kernel, parts, (0, 52), jnp.int32(slot)),
                                   rtol=1e-5, atol=1e-5)
