"""Segmented multi-LoRA linear layers, the backend switch, and merging.

Every targeted linear keeps its base weight `kernel [D_in, D_out]` untouched, the adapter
pool's slots (`LoraSlot` variables: `lora_a [S, D_in, R]`, `lora_b [S, R, D_out]`,
`lora_scale [S]`, `lora_rank [S]`), and, when the config is mergeable, a `merged [D_in, D_out]`
copy holding `kernel + s_m A_m B_m` for the merged adapter m. Three modes (docs/architecture.md):

    unmerged:  y = x W   + [a != -1] s_a x A_a B_a
    merged:    y = x W_m                               (every token uses adapter m)
    mixture:   y = x W_m + [a != m] ([a != -1] s_a x A_a B_a - s_m x A_m B_m)

Exact unmerge: merging writes only `merged`, never `kernel`, so returning to unmerged mode is
free and the base weights stay bit-identical forever; the price is one extra copy of every
targeted weight (`LoraConfig.mergeable=False` drops it and with it merged/mixture modes).
"""

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from pallas_kernels.lora_reference import PAD_SLOT, LoraWeight, lora_delta_reference, merge_weight_reference

MODES = ("unmerged", "merged", "mixture")
BACKENDS = ("reference", "pallas", "pallas-static", "pallas-interpret")


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
    backend: one of BACKENDS (static): "reference" is plain jnp, "pallas" the ATMM kernel with
      tiles picked per shape, "pallas-static" the same kernel with one static tile (the baseline
      of static-tiling servers), "pallas-interpret" the kernel interpreted (for CPU tests).
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


def _kernel_lora(x: jax.Array, weights: Sequence[LoraWeight], ctx: LoraContext, base) -> tuple[jax.Array, ...]:
    """base[w] + LoRA delta of weights[w] by the ATMM kernels (accumulated over base's buffers)."""
    from pallas_kernels import STATIC_TILE, lora_delta  # needed only for the kernel backends

    return lora_delta(x, weights, ctx.slot, ctx.merged_slot, mixture=ctx.mode == "mixture",
                      tile=STATIC_TILE if ctx.backend == "pallas-static" else None,
                      interpret=ctx.backend == "pallas-interpret", base=base)


class Linear(nnx.Module):
    """y = x @ kernel (+ bias), plus the LoRA branch when `lora` is given.

    x: [..., D_in] -> y: [..., D_out]. Call several linears that read the same input through
    `project`, which runs their LoRA branches in one kernel launch.
    """

    def __init__(self, d_in: int, d_out: int, *, rngs: nnx.Rngs, dtype, bias: bool = False,
                 lora=None, init_std: float = 0.02):
        self.d_in, self.d_out = d_in, d_out
        self.kernel = nnx.Param((init_std * jax.random.normal(rngs.params(), (d_in, d_out))).astype(dtype))
        self.bias = nnx.Param(jnp.zeros((d_out,), dtype)) if bias else None
        self.targeted = lora is not None
        if self.targeted:
            s, r = lora.max_loras, lora.slot_rank
            self.lora_a = LoraSlot(jnp.zeros((s, d_in, r), dtype))
            self.lora_b = LoraSlot(jnp.zeros((s, r, d_out), dtype))
            self.lora_scale = LoraSlot(jnp.zeros((s,), jnp.float32))
            self.lora_rank = LoraSlot(jnp.zeros((s,), jnp.int32))
            self.merged = MergedWeight(jnp.array(self.kernel[...])) if lora.mergeable else None

    def lora_weight(self) -> LoraWeight:
        return LoraWeight(self.lora_a[...], self.lora_b[...], self.lora_scale[...], self.lora_rank[...])

    def weight(self, mode: str) -> jax.Array:
        """The weight this mode multiplies by: the merged copy in merged/mixture modes."""
        if mode != "unmerged" and self.targeted:
            if self.merged is None:
                raise ValueError(f"mode {mode!r} needs LoraConfig.mergeable=True")
            return self.merged[...]
        return self.kernel[...]

    def __call__(self, x: jax.Array, ctx: LoraContext) -> jax.Array:
        return project(x, [self], ctx)[0]


def project(x: jax.Array, linears: Sequence[Linear], ctx: LoraContext) -> list[jax.Array]:
    """[l(x) for l in linears] with one LoRA launch for all targeted ones.

    x: [..., D_in], ctx.slot: [prod(x.shape[:-1])].
    """
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])                                   # [T, D_in]
    ys = []
    for lin in linears:
        if lin.bias is None:            # in x's dtype (accumulated in float32): no separate rounding pass
            ys.append(jnp.dot(x2, lin.weight(ctx.mode)))
        else:
            ys.append(jnp.dot(x2, lin.weight(ctx.mode), preferred_element_type=jnp.float32)
                      + lin.bias[...].astype(jnp.float32))
    targeted = [i for i, lin in enumerate(linears) if lin.targeted]
    if targeted and ctx.mode != "merged":
        weights = [linears[i].lora_weight() for i in targeted]
        if ctx.backend == "reference":
            deltas = lora_delta_reference(x2, weights, ctx.slot, ctx.merged_slot, mixture=ctx.mode == "mixture")
            for i, d in zip(targeted, deltas):
                ys[i] = ys[i].astype(jnp.float32) + d.astype(jnp.float32)
        else:                               # the kernel adds the delta to the rounded base output
            outs = _kernel_lora(x2, weights, ctx, [ys[i].astype(x.dtype) for i in targeted])
            for i, y in zip(targeted, outs):
                ys[i] = y
    return [y.astype(x.dtype).reshape(*lead, y.shape[-1]) for y in ys]


def merge_weight(kernel: jax.Array, w: LoraWeight, slot: jax.Array, backend: str = "reference") -> jax.Array:
    """kernel + scale[slot] * A[slot][:, :rank] @ B[slot][:rank], rounded once to the kernel dtype:
    plain jnp (backend "reference") or the swift-merge kernel (the pallas backends)."""
    if backend == "reference":
        return merge_weight_reference(kernel, w, slot)
    from pallas_kernels import merge_weight as merge_kernel   # needed only for the kernel backends

    return merge_kernel(kernel, w, slot, interpret=backend == "pallas-interpret")


def merged_kernel(lin: Linear, slot: jax.Array, backend: str = "reference") -> jax.Array:
    """The linear's kernel with the adapter in `slot` folded in."""
    return merge_weight(lin.kernel[...], lin.lora_weight(), slot, backend)


def targeted_linears(model: nnx.Module) -> list[tuple[tuple, Linear]]:
    """(path, Linear) for every linear that carries adapter slots."""
    return [(path, m) for path, m in nnx.iter_modules(model) if isinstance(m, Linear) and m.targeted]


def module_path(path: tuple) -> str:
    """An nnx path as an adapter's module key: ("decoder", "layers", 0, "q_proj") -> "decoder.layers.0.q_proj"."""
    return ".".join(str(p) for p in path)


def module_shapes(model: nnx.Module) -> dict[str, tuple[int, int]]:
    """{module key: (D_in, D_out)} of every slot-carrying linear (what adapters are checked against)."""
    return {module_path(p): (lin.d_in, lin.d_out) for p, lin in targeted_linears(model)}
