"""Mode-switch cost on real model shapes: merging an adapter into every targeted weight.

Compares, on the same model and adapters in one run, for each merge implementation (the
swift-merge Pallas kernel of the pallas backends, XLA's `W + A @ B` of the reference backend):
  fused      ModelRunner.merge: every targeted layer in one jitted call, old buffers donated;
  per-layer  ModelRunner.merge_per_layer: one dispatch per weight (the dLoRA-style switch);
and the floor: bytes that must move (read W and the adapter's A, B; write W_m) / measured copy
bandwidth.
Unmerging costs nothing in valora-jax (base weights are never written); the run also checks
that both switches give bit-identical merged weights and that the base stays bit-identical.

  python bench/switch.py --preset llava-1.5-7b --rank 64 --out bench/results/switch
"""

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pallas_kernels.merge import merge_bytes  # noqa: E402
from pallas_kernels.tiling import pick_merge_tile  # noqa: E402
from pallas_kernels.timing import copy_bandwidth  # noqa: E402
from valora_jax import PRESETS, ModelRunner, init_model, random_adapter  # noqa: E402
from valora_jax.lora import targeted_linears  # noqa: E402


def _timed(fn, runner, slots, repeats):
    times = []
    for i in range(repeats):
        t0 = time.perf_counter()
        fn(slots[i % 2])
        runner.wait_merged()
        times.append(time.perf_counter() - t0)
    return times


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="llava-1.5-7b", choices=sorted(PRESETS))
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--backends", default="pallas,reference",
                    help="merge implementations: pallas (the swift-merge kernel), reference (XLA)")
    ap.add_argument("--out", default="bench/results/switch")
    args = ap.parse_args(argv)

    cfg = PRESETS[args.preset](max_loras=2, max_rank=args.rank)
    backends = args.backends.split(",")
    first = ModelRunner(init_model(cfg, seed=0), backend=backends[0])
    for s in range(2):
        first.write_slot(s, random_adapter(cfg, first.module_shapes, f"a{s}", args.rank, seed=s, std=0.01))
    runners = {b: first if b == backends[0] else first.twin(b) for b in backends}
    base = [np.asarray(x).copy() for x in jax.tree.leaves(first.params)[:4]]  # a sample, checked at the end

    rows, merged = {}, {}
    for backend, runner in runners.items():
        # compile + warm up both paths, and check they agree bit for bit
        runner.merge(0)
        runner.merge(1)
        fused = [np.asarray(x) for x in jax.tree.leaves(runner.merged)]
        runner.merge_per_layer(0)
        runner.merge_per_layer(1)
        identical = all(np.array_equal(a, np.asarray(b)) for a, b in zip(fused, jax.tree.leaves(runner.merged)))
        merged[backend] = fused[:8]                                    # a sample for the cross-check
        del fused
        # merge() skips work when the slot is already merged, so alternate between the two slots
        t_fused = _timed(runner.merge, runner, (0, 1), args.repeats)
        t_layer = _timed(runner.merge_per_layer, runner, (0, 1), max(3, args.repeats // 4))
        rows[backend] = {"fused_ms": _stats(t_fused), "per_layer_ms": _stats(t_layer),
                         "fused_equals_per_layer": identical}

    itemsize = np.dtype(cfg.dtype).itemsize
    moved, tiles = 0, {}
    for _, lin in targeted_linears(first.model()):
        moved += merge_bytes(lin.d_in, lin.d_out, args.rank, itemsize)
        tiles[f"{lin.d_in}x{lin.d_out}"] = pick_merge_tile(lin.d_in, lin.d_out, args.rank).to_dict()
    bandwidth = copy_bandwidth()
    floor_ms = 1e3 * moved / bandwidth
    base_exact = all(np.array_equal(a, np.asarray(b)) for a, b in zip(base, jax.tree.leaves(first.params)[:4]))
    agree = {b: max(float(np.max(np.abs(x.astype(np.float32) - y.astype(np.float32))))
                    for x, y in zip(merged[backends[0]], merged[b])) for b in backends[1:]}
    for row in rows.values():
        row["fused_over_floor"] = row["fused_ms"]["median"] / floor_ms
        row["per_layer_over_floor"] = row["per_layer_ms"]["median"] / floor_ms

    result = {
        "command": "python " + " ".join(sys.argv),
        "device": jax.devices()[0].device_kind, "jax": jax.__version__, "python": platform.python_version(),
        "preset": args.preset, "rank": args.rank, "targeted_weights": len(first.module_shapes),
        "bytes_moved": moved, "copy_bandwidth_Bps": bandwidth, "floor_ms": floor_ms, "unmerge_ms": 0.0,
        "backends": rows, f"max_abs_diff_vs_{backends[0]}": agree, "base_bit_identical": base_exact,
        "merge_tiles": tiles,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    lines = [f"# Mode switch on {args.preset} shapes (rank {args.rank}), {result['device']}, jax {jax.__version__}",
             "", f"`{result['command']}`", "",
             "| switch | merge by | median ms | vs floor |", "| --- | --- | --- | --- |",
             f"| floor ({moved / 1e9:.2f} GB at {bandwidth / 1e12:.2f} TB/s) | - | {floor_ms:.2f} | 1.00x |"]
    for backend, row in rows.items():
        what = "swift-merge kernel" if backend.startswith("pallas") else "XLA (W + A @ B)"
        lines += [f"| fused (one call, donated) | {what} | {row['fused_ms']['median']:.2f} | {row['fused_over_floor']:.2f}x |",
                  f"| per layer (dLoRA-style) | {what} | {row['per_layer_ms']['median']:.2f} | "
                  f"{row['per_layer_over_floor']:.2f}x |"]
    lines += ["| unmerge | - | 0 (base never written) | - |", "",
              "fused == per-layer bit for bit: " + ", ".join(f"{b} {r['fused_equals_per_layer']}" for b, r in rows.items())
              + f"; merged weights, max |difference| vs {backends[0]}: {agree}; base bit-identical after all "
              f"switches: {base_exact}", "",
              "swift-merge tiles (block_m, block_n, warps, row_tiles, stages) by weight shape: "
              + ", ".join(f"{k} {tuple(t.values())}" for k, t in tiles.items())]
    table = "\n".join(lines)
    out.with_suffix(".md").write_text(table + "\n")
    print(table)


def _stats(times) -> dict:
    return {"median": 1e3 * statistics.median(times), "min": 1e3 * min(times), "all": [1e3 * t for t in times]}


if __name__ == "__main__":
    main()
