"""The rate a plain Pallas (Triton) kernel streams memory at on this device: the ceiling for ATMM's
prefill launches and the swift merge, which read and write whole activations or weights.

  python bench/pallas_copy.py --out bench/results/pallas_copy

Every variant computes y = x + t (t: a 1-element array, so no call can be folded away) over a
bfloat16 [4096, 11008] array (90 MB, beyond L2), bulk-timed in one run (pallas_kernels.timing):
XLA's fused elementwise kernel, and a Pallas kernel over [BM, BN] tiles for a grid of tile
shapes, warps, row tiles per program (a loop down the column, software-pipelined over `stages`)
and masked against unmasked loads (the ATMM and merge kernels mask every load). Beside them, the
swift merge on the same weight shape with its tuned tile, which moves the same bytes plus the
adapter's. Reports TB/s = bytes read and written / time.
"""

import argparse
import functools
import itertools
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import require_gpu, save_result  # noqa: E402
from pallas_kernels import merge  # noqa: E402
from pallas_kernels.lora_reference import LoraWeight  # noqa: E402
from pallas_kernels.tiling import pick_merge_tile  # noqa: E402
from pallas_kernels.timing import BulkTimer, compile_all, copy_bandwidth  # noqa: E402
from valora_jax.versions import stack_versions, versions_line  # noqa: E402

SHAPE = (4096, 11008)
MERGE_RANK = 64
TILES = [(32, 256), (64, 128), (64, 256), (128, 128), (128, 256), (256, 128)]
WARPS = (4, 8)
LOOPS = [(1, 1), (4, 1), (4, 3)]          # (row_tiles, stages)


def _add_kernel(x_ref, t_ref, y_ref, *, bm: int, bn: int, row_tiles: int, masked: bool):
    """y[tile] = x[tile] + t[0] for row tiles program_id(0) * row_tiles + k of column block program_id(1)."""
    m, n = x_ref.shape
    first, j = pl.program_id(0) * row_tiles, pl.program_id(1)
    cols = j * bn + jnp.arange(bn)
    t = t_ref[0]

    def tile(k, carry):
        rows, cols_at = pl.ds((first + k) * bm, bm), pl.ds(j * bn, bn)
        if masked:
            ok = ((first + k) * bm + jnp.arange(bm) < m)[:, None] & (cols < n)[None, :]
            x = plt.load(x_ref.at[rows, cols_at], mask=ok, other=0)
            plt.store(y_ref.at[rows, cols_at], x + t, mask=ok)
        else:
            y_ref[rows, cols_at] = x_ref[rows, cols_at] + t
        return carry

    jax.lax.fori_loop(0, row_tiles, tile, 0)


def pallas_add(x, t, *, bm: int, bn: int, warps: int, row_tiles: int, stages: int, masked: bool,
               interpret: bool = False):
    """x + t[0] by the Pallas kernel; x [M, N] with M % (bm * row_tiles) == N % bn == 0."""
    m, n = x.shape
    if m % (bm * row_tiles) or n % bn:
        raise ValueError(f"[{m}, {n}] is not a whole number of {bm * row_tiles}x{bn} blocks")
    return pl.pallas_call(
        functools.partial(_add_kernel, bm=bm, bn=bn, row_tiles=row_tiles, masked=masked),
        out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype),
        grid=(m // (bm * row_tiles), n // bn),
        compiler_params=plt.CompilerParams(num_warps=warps, num_stages=stages),
        interpret=interpret,
        name="stream_add",
    )(x, t)


def variants() -> dict:
    """{name: fn(x, t)}: XLA and every Pallas launch of the grid."""
    # the barrier keeps XLA from computing only the element that the timing chain reads of all but
    # the last call (a Pallas call cannot be sliced so)
    out = {"xla": lambda x, t: jax.lax.optimization_barrier(x + t)}
    for (bm, bn), warps, (row_tiles, stages), masked in itertools.product(TILES, WARPS, LOOPS, (False, True)):
        name = f"pallas {bm}x{bn} w{warps} rows{row_tiles} s{stages}{' masked' if masked else ''}"
        out[name] = functools.partial(pallas_add, bm=bm, bn=bn, warps=warps, row_tiles=row_tiles, stages=stages,
                                      masked=masked)
    return out


def _merge_sets(rng) -> list:
    d_in, d_out = SHAPE
    normal = lambda *shape: jnp.asarray(rng.standard_normal(shape, np.float32) * 0.02, jnp.bfloat16)
    w = LoraWeight(normal(2, d_in, MERGE_RANK), normal(2, MERGE_RANK, d_out), jnp.ones((2,), jnp.float32),
                   jnp.full((2,), MERGE_RANK, jnp.int32))
    return [(normal(d_in, d_out), w, jnp.int32(0)), (normal(d_in, d_out), w, jnp.int32(1))]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench/results/pallas_copy")
    args = ap.parse_args(argv)
    require_gpu("bench/pallas_copy.py")
    device = jax.devices()[0].device_kind
    rng = np.random.default_rng(0)
    sets = [(jnp.asarray(rng.standard_normal(SHAPE, np.float32), jnp.bfloat16), jnp.ones((1,), jnp.bfloat16))
            for _ in range(2)]
    moved = 2 * np.prod(SHAPE) * 2
    rates = {}
    jobs = [(name, functools.partial(BulkTimer, fn, sets, unroll=4)) for name, fn in variants().items()]
    merge_tile = pick_merge_tile(*SHAPE, MERGE_RANK)
    merge_sets = _merge_sets(rng)
    jobs.append((f"swift merge (tuned tile {merge_tile.to_dict()})",
                 functools.partial(BulkTimer, functools.partial(merge._merge, tile=merge_tile, interpret=False),
                                   merge_sets, unroll=4)))
    for name, timer in compile_all(jobs):
        if isinstance(timer, Exception):
            rates[name] = {"error": f"{type(timer).__name__}: {str(timer).splitlines()[0][:200]}"}
        else:
            seconds = timer.seconds(target_s=0.05)
            n_bytes = merge.merge_bytes(*SHAPE, MERGE_RANK) if name.startswith("swift merge") else moved
            rates[name] = {"us": seconds * 1e6, "tb_per_s": n_bytes / seconds / 1e12}
        print(f"{name:45s} {rates[name]}", flush=True)
    result = {"command": "python " + " ".join(sys.argv), "device": device, **stack_versions(),
              "date": time.strftime("%Y-%m-%d"), "shape": list(SHAPE), "dtype": "bfloat16",
              "copy_bandwidth_TBps": copy_bandwidth() / 1e12, "variants": rates}
    save_result(args.out, result, report(result))


def report(result: dict) -> str:
    """A markdown table of the variants, fastest first."""
    ok = sorted(((n, r) for n, r in result["variants"].items() if "us" in r), key=lambda nr: nr[1]["us"])
    lines = [f"# Streaming y = x + t over bfloat16 {result['shape'][0]}x{result['shape'][1]}, {result['device']}, "
             f"{versions_line(result)}", "", f"`{result['command']}` · copy bandwidth (XLA, 4 GB) "
             f"{result['copy_bandwidth_TBps']:.2f} TB/s", "", "| variant | us | TB/s |", "| --- | --- | --- |"]
    lines += [f"| {n} | {r['us']:.1f} | {r['tb_per_s']:.2f} |" for n, r in ok]
    lines += [f"| {n} | – | {r['error']} |" for n, r in result["variants"].items() if "error" in r]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
