"""End-to-end serving benchmark: orchestration policies on the same engine, model and traces.

For each workload (kind, arrival process, rate, adapter popularity) and each policy, a fresh
Engine replays the same trace (bench/workloads.py: real-time steps, idle gaps skipped) and
reports average token latency (latency / output tokens, V-LoRA's metric), average and p99
request latency, TTFT, throughput, and p99 latency of requests to cold (non-hot) adapters.
Ratios of ours to each baseline are computed per workload and as geometric means. Ours starts
each run from a copy of the step-time model that Engine.calibrate measured after the warm-up (as
`valora serve` does at start-up), and refines it online as it serves.

  python bench/e2e.py --preset llava-1.5-7b --backend pallas --adapters 32 --out bench/results/e2e

Results are rewritten after every workload; `--append` keeps the runs already in OUT.json and
runs only the missing workloads, so a grid can be measured over several calls (`--deadline-s`),
and lets processes that each serve a share of the grid on their own GPU write the same files.
`--workloads` names the workloads to measure instead of a grid; `--rerun` measures some again.
"""

import argparse
import copy
import dataclasses
import fcntl
import gc
import itertools
import json
import math
import os
import sys
import time
import traceback
import zlib
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.workloads import (ARRIVALS, KINDS, POPULARITY, GcPauses, SkippingClock, Workload,  # noqa: E402
                             make_trace, replay)
from serve.config import EngineConfig, precompile, serving_config  # noqa: E402
from serve.engine import Engine  # noqa: E402
from serve.metrics import RequestMetrics, StepMetrics  # noqa: E402
from serve.policies import SYSTEMS, CostModel  # noqa: E402
from valora_jax import PRESETS, AdapterPool, ModelRunner, TaskHead, init_model, make_adapter  # noqa: E402
from valora_jax.lora import MODES  # noqa: E402
from valora_jax.runtime import (compile_seconds, compile_seconds_by_function,  # noqa: E402
                                frozen_heap, use_serving_xla_flags)
from valora_jax.versions import stack_versions, versions_line  # noqa: E402


ENGINE_FIELDS = ("max_rows", "token_budget", "prefill_chunk", "num_pages", "min_rows", "prefill_width", "min_pages",
                 "max_prefill_rows", "min_features", "decode_loop")
"""EngineConfig fields the command line may set instead of the serving configuration."""


def fast_adapters(config, shapes, count: int, ranks, seed: int, std: float = 0.01):
    """`count` distinct random adapters whose A/B are views into one shared random buffer
    (cheap to build at 7B scale); ranks cycle through `ranks`."""
    rng = np.random.default_rng(seed)
    biggest = max(i + o for i, o in shapes.values()) * max(ranks)
    pool = (std * rng.standard_normal(biggest + 1_000_003)).astype(np.float32)
    adapters = []
    for k in range(count):
        r = ranks[k % len(ranks)]
        weights = {}
        for path, (i, o) in shapes.items():
            start = int(rng.integers(0, 1_000_000))
            weights[path] = (pool[start: start + i * r].reshape(i, r),
                             pool[start + i * r: start + (i + o) * r].reshape(r, o))
        adapters.append(make_adapter(f"task{k}", config.base_id, weights, alpha=2.0 * r))
    return adapters


def _with_adapters(runner: ModelRunner, adapters) -> tuple[ModelRunner, AdapterPool]:
    pool = AdapterPool(runner.config, runner.module_shapes, runner.write_slot)
    for a in adapters:
        pool.register(a)
    return runner, pool


def _device_memory() -> str:
    """'in use / peak / limit GiB' of the first device's allocator ('' where it keeps no stats)."""
    stats = jax.devices()[0].memory_stats() or {}
    gib = lambda key: stats.get(key, 0) / 2**30
    return f"memory {gib('bytes_in_use'):.1f}/{gib('peak_bytes_in_use'):.1f}/{gib('bytes_limit'):.1f} GiB" if stats else ""


def _p99(values):
    return float(np.percentile(values, 99)) if len(values) else None


