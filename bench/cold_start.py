"""Cold start of `valora serve`: from a fresh process to its first answer, by phase.

  python bench/cold_start.py --out bench/results/cold_start [--model llava-1.5-7b]

Each run is a fresh process that builds the engine exactly as `valora serve` does
(`serve.cli.serving_engine` on `valora serve`'s parsed arguments: model, runner, adapters, serve's
configuration for this platform, its precompiled step shapes, calibration) and then answers one
request of one image and 16 tokens; the HTTP server that `valora serve` starts next is left out.
Two runs: one on an empty persistent compilation cache (a machine's first start), one on the
cache the first filled (every later start).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import save_result  # noqa: E402
from valora_jax.versions import versions_line  # noqa: E402

PHASES = ("process_s", "engine_s", "first_answer_s", "total_s")


def start(model: str, since: float) -> dict:
    """Seconds of each phase of one start in this process (PHASES: the process started at epoch
    time `since`), and what was precompiled."""
    t0 = time.perf_counter()
    process_s = time.time() - since
    import numpy as np

    from serve import cli
    from valora_jax import Request
    from valora_jax.runtime import compile_seconds, use_serving_xla_flags
    from valora_jax.versions import stack_versions

    args = cli.build_parser().parse_args(["serve", "--model", model])
    xla_flags = use_serving_xla_flags()
    cli._enable_compilation_cache()
    t1 = time.perf_counter()
    engine = cli.serving_engine(args)
    t2 = time.perf_counter()
    size = engine.runner.config.vision.image_size
    image = np.random.default_rng(0).integers(0, 256, (size, size, 3), np.uint8)
    engine.generate([Request("Describe the image.", [image], max_tokens=16, ignore_eos=True)])
    t3 = time.perf_counter()
    return {"process_s": process_s + t1 - t0, "engine_s": t2 - t1, "first_answer_s": t3 - t2,
            "total_s": process_s + t3 - t0,
            "compile_s": compile_seconds(), "precompile": engine.config.precompile,
            "step_shapes": len(engine.config.step_shapes(("unmerged", "merged", "mixture"))),
            "xla_flags": xla_flags, "versions": stack_versions()}


def measure(model: str, cache_dir: str) -> dict:
    """{"cold": start on an empty cache, "warm": start on the cache the cold one filled}, each in a
    fresh process."""
    runs = {}
    for name in ("cold", "warm"):
        env = {**os.environ, "VALORA_XLA_CACHE": cache_dir}
        out = subprocess.run([sys.executable, __file__, "--child", str(time.time()), "--model", model], env=env,
                             capture_output=True, text=True)
        sys.stderr.write(out.stderr[-3000:])
        out.check_returncode()
        runs[name] = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{name}: " + ", ".join(f"{k} {runs[name][k]:.1f}" for k in PHASES), flush=True)
    return runs


def report(result: dict) -> str:
    lines = [f"# Cold start of `valora serve --model {result['model']}` to its first answer, {result['device']}, "
             f"{versions_line(result)}", "", f"`{result['command']}` · XLA_FLAGS `{result['xla_flags']}`", "",
             "| start | process and imports s | engine ready s | first answer s | total s | of it compiling s |",
             "|---|---|---|---|---|---|"]
    for name, label in (("cold", "empty compilation cache"), ("warm", "cache of the start before")):
        r = result["runs"][name]
        lines.append(f"| {label} | {r['process_s']:.1f} | {r['engine_s']:.1f} | {r['first_answer_s']:.1f} | "
                     f"{r['total_s']:.1f} | {r['compile_s']:.1f} |")
    r = result["runs"]["cold"]
    lines += ["", f"Precompiled before serving: {r['precompile']} ({r['step_shapes']} step shapes over the three "
              "modes, plus the encoder batches)."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llava-1.5-7b", help="preset name or model directory, as valora serve takes")
    ap.add_argument("--out", default="bench/results/cold_start")
    ap.add_argument("--child", type=float, metavar="SINCE", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child is not None:
        print(json.dumps(start(args.model, args.child)))
        return
    with tempfile.TemporaryDirectory() as cache:        # JAX stays out of this process: the runs own the GPU
        runs = measure(args.model, cache)
    result = {"command": "python " + " ".join(sys.argv), **runs["cold"]["versions"],
              "xla_flags": runs["cold"]["xla_flags"], "date": time.strftime("%Y-%m-%d"), "model": args.model,
              "runs": runs}
    save_result(args.out, result, report(result))


if __name__ == "__main__":
    main()
