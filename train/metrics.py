"""Answer metrics of the task suite: exact match, box IoU (grounding), token F1 (captions).

Every metric maps (prediction text, reference text) to a score in [0, 1]; a task's accuracy is
the mean score over its test examples.
"""

import collections
import re

METRICS = ("exact", "iou", "token_f1")
IOU_THRESHOLD = 0.5
"""A grounding answer counts as correct when its box overlaps the reference box by IoU >= this."""

_NUMBER = r"\s*(-?\d+(?:\.\d+)?)\s*"
_BOX = re.compile(r"\[" + ",".join([_NUMBER] * 4) + r"\]")
_WORD = re.compile(r"[a-z0-9]+")


def normalize(text: str) -> str:
    """Lower case, surrounding white space and a trailing period removed."""
    return text.strip().lower().rstrip(".").strip()


def exact_match(prediction: str, reference: str) -> float:
    """1.0 when the normalised texts are equal, else 0.0."""
    return float(normalize(prediction) == normalize(reference))


def parse_box(text: str) -> tuple[float, float, float, float] | None:
    """The first "[x0,y0,x1,y1]" in text (numbers, any spacing), or None when there is none
    or the box is empty/inverted (x1 <= x0 or y1 <= y0)."""
    m = _BOX.search(text)
    if m is None:
        return None
    x0, y0, x1, y1 = (float(v) for v in m.groups())
    return (x0, y0, x1, y1) if x1 > x0 and y1 > y0 else None


def box_iou(a, b) -> float:
    """Intersection over union of two boxes (x0, y0, x1, y1)."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def iou_score(prediction: str, reference: str) -> float:
    """1.0 when the predicted box overlaps the reference box with IoU >= IOU_THRESHOLD, else 0.0
    (an unparsable prediction scores 0)."""
    p, r = parse_box(prediction), parse_box(reference)
    if r is None:
        raise ValueError(f"reference {reference!r} is not a box [x0,y0,x1,y1]")
    return float(p is not None and box_iou(p, r) >= IOU_THRESHOLD)


def token_f1(prediction: str, reference: str) -> float:
    """F1 of the word multisets (lower-cased alphanumeric runs) of prediction and reference."""
    p, r = _WORD.findall(prediction.lower()), _WORD.findall(reference.lower())
    if not p or not r:
        return float(p == r)
    common = sum((collections.Counter(p) & collections.Counter(r)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(r)
    return 2 * precision * recall / (precision + recall)


def score(metric: str, prediction: str, reference: str) -> float:
    """The named metric of one answer."""
    if metric == "exact":
        return exact_match(prediction, reference)
    if metric == "iou":
        return iou_score(prediction, reference)
    if metric == "token_f1":
        return token_f1(prediction, reference)
    raise ValueError(f"unknown metric {metric!r}; expected one of {METRICS}")
