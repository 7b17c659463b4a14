"""Accuracy-aware adapter generation: pack tasks into as few adapters as their requirements allow.

Greedy packing with rollback (V-LoRA's knowledge fusion), over the tasks in `order_tasks` order:

    current = None
    for task in order:
        if current is not None:
            candidate = fine-tune current's adapter on current.tasks + [task]
            if every packed task meets its requirement on val: current = candidate; continue
            close current (roll back to it: the candidate is dropped)
        current = a fresh adapter trained on [task] alone
        if task misses its requirement alone: error (strict) or close it at once, reported unmet
    close current

Requirements are checked on the val split; the report gives base and adapted accuracy on the
test split. Everything lives under `out/`: `state.json` (progress, rewritten atomically after
every decision), `work/` (training runs with their checkpoints), `adapters/<name>/` (finished
adapters), `report.json` and `report.md`. Running again on the same `out/` resumes where the last
run stopped: finished adapters are kept and an interrupted training run continues from its
last checkpoint.

The training itself is behind the small `Trainer` interface (`ModelTrainer` trains a real
model; tests use a stub).
"""

import dataclasses
import json
import os
import shutil
import time
from pathlib import Path
from typing import Protocol, Sequence

from valora_jax.checkpoint import load_adapter, save_adapter
from valora_jax.lora import module_shapes

from train import forward as fwd
from train.evaluate import evaluate, evaluate_adapter
from train.tasks import TASKS, get_task
from train.trainer import TrainConfig, train_adapter

ORDERS = ("grouped", "given")
FAMILY_ORDER = ("number", "attribute", "motion", "box", "text")
"""Family rank in the grouped order (see `order_tasks`)."""
STATE_FORMAT = 1


@dataclasses.dataclass(frozen=True)
class FusionSpec:
    """What to generate: tasks with accuracy requirements, and how."""

    requirements: tuple[tuple[str, float], ...]
    """(task name, minimum accuracy in [0, 1]) in the spec's order."""
    order: str = "grouped"
    """"grouped" (order_tasks) or "given" (the spec's order)."""
    strict: bool = True
    """An unreachable requirement is an error; False: the task gets an adapter of its own, reported unmet."""
    prefix: str = "adapter"
    """Adapters are named prefix0, prefix1, ..."""
    train: TrainConfig = TrainConfig()
    steps: tuple[tuple[str, int], ...] = ()
    """(task name, training steps) for tasks that need other than train.steps; a training run
    trains for the most steps any of its tasks asks for."""

    def __post_init__(self):
        names = [t for t, _ in self.requirements]
        if not names:
            raise ValueError("the spec lists no tasks")
        for name, req in self.requirements:
            if name not in TASKS:
                raise ValueError(f"unknown task {name!r} in spec; known: {sorted(TASKS)}")
            if not 0.0 <= req <= 1.0:
                raise ValueError(f"task {name!r}: requirement {req!r} outside [0, 1]")
        if len(set(names)) != len(names):
            raise ValueError(f"tasks listed twice in spec: {names}")
        if self.order not in ORDERS:
            raise ValueError(f"unknown order {self.order!r}; expected one of {ORDERS}")
        for name, steps in self.steps:
            if name not in names:
                raise ValueError(f"steps given for {name!r}, which the spec does not list")
            if not isinstance(steps, int) or steps < 1:
                raise ValueError(f"task {name!r}: steps {steps!r} must be a positive integer")

    @property
    def requirement(self) -> dict[str, float]:
        return dict(self.requirements)

    def steps_for(self, tasks: Sequence[str]) -> int:
        """Training steps of a run on `tasks`."""
        steps = dict(self.steps)
        return max(steps.get(t, self.train.steps) for t in tasks)

    def to_dict(self) -> dict:
        steps = dict(self.steps)
        tasks = [{"task": t, "requirement": r, **({"steps": steps[t]} if t in steps else {})}
                 for t, r in self.requirements]
        return {"tasks": tasks, "order": self.order,
                "strict": self.strict, "prefix": self.prefix, "train": dataclasses.asdict(self.train)}


