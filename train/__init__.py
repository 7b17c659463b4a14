"""train: the vision task suite, grain pipelines, LoRA / task-head training and base pretraining,
evaluation, and accuracy-aware adapter generation (greedy fusion with rollback).

Public names are re-exported lazily, so `import train` (done by the CLI) stays cheap:

    TASKS, PRETRAIN_TASKS, Task, Example, get_task          train.tasks
    Layout, layout_for, train_dataset, eval_dataset          train.data
    TrainConfig, TrainResult, train_adapter, pretrain_base   train.trainer
    evaluate, evaluate_adapter                               train.evaluate
    FusionSpec, load_spec, parse_spec, order_tasks,
    generate_adapters, ModelTrainer                          train.fusion
"""

import importlib

_EXPORTS = {
    "train.tasks": ("TASKS", "PRETRAIN_TASKS", "Task", "Example", "get_task"),
    "train.data": ("Layout", "layout_for", "train_dataset", "eval_dataset"),
    "train.trainer": ("TrainConfig", "TrainResult", "train_adapter", "pretrain_base"),
    "train.evaluate": ("evaluate", "evaluate_adapter"),
    "train.fusion": ("FusionSpec", "load_spec", "parse_spec", "order_tasks", "generate_adapters", "ModelTrainer"),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'train' has no attribute {name!r}")
    return getattr(importlib.import_module(_WHERE[name]), name)
