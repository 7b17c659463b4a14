"""LoRA adapters on the host and the device adapter pool.

An `Adapter` holds, for each targeted module path (e.g. "decoder.layers.0.q_proj"),
`A [D_in, r]`, `B [r, D_out]` and its scale. The `AdapterPool` keeps a host store of any
number of adapters and places them into the model's `max_loras` device slots on demand,
evicting the least recently used unpinned adapter.
"""

import collections
import dataclasses
from typing import Callable, Iterable, Mapping

import numpy as np

from valora_jax.config import LMMConfig


def target_of(path: str) -> str:
    """Target-module name of a module path: decoder.layers.3.q_proj -> q_proj,
    vision_tower.layers.0.fc1 -> vision.fc1, projector.linear_1 -> projector.linear_1."""
    parts = path.split(".")
    if parts[0] == "decoder":
        return parts[-1]
    if parts[0] == "vision_tower":
        return f"vision.{parts[-1]}"
    return path


@dataclasses.dataclass(frozen=True)
class TaskHead:
    """A bounded-label head on the last hidden state: logits = h @ kernel + bias.

    kernel [D, num_labels], bias [num_labels]; labels name the classes."""

    kernel: np.ndarray
    bias: np.ndarray
    labels: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Adapter:
    """One LoRA adapter.

    name: identifier requests use; base_id: the LMMConfig.base_id it was trained for;
    weights: module path -> (A [D_in, r], B [r, D_out]); scales: module path -> alpha/r
    (or whatever scaling the adapter was trained with); alpha: the nominal alpha.
    """

    name: str
    base_id: str
    weights: Mapping[str, tuple[np.ndarray, np.ndarray]]
    scales: Mapping[str, float]
    alpha: float
    head: TaskHead | None = None

    @property
    def targets(self) -> tuple[str, ...]:
        return tuple(sorted({target_of(p) for p in self.weights}))

    @property
    def rank(self) -> int:
        return max(a.shape[1] for a, _ in self.weights.values())

    def validate(self, config: LMMConfig, module_shapes: Mapping[str, tuple[int, int]]) -> None:
        """Raise ValueError naming the first mismatch with the model (base id, modules, shapes, rank)."""
        if not self.name:
            raise ValueError("adapter name must be non-empty")
        if self.base_id != config.base_id:
            raise ValueError(f"adapter {self.name!r} was made for base model {self.base_id!r}, "
                             f"this model is {config.base_id!r}")
        if not self.weights:
            raise ValueError(f"adapter {self.name!r} has no weights")
        for path, (a, b) in self.weights.items():
            if path not in module_shapes:
                raise ValueError(f"adapter {self.name!r} targets module {path!r} (target "
                                 f"{target_of(path)!r}), which carries no LoRA slots in this model; "
                                 f"targets: {list(config.lora.targets)}")
            d_in, d_out = module_shapes[path]
            if a.ndim != 2 or b.ndim != 2 or a.shape[0] != d_in or b.shape[1] != d_out or a.shape[1] != b.shape[0]:
                raise ValueError(f"adapter {self.name!r} module {path!r}: A {a.shape} / B {b.shape} do not fit "
                                 f"[{d_in}, r] / [r, {d_out}]")
            if not 1 <= a.shape[1] <= config.lora.max_rank:
                raise ValueError(f"adapter {self.name!r} module {path!r}: rank {a.shape[1]} outside "
                                 f"1..max_rank={config.lora.max_rank}")
            if path not in self.scales:
                raise ValueError(f"adapter {self.name!r} module {path!r} has no scale")
        if self.head is not None and self.head.kernel.shape != (config.text.hidden_size, len(self.head.labels)):
            raise ValueError(f"adapter {self.name!r} task head kernel {self.head.kernel.shape} does not fit "
                             f"[{config.text.hidden_size}, {len(self.head.labels)}]")


def make_adapter(name: str, base_id: str, weights: Mapping[str, tuple[np.ndarray, np.ndarray]],
                 alpha: float, head: TaskHead | None = None) -> Adapter:
    """An adapter with the usual scaling alpha / r per module."""
    weights = {p: (np.asarray(a), np.asarray(b)) for p, (a, b) in weights.items()}
    return Adapter(name, base_id, weights, {p: alpha / a.shape[1] for p, (a, _) in weights.items()}, alpha, head)


def random_adapter(config: LMMConfig, module_shapes: Mapping[str, tuple[int, int]], name: str, rank: int,
                   seed: int, alpha: float | None = None, std: float = 0.05) -> Adapter:
    """An adapter with random A and B on every slot-carrying module (tests, benchmarks)."""
    rng = np.random.default_rng(seed)
    dtype = np.float32
    weights = {p: ((std * rng.standard_normal((i, rank))).astype(dtype),
                   (std * rng.standard_normal((rank, o))).astype(dtype))
               for p, (i, o) in module_shapes.items()}
    return make_adapter(name, config.base_id, weights, float(alpha if alpha is not None else 2 * rank))