def run_one(runner, pool, system: str, trace, engine_config: EngineConfig, hot: str, cache=None,
            cost: CostModel | None = None) -> tuple:
    """Replay `trace` on a fresh engine of the serving system `system` (policies.SYSTEMS; ours with
    the step-time model `cost`), serving from the KV pages `cache` when given
    (one allocation for every run: 34 GB at 7B, which freed and allocated again between runs would
    fragment the device memory). -> (summary, the KV pages)."""
    clock = SkippingClock()
    pool.evict_all()                     # every run starts with no adapter on the device
    engine = Engine(runner, pool, config=engine_config, policy=system, cost=cost, clock=clock, cache=cache)
    start = time.perf_counter()
    with frozen_heap() as frozen, GcPauses(clock) as gc_pauses:     # earlier runs' results are not rescanned
        ids = replay(engine, trace, clock)
    summary = engine.summary()
    cold = [m.latency for m in engine.request_metrics if m.adapter != hot and m.latency is not None]
    summary.update(policy=system, wall_s=time.perf_counter() - start, cold_p99=_p99(cold),
                   completed=sum(engine.result(i) is not None for i in ids),
                   gc_s=gc_pauses.total_s, gc_max_s=gc_pauses.max_s, gc_frozen=frozen)
    summary["log"] = {"steps": [dataclasses.astuple(s) for s in engine.step_metrics],
                      "requests": [dataclasses.astuple(m) for m in engine.request_metrics],
                      "gc_pauses": gc_pauses.pauses}
    return summary, engine.cache


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="llava-1.5-7b", choices=sorted(PRESETS))
    ap.add_argument("--backend", default="auto", help="LoRA backend, as valora serve takes it (default: auto)")
    ap.add_argument("--attention", default="auto", help="paged-attention backend, as valora serve takes it")
    ap.add_argument("--adapters", type=int, default=32)
    ap.add_argument("--ranks", default="16,32,64")
    ap.add_argument("--max-loras", type=int, default=16)
    ap.add_argument("--policies", default=",".join(SYSTEMS))
    ap.add_argument("--kinds", default=",".join(KINDS))
    ap.add_argument("--rates", default="2,4,6,10,16")
    ap.add_argument("--popularity", default=",".join(POPULARITY))
    ap.add_argument("--arrivals", default=",".join(ARRIVALS))
    ap.add_argument("--requests", type=int, default=100)
    ap.add_argument("--warmup-requests", type=int, default=0,
                    help="requests of each policy's and kind's warm-up trace (default: 2 x --max-rows)")
    ap.add_argument("--probe-requests", type=int, default=48,
                    help="requests of each kind that calibrate ours' step-time model (Engine.calibrate)")
    for name in ENGINE_FIELDS:              # default: the serving configuration's (serve.config.serving_config)
        ap.add_argument("--" + name.replace("_", "-"), type=int, help=f"EngineConfig.{name} (default: valora serve's)")
    ap.add_argument("--encoder-batches", help="numbers of images an encoder call is compiled for before the warm-up, "
                                              "comma-separated (default: valora serve's)")
    ap.add_argument("--compile-threads", type=int, default=16)
    ap.add_argument("--out", default="bench/results/e2e")
    ap.add_argument("--append", action="store_true",
                    help="keep the runs already in OUT.json and run only the workloads it lacks")
    ap.add_argument("--step-log", help="also write every run's steps and requests (StepMetrics, RequestMetrics "
                                       "fields) to this JSON file")
    ap.add_argument("--workloads", type=_workload_list, metavar="KIND/ARRIVAL/POPULARITY/RATE,...",
                    help="measure these workloads (warming up for their kinds) instead of the grid of --kinds, "
                         "--arrivals, --popularity and --rates")
    ap.add_argument("--rerun", type=_workload_list, default=[], metavar="KIND/ARRIVAL/POPULARITY/RATE,...",
                    help="with --append, measure these again though OUT.json has them (their runs and steps are "
                         "replaced)")
    ap.add_argument("--deadline-s", type=float, default=float("inf"),
                    help="start no new workload after this many seconds (results so far are written)")
    args = ap.parse_args(argv)
    kinds = sorted({w[0] for w in args.workloads}, key=KINDS.index) if args.workloads else args.kinds.split(",")
    use_serving_xla_flags()

    start = time.perf_counter()
    ranks = [int(r) for r in args.ranks.split(",")]
    config = PRESETS[args.preset](max_loras=args.max_loras, max_rank=max(ranks))
    runner = ModelRunner(init_model(config, seed=0), backend=args.backend, attention=args.attention)
    adapters = fast_adapters(config, runner.module_shapes, args.adapters, ranks, seed=1)
    rng = np.random.default_rng(2)
    headed = set()
    for k, a in enumerate(adapters):
        if k % 2:                                       # half the adapters answer through a task head
            head = TaskHead((0.02 * rng.standard_normal((config.text.hidden_size, 8))).astype(np.float32),
                            np.zeros(8, np.float32), tuple(str(i) for i in range(8)))
            adapters[k] = dataclasses.replace(a, head=head)
            headed.add(a.name)
    names = [a.name for a in adapters]
    # static-tiling baselines run the same kernel with one fixed tile, on a twin of the runner
    backends = {p: SYSTEMS[p].backend(runner.backend) for p in args.policies.split(",")}
    serving = {b: _with_adapters(runner if b == runner.backend else runner.twin(b), adapters)
               for b in set(backends.values())}
    # the engine configuration valora serve runs, with what the command line names instead
    overrides = {name: getattr(args, name) for name in ENGINE_FIELDS if getattr(args, name) is not None}
    if args.encoder_batches is not None:
        overrides["encoder_batches"] = tuple(int(n) for n in args.encoder_batches.split(","))
    engine_config = serving_config(config, max_queue=10_000, **overrides)

    size = config.vision.image_size
    # warm-up, outside the measurements: compile the likely step shapes, then replay a short-answer
    # trace per policy and workload kind, half of it on one adapter (merges, mixtures) and half
    # spread over the others (their ranks' slot writes), compiling whatever else it meets
    tic, n = time.perf_counter(), 0
    for backend, (runner_b, _) in serving.items():
        modes = ("unmerged",) if backend == "pallas-static" else MODES
        n += precompile(runner_b, engine_config, modes, threads=args.compile_threads)
    print(f"{n} step variants and encoder batches of {sorted(serving)} compiled in {time.perf_counter() - tic:.0f} s "
          f"(compile events: {compile_seconds():.0f} s of compilation so far)", flush=True)
    # ours' step-time model is measured as a server measures its own at start-up (Engine.calibrate:
    # a probe schedule over every mode) on requests of each kind, after the warm-ups, so that no
    # step it observes loads an executable; every measured run of ours starts from a copy of it
    calibration, kv = CostModel(), None
    policies = args.policies.split(",")
    cost_of = lambda name: copy.deepcopy(calibration) if name == "ours" else None
    for policy in policies:
        for kind in kinds:
            warm_requests = args.warmup_requests or 2 * engine_config.max_rows
            warm = make_trace(Workload(kind, 50.0, "poisson", "hot50", warm_requests,
                                       seed=99), names, size, headed)
            warm = [(t, dataclasses.replace(r, max_tokens=min(r.max_tokens, 4))) for t, r in warm]
            compiled = compile_seconds_by_function()
            r, kv = run_one(*serving[backends[policy]], policy, warm, engine_config, names[0], kv, cost_of(policy))
            spent = compile_seconds_by_function() - compiled
            print(f"warm-up {policy} {kind}: {r['wall_s']:.1f} s, {r['compile_steps']} of {r['steps']} steps "
                  f"compiling ({sum(spent.values()):.1f} s of compilation: "
                  + ", ".join(f"{name} {sec:.1f} s" for name, sec in spent.most_common(5)) + ")", flush=True)
    if "ours" in policies:
        runner_o, pool_o = serving[runner.backend]
        for kind in kinds:
            probe = make_trace(Workload(kind, 16.0, "poisson", "hot50", args.probe_requests, seed=98),
                               names, size, headed)
            pool_o.evict_all()
            engine = Engine(runner_o, pool_o, config=engine_config, policy="ours", cost=calibration, cache=kv)
            requests = [dataclasses.replace(r, max_tokens=min(r.max_tokens, 32)) for _, r in probe]
            tic = time.perf_counter()
            steps = engine.calibrate(requests, passes=1)
            kv = engine.cache
            print(f"probe {kind}: {steps} steps observed in {time.perf_counter() - tic:.1f} s", flush=True)
    print(f"warm after {time.perf_counter() - start:.0f} s; ours' step-time model ({calibration.observed} steps): "
          f"switch {calibration.switch * 1e3:.2f} ms, "
          + ", ".join(f"{m} {np.round(c * 1e3, 4).tolist()} ms" for m, c in calibration.coef.items())
          + f"; {_device_memory()}", flush=True)

    out = Path(args.out).with_suffix(".json")
    previous = json.loads(out.read_text()) if args.append and out.exists() else {"meta": {}, "runs": []}
    done = {_workload_key(r) for r in previous["runs"]}
    terms = ("fixed_s", "per_token_s", "per_lora_token_s", "per_adapter_s", "per_kv_s")
    meta = {"commands": ["python " + " ".join(sys.argv)],
            "calibrations": [{"observed_steps": calibration.observed, "switch_s": calibration.switch,   # ours'
                              **{m: dict(zip(terms, map(float, c))) for m, c in calibration.coef.items()},
                              "observations": calibration.observations}]}
    results, logs = [], []
    grid = args.workloads or itertools.product(kinds, args.arrivals.split(","), args.popularity.split(","),
                                               [float(r) for r in args.rates.split(",")])
    for kind, arrival, popularity, rate in grid:
        seed = zlib.crc32(f"{kind}/{arrival}/{popularity}/{rate}".encode())    # the same trace in every call
        w = Workload(kind, rate, arrival, popularity, args.requests, seed=seed)
        if _workload_key(dataclasses.asdict(w)) in done and (kind, arrival, popularity, rate) not in args.rerun:
            continue
        if time.perf_counter() - start > args.deadline_s:
            print(f"deadline: workloads from {w} on not run (rerun with --append to continue)", flush=True)
            break
        trace = make_trace(w, names, size, headed)
        runs = []
        try:
            for policy in args.policies.split(","):
                for attempt in range(1, 4):      # a shape the warm-up missed compiled: measure again
                    r, kv = run_one(*serving[backends[policy]], policy, trace, engine_config, names[0], kv,
                                    cost_of(policy))
                    r["attempts"] = attempt
                    if not r["compile_steps"]:
                        break
                r.update(dataclasses.asdict(w), backend=backends[policy])
                runs.append(r)
                print(f"{kind:5s} {arrival:7s} {popularity:7s} {rate:5.1f}/s {policy:7s} "
                      f"token latency {r['token_latency']['mean'] * 1e3:8.2f} ms  p99 {r['latency']['p99']:7.2f} s  "
                      f"modes {r['mode_steps']}  preemptions {r['preemptions']}  adapter loads {r['load_time']:.2f} s  "
                      f"compiling steps {r['compile_steps']}  "
                      f"gc {r['gc_s']:.2f} s (longest {r['gc_max_s'] * 1e3:.0f} ms, {r['gc_frozen']} objects frozen)  "
                      f"({r['wall_s']:.0f} s)  {_device_memory()}",
                      flush=True)
        except Exception:                    # e.g. out of device memory: none of this workload is kept
            traceback.print_exc()
            print(f"workload {w} failed; the grid goes on (rerun with --append to retry it)", flush=True)
            kv = None                        # the pages may have been donated to the failed step
            gc.collect()                     # the traceback's frames held the engine and its pages
            continue
        logs += [{**{k: r[k] for k in _RUN_KEY}, **r.pop("log")} for r in runs]
        results += runs
        _save(out, results, meta, logs, args)      # after every workload: a later one may be cut off


