"""What e2e step logs (`bench/e2e.py --step-log`) say about where each policy's time went.

Per workload kind and policy, over every run in the logs:
  - the median compute time of a step by mode and shape (decode rows only, or with 1, 2, 3, 4
    prefill rows), how many steps of each, and how far the engine's step-time model (ours': the
    policy's), predicting each step before observing it, was off on them on average (and its
    mean absolute error over all steps);
  - the time spent placing adapters (`load_time`) and merging (`switch_time`: in all, and the
    median switch);
  - the serving loop's time between steps while a request was live (host work outside any step);
  - Python's garbage collections (their total time, and the longest);
  - the longest steps (their whole duration, switch, adapter loads and collections included).
Usage: python bench/e2e_steps.py STEP_LOG... [--out bench/results/e2e_step_times]   (writes .json and .md)
"""

import argparse
import collections
import gzip
import json
from pathlib import Path

import numpy as np


def load_step_log(path: str | Path) -> dict:
    """An e2e step log (.json, or .json.gz as committed)."""
    path = Path(path)
    return json.loads(gzip.decompress(path.read_bytes()) if path.name.endswith(".gz") else path.read_text())


def summarize(logs: list[dict]) -> dict:
    """{"kind/policy": {"shapes": {"mode, shape": [steps, median ms, the model's mean error ms]}, "load_s",
    "switch_s", "switches", "switch_median_ms" (None without a switch), "live_gap_s", "gc_s",
    "gc_longest_ms", "model_abs_error_ms", "runs", "longest": [[ms, mode, decode rows, prefill rows,
    adapters, ms of garbage collection in it (None: not logged)], ...]}}; steps that compiled are
    left out of the shapes and the model's errors (None where the log has no predictions)."""
    out = collections.defaultdict(lambda: {"shapes": collections.defaultdict(list), "load_s": 0.0, "switch_s": 0.0,
                                           "switch_times": [], "live_gap_s": 0.0, "gc_s": None, "gc_longest_ms": 0.0,
                                           "runs": 0, "errors": collections.defaultdict(list), "longest": []})
    for fields, run in ((log["fields"], run) for log in logs for run in log["runs"]):
        entry = out[f"{run['kind']}/{run['policy']}"]
        entry["runs"] += 1
        steps = [dict(zip(fields["steps"], s)) for s in run["steps"]]
        requests = [dict(zip(fields["requests"], r)) for r in run["requests"]]
        pauses = run.get("gc_pauses")              # [clock time, seconds, generation]; None: not logged
        if pauses is not None:
            entry["gc_s"] = (entry["gc_s"] or 0.0) + sum(p[1] for p in pauses)
            entry["gc_longest_ms"] = max([entry["gc_longest_ms"]] + [round(1e3 * p[1], 1) for p in pauses])
        collecting = lambda s: None if pauses is None else round(
            1e3 * sum(p[1] for p in pauses if s["start"] <= p[0] < s["start"] + s["duration"]), 1)
        for s in steps:
            compute = s["duration"] - s["switch_time"] - s.get("load_time", 0.0)
            shape = "decode only" if not s["prefill_rows"] else f"{s['prefill_rows']} prefill rows"
            if not s["compile_time"]:
                entry["shapes"][f"{s['mode']}, {shape}"].append(compute)
                if s.get("predicted_time") is not None:
                    entry["errors"][f"{s['mode']}, {shape}"].append(s["predicted_time"] - compute)
            entry["load_s"] += s.get("load_time", 0.0)
            entry["switch_s"] += s["switch_time"]
            if s["switch_time"]:
                entry["switch_times"].append(s["switch_time"])
            entry["longest"].append([round(1e3 * s["duration"], 1), s["mode"], s["decode_rows"], s["prefill_rows"],
                                     s["adapters"], collecting(s)])
        for a, b in zip(steps, steps[1:]):
            end = a["start"] + a["duration"]
            if any(r["arrival"] <= end and (r["finished"] is None or r["finished"] >= b["start"]) for r in requests):
                entry["live_gap_s"] += max(b["start"] - end, 0.0)
    for entry in out.values():
        errors = entry.pop("errors")
        mean_ms = lambda v: round(1e3 * float(np.mean(v)), 1) if len(v) else None
        entry["shapes"] = {k: [len(v), round(1e3 * float(np.median(v)), 1), mean_ms(errors[k])]
                           for k, v in sorted(entry["shapes"].items())}
        entry["model_abs_error_ms"] = mean_ms(np.abs([e for v in errors.values() for e in v]))
        switches = entry.pop("switch_times")
        entry["switches"] = len(switches)
        entry["switch_median_ms"] = round(1e3 * float(np.median(switches)), 1) if switches else None
        entry["longest"] = sorted(entry["longest"], key=lambda step: step[0], reverse=True)[:3]
    return dict(sorted(out.items()))


def table(summary: dict) -> str:
    lines = ["| kind/policy | runs | step shape: steps x median ms (the model's mean error) | adapter loads s | "
             "switches: s in all (count, median ms) | "
             "loop outside steps, requests live, s | garbage collection s (longest ms) | "
             "step-time model's mean abs error ms | "
             "longest steps ms (mode, decode/prefill rows, adapters, ms collecting garbage) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, e in summary.items():
        shapes = "; ".join(f"{k}: {n} x {ms}" + ("" if err is None else f" (model {err:+})")
                           for k, (n, ms, err) in e["shapes"].items())
        longest = "; ".join(f"{ms} ({m}, {d}/{p}, {a}, {'?' if c is None else c})"
                            for ms, m, d, p, a, c in e["longest"])
        collections_cell = "not logged" if e["gc_s"] is None else f"{e['gc_s']:.2f} ({e['gc_longest_ms']})"
        model_cell = "not logged" if e["model_abs_error_ms"] is None else e["model_abs_error_ms"]
        switches = f"{e['switch_s']:.2f}" + (f" ({e['switches']}, {e['switch_median_ms']})" if e["switches"] else "")
        lines.append(f"| {name} | {e['runs']} | {shapes} | {e['load_s']:.2f} | {switches} | "
                     f"{e['live_gap_s']:.2f} | {collections_cell} | {model_cell} | {longest} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("step_logs", nargs="+", help="e2e step logs (.json, or .json.gz as committed)")
    ap.add_argument("--out", help="write OUT.json and OUT.md")
    args = ap.parse_args(argv)
    logs = [load_step_log(p) for p in args.step_logs]
    summary = summarize(logs)
    measured = "".join(f"Runs measured on {m['device']}, jax {m['jax']}, by:\n\n"
                       + "".join(f"`{command}`  \n" for command in m["commands"]) + "\n"
                       for m in (log.get("meta") for log in logs) if m)
    text = (f"# Where the e2e steps' time went\n\n`python bench/e2e_steps.py {' '.join(args.step_logs)}`\n\n"
            f"{measured}{table(summary)}")
    if args.out:
        Path(args.out).with_suffix(".json").write_text(json.dumps(summary, indent=1))
        Path(args.out).with_suffix(".md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
