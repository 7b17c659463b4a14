"""Pretrain the tiny base model and generate the default adapters: what fills checkpoints/.

    python -m train.run_default                      # the full run (GPU: minutes)
    python -m train.run_default --quick --out /tmp/x # a smoke run of every stage (CPU: minutes)

1. `tiny()` with LoRA slots on every target (vision tower, projector, decoder), randomly
   initialised, then every parameter pretrained on the generic corpus (scene captions and
   text-only language: no digits, counting, grounding or clips) -> OUT/default.
2. Accuracy-aware adapter generation for the suite (spec: train/default_tasks.json) ->
   OUT/adapters/<name> (the server's default adapter root) and OUT/adapters/tasks.json
   (task -> adapter name).
3. The report (base vs adapted accuracy per task, requirement, met, #adapters) and the
   pretraining history -> RESULTS/adapter_generation.{json,md}.
Work files (training checkpoints) go to OUT/.work, which ignores itself in git; running the
same command again resumes where a crashed run stopped.

On the GPU machine (no scikit-learn, no grain), with the wheels of grain, array-record and
portpicker and the digits in the git-ignored .whl/ (`bash bench/fetch_wheels.sh`; carried):

    TRAIN_DEADLINE_S=480 bash bench/gpu_session.sh train     # installs them, runs this, packs the outputs

`--deadline-s` stops at the first checkpoint after that many seconds (exit status 3); the
same command continues from there (bring checkpoints/ back and forth between calls; finished
trials keep only their adapter, so it stays small). Measured on the H200 (jax 0.11.2): 2000
pretraining steps of batch 64 take 90 s (val: captions 0.985, language 1.0); an adapter trial
compiles in 8-28 s and runs 15-30 steps/s at batch 128 (fewer the more tasks it mixes); the
whole generation about 22 minutes. The spec's settings come from trials on the H200: digits
alone reached 0.906 val at lr 2e-3 batch 64 (2000 steps), 0.961 at lr 1e-3 or at batch 128;
grounding reached 0.445 in 1000 steps, so it trains 4000.
"""

import argparse
import dataclasses
import json
import os
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

PRETRAIN = dict(steps=2000, batch_size=64, learning_rate=1e-3, warmup_steps=100, weight_decay=0.01,
                examples_per_task=200_000, eval_examples=200, eval_batch_size=100, checkpoint_every=250, log_every=50)
QUICK_PRETRAIN = dict(steps=10, batch_size=8, learning_rate=1e-3, warmup_steps=2, eval_examples=8,
                      eval_batch_size=8, checkpoint_every=5, log_every=5)
QUICK_TASKS = {"digits": 0.0, "counting": 0.0, "color": 0.0}
QUICK_ADAPTER = dict(steps=6, batch_size=8, warmup_steps=2, eval_examples=8, eval_batch_size=8, checkpoint_every=3,
                     log_every=3, examples_per_task=64)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(REPO / "checkpoints"), help="where default/ and adapters/ go")
    ap.add_argument("--results", default=str(REPO / "bench" / "results"), help="where the report goes")
    ap.add_argument("--spec", default=str(Path(__file__).with_name("default_tasks.json")))
    ap.add_argument("--pretrain-steps", type=int)
    ap.add_argument("--adapter-steps", type=int, help="override the spec's training steps")
    ap.add_argument("--digits", help="digits .npz (see train.tasks.export_digits) for machines without scikit-learn")
    ap.add_argument("--quick", action="store_true", help="tiny step counts and three tasks: a smoke run")
    ap.add_argument("--deadline-s", type=float, default=0,
                    help="stop at the first checkpoint after this many seconds (0: never); rerun to continue")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    try:
        _run(args, ("python -m train.run_default " + " ".join(argv if argv is not None else sys.argv[1:])).strip())
    except _Deadline as e:
        print(f"stopped at the deadline after a checkpoint ({e}); run the same command again to continue")
        raise SystemExit(3)


class _Deadline(Exception):
    pass


def _deadline_callback(seconds: float, every: int):
    """callback(step, metrics) raising _Deadline at the first step after `seconds` that was checkpointed."""
    if not seconds:
        return None
    end = time.monotonic() + seconds

    def check(step, metrics):
        if time.monotonic() > end and step % every == 0:
            raise _Deadline(f"step {step}")
    return check


