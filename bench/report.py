"""The benchmark numbers of the prose, computed from the committed results in bench/results/.

Templates reference values as {{name}}: bench/results/README.in.md renders to bench/results/README.md,
and bench/results/readme_benchmarks.in.md to the block of README.md between the bench-report markers.

    python bench/report.py           # render both
    python bench/report.py --check   # exit 1 naming each file that differs and each unknown or unused name
"""

import argparse
import ast
import json
import math
import re
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
PLACEHOLDER = re.compile(r"\{\{\s*([^{}\s]+)\s*\}\}")
BEGIN, END = "<!-- bench-report:begin -->", "<!-- bench-report:end -->"
PAGES = [  # (template, rendered file, whole file or only the marked block)
    ("bench/results/README.in.md", "bench/results/README.md", False),
    ("bench/results/readme_benchmarks.in.md", "README.md", True),
]

# Definitions and targets no result file records (the kernel and e2e targets come from their scripts).
DECODE_T, MID_T, PREFILL_T = 64, 256, 1024   # bench/kernels.summarize: decode T <= 64, prefill T >= 1024
DECODE_BOUND = (2, 10.0)                     # a decode shape misses above max(2x floor, 10 us)
SWITCH_TARGET = 1.5                          # fused switch over the copy floor, at most
COLD_P99_TARGET = 2.0                        # e2e cold-adapter p99, ours over always-unmerged, at most
DECODE_ATTENTION_TARGET = 0.75               # decode attention's K/V read rate over the copy rate, at least
MIN_STEPS = 10                               # e2e step shapes with fewer steps are named apart
POLICIES = {"unmerged": "always-unmerged", "slora": "S-LoRA-like", "punica": "Punica-like",
            "dlora": "dLoRA-like", "merged": "merged-only"}
KINDS = {"vqa": "visual QA", "video": "video"}
ARRIVALS = {"poisson": "Poisson", "bursty": "bursty"}


class UnknownPlaceholder(KeyError):
    """A template names a value that no source computes."""


def script_constant(script: str, name: str):
    """The literal a bench script assigns to `name` (read, not imported: no JAX needed)."""
    for node in ast.parse((ROOT / script).read_text()).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == name for t in node.targets):
            return ast.literal_eval(node.value)
    raise LookupError(f"{script} assigns no {name}")


# formatting: every value is a string
def num(v, d=1):
    return f"{v:.{d}f}"


def x(v, d=2):
    return f"{v:.{d}f}x"


def pct(v, d=0):
    return f"{100 * v:.{d}f}%"


def span(vs, d=1, fmt=num):
    """'lo-hi' of the values (the unit once, at the end), or one value where both read the same."""
    lo, hi = fmt(min(vs), d), fmt(max(vs), d)
    unit = {x: "x", pct: "%"}.get(fmt, "")
    return lo if lo == hi else f"{lo.removesuffix(unit)}-{hi}"


def geomean(vs):
    vs = list(vs)
    return math.exp(sum(math.log(v) for v in vs) / len(vs))


def verdict(ok: bool) -> str:
    return "met" if ok else "missed"


def rate(v) -> str:
    return f"{v:g}"


def target(op: str, goal: float, unit: str = "x") -> str:
    return f"{op} {goal:g}{unit}"


