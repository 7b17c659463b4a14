"""Mode-switch cost on real model shapes: merging an adapter into every targeted weight.

Compares, on the same model and adapters in one run, for each merge implementation (the
swift-merge Pallas kernel of the pallas backends, XLA's `W + A @ B` of the reference backend):
  fused      ModelRunner.merge: every targeted layer in one jitted call, old buffers donated;
  per-layer  ModelRunner.merge_per_layer: one dispatch per weight (the dLoRA-style switch);
the same fused call with each weight merged as one GEMM whose addend is W (`gemm_addend_merge`,
what a GEMM epilogue with beta = 1 can do in one pass over W); and the floor: bytes that must
move (read W and the adapter's A, B; write W_m) / measured copy bandwidth.
Unmerging costs nothing in valora-jax (base weights are never written); the run also checks
that both switches give bit-identical merged weights and that the base stays bit-identical.

  python bench/switch.py --preset llava-1.5-7b --rank 64 --out bench/results/switch
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import save_result  # noqa: E402
from pallas_kernels.lora_reference import merge_parts_reference  # noqa: E402
from pallas_kernels.merge import merge_bytes  # noqa: E402
from pallas_kernels.tiling import pick_merge_tile  # noqa: E402
from pallas_kernels.timing import copy_bandwidth  # noqa: E402
from valora_jax import PRESETS, ModelRunner, init_model, random_adapter  # noqa: E402
from valora_jax.lora import targeted_linears  # noqa: E402
from valora_jax.versions import stack_versions, versions_line  # noqa: E402


def _timed(fn, runner, slots, repeats):
    times = []
    for i in range(repeats):
        t0 = time.perf_counter()
        fn(slots[i % 2])
        runner.wait_merged()
        times.append(time.perf_counter() - t0)
    return times


def gemm_addend_merge(kernel, weights, columns, slot):
    """W + the parts' (scale A)[:, :rank] @ B[:rank] at their columns, as one GEMM with W as its
    addend, bf16 out: A side by side [D_in, sum R] @ B block by block [sum R, D_out] (the GEMM
    accumulates in float32; scale A is rounded to W's dtype first)."""
    a_parts, b = [], jnp.zeros((sum(w.a.shape[-1] for w in weights), kernel.shape[1]), kernel.dtype)
    row = 0
    for w, col in zip(weights, columns):
        r, width = w.a.shape[-1], w.b.shape[-1]
        keep = (jnp.arange(r) < w.rank[slot]).astype(jnp.float32)
        a_parts.append((w.a[slot].astype(jnp.float32) * (w.scale[slot] * keep)).astype(kernel.dtype))
        b = b.at[row: row + r, col: col + width].set(w.b[slot])
        row += r
    return jnp.dot(jnp.concatenate(a_parts, axis=1), b, preferred_element_type=kernel.dtype) + kernel


def _time_gemm_addend(linears, repeats: int) -> tuple[list, float]:
    """Seconds of each fused GEMM-addend merge of every weight (previous outputs donated), and the
    max |difference| of a sample of its merged weights from the reference merge."""
    kernels = [lin.kernel[...] for lin in linears]
    weights = [tuple(slots.weight() for _, slots in lin.slots()) for lin in linears]
    columns = [tuple(part.start for part, _ in lin.slots()) for lin in linears]
    merge_all = jax.jit(lambda old, kernels, weights, slot: [gemm_addend_merge(k, w, c, slot)
                                                             for k, w, c in zip(kernels, weights, columns)],
                        donate_argnums=0)
    merged = jax.block_until_ready(merge_all([jnp.zeros_like(k) for k in kernels], kernels, weights, jnp.int32(1)))
    times = []
    for i in range(repeats):
        t0 = time.perf_counter()
        merged = jax.block_until_ready(merge_all(merged, kernels, weights, jnp.int32(i % 2)))
        times.append(time.perf_counter() - t0)
    slot = jnp.int32((repeats - 1) % 2)
    diff = max(float(jnp.max(jnp.abs(merged[i].astype(jnp.float32) - merge_parts_reference(
        kernels[i], kernels[i], weights[i], columns[i], slot).astype(jnp.float32)))) for i in range(4))
    return times, diff


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

    linears = [lin for _, lin in targeted_linears(first.model())]
    t_gemm, gemm_diff = _time_gemm_addend(linears, args.repeats)
    itemsize = np.dtype(cfg.dtype).itemsize
    moved, tiles = 0, {}
    for lin in linears:         # a part without adapter slots is copied (rank 0)
        moved += sum(merge_bytes(lin.d_in, p.width, args.rank if p in lin.targeted_parts else 0, itemsize)
                     for p in lin.parts)
        tiles[f"{lin.d_in}x{lin.d_out}"] = pick_merge_tile(lin.d_in, lin.d_out, args.rank).to_dict()
    bandwidth = copy_bandwidth()
    floor_ms = 1e3 * moved / bandwidth
    base_exact = all(np.array_equal(a, np.asarray(b)) for a, b in zip(base, jax.tree.leaves(first.params)[:4]))
    agree = {b: max(float(np.max(np.abs(x.astype(np.float32) - y.astype(np.float32))))
                    for x, y in zip(merged[backends[0]], merged[b])) for b in backends[1:]}
    gemm = {"fused_ms": _stats(t_gemm), "max_abs_diff_vs_reference": gemm_diff}
    gemm["fused_over_floor"] = gemm["fused_ms"]["median"] / floor_ms
    for row in rows.values():
        row["fused_over_floor"] = row["fused_ms"]["median"] / floor_ms
        row["per_layer_over_floor"] = row["per_layer_ms"]["median"] / floor_ms

    result = {
        "command": "python " + " ".join(sys.argv),
        "device": jax.devices()[0].device_kind, **stack_versions(),
        "preset": args.preset, "rank": args.rank, "targeted_weights": len(first.module_shapes),
        "bytes_moved": moved, "copy_bandwidth_Bps": bandwidth, "floor_ms": floor_ms, "unmerge_ms": 0.0,
        "backends": rows, f"max_abs_diff_vs_{backends[0]}": agree, "base_bit_identical": base_exact,
        "merge_tiles": tiles, "gemm_addend": gemm,
    }
    lines = [f"# Mode switch on {args.preset} shapes (rank {args.rank}), {result['device']}, {versions_line(result)}",
             "", f"`{result['command']}`", "",
             "| switch | merge by | median ms | vs floor |", "| --- | --- | --- | --- |",
             f"| floor ({moved / 1e9:.2f} GB at {bandwidth / 1e12:.2f} TB/s) | - | {floor_ms:.2f} | 1.00x |"]
    for backend, row in rows.items():
        what = "swift-merge kernel" if backend.startswith("pallas") else "XLA (W + A @ B)"
        lines += [f"| fused (one call, donated) | {what} | {row['fused_ms']['median']:.2f} | {row['fused_over_floor']:.2f}x |",
                  f"| per layer (dLoRA-style) | {what} | {row['per_layer_ms']['median']:.2f} | "
                  f"{row['per_layer_over_floor']:.2f}x |"]
    lines += [f"| fused (one call, donated) | XLA, one GEMM with W as its addend | {gemm['fused_ms']['median']:.2f} | "
              f"{gemm['fused_over_floor']:.2f}x |",
              "| unmerge | - | 0 (base never written) | - |", "",
              "fused == per-layer bit for bit: " + ", ".join(f"{b} {r['fused_equals_per_layer']}" for b, r in rows.items())
              + f"; merged weights, max |difference| vs {backends[0]}: {agree}; base bit-identical after all "
              f"switches: {base_exact}; GEMM-addend merge, max |difference| vs the reference merge: "
              f"{gemm_diff:.3g}", "",
              "swift-merge tiles (block_m, block_n, warps, row_tiles, stages) by weight shape: "
              + ", ".join(f"{k} {tuple(t.values())}" for k, t in tiles.items())]
    save_result(args.out, result, "\n".join(lines) + "\n")


def _stats(times) -> dict:
    return {"median": 1e3 * statistics.median(times), "min": 1e3 * min(times), "all": [1e3 * t for t in times]}


if __name__ == "__main__":
    main()
