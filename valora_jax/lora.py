"""Segmented multi-LoRA linear layers, the backend switch, and merging.

Every targeted linear keeps its base weight `kernel [D_in, D_out]` untouched, the adapter
pool's slots of each targeted part (`LoraSlots`: `lora_a [S, D_in, R]`, `lora_b [S, R, D_part]`,
`lora_scale [S]`, `lora_rank [S]`; a fused linear such as q/k/v has one per part, a plain
linear one), and, when the config is mergeable, a `merged [D_in, D_out]` copy holding
`kernel + s_m A_m B_m` (per part) for the merged adapter m. Three modes (docs/architecture.md):

    unmerged:  y = x W   + [a != -1] s_a x A_a B_a
    merged:    y = x W_m                               (every token uses adapter m)
    mixture:   y = x W_m + [a != m] ([a != -1] s_a x A_a B_a - s_m x A_m B_m)

Exact unmerge: merging writes only `merged`, never `kernel`, so returning to unmerged mode is
free and the base weights stay bit-identical forever; the price is one extra copy of every
targeted weight (`LoraConfig.mergeable=False` drops it and with it merged/mixture modes).
"""

import dataclasses
import itertools
from typing import Collection, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from pallas_kernels.lora_reference import PAD_SLOT, LoraWeight, lora_delta_reference, merge_parts_reference

MODES = ("unmerged", "merged", "mixture")
BACKENDS = ("reference", "pallas", "pallas-triton", "pallas-mosaic", "pallas-static", "pallas-interpret",
            "pallas-mosaic-interpret")
BACKEND_KERNELS = {"pallas-triton": "triton", "pallas-static": "triton", "pallas-interpret": "triton",
                   "pallas-mosaic": "mosaic", "pallas-mosaic-interpret": "mosaic"}
"""The ATMM kernels of the explicit kernel backends ("pallas" runs the device's: tiling.device_kernels)."""


class LoraSlot(nnx.Variable):
    """Adapter-pool slot buffers, written by the pool, read by the LoRA branch."""


class MergedWeight(nnx.Variable):
    """A base weight with one adapter folded in (read in merged and mixture modes)."""


@dataclasses.dataclass(frozen=True)
class LoraContext:
    """How the targeted linears of one call treat their tokens.

    slot: [T] int32 adapter slot of each (flattened) token, -1 = base model only, PAD_SLOT = a
      padding token (no LoRA delta in any mode).
    merged_slot: int32 scalar, the slot held in the merged weights (ignored when unmerged).
    mode: one of MODES (static).
    backend: one of BACKENDS (static): "reference" is plain jnp, "pallas" the ATMM kernels the
      device's tile table names ("pallas-triton" / "pallas-mosaic": the Triton-lowered or the
      Mosaic GPU ones, explicitly) with tiles picked per shape, "pallas-static" the Triton kernels
      with one static tile (the baseline of static-tiling servers), "pallas-interpret" /
      "pallas-mosaic-interpret" the Triton / Mosaic kernels interpreted (for CPU tests).
    """

    slot: jax.Array
    merged_slot: jax.Array
    mode: str = "unmerged"
    backend: str = "reference"

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"unknown mode {self.mode!r}; expected one of {MODES}")
        if self.backend not in BACKENDS:
            raise ValueError(f"unknown LoRA backend {self.backend!r}; expected one of {BACKENDS}")

    @classmethod
    def unmerged(cls, slot, backend: str = "reference") -> "LoraContext":
        return cls(jnp.asarray(slot, jnp.int32), jnp.int32(-1), "unmerged", backend)

    def for_tokens(self, slot: jax.Array) -> "LoraContext":
        """The same mode and backend for another token layout."""
        return dataclasses.replace(self, slot=slot)


def _kernel_lora(x: jax.Array, weights: Sequence[LoraWeight], ctx: LoraContext, base: jax.Array,
                 columns: tuple[int, ...]) -> jax.Array:
    """base [T, D_out] with the LoRA delta of weights[w] added to its columns from columns[w]
    on, by the ATMM kernels (accumulated over base's buffer)."""
    from pallas_kernels import STATIC_TILE, lora_delta  # needed only for the kernel backends

    return lora_delta(x, weights, ctx.slot, ctx.merged_slot, mixture=ctx.mode == "mixture",
                      tile=STATIC_TILE if ctx.backend == "pallas-static" else None,
                      kernels=BACKEND_KERNELS.get(ctx.backend), interpret=ctx.backend.endswith("-interpret"),
                      base=[base], columns=columns)[0]