_RUN_KEY = ("kind", "arrival", "popularity", "rate", "num_requests", "seed", "policy")
TARGET_REDUCTION = {"slora": 0.30, "punica": 0.50, "dlora": 0.70}
"""The geometric-mean reduction of average token latency ours is to reach against each baseline."""


def _workload_list(text: str) -> list[tuple[str, str, str, float]]:
    """'KIND/ARRIVAL/POPULARITY/RATE,...' -> [(kind, arrival, popularity, rate)], each one checked."""
    workloads = []
    for item in filter(None, text.split(",")):
        try:
            kind, arrival, popularity, rate = item.split("/")
            Workload(kind, float(rate), arrival, popularity)
        except ValueError as e:
            raise argparse.ArgumentTypeError(f"workload {item!r}: expected KIND/ARRIVAL/POPULARITY/RATE ({e})")
        workloads.append((kind, arrival, popularity, float(rate)))
    return workloads


def _workload_key(run: dict) -> tuple:
    return tuple(run[k] for k in _RUN_KEY[:-1])


def _merged(saved: list, mine: list) -> list:
    """`saved` runs with `mine` added (replacing any of the same workload and policy), in grid order."""
    runs = {tuple(r[k] for k in _RUN_KEY): r for r in saved + mine}
    order = lambda r: (KINDS.index(r["kind"]), ARRIVALS.index(r["arrival"]), POPULARITY.index(r["popularity"]),
                       r["rate"], list(SYSTEMS).index(r["policy"]))
    return sorted(runs.values(), key=order)


