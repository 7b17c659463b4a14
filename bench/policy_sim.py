"""Scheduler-only simulation: the policies' decisions on the same traces, with step times from a
fixed model instead of a GPU (no engine, no model, no adapter copies, no image encoder).

A step in mode m takes fixed[m] + per_position[m] * P, P the token positions of its prefill
chunks (whole rows of e2e's prefill width), modelled on the H200 LLaVA-1.5-7B e2e step logs
(`STEP_TIMES`, fitted to the committed e2e step log by `logged_step_times`). Ours learns them online, as it
does on the GPU. What this shows is what each policy's choices of mode and rows cost when
steps cost what they measured; what it leaves out (adapter copies, encoder, host gaps)
is what an e2e run adds. Traces follow bench/e2e.py's workloads: 32 adapters, the odd-numbered
ones answering through a task head (one output token), the hot adapter a0.
With --step-log, it replays instead the very requests of each workload of an e2e step log and
sets what it predicts for ours against every baseline beside what the GPU measured: where both
show ours behind, that is the policy's choice on that trace, not the device or noise. Beside them
stands how fast ours' steps ran against the baseline's at the same shape (decode-only steps of the
same mode, rows and adapters): the runs of a workload follow one another on the device, and where
ours' steps ran slower by as much as ours is behind, the device's speed, not a choice, made it so.
Usage: python bench/policy_sim.py [--kinds vqa,video] [--arrivals poisson,bursty]
       [--popularity hot80,uniform,zipf1.5,hot50,hot60] [--rates 2,4,6,10,16] [--traces 6] [--requests 40]
       [--out bench/results/policy_sim]
       python bench/policy_sim.py --step-log bench/results/e2e_steps.json.gz [--out bench/results/policy_replay]
"""

import argparse
import dataclasses
import itertools
import sys
from pathlib import Path
from typing import Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import save_result  # noqa: E402
from bench.e2e_steps import load_step_log  # noqa: E402
from bench.workloads import Workload, adapter_probabilities, arrival_times  # noqa: E402
from serve.metrics import RequestMetrics, StepMetrics  # noqa: E402
from serve.policies import SYSTEMS, BatchLimits, CostModel, Policy, SchedulerState, SeqView  # noqa: E402


LIMITS = BatchLimits(max_rows=32, token_budget=2048, prefill_chunk=2048, max_adapters=16, max_prefill_rows=4,
                     prefill_width=512)      # those of the committed e2e step log's runs


@dataclasses.dataclass(frozen=True)
class StepTimes:
    """Seconds a step takes: fixed[mode] + per_position[mode] * its prefill chunks' positions."""
    fixed: dict
    per_position: dict

    def __call__(self, mode: str, merged: str | None, rows) -> float:
        positions = sum(LIMITS.prefill_positions(n) for _, n in rows if n > 1)
        return self.fixed[mode] + self.per_position[mode] * positions


STEP_LOG = Path(__file__).parent / "results" / "e2e_steps.json.gz"
ADAPTIVE_KERNEL = ("ours", "merged", "unmerged", "dlora")     # the systems whose steps run the tuned tiles


def logged_step_times(step_log: dict, systems=ADAPTIVE_KERNEL) -> dict[str, StepTimes]:
    """Per workload kind, StepTimes fitted to the logged steps of `systems` that neither compiled
    nor switched: fixed[m] = the median decode-only step in mode m; per_position[m] = the median
    over steps with prefill chunks of (step - fixed[m]) / their prefill positions (the step's
    padded tokens less its decode block). A mode without decode-only steps (ours runs mixture
    mostly with prompts) takes as fixed the intercept of a least-squares line through its
    prefill steps."""
    fields, samples = step_log["fields"], {}
    for run in step_log["runs"]:
        if run["policy"] not in systems:
            continue
        for s in (StepMetrics(**dict(zip(fields["steps"], s))) for s in run["steps"]):
            if s.compile_time or s.switch_time:
                continue
            decode, prefill = samples.setdefault((run["kind"], s.mode), ([], []))
            if s.prefill_rows:
                prefill.append((s.padded_tokens - (LIMITS.max_rows if s.decode_rows else 0), s.compute_time))
            else:
                decode.append(s.compute_time)
    out = {}
    for (kind, mode), (decode, prefill) in sorted(samples.items()):
        positions, seconds = (np.array(prefill, np.float64).T if prefill else (np.zeros(0), np.zeros(0)))
        fixed = float(np.median(decode)) if decode else float(np.polyfit(positions, seconds, 1)[1])
        times = out.setdefault(kind, StepTimes({}, {}))
        times.fixed[mode] = fixed
        times.per_position[mode] = float(np.median((seconds - fixed) / positions)) if prefill else 0.0
    return out