# one function per result file: its values, named without the file's prefix
def kernels(d):
    h, s = d["harness_overhead_us"], d["summary"]
    recs = [r for r in d["records"] if "atmm" in r["us"]]

    def net(r, name):                                     # as bench/kernels.summarize
        return max(0.1, r["us"][name] - h)

    def over_atmm(rs, other):
        return [net(r, other) / net(r, "atmm") for r in rs if other in r["us"]]

    few, many = min(r["adapters"] for r in recs), max(r["adapters"] for r in recs)
    decode = [r for r in recs if r["tokens"] <= DECODE_T]
    prefill = [r for r in recs if r["tokens"] >= PREFILL_T]
    groups = {"decode_few": [r for r in decode if r["adapters"] == few],
              "decode_many": [r for r in decode if r["adapters"] == many],
              "mid_few": [r for r in recs if r["tokens"] == MID_T and r["adapters"] == few],
              "prefill_few": [r for r in prefill if r["adapters"] == few],
              "prefill_many": [r for r in prefill if r["adapters"] == many]}
    v = {"command": d["command"], "device": d["device"], "tokamax": d["tokamax"], "shapes": str(len(recs)),
         "static_block_t": str(d["static_tile"]["shrink_block_t"]), "few": str(few), "many": str(many),
         "decode_t": str(DECODE_T), "mid_t": str(MID_T), "prefill_t": str(PREFILL_T),
         "vs_mosaic": x(s["atmm_vs_tokamax_mosaic_geomean"], 1),
         "vs_dense_loop": x(s["atmm_vs_dense_loop_geomean"], 1), "vs_gather": x(s["atmm_vs_gather_einsum_geomean"]),
         "floor_geomean": num(s["prefill_floor_fraction_geomean"], 2)}
    names = {"atmm_vs_ragged_dot_geomean": ("vs_ragged", 1, x), "atmm_vs_static_geomean": ("vs_static", 1, x),
             "atmm_vs_static_worst": ("vs_static_worst", 2, x), "prefill_floor_fraction_min": ("floor_min", 2, num),
             "layer_T4096_ratio": ("layer_prefill", 2, x), "layer_T64_ratio": ("layer_decode", 2, x)}
    for key, op, goal in script_constant("bench/kernels.py", "TARGETS"):
        name, digits, fmt = names[key]
        v[name] = fmt(s[key], digits)
        v[f"{name}.target"] = target(op, goal, "x" if fmt is x else "")
        v[f"{name}.verdict"] = verdict(s[key] >= goal if op == ">=" else s[key] <= goal)
    for g, rs in groups.items():
        v[f"vs_ragged.{g}"] = span(over_atmm(rs, "ragged_dot"), 0 if g == "prefill_many" else 1, x)
    for g in ("decode_few", "decode_many"):
        v[f"vs_gather.{g}"] = span(over_atmm(groups[g], "gather_einsum"), 1, x)
    v["vs_gather.prefill"] = span(over_atmm(prefill, "gather_einsum"), 1, x)
    v["gather_missing"] = str(sum("gather_einsum" not in r["us"] for r in recs))
    v["vs_static.decode"] = span(over_atmm([r for r in recs if r["tokens"] <= MID_T], "atmm_static"), 1, x)
    v["vs_static.prefill"] = span(over_atmm(prefill, "atmm_static"), 1, x)
    mosaic = [r for r in recs if "tokamax_mosaic" in r["us"]]
    v["mosaic_decode_us"] = span([net(r, "tokamax_mosaic") for r in mosaic if r in decode], 0)
    v["mosaic_wins"] = "; ".join(f"{r['shape']} ({num(net(r, 'tokamax_mosaic'), 0)} us against "
                                 f"{num(net(r, 'atmm'), 0)})"
                                 for r in mosaic if net(r, "tokamax_mosaic") < net(r, "atmm")) or "no shape"
    triton = [r["errors"]["tokamax_triton"] for r in recs if "tokamax_triton" in r.get("errors", {})]
    v["triton"] = (f'did not run on {len(triton)} of {len(recs)} shapes ("{triton[0]}")' if triton
                   else "ran on every shape")
    fastest = max(prefill, key=lambda r: r["flops"] / net(r, "atmm"))
    v["prefill_tflops_max"] = num(fastest["flops"] / net(fastest, "atmm") / 1e6, 0)
    v["prefill_tflops_max.rank"] = str(fastest["rank"])

    def bound(r):
        return max(DECODE_BOUND[0] * r["floor_us"], DECODE_BOUND[1])
    misses = [r for r in decode if r["shape"] in s["decode_misses"]]
    closest = min(misses, key=lambda r: net(r, "atmm") / bound(r))
    v.update({"decode_shapes": str(len(decode)), "decode_misses": str(len(misses)),
              "bound_factor": f"{DECODE_BOUND[0]}x", "bound_us": num(DECODE_BOUND[1], 0),
              "misses_us": span([net(r, "atmm") for r in misses], 0),
              "misses_floor_us": span([r["floor_us"] for r in misses], 1),
              "closest_miss": f"{closest['shape']}: {num(net(closest, 'atmm'))} us net against {num(bound(closest))}"})
    for lay in d["layers"]:
        name = "layer_prefill" if lay["context"] is None else "layer_decode"
        v.update({f"{name}.tokens": str(lay["tokens"]), f"{name}.base_us": num(lay["us"]["base"], 0),
                  f"{name}.added_us": num(lay["us"]["lora"] - lay["us"]["base"], 0)})
        if lay["context"] is not None:
            v[f"{name}.context"] = str(lay["context"])
    return v


