"""Side-by-side GPU benchmark of the LoRA delta: ATMM (tuned table; on a Hopper also the other of
its two kernels, Triton-lowered or Mosaic GPU) against a static tile, jax.lax.ragged_dot,
tokamax.ragged_dot (its Mosaic GPU and Triton kernels, when tokamax is installed), a
gather-einsum, a per-adapter dense loop, and the bandwidth floor; then a whole LLaVA-1.5-7B
decoder layer with and without LoRA.

    python3 -m bench.kernels [--quick] [--out-dir bench/results] [--budget-s 400]

The static tile is STATIC_TILE (TileConfig()'s default: one mid-size tile for every shape, as Punica and
S-LoRA do). Every variant runs on the same inputs in the same process, timed in bulk (pallas_kernels.timing:
chained calls in one jitted loop, rotating input sets larger than the L2 cache, median of
repeats after warm-up). The floor is the bytes that must move (x, the used adapters at their
true rank, the outputs) over the measured device copy bandwidth. Writes kernels_<device>.json,
.md and .png.
"""

import argparse
import functools
import json
import math
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import lora_delta
from pallas_kernels.problems import Shape, flops, floor_bytes, make_inputs
from pallas_kernels.tiling import KERNELS, STATIC_TILE, device_kernels, runs_mosaic
from pallas_kernels.timing import BulkTimer, compile_all, copy_bandwidth, harness_overhead, time_op
from valora_jax.versions import stack_versions, versions_line

try:
    import tokamax
    TOKAMAX = f"tokamax {tokamax.__version__}" if hasattr(tokamax, "__version__") else "tokamax"
except ImportError as e:              # said in the report, not silently skipped
    tokamax, TOKAMAX = None, f"not installed ({e})"

L2_BYTES = 50 << 20
UNROLL = 8              # chained calls per timing-loop iteration
TOKAMAX_IMPLEMENTATIONS = ("mosaic", "triton")
VARIANTS = ["atmm", "atmm_triton", "atmm_mosaic", "atmm_static", "ragged_dot",
            *(f"tokamax_{i}" for i in TOKAMAX_IMPLEMENTATIONS), "gather_einsum", "dense_loop"]
"""Every variant a run may time, in report order (a column shows '–' where a shape lacks one)."""
PROJ = ((4096, 4096), (4096, 11008), (5120, 13824))


def ragged_dot_delta(x, weights, slot, ragged_dot=jax.lax.ragged_dot):
    """Sort tokens by slot, ragged_dot shrink and expand at the padded rank, unsort."""
    s = weights[0].a.shape[0]
    order = jnp.argsort(jnp.where(slot < 0, s, slot))                   # [T]; slot -1 last
    sizes = jnp.bincount(jnp.where(slot < 0, s - 1, slot), length=s).astype(jnp.int32)
    sorted_slot, xs, inverse = slot[order], x[order], jnp.argsort(order)
    out = []
    for w in weights:
        h = ragged_dot(xs, w.a, sizes, preferred_element_type=jnp.float32)          # [T, R]
        h = h * jnp.where(sorted_slot >= 0, w.scale[jnp.clip(sorted_slot, 0)], 0.0)[:, None]
        out.append(ragged_dot(h.astype(x.dtype), w.b, sizes, preferred_element_type=x.dtype)[inverse])  # [T, D_out]
    return tuple(out)


def tokamax_delta(implementation: str):
    """ragged_dot_delta on tokamax.ragged_dot with one named implementation (never its automatic
    choice, which may fall back to XLA)."""
    dot = functools.partial(tokamax.ragged_dot, implementation=implementation)
    return lambda x, weights, slot: ragged_dot_delta(x, weights, slot, dot)


def gather_delta(x, weights, slot):
    """Gather each token's A and B, two einsums."""
    idx = jnp.clip(slot, 0)
    out = []
    for w in weights:
        h = jnp.einsum("TD,TDR->TR", x, w.a[idx], preferred_element_type=jnp.float32)
        h = h * jnp.where(slot >= 0, w.scale[idx], 0.0)[:, None]
        out.append(jnp.einsum("TR,TRO->TO", h.astype(x.dtype), w.b[idx]))
    return tuple(out)