def _run(args, command: str) -> None:
    if args.digits:
        os.environ["VALORA_DIGITS"] = str(Path(args.digits).absolute())

    import jax

    from valora_jax import init_model, load_model, save_model, tiny
    from valora_jax.config import ALL_TARGETS
    from train.fusion import ModelTrainer, generate_adapters, load_spec, parse_spec
    from train.trainer import TrainConfig, pretrain_base

    out, results = Path(args.out), Path(args.results)
    work = out / ".work"
    work.mkdir(parents=True, exist_ok=True)
    (work / ".gitignore").write_text("*\n")
    timings = {}
    start = time.monotonic()
    deadline = lambda: args.deadline_s and max(1e-3, args.deadline_s - (time.monotonic() - start))

    # 1. the base model
    pre_cfg = TrainConfig(**(QUICK_PRETRAIN if args.quick else PRETRAIN))
    if args.pretrain_steps is not None:
        pre_cfg = dataclasses.replace(pre_cfg, steps=args.pretrain_steps)
    done = work / "pretrain_done.json"
    if done.exists() and (out / "default" / "config.json").exists():
        model, pretrain = load_model(out / "default"), json.loads(done.read_text())
        print(f"base model: {out / 'default'} (pretrained earlier)")
    else:
        model = init_model(tiny(targets=ALL_TARGETS), seed=0)
        tic = time.perf_counter()
        result = pretrain_base(model, cfg=pre_cfg, workdir=work / "pretrain", progress=not args.quiet,
                               callback=_deadline_callback(deadline(), pre_cfg.checkpoint_every))
        save_model(out / "default", model)
        pretrain = {"config": dataclasses.asdict(pre_cfg), "seconds": time.perf_counter() - tic,
                    "val_accuracy": result.accuracy, "history": result.history}
        done.write_text(json.dumps(pretrain, indent=2))
    timings["pretrain_s"] = pretrain["seconds"]

    # 2. the adapters
    spec = load_spec(args.spec)
    if args.quick:
        spec = parse_spec({**spec.to_dict(), "tasks": QUICK_TASKS, "train": {**spec.to_dict()["train"], **QUICK_ADAPTER}})
    if args.adapter_steps is not None:
        spec = dataclasses.replace(spec, train=dataclasses.replace(spec.train, steps=args.adapter_steps))
    callback = _deadline_callback(deadline(), spec.train.checkpoint_every)
    report = generate_adapters(spec, work / "fusion", ModelTrainer(model, spec.train, progress=not args.quiet,
                                                                   callback=callback))
    timings["fusion_s"] = report["seconds"]                 # summed over resumed runs
    adapters = out / "adapters"
    for a in report["adapters"]:
        if (adapters / a["name"]).exists():
            shutil.rmtree(adapters / a["name"])
        shutil.copytree(work / "fusion" / a["dir"], adapters / a["name"])
    (adapters / "tasks.json").write_text(json.dumps({r["task"]: r["adapter"] for r in report["tasks"]}, indent=2))

    # 3. the report
    results.mkdir(parents=True, exist_ok=True)
    targets = _targets(report)
    device = jax.devices()[0].device_kind
    full = {**report, "command": command, "device": device, "jax": jax.__version__, "timings": timings,
            "pretrain": pretrain, "targets": targets,
            "base_model": {"name": model.config.name, "base_id": model.config.base_id,
                           "lora_targets": list(model.config.lora.targets)}}
    (results / "adapter_generation.json").write_text(json.dumps(full, indent=2))
    md = (work / "fusion" / "report.md").read_text()
    md += "\n## Targets\n\n| target | measured | met |\n|---|---|---|\n" + "".join(
        f"| {t['target']} | {t['measured']} | {'yes' if t['met'] else 'NO'} |\n" for t in targets)
    md += (f"\nBase model pretrained for {pretrain['config']['steps']} steps "
           f"({pretrain['seconds']:.0f} s); val accuracy on the pretraining corpus: "
           + ", ".join(f"{k} {v:.3f}" for k, v in pretrain["val_accuracy"].items())
           + f". Adapter generation took {timings['fusion_s']:.0f} s on {device}, jax {jax.__version__}.\n\n"
           f"Command: `{command}`\n")
    (results / "adapter_generation.md").write_text(md)
    print(md)


def _targets(report: dict) -> list[dict]:
    """The suite's targets: every requirement met; each domain task >= 24 points over the base;
    digits >= 95% on test; at most half as many adapters as tasks."""
    from train.tasks import get_task

    rows = {r["task"]: r for r in report["tasks"]}
    gains = {t: 100 * (r["adapted_accuracy"] - r["base_accuracy"]) for t, r in rows.items() if get_task(t).domain}
    out = [{"target": "every requirement met", "measured": sum(r["met"] for r in rows.values()),
            "met": report["all_met"]},
           {"target": "domain tasks: adapted - base >= 24 points",
            "measured": {t: round(g, 1) for t, g in gains.items()}, "met": all(g >= 24 for g in gains.values())},
           {"target": f"adapters <= half of one per task ({report['one_per_task']} tasks)",
            "measured": report["num_adapters"], "met": 2 * report["num_adapters"] <= report["one_per_task"]}]
    if "digits" in rows:
        out.insert(2, {"target": "digits test accuracy >= 0.95", "measured": round(rows["digits"]["adapted_accuracy"], 3),
                       "met": rows["digits"]["adapted_accuracy"] >= 0.95})
    return out


if __name__ == "__main__":
    main()
