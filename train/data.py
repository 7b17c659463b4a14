"""grain pipelines: task examples -> padded token batches with image rows, for the dense forward.

One example becomes the chat-formatted sequence the server would see, followed by the answer:

    <bos> <|user|> <image>*(M_i*P) question <|end|> <|assistant|> answer <|end|> <pad>...

Batch fields (B rows, L = Layout.seq_len, M = Layout.max_images, P tokens per image, S image side):
    tokens     [B, L] int32    the sequence, padded with <pad>
    valid      [B, L] bool     real tokens
    loss_mask  [B, L] bool     answer tokens and the closing <|end|> (the loss is taken only there)
    prompt_len [B]    int32    prompt tokens (the last one, <|assistant|>, feeds the task head)
    image_rows [B, L] int32    m*P + p for patch p of the row's image m, -1 for text
    pixels     [B, M, S, S, 3] uint8 images (missing images are zeros); the forward pass
                                normalises them on the device (train.forward.normalize)
    label      [B]    int32    index of the answer in Layout.labels, -1 when not a label
    task       [B]    int32    index of the example's task in Layout.tasks
    weight     [B]    float32  1, or 0 for padding rows of the last evaluation batch
Training batches come from an infinite, per-epoch reshuffled grain.MapDataset: batch `step` is a
pure function of (tasks, seed, step), so resuming at a step needs no iterator state.
"""

import dataclasses
import functools
from typing import Sequence

import grain
import numpy as np

from valora_jax.config import LMMConfig
from valora_jax.tokenizer import ByteTokenizer

from train.tasks import Example, Task

_TOKENIZER = ByteTokenizer()
_PROMPT_SPECIALS = 4     # <bos> <|user|> ... <|end|> <|assistant|>


@dataclasses.dataclass(frozen=True)
class Layout:
    """Static shapes and vocabularies of a pipeline's batches."""

    tasks: tuple[str, ...]
    """Task names; batch field `task` indexes this."""
    seq_len: int
    """L: prompt + answer + <|end|> of the longest possible example, rounded up to 16."""
    max_images: int
    """M: images per example (>= 1 so the vision input never has a zero-size axis)."""
    image_size: int
    tokens_per_image: int
    labels: tuple[str, ...] | None
    """The head's label space: the union of the tasks' label sets in task order, or None
    when some task has no bounded label set."""


def layout_for(tasks: Sequence[Task], config: LMMConfig) -> Layout:
    """The layout that fits every example of `tasks` for a model with `config`."""
    if not tasks:
        raise ValueError("no tasks given")
    p = config.tokens_per_image
    longest = max(_PROMPT_SPECIALS + t.num_images * p + t.max_question_len + t.max_answer_len + 1 for t in tasks)
    seq_len = -(-longest // 16) * 16
    if seq_len > config.text.max_position:
        raise ValueError(f"tasks {[t.name for t in tasks]} need {seq_len} tokens, more than the model's "
                         f"max_position {config.text.max_position}")
    labels = None
    if all(t.labels is not None for t in tasks):
        labels = tuple(dict.fromkeys(label for t in tasks for label in t.labels))
    return Layout(tuple(t.name for t in tasks), seq_len, max(1, max(t.num_images for t in tasks)),
                  config.vision.image_size, p, labels)


def encode(example: Example, task_index: int, layout: Layout) -> dict[str, np.ndarray]:
    """One example as unbatched arrays (see the module docstring for the fields)."""
    n = len(example.images)
    if n > layout.max_images:
        raise ValueError(f"example has {n} images, layout allows {layout.max_images}")
    prompt = _TOKENIZER.expand_image_tokens(_TOKENIZER.prompt_ids(example.question, n), layout.tokens_per_image)
    answer = _TOKENIZER.encode(example.answer) + [_TOKENIZER.end_id]
    ids = prompt + answer
    if len(ids) > layout.seq_len:
        raise ValueError(f"example of {len(ids)} tokens ({example.question!r} -> {example.answer!r}) exceeds "
                         f"seq_len {layout.seq_len}")
    length, prompt_len = len(ids), len(prompt)
    tokens = np.full((layout.seq_len,), _TOKENIZER.pad_id, np.int32)
    tokens[:length] = ids
    positions = np.arange(layout.seq_len)
    is_image = tokens == _TOKENIZER.image_id
    s = layout.image_size
    pixels = np.zeros((layout.max_images, s, s, 3), np.uint8)
    for i, image in enumerate(example.images):
        if image.shape != (s, s, 3) or image.dtype != np.uint8:
            raise ValueError(f"image {i} of {example.question!r} is {image.shape} {image.dtype}, expected "
                             f"({s}, {s}, 3) uint8")
        pixels[i] = image
    label = -1
    if layout.labels is not None and example.answer in layout.labels:
        label = layout.labels.index(example.answer)
    return {
        "tokens": tokens,
        "valid": positions < length,
        "loss_mask": (positions >= prompt_len) & (positions < length),
        "prompt_len": np.int32(prompt_len),
        "image_rows": np.where(is_image, np.cumsum(is_image) - 1, -1).astype(np.int32),
        "pixels": pixels,
        "label": np.int32(label),
        "task": np.int32(task_index),
        "weight": np.float32(1.0),
    }


def _split_index(j: int, k: int) -> tuple[int, int]:
    return j % k, j // k


def _encode_index(pair, tasks: Sequence[Task], layout: Layout, split: str, seed: int, image_size: int):
    t, i = pair
    return encode(tasks[t].example(split, int(i), seed, image_size), int(t), layout)


def train_dataset(tasks: Sequence[Task], layout: Layout, batch_size: int, seed: int = 0,
                  examples_per_task: int = 4096) -> grain.MapDataset:
    """Infinite batches of the tasks' train splits, mixed evenly (example i of every task, in
    turn), globally shuffled with `seed` and reshuffled every epoch; ds[step] is batch `step`."""
    if batch_size < 1 or examples_per_task < 1:
        raise ValueError(f"batch_size {batch_size} and examples_per_task {examples_per_task} must be >= 1")
    k = len(tasks)
    pairs = grain.MapDataset.range(k * examples_per_task).map(functools.partial(_split_index, k=k))
    encode_fn = functools.partial(_encode_index, tasks=list(tasks), layout=layout, split="train", seed=seed,
                                  image_size=layout.image_size)
    return pairs.shuffle(seed).repeat(None).map(encode_fn).batch(batch_size, drop_remainder=True)


def eval_dataset(task: Task, layout: Layout, split: str = "test", n: int = 200, seed: int = 0,
                 batch_size: int = 64) -> grain.MapDataset:
    """Finite batches of the first n examples of a split, in order; the last batch is filled up with
    copies of example 0 of weight 0. Each batch also carries `answer`, the reference texts [B]."""
    size = task.size(split)
    n = n if size is None else min(n, size)
    if n < 1:
        raise ValueError(f"need at least one {split} example of task {task.name!r}, got n={n}")
    t = layout.tasks.index(task.name)
    padded = -(-n // batch_size) * batch_size

    def make(i):
        example = task.example(split, i if i < n else 0, seed, layout.image_size)
        row = encode(example, t, layout)
        row["weight"] = np.float32(i < n)
        row["answer"] = np.asarray(example.answer)
        return row

    return grain.MapDataset.range(padded).map(make).batch(batch_size)
