"""Where a serving step's device time goes: the GPU kernels of serve's steps, by kind, from JAX's profiler.

  python bench/step_profile.py --out bench/results/step_profile [--trace-dir DIR]

The steps are bench/step_floor.py's (serve's runner, configuration and block shapes). Each shape
runs `steps` back-to-back sampling steps under `jax.profiler.trace`; the Perfetto trace's GPU
kernel events are grouped by kind (`KINDS`) and reported per step beside the step's wall time,
the device's busy time (the union of its kernels) and the floor, so the distance from the floor
shows kernel kind by kernel kind. The raw traces stay in --trace-dir.
"""

import argparse
import collections
import gzip
import json
import re
import sys
import time
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import save_result  # noqa: E402
from bench.step_floor import SHAPES, blocks_of, first_chunks, floor_of, setup  # noqa: E402
from valora_jax.runtime import Sampling, use_serving_xla_flags  # noqa: E402
from valora_jax.versions import stack_versions, versions_line  # noqa: E402

KINDS = [   # (kind, pattern of the kernel name), first match wins
    ("ATMM (LoRA)", r"atmm"),
    ("decode attention", r"decode_attention"),
    ("prefill attention", r"prefill_attention"),
    ("GEMM", r"gemm|nvjet|xmma|cutlass|cublas|sm\d+_|matmul|dot"),
    ("sort / top-p", r"sort|cub|radix|topk|top_k"),
    ("copy / memset", r"memcpy|memset|copy"),
    ("scatter / gather", r"scatter|gather|dynamic.update.slice|dynamic.slice"),
    ("reduction fusion", r"reduce"),
    ("other fusion", r"fusion|loop"),
]


def kind_of(name: str) -> str:
    """The kind (KINDS) of a kernel named `name`; "other" when no pattern matches."""
    return next((kind for kind, pattern in KINDS if re.search(pattern, name, re.IGNORECASE)), "other")


def gpu_kernels(trace: dict) -> list[tuple[float, float, str]]:
    """(start us, duration us, name) of the kernel and memcpy events on the trace's GPU devices.
    The device processes are those whose process_name names a GPU ("/device:GPU:0 ...")."""
    names = {e["pid"]: e["args"]["name"] for e in trace["traceEvents"]
             if e.get("ph") == "M" and e.get("name") == "process_name"}
    gpus = {pid for pid, name in names.items() if "GPU" in name or "/device:" in name.lower()}
    return sorted((float(e["ts"]), float(e.get("dur", 0)), e["name"]) for e in trace["traceEvents"]
                  if e.get("ph") == "X" and e.get("pid") in gpus)


def busy_us(kernels) -> float:
    """Microseconds in which at least one of `kernels` (start, duration, _) runs."""
    busy, end = 0.0, -np.inf
    for start, dur, _ in kernels:
        if start + dur > end:
            busy += start + dur - max(start, end)
            end = start + dur
    return busy


def summarize(kernels, steps: int) -> dict:
    """Per step: kernel launches, busy ms, span ms (first kernel start to last end) and ms by kind."""
    by_kind, launches = collections.Counter(), collections.Counter()
    top = collections.Counter()
    for _, dur, name in kernels:
        by_kind[kind_of(name)] += dur
        launches[kind_of(name)] += 1
        top[name] += dur
    span = (kernels[-1][0] + kernels[-1][1] - kernels[0][0]) if kernels else 0.0
    return {"launches": len(kernels) / steps, "busy_ms": busy_us(kernels) / steps / 1e3,
            "span_ms": span / steps / 1e3,
            "kinds": {k: {"ms": v / steps / 1e3, "launches": launches[k] / steps} for k, v in by_kind.most_common()},
            "top_kernels": {k: v / steps / 1e3 for k, v in top.most_common(12)}}