def switch(d):
    p, ref, gemm = d["backends"]["pallas"], d["backends"]["reference"], d["gemm_addend"]
    return {"command": d["command"], "device": d["device"], "rank": str(d["rank"]),
            "weights": str(d["targeted_weights"]), "floor_ms": num(d["floor_ms"], 2),
            "fused_ms": num(p["fused_ms"]["median"]), "fused_over_floor": x(p["fused_over_floor"]),
            "target": target("<=", SWITCH_TARGET), "verdict": verdict(p["fused_over_floor"] <= SWITCH_TARGET),
            "target_tbs": num(d["bytes_moved"] / (SWITCH_TARGET * d["floor_ms"] * 1e-3) / 1e12, 1),
            "per_layer_ms": num(p["per_layer_ms"]["median"]), "per_layer_over_floor": x(p["per_layer_over_floor"]),
            "xla_fused_ms": num(ref["fused_ms"]["median"]), "xla_fused_over_floor": x(ref["fused_over_floor"], 1),
            "xla_per_layer_ms": num(ref["per_layer_ms"]["median"]),
            "gemm_ms": num(gemm["fused_ms"]["median"]), "gemm_over_floor": x(gemm["fused_over_floor"], 1),
            "unmerge_ms": num(d["unmerge_ms"], 0),
            "base_intact": "stay bit-identical" if d["base_bit_identical"] else "did not stay bit-identical"}


def pallas_copy(d, switch_json):
    """Also the switch's bytes at the best plain Pallas rate (both measured on the same device kind)."""
    plain = [r["tb_per_s"] for k, r in d["variants"].items() if k.startswith("pallas ")]
    swift = next(r for k, r in d["variants"].items() if k.startswith("swift merge"))
    xla = d["variants"]["xla"]
    floor_at_best_ms = switch_json["bytes_moved"] / max(plain) / 1e9
    return {"command": d["command"], "shape": "x".join(map(str, d["shape"])), "variants": str(len(plain)),
            "plain_tbs": span(plain, 2), "copy_tbs": num(d["copy_bandwidth_TBps"], 2),
            "best_of_copy": pct(max(plain) / d["copy_bandwidth_TBps"]),
            "floor_at_best_ms": num(floor_at_best_ms, 1),
            "floor_at_best_over_floor": x(floor_at_best_ms / switch_json["floor_ms"], 1),
            "swift_tbs": num(swift["tb_per_s"], 2), "swift_us": num(swift["us"], 0),
            "swift_of_best": pct(swift["tb_per_s"] / max(plain)),
            "xla_tbs": num(xla["tb_per_s"], 2), "xla_us": num(xla["us"], 0),
            "xla_vs_plain": "below every" if xla["tb_per_s"] < min(plain) else "not below every"}


def prefill_attention(d):
    recs = d["records"]
    launches = [k for k in recs[0]["us"] if k != "dense"]
    best = sorted({r["best_flash"] for r in recs})
    w4, w8 = "flash q64 k64 w4 s2", "flash q64 k64 w8 s2"    # the same blocks with 4 and with 8 warps
    big = max(recs, key=lambda r: r["best_tflops"])
    top = max(recs, key=lambda r: r["dense_over_best"])
    return {"command": d["command"], "device": d["device"], "launches": str(len(launches)), "shapes": str(len(recs)),
            "speedup": span([r["dense_over_best"] for r in recs], 1, x),
            "best_launch": " or ".join(f"`{b}`" for b in best),
            "best_where": "at every shape" if len(best) == 1 else "depending on the shape",
            "w8": f"`{w8}`", "w8_over_w4": span([r["us"][w8] / r["us"][w4] for r in recs], 1, x),
            "max_tflops": num(big["best_tflops"], 0), "max_tflops.shape": big["label"],
            "top.shape": top["label"], "top.us": num(top["us"][top["best_flash"]], 0),
            "top.dense_us": num(top["us"]["dense"], 0)}


def segment_attention(d):
    recs = d["records"]
    default = "flash q64 k64 w4 s2"                       # segment_attention's default launch
    windowed = [r for r in recs if r["label"].startswith("windowed")]
    full = [r for r in recs if r["label"].startswith("full")]
    return {"command": d["command"], "device": d["device"], "shapes": str(len(recs)),
            "launches": str(len(recs[0]["us"]) - 1),
            "windowed.speedup": span([r["dense_over_best"] for r in windowed], 0, x),
            "full.speedup": span([r["dense_over_best"] for r in full], 1, x),
            "windowed.us": span([r["us"][r["best_flash"]] for r in windowed], 0),
            "windowed.over_floor": span([r["best_over_floor"] for r in windowed], 0, x),
            "full.over_floor": span([r["best_over_floor"] for r in full], 1, x),
            "default_off": pct(max(r["us"][default] / r["us"][r["best_flash"]] - 1 for r in recs)),
            "default": f"`{default}`"}


def dispatch_by_kernels(d):
    base, kernels = d["results"]["no_command_buffers"], d["kernels"]["pallas/reference"]
    return {"command": d["command"], "device": d["device"], "merged_ms": num(base["merged"]["dispatch_ms"]),
            "reference.merged_ms": num(kernels["merged"]["dispatch_ms"]),
            "step_ms": num(base["merged"]["step_ms"]), "reference.step_ms": num(kernels["merged"]["step_ms"])}