STEP_TIMES = logged_step_times(load_step_log(STEP_LOG))
"""The H200 LLaVA-1.5-7B e2e runs' step times (bench/results/e2e_steps.json.gz), per kind."""
SWITCH_S = 0.0155                     # a merge switch in one call (e2e_step_times.md: median 15.3-15.9 ms)
PER_LAYER_SWITCH_S = 0.016            # dLoRA-like's, layer by layer (median 16.1-16.2 ms: the same work)
PROMPT_TOKENS = {"vqa": 626, "video": 3510}
OUTPUT_TOKENS = {"vqa": (40, 121), "video": (4, 13)}


def make_trace(kind: str, popularity: str, rate: float, n: int = 120, heads: bool = True, seed: int = 0,
               arrivals: str = "poisson") -> list[tuple[float, str, int, int]]:
    """[(arrival s, adapter, prompt tokens, output tokens)] of n requests over 32 adapters a0..a31,
    arrivals and popularity as bench/workloads.py draws them; with `heads`, the odd-numbered
    adapters answer in one token."""
    w = Workload(kind, rate, arrivals, popularity, n, seed=int(rate) + 1000 * seed)
    rng = np.random.default_rng(w.seed)
    adapters = rng.choice(32, n, p=adapter_probabilities(popularity, 32))
    times = arrival_times(w, rng)
    low, high = OUTPUT_TOKENS[kind]
    return [(float(t), f"a{a}", PROMPT_TOKENS[kind], 1 if heads and a % 2 else int(rng.integers(low, high)))
            for t, a in zip(times, adapters)]


def simulate(policy: Policy, trace, step_time: Callable, switch: float = SWITCH_S, limits: BatchLimits = LIMITS,
             layer_by_layer: bool = False, per_layer_switch: float = PER_LAYER_SWITCH_S) -> dict:
    """Replay `trace` under `policy` as the engine would, a step taking step_time(mode, merged
    adapter, [(adapter, tokens)]) seconds and a merge `switch` seconds (`per_layer_switch` when
    the system merges layer by layer), the steps feeding a step-time model the policy reads;
    returns {"token_latency": mean latency / output tokens, "cold_p99": p99 latency of requests
    not on a0}."""
    now, live, merged, i, done, cost = 0.0, {}, None, 0, [], CostModel()
    while i < len(trace) or live:
        while i < len(trace) and trace[i][0] <= now:
            arrival, adapter, prompt, out = trace[i]
            live[f"r{i}"] = {"adapter": adapter, "pending": prompt, "left": out, "out": out, "arrival": arrival,
                             "served": 0.0}
            i += 1
        if not live:
            now = trace[i][0]
            continue
        views = tuple(SeqView(k, s["adapter"], s["arrival"], max(s["pending"], 1), now - s["arrival"] - s["served"],
                              s["out"], generated=s["out"] - s["left"]) for k, s in live.items())
        d = policy.decide(SchedulerState(now, views, merged, limits, cost=cost))
        rows = [(live[k]["adapter"], n) for k, n in d.rows]
        if d.mode != "unmerged" and d.merged_adapter != merged:
            merged, now = d.merged_adapter, now + (per_layer_switch if layer_by_layer else switch)
        seconds = step_time(d.mode, d.merged_adapter, rows)
        cost.observe(d.mode, CostModel.features(d.mode, d.merged_adapter, rows,
                                                positions=limits.positions([n for _, n in rows])), seconds)
        now += seconds
        for k, n in d.rows:
            s = live[k]
            s["served"] += seconds
            s["pending"] = max(0, s["pending"] - n)
            s["left"] -= s["pending"] == 0                      # a token when the prompt is done
            if s["left"] == 0:
                done.append((now - s["arrival"], s["out"], s["adapter"]))
                del live[k]
    cold = [latency for latency, _, adapter in done if adapter != "a0"]
    return {"token_latency": float(np.mean([latency / out for latency, out, _ in done])),
            "cold_p99": float(np.percentile(cold, 99)) if cold else None}


def geomean(values) -> float:
    return float(np.exp(np.mean(np.log(values))))


POLICIES = ("ours", "unmerged", "punica", "dlora", "merged")
"""The systems simulated (policies.SYSTEMS; the static tiles of slora and punica change no decision)."""


def run_system(name: str, trace, step_time: Callable, **kwargs) -> dict:
    """simulate() (with kwargs) under the serving system `name`: its policy and its switch."""
    system = SYSTEMS[name]
    return simulate(system.policy(), trace, step_time, layer_by_layer=system.per_layer_switch, **kwargs)


