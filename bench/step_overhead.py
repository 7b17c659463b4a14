"""Host dispatch against device time of one LLaVA-1.5-7B decode step, under XLA flag variants.

A decode step launches about a thousand kernels (32 layers of projections, norms, attention and,
unmerged, eight ATMM launches). When the host takes longer to launch them than the GPU to run
them, the step costs its dispatch time, whatever the kernels do. Each variant runs in its own
process with its XLA_FLAGS (the flags are read once per process) and times, for merged and
unmerged mode, 64 decode rows over 16 keys: the host time until the call returns ("dispatch")
and until the result is ready ("step"), medians of 10 after a warm-up call; and a jitted no-op
over the same arguments ("arguments only": what passing ~1500 weight arrays costs). With
`--kernels`, the same under the serving flags (no command buffers) for other LoRA / attention
backends: which of the step's kernels its dispatch goes to.

  python bench/step_overhead.py --out bench/results/step_overhead [--kernels reference/pallas,pallas/reference]
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import save_result  # noqa: E402
from valora_jax.versions import stack_versions, versions_line  # noqa: E402

VARIANTS = {
    "default": "",
    "no_command_buffers": "--xla_gpu_enable_command_buffer=",
    "command_buffers_min_size_1": "--xla_gpu_graph_min_graph_size=1",
    "command_buffers_every_kind": "--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,"
                                  "WHILE,CONDITIONAL --xla_gpu_graph_min_graph_size=1",
    "command_buffers_without_custom_calls": "--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUDNN",
}


def measure(preset: str = "llava-1.5-7b", kernels: str | None = None) -> dict:
    """{mode: {"dispatch_ms", "step_ms"}, "arguments_only_ms"} under this process's XLA flags, with
    kernels "LORA/ATTENTION" backends (default: the platform's kernels)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from valora_jax import PRESETS, ModelRunner, RowSpec, init_model, init_pages, pack_block, random_adapter

    cfg = PRESETS[preset](max_loras=8, max_rank=16)
    platform = "pallas" if jax.default_backend() == "gpu" else "reference"     # reference: CPU tests
    lora, attention = (kernels or f"{platform}/{platform}").split("/")
    runner = ModelRunner(init_model(cfg, seed=0), backend=lora, attention=attention)
    for s in range(8):
        runner.write_slot(s, random_adapter(cfg, runner.module_shapes, f"a{s}", 16, seed=s, std=0.01))
    runner.merge(0)
    cache = init_pages(cfg.text, 256, cfg.page_size, jnp.bfloat16)
    empty = jnp.zeros((0, cfg.text.hidden_size), jnp.bfloat16)
    block = pack_block([RowSpec([5], 15, None, i % 8, [1 + i]) for i in range(64)], min_pages=64)
    out = {}
    for mode in ("merged", "unmerged"):
        result = runner.step(cache, [block], empty, mode)
        jax.block_until_ready(result)
        cache = result[2]
        dispatch, step = [], []
        for _ in range(10):
            t0 = time.perf_counter()
            result = runner.step(cache, [block], empty, mode)
            t1 = time.perf_counter()
            jax.block_until_ready(result)
            cache = result[2]
            dispatch.append(t1 - t0)
            step.append(time.perf_counter() - t0)
        out[mode] = {"dispatch_ms": 1e3 * float(np.median(dispatch)), "step_ms": 1e3 * float(np.median(step))}
    # the part of dispatch that is passing the step's arguments: a jitted no-op over the same leaves
    noop = jax.jit(lambda leaves, cache: cache[0][0][0, 0, 0, 0])
    leaves = runner._state_leaves()
    jax.block_until_ready(noop(leaves, cache))
    times = []
    for _ in range(10):
        t0 = time.perf_counter()
        jax.block_until_ready(noop(leaves, cache))
        times.append(time.perf_counter() - t0)
    out["arguments_only_ms"] = 1e3 * float(np.median(times))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"of {sorted(VARIANTS)}")
    ap.add_argument("--out", default="bench/results/step_overhead")
    ap.add_argument("--preset", default="llava-1.5-7b")
    ap.add_argument("--kernels", default="", help="LORA/ATTENTION backend pairs, comma-separated, measured "
                                                   "besides under the serving flags (e.g. reference/pallas)")
    ap.add_argument("--child", metavar="KERNELS", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child is not None:
        print(json.dumps(measure(args.preset, args.child or None)))
        return
    import jax

    names, kernels = args.variants.split(","), [k for k in args.kernels.split(",") if k]
    unknown = [n for n in names if n not in VARIANTS] + [k for k in kernels if len(k.split("/")) != 2]
    if unknown:
        raise SystemExit(f"unknown variants or kernels {unknown}; expected some of {sorted(VARIANTS)} and "
                         "LORA/ATTENTION backend pairs")

    def run(flags: str, kernel_pair: str = "") -> dict:
        env = dict(os.environ, XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " " + flags).strip())
        proc = subprocess.run([sys.executable, __file__, "--child", kernel_pair, "--preset", args.preset], env=env,
                              capture_output=True, text=True)
        if proc.returncode:
            return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"}
        return json.loads(proc.stdout.strip().splitlines()[-1])

    results, by_kernels = {}, {}
    for name in names:
        results[name] = run(VARIANTS[name])
        print(name, results[name], flush=True)
    for pair in kernels:
        by_kernels[pair] = run(VARIANTS["no_command_buffers"], pair)
        print(pair, by_kernels[pair], flush=True)
    report = {"command": "python " + " ".join(sys.argv), "device": jax.devices()[0].device_kind,
              **stack_versions(), "xla_flags": {n: VARIANTS[n] for n in names}, "results": results,
              "kernels": by_kernels}
    lines = [f"# Decode step ({args.preset}, 64 rows, 16 keys): host dispatch vs step, {report['device']}, "
             f"{versions_line(report)}", "", f"`{report['command']}`", "",
             "| variant | XLA flags | merged dispatch ms | merged step ms | unmerged dispatch ms | unmerged step ms "
             "| arguments only ms |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    rows = [(name, VARIANTS[name], r) for name, r in results.items()]
    rows += [(f"LoRA {pair.split('/')[0]}, attention {pair.split('/')[1]}", VARIANTS["no_command_buffers"], r)
             for pair, r in by_kernels.items()]
    for name, flags, r in rows:
        cells = (["error: " + r["error"]] + [""] * 4 if "error" in r else
                 [f"{r[m][k]:.2f}" for m in ("merged", "unmerged") for k in ("dispatch_ms", "step_ms")]
                 + [f"{r['arguments_only_ms']:.2f}"])
        lines.append(f"| {name} | `{flags}` | " + " | ".join(cells) + " |")
    save_result(args.out, report, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
