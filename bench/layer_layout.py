"""How a 7B decoder's weights should be laid out for a fast decode step: plain JAX, no LoRA.

  python bench/layer_layout.py --out bench/results/layer_layout

A Llama-7B-shaped decode step (rows x keys of context, dense attention over a fixed context,
LM head) in several layouts, each timed back to back (nothing waited for in between: the
larger of host dispatch and device work), waited for call by call, and for the host time
until the call returns, against the floor (every weight read once at the measured copy rate):
  unfused, unrolled   per-layer q, k, v, o, gate, up, down arrays; a Python loop over layers
  fused, unrolled     per-layer arrays with q/k/v and gate/up concatenated (one GEMM each)
  stacked, unrolled   fused weights stacked per kind [L, ...]; a Python loop indexing them
  stacked, scan       the same stacked weights under lax.scan (unroll 1 and 4)
Each XLA flag variant (command buffers off, XLA's default) runs in its own process.
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

FLAG_VARIANTS = {"no command buffers": "--xla_gpu_enable_command_buffer=", "XLA default": ""}
LAYOUTS = ("unfused, unrolled", "fused, unrolled", "stacked, unrolled", "stacked, scan", "stacked, scan unroll 4")
SHAPE_7B = dict(layers=32, d=4096, heads=32, kv_heads=32, head_dim=128, mlp=11008, vocab=32000)


def measure(rows: int, keys: int, layouts=LAYOUTS, steps: int = 20, shape=SHAPE_7B) -> dict:
    """{layout: {step_ms, waited_ms, dispatch_ms, arguments}, floor_ms, copy_tb_s} in this process."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from pallas_kernels.timing import copy_bandwidth

    L, d, h, hkv, dh, f, vocab = (shape[k] for k in ("layers", "d", "heads", "kv_heads", "head_dim", "mlp", "vocab"))
    dt = jnp.bfloat16
    widths = {"q": h * dh, "k": hkv * dh, "v": hkv * dh, "o": d, "gate": f, "up": f, "down": d}
    fan_in = {"o": h * dh, "down": f}
    keys_ = iter(jax.random.split(jax.random.key(0), 64 * L))

    def w(shape_):
        return (0.02 * jax.random.normal(next(keys_), shape_, jnp.float32)).astype(dt)

    def layer_unfused():
        return {n: w((fan_in.get(n, d), widths[n])) for n in widths} | {"ln1": jnp.ones(d, dt), "ln2": jnp.ones(d, dt)}

    def fuse(p):
        return {"qkv": jnp.concatenate([p["q"], p["k"], p["v"]], 1), "o": p["o"],
                "gate_up": jnp.concatenate([p["gate"], p["up"]], 1), "down": p["down"],
                "ln1": p["ln1"], "ln2": p["ln2"]}

    def norm(x, g):
        xf = x.astype(jnp.float32)
        return g * (xf * jax.lax.rsqrt(jnp.square(xf).mean(-1, keepdims=True) + 1e-6)).astype(x.dtype)

    def attend(q, k_ctx, v_ctx):          # q [B, H, Dh], ctx [B, C, Hkv, Dh]
        q = q.reshape(rows, hkv, h // hkv, dh)
        s = jnp.einsum("bkgd,bckd->bkgc", q, k_ctx, preferred_element_type=jnp.float32) / np.sqrt(dh)
        p = jax.nn.softmax(s, -1).astype(dt)
        return jnp.einsum("bkgc,bckd->bkgd", p, v_ctx).reshape(rows, h * dh)

    def layer(x, p, k_ctx, v_ctx):
        y = norm(x, p["ln1"])
        if "qkv" in p:
            q, k, v = jnp.split(y @ p["qkv"], [h * dh, h * dh + hkv * dh], 1)
        else:
            q, k, v = y @ p["q"], y @ p["k"], y @ p["v"]
        del k, v                            # written to the cache in a real step; here the context is fixed
        x = x + attend(q, k_ctx, v_ctx) @ p["o"]
        y = norm(x, p["ln2"])
        if "gate_up" in p:
            gate, up = jnp.split(y @ p["gate_up"], 2, 1)
        else:
            gate, up = y @ p["gate"], y @ p["up"]
        return x + (jax.nn.silu(gate) * up) @ p["down"]

    def head(x, lm_head):
        return jnp.argmax(norm(x, jnp.ones(d, dt)) @ lm_head, -1)

    def unrolled(layers, lm_head, x, ctx):
        for i, p in enumerate(layers):
            x = layer(x, p, ctx[0][i], ctx[1][i])
        return x, head(x, lm_head)

    def stacked_loop(stack, lm_head, x, ctx):
        for i in range(L):
            x = layer(x, {n: a[i] for n, a in stack.items()}, ctx[0][i], ctx[1][i])
        return x, head(x, lm_head)

    def scanned(unroll):
        def run(stack, lm_head, x, ctx):
            x, _ = jax.lax.scan(lambda x, pc: (layer(x, pc[0], *pc[1]), None), x, (stack, ctx), unroll=unroll)
            return x, head(x, lm_head)
        return run

    copy_rate = copy_bandwidth()
    lm_head = w((d, vocab))
    ctx = (w((L, rows, keys, hkv, dh)), w((L, rows, keys, hkv, dh)))
    x0 = w((rows, d))
    weight_bytes = L * 2 * (d * (h + 2 * hkv) * dh + h * dh * d + 3 * d * f + 2 * d) + 2 * d * vocab
    floor_s = (weight_bytes + 2 * ctx[0].nbytes) / copy_rate
    out = {"floor_ms": 1e3 * floor_s, "copy_tb_s": copy_rate / 1e12, "weight_gb": weight_bytes / 1e9}
    unfused = [layer_unfused() for _ in range(L)]
    fused = [fuse(p) for p in unfused]
    stack = {n: jnp.stack([p[n] for p in fused]) for n in fused[0]}
    variants = {"unfused, unrolled": (unfused, unrolled), "fused, unrolled": (fused, unrolled),
                "stacked, unrolled": (stack, stacked_loop), "stacked, scan": (stack, scanned(1)),
                "stacked, scan unroll 4": (stack, scanned(4))}
    for name in layouts:
        weights, fn = variants[name]
        step = jax.jit(fn)
        t = time.perf_counter()
        x, _ = jax.block_until_ready(step(weights, lm_head, x0, ctx))
        compile_s = time.perf_counter() - t
        t = time.perf_counter()
        for _ in range(steps):
            x, tok = step(weights, lm_head, x, ctx)
        jax.block_until_ready(tok)
        back_to_back = (time.perf_counter() - t) / steps
        dispatch, waited = [], []
        for _ in range(steps):
            t = time.perf_counter()
            x, tok = step(weights, lm_head, x, ctx)
            dispatch.append(time.perf_counter() - t)
            jax.block_until_ready(tok)
            waited.append(time.perf_counter() - t)
        out[name] = {"step_ms": 1e3 * back_to_back, "waited_ms": 1e3 * float(np.median(waited)),
                     "dispatch_ms": 1e3 * float(np.median(dispatch)), "compile_s": compile_s,
                     "arguments": len(jax.tree.leaves(weights)) + 4, "vs_floor": back_to_back / floor_s}
        print(name, out[name], file=sys.stderr, flush=True)
    return out


def report(result: dict) -> str:
    lines = [f"# A 7B decode step's weight layout, {result['device']}, {versions_line(result)}", "",
             f"`{result['command']}` · {result['rows']} rows x {result['keys']} keys · copy "
             f"{next(iter(result['results'].values())).get('copy_tb_s', float('nan')):.2f} TB/s", "",
             "| XLA flags | layout | arguments | step ms, back to back | waited ms | dispatch ms | floor ms "
             "| back to back / floor | compile s |", "|---|---|---|---|---|---|---|---|---|"]
    for flags, r in result["results"].items():
        if "error" in r:
            lines.append(f"| {flags} | error: {r['error']} | | | | | | | |")
            continue
        for name in LAYOUTS:
            if name in r:
                m = r[name]
                lines.append(f"| {flags} | {name} | {m['arguments']} | {m['step_ms']:.2f} | {m['waited_ms']:.2f} | "
                             f"{m['dispatch_ms']:.2f} | {r['floor_ms']:.2f} | {m['vs_floor']:.2f}x | "
                             f"{m['compile_s']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--keys", type=int, default=16)
    ap.add_argument("--flags", default=",".join(FLAG_VARIANTS), help=f"of {sorted(FLAG_VARIANTS)}")
    ap.add_argument("--out", default="bench/results/layer_layout")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(measure(args.rows, args.keys)))
        return
    import jax

    results = {}
    for name in args.flags.split(","):
        if name not in FLAG_VARIANTS:
            raise SystemExit(f"unknown flag variant {name!r}; expected some of {sorted(FLAG_VARIANTS)}")
        env = dict(os.environ, XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " " + FLAG_VARIANTS[name]).strip())
        proc = subprocess.run([sys.executable, __file__, "--child", "--rows", str(args.rows), "--keys", str(args.keys)],
                              env=env, capture_output=True, text=True)
        sys.stderr.write(proc.stderr[-4000:])
        results[name] = (json.loads(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 else
                         {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1]})
    result = {"command": "python " + " ".join(sys.argv), "device": jax.devices()[0].device_kind, **stack_versions(),
              "rows": args.rows, "keys": args.keys, "xla_flags": FLAG_VARIANTS, "results": results}
    save_result(args.out, result, report(result))


if __name__ == "__main__":
    main()
