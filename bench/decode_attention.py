"""Paged decode attention on LLaVA-1.5-7B shapes: our kernel under several launches against the
gather + dense attention the reference backend runs and the memory floor, in one run.

  python bench/decode_attention.py --out bench/results/decode_attention

Each shape is a step's block of decode rows (one query each, 32 heads of 128 unless stated)
over a paged cache of 16-key pages scattered at random, page tables as wide as the engine pads
them (a power of two of pages). The floor is the K/V bytes the rows must read (their lengths x
heads x Dh x 2 tensors x 2 bytes) at the measured device copy rate (read + write bytes per
second, so reading alone could go up to twice as fast: the floor is a fair bar, not a hard one).
Times are bulk-timed medians over input sets larger than the L2 (pallas_kernels.timing), less
the harness's own cost. `default` is the launch the decoder runs (decode_attention's defaults).
"""

import argparse
import dataclasses
import functools
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import require_gpu, save_result  # noqa: E402
from pallas_kernels.decode_attention import decode_attention, decode_attention_reference  # noqa: E402
from pallas_kernels.timing import BulkTimer, compile_all, copy_bandwidth, harness_overhead  # noqa: E402
from valora_jax.versions import stack_versions, versions_line  # noqa: E402

HEAD_DIM, PAGE = 128, 16
LAUNCHES = [(2, 4, 2), (4, 4, 3), (4, 8, 2), (8, 4, 2), (8, 4, 3), (16, 4, 2), (8, 8, 2)]
"""(pages_per_block, warps, stages) of our kernel besides its defaults."""