def dense_loop_delta(x, weights, slot):
    """For each slot s: rows of slot s take scale[s] * (x @ A[s]) @ B[s]."""
    out = []
    for w in weights:
        y = jnp.zeros((x.shape[0], w.b.shape[-1]), jnp.float32)
        for s in range(w.a.shape[0]):
            h = jnp.dot(x, w.a[s], preferred_element_type=jnp.float32) * w.scale[s]
            ys = jnp.dot(h.astype(x.dtype), w.b[s], preferred_element_type=jnp.float32)
            y = jnp.where((slot == s)[:, None], ys, y)
        out.append(y.astype(x.dtype))
    return tuple(out)


def shapes(quick: bool = False) -> list[Shape]:
    """The grid: LLaVA-1.5-7B/13B projections, decode T <= 256 and prefill T >= 512."""
    out = [Shape(t, d, o, 16, 8) for t in (1, 16, 64, 256) for d, o in PROJ]
    out += [Shape(t, d, o, 16, 8) for t in (1024, 4096, 8192) for d, o in PROJ]
    out += [Shape(64, 4096, 4096, r, 64, "distinct") for r in (16, 32, 64, 128, "mixed")]
    out += [Shape(4096, 4096, 11008, r, 8) for r in (32, 64, 128, "mixed")]
    out += [Shape(64, 4096, 4096, 16, 64, "skewed"), Shape(256, 4096, 11008, 16, 64, "uniform"),
            Shape(64, 4096, 4096, 16, 64, "distinct", n_weights=3),
            Shape(512, 4096, 4096, 16, 8), Shape(4096, 4096, 4096, 16, 64, "distinct", requests=64),
            Shape(4096, 4096, 4096, 16, 64, "skewed", requests=64)]
    return out[::4] if quick else out


def _gather_bytes(s: Shape) -> int:
    return 2 * s.tokens * s.max_rank * (s.d_in + s.d_out) * s.n_weights


def other_kernels() -> str | None:
    """The ATMM kernels this device does not run by default, where it can run them (Mosaic GPU
    needs a Hopper); None where it cannot."""
    other = "triton" if device_kernels(jax.devices()[0].device_kind) == "mosaic" else "mosaic"
    return other if other == "triton" or runs_mosaic() else None


def _variants(shape: Shape, static) -> dict:
    """name -> fn(x, weights, slot) of the variants that fit this shape."""
    out = {"atmm": lambda x, w, s: lora_delta(x, w, s),
           "atmm_static": lambda x, w, s: lora_delta(x, w, s, tile=static),
           "ragged_dot": ragged_dot_delta, "gather_einsum": gather_delta, "dense_loop": dense_loop_delta}
    if (other := other_kernels()) is not None:
        out[f"atmm_{other}"] = lambda x, w, s: lora_delta(x, w, s, kernels=other)
    if tokamax is not None:
        out.update({f"tokamax_{impl}": tokamax_delta(impl) for impl in TOKAMAX_IMPLEMENTATIONS})
    if _gather_bytes(shape) > (2 << 30):
        del out["gather_einsum"]                   # the gathered adapters alone exceed 2 GB
    if shape.adapters > 8 and shape.tokens > 256:
        del out["dense_loop"]
    return out


def _rotations(shape: Shape) -> int:
    """Distinct input sets to time over: enough to exceed 3x the L2 cache, at most 8."""
    set_bytes = 2 * (shape.tokens * shape.d_in + shape.n_weights * (
        shape.adapters * shape.max_rank * (shape.d_in + shape.d_out) + shape.tokens * shape.d_out))
    return int(min(8, math.ceil(3 * L2_BYTES / set_bytes)))


@functools.lru_cache(maxsize=8)
def _input_sets(shape: Shape) -> list:
    return [make_inputs(shape, seed=i) for i in range(_rotations(shape))]


