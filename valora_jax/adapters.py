"""LoRA adapters on the host and the device adapter pool.

An `Adapter` holds, for each targeted module path (e.g. "decoder.layers.0.q_proj"),
`A [D_in, r]`, `B [r, D_out]` and its scale. The `AdapterPool` keeps a host store of any
number of adapters, each packed in one flat buffer (`PackedAdapter`, one transfer to the
device), and places them into the model's `max_loras` device slots on demand, evicting the
least recently used unpinned adapter.
"""

import collections
import concurrent.futures
import dataclasses
import math
from typing import Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from valora_jax.config import LMMConfig


def target_of(path: str) -> str:
    """Target-module name of a module path: decoder.layers.3.q_proj -> q_proj,
    vision_tower.layers.0.fc1 -> vision.fc1 (and visual.blocks.0.qkv -> vision.qkv of the Qwen-VL
    tower), projector.linear_1 -> projector.linear_1."""
    parts = path.split(".")
    if parts[0] == "decoder":
        return parts[-1]
    if parts[0] in ("vision_tower", "visual"):
        return f"vision.{parts[-1]}"
    return path


@dataclasses.dataclass(frozen=True)
class TaskHead:
    """A bounded-label head on the last hidden state: logits = h @ kernel + bias.

    kernel [D, num_labels], bias [num_labels]; labels name the classes."""

    kernel: np.ndarray
    bias: np.ndarray
    labels: tuple[str, ...]

    def answer(self, hidden: np.ndarray) -> str:
        """The label of the highest logit for one hidden state [D]."""
        return self.labels[int(np.argmax(np.asarray(hidden, np.float32) @ self.kernel + self.bias))]


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
            if not (np.issubdtype(a.dtype, np.floating) and np.issubdtype(b.dtype, np.floating)) \
                    and not (str(a.dtype) == "bfloat16" and str(b.dtype) == "bfloat16"):
                raise ValueError(f"adapter {self.name!r} module {path!r}: weights of dtype {a.dtype} / {b.dtype}, "
                                 f"expected floating point")
            if not 1 <= a.shape[1] <= config.lora.max_rank:
                raise ValueError(f"adapter {self.name!r} module {path!r}: rank {a.shape[1]} outside "
                                 f"1..max_rank={config.lora.max_rank}")
            if path not in self.scales:
                raise ValueError(f"adapter {self.name!r} module {path!r} has no scale")
            scale = self.scales[path]
            if not (isinstance(scale, (int, float, np.floating)) and math.isfinite(scale) and abs(scale) <= MAX_SCALE):
                raise ValueError(f"adapter {self.name!r} module {path!r}: scale {scale!r} is not a finite number "
                                 f"within +-{MAX_SCALE:g}")
            for which, w in (("A", a), ("B", b)):
                _check_finite(f"adapter {self.name!r} module {path!r}: {which}", w)
        if not (isinstance(self.alpha, (int, float, np.floating)) and math.isfinite(self.alpha)):
            raise ValueError(f"adapter {self.name!r}: alpha {self.alpha!r} is not finite")
        if self.head is not None:
            head, d = self.head, config.text.hidden_size
            if not head.labels or head.kernel.shape != (d, len(head.labels)) or head.bias.shape != (len(head.labels),):
                raise ValueError(f"adapter {self.name!r} task head: kernel {head.kernel.shape} and bias "
                                 f"{head.bias.shape} do not fit [{d}, {len(head.labels)}] and "
                                 f"[{len(head.labels)}] ({len(head.labels)} labels)")
            _check_finite(f"adapter {self.name!r} task head kernel", head.kernel)
            _check_finite(f"adapter {self.name!r} task head bias", head.bias)


MAX_SCALE = 1e4
"""Largest |scale| an adapter module may have (alpha / r or alpha / sqrt(r) are far below it)."""
MAX_WEIGHT = 1e4
"""Largest |value| in an adapter's A, B or task head (trained LoRA weights are far below it)."""