@dataclasses.dataclass(frozen=True)
class Shape:
    rows: int
    keys: int                 # each row's length (ragged: lengths drawn uniformly in 1..keys)
    heads: int = 32
    kv_heads: int = 32
    ragged: bool = False

    def label(self) -> str:
        gqa = f", {self.heads}/{self.kv_heads} heads" if self.heads != self.kv_heads else ""
        return f"{self.rows} rows x {'<=' if self.ragged else ''}{self.keys} keys{gqa}"

    def width(self) -> int:
        return 1 << (-(-self.keys // PAGE) - 1).bit_length()


SHAPES = [
    Shape(64, 640), Shape(64, 1024), Shape(64, 2048), Shape(64, 4096),   # the step-floor targets
    Shape(1, 4096), Shape(8, 1024),                                       # few rows: splits fill the GPU
    Shape(64, 2048, ragged=True), Shape(64, 2048, 32, 8),                 # ragged lengths; grouped-query heads
]


def _inputs(shape: Shape, seed: int):
    """(q, k_pages, v_pages, page_table, lengths), bfloat16, pages scattered over a cache with
    exactly the pages the rows need (plus the null page 0)."""
    rng = np.random.default_rng(seed)
    width = shape.width()
    lengths = rng.integers(1, shape.keys + 1, shape.rows) if shape.ragged else np.full(shape.rows, shape.keys)
    pages = 1 + shape.rows * width
    table = (1 + rng.permutation(shape.rows * width)).reshape(shape.rows, width)
    normal = lambda *s: jnp.asarray(rng.standard_normal(s, np.float32), jnp.bfloat16)
    return (normal(shape.rows, shape.heads, HEAD_DIM), normal(shape.kv_heads, pages, PAGE, HEAD_DIM),
            normal(shape.kv_heads, pages, PAGE, HEAD_DIM), jnp.asarray(table, jnp.int32),
            jnp.asarray(lengths, jnp.int32))


def _floor_bytes(shape: Shape, sets) -> float:
    """Mean over the sets of the K/V bytes the rows read (bfloat16)."""
    return float(np.mean([int(np.sum(s[4])) * shape.kv_heads * HEAD_DIM * 2 * 2 for s in sets]))


def variants() -> dict:
    out = {"gather+dense": decode_attention_reference, "default": decode_attention}
    for ppb, warps, stages in LAUNCHES:
        out[f"p{ppb} w{warps} s{stages}"] = functools.partial(decode_attention, pages_per_block=ppb, warps=warps,
                                                              stages=stages)
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench/results/decode_attention")
    args = ap.parse_args(argv)
    require_gpu("bench/decode_attention.py")
    bandwidth, harness = copy_bandwidth(), harness_overhead(4)
    print(f"{jax.devices()[0].device_kind}: copy {bandwidth / 1e12:.2f} TB/s, harness {harness * 1e6:.2f} us",
          flush=True)
    records = []
    for shape in SHAPES:
        one = _inputs(shape, 0)
        n_sets = max(2, int(np.ceil(200e6 / sum(a.nbytes for a in one))))           # > L2 together
        sets = [one] + [_inputs(shape, seed) for seed in range(1, n_sets)]
        floor_us = _floor_bytes(shape, sets) / bandwidth * 1e6
        want = np.asarray(decode_attention_reference(*one), np.float32)
        us, errors = {}, {}
        jobs = [(name, functools.partial(BulkTimer, fn, sets, unroll=len(sets))) for name, fn in variants().items()]
        for name, timer in compile_all(jobs, threads=4):
            if isinstance(timer, Exception):
                us[name] = f"{type(timer).__name__}: {str(timer).splitlines()[0][:160]}"
                continue
            us[name] = (timer.seconds(target_s=0.05) - harness) * 1e6
            got = np.asarray(variants()[name](*one), np.float32)
            errors[name] = float(np.linalg.norm(got - want) / np.linalg.norm(want))
        timed = {n: t for n, t in us.items() if isinstance(t, float)}
        ours = {n: t for n, t in timed.items() if n != "gather+dense"}
        best = min(ours, key=ours.get) if ours else None
        record = {"shape": dataclasses.asdict(shape), "label": shape.label(), "width": shape.width(), "us": us,
                  "rel_error": errors, "floor_us": floor_us, "best": best,
                  "default_of_floor": floor_us / timed["default"] if "default" in timed else None,
                  "best_of_floor": floor_us / ours[best] if best else None}
        records.append(record)
        print(f"{shape.label():34s} floor {floor_us:7.1f} us; default {us.get('default')}; best {best} "
              f"{ours.get(best)}; gather+dense {us.get('gather+dense')}", flush=True)
        del sets, one
    result = {"command": "python " + " ".join(sys.argv), "device": jax.devices()[0].device_kind, **stack_versions(),
              "date": time.strftime("%Y-%m-%d"), "copy_bytes_per_s": bandwidth, "harness_us": harness * 1e6,
              "records": records}
    save_result(args.out, result, report(result))


def report(result: dict) -> str:
    """Markdown: per shape, the floor, every variant's net us, and the share of the copy rate reached."""
    names = list(variants())
    fmt = lambda t: f"{t:.1f}" if isinstance(t, float) else "–"
    pct = lambda x: f"{100 * x:.0f}%" if x else "–"
    lines = [f"# Paged decode attention ({HEAD_DIM}-dim heads, {PAGE}-key pages), {result['device']}, "
             f"{versions_line(result)}", "",
             f"`{result['command']}` · net us per call (harness {result['harness_us']:.2f} us removed) · copy rate "
             f"{result['copy_bytes_per_s'] / 1e12:.2f} TB/s · floor = K/V bytes read / copy rate", "",
             "| shape | floor | " + " | ".join(names) + " | default: floor / time | best | best: floor / time |",
             "|---" * (len(names) + 5) + "|"]
    for r in result["records"]:
        lines.append(f"| {r['label']} | {r['floor_us']:.1f} | " + " | ".join(fmt(r["us"].get(n)) for n in names)
                     + f" | {pct(r['default_of_floor'])} | {r['best']} | {pct(r['best_of_floor'])} |")
    failed = [(r["label"], n, e) for r in result["records"] for n, e in r["us"].items() if isinstance(e, str)]
    lines += ["", *[f"- {label}, {n}: {e}" for label, n, e in failed]] if failed else []
    worst = max((e for r in result["records"] for e in r["rel_error"].values()), default=None)
    lines += ["", f"Largest relative error against the reference, any variant: {worst:.2e}."] if worst else []
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