def _point(kind: str, arrivals: str, popularity: str, rate: float, traces: int, requests: int) -> dict:
    """Every policy on `traces` traces of one workload: geometric means and ratios."""
    runs = {name: [] for name in POLICIES}
    for seed in range(traces):
        trace = make_trace(kind, popularity, rate, requests, seed=seed, arrivals=arrivals)
        for name in POLICIES:
            runs[name].append(run_system(name, trace, STEP_TIMES[kind]))
    latency = {name: np.array([r["token_latency"] for r in v]) for name, v in runs.items()}
    cold = [o["cold_p99"] / u["cold_p99"] for o, u in zip(runs["ours"], runs["unmerged"]) if o["cold_p99"]]
    return {"kind": kind, "arrivals": arrivals, "popularity": popularity, "rate": rate,
            "token_latency_s": {name: geomean(v) for name, v in latency.items()},
            "ours_over": {name: geomean(latency["ours"] / v) for name, v in latency.items() if name != "ours"},
            "cold_p99_ours_over_unmerged": max(cold, default=None)}


def logged_workloads(step_log: dict) -> dict:
    """The workloads of an e2e step log: {(kind, arrival, popularity, rate): {"trace": their requests
    as make_trace's tuples (adapter taskK as aK; a task-head answer, logged with no output token,
    as one), "measured": {policy: mean token latency s}, "decode_steps": {policy: {(mode, decode
    rows, adapters): [seconds of each decode-only step that neither switched nor compiled]}}}}.
    Every policy served the same requests."""
    fields, out = step_log["fields"], {}
    for run in step_log["runs"]:
        requests = [RequestMetrics(**dict(zip(fields["requests"], r))) for r in run["requests"]]
        trace = sorted((m.arrival, "a" + m.adapter.removeprefix("task"), m.prompt_tokens, max(m.output_tokens, 1))
                       for m in requests)
        workload = out.setdefault((run["kind"], run["arrival"], run["popularity"], run["rate"]),
                                  {"trace": trace, "measured": {}, "decode_steps": {}})
        if workload["trace"] != trace:
            raise ValueError(f"the runs of workload {run['kind']}/{run['arrival']}/{run['popularity']}/"
                             f"{run['rate']} served different requests")
        workload["measured"][run["policy"]] = float(np.mean([m.token_latency for m in requests if m.finished]))
        shapes = workload["decode_steps"][run["policy"]] = {}
        for s in (StepMetrics(**dict(zip(fields["steps"], s))) for s in run["steps"]):
            if not (s.prefill_rows or s.switch_time or s.compile_time):
                shapes.setdefault((s.mode, s.decode_rows, s.adapters), []).append(s.compute_time)
    return out


def step_speed(ours: dict, base: dict, min_steps: int = 3) -> float | None:
    """How long ours' steps took over how long the baseline's took at the same shape: the median
    ratio per shape both ran at least `min_steps` times (decode_steps' keys), averaged over ours'
    steps of those shapes; None where they share no such shape."""
    shared = [(len(t), np.median(t) / np.median(base[k])) for k, t in ours.items()
              if len(t) >= min_steps and len(base.get(k, ())) >= min_steps]
    return float(sum(n * r for n, r in shared) / sum(n for n, _ in shared)) if shared else None


def replay(step_log: dict) -> list[dict]:
    """Every policy of POLICIES on each logged workload's requests: [{"kind", "arrival", "popularity",
    "rate", "simulated": {policy: ours' token latency over its}, "measured": {the same on the GPU},
    "step_speed": {policy: ours' steps' time over its at the same shape (step_speed), None where
    they share none}}]."""
    points = []
    for (kind, arrival, popularity, rate), w in sorted(logged_workloads(step_log).items()):
        sim = {name: run_system(name, w["trace"], STEP_TIMES[kind])["token_latency"] for name in POLICIES}
        gpu, steps = w["measured"], w["decode_steps"]
        logged = [n for n in sim if n != "ours" and n in gpu] if "ours" in gpu else []
        points.append({"kind": kind, "arrival": arrival, "popularity": popularity, "rate": rate,
                       "simulated": {n: sim["ours"] / sim[n] for n in sim if n != "ours"},
                       "measured": {n: gpu["ours"] / gpu[n] for n in logged},
                       "step_speed": {n: step_speed(steps["ours"], steps[n]) for n in logged}})
    return points