class LoraSlots(nnx.Module):
    """The adapter-pool slots of one adapted linear (or one part of a fused linear), written by
    the pool, read by the LoRA branch: lora_a [S, D_in, R], lora_b [S, R, D_out], lora_scale [S]
    float32, lora_rank [S] int32."""

    def __init__(self, d_in: int, d_out: int, lora, dtype):
        s, r = lora.max_loras, lora.slot_rank
        self.d_in, self.d_out = d_in, d_out
        self.lora_a = LoraSlot(jnp.zeros((s, d_in, r), dtype))
        self.lora_b = LoraSlot(jnp.zeros((s, r, d_out), dtype))
        self.lora_scale = LoraSlot(jnp.zeros((s,), jnp.float32))
        self.lora_rank = LoraSlot(jnp.zeros((s,), jnp.int32))

    def weight(self) -> LoraWeight:
        return LoraWeight(self.lora_a[...], self.lora_b[...], self.lora_scale[...], self.lora_rank[...])


@dataclasses.dataclass(frozen=True)
class Part:
    """Output columns [start, start + width) of a linear: the whole of a plain linear (name None)
    or one of the linears fused into one (name: its own, e.g. "q_proj" of "qkv_proj")."""

    name: str | None
    start: int
    width: int

    @property
    def attribute(self) -> str:
        """The linear's attribute that holds this part's adapter slots."""
        return self.name or "lora"


class Linear(nnx.Module):
    """y = x @ kernel (+ bias), kernel [D_in, D_out], plus the LoRA branch of each targeted part.

    A plain linear is one part. A fused linear (`parts` {name: width}, widths summing to D_out)
    is several linears that read the same input, as one GEMM (q/k/v, gate/up), each part with
    its own adapter slots: a targeted part carries a `LoraSlots` attribute (named after the part;
    a plain linear's is `lora`), and adapters address it by `adapter_key`. All targeted parts
    take their LoRA branch in one kernel launch. x: [..., D_in] -> y: [..., D_out].
    """

    def __init__(self, d_in: int, d_out: int, *, rngs: nnx.Rngs, dtype, bias: bool = False,
                 lora=None, parts: dict[str, int] | None = None, targets: Collection[str] | None = None,
                 init_std: float = 0.02):
        """lora: the pool's LoraConfig, or None for no adapter slots: a plain linear given one is
        targeted, a fused linear's part when its name is in `targets` (default lora.targets)."""
        if parts is not None and sum(parts.values()) != d_out:
            raise ValueError(f"parts {parts} do not add up to D_out={d_out}")
        widths = parts or {None: d_out}
        starts = itertools.accumulate(widths.values(), initial=0)
        self.d_in, self.d_out = d_in, d_out
        self.parts = tuple(Part(name, start, width) for (name, width), start in zip(widths.items(), starts))
        self.kernel = nnx.Param((init_std * jax.random.normal(rngs.params(), (d_in, d_out))).astype(dtype))
        self.bias = nnx.Param(jnp.zeros((d_out,), dtype)) if bias else None
        targets = lora.targets if targets is None and lora is not None else targets
        self.targeted_parts = tuple(p for p in self.parts
                                    if lora is not None and (p.name is None or p.name in targets))
        for p in self.targeted_parts:
            setattr(self, p.attribute, LoraSlots(d_in, p.width, lora, dtype))
        self.targeted = bool(self.targeted_parts)
        self.merged = MergedWeight(jnp.array(self.kernel[...])) if self.targeted and lora.mergeable else None

    def slots(self) -> list[tuple[Part, LoraSlots]]:
        """(part, its adapter slots) of every targeted part, in column order."""
        return [(p, getattr(self, p.attribute)) for p in self.targeted_parts]

    def weight(self, mode: str) -> jax.Array:
        """The weight this mode multiplies by: the merged copy in merged/mixture modes."""
        if mode != "unmerged" and self.targeted:
            if self.merged is None:
                raise ValueError(f"mode {mode!r} needs LoraConfig.mergeable=True")
            return self.merged[...]
        return self.kernel[...]

    def __call__(self, x: jax.Array, ctx: LoraContext) -> jax.Array:
        """x [..., D_in], ctx.slot [prod(x.shape[:-1])] -> [..., D_out] in x's dtype."""
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])                                   # [T, D_in]
        if self.bias is None:            # in x's dtype (accumulated in float32): no separate rounding pass
            y = jnp.dot(x2, self.weight(ctx.mode))
        else:
            y = (jnp.dot(x2, self.weight(ctx.mode), preferred_element_type=jnp.float32)
                 + self.bias[...].astype(jnp.float32))
        if self.targeted and ctx.mode != "merged":
            parts, weights = zip(*[(p, s.weight()) for p, s in self.slots()])
            columns = tuple(p.start for p in parts)
            if ctx.backend == "reference":
                deltas = lora_delta_reference(x2, weights, ctx.slot, ctx.merged_slot, mixture=ctx.mode == "mixture")
                y = y.astype(jnp.float32)
                for p, d in zip(parts, deltas):
                    y = y.at[:, p.start: p.start + p.width].add(d.astype(jnp.float32))
            else:                           # the kernel adds the deltas to the rounded base output
                y = _kernel_lora(x2, weights, ctx, y.astype(x.dtype), columns)
        return y.astype(x.dtype).reshape(*lead, self.d_out)