def parse_spec(data: dict) -> FusionSpec:
    """A spec from JSON data:
    {"tasks": [{"task": "digits", "requirement": 0.95, "steps": 4000 (optional)}, ...] (or {"digits": 0.95, ...}),
     "order": "grouped", "strict": true, "prefix": "adapter", "train": {TrainConfig fields}}."""
    if not isinstance(data, dict) or "tasks" not in data:
        raise ValueError(f"spec must be an object with a 'tasks' entry, got {data!r}")
    unknown = sorted(set(data) - {"tasks", "order", "strict", "prefix", "train"})
    if unknown:
        raise ValueError(f"unknown spec entries {unknown}")
    tasks = data["tasks"]
    try:
        if isinstance(tasks, dict):
            reqs, steps = tuple((str(k), float(v)) for k, v in tasks.items()), ()
        else:
            reqs = tuple((str(t["task"]), float(t["requirement"])) for t in tasks)
            steps = tuple((str(t["task"]), t["steps"]) for t in tasks if "steps" in t)
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"spec 'tasks' must map task names to requirements, got {tasks!r} ({e})") from e
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    train = data.get("train", {})
    bad = sorted(set(train) - fields)
    if bad:
        raise ValueError(f"unknown training settings {bad} in spec; known: {sorted(fields)}")
    return FusionSpec(reqs, data.get("order", "grouped"), bool(data.get("strict", True)),
                      str(data.get("prefix", "adapter")), TrainConfig(**train), steps)


def load_spec(path) -> FusionSpec:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read spec {path}: {e}") from e
    return parse_spec(data)


def order_tasks(names: Sequence[str]) -> list[str]:
    """The packing order: tasks grouped by answer family, stable within a family.

    Why: greedy packing only ever tries to add a task to the *current* adapter, so the order
    decides which tasks get the chance to share one. (1) Tasks of one family share an output
    format and label space (digits and counting answer a number, colour and shape an
    attribute word): fused, the adapter learns one output mapping, which interferes least.
    (2) Bounded-label families (number, attribute, motion) come before free-form ones (box,
    text): an adapter whose tasks all have label sets gets a task head and answers in one
    forward pass, and a free-form task packed into it would cost that head. (3) Among them,
    still-image tasks before the 6-frame clips (the most different input), and grounding's
    structured coordinates before free text.
    """
    unknown = [n for n in names if n not in TASKS]
    if unknown:
        raise ValueError(f"unknown tasks {unknown}; known: {sorted(TASKS)}")
    return sorted(names, key=lambda n: (FAMILY_ORDER.index(TASKS[n].family), list(names).index(n)))


class Trainer(Protocol):
    """What fusion needs from training."""

    def base_accuracy(self, task: str, split: str) -> float:
        """Accuracy of the base model (no adapter)."""

    def train(self, tasks: Sequence[str], init: Path | None, out: Path, name: str, workdir: Path,
              steps: int) -> dict[str, float]:
        """Train an adapter named `name` on the union of `tasks` for `steps` steps (starting from the
        adapter saved at `init`, or fresh), save it at `out`, return its val accuracy per task. A
        call with the workdir of an interrupted call resumes it."""

    def accuracy(self, adapter: Path, task: str, split: str) -> float:
        """Accuracy of the adapter saved at `adapter`."""


def _write_json(path: Path, data) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


def _load_state(out: Path, spec: FusionSpec) -> dict:
    path = out / "state.json"
    if not path.exists():
        names = [t for t, _ in spec.requirements]
        order = order_tasks(names) if spec.order == "grouped" else names
        return {"format": STATE_FORMAT, "spec": spec.to_dict(), "order": order, "position": 0, "base": {},
                "adapters": [], "current": None, "log": []}
    try:
        state = json.loads(path.read_text())
        assert state["format"] == STATE_FORMAT and isinstance(state["adapters"], list)
    except (OSError, ValueError, KeyError, TypeError, AssertionError) as e:
        raise ValueError(f"{path}: corrupt fusion state ({e!r}); remove {out} to start over") from e
    if state["spec"] != spec.to_dict():
        raise ValueError(f"{out} holds a run of another spec; use a fresh --out or the same spec")
    return state


