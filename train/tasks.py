"""The vision task suite: real handwritten digits, synthetic scenes and short clips (no downloads).

| task      | input            | question (template)                                  | answer                  | metric   | labels |
|-----------|------------------|------------------------------------------------------|-------------------------|----------|--------|
| digits    | 1 digit image    | Which digit is written in the image? ...              | "7"                     | exact    | 0..9   |
| counting  | 1 scene          | How many objects are in the image? ...               | "4"                     | exact    | 1..5   |
| color     | 1 scene          | What colour is the {shape}?                          | "red"                   | exact    | COLORS |
| shape     | 1 scene          | What shape is the {colour} object?                   | "circle"                | exact    | SHAPES |
| grounding | 1 scene          | Where is the {colour} {shape}? ... [x0,y0,x1,y1] ... | "[2,3,5,6]"             | IoU>=0.5 | -      |
| caption   | 1 scene          | Describe the objects from left to right.             | "a red circle and a ..." | token F1 | -      |
| video     | 6 frames         | In which direction does the object move? ...         | "left"                  | exact    | DIRECTIONS |

Digits are scikit-learn's bundled 8x8 set (1797 images, intensities 0..16), upscaled to the
model's image size by pixel repetition. Scenes are drawn on an 8x8 grid of cells (for the
tiny model one cell is one 8x8 patch): 1-5 non-touching objects, each a coloured circle,
square or triangle filling a box of whole cells; grounding boxes are given in cell units
(0..8). Video clips show one object moving one cell per frame.

Splits are deterministic: example `i` of split `s` under seed `k` is drawn from a generator
seeded by (task, s, k, i), so any example can be rebuilt on its own (random access for
grain). Digits are split by a seeded permutation: 360 test, 180 val, the rest train (train
examples past the first pass are shifted by up to one digit pixel). `PRETRAIN_TASKS`
(generic scene captions and text-only language) are the base model's pretraining corpus;
they are not domain tasks and not in `TASKS`.
"""

import dataclasses
import functools
import os
import zlib
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw

from train import metrics

COLORS = {"red": (220, 50, 50), "green": (60, 180, 75), "blue": (60, 100, 235), "yellow": (230, 210, 50),
          "purple": (150, 70, 200), "cyan": (60, 210, 210)}
SHAPES = ("circle", "square", "triangle")
DIRECTIONS = ("left", "right", "up", "down")
GRID = 8
"""Cells per image side in scenes and clips; grounding boxes are in these units."""
SPLITS = ("train", "val", "test")
VIDEO_FRAMES = 6


@dataclasses.dataclass(frozen=True)
class Example:
    """images: [S, S, 3] uint8 each (placed before the question); answer: the reference text."""

    images: tuple[np.ndarray, ...]
    question: str
    answer: str


@dataclasses.dataclass(frozen=True)
class Task:
    """One task of the suite.

    family: the answer space it belongs to ("number", "attribute", "motion", "box", "text");
    tasks of one family share an output format (used to order tasks for fusion).
    labels: the bounded answer set (None: free-form answers, no task head).
    domain: a domain task, where adaptation must beat the base model clearly.
    max_question_len / max_answer_len: bounds in bytes (byte tokenizer: tokens).
    """

    name: str
    description: str
    prompt: str
    answer_format: str
    metric: str
    family: str
    num_images: int
    max_question_len: int
    max_answer_len: int
    labels: tuple[str, ...] | None
    domain: bool
    make: Callable[[np.random.Generator, int, str, int, int], Example] = dataclasses.field(repr=False)
    """make(rng, image_size, split, seed, index) -> Example."""

    def size(self, split: str) -> int | None:
        """Number of distinct examples in a split (None: unbounded)."""
        _check_split(split)
        if self.name == "digits" and split != "train":
            return len(_digit_split(split, 0))
        return None

    def example(self, split: str, index: int, seed: int = 0, image_size: int = 64) -> Example:
        """Example `index` of `split` (deterministic in (task, split, seed, index))."""
        _check_split(split)
        if image_size % GRID:
            raise ValueError(f"image_size {image_size} is not a multiple of the {GRID}-cell grid")
        size = self.size(split)
        if index < 0 or (size is not None and index >= size):
            raise ValueError(f"example index {index} outside split {split!r} of task {self.name!r} (size {size})")
        rng = np.random.default_rng([zlib.crc32(self.name.encode()), SPLITS.index(split), seed, index])
        return self.make(rng, image_size, split, seed, index)

    def examples(self, split: str, n: int, seed: int = 0, image_size: int = 64) -> list[Example]:
        """The first n examples of a split (fewer when the split is smaller)."""
        size = self.size(split)
        return [self.example(split, i, seed, image_size) for i in range(n if size is None else min(n, size))]

    def score(self, prediction: str, reference: str) -> float:
        return metrics.score(self.metric, prediction, reference)


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")