def replay_table(points: list[dict], command: str) -> str:
    """Per baseline, how well the simulation's ours/baseline follows the GPU's over the workloads, and
    each workload where either has ours behind."""
    lines = ["# The scheduler simulation on the requests e2e served (no device)", "", f"`{command}`", "",
             "Ours' average token latency over each baseline's, simulated (step times from the model in "
             "policy_sim.md; Punica-like's static tile costs nothing here) and measured on the GPU.", "",
             "| ours / | workloads | geomean simulated | geomean measured | correlation of the logs | "
             "the same side of 1 | ours behind: measured / simulated / both |", "|" + " --- |" * 7]
    for base in [n for n in POLICIES if n != "ours"]:
        pairs = np.array([(p["simulated"][base], p["measured"][base]) for p in points if base in p["measured"]])
        if not len(pairs):
            continue
        sim, gpu = pairs[:, 0] > 1, pairs[:, 1] > 1
        spread = len(pairs) > 1 and np.all(np.std(pairs, axis=0) > 0)      # else no correlation to show
        correlation = f"{np.corrcoef(np.log(pairs).T)[0, 1]:.2f}" if spread else "–"
        lines.append(f"| {base} | {len(pairs)} | {geomean(pairs[:, 0]):.3f} | {geomean(pairs[:, 1]):.3f} | "
                     f"{correlation} | {np.mean(sim == gpu):.0%} | {gpu.sum()} / {sim.sum()} / {(sim & gpu).sum()} |")
    lines += ["", "Where either has ours behind, and how long ours' steps took over the baseline's at the same "
              "shape (decode-only steps of the same mode, rows and adapters; the runs follow one another on the "
              "device).", "", "| kind | arrivals | popularity | rate | ours / | simulated | measured | "
              "ours' steps at the same shape |", "|" + " --- |" * 8]
    for p in points:
        for base, measured in p["measured"].items():
            if max(measured, p["simulated"][base]) > 1:
                speed = p["step_speed"][base]
                lines.append(f"| {p['kind']} | {p['arrival']} | {p['popularity']} | {p['rate']:g} | {base} | "
                             f"{p['simulated'][base]:.3f} | {measured:.3f} | "
                             f"{'–' if speed is None else f'{speed:.3f}'} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kinds", default="vqa,video")
    ap.add_argument("--popularity", default="hot80,uniform,zipf1.5,hot50,hot60")
    ap.add_argument("--arrivals", default="poisson,bursty")
    ap.add_argument("--rates", default="2,4,6,10,16")
    ap.add_argument("--traces", type=int, default=6, help="traces per point (geometric means over them)")
    ap.add_argument("--requests", type=int, default=40)
    ap.add_argument("--step-log", help="replay the workloads of this e2e step log instead")
    ap.add_argument("--out", help="default: bench/results/policy_sim (policy_replay with --step-log)")
    args = ap.parse_args(argv)
    command = "python bench/policy_sim.py " + " ".join(argv if argv is not None else sys.argv[1:])
    if args.step_log:
        points = replay(load_step_log(args.step_log))
        save_result(args.out or "bench/results/policy_replay", {"command": command, "points": points},
                    replay_table(points, command))
        return
    grid = itertools.product(args.kinds.split(","), args.arrivals.split(","), args.popularity.split(","),
                             map(float, args.rates.split(",")))
    points = [_point(*workload, args.traces, args.requests) for workload in grid]
    others = [n for n in POLICIES if n != "ours"]
    times = "; ".join(f"{kind} " + ", ".join(f"{m} {1e3 * t.fixed[m]:.1f} ms + {1e6 * t.per_position[m]:.1f} us"
                                            for m in t.fixed) for kind, t in STEP_TIMES.items())
    lines = [f"# Scheduler-only simulation ({args.traces} traces of {args.requests} requests a point; "
             "no device: step times from the model below)", "", f"`{command}`", "",
             f"Step times (+ per prefill position): {times}", "",
             "| kind | arrivals | popularity | rate | " + " | ".join(f"ours / {n}" for n in others)
             + " | worst cold p99, ours / unmerged | ours token latency ms |",
             "|" + " --- |" * (6 + len(others))]
    for p in points:
        cold = p["cold_p99_ours_over_unmerged"]
        lines.append(f"| {p['kind']} | {p['arrivals']} | {p['popularity']} | {p['rate']:g} | "
                     + " | ".join(f"{p['ours_over'][n]:.2f}" for n in others)
                     + f" | {'–' if cold is None else f'{cold:.2f}'} | {1e3 * p['token_latency_s']['ours']:.1f} |")
    steps = {kind: dataclasses.asdict(t) for kind, t in STEP_TIMES.items()}
    save_result(args.out or "bench/results/policy_sim", {"command": command, "step_times": steps, "points": points},
                "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