def adapter_key(path: tuple, part: Part) -> str:
    """The module key adapters use for `part` of the linear at nnx `path`: the linear's own
    ("decoder.layers.0.o_proj"), or for a fused part its parent's + the part's name
    ("decoder.layers.0.q_proj" in "decoder.layers.0.qkv_proj")."""
    return module_path(path if part.name is None else (*path[:-1], part.name))


def merge_parts(kernel: jax.Array, merged: jax.Array, weights: Sequence[LoraWeight], columns: Sequence[int],
                slot: jax.Array, backend: str = "reference") -> jax.Array:
    """kernel [D_in, D_out] with scale_w[slot] * A_w[slot][:, :rank] @ B_w[slot][:rank] added to
    the columns of each weight w from columns[w] on, rounded once to the kernel dtype; the other
    columns are merged's [D_in, D_out] (inside a jit that donates merged, its buffer is written).
    Plain jnp (backend "reference") or one swift-merge launch (the pallas backends, on the kernels
    they name: BACKEND_KERNELS)."""
    if backend == "reference":
        return merge_parts_reference(kernel, merged, weights, columns, slot)
    from pallas_kernels import merge_parts as merge_kernel   # needed only for the kernel backends

    return merge_kernel(kernel, merged, weights, columns, slot, interpret=backend.endswith("-interpret"),
                        kernels=BACKEND_KERNELS.get(backend))


def merged_kernel(lin: Linear, slot: jax.Array, backend: str = "reference") -> jax.Array:
    """The linear's kernel with the adapter in `slot` folded into each targeted part's columns.
    Written over the current merged copy (in place where a jit donates it) when every part is
    targeted, else over a copy of the kernel (its untargeted columns)."""
    parts, weights = zip(*[(p, s.weight()) for p, s in lin.slots()])
    into = lin.merged[...] if len(parts) == len(lin.parts) else lin.kernel[...]
    return merge_parts(lin.kernel[...], into, weights, tuple(p.start for p in parts), slot, backend)


def targeted_linears(model: nnx.Module) -> list[tuple[tuple, Linear]]:
    """(path, Linear) for every linear that carries adapter slots."""
    return [(path, m) for path, m in nnx.iter_modules(model) if isinstance(m, Linear) and m.targeted]


def adapter_slots(model: nnx.Module) -> list[tuple[str, LoraSlots]]:
    """(adapter key, slots) of every targeted linear or fused part, in model order."""
    return [(adapter_key(path, part), slots) for path, lin in targeted_linears(model) for part, slots in lin.slots()]


def module_path(path: tuple) -> str:
    """An nnx path as an adapter's module key: ("decoder", "layers", 0, "q_proj") -> "decoder.layers.0.q_proj"."""
    return ".".join(str(p) for p in path)


def module_shapes(model: nnx.Module) -> dict[str, tuple[int, int]]:
    """{adapter key: (D_in, D_out)} of every targeted linear or fused part (what adapters are checked against)."""
    return {key: (slots.d_in, slots.d_out) for key, slots in adapter_slots(model)}


def fused_layout(model: nnx.Module) -> dict[str, tuple[str, int, int]]:
    """{unfused parameter path: (fused parameter path, first column, width)} for the kernel and
    bias of every part of a fused linear: "decoder.layers.0.q_proj.kernel" ->
    ("decoder.layers.0.qkv_proj.kernel", 0, D_q). The unfused layout is the one of Hugging Face
    checkpoints and of checkpoints written before linears were fused."""
    layout = {}
    for path, lin in nnx.iter_modules(model):
        if isinstance(lin, Linear) and lin.parts[0].name is not None:
            for var in ("kernel",) + (("bias",) if lin.bias is not None else ()):
                for part in lin.parts:
                    layout[module_path((*path[:-1], part.name, var))] = (module_path((*path, var)), part.start,
                                                                       part.width)
    return layout


def fuse_parameters(flat: dict[str, jax.Array], layout: dict[str, tuple[str, int, int]]) -> dict[str, jax.Array]:
    """Flat parameters {dotted path: array} in the unfused layout -> the fused one (`fused_layout`):
    each fused parameter is its parts concatenated along the last axis; other entries (fused
    ones included) pass through. Raises ValueError naming a fused parameter whose parts are
    missing or misshapen."""
    out, parts = {}, {}
    for path, x in flat.items():
        if path in layout:
            fused, start, width = layout[path]
            if x.shape[-1] != width:
                raise ValueError(f"{path}: shape {list(x.shape)}, expected last dimension {width}")
            parts.setdefault(fused, {})[start] = x
        else:
            out[path] = x
    for fused in sorted({f for f, _, _ in layout.values()} - set(out)):
        want = sorted(start for f, start, _ in layout.values() if f == fused)
        if sorted(parts.get(fused, {})) != want:
            missing = [p for p, (f, s, _) in layout.items() if f == fused and s not in parts.get(fused, {})]
            raise ValueError(f"parameters {missing} are missing (they make up {fused})")
        out[fused] = jnp.concatenate([parts[fused][s] for s in want], axis=-1)
    return out
