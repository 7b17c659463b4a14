"""Accuracy of the base model or an adapter on a task split, answering the way the server does:
through the task head when the adapter has one (one forward pass), else by greedy decoding
until a stop token."""

from typing import Mapping, Sequence

import numpy as np

from valora_jax.adapters import Adapter
from valora_jax.config import LMMConfig
from valora_jax.lora import module_shapes
from valora_jax.tokenizer import ByteTokenizer

from train import forward as fwd
from train.data import eval_dataset, layout_for
from train.tasks import Task, get_task

_TOKENIZER = ByteTokenizer()


def adapter_tree(adapter: Adapter) -> tuple[dict, dict, dict | None, tuple[str, ...] | None]:
    """(lora {path: {a, b}}, scales {path: float32}, head {kernel, bias} or None, head labels)
    of a valora Adapter, as training and evaluation take them."""
    lora = {p: {"a": np.asarray(a, np.float32), "b": np.asarray(b, np.float32)} for p, (a, b) in adapter.weights.items()}
    scales = {p: np.float32(s) for p, s in adapter.scales.items()}
    if adapter.head is None:
        return lora, scales, None, None
    head = {"kernel": np.asarray(adapter.head.kernel, np.float32), "bias": np.asarray(adapter.head.bias, np.float32)}
    return lora, scales, head, tuple(adapter.head.labels)


def decode_answer(ids: Sequence[int]) -> str:
    """Text of generated ids up to the first stop id."""
    out = []
    for t in ids:
        if int(t) in _TOKENIZER.stop_ids:
            break
        out.append(int(t))
    return _TOKENIZER.decode(out)


def evaluate(parts: fwd.Parts, config: LMMConfig, task: Task, *, lora=None, scales: Mapping | None = None,
             head=None, labels: Sequence[str] | None = None, params=None, split: str = "test", n: int = 200,
             seed: int = 0, batch_size: int = 64, return_predictions: bool = False):
    """Mean score of `task` on the first n examples of `split` (digits: at most the split's size).

    lora/scales/head/labels: the adapter (None: the base model); params: base params (default
    parts.params). With return_predictions, returns (accuracy, [(prediction, reference), ...])."""
    if (head is None) != (labels is None):
        raise ValueError("a task head needs its labels (and labels need a head)")
    params = parts.params if params is None else params
    layout = layout_for([task], config)
    scores, pairs = [], []
    for batch in eval_dataset(task, layout, split, n, seed, batch_size):
        if head is not None:
            picked = np.asarray(fwd.head_predict(parts, params, lora, scales, head, batch))
            predictions = [labels[i] for i in picked]
        else:
            ids = np.asarray(fwd.greedy_decode(parts, params, lora, scales, batch, task.max_answer_len + 1))
            predictions = [decode_answer(row) for row in ids]
        for pred, ref, w in zip(predictions, batch["answer"], batch["weight"]):
            if w > 0:
                scores.append(task.score(pred, str(ref)))
                pairs.append((pred, str(ref)))
    accuracy = float(np.mean(scores))
    return (accuracy, pairs) if return_predictions else accuracy


def evaluate_adapter(model, adapter: Adapter | None, task: Task | str, *, split: str = "test", n: int = 200,
                     seed: int = 0, batch_size: int = 64, parts: fwd.Parts | None = None,
                     return_predictions: bool = False):
    """Accuracy of `adapter` (None: the base model) on a task split, answered as served (see
    `evaluate` for return_predictions)."""
    task = get_task(task) if isinstance(task, str) else task
    parts = parts or fwd.split_for_training(model)
    if adapter is None:
        return evaluate(parts, model.config, task, split=split, n=n, seed=seed, batch_size=batch_size,
                        return_predictions=return_predictions)
    adapter.validate(model.config, module_shapes(model))
    lora, scales, head, labels = adapter_tree(adapter)
    if head is not None and task.labels is not None and not set(task.labels) <= set(labels):
        raise ValueError(f"adapter {adapter.name!r} has a task head over {list(labels)}, which cannot answer "
                         f"task {task.name!r} (labels {list(task.labels)})")
    if head is not None and task.labels is None:
        raise ValueError(f"adapter {adapter.name!r} answers through a task head; task {task.name!r} has free-form "
                         f"answers")
    return evaluate(parts, model.config, task, lora=lora, scales=scales, head=head, labels=labels, split=split,
                    n=n, seed=seed, batch_size=batch_size, return_predictions=return_predictions)