def generate_adapters(spec: FusionSpec, out, trainer: Trainer, log=print) -> dict:
    """Run (or resume) greedy fusion with rollback into `out`; returns the report (also written as
    out/report.json and out/report.md). Raises ValueError for an unreachable requirement (strict)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state = _load_state(out, spec)
    req = spec.requirement
    seconds, start = state.get("seconds", 0.0), time.monotonic()

    def save(finished_run: Path | None = None):
        state["seconds"] = seconds + time.monotonic() - start      # over every resumed run
        _write_json(out / "state.json", state)
        if finished_run is not None:            # its training checkpoints only served resuming it
            shutil.rmtree(finished_run / "train", ignore_errors=True)

    save()
    log(f"fusion order: {state['order']}")
    while state["position"] < len(state["order"]):
        i, task = state["position"], state["order"][state["position"]]
        name = f"{spec.prefix}{len(state['adapters'])}"
        cur = state["current"]
        if cur is not None:
            tasks = cur["tasks"] + [task]
            run = out / "work" / f"{i:02d}-{name}-union"
            acc = trainer.train(tasks, out / cur["dir"], run / "adapter", name, run / "train", spec.steps_for(tasks))
            failing = {t: acc[t] for t in tasks if acc[t] < req[t]}
            if not failing:
                state["current"] = {"name": name, "tasks": tasks, "val": acc, "dir": str(run.relative_to(out) / "adapter")}
                state["log"].append({"task": task, "action": "packed", "adapter": name, "val": acc})
                state["position"] += 1
                save(run)
                log(f"packed {task} into {name}: {acc}")
                continue
            state["log"].append({"task": task, "action": "rollback", "adapter": name, "below": failing})
            log(f"rollback: adding {task} to {name} drops {failing} below requirement")
            _close(out, state)
            save(run)
            continue
        run = out / "work" / f"{i:02d}-{name}-alone"
        acc = trainer.train([task], None, run / "adapter", name, run / "train", spec.steps_for([task]))
        state["current"] = {"name": name, "tasks": [task], "val": acc, "dir": str(run.relative_to(out) / "adapter")}
        if acc[task] < req[task]:
            if spec.strict:
                state["current"] = None
                save()
                raise ValueError(f"task {task!r}: requirement {req[task]:.3f} unreachable, reached {acc[task]:.3f} "
                                 f"(val) with an adapter of its own after {spec.steps_for([task])} steps")
            state["log"].append({"task": task, "action": "unmet", "adapter": name, "val": acc})
            state["position"] += 1
            _close(out, state)
        else:
            state["log"].append({"task": task, "action": "new", "adapter": name, "val": acc})
            state["position"] += 1
        save(run)
        log(f"new adapter {name} for {task}: {acc}")
    if state["current"] is not None:
        _close(out, state)
        save()
    report = _report(out, spec, state, trainer)
    _write_json(out / "report.json", report)
    (out / "report.md").write_text(report_markdown(report))
    return report


def _close(out: Path, state: dict) -> None:
    """Finish the current adapter: move it to out/adapters/<name>."""
    cur = state["current"]
    final = out / "adapters" / cur["name"]
    if final.exists():
        shutil.rmtree(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(out / cur["dir"], final)
    state["adapters"].append({"name": cur["name"], "tasks": cur["tasks"], "val": cur["val"],
                              "dir": str(final.relative_to(out))})
    state["current"] = None


def _report(out: Path, spec: FusionSpec, state: dict, trainer: Trainer) -> dict:
    req = spec.requirement
    rows = []
    for adapter in state["adapters"]:
        for task in adapter["tasks"]:
            if task not in state["base"]:
                state["base"][task] = trainer.base_accuracy(task, "test")
                _write_json(out / "state.json", state)
            adapted = trainer.accuracy(out / adapter["dir"], task, "test")
            rows.append({"task": task, "adapter": adapter["name"], "base_accuracy": state["base"][task],
                         "adapted_accuracy": adapted, "val_accuracy": adapter["val"][task],
                         "requirement": req[task], "met": adapted >= req[task],
                         "head": spec.train.head and all(get_task(t).labels is not None for t in adapter["tasks"])})
    order = {t: i for i, t in enumerate(state["order"])}
    rows.sort(key=lambda r: order[r["task"]])
    return {"tasks": rows, "adapters": [{"name": a["name"], "tasks": a["tasks"], "dir": a["dir"]}
                                        for a in state["adapters"]],
            "num_adapters": len(state["adapters"]), "one_per_task": len(rows), "order": state["order"],
            "order_rule": spec.order, "log": state["log"], "all_met": all(r["met"] for r in rows),
            "seconds": state.get("seconds", 0.0),
            "split": "test (requirements checked on val while packing)", "train": spec.to_dict()["train"]}


def report_markdown(report: dict) -> str:
    """The report as a markdown table with a summary line."""
    lines = ["# Adapter generation report", "",
             f"{report['num_adapters']} adapters for {report['one_per_task']} tasks (one per task would be "
             f"{report['one_per_task']}); every requirement met: {'yes' if report['all_met'] else 'NO'}.",
             f"Order ({report['order_rule']}): {', '.join(report['order'])}. Accuracies on the test split; "
             "requirements were checked on the val split while packing.", "",
             "| task | adapter | head | base acc. | adapted acc. | gain (points) | requirement | met |",
             "|---|---|---|---|---|---|---|---|"]
    for r in report["tasks"]:
        gain = 100 * (r["adapted_accuracy"] - r["base_accuracy"])
        lines.append(f"| {r['task']} | {r['adapter']} | {'yes' if r['head'] else 'no'} | {r['base_accuracy']:.3f} "
                     f"| {r['adapted_accuracy']:.3f} | {gain:+.1f} | {r['requirement']:.3f} | "
                     f"{'yes' if r['met'] else 'NO'} |")
    lines += ["", "Packing log:", ""]
    for e in report["log"]:
        detail = e.get("below") or e.get("val")
        lines.append(f"- {e['task']}: {e['action']} ({e['adapter']}) {json.dumps(detail)}")
    return "\n".join(lines) + "\n"


class ModelTrainer:
    """`Trainer` on a real model: train_adapter + save_adapter, evaluation on the task suite.
    callback(step, metrics) is passed to every training run."""

    def __init__(self, model, cfg: TrainConfig, progress: bool = True, callback=None):
        self.model, self.cfg, self.progress, self.callback = model, cfg, progress, callback
        self.parts = fwd.split_for_training(model)

    def base_accuracy(self, task: str, split: str) -> float:
        return evaluate(self.parts, self.model.config, get_task(task), split=split, n=self.cfg.eval_examples,
                        seed=self.cfg.seed, batch_size=self.cfg.eval_batch_size)

    def train(self, tasks, init, out, name, workdir, steps):
        config = self.model.config
        start = None if init is None else load_adapter(init, config, module_shapes(self.model))
        cfg = dataclasses.replace(self.cfg, steps=steps)
        result = train_adapter(self.model, tasks, cfg, workdir=workdir, init=start, progress=self.progress,
                               callback=self.callback)
        save_adapter(out, result.to_adapter(name, config.base_id))
        return result.accuracy

    def accuracy(self, adapter, task, split):
        loaded = load_adapter(adapter, self.model.config, module_shapes(self.model))
        return evaluate_adapter(self.model, loaded, task, split=split, n=self.cfg.eval_examples, seed=self.cfg.seed,
                                batch_size=self.cfg.eval_batch_size, parts=self.parts)
