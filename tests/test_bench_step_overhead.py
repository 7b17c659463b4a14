"""bench/step_overhead.py's harness on the tiny preset (CPU, reference backends): each variant's
child process reports its times and the report names every variant."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import step_overhead  # noqa: E402


def test_step_overhead_reports_every_variant(tmp_path):
    step_overhead.main(["--preset", "tiny", "--variants", "default", "--kernels", "reference/reference",
                        "--out", str(tmp_path / "o")])
    report = json.loads((tmp_path / "o.json").read_text())
    for r in (report["results"]["default"], report["kernels"]["reference/reference"]):
        for mode in ("merged", "unmerged"):
            assert 0 < r[mode]["dispatch_ms"] <= r[mode]["step_ms"]
        assert r["arguments_only_ms"] > 0
    table = (tmp_path / "o.md").read_text()
    assert "| default | `` |" in table
    assert "| LoRA reference, attention reference | `--xla_gpu_enable_command_buffer=` |" in table


def test_step_overhead_rejects_unknown_variants(tmp_path):
    with pytest.raises(SystemExit, match="no_such"):
        step_overhead.main(["--variants", "default,no_such", "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit, match="'pallas'"):
        step_overhead.main(["--variants", "default", "--kernels", "pallas", "--out", str(tmp_path / "o")])


def test_serving_xla_flags_fill_in_only_what_the_user_left_unset(monkeypatch):
    from valora_jax import use_serving_xla_flags

    monkeypatch.setenv("XLA_FLAGS", "--xla_dump_to=/tmp/d")
    assert use_serving_xla_flags().split() == ["--xla_dump_to=/tmp/d", "--xla_gpu_enable_command_buffer="]
    monkeypatch.setenv("XLA_FLAGS", "--xla_gpu_enable_command_buffer=FUSION")
    assert use_serving_xla_flags() == "--xla_gpu_enable_command_buffer=FUSION"
    monkeypatch.delenv("XLA_FLAGS")
    assert use_serving_xla_flags() == "--xla_gpu_enable_command_buffer="
    monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.5")
    use_serving_xla_flags()
    assert os.environ["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.5"
    monkeypatch.delenv("XLA_PYTHON_CLIENT_MEM_FRACTION")
    use_serving_xla_flags()
    assert os.environ["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.90"


def test_serving_xla_flags_are_accepted_by_this_jax(tmp_path):
    """XLA aborts the process on a flag it does not know: a child that sets them still computes."""
    code = ("from valora_jax import use_serving_xla_flags; use_serving_xla_flags(); "
            "import jax.numpy as jnp; print(float((jnp.arange(4.0) @ jnp.arange(4.0))))")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                           cwd=Path(__file__).resolve().parents[1], env={**env, "JAX_PLATFORMS": "cpu"})
    assert child.returncode == 0, child.stderr
    assert child.stdout.strip() == "14.0"
