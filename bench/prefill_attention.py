"""Prefill attention on LLaVA-1.5-7B shapes: the paged flash kernel under several launches against
the gather + dense masked attention the reference backend runs, in one run on the same inputs.

  python bench/prefill_attention.py --out bench/results/prefill_attention

Each shape is a step's block of prefill chunks: `rows` rows of `queries` query slots (32 heads
of 128) over page tables of `context` keys (as wide as the engine pads them; 16-key pages
scattered at random over a cache of exactly the rows' pages and the null page 0), the chunk starting
at `start` (earlier chunks cached) with `real` real queries per row and padding after them.
The flash kernel reads the pages through the page table; `dense` gathers each row's whole table
into a dense context first, and that gather is timed with it. Times are bulk-timed medians
(pallas_kernels.timing), less the harness's own cost; TFLOP/s counts the causal work the
queries need (4 Dh H per attended key).
"""

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import flash_timings, flash_variants, require_gpu, save_result  # noqa: E402
from pallas_kernels.prefill_attention import prefill_attention, prefill_attention_reference  # noqa: E402
from pallas_kernels.timing import harness_overhead  # noqa: E402
from valora_jax.versions import stack_versions, versions_line  # noqa: E402

HEADS, HEAD_DIM, PAGE = 32, 128, 16
LAUNCHES = [(64, 64, 4, 2), (64, 64, 8, 2), (128, 64, 8, 2), (128, 128, 8, 2), (64, 128, 8, 3)]
"""(block_q, block_k, warps, stages) of the flash kernel."""


@dataclasses.dataclass(frozen=True)
class Shape:
    rows: int
    queries: int
    context: int
    start: int
    real: int

    def label(self) -> str:
        return f"{self.rows}x{self.queries} over {self.context} keys, chunk at {self.start}, {self.real} real"

    def width(self) -> int:
        """Pages of each row's table."""
        return -(-self.context // PAGE)

    def attended_keys(self) -> int:
        return self.rows * sum(min(self.start + i, self.context - 1) + 1 for i in range(self.real))


SHAPES = [
    Shape(1, 1024, 1024, 0, 626),          # one VQA prompt (576 image + 50 text tokens), its own bucket
    Shape(2, 512, 4096, 0, 512),           # e2e's prefill rows: 512-token chunks, 256-page tables
    Shape(2, 512, 4096, 512, 114),         # the tail chunks of those prompts
    Shape(4, 1024, 4096, 0, 1024),
    Shape(1, 4096, 4096, 0, 3506),         # a 6-frame clip in one chunk
    Shape(1, 1024, 8192, 6144, 1024),      # a late chunk of a long context
]


def _inputs(shape: Shape, seed: int):
    """(q, k_pages, v_pages, page_table, positions), bfloat16, each row's pages scattered over the
    cache."""
    rng = np.random.default_rng(seed)
    normal = lambda *s: jnp.asarray(rng.standard_normal(s, np.float32), jnp.bfloat16)
    width = shape.width()
    pages = 1 + shape.rows * width
    table = (1 + rng.permutation(shape.rows * width)).reshape(shape.rows, width)
    positions = np.full((shape.rows, shape.queries), -1, np.int32)
    positions[:, :shape.real] = shape.start + np.arange(shape.real)
    return (normal(shape.rows, shape.queries, HEADS, HEAD_DIM), normal(HEADS, pages, PAGE, HEAD_DIM),
            normal(HEADS, pages, PAGE, HEAD_DIM), jnp.asarray(table, jnp.int32), jnp.asarray(positions))


def variants() -> dict:
    return flash_variants(prefill_attention_reference, prefill_attention, LAUNCHES)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench/results/prefill_attention")
    args = ap.parse_args(argv)
    require_gpu("bench/prefill_attention.py")
    harness = harness_overhead(4)
    records = []
    for shape in SHAPES:
        sets = [_inputs(shape, seed) for seed in range(2)]
        timings = flash_timings(variants(), sets, harness)
        us, best = timings["us"], timings["best_flash"]
        record = {"shape": dataclasses.asdict(shape), "label": shape.label(), **timings,
                  "best_tflops": 4 * HEAD_DIM * HEADS * shape.attended_keys() / us[best] / 1e6 if best else None}
        records.append(record)
        print(f"{shape.label():55s} best {best}: {us.get(best, float('nan')):.1f} us; dense: {us['dense']}; "
              f"dense / best {record['dense_over_best']}", flush=True)
        del sets
    result = {"command": "python " + " ".join(sys.argv), "device": jax.devices()[0].device_kind, **stack_versions(),
              "date": time.strftime("%Y-%m-%d"), "harness_us": harness * 1e6, "records": records}
    save_result(args.out, result, report(result))


def report(result: dict) -> str:
    """Markdown: per shape, every variant's net us, the best flash launch and its speed-up over dense."""
    names = list(variants())
    fmt = lambda t: f"{t:.1f}" if isinstance(t, float) else "–"
    lines = [f"# Prefill attention, LLaVA-1.5-7B heads ({HEADS} x {HEAD_DIM}), {result['device']}, {versions_line(result)}",
             "", f"`{result['command']}` · net us per call (harness {result['harness_us']:.2f} us removed)", "",
             "| shape | " + " | ".join(names) + " | dense / best flash | best flash TFLOP/s |",
             "|---" * (len(names) + 3) + "|"]
    for r in result["records"]:
        ratio = f"{r['dense_over_best']:.2f}x" if r["dense_over_best"] else "–"
        tflops = f"{r['best_tflops']:.0f}" if r["best_tflops"] else "–"
        lines.append(f"| {r['label']} | " + " | ".join(fmt(r["us"].get(n)) for n in names) + f" | {ratio} | {tflops} |")
    failed = [(r["label"], n, e) for r in result["records"] for n, e in r["us"].items() if isinstance(e, str)]
    lines += ["", *[f"- {label}, {n}: {e}" for label, n, e in failed]] if failed else []
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