def bench_shapes(shapes: list[Shape], bandwidth: float, static, deadline: float):
    """Yield one record per shape (every variant timed on the same input sets), compiling the
    variants of the shapes ahead on worker threads; shapes after `deadline` (perf_counter) are
    skipped."""
    def jobs():
        for shape in shapes:
            if time.perf_counter() > deadline:
                print(f"budget spent; skipping from {shape.label()}", flush=True)
                return
            for name, fn in _variants(shape, static).items():
                yield (shape, name), lambda fn=fn, shape=shape: BulkTimer(fn, _input_sets(shape), unroll=UNROLL)

    rec = None
    for (shape, name), timer in compile_all(jobs()):
        if rec is None or rec["shape"] != shape.label():
            if rec is not None:
                yield rec
            n_bytes = floor_bytes(shape)
            rec = {"shape": shape.label(), "tokens": shape.tokens, "d_in": shape.d_in, "d_out": shape.d_out,
                   "rank": shape.rank, "adapters": shape.adapters, "dist": shape.dist,
                   "requests": shape.n_requests, "n_weights": shape.n_weights,
                   "rotations": _rotations(shape), "floor_bytes": n_bytes, "flops": flops(shape),
                   "floor_us": n_bytes / bandwidth * 1e6, "us": {}, "errors": {}}
        if isinstance(timer, Exception):
            rec["errors"][name] = f"{type(timer).__name__}: {str(timer)[:300]}"
            print(f"{rec['shape']}: {name} does not compile: {rec['errors'][name]}", flush=True)
        else:
            rec["us"][name] = timer.seconds() * 1e6
    if rec is not None:
        yield rec


def _rmsnorm(x):
    xf = x.astype(jnp.float32)
    return (xf * jax.lax.rsqrt(jnp.mean(xf * xf, -1, keepdims=True) + 1e-6)).astype(x.dtype)


def decoder_layer(p, x, kv, slot, gain, lora: bool, attention: str | None = "cudnn"):
    """One LLaVA-1.5-7B (Llama-2-7B) decoder layer over x [T, D]; LoRA on all 7 projections.

    Prefill (kv None): one causal sequence of T tokens. Decode: token t of request t attends to
    its cache kv = (K, V) [T, L, H, 128].
    """
    heads = p["wq"].shape[1] // 128

    def proj(h, names):
        ys = [h @ p[n] for n in names]
        if lora:                                   # as the model does: deltas added over the base outputs
            ys = list(lora_delta(h, [p["lora_" + n] for n in names], slot, base=ys))
        return ys

    t = x.shape[0]
    x = x * gain.astype(x.dtype)                   # gain [1] = 1: the input the harness chains
    q, k, v = proj(_rmsnorm(x), ("wq", "wk", "wv"))
    q = q.reshape(t, 1, heads, 128) if kv else q.reshape(1, t, heads, 128)
    if kv:
        k, v = kv
    else:
        k, v = k.reshape(1, t, heads, 128), v.reshape(1, t, heads, 128)
    o = jax.nn.dot_product_attention(q, k, v, is_causal=not kv, implementation=attention)
    x = x + proj(o.reshape(t, -1), ("wo",))[0]
    g, u = proj(_rmsnorm(x), ("wg", "wu"))
    return x + proj(jax.nn.silu(g) * u, ("wd",))[0]


