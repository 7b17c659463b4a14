"""The multi-adapter LoRA branch in plain jnp: the oracle every ATMM kernel is tested against.

Glossary: T tokens, D_in / D_out feature sizes, S adapter slots, R the slots' padded rank.
A token's slot is its adapter (0..S-1), -1 for the base model alone, or PAD_SLOT for a padding
token of a shape bucket, which takes no delta in any mode (in mixture mode a base-model token
takes -delta(m), a LoRA pass a padding token must not pay for).
"""

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp

PAD_SLOT = -2    # a padding token's slot: no LoRA delta in any mode


class LoraWeight(NamedTuple):
    """One targeted linear's adapter slots.

    a:     [S, D_in, R]  down-projections; columns >= rank[s] are padding (ignored).
    b:     [S, R, D_out] up-projections; rows >= rank[s] are padding (ignored).
    scale: [S] float32   alpha / rank of the adapter in each slot.
    rank:  [S] int32     the true rank of each slot's adapter (0 for an empty slot).
    """

    a: jax.Array
    b: jax.Array
    scale: jax.Array
    rank: jax.Array


def lora_delta_reference(
    x: jax.Array,
    weights: Sequence[LoraWeight],
    slot: jax.Array,
    merged_slot: jax.Array | int = -1,
    *,
    mixture: bool = False,
) -> tuple[jax.Array, ...]:
    """LoRA deltas of several weights that share the input x.

    For each weight w and token t, with a = slot[t] (-1 = base model only; any id outside
    [-1, S), such as PAD_SLOT, takes no delta) and m = merged_slot (used only when mixture=True):
        delta(s)  = scale[s] * x[t] @ A[s][:, :rank[s]] @ B[s][:rank[s], :]
        y[t]      = (a >= 0 ? delta(a) : 0)                 # unmerged
        y[t]      = a == m ? 0                               # mixture: already in W
                  : (a >= 0 ? delta(a) : 0) - delta(m)       #   add own, remove merged
    Accumulates in float32; returns one [T, D_out] array per weight in x.dtype.

    Args:
      x: [T, D_in] tokens.
      weights: LoraWeights whose a has D_in rows.
      slot: [T] int32 adapter slot per token.
      merged_slot: int32 scalar, the slot folded into the base weights.
      mixture: whether the step runs in mixture (deLoRA) mode.
    """
    xf = x.astype(jnp.float32)
    n_slots = weights[0].a.shape[0]
    token_slot = jnp.clip(slot, 0, n_slots - 1)                      # [T]
    outputs = []
    for w in weights:
        cols = jnp.arange(w.a.shape[-1])
        keep = (cols[None, :] < w.rank[:, None]).astype(jnp.float32)  # [S, R]
        a = w.a.astype(jnp.float32) * keep[:, None, :]               # [S, D_in, R]
        b = w.b.astype(jnp.float32) * keep[:, :, None]               # [S, R, D_out]
        h = jnp.einsum("TD,TDR->TR", xf, a[token_slot])              # [T, R]
        y = jnp.einsum("TR,TRO->TO", h, b[token_slot])               # [T, D_out]
        y = jnp.where((slot >= 0)[:, None], w.scale[token_slot][:, None] * y, 0.0)
        if mixture:
            m = jnp.clip(merged_slot, 0)
            merged = w.scale[m] * ((xf @ a[m]) @ b[m])               # [T, D_out]
            y = jnp.where((merged_slot >= 0), y - merged, y)
            y = jnp.where((slot == merged_slot)[:, None], 0.0, y)
        y = jnp.where(((slot >= -1) & (slot < n_slots))[:, None], y, 0.0)
        outputs.append(y.astype(x.dtype))
    return tuple(outputs)


def merge_weight_reference(kernel: jax.Array, w: LoraWeight, slot: jax.Array) -> jax.Array:
    """One adapter slot folded into a weight:

        W_m = kernel + scale[s] * A[s][:, :rank[s]] @ B[s][:rank[s], :]      (s = slot)
    accumulated in float32 and rounded once to kernel's dtype.

    Args: kernel [D_in, D_out]; w: LoraWeight with a [S, D_in, R], b [S, R, D_out]; slot: int32 scalar.
    Returns: [D_in, D_out] in kernel.dtype.
    """
    keep = (jnp.arange(w.a.shape[-1]) < w.rank[slot]).astype(jnp.float32)   # [R]
    a = w.a[slot].astype(jnp.float32) * keep                                  # [D_in, R]
    delta = w.scale[slot] * (a @ w.b[slot].astype(jnp.float32))               # [D_in, D_out]
    return (kernel.astype(jnp.float32) + delta).astype(kernel.dtype)


def merge_parts_reference(kernel: jax.Array, merged: jax.Array, parts: Sequence[LoraWeight],
                          columns: Sequence[int], slot: jax.Array) -> jax.Array:
    """One adapter slot folded into the parts of a fused weight:

        out[:, c_p : c_p + D_out_p] = merge_weight_reference(kernel[:, c_p : c_p + D_out_p], parts[p], slot)
        out[:, n]                   = merged[:, n] for every column n no part owns      (c_p = columns[p])

    Args: kernel [D_in, N] (the fused base weight); merged [D_in, N] (the current merged copy);
      parts: LoraWeights with a [S, D_in, R_p], b [S, R_p, D_out_p]; columns: part p's first column;
      slot: int32 scalar.
    Returns: [D_in, N] in kernel.dtype.
    """
    out = merged.astype(kernel.dtype)
    for w, c in zip(parts, columns):
        d = w.b.shape[-1]
        out = out.at[:, c:c + d].set(merge_weight_reference(kernel[:, c:c + d], w, slot))
    return out