def _save(out: Path, results: list, meta: dict, logs: list, args) -> None:
    """Write this process's runs merged into OUT.json/.md/.png and its steps into the step log. With
    --append, what the files hold is read again under a lock and kept, so that several processes
    (one a GPU, each given a share of the grid) can write the same files."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        read = lambda path, empty: json.loads(path.read_text()) if args.append and path.exists() else empty
        saved = read(out, {"meta": {}, "runs": []})
        union = lambda key: saved["meta"].get(key, []) + [x for x in meta[key] if x not in saved["meta"].get(key, [])]
        runs = _merged(saved["runs"], results)
        report = _report(runs, union("commands"), args)
        report["meta"]["calibrations"] = union("calibrations")
        _write_atomic(out, json.dumps({"meta": report["meta"], "ratios": report["ratios"], "runs": runs}, indent=2))
        _write_atomic(out.with_suffix(".md"), report["table"])
        _plot(runs, out.with_suffix(".png"))
        if args.step_log:
            path = Path(args.step_log)
            fields = {"steps": [f.name for f in dataclasses.fields(StepMetrics)],
                      "requests": [f.name for f in dataclasses.fields(RequestMetrics)]}
            # what measured the runs
            meta = {k: report["meta"][k] for k in ("commands", "device", "jax", "jaxlib", "flax", "cuda_plugin")}
            _write_atomic(path, json.dumps({"fields": fields, "meta": meta,
                                            "runs": _merged(read(path, {"runs": []})["runs"], logs)}))
    print(report["table"], flush=True)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _report(results, commands, args) -> dict:
    meta = {"commands": commands, "device": jax.devices()[0].device_kind,
            **stack_versions(),
            "xla_flags": os.environ.get("XLA_FLAGS", "")}
    key = lambda r: (r["kind"], r["arrival"], r["popularity"], r["rate"])
    by = {}
    for r in results:
        by.setdefault(key(r), {})[r["policy"]] = r
    ratios = {}
    for base in [p for p in args.policies.split(",") if p != "ours"]:
        pairs = [(g["ours"]["token_latency"]["mean"], g[base]["token_latency"]["mean"]) for g in by.values()
                 if "ours" in g and base in g]
        logs = [math.log(o / b) for o, b in pairs if o and b]
        worst = max((o / b for o, b in pairs if o and b), default=None)
        ratios[base] = {"geomean_ours_over_base": math.exp(sum(logs) / len(logs)) if logs else None,
                        "reduction": 1 - math.exp(sum(logs) / len(logs)) if logs else None, "worst": worst,
                        "workloads": len(pairs), "ours_slower_in": sum(o > b for o, b in pairs if o and b)}
    cold = [g["ours"]["cold_p99"] / g["unmerged"]["cold_p99"] for g in by.values()
            if "ours" in g and "unmerged" in g and g["ours"]["cold_p99"] and g["unmerged"]["cold_p99"]]
    ratios["cold_p99_ours_over_unmerged_max"] = max(cold) if cold else None
    lines = [f"# End-to-end serving, {args.preset}, {meta['device']}, {versions_line(meta)}", "",
             *[f"`{c}`  " for c in meta["commands"]],
             *([f"XLA_FLAGS=`{meta['xla_flags']}`"] if meta["xla_flags"] else []), "",
             "| ours vs | geomean token-latency ratio | reduction | target reduction | worst ratio "
             "| workloads where ours is slower |", "| --- | --- | --- | --- | --- | --- |"]
    for base, v in ratios.items():
        if isinstance(v, dict) and v["geomean_ours_over_base"] is not None:
            goal = TARGET_REDUCTION.get(base)
            target = "–" if goal is None else f"{100 * goal:.0f}% ({'met' if v['reduction'] >= goal else 'missed'})"
            lines.append(f"| {base} | {v['geomean_ours_over_base']:.3f} | {100 * v['reduction']:.1f}% | {target} | "
                         f"{v['worst']:.3f} | {v['ours_slower_in']} of {v['workloads']} (target 0) |")
    compiled = [r for r in results if r["compile_steps"]]
    cold = ratios["cold_p99_ours_over_unmerged_max"]
    lines += ["", f"cold-adapter p99 latency, ours / always-unmerged, worst workload: "
              f"{'–' if cold is None else f'{cold:.3f}'} (target <= 2)", "",
              f"runs that compiled a step in each of their attempts (their latencies include the compilation): "
              f"{len(compiled)} of {len(results)}", "",
              "| kind | arrival | popularity | rate | policy | token latency ms | of it task-head answers "
              "| avg latency s | p99 s | TTFT s | req/s | steps merged/mixture/unmerged | switches | compiling steps |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        m = r["mode_steps"]
        lines.append(f"| {r['kind']} | {r['arrival']} | {r['popularity']} | {r['rate']} | {r['policy']} | "
                     f"{1e3 * r['token_latency']['mean']:.2f} | {_share(r.get('task_head_share'))} | "
                     f"{r['latency']['mean']:.3f} | {r['latency']['p99']:.3f} | "
                     f"{r['ttft']['mean']:.3f} | {r['throughput_rps'] or 0:.2f} | "
                     f"{m['merged']}/{m['mixture']}/{m['unmerged']} | {r['switches']} | {r['compile_steps']} |")
    return {"meta": meta, "ratios": ratios, "table": "\n".join(lines) + "\n"}


def _share(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.0f}%"


def _plot(results, path: Path) -> None:
    """Average token latency vs request rate (log scale), a line per policy: a row of panels per
    (kind, arrival), a column per popularity."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot", file=sys.stderr)
        return
    rows = sorted({(r["kind"], r["arrival"]) for r in results},
                  key=lambda ka: (KINDS.index(ka[0]), ARRIVALS.index(ka[1])))
    cols = sorted({r["popularity"] for r in results}, key=POPULARITY.index)
    fig, axes = plt.subplots(len(rows), len(cols), figsize=(3.2 * len(cols), 2.8 * len(rows)), squeeze=False)
    lines = {}
    for (i, (kind, arrival)), (j, pop) in itertools.product(enumerate(rows), enumerate(cols)):
        ax = axes[i][j]
        for k, policy in enumerate(SYSTEMS):           # one colour per policy in every panel
            pts = sorted((r["rate"], 1e3 * r["token_latency"]["mean"]) for r in results
                         if (r["kind"], r["arrival"], r["popularity"], r["policy"]) == (kind, arrival, pop, policy))
            if pts:
                lines[policy], = ax.plot(*zip(*pts), marker="o", color=f"C{k}")
        if not ax.lines:
            ax.set_visible(False)                       # a workload not measured (yet)
            continue
        ax.set_yscale("log")
        ax.set_title(f"{kind} {arrival} {pop}", fontsize=8)
        ax.set_xlabel("requests/s", fontsize=8)
        ax.set_ylabel("avg token latency (ms)", fontsize=8)
    fig.legend(list(lines.values()), list(lines), loc="upper center", ncol=len(lines), fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.3 / fig.get_figheight()))
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