def bench_layer(tokens: int, context: int | None, adapters: int = 8, rank: int = 16) -> dict:
    rng = np.random.default_rng(0)
    d, f = 4096, 11008
    dims = {"wq": (d, d), "wk": (d, d), "wv": (d, d), "wo": (d, d), "wg": (d, f), "wu": (d, f), "wd": (f, d)}
    p = {}
    for n, (i, o) in dims.items():
        p[n] = jnp.asarray(rng.standard_normal((i, o), np.float32) / np.sqrt(i), jnp.bfloat16)
        p["lora_" + n] = make_inputs(Shape(1, i, o, rank, adapters), seed=1)[1][0]
    x = jnp.asarray(rng.standard_normal((tokens, d), np.float32), jnp.bfloat16)
    slot = jnp.asarray(Shape(tokens, d, d, rank, adapters).slot())
    kv = None
    if context:
        kv = tuple(jnp.asarray(rng.standard_normal((tokens, context, 32, 128), np.float32), jnp.bfloat16)
                   for _ in range(2))
    us = {}
    for attention in ("cudnn", None):              # XLA's attention where cuDNN's is missing
        try:
            for lora in (False, True):
                fn = lambda p, x, kv, slot, gain, lora=lora: decoder_layer(p, x, kv, slot, gain, lora,
                                                                           attention)
                params = p if lora else {n: w for n, w in p.items() if not n.startswith("lora_")}
                us["lora" if lora else "base"] = time_op(
                    fn, [(params, x, kv, slot, jnp.ones((1,), jnp.float32))], unroll=2) * 1e6
            break
        except Exception as e:
            print(f"attention={attention} failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
    return {"tokens": tokens, "context": context, "adapters": adapters, "rank": rank,
            "attention": attention or "xla", "us": us, "ratio": us["lora"] / us["base"]}


def _geomean(xs):
    xs = [x for x in xs if x is not None]
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else None


def summarize(records: list[dict], layers: list[dict], harness_us: float) -> dict:
    """Targets on net times: each variant's time less the harness's measured per-call cost
    (the same chaining kernel follows every variant's call; a model pays none of it)."""
    def net(r, name):
        return max(0.1, r["us"][name] - harness_us)

    def ratio(r, other):
        return net(r, other) / net(r, "atmm") if other in r["us"] else None

    failed = [r["shape"] for r in records if "atmm" not in r["us"]]
    records = [r for r in records if "atmm" in r["us"]]

    prefill = [r for r in records if r["tokens"] >= 1024]
    decode = [r for r in records if r["tokens"] <= 64]
    vs_static = [ratio(r, "atmm_static") for r in records]
    s = {
        "atmm_vs_ragged_dot_geomean": _geomean([ratio(r, "ragged_dot") for r in records]),
        **{f"atmm_vs_tokamax_{i}_geomean": _geomean([ratio(r, f"tokamax_{i}") for r in records])
           for i in TOKAMAX_IMPLEMENTATIONS},
        **{f"atmm_vs_{k}_geomean": _geomean([ratio(r, f"atmm_{k}") for r in records]) for k in KERNELS},
        **{f"{k}_prefill_floor_fraction_min": min((r["floor_us"] / net(r, f"atmm_{k}") for r in prefill
                                                   if f"atmm_{k}" in r["us"]), default=None) for k in KERNELS},
        "atmm_vs_static_geomean": _geomean(vs_static),
        "atmm_vs_static_worst": min(vs_static),
        "atmm_vs_gather_einsum_geomean": _geomean([ratio(r, "gather_einsum") for r in records]),
        "atmm_vs_dense_loop_geomean": _geomean([ratio(r, "dense_loop") for r in records]),
        "prefill_floor_fraction_min": min((r["floor_us"] / net(r, "atmm") for r in prefill), default=None),
        "prefill_floor_fraction_geomean": _geomean([r["floor_us"] / net(r, "atmm") for r in prefill]),
        "atmm_failed": failed,
        "decode_misses": [r["shape"] for r in decode if net(r, "atmm") > max(2 * r["floor_us"], 10.0)],
    }
    for lay in layers:
        s[f"layer_T{lay['tokens']}_ratio"] = lay["ratio"]
    return s


TARGETS = [("atmm_vs_ragged_dot_geomean", ">=", 20.0), ("atmm_vs_static_geomean", ">=", 1.3),
           ("atmm_vs_static_worst", ">=", 0.95), ("prefill_floor_fraction_min", ">=", 0.6),
           ("layer_T4096_ratio", "<=", 1.10), ("layer_T64_ratio", "<=", 1.25)]


def write_report(result: dict, out_dir: pathlib.Path, stem: str) -> None:
    (out_dir / f"{stem}.json").write_text(json.dumps(result, indent=1))
    names = [n for n in VARIANTS if any(n in r["us"] or n in r.get("errors", {}) for r in result["records"])]
    lines = [f"# ATMM kernel benchmark on {result['device']}", "",
             f"`{result['command']}` · {versions_line(result)} · {result['date']} · copy bandwidth "
             f"{result['copy_bandwidth_TBps']:.2f} TB/s · static tile `{result['static_tile']}` · "
             f"tokamax: {result.get('tokamax', 'not part of this run')}", "",
             *([f"Report rewritten from the measured records by `{result['report_command']}`.", ""]
               if "report_command" in result else []),
             "Times in us per call (median, bulk-timed; each includes the harness's "
             f"{result['harness_overhead_us']:.2f} us per call). floor = bytes that must move / "
             "copy bandwidth. The ratios and targets use net times (less the harness's cost); "
             "atmm TFLOP/s = useful work (2 r (D_in + D_out) per token) / net time.", "",
             "| shape | floor | " + " | ".join(names) + " | floor/atmm | atmm TFLOP/s | ragged/atmm | static/atmm |",
             "|---" * (len(names) + 6) + "|"]
    for r in result["records"]:
        cells = [f"{r['us'][n]:.1f}" if n in r["us"] else "–" for n in names]
        h = result["harness_overhead_us"]
        a = max(0.1, r["us"]["atmm"] - h) if "atmm" in r["us"] else math.nan
        over = lambda n, digits: f"{max(0.1, r['us'][n] - h) / a:.{digits}f}" if n in r["us"] else "–"
        lines.append(f"| {r['shape']} | {r['floor_us']:.1f} | " + " | ".join(cells) +
                     f" | {r['floor_us'] / a:.2f} | {_tflops(r, a)} | {over('ragged_dot', 1)} | "
                     f"{over('atmm_static', 2)} |")
    failed = {}
    for r in result["records"]:
        for name, error in r.get("errors", {}).items():
            failed.setdefault(name, []).append((r["shape"], error))
    if failed:
        lines += ["", "Variants that did not run on some shapes ('–' above):", ""]
        lines += [f"- {name} on {len(errs)} shapes, e.g. {errs[0][0]}: {errs[0][1][:200]}" for name, errs in failed.items()]
    lines += ["", "## Decoder layer (LLaVA-1.5-7B, LoRA rank 16 on all 7 projections, 8 adapters)", "",
              "| tokens | KV context | base us | with LoRA us | ratio |", "|---|---|---|---|---|"]
    for lay in result["layers"]:
        lines.append(f"| {lay['tokens']} | {lay['context'] or 'causal prefill'} | {lay['us']['base']:.1f} | "
                     f"{lay['us']['lora']:.1f} | {lay['ratio']:.3f} |")
    lines += ["", "## Targets", "", "| metric | measured | target | met | measured / target |",
              "|---|---|---|---|---|"]
    summ = result["summary"]
    for key, op, goal in TARGETS:
        v = summ.get(key)
        met = v is not None and (v >= goal if op == ">=" else v <= goal)
        lines.append(f"| {key} | {v if v is None else round(v, 3)} | {op} {goal} | {'yes' if met else 'NO'} | "
                     f"{'–' if v is None else f'{v / goal:.2f}'} |")
    lines.append(f"| decode shapes over max(2x floor, 10 us) | {summ['decode_misses'] or 'none'} | none | "
                 f"{'yes' if not summ['decode_misses'] else 'NO'} | – |")
    (out_dir / f"{stem}.md").write_text("\n".join(lines) + "\n")
    try:
        _plot(result, out_dir / f"{stem}.png")
    except ImportError:
        print("matplotlib missing: no plot")


def _tflops(rec: dict, net_us: float) -> str:
    return f"{rec['flops'] / net_us / 1e6:.1f}" if "flops" in rec else "–"


def _plot(result: dict, path: pathlib.Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    recs = result["records"]
    fig, ax = plt.subplots(figsize=(max(10, 0.42 * len(recs)), 6))
    xs = np.arange(len(recs))
    for k, name in enumerate(VARIANTS):
        ys = [r["us"].get(name, np.nan) for r in recs]
        if not np.isnan(ys).all():
            ax.scatter(xs, ys, label=name, marker="o^sDvPX"[k], s=28)
    ax.plot(xs, [r["floor_us"] for r in recs], "k_", markersize=14, label="bandwidth floor")
    ax.set_yscale("log")
    ax.set_ylabel("us per call")
    ax.set_xticks(xs, [r["shape"] for r in recs], rotation=80, fontsize=7)
    ax.set_title(f"LoRA delta on {result['device']} (jax {result['jax']})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _rewrite_report(path: pathlib.Path, argv) -> None:
    """The report of an earlier run, from its measured records (derived fields recomputed)."""
    result = json.loads(path.read_text())
    for rec in result["records"]:
        shape = Shape(rec["tokens"], rec["d_in"], rec["d_out"],
                      rec["rank"] if rec["rank"] == "mixed" else int(rec["rank"]), rec["adapters"], rec["dist"],
                      rec["requests"], rec["n_weights"])
        assert shape.label() == rec["shape"], (shape.label(), rec["shape"])
        rec["flops"] = flops(shape)
    result["summary"] = summarize(result["records"], result["layers"], result["harness_overhead_us"])
    result["report_command"] = "python3 -m bench.kernels " + " ".join(argv if argv is not None else sys.argv[1:])
    write_report(result, path.parent, path.stem)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a quarter of the grid")
    p.add_argument("--out-dir", default="bench/results")
    p.add_argument("--budget-s", type=float, default=1e9, help="stop starting new shapes after this")
    p.add_argument("--no-layer", action="store_true", help="skip the decoder-layer benchmark")
    p.add_argument("--report", metavar="JSON", help="measure nothing: rewrite this result's summary, table and "
                                                    "plot from its records with the current report code")
    args = p.parse_args(argv)
    if args.report:
        return _rewrite_report(pathlib.Path(args.report), argv)
    start = time.perf_counter()
    device = jax.devices()[0].device_kind
    bandwidth = copy_bandwidth()
    overhead = harness_overhead(UNROLL)
    static = STATIC_TILE
    result = {"device": device, **stack_versions(), "date": time.strftime("%Y-%m-%d"),
              "command": "python3 -m bench.kernels " + " ".join(argv if argv is not None else sys.argv[1:]),
              "copy_bandwidth_TBps": bandwidth / 1e12, "harness_overhead_us": overhead * 1e6,
              "static_tile": static.to_dict(), "tokamax": TOKAMAX,
              "records": [], "layers": []}
    print(f"{device}, {versions_line(result)}, copy {bandwidth / 1e12:.2f} TB/s, harness "
          f"{overhead * 1e6:.2f} us/call, static {static}", flush=True)
    for rec in bench_shapes(shapes(args.quick), bandwidth, static, start + args.budget_s):
        result["records"].append(rec)
        print(f"{rec['shape']:48s} floor {rec['floor_us']:8.1f} " +
              " ".join(f"{k} {v:8.1f}" for k, v in rec["us"].items()), flush=True)
    if not args.no_layer:
        for tokens, context in ((4096, None), (64, 640)):
            lay = bench_layer(tokens, context)
            result["layers"].append(lay)
            print(f"layer T={tokens} ctx={context}: {lay['us']} ratio {lay['ratio']:.3f}", flush=True)
    result["summary"] = summarize(result["records"], result["layers"], result["harness_overhead_us"])
    out_dir = pathlib.Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_report(result, out_dir, "kernels_" + "".join(c if c.isalnum() else "_" for c in device))
    print(json.dumps(result["summary"], indent=1))


if __name__ == "__main__":
    main()
