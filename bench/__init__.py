"""Benchmarks and GPU checks of valora-jax (see bench/gpu_session.sh for how each runs)."""

import json
from pathlib import Path


def save_result(out: str | Path, result: dict, table: str) -> None:
    """Write a benchmark's record to OUT.json and its markdown table to OUT.md, and print the table."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    out.with_suffix(".md").write_text(table)
    print(table)