def _check_finite(what: str, w: np.ndarray) -> None:
    """ValueError naming `what` unless every value of w is finite and within +-MAX_WEIGHT."""
    w = np.asarray(w)
    if w.size and not (np.isfinite(w).all() and float(np.abs(w).max()) <= MAX_WEIGHT):
        bad = int(np.size(w) - np.isfinite(w).sum())
        raise ValueError(f"{what} holds {bad} non-finite values" if bad else
                         f"{what} holds values up to {float(np.abs(w).max()):g}, beyond +-{MAX_WEIGHT:g}")


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


Layout = tuple[tuple[str, int, int, int], ...]
"""(module path, d_in, rank, d_out) of each module a packed adapter holds, in buffer order."""


def layout_of(adapter: Adapter) -> Layout:
    """The adapter's packed layout: (module path, d_in, rank, d_out) of each module, sorted."""
    return tuple((p, *adapter.weights[p][0].shape, adapter.weights[p][1].shape[1]) for p in sorted(adapter.weights))


def unpack(buffer, scales, layout: Layout) -> dict[str, tuple]:
    """module path -> (A [d_in, r], B [r, d_out], scale): slices of a packed buffer (numpy views on
    the host; inside a jitted function, static slices)."""
    modules, offset = {}, 0
    for i, (path, d_in, r, d_out) in enumerate(layout):
        a_end = offset + d_in * r
        b_end = a_end + r * d_out
        modules[path] = (buffer[offset:a_end].reshape(d_in, r), buffer[a_end:b_end].reshape(r, d_out), scales[i])
        offset = b_end
    return modules


@dataclasses.dataclass(frozen=True)
class PackedAdapter:
    """An adapter's LoRA weights as they travel to the device: all in one flat buffer, so a copy
    is one transfer (and a few Python calls) rather than two per module.

    buffer [sum of (d_in + d_out) * r]: A then B of each module, row-major, in layout order;
    scales [modules] float32; layout: see `Layout` (static: the slot write compiles per layout)."""

    name: str
    buffer: np.ndarray | jax.Array
    scales: np.ndarray | jax.Array
    layout: Layout

    @classmethod
    def of(cls, adapter: Adapter, dtype) -> "PackedAdapter":
        """Pack an adapter's weights (in sorted module order) as `dtype`."""
        paths, layout = sorted(adapter.weights), layout_of(adapter)
        parts = [w for p in paths for w in adapter.weights[p]]
        buffer = np.concatenate([np.asarray(w, dtype).reshape(-1) for w in parts]) if parts else np.zeros(0, dtype)
        return cls(adapter.name, buffer, np.array([adapter.scales[p] for p in paths], np.float32), layout)

    @property
    def weights(self) -> dict[str, tuple]:
        """module path -> (A, B), slices of the buffer."""
        return {p: (a, b) for p, (a, b, _) in unpack(self.buffer, self.scales, self.layout).items()}

    def to_device(self) -> "PackedAdapter":
        """The same adapter on the default device (returns once its arrays are there)."""
        buffer, scales = jax.block_until_ready((jax.device_put(self.buffer), jax.device_put(self.scales)))
        return dataclasses.replace(self, buffer=buffer, scales=scales)


class PoolFull(RuntimeError):
    """Every device slot holds a pinned or needed adapter; nothing was changed."""


AdapterRef = str | tuple[str, int]
"""An adapter name (its current version) or a (name, version) key."""


