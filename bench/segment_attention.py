"""The Qwen2.5-VL tower's attention: the segment-attention kernel under several launches against
the dense masked attention of the reference backend, in one run on the same inputs.

  python bench/segment_attention.py --out bench/results/segment_attention

Each shape is one tower call's patches (16 heads of 80, bfloat16) cut into runs as the tower's
blocks see them: windows of 64 patches (a windowed block), or whole frames (a full-attention
block). Times are bulk-timed medians (pallas_kernels.timing), less the harness's own cost. The
floor is the work the queries need (4 Dh H per attended key, the head dimension as the model
has it, 80) at the bf16 matmul rate measured in the same run; the kernel computes on a head
dimension padded to 128, so 1.6x that floor is its own ceiling.
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
from bench.step_floor import _matmul_rate  # noqa: E402
from pallas_kernels.segment_attention import segment_attention, segment_attention_reference  # noqa: E402
from pallas_kernels.timing import harness_overhead  # noqa: E402
from valora_jax.versions import stack_versions, versions_line  # noqa: E402

HEADS, HEAD_DIM = 16, 80
LAUNCHES = [(64, 64, 4, 2), (64, 64, 8, 2), (128, 64, 8, 2), (64, 128, 4, 2), (128, 128, 8, 3)]
"""(block_q, block_k, warps, stages) of the kernel."""


@dataclasses.dataclass(frozen=True)
class Shape:
    name: str
    runs: tuple[int, ...]

    def label(self) -> str:
        sizes = sorted(set(self.runs))
        return f"{self.name}: {sum(self.runs)} patches in {len(self.runs)} runs of {', '.join(map(str, sizes))}"

    def attended_pairs(self) -> int:
        return sum(n * n for n in self.runs)


SHAPES = [
    Shape("windowed, 8 images of 448 px", (64,) * 128),
    Shape("full, 8 images of 448 px", (1024,) * 8),
    Shape("windowed, one 896 x 1120 px image", (64,) * 80),
    Shape("full, one 896 x 1120 px image", (5120,)),
    Shape("full, a 6-frame clip and 2 images", (1024,) * 3 + (1024, 2048)),
]


def _inputs(shape: Shape, seed: int):
    rng = np.random.default_rng(seed)
    p = sum(shape.runs)
    q, k, v = (jnp.asarray(rng.standard_normal((p, HEADS, HEAD_DIM), np.float32), jnp.bfloat16) for _ in range(3))
    return q, k, v, jnp.asarray(np.repeat(np.arange(len(shape.runs)), shape.runs), jnp.int32)


def variants() -> dict:
    return flash_variants(segment_attention_reference, segment_attention, LAUNCHES)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench/results/segment_attention")
    args = ap.parse_args(argv)
    require_gpu("bench/segment_attention.py")
    harness, matmul_rate = harness_overhead(4), _matmul_rate()
    records = []
    for shape in SHAPES:
        sets = [_inputs(shape, seed) for seed in range(2)]
        timings = flash_timings(variants(), sets, harness)
        us, best = timings["us"], timings["best_flash"]
        floor_us = 4 * HEAD_DIM * HEADS * shape.attended_pairs() / matmul_rate * 1e6
        record = {"shape": dataclasses.asdict(shape), "label": shape.label(), **timings, "floor_us": floor_us,
                  "best_over_floor": us[best] / floor_us if best else None}
        records.append(record)
        print(f"{shape.label():70s} best {best}: {us.get(best, float('nan')):.1f} us "
              f"({record['best_over_floor']}x floor); dense: {us['dense']}", flush=True)
        del sets
    result = {"command": "python " + " ".join(sys.argv), "device": jax.devices()[0].device_kind, **stack_versions(),
              "date": time.strftime("%Y-%m-%d"), "harness_us": harness * 1e6, "matmul_tflops": matmul_rate / 1e12,
              "records": records}
    save_result(args.out, result, report(result))


def report(result: dict) -> str:
    """Markdown: per shape, every variant's net us, the best launch against its floor and dense."""
    names = list(variants())
    fmt = lambda t: f"{t:.1f}" if isinstance(t, float) else "–"
    lines = [f"# The Qwen2.5-VL tower's attention ({HEADS} heads x {HEAD_DIM}), {result['device']}, "
             f"{versions_line(result)}", "",
             f"`{result['command']}` · net us per call (harness {result['harness_us']:.2f} us removed) · floor: "
             f"the attended work at {result['matmul_tflops']:.0f} TFLOP/s (bf16 matmul, measured)", "",
             "| shape | " + " | ".join(names) + " | floor us | best flash / floor | dense / best flash |",
             "|---" * (len(names) + 4) + "|"]
    for r in result["records"]:
        ratio = lambda v: f"{v:.2f}x" if v else "–"
        lines.append(f"| {r['label']} | " + " | ".join(fmt(r["us"].get(n)) for n in names)
                     + f" | {r['floor_us']:.1f} | {ratio(r['best_over_floor'])} | {ratio(r['dense_over_best'])} |")
    failed = [(r["label"], n, e) for r in result["records"] for n, e in r["us"].items() if isinstance(e, str)]
    lines += ["", *[f"- {label}, {n}: {e}" for label, n, e in failed]] if failed else []
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
