"""The embedded default in checkpoints/: the adapters it ships answer the suite's tasks, the base does not."""

import json
from pathlib import Path

import pytest

from train.evaluate import evaluate_adapter
from train.fusion import load_spec
from valora_jax import load_adapter, load_model
from valora_jax.lora import module_shapes

ROOT = Path(__file__).resolve().parents[1]
CHECKPOINTS = ROOT / "checkpoints"


@pytest.fixture(scope="module")
def default():
    model = load_model(CHECKPOINTS / "default")
    tasks = json.loads((CHECKPOINTS / "adapters" / "tasks.json").read_text())
    adapters = {name: load_adapter(CHECKPOINTS / "adapters" / name, model.config, module_shapes(model))
                for name in set(tasks.values())}
    return model, tasks, adapters


def test_every_task_of_the_spec_has_a_shipped_adapter(default):
    _, tasks, _ = default
    spec = load_spec(ROOT / "train" / "default_tasks.json")
    assert sorted(tasks) == sorted(spec.requirement)


@pytest.mark.parametrize("task", ["digits", "counting", "video", "grounding"])
def test_adapter_beats_the_base_on_domain_tasks(default, task):
    """Fresh test examples (another seed than the report's): the adapter clears the task's
    requirement less a small-sample margin, the base stays 24+ points below."""
    model, tasks, adapters = default
    requirement = load_spec(ROOT / "train" / "default_tasks.json").requirement[task]
    adapted = evaluate_adapter(model, adapters[tasks[task]], task, n=48, seed=7, batch_size=48)
    base = evaluate_adapter(model, None, task, n=48, seed=7, batch_size=48)
    assert adapted >= requirement - 0.1, (task, adapted)
    assert adapted - base >= 0.24, (task, adapted, base)