def decode_attention(d):
    recs = d["records"]
    launches = [k for k in recs[0]["us"] if k != "gather+dense"]
    rows = max(r["shape"]["rows"] for r in recs)
    full = [r for r in recs if r["shape"]["rows"] == rows and not r["shape"]["ragged"]
            and r["shape"]["kv_heads"] == r["shape"]["heads"]]
    ragged = next(r for r in recs if r["shape"]["ragged"])
    gqa = next(r for r in recs if r["shape"]["kv_heads"] < r["shape"]["heads"])
    few = sorted((r for r in recs if r["shape"]["rows"] < rows), key=lambda r: r["shape"]["rows"])
    off = max(r["us"]["default"] / min(r["us"][k] for k in launches) - 1 for r in recs)
    return {"command": d["command"], "device": d["device"], "launches": str(len(launches)),
            "default_off": pct(off, 1), "rows": str(rows), "keys": span([r["shape"]["keys"] for r in full], 0),
            "of_copy": span([r["default_of_floor"] for r in full], 0, pct),
            "target": f">= {pct(DECODE_ATTENTION_TARGET)}",
            "verdict": verdict(all(r["default_of_floor"] >= DECODE_ATTENTION_TARGET for r in full)),
            "vs_gather": span([r["us"]["gather+dense"] / r["us"]["default"] for r in full], 1, x),
            "ragged": pct(ragged["default_of_floor"]), "gqa": pct(gqa["default_of_floor"]),
            "gqa.heads": f"{gqa['shape']['heads']}/{gqa['shape']['kv_heads']}",
            "few": "; ".join(f"{r['label']}: {num(r['us']['default'], 0)} us against a {num(r['floor_us'], 0)} us "
                             f"floor ({pct(r['default_of_floor'])})" for r in few)}


def model_smoke(d):
    m = d["llava_1_5_7b"]
    dk = next(k for k in m if re.fullmatch(r"decode_\d+", k))            # decode_ROWS
    pk = next(k for k in m if re.fullmatch(r"prefill_\d+x\d+", k))       # prefill_PROMPTSxTOKENS
    dec, pre = m[f"{dk}_breakdown_ms"], m[f"{pk}_breakdown_ms"]
    attention = next(k for k in dec if re.fullmatch(r"attention_over_\d+_keys", k))
    return {"command": d["command"], "device": d["device"], "xla_flags": d["xla_flags"],
            "modes": ", ".join(k for k, ok in d["tiny"]["same_greedy_tokens"].items() if ok),
            "decode.rows": dk.split("_")[1], "decode.keys": attention.split("_")[2],
            "decode_ms": num(m[dk]["step_ms"]), "decode_merged_ms": num(m[f"{dk}_merged"]["step_ms"]),
            "decode.lora_ms": num(dec["lora_branch"]), "decode.attention_ms": num(dec[attention]),
            "decode.rest_ms": num(dec["rest_of_step"]), "prefill.shape": pk.split("_")[1],
            "prefill_ms": num(m[pk]["step_ms"], 0), "prefill_merged_ms": num(m[f"{pk}_merged"]["step_ms"], 0),
            "prefill_dense_ms": num(m[f"{pk}_dense_attention"]["step_ms"], 0),
            "prefill.lora_ms": num(pre["lora_branch"]),
            "prefill.flash_saves_ms": num(pre["flash_saves_over_dense_attention"])}


def step_overhead(d):
    r = d["results"]
    v = {"command": d["command"], "device": d["device"], "variants": str(len(r)),
         "default_dispatch_ms": span([r["default"][m]["dispatch_ms"] for m in ("merged", "unmerged")], 0),
         "dispatch_ms": span([s[m]["dispatch_ms"] for s in r.values() for m in ("merged", "unmerged")], 1),
         "arguments_ms": span([s["arguments_only_ms"] for s in r.values()], 1)}
    for name, key in (("default", "default"), ("off", "no_command_buffers"), ("every", "command_buffers_every_kind")):
        for mode in ("merged", "unmerged"):
            v[f"{name}.{mode}_ms"] = num(r[key][mode]["step_ms"])
    return v