def _profile(runner, cache, blocks, features, mode, steps, trace_dir: Path):
    """(cache, wall ms a step, kernels) of `steps` back-to-back sampling steps traced into trace_dir."""
    sampling = Sampling.greedy(sum(block.valid.shape[0] for block in blocks))
    step = lambda cache: runner.sample_step(cache, blocks, features, sampling, runner.config.text.vocab_size, mode)
    for _ in range(2):                                              # compiles, then one warm step
        out = step(cache)
        cache = out[2]
    jax.block_until_ready(out)
    with jax.profiler.trace(str(trace_dir), create_perfetto_trace=True):
        t0 = time.perf_counter()
        for _ in range(steps):
            out = step(cache)
            cache = out[2]
        jax.block_until_ready(out)
        wall = time.perf_counter() - t0
    path = max(trace_dir.rglob("perfetto_trace.json.gz"), key=lambda p: p.stat().st_mtime)
    with gzip.open(path) as f:
        return cache, 1e3 * wall / steps, gpu_kernels(json.load(f))


def measure(preset: str, steps: int, trace_dir: Path, shapes=SHAPES) -> dict:
    ctx = setup(preset)
    cache, records = ctx.cache, []
    rng = np.random.default_rng(0)
    for i, shape in enumerate(shapes):
        blocks, rows, _ = blocks_of(shape, ctx.config, ctx.cfg.page_size, rng)
        cache, wall_ms, kernels = _profile(ctx.runner, cache, blocks, ctx.empty, shape.mode, steps,
                                           trace_dir / f"shape{i}")
        floor = floor_of(shape, ctx.cfg, rows, first_chunks(shape, ctx.config), ctx.copy_rate, ctx.matmul_rate,
                         ctx.sizes)
        summary = summarize(kernels, steps)
        records.append({"name": shape.name, "mode": shape.mode, "rows": rows, "wall_ms": wall_ms, **floor, **summary})
        kinds = ", ".join(f"{k} {v['ms']:.2f}" for k, v in summary["kinds"].items())
        print(f"{shape.name:36s} wall {wall_ms:7.2f} ms, busy {summary['busy_ms']:7.2f}, "
              f"floor {floor['floor_ms']:7.2f}, {summary['launches']:.0f} kernels: {kinds}", flush=True)
    return {"preset": preset, "steps": steps, "backend": ctx.runner.backend, "attention": ctx.runner.attention,
            "copy_bytes_per_s": ctx.copy_rate, "records": records}


def report(result: dict) -> str:
    kinds = [k for k, _ in KINDS] + ["other"]
    lines = [f"# Where a serving step's device time goes ({result['preset']}, serve's configuration), "
             f"{result['device']}, {versions_line(result)}", "",
             f"`{result['command']}` · backends {result['backend']} / {result['attention']} · {result['steps']} "
             f"steps a shape under jax.profiler · ms a step · XLA_FLAGS `{result['xla_flags']}`", "",
             "| step | wall | device busy | floor | kernels | " + " | ".join(kinds) + " |",
             "|---|---|---|---|---|" + "---|" * len(kinds)]
    for r in result["records"]:
        cells = [f"{r['kinds'][k]['ms']:.2f} ({r['kinds'][k]['launches']:.0f})" if k in r["kinds"] else "–"
                 for k in kinds]
        lines.append(f"| {r['name']} | {r['wall_ms']:.2f} | {r['busy_ms']:.2f} | {r['floor_ms']:.2f} | "
                     f"{r['launches']:.0f} | " + " | ".join(cells) + " |")
    lines += ["", "Each kind: ms a step (kernels a step). The longest kernels of each step:", ""]
    for r in result["records"]:
        lines.append(f"- {r['name']}: " + "; ".join(f"`{k[:60]}` {v:.2f}" for k, v in r["top_kernels"].items()))
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="llava-1.5-7b")
    ap.add_argument("--steps", type=int, default=5, help="back-to-back steps traced per shape")
    ap.add_argument("--out", default="bench/results/step_profile")
    ap.add_argument("--trace-dir", default="/tmp/valora-step-profile")
    args = ap.parse_args(argv)
    xla_flags = use_serving_xla_flags()
    result = {"command": "python " + " ".join(sys.argv), **stack_versions(), "xla_flags": xla_flags,
              "date": time.strftime("%Y-%m-%d"), **measure(args.preset, args.steps, Path(args.trace_dir))}
    save_result(args.out, result, report(result))


if __name__ == "__main__":
    main()
