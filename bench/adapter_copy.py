"""Host-to-device copy of one adapter, the way the adapter pool stages it, alone and beside a
serving loop.

  python bench/adapter_copy.py --out bench/results/adapter_copy

An adapter of LLaVA-1.5-7B has about 370 LoRA modules (740 arrays). Variants, each copying one
random bfloat16 adapter of each rank to the device on a worker thread, as `AdapterPool.stage` does:
  per_module     one device_put per A and B (how the pool staged adapters before packing)
  packed         `PackedAdapter.to_device`: one flat buffer, one transfer (what the pool does)
  packed_pinned  the packed buffer held in pinned host memory, then copied (where the backend has it)
Each is timed alone and while the main thread runs a dispatch-bound loop standing in for the
engine (a jitted call over 1,500 small arrays, waited for each time, like a decode step). Python
threads share one interpreter lock: a copy made of many Python calls waits for the loop at each,
and the loop waits for the copy. Reports the copy's median ms and GB/s, and the loop's calls a
second while copies run, against its rate alone.
"""

import argparse
import concurrent.futures
import dataclasses
import sys
import threading
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import save_result  # noqa: E402
from valora_jax import PRESETS, random_adapter  # noqa: E402
from valora_jax.adapters import PackedAdapter  # noqa: E402
from valora_jax.lora import module_shapes  # noqa: E402
from valora_jax.model import LMM  # noqa: E402
from valora_jax.versions import stack_versions, versions_line  # noqa: E402

VARIANTS = ("per_module", "packed", "packed_pinned")


def per_module_copy(adapter):
    return jax.block_until_ready({p: (jax.device_put(a), jax.device_put(b)) for p, (a, b) in adapter.weights.items()})


def pinned_host(packed: PackedAdapter) -> PackedAdapter | None:
    """The packed adapter with its arrays in pinned host memory, or None where the device has none."""
    device = jax.devices()[0]
    if "pinned_host" not in {m.kind for m in device.addressable_memories()}:
        return None
    pinned = jax.sharding.SingleDeviceSharding(device, memory_kind="pinned_host")
    return dataclasses.replace(packed, buffer=jax.device_put(packed.buffer, pinned),
                               scales=jax.device_put(packed.scales, pinned))


def pinned_copy(packed: PackedAdapter):
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0], memory_kind="device")
    return jax.block_until_ready((jax.device_put(packed.buffer, device), jax.device_put(packed.scales, device)))


class ServingLoop:
    """The main thread's stand-in for the engine: a jitted call over `leaves` small arrays, waited
    for each time, repeated until `stop` is set; counts the calls."""

    def __init__(self, leaves: int = 1500):
        self.args = tuple(jnp.full((8,), i, jnp.float32) for i in range(leaves))
        self.fn = jax.jit(lambda xs: xs[0] + xs[-1])
        jax.block_until_ready(self.fn(self.args))
        self.calls, self.stop = 0, threading.Event()

    def run(self) -> None:
        """At least one call (copies that end before the loop starts still meet one)."""
        while True:
            jax.block_until_ready(self.fn(self.args))
            self.calls += 1
            if self.stop.is_set():
                break

    def rate(self, seconds: float) -> float:
        """Calls a second, alone."""
        self.calls, t0 = 0, time.perf_counter()
        timer = threading.Timer(seconds, self.stop.set)
        timer.start()
        self.run()
        self.stop.clear()
        return self.calls / (time.perf_counter() - t0)


def time_copies(copy, repeats: int, loop: ServingLoop | None) -> tuple[list[float], float | None]:
    """Copy `repeats` times on a worker thread, one after another; with `loop`, while the main
    thread runs it. -> (each copy's seconds, the loop's calls a second meanwhile)."""
    times = []

    def copies():
        try:
            for _ in range(repeats):
                t0 = time.perf_counter()
                copy()
                times.append(time.perf_counter() - t0)
        finally:
            if loop:
                loop.stop.set()

    with concurrent.futures.ThreadPoolExecutor(1) as worker:
        t0 = time.perf_counter()
        if loop:
            loop.calls = 0
        done = worker.submit(copies)
        if loop:
            loop.run()
            loop.stop.clear()
        done.result()
        rate = loop.calls / (time.perf_counter() - t0) if loop else None
    return times, rate


def measure(preset: str, ranks: list[int], repeats: int) -> dict:
    cfg = PRESETS[preset](max_rank=max(ranks))
    shapes = module_shapes(nnx.eval_shape(lambda: LMM(cfg, rngs=nnx.Rngs(0))))
    loop = ServingLoop()
    alone_rate = loop.rate(1.0)
    results = {"modules": len(shapes), "loop_calls_per_s_alone": alone_rate, "ranks": {}}
    for rank in ranks:
        adapter = random_adapter(cfg, shapes, f"r{rank}", rank, seed=rank)
        packed = PackedAdapter.of(adapter, jnp.bfloat16)
        host = dataclasses.replace(adapter, weights=packed.weights)      # bfloat16, as the store holds it
        pinned = pinned_host(packed)
        copies = {"per_module": lambda: per_module_copy(host), "packed": packed.to_device,
                  "packed_pinned": (lambda: pinned_copy(pinned)) if pinned is not None else None}
        row = {"megabytes": packed.buffer.nbytes / 1e6}
        for name, copy in copies.items():
            if copy is None:
                row[name] = {"unavailable": "this device offers no pinned_host memory"}
                continue
            copy()                                                      # warm-up
            alone, _ = time_copies(copy, repeats, None)
            busy, rate = time_copies(copy, repeats, loop)
            row[name] = {"alone_ms": 1e3 * float(np.median(alone)), "beside_loop_ms": 1e3 * float(np.median(busy)),
                         "alone_gb_s": packed.buffer.nbytes / float(np.median(alone)) / 1e9,
                         "loop_rate_vs_alone": rate / alone_rate}
            print(rank, name, row[name], flush=True)
        results["ranks"][rank] = row
    return results


def table(report: dict) -> str:
    r = report["results"]
    lines = [f"# One adapter's host-to-device copy ({report['preset']}, {r['modules']} LoRA modules), "
             f"{report['device']}, {versions_line(report)}", "", f"`{report['command']}`", "",
             f"The serving loop alone: {r['loop_calls_per_s_alone']:.0f} calls/s.", "",
             "| rank | MB | variant | alone ms | GB/s | beside the loop ms | loop's rate meanwhile |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for rank, row in r["ranks"].items():
        for name in VARIANTS:
            v = row[name]
            cells = ([v["unavailable"], "", "", ""] if "unavailable" in v else
                     [f"{v['alone_ms']:.1f}", f"{v['alone_gb_s']:.1f}", f"{v['beside_loop_ms']:.1f}",
                      f"{v['loop_rate_vs_alone']:.2f}x"])
            lines.append(f"| {rank} | {row['megabytes']:.0f} | {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="llava-1.5-7b")
    ap.add_argument("--ranks", default="16,64")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--out", default="bench/results/adapter_copy")
    args = ap.parse_args(argv)
    results = measure(args.preset, [int(r) for r in args.ranks.split(",")], args.repeats)
    report = {"command": "python " + " ".join(["bench/adapter_copy.py", *(argv if argv is not None else sys.argv[1:])]),
              "device": jax.devices()[0].device_kind, **stack_versions(), "preset": args.preset,
              "results": results}
    save_result(args.out, report, table(report))


if __name__ == "__main__":
    main()