def step_floor(d):
    config = d["engine_config"]
    decode = [r for r in d["records"] if r["prefill"] == 0]
    full = [r for r in decode if r["rows"] == config["max_rows"]]
    lone = next(r for r in decode if r["rows"] == 1)
    pre = next(r for r in d["records"] if r["prefill"] and r["mode"] == "merged")
    width = config["prefill_width"]
    v = {"command": d["command"], "device": d["device"], "rows": str(config["max_rows"]),
         "pages": str(config["min_pages"]), "width": str(width), "lone": x(lone["over_floor"]),
         "dispatch_ms": span([r["dispatch_ms"] for r in decode], 1),
         "blocking_ms": span([r["blocking_step_ms"] for r in decode], 1),
         "prefill": x(pre["over_floor"]), "prefill.prompts": str(pre["prefill"]), "prefill.prompt": str(pre["prompt"]),
         "prefill.tokens": str(pre.get("prefill_tokens", pre["prefill"] * pre["prompt"])),   # older records:
         "prefill.positions": str(pre.get("prefill_positions",                              # every prompt whole,
                                          pre["prefill"] * -(-pre["prompt"] // width) * width))}  # in rows of `width`
    for name, keys in (("long", max(r["keys"] for r in full)), ("short", min(r["keys"] for r in full))):
        step = {r["mode"]: r for r in full if r["keys"] == keys}
        v.update({f"{name}_keys": str(keys), f"{name}.merged": x(step["merged"]["over_floor"]),
                  f"{name}.unmerged": x(step["unmerged"]["over_floor"]),
                  f"{name}.merged_ms": num(step["merged"]["step_ms"]),
                  f"{name}.floor_ms": num(step["merged"]["floor_ms"])})
        v["adapters"] = str(step["unmerged"]["adapters"])
    loops = sorted(int(k[4:-8]) for k in full[0] if k.startswith("loop") and k.endswith("_step_ms"))
    if loops:                                    # decode steps run several to a call (ModelRunner.decode_loop)
        k = f"loop{loops[-1]}_step_ms"
        short = {r["mode"]: r for r in full if r["keys"] == min(r["keys"] for r in full)}
        v.update({"loop": str(loops[-1]), "loop_ms": span([r[k] for r in full], 1),
                  "loop_over": span([r[k] / r["floor_ms"] for r in full], 2, x),
                  "loop.short.unmerged_ms": num(short["unmerged"][k]),
                  "short.unmerged_ms": num(short["unmerged"]["step_ms"]),
                  "short.unmerged_blocking_ms": num(short["unmerged"]["blocking_step_ms"])})
    return v


def layer_layout(d):
    r = d["results"]
    variants = [(k, s) for res in r.values() for k, s in res.items() if isinstance(s, dict)]
    unrolled = [s for k, s in variants if "unrolled" in k]
    scans = [s for k, s in variants if "scan" in k]
    off, on = r["no command buffers"], r["XLA default"]
    fuse_diff = max(abs(res["fused, unrolled"]["step_ms"] / res["unfused, unrolled"]["step_ms"] - 1)
                    for res in r.values())
    return {"command": d["command"], "device": d["device"], "rows": str(d["rows"]), "keys": str(d["keys"]),
            "unrolled": span([s["vs_floor"] for s in unrolled], 2, x),
            "unrolled_ms": span([s["step_ms"] for s in unrolled], 1),
            "floor_ms": span([res["floor_ms"] for res in r.values()], 1),
            "scan": span([s["vs_floor"] for s in scans], 1, x), "scan_ms": span([s["step_ms"] for s in scans], 0),
            "fuse_diff": pct(fuse_diff, 1),
            "off.unfused_ms": num(off["unfused, unrolled"]["dispatch_ms"]),
            "off.unfused_args": str(off["unfused, unrolled"]["arguments"]),
            "off.stacked_ms": num(off["stacked, unrolled"]["dispatch_ms"]),
            "off.stacked_args": str(off["stacked, unrolled"]["arguments"]),
            "on.unfused_ms": num(on["unfused, unrolled"]["dispatch_ms"], 2),
            "on.fused_ms": num(on["fused, unrolled"]["dispatch_ms"], 2),
            "on.stacked_ms": num(on["stacked, unrolled"]["dispatch_ms"], 2)}


def adapter_copy(d):
    ranks = d["results"]["ranks"]
    lo, hi = min(ranks, key=int), max(ranks, key=int)
    v = {"command": d["command"], "device": d["device"], "modules": str(d["results"]["modules"]), "lo": lo, "hi": hi}
    for name, key in (("packed", "packed"), ("module", "per_module"), ("pinned", "packed_pinned")):
        digits = 0 if name == "module" else 1
        for at, rank in (("lo", lo), ("hi", hi)):
            v[f"{name}.{at}.alone_ms"] = num(ranks[rank][key]["alone_ms"], digits)
            v[f"{name}.{at}.loop_ms"] = num(ranks[rank][key]["beside_loop_ms"], digits)
        if name != "module":
            v[f"{name}.gbs"] = span([ranks[rank][key]["alone_gb_s"] for rank in (lo, hi)], 0)
    return v


def workloads(runs) -> dict[tuple, dict[str, dict]]:
    """{(kind, arrival, popularity, rate): {policy: run}}"""
    by = {}
    for r in runs:
        by.setdefault((r["kind"], r["arrival"], r["popularity"], r["rate"]), {})[r["policy"]] = r
    return by


def label(key) -> str:
    kind, arrival, popularity, rt = key
    return f"{KINDS[kind]} {ARRIVALS[arrival]} {popularity} {rate(rt)} req/s"


def e2e(d):
    runs, by = d["runs"], workloads(d["runs"])
    reduction = script_constant("bench/e2e.py", "TARGET_REDUCTION")

    def ours_over(base, where=lambda k: True):
        return {k: g["ours"]["token_latency"]["mean"] / g[base]["token_latency"]["mean"]
                for k, g in by.items() if where(k)}

    v = {"device": d["meta"]["device"], "jax": d["meta"]["jax"], "workloads": str(len(by)), "runs": str(len(runs)),
         "requests": span([r["num_requests"] for r in runs], 0), "policies": str(len({r["policy"] for r in runs})),
         "poisson": str(sum(k[1] == "poisson" for k in by)), "bursty": str(sum(k[1] == "bursty" for k in by)),
         "rates": span([k[3] for k in by], 0), "popularities": str(len({k[2] for k in by})),
         "compiled": str(sum(r["compile_steps"] > 0 for r in runs)),
         "preempted": str(sum(r["preemptions"] > 0 for r in runs)),
         "remeasured": str(sum(r["attempts"] > 1 for r in runs)),
         "unfinished": str(sum(r["finished"] < r["requests"] for r in runs))}
    behind = []
    for base in POLICIES:
        ratio, p = ours_over(base), f"ours_vs.{base}"
        gm, worst = geomean(ratio.values()), max(ratio, key=ratio.get)
        for name, i, value in (("vqa", 0, "vqa"), ("video", 0, "video"), ("poisson", 1, "poisson"),
                               ("bursty", 1, "bursty")):
            v[f"{p}.{name}"] = x(geomean([r for k, r in ratio.items() if k[i] == value]), 3)
        v.update({f"{p}.geomean": x(gm, 3), f"{p}.slower_in": str(sum(r > 1 for r in ratio.values())),
                  f"{p}.worst": x(ratio[worst]) + (f" ({label(worst)})" if ratio[worst] > 1 else "")})
        goal = reduction.get(base)
        v[f"{p}.target"] = "–" if goal is None else f"{x(1 - goal)}: {verdict(1 - gm >= goal)}" + (
            "" if 1 - gm >= goal else f" (reduction {pct(1 - gm, 1)} against {pct(goal)})")
        lagging = sorted((k for k in ratio if ratio[k] > 1), key=lambda k: (k[0] != "vqa", k[1] != "bursty", k))
        v[f"behind.{base}"] = ", ".join(f"{label(k)} ({x(ratio[k], 3 if ratio[k] < 1.01 else 2)})"
                                        for k in lagging) or "none"
        behind += [(k, ratio[k]) for k in lagging]
    v.update({"behind.workloads": str(len({k for k, _ in behind})), "behind.pairs": str(len(behind)),
              "behind.min": pct(min(r for _, r in behind) - 1, 1), "behind.max": pct(max(r for _, r in behind) - 1),
              "behind.rates": span([k[3] for k, _ in behind], 0)})
    cold = {k: g["ours"]["cold_p99"] / g["unmerged"]["cold_p99"] for k, g in by.items()}
    top = max(cold.values())
    v.update({"cold_p99.max": x(top), "cold_p99.target": target("<=", COLD_P99_TARGET),
              "cold_p99.verdict": verdict(top <= COLD_P99_TARGET),
              "cold_p99.at": " and ".join(label(k) for k, c in cold.items() if x(c) == x(top))})
    low = min(k[3] for k in by)
    v["low_rate"] = rate(low)
    v["punica.video_low"] = span(ours_over("punica", lambda k: k[0] == "video" and k[3] == low).values(), 2, x)
    for pop in ("hot80", "uniform"):
        v[f"dlora.vqa_poisson_{pop}"] = x(geomean(ours_over("dlora", lambda k: k[:3] == ("vqa", "poisson", pop))
                                                  .values()))
    logged = [r for r in runs if "gc_max_s" in r]
    frozen = [r for r in logged if "gc_frozen" in r]
    v.update({"gc.runs": str(len(logged)), "gc.max_ms": num(1e3 * max(r["gc_max_s"] for r in logged), 0),
              "gc.frozen_runs": str(len(frozen)), "gc.frozen_max_ms": num(1e3 * max(r["gc_max_s"] for r in frozen), 0),
              "gc.frozen_objects": span([r["gc_frozen"] / 1e6 for r in frozen], 1)})
    return v


def e2e_step_times(d):
    def median(kind_policy, shape):
        return d[kind_policy]["shapes"][shape][1]          # shapes: {shape: [steps, median ms, model error ms]}

    decode, prompt = "unmerged, decode only", "unmerged, 1 prefill rows"
    v = {"punica.vqa_decode_ms": num(median("vqa/punica", decode)),
         "unmerged.vqa_decode_ms": num(median("vqa/unmerged", decode)),
         "punica.vqa_decode_over": x(median("vqa/punica", decode) / median("vqa/unmerged", decode), 1),
         "punica.video_prompt_ms": num(median("video/punica", prompt), 0),
         "unmerged.video_prompt_ms": num(median("video/unmerged", prompt), 0),
         "switch.dlora_ms": span([d[f"{k}/dlora"]["switch_median_ms"] for k in KINDS], 1),
         "switch.fused_ms": span([d[f"{k}/{p}"]["switch_median_ms"] for k in KINDS for p in ("ours", "merged")], 1),
         "model.baselines_ms": span([s["model_abs_error_ms"] for kp, s in d.items() if not kp.endswith("/ours")], 1),
         "model.min_steps": str(MIN_STEPS)}
    ours = []
    for kind in KINDS:
        v[f"model.{kind}_ms"] = num(d[f"{kind}/ours"]["model_abs_error_ms"])
        ours += [(f"{KINDS[kind]} {shape}", n, err) for shape, (n, _, err) in d[f"{kind}/ours"]["shapes"].items()]
    v["model.decode_ms"] = num(max(abs(err) for shape, _, err in ours if "decode only" in shape))
    prompts = [t for t in ours if "prefill" in t[0]]
    common = [err for _, n, err in prompts if n >= MIN_STEPS]
    worst = min(prompts, key=lambda t: t[2])
    v.update({"model.prompt_high_ms": num(max(common)), "model.prompt_low_ms": num(-min(common)),
              "model.worst_shape": worst[0], "model.worst_steps": str(worst[1]), "model.worst_ms": num(-worst[2])})
    return v


def policy_replay(d):
    v, behind = {"command": d["command"], "points": str(len(d["points"]))}, []
    for base in d["points"][0]["measured"]:
        sim = np.log([p["simulated"][base] for p in d["points"]])
        meas = np.log([p["measured"][base] for p in d["points"]])
        v[f"corr.{base}"] = num(float(np.corrcoef(sim, meas)[0, 1]), 2)
        behind += [(p, base) for p in d["points"] if p["measured"][base] > 1]

    def why(p, base):        # simulated behind too; or ours' steps slower at the same shape by as much; or neither
        m, s, speed = p["measured"][base], p["simulated"][base], p["step_speed"][base]
        return "choice" if s > 1 else "device" if speed is not None and speed >= m else "neither"

    v["behind"] = str(len(behind))
    for k in ("choice", "device", "neither"):
        v[f"behind.{k}"] = str(sum(why(p, b) == k for p, b in behind))
    return v


def policy_sim(d):
    pts = d["points"]
    cold = max(pts, key=lambda p: p["cold_p99_ours_over_unmerged"])
    v = {"command": d["command"], "points": str(len(pts)), "cold_p99.max": x(cold["cold_p99_ours_over_unmerged"]),
         "cold_p99.at": label((cold["kind"], cold["arrivals"], cold["popularity"], cold["rate"]))}
    for base in pts[0]["ours_over"]:
        ratios = [p["ours_over"][base] for p in pts]
        v[f"ours_vs.{base}"] = x(geomean(ratios), 3)
        v[f"slower_in.{base}"] = str(sum(r > 1 for r in ratios))
    return v


def soak(d):
    ok = all(d["checks"].values()) and not d["errors"]
    return {"command": d["command"], "device": d["device"], "minutes": num(d["wall_s"] / 60, 0),
            "clients": str(d["clients"]), "checks": str(len(d["checks"])), "passed": str(sum(d["checks"].values())),
            "verdict": "all passed" if ok else "not all passed", "check_names": ", ".join(d["checks"]),
            "tally": ", ".join(f"{n} {k}" for k, n in d["tally"].items()),
            "finished": num(d["finished_in_metrics"], 0), "duplicated": str(d["duplicated"])}


def adapter_generation(d):
    tasks = d["tasks"]
    domain = next(t["measured"] for t in d["targets"] if t["target"].startswith("domain tasks"))
    base = [t["base_accuracy"] for t in tasks if t["task"] in domain]
    rolled_back = not {e["action"] for e in d["log"]} <= {"new", "packed"}
    return {"command": d["command"], "device": d["device"], "tasks": str(len(tasks)),
            "adapters": str(d["num_adapters"]), "allowed": str(d["one_per_task"] // 2),
            "verdict": "All met: every task clears" if d["all_met"] else "Not all met: not every task clears",
            "heads": "task heads" if any(t["head"] for t in tasks) else "no task head",
            "accuracy": ", ".join(f"{t['task']} {num(t['adapted_accuracy'], 3)}" for t in tasks),
            "domain": ", ".join(domain), "domain_gain": span(list(domain.values()), 0),
            "base_domain": "answers none of them" if max(base) == 0 else f"scores {span(base, 2)} on them",
            "others_gain": ", ".join(f"{t['task']} +{num(100 * (t['adapted_accuracy'] - t['base_accuracy']), 0)}"
                                     for t in tasks if t["task"] not in domain and t["base_accuracy"] > 0),
            "order_rule": d["order_rule"].capitalize(),
            "rollbacks": "rolled back at least once (see the packing log)" if rolled_back else
                         "never rolled back: each task joined the running adapter without pushing an earlier one "
                         "below its requirement"}


def values(results: Path = RESULTS) -> dict[str, str]:
    """Every named value, computed from the result files in `results`: {"source.name": text}."""
    def load(name):
        return json.loads((results / f"{name}.json").read_text())

    switch_json = load("switch")
    sources = {"kernels": kernels(load("kernels_NVIDIA_H200")), "switch": switch(switch_json),
               "pallas_copy": pallas_copy(load("pallas_copy"), switch_json),
               "prefill": prefill_attention(load("prefill_attention")),
               "decode_attn": decode_attention(load("decode_attention")), "smoke": model_smoke(load("model_smoke")),
               "segment": segment_attention(load("segment_attention")),
               "dispatch": dispatch_by_kernels(load("dispatch_by_kernels")),
               "overhead": step_overhead(load("step_overhead")), "floor": step_floor(load("step_floor")),
               "layout": layer_layout(load("layer_layout")), "adapter_copy": adapter_copy(load("adapter_copy")),
               "e2e": e2e(load("e2e")), "steps": e2e_step_times(load("e2e_step_times")),
               "replay": policy_replay(load("policy_replay")), "sim": policy_sim(load("policy_sim")),
               "soak": soak(load("soak_cpu")), "gen": adapter_generation(load("adapter_generation"))}
    return {f"{src}.{k}": val for src, vals in sources.items() for k, val in vals.items()}


def render(template: str, vals: dict[str, str]) -> str:
    """The template with each {{name}} replaced; UnknownPlaceholder names any that `vals` lacks."""
    unknown = sorted({m for m in PLACEHOLDER.findall(template) if m not in vals})
    if unknown:
        raise UnknownPlaceholder(", ".join(unknown))
    return PLACEHOLDER.sub(lambda m: vals[m.group(1)], template)


def _with_block(text: str, block: str, path: str) -> str:
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < start:
        raise ValueError(f"{path} lacks the {BEGIN} ... {END} markers")
    return text[:start + len(BEGIN)] + "\n" + block.rstrip("\n") + "\n" + text[end:]


def renderings(results: Path = RESULTS, root: Path = ROOT) -> tuple[dict[Path, str], list[str]]:
    """{file: the text it should hold} and the problems found (unknown and unused placeholders)."""
    vals, used, out, problems = values(results), set(), {}, []
    for template, target, block in PAGES:
        text = (root / template).read_text()
        used |= set(PLACEHOLDER.findall(text))
        try:
            rendered = render(text, vals)
            out[root / target] = _with_block((root / target).read_text(), rendered, target) if block else rendered
        except UnknownPlaceholder as e:
            problems.append(f"{template}: unknown placeholder(s) {e.args[0]}")
        except ValueError as e:                       # the markers are missing
            problems.append(str(e))
    problems += [f"unused placeholder {name}" for name in sorted(set(vals) - used)]
    return out, problems


def differences(results: Path = RESULTS, root: Path = ROOT) -> list[str]:
    """What --check reports: each file that differs from its rendering, each unknown or unused placeholder."""
    out, problems = renderings(results, root)
    stale = [f"{path.relative_to(root)} differs from its rendering (run python bench/report.py)"
             for path, text in out.items() if path.read_text() != text]
    return stale + problems


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="write nothing; exit 1 if a file differs from its rendering")
    args = ap.parse_args(argv)
    if args.check:
        problems = differences()
        print("\n".join(problems) or "benchmark prose matches the committed results")
        return 1 if problems else 0
    out, problems = renderings()
    for path, text in out.items():
        if path.read_text() != text:
            path.write_text(text)
            print(f"wrote {path.relative_to(ROOT)}")
    if problems:
        print("\n".join(problems))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
