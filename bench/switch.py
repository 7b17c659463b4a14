"""Mode-switch cost on real model shapes: merging an adapter into every targeted weight.

Compares, on the same model and adapters in one run:
  fused      ModelRunner.merge: every targeted layer in one jitted call, old buffers donated;
  per-layer  ModelRunner.merge_per_layer: one dispatch per weight (the dLoRA-style switch);
  floor      bytes that must move (read W and the adapter's A, B; write W_m) / measured copy
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

from pallas_kernels.timing import copy_bandwidth  # noqa: E402
from valora_jax import PRESETS, ModelRunner, init_model, random_adapter  # noqa: E402
from valora_jax.lora import targeted_linears  # noqa: E402


def _timed(fn, runner, slots, repeats):
    times = []
    for i in range(repeats):
        t0 = time.perf_counter()
        fn(slots[i % 2])
        jax.block_until_ready(runner.merged)
        times.append(time.perf_counter() - t0)
    return times


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="llava-1.5-7b", choices=sorted(PRESETS))
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--out", default="bench/results/switch")
    args = ap.parse_args(argv)

    cfg = PRESETS[args.preset](max_loras=2, max_rank=args.rank)
    runner = ModelRunner(init_model(cfg, seed=0))
    for s in range(2):
        runner.write_slot(s, random_adapter(cfg, runner.module_shapes, f"a{s}", args.rank, seed=s, std=0.01))
    base = [np.asarray(x).copy() for x in jax.tree.leaves(runner.params)[:4]]  # a sample, checked at the end

    # compile + warm up both paths, and check they agree bit for bit
    runner.merge(0)
    runner.merge(1)
    fused = [np.asarray(x) for x in jax.tree.leaves(runner.merged)]
    runner.merge_per_layer(0)
    runner.merge_per_layer(1)
    per_layer = [np.asarray(x) for x in jax.tree.leaves(runner.merged)]
    identical = all(np.array_equal(a, b) for a, b in zip(fused, per_layer))
    del fused, per_layer

    # merge() skips work when the slot is already merged, so alternate between the two slots
    t_fused = _timed(runner.merge, runner, (0, 1), args.repeats)
    t_layer = _timed(runner.merge_per_layer, runner, (0, 1), max(3, args.repeats // 4))

    itemsize = np.dtype(cfg.dtype).itemsize
    moved = 0
    for _, lin in targeted_linears(runner.model()):
        moved += 2 * lin.d_in * lin.d_out * itemsize                 # read W, write W_m
        moved += args.rank * (lin.d_in + lin.d_out) * itemsize       # read A, B of the slot
    bandwidth = copy_bandwidth()
    floor = moved / bandwidth
    base_exact = all(np.array_equal(a, np.asarray(b)) for a, b in zip(base, jax.tree.leaves(runner.params)[:4]))

    result = {
        "command": "python " + " ".join(sys.argv),
        "device": jax.devices()[0].device_kind, "jax": jax.__version__, "python": platform.python_version(),
        "preset": args.preset, "rank": args.rank, "targeted_weights": len(runner.module_shapes),
        "bytes_moved": moved, "copy_bandwidth_Bps": bandwidth, "floor_ms": 1e3 * floor,
        "fused_ms": {"median": 1e3 * statistics.median(t_fused), "min": 1e3 * min(t_fused), "all": [1e3 * t for t in t_fused]},
        "per_layer_ms": {"median": 1e3 * statistics.median(t_layer), "min": 1e3 * min(t_layer),
                         "all": [1e3 * t for t in t_layer]},
        "unmerge_ms": 0.0,
        "fused_over_floor": statistics.median(t_fused) / floor,
        "per_layer_over_fused": statistics.median(t_layer) / statistics.median(t_fused),
        "fused_equals_per_layer": identical, "base_bit_identical": base_exact,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    table = "\n".join([
        f"# Mode switch on {args.preset} shapes (rank {args.rank}), {result['device']}, jax {jax.__version__}",
        "", f"`{result['command']}`", "",
        "| switch | median ms | vs floor |", "| --- | --- | --- |",
        f"| floor ({moved / 1e9:.2f} GB at {bandwidth / 1e12:.2f} TB/s) | {1e3 * floor:.2f} | 1.00x |",
        f"| fused (one call, donated) | {result['fused_ms']['median']:.2f} | {result['fused_over_floor']:.2f}x |",
        f"| per layer (dLoRA-style) | {result['per_layer_ms']['median']:.2f} | "
        f"{statistics.median(t_layer) / floor:.2f}x |",
        "| unmerge | 0 (base never written) | - |", "",
        f"fused == per-layer bit for bit: {identical}; base bit-identical after all switches: {base_exact}",
    ])
    out.with_suffix(".md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