class PoolFull(RuntimeError):
    """Every device slot holds a pinned or needed adapter; nothing was changed."""


class AdapterPool:
    """Host store of adapters + assignment of resident adapters to device slots (LRU, pinning).

    `write_slot(slot, adapter | None)` is the device write (the runner's); the pool calls it
    when an adapter must become resident, or with None to clear a slot.
    """

    def __init__(self, config: LMMConfig, module_shapes: Mapping[str, tuple[int, int]],
                 write_slot: Callable[[int, Adapter | None], None]):
        self.config, self.module_shapes, self._write_slot = config, dict(module_shapes), write_slot
        self.store: dict[str, Adapter] = {}
        self.versions: dict[str, int] = {}
        self._slots: list[tuple[str, int] | None] = [None] * config.lora.max_loras   # (name, version)
        self._lru: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._pinned: collections.Counter[str] = collections.Counter()

    # host store ---------------------------------------------------------------------------
    def register(self, adapter: Adapter) -> int:
        """Validate and store an adapter (replacing one of the same name); returns its version."""
        adapter.validate(self.config, self.module_shapes)
        self.store[adapter.name] = adapter
        self.versions[adapter.name] = self.versions.get(adapter.name, 0) + 1
        return self.versions[adapter.name]

    def unregister(self, name: str) -> None:
        self._require(name)
        if self._pinned[name]:
            raise ValueError(f"adapter {name!r} is pinned (in use) and cannot be removed")
        slot = self.slot_of(name)
        if slot is not None:
            self._slots[slot] = None
            self._lru.pop(name, None)
            self._write_slot(slot, None)
        del self.store[name]

    def _require(self, name: str) -> Adapter:
        if name not in self.store:
            raise ValueError(f"unknown adapter {name!r}; known: {sorted(self.store)}")
        return self.store[name]

    # device slots -------------------------------------------------------------------------
    def slot_of(self, name: str) -> int | None:
        """The slot holding the current version of `name`, or None."""
        key = (name, self.versions.get(name))
        return self._slots.index(key) if key in self._slots else None

    @property
    def resident(self) -> dict[str, int]:
        return {entry[0]: i for i, entry in enumerate(self._slots)
                if entry is not None and entry[1] == self.versions.get(entry[0])}

    def acquire(self, names: Iterable[str | None]) -> dict[str, int]:
        """Make every named adapter resident; returns name -> slot (None names are skipped).

        Raises ValueError for unknown names and PoolFull when the adapters do not fit
        beside the pinned ones; in both cases no slot changes."""
        wanted = list(dict.fromkeys(n for n in names if n is not None))
        for n in wanted:
            self._require(n)
        missing = [n for n in wanted if self.slot_of(n) is None]
        free = self._free_slots(keep=set(wanted))
        if len(missing) > len(free):
            raise PoolFull(f"adapters {missing} need {len(missing)} slots; {len(free)} of "
                           f"{len(self._slots)} can be freed (pinned: {sorted(self._pinned)})")
        for name, slot in zip(missing, free):
            old = self._slots[slot]
            if old is not None:
                self._lru.pop(old[0], None)
            self._write_slot(slot, self.store[name])
            self._slots[slot] = (name, self.versions[name])
        for n in wanted:
            self._lru.pop(n, None)
            self._lru[n] = None
        return {n: self.slot_of(n) for n in wanted}

    def _free_slots(self, keep: set[str]) -> list[int]:
        """Slots usable for new adapters: empty or stale first, then LRU victims. A stale slot
        (an older version of a re-registered adapter) stays while its name is pinned."""
        current = self.resident
        empty = [i for i, e in enumerate(self._slots)
                 if e is None or (current.get(e[0]) != i and not self._pinned[e[0]])]
        victims = [current[n] for n in self._lru if n in current and n not in keep and not self._pinned[n]]
        return empty + victims

    def pin(self, name: str) -> None:
        """Keep `name` resident until a matching unpin (pins nest)."""
        if self.slot_of(name) is None:
            raise ValueError(f"adapter {name!r} is not resident; acquire it before pinning")
        self._pinned[name] += 1

    def unpin(self, name: str) -> None:
        if self._pinned[name] <= 0:
            raise ValueError(f"adapter {name!r} is not pinned")
        self._pinned[name] -= 1
        if not self._pinned[name]:
            del self._pinned[name]