class AdapterPool:
    """Host store of adapters + assignment of adapters to device slots (LRU, pinning), written
    from device copies of the recently used adapters (`stage`) when there are some.

    Adapters are identified by (name, version): registering a name again makes a new current
    version, while older versions that requests still use stay available (by key) until
    `release`d. `write_slot(slot, packed adapter | None)` is the device write (the runner's); the
    pool calls it when an adapter must become resident, or with None to clear a slot.
    """

    def __init__(self, config: LMMConfig, module_shapes: Mapping[str, tuple[int, int]],
                 write_slot: Callable[[int, PackedAdapter | None], None]):
        self.config, self.module_shapes, self._write_slot = config, dict(module_shapes), write_slot
        self.store: dict[str, Adapter] = {}                   # current version of each name
        self.versions: dict[str, int] = {}
        self._held: dict[tuple[str, int], Adapter] = {}       # every version still usable
        self._packed: dict[tuple[str, int], PackedAdapter] = {}   # their weights, as the host holds them
        self._slots: list[tuple[str, int] | None] = [None] * config.lora.max_loras
        self._lru: collections.OrderedDict[tuple[str, int], None] = collections.OrderedDict()
        self._pinned: collections.Counter[tuple[str, int]] = collections.Counter()
        # device copies of recently used adapters, copied from the host on a thread of their own
        self._staged: collections.OrderedDict[tuple[str, int], concurrent.futures.Future] = collections.OrderedDict()
        self._copier = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="adapter-staging")
        self.max_staged = 2 * config.lora.max_loras

    # host store ---------------------------------------------------------------------------
    def register(self, adapter: Adapter) -> int:
        """Validate and store an adapter as the current version of its name; returns the version.
        Its weights are kept packed (`PackedAdapter`) in the model's dtype, what the device slots
        hold, so that staging is one transfer of no more bytes; `get` sees them as views."""
        adapter.validate(self.config, self.module_shapes)
        packed = PackedAdapter.of(adapter, jnp.dtype(self.config.dtype))
        adapter = dataclasses.replace(adapter, weights=packed.weights)
        version = self.versions.get(adapter.name, 0) + 1
        self.store[adapter.name], self.versions[adapter.name] = adapter, version
        self._held[(adapter.name, version)], self._packed[(adapter.name, version)] = adapter, packed
        return version

    def unregister(self, name: str) -> None:
        """Remove a name; its current version is released (older ones stay until released)."""
        key = self.key(name)
        if self._pinned[key]:
            raise ValueError(f"adapter {name!r} is pinned (in use) and cannot be removed")
        del self.store[name]
        self.release(key)

    def release(self, key: tuple[str, int]) -> None:
        """Forget a version that is no longer current (no-op for the current one or a pinned one)."""
        if key not in self._held or self.store.get(key[0]) is self._held[key] or self._pinned[key]:
            return
        del self._held[key], self._packed[key]
        self._staged.pop(key, None)
        if key in self._slots:
            slot = self._slots.index(key)
            self._slots[slot] = None
            self._lru.pop(key, None)
            self._write_slot(slot, None)

    def key(self, ref: AdapterRef) -> tuple[str, int]:
        """(name, version) of a reference; ValueError for unknown names or versions."""
        if isinstance(ref, tuple):
            if ref not in self._held:
                raise ValueError(f"unknown adapter version {ref!r}")
            return ref
        if ref not in self.store:
            raise ValueError(f"unknown adapter {ref!r}; known: {sorted(self.store)}")
        return ref, self.versions[ref]

    def get(self, ref: AdapterRef) -> Adapter:
        return self._held[self.key(ref)]

    # device slots -------------------------------------------------------------------------
    def slot_of(self, ref: AdapterRef) -> int | None:
        """The slot holding that adapter version, or None."""
        key = self.key(ref)
        return self._slots.index(key) if key in self._slots else None

    @property
    def resident(self) -> dict[tuple[str, int], int]:
        return {key: i for i, key in enumerate(self._slots) if key is not None}

    def acquire(self, refs: Iterable[AdapterRef | None]) -> dict[AdapterRef, int]:
        """Make every referenced adapter resident; returns ref -> slot (None refs are skipped).

        Raises ValueError for unknown adapters and PoolFull when they do not fit beside the
        pinned ones, in both cases before any slot changes. If a device write (or the staging copy
        it reads) fails, the adapters written before it stay resident and the failing slot is left
        empty; a failed staging copy is forgotten, so the next acquire copies again."""
        refs = list(dict.fromkeys(r for r in refs if r is not None))
        keys = {r: self.key(r) for r in refs}
        wanted = set(keys.values())
        missing = list(dict.fromkeys(k for k in keys.values() if k not in self._slots))
        free = self._free_slots(keep=wanted)
        if len(missing) > len(free):
            raise PoolFull(f"adapters {missing} need {len(missing)} slots; {len(free)} of "
                           f"{len(self._slots)} can be freed (pinned: {sorted(self._pinned)})")
        for key, slot in zip(missing, free):
            old = self._slots[slot]
            if old is not None:
                self._lru.pop(old, None)
            self._slots[slot] = None
            staged = self._staged.get(key)
            if staged is not None and staged.exception() is not None:
                del self._staged[key]                     # a failed copy: the next acquire copies again
            self._write_slot(slot, staged.result() if staged else self._packed[key])
            self._slots[slot] = key
        for key in wanted:
            self._lru.pop(key, None)
            self._lru[key] = None
            if key in self._staged:
                self._staged.move_to_end(key)
        return {r: self._slots.index(k) for r, k in keys.items()}

    def stage(self, ref: AdapterRef) -> None:
        """Start copying an adapter's weights to the device, on the pool's copy thread: the caller
        does not wait, and placing the adapter in a slot later, also after an eviction, is a
        device-side copy (waiting only for a copy still under way). The copies stay, the least
        recently used finished ones dropped first beyond `max_staged` adapters (a copy under way
        is never dropped, so every staged adapter becomes `ready`)."""
        key = self.key(ref)
        if key in self._staged:
            return
        self._staged[key] = self._copier.submit(PackedAdapter.to_device, self._packed[key])
        excess = max(0, len(self._staged) - self.max_staged)
        for old in [k for k, copy in self._staged.items() if copy.done()][:excess]:
            del self._staged[old]

    def ready(self, ref: AdapterRef) -> bool:
        """Whether placing the adapter in a slot now waits for no host-to-device copy: it is
        resident, or its staged copy has finished (or failed: acquire then raises at once).
        Stages it when it is neither."""
        key = self.key(ref)
        if key in self._slots:
            return True
        self.stage(key)
        return self._staged[key].done()

    def wait_staged(self, refs: Iterable[AdapterRef], first: bool = False) -> None:
        """Block until the staged copies of these adapters have finished (or failed); with `first`,
        until one of them has."""
        futures = concurrent.futures
        futures.wait([self._staged[k] for k in map(self.key, refs) if k in self._staged],
                     return_when=futures.FIRST_COMPLETED if first else futures.ALL_COMPLETED)

    def evict_all(self) -> None:
        """Forget every slot placement and staged copy, as if the device held no adapter (no
        device write: a slot is rewritten before its next use). ValueError while any is pinned."""
        if pinned := +self._pinned:                       # keys with a positive pin count
            raise ValueError(f"adapters {sorted(pinned)} are pinned (in use); nothing was evicted")
        self._slots = [None] * len(self._slots)
        self._lru.clear()
        self._staged.clear()

    def _free_slots(self, keep: set[tuple[str, int]]) -> list[int]:
        """Slots usable for new adapters: empty ones first, then least recently used victims."""
        empty = [i for i, key in enumerate(self._slots) if key is None]
        victims = [self._slots.index(k) for k in self._lru
                   if k in self._slots and k not in keep and not self._pinned[k]]
        return empty + victims

    def pin(self, ref: AdapterRef) -> None:
        """Keep an adapter resident until a matching unpin (pins nest)."""
        key = self.key(ref)
        if key not in self._slots:
            raise ValueError(f"adapter {ref!r} is not resident; acquire it before pinning")
        self._pinned[key] += 1

    def unpin(self, ref: AdapterRef) -> None:
        key = self.key(ref)
        if self._pinned[key] <= 0:
            raise ValueError(f"adapter {ref!r} is not pinned")
        self._pinned[key] -= 1
        if not self._pinned[key]:
            del self._pinned[key]