# digits ------------------------------------------------------------------------------------------
@functools.cache
def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled handwritten digits: images [1797, 8, 8] uint8 (0..255), labels [1797].

    Reads $VALORA_DIGITS (an .npz with `images` and `labels`, see `export_digits`) when set,
    for machines without scikit-learn."""
    path = os.environ.get("VALORA_DIGITS")
    if path:
        with np.load(path) as f:
            return f["images"], f["labels"]
    try:
        from sklearn.datasets import load_digits as _sk_digits
    except ImportError as e:
        raise ValueError("the digits task needs scikit-learn (pip install scikit-learn) or $VALORA_DIGITS") from e
    d = _sk_digits()
    return (d.images * (255 / 16)).round().astype(np.uint8), d.target.astype(np.int64)


def export_digits(path: str) -> None:
    """Write the digits as an .npz usable through $VALORA_DIGITS."""
    images, labels = load_digits()
    np.savez_compressed(path, images=images, labels=labels)


@functools.cache
def _digit_split(split: str, seed: int) -> np.ndarray:
    """Indices of the digits in a split (seeded permutation: 360 test, 180 val, rest train)."""
    perm = np.random.default_rng([zlib.crc32(b"digits"), seed]).permutation(len(load_digits()[1]))
    return {"test": perm[:360], "val": perm[360:540], "train": perm[540:]}[split]


def _make_digit(rng, size, split, seed, index) -> Example:
    images, labels = load_digits()
    ids = _digit_split(split, seed)
    digit = images[ids[index % len(ids)]]
    if index >= len(ids):                      # later passes over train: shift by up to one pixel
        dy, dx = rng.integers(-1, 2, size=2)
        digit = np.roll(np.roll(digit, dy, axis=0), dx, axis=1)
    big = np.kron(digit, np.ones((size // 8, size // 8), np.uint8))
    return Example((np.repeat(big[:, :, None], 3, axis=2),),
                   "Which digit is written in the image? Answer with one digit.", str(labels[ids[index % len(ids)]]))


# scenes ------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Object:
    shape: str
    color: str
    box: tuple[int, int, int, int]     # x0, y0, x1, y1 in cells, x1/y1 exclusive


def _place(rng, n: int, sizes: tuple[int, int], keep_out=()) -> list[tuple[int, int, int, int]]:
    """n non-touching boxes of side lengths in [sizes[0], sizes[1]] cells on the grid."""
    while True:
        boxes = []
        for _ in range(200):
            w, h = rng.integers(sizes[0], sizes[1] + 1, size=2)
            x0, y0 = rng.integers(0, GRID - w + 1), rng.integers(0, GRID - h + 1)
            box = (int(x0), int(y0), int(x0 + w), int(y0 + h))
            if all(_apart(box, b) for b in (*boxes, *keep_out)):
                boxes.append(box)
                if len(boxes) == n:
                    return boxes
        # a rare dead end: start over with fresh draws from the same generator


def _apart(a, b) -> bool:
    """Boxes that neither overlap nor touch (one empty cell row/column between them)."""
    return a[2] < b[0] or b[2] < a[0] or a[3] < b[1] or b[3] < a[1]


def _draw(objects, size: int, background: int) -> np.ndarray:
    """The scene as [size, size, 3] uint8."""
    img = Image.new("RGB", (size, size), (background,) * 3)
    draw = ImageDraw.Draw(img)
    cell = size // GRID
    for o in objects:
        x0, y0, x1, y1 = (v * cell for v in o.box)
        x1, y1 = x1 - 1, y1 - 1
        fill = COLORS[o.color]
        if o.shape == "square":
            draw.rectangle((x0, y0, x1, y1), fill=fill)
        elif o.shape == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=fill)
        else:
            draw.polygon(((x0 + x1) / 2, y0, x1, y1, x0, y1), fill=fill)
    return np.asarray(img)


def _scene(rng, n: int, sizes=(1, 3), distinct: str | None = None) -> list[_Object]:
    """n objects; distinct="shape"/"color"/"both" makes that attribute unique per object."""
    shapes = list(rng.permutation(SHAPES)) if distinct == "shape" else [SHAPES[i] for i in rng.integers(0, 3, n)]
    colors = (list(rng.permutation(list(COLORS))) if distinct == "color"
              else [list(COLORS)[i] for i in rng.integers(0, len(COLORS), n)])
    if distinct == "both":
        pairs = [(s, c) for s in SHAPES for c in COLORS]
        picked = rng.choice(len(pairs), size=n, replace=False)
        shapes, colors = [pairs[i][0] for i in picked], [pairs[i][1] for i in picked]
    return [_Object(shapes[i], colors[i], b) for i, b in enumerate(_place(rng, n, sizes))]


def _image(rng, objects, size) -> np.ndarray:
    return _draw(objects, size, int(rng.integers(0, 48)))


def _listing(objects) -> str:
    """'a red circle', 'a red circle and a blue square', 'a, b and c'."""
    names = [f"a {o.color} {o.shape}" for o in objects]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def _make_counting(rng, size, *_) -> Example:
    objects = _scene(rng, int(rng.integers(1, 6)), sizes=(1, 2))
    return Example((_image(rng, objects, size),), "How many objects are in the image? Answer with a number.",
                   str(len(objects)))


def _make_color(rng, size, *_) -> Example:
    objects = _scene(rng, int(rng.integers(1, 4)), distinct="shape")
    o = objects[rng.integers(len(objects))]
    return Example((_image(rng, objects, size),), f"What colour is the {o.shape}?", o.color)


def _make_shape(rng, size, *_) -> Example:
    objects = _scene(rng, int(rng.integers(1, 4)), distinct="color")
    o = objects[rng.integers(len(objects))]
    return Example((_image(rng, objects, size),), f"What shape is the {o.color} object?", o.shape)


def _make_grounding(rng, size, *_) -> Example:
    objects = _scene(rng, int(rng.integers(1, 4)), sizes=(1, 4), distinct="both")
    o = objects[rng.integers(len(objects))]
    question = f"Where is the {o.color} {o.shape}? Answer with its box [x0,y0,x1,y1] in grid cells 0-8."
    return Example((_image(rng, objects, size),), question, "[{},{},{},{}]".format(*o.box))


def _make_caption(rng, size, *_) -> Example:
    objects = _scene(rng, int(rng.integers(1, 4)))
    ordered = sorted(objects, key=lambda o: (o.box[0], o.box[1]))
    return Example((_image(rng, objects, size),), "Describe the objects from left to right.", _listing(ordered))


def _make_video(rng, size, *_) -> Example:
    """One object moving one cell per frame; start chosen so that the whole path stays on the grid."""
    direction = DIRECTIONS[rng.integers(4)]
    side = int(rng.integers(1, 3))
    travel = VIDEO_FRAMES - 1
    dx, dy = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}[direction]
    lo_x, hi_x = (travel, GRID - side) if dx < 0 else (0, GRID - side - travel) if dx > 0 else (0, GRID - side)
    lo_y, hi_y = (travel, GRID - side) if dy < 0 else (0, GRID - side - travel) if dy > 0 else (0, GRID - side)
    x, y = int(rng.integers(lo_x, hi_x + 1)), int(rng.integers(lo_y, hi_y + 1))
    shape, color = SHAPES[rng.integers(3)], list(COLORS)[rng.integers(len(COLORS))]
    background = int(rng.integers(0, 48))
    frames = tuple(_draw([_Object(shape, color, (x + t * dx, y + t * dy, x + t * dx + side, y + t * dy + side))],
                         size, background) for t in range(VIDEO_FRAMES))
    return Example(frames, "In which direction does the object move? Answer left, right, up or down.", direction)


# pretraining corpus ------------------------------------------------------------------------------
_CAPTION_PROMPTS = ("Describe the image.", "What is in this picture?", "Caption this image.")
_WORDS = ("the", "a", "cat", "dog", "sun", "tree", "house", "river", "book", "light", "stone", "bird", "road",
          "small", "big", "old", "new", "red", "blue", "green", "circle", "square", "triangle", "image")


def _make_scene_caption(rng, size, *_) -> Example:
    objects = _scene(rng, int(rng.integers(1, 5)), sizes=(1, 3))
    shuffled = [objects[i] for i in rng.permutation(len(objects))]
    return Example((_image(rng, objects, size),), _CAPTION_PROMPTS[rng.integers(3)],
                   f"the image shows {_listing(shuffled)}.")


def _make_language(rng, size, *_) -> Example:
    if rng.integers(2):
        words = " ".join(_WORDS[i] for i in rng.integers(0, len(_WORDS), int(rng.integers(1, 5))))
        return Example((), f"Repeat after me: {words}", words)
    n = int(rng.integers(0, 20))
    return Example((), f"What number comes after {n}?", str(n + 1))


def _task(name, description, prompt, answer_format, metric, family, num_images, max_q, max_a, labels, domain, make):
    return Task(name, description, prompt, answer_format, metric, family, num_images, max_q, max_a,
                None if labels is None else tuple(labels), domain, make)


TASKS: dict[str, Task] = {t.name: t for t in (
    _task("digits", "recognise a handwritten digit (scikit-learn digits)",
          "Which digit is written in the image? Answer with one digit.", "one digit 0-9", "exact", "number", 1,
          64, 1, map(str, range(10)), True, _make_digit),
    _task("counting", "count the objects in a scene", "How many objects are in the image? Answer with a number.",
          "a number 1-5", "exact", "number", 1, 64, 1, map(str, range(1, 6)), True, _make_counting),
    _task("color", "name the colour of the object of a given shape", "What colour is the {shape}?",
          "a colour name", "exact", "attribute", 1, 32, 6, COLORS, False, _make_color),
    _task("shape", "name the shape of the object of a given colour", "What shape is the {colour} object?",
          "a shape name", "exact", "attribute", 1, 40, 8, SHAPES, False, _make_shape),
    _task("grounding", "locate an object, answering its box in grid cells",
          "Where is the {colour} {shape}? Answer with its box [x0,y0,x1,y1] in grid cells 0-8.",
          "[x0,y0,x1,y1], integers 0-8 (cells of the 8x8 grid), scored by IoU >= 0.5", "iou", "box", 1,
          96, 9, None, True, _make_grounding),
    _task("caption", "list the objects from left to right", "Describe the objects from left to right.",
          "'a <colour> <shape>, ... and a <colour> <shape>', left to right; scored by word-level token F1",
          "token_f1", "text", 1, 48, 64, None, False, _make_caption),
    _task("video", "direction of a moving object in a 6-frame clip",
          "In which direction does the object move? Answer left, right, up or down.", "left/right/up/down",
          "exact", "motion", VIDEO_FRAMES, 80, 5, DIRECTIONS, True, _make_video),
)}
PRETRAIN_TASKS: dict[str, Task] = {t.name: t for t in (
    _task("scene_caption", "generic scene captions (pretraining)", "Describe the image.",
          "'the image shows a <colour> <shape> and ...'", "token_f1", "text", 1, 32, 96, None, False,
          _make_scene_caption),
    _task("language", "text-only language (pretraining)", "Repeat after me: ... / What number comes after n?",
          "text", "exact", "text", 0, 64, 40, None, False, _make_language),
)}


def get_task(name: str) -> Task:
    """A task of the suite (or of the pretraining corpus) by name."""
    task = TASKS.get(name) or PRETRAIN_TASKS.get(name)
    if task is None:
        raise ValueError(f"unknown task {name!r}; known: {sorted(TASKS)} (pretraining: {sorted(PRETRAIN_TASKS)})")
    return task
