"""Benchmarks and GPU checks of valora-jax (see bench/gpu_session.sh for how each runs)."""

import functools
import json
from pathlib import Path


def save_result(out: str | Path, result: dict, table: str) -> None:
    """Write a benchmark's record to OUT.json and its markdown table to OUT.md, and print the table."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    out.with_suffix(".md").write_text(table)
    print(table)


def require_gpu(script: str) -> None:
    """Exit naming `script` unless JAX's default backend is a GPU (scripts that time GPU kernels)."""
    import jax
    if jax.default_backend() != "gpu":
        raise SystemExit(f"{script} times GPU kernels; the default backend is {jax.default_backend()!r}")


def flash_variants(dense, kernel, launches) -> dict:
    """{"dense": dense, "flash q{block_q} k{block_k} w{warps} s{stages}": kernel at that launch} for
    each (block_q, block_k, warps, stages) of `launches`: a flash kernel's variants beside its reference."""
    return {"dense": dense} | {f"flash q{bq} k{bk} w{w} s{s}": functools.partial(kernel, block_q=bq, block_k=bk,
                                                                                   warps=w, stages=s)
                               for bq, bk, w, s in launches}


def flash_timings(fns: dict, arg_sets, harness_s: float) -> dict:
    """The flash_variants `fns` timed on arg_sets: {"us": net_us's {name: us or error}, "best_flash":
    the fastest flash launch (None if none ran), "dense_over_best": dense's time over it (or None)}."""
    from pallas_kernels.timing import net_us
    us = net_us(fns, arg_sets, harness_s)
    flash = {n: t for n, t in us.items() if n.startswith("flash") and isinstance(t, float)}
    best = min(flash, key=flash.get) if flash else None
    dense = us.get("dense")
    return {"us": us, "best_flash": best,
            "dense_over_best": dense / flash[best] if best and isinstance(dense, float) else None}
