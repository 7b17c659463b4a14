"""ATMM: the adaptive-tiling multi-adapter LoRA kernels (Pallas, Triton lowering).

`lora_delta` computes `lora_delta_reference` in two launches, however many weights share x:

    token sets j:  u_0(t) = own adapter of token t (-1 in mixture mode when it is the merged one)
                   u_1(t) = merged adapter m for every other token (mixture mode only), sign -1
    shrink:  h[w][j, p, t] = x[t, K_p] @ A_w[u_j(t)][K_p, :rank_w]       # [J, P, T, RB] float32
    expand:  y[w][t]       = sum_j sign_j * scale_w[u_j(t)]
                               * (sum_p h[w][j, p, t]) @ B_w[u_j(t)][:rank_w, :]    # [T, D_out]

Tokens stay in their order (no sort, no gather). Blocked kernels (prefill): each program takes
a block of consecutive tokens and loops over the distinct adapters in it (a serving batch keeps
each request's tokens together, so a prefill block holds one or two adapters) on tensor cores.
Per-token kernels (decode, tile block_t = 1): each program takes one token and its own adapter
in vector math, so a batch of T decode rows launches T x split programs. The two kinds can be
mixed (the partial sums h have the same layout). Given `base`, the expand adds the deltas over
the base projections in place (one pass over the outputs instead of three). With `columns`, the
weights are parts of one fused linear (q/k/v, gate/up): the expand adds y[w] into columns
[columns[w], columns[w] + D_out_w) of the one fused base [T, N] in place; columns of parts
without an adapter are never visited and keep base's values.
Adapter weights are read only up to each slot's true rank (masked loads), and each
(block, adapter) dot runs at the smallest width 16, 32, ... >= that rank, up to
RB = max(16, next_pow2(R)) (never under 16: bf16 dots with contraction < 16 are wrong on GPU).
The shrink splits D_in over `split_k` programs whose partial sums the expand adds up. Mixture
mode is one more token set in the same two launches (x is re-read from L2, not HBM).
"""

import functools
import itertools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from pallas_kernels import atmm_mosaic
from pallas_kernels.lora_reference import PAD_SLOT, LoraWeight
from pallas_kernels.tiling import TileConfig, pick_tile

_FLOAT_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
_NONE = 2**30            # sorts after every slot id


def _padded_rank(r: int) -> int:
    return max(16, 1 << (r - 1).bit_length())


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _token_sets(slots, live, merged, n_slots: int, mixture: bool):
    """Per-token adapter of each token set; -1 = nothing to add.  slots, live: [BT]."""
    valid = live & (slots >= 0) & (slots < n_slots)
    own = jnp.where(valid, slots, -1)                                   # [BT]
    if not mixture:
        return [(own, 1.0)]
    m_ok = (merged >= 0) & (merged < n_slots)
    own = jnp.where(own == merged, -1, own)
    in_range = (slots >= -1) & (slots < n_slots)                        # not padding (PAD_SLOT)
    other = jnp.where(live & m_ok & in_range & (slots != merged), merged, -1)   # [BT]
    return [(own, 1.0), (other, -1.0)]


def _for_each_adapter(slots, body, carry):
    """carry = body(u, slots == u, carry) for each distinct u >= 0 in slots [BT], ascending."""
    def cond(c):
        return jnp.min(c[0]) < _NONE

    def step(c):
        rest, carry = c
        u = jnp.min(rest)
        rows = rest == u                                                # [BT]
        return jnp.where(rows, _NONE, rest), body(u, rows, carry)

    return jax.lax.while_loop(cond, step, (jnp.where(slots >= 0, slots, _NONE), carry))[1]


def _load_block_slots(slot_ref, m_ref, t0, bt: int, n_tokens: int, n_slots: int, mixture: bool):
    rows = t0 + jnp.arange(bt)                                          # [BT]
    live = rows < n_tokens
    slots = plt.load(slot_ref.at[pl.ds(t0, bt)], mask=live, other=-1)
    return live, _token_sets(slots, live, m_ref[0], n_slots, mixture)


def _rank_classes(rb: int) -> tuple[int, ...]:
    """Dot widths a slot can run at: 16, 32, ... up to RB."""
    return tuple(16 << k for k in range(rb.bit_length() - 4))


def _switch_on_rank(rank, rb: int, branch, *carry):
    """branch(c)(*carry) for c = the smallest class >= rank (the dot skips padded columns)."""
    classes = _rank_classes(rb)
    if len(classes) == 1:
        return branch(classes[0])(*carry)
    index = sum((rank > c).astype(jnp.int32) for c in classes[:-1])
    return jax.lax.switch(index, [branch(c) for c in classes], *carry)


def _mask(static_ok: bool, mask):
    """The load/store mask, or None when shapes make it all-true (keeps accesses vectorised)."""
    return None if static_ok else mask


def _shrink_kernel(slot_ref, m_ref, x_ref, *refs, n_weights: int, bt: int, bk: int,
                   k_steps: int, split_k: int, mixture: bool):
    """One (token block i, D_in share p): h[w][j, p, rows of adapter u] for every w, j, u.

    Rows of tokens without an adapter in set j are left unwritten (the expand never reads them).
    """
    a_refs, rank_refs = refs[:n_weights], refs[n_weights:2 * n_weights]
    h_refs = refs[2 * n_weights:]
    n_tokens, d_in = x_ref.shape
    n_slots = a_refs[0].shape[0]
    i, p = pl.program_id(0), pl.program_id(1)
    t0 = i * bt
    live, token_sets = _load_block_slots(slot_ref, m_ref, t0, bt, n_tokens, n_slots, mixture)
    full_t, full_k = n_tokens % bt == 0, d_in == bk * k_steps * split_k
    rb_max = max(h.shape[-1] for h in h_refs)

    for j, (slots, _) in enumerate(token_sets):
        def visit(u, rows, carry):
            ranks = [jnp.minimum(r[u], a.shape[-1]) for r, a in zip(rank_refs, a_refs)]
            top = functools.reduce(jnp.maximum, ranks)

            def branch(c):
                widths = [min(c, h.shape[-1]) for h in h_refs]

                def step(s, accs):
                    k0 = pl.multiple_of((p * k_steps + s) * bk, bk)
                    k_ok = k0 + jnp.arange(bk) < d_in                   # [BK]
                    xk = plt.load(x_ref.at[pl.ds(t0, bt), pl.ds(k0, bk)],
                                  mask=_mask(full_t and full_k, live[:, None] & k_ok[None, :]),
                                  other=_mask(full_t and full_k, 0))    # [BT, BK]
                    out = []
                    for a_ref, rank, width, acc in zip(a_refs, ranks, widths, accs):
                        a = plt.load(a_ref.at[u, pl.ds(k0, bk), pl.ds(0, width)],
                                     mask=k_ok[:, None] & (jnp.arange(width) < rank)[None, :],
                                     other=0)                           # [BK, c]
                        out.append(acc + jnp.dot(xk, a, preferred_element_type=jnp.float32))
                    return out

                def run():
                    accs = jax.lax.fori_loop(0, k_steps, step,
                                             [jnp.zeros((bt, w), jnp.float32) for w in widths])
                    for h_ref, width, acc in zip(h_refs, widths, accs):
                        plt.store(h_ref.at[jnp.int32(j), p, pl.ds(t0, bt), pl.ds(0, width)], acc,
                                  mask=jnp.broadcast_to(rows[:, None], acc.shape))
                return run

            _switch_on_rank(top, rb_max, branch)
            return carry

        _for_each_adapter(slots, visit, ())


def _on_weight_tiles(refs, n_weights: int, has_base: bool, tile, tile_offsets: tuple, bn: int, body,
                     columns: tuple | None = None):
    """The expand kernels' dispatch: body(n0, c0, h, b, scale, rank, base or None, y refs) for the
    weight w whose output columns [n0, n0 + bn) (of D_out_w) this program's tile covers; they lie
    at columns [c0 + n0, c0 + n0 + bn) of base and y.

    refs: (h, b, scale, rank) input refs, n_weights of each, then either n_weights base refs (if
    has_base) and n_weights y refs (c0 = 0), or, with columns, the one fused base and the one y
    ref every weight shares (c0 = columns[w])."""
    groups = [refs[k * n_weights:(k + 1) * n_weights] for k in range(4)]
    if columns is not None:
        base, ys, offsets = (refs[4 * n_weights],) * n_weights, (refs[-1],) * n_weights, columns
    else:
        base = refs[4 * n_weights:5 * n_weights] if has_base else (None,) * n_weights
        ys, offsets = refs[-n_weights:], (0,) * n_weights
    for w, (c0, *weight_refs) in enumerate(zip(offsets, *groups, base, ys)):
        first, last = tile_offsets[w], tile_offsets[w + 1]
        n0 = pl.multiple_of((tile - first) * bn, bn)
        pl.when((tile >= first) & (tile < last))(functools.partial(body, n0, c0, *weight_refs))


def _expand_kernel(slot_ref, m_ref, *refs, n_weights: int, bt: int, bn: int, tile_offsets: tuple,
                   n_tokens: int, mixture: bool, has_base: bool, columns: tuple | None = None):
    """One (token block i, output tile): y[w][block, tile] (+ base) for the weight owning the tile
    (with columns: y[block, columns[w] + tile] of the one fused output)."""
    n_slots = refs[n_weights].shape[0]
    i, tile = pl.program_id(0), pl.program_id(1)
    t0 = i * bt
    live, token_sets = _load_block_slots(slot_ref, m_ref, t0, bt, n_tokens, n_slots, mixture)

    def body(n0, c0, h_ref, b_ref, scale_ref, rank_ref, base_ref, y_ref):
        d_out, rb = b_ref.shape[-1], h_ref.shape[-1]
        n_ok = n0 + jnp.arange(bn) < d_out                                  # [BN], within the part
        full = d_out % bn == 0 and n_tokens % bt == 0
        mask = _mask(full, live[:, None] & n_ok[None, :])
        y = jnp.zeros((bt, bn), jnp.float32)
        if base_ref is not None:
            y = plt.load(base_ref.at[pl.ds(t0, bt), pl.ds(c0 + n0, bn)], mask=mask,
                         other=_mask(full, 0)).astype(jnp.float32)
        for j, (slots, sign) in enumerate(token_sets):
            def visit(u, rows, y):
                rank = jnp.minimum(rank_ref[u], b_ref.shape[1])

                def branch(c):
                    def run(y):
                        h = sum(h_ref[j, p, pl.ds(t0, bt), pl.ds(0, c)]
                                for p in range(h_ref.shape[1]))            # [BT, c]
                        b = plt.load(b_ref.at[u, pl.ds(0, c), pl.ds(n0, bn)],
                                     mask=(jnp.arange(c) < rank)[:, None] & n_ok[None, :],
                                     other=0)                               # [c, BN]
                        yu = jnp.dot(h.astype(b.dtype), b, preferred_element_type=jnp.float32)
                        return y + jnp.where(rows[:, None], (sign * scale_ref[u]) * yu, 0.0)
                    return run

                return _switch_on_rank(rank, rb, branch, y)

            y = _for_each_adapter(slots, visit, y)
        plt.store(y_ref.at[pl.ds(t0, bt), pl.ds(c0 + n0, bn)], y.astype(y_ref.dtype), mask=mask)

    _on_weight_tiles(refs, n_weights, has_base, tile, tile_offsets, bn, body, columns)


def _shrink_token_kernel(slot_ref, m_ref, x_ref, *refs, n_weights: int, bk: int, k_steps: int,
                         split_k: int, mixture: bool):
    """One (token t, D_in share p), vector math (no M >= 16 dot constraint):
    h[w][j, p, t] = x[t, K_p] @ A_w[u_j(t)][K_p, :rank_w] for every set j with u_j(t) >= 0."""
    a_refs, rank_refs, h_refs = refs[:n_weights], refs[n_weights:2 * n_weights], refs[2 * n_weights:]
    d_in = x_ref.shape[1]
    t, p = pl.program_id(0), pl.program_id(1)
    full_k = d_in == bk * k_steps * split_k
    for j, (u, _) in enumerate(_token_sets(slot_ref[t], True, m_ref[0], a_refs[0].shape[0], mixture)):
        @pl.when(u >= 0)
        def _():
            ranks = [jnp.minimum(r[u], a.shape[-1]) for r, a in zip(rank_refs, a_refs)]

            def step(s, accs):
                k0 = pl.multiple_of((p * k_steps + s) * bk, bk)
                k_ok = k0 + jnp.arange(bk) < d_in                           # [BK]
                xk = plt.load(x_ref.at[t, pl.ds(k0, bk)], mask=_mask(full_k, k_ok),
                              other=_mask(full_k, 0)).astype(jnp.float32)   # [BK]
                out = []
                for a_ref, rank, acc in zip(a_refs, ranks, accs):
                    rb = a_ref.shape[-1]
                    a = plt.load(a_ref.at[u, pl.ds(k0, bk), pl.ds(0, rb)],
                                 mask=k_ok[:, None] & (jnp.arange(rb) < rank)[None, :], other=0)
                    out.append(acc + jnp.sum(xk[:, None] * a.astype(jnp.float32), axis=0))
                return out

            accs = jax.lax.fori_loop(0, k_steps, step, [jnp.zeros((a.shape[-1],), jnp.float32) for a in a_refs])
            for h_ref, acc in zip(h_refs, accs):
                plt.store(h_ref.at[jnp.int32(j), p, t, pl.ds(0, acc.shape[0])], acc)


def _expand_token_kernel(slot_ref, m_ref, *refs, n_weights: int, bn: int, tile_offsets: tuple,
                         mixture: bool, has_base: bool, columns: tuple | None = None):
    """One (token t, output tile), vector math: y[w][t, tile] (+ base) for the weight owning it
    (with columns: y[t, columns[w] + tile] of the one fused output)."""
    t, tile = pl.program_id(0), pl.program_id(1)
    token_sets = _token_sets(slot_ref[t], True, m_ref[0], refs[n_weights].shape[0], mixture)

    def body(n0, c0, h_ref, b_ref, scale_ref, rank_ref, base_ref, y_ref):
        d_out, rb = b_ref.shape[-1], h_ref.shape[-1]
        full_n = d_out % bn == 0
        n_ok = n0 + jnp.arange(bn) < d_out                                  # [BN], within the part
        y = jnp.zeros((bn,), jnp.float32)
        for j, (u, sign) in enumerate(token_sets):
            uc = jnp.maximum(u, 0)
            rows = jnp.arange(rb) < jnp.where(u >= 0, jnp.minimum(rank_ref[uc], b_ref.shape[1]), 0)
            h = sum(plt.load(h_ref.at[jnp.int32(j), jnp.int32(p), t, pl.ds(0, rb)], mask=rows, other=0)
                    for p in range(h_ref.shape[1]))                         # [RB]; 0 where u < 0
            b = plt.load(b_ref.at[uc, pl.ds(0, rb), pl.ds(n0, bn)],
                         mask=rows[:, None] & n_ok[None, :], other=0)       # [RB, BN]
            y = y + (sign * scale_ref[uc]) * jnp.sum(h[:, None] * b.astype(jnp.float32), axis=0)
        if base_ref is not None:
            y = y + plt.load(base_ref.at[t, pl.ds(c0 + n0, bn)], mask=_mask(full_n, n_ok),
                             other=_mask(full_n, 0)).astype(jnp.float32)
        plt.store(y_ref.at[t, pl.ds(c0 + n0, bn)], y.astype(y_ref.dtype), mask=_mask(full_n, n_ok))

    _on_weight_tiles(refs, n_weights, has_base, tile, tile_offsets, bn, body, columns)


def _shrink(x, weights, slot, merged, *, tile: TileConfig, t_pad: int, mixture: bool,
            interpret: bool, poison: bool):
    """Partial sums h[w]: [J, split_k, t_pad, RB] float32 (rows without an adapter unwritten)."""
    n_tokens, d_in = x.shape
    bt, bk = tile.shrink_block_t, tile.block_k
    k_steps = _cdiv(_cdiv(d_in, bk), tile.split_k)
    n_sets = 2 if mixture else 1
    shapes = [jax.ShapeDtypeStruct((n_sets, tile.split_k, t_pad, _padded_rank(w.a.shape[-1])),
                                   jnp.float32) for w in weights]
    args = [slot, merged, x, *[w.a for w in weights], *[w.rank for w in weights]]
    if bt == 1:
        kernel = functools.partial(_shrink_token_kernel, n_weights=len(weights), bk=bk, k_steps=k_steps,
                                   split_k=tile.split_k, mixture=mixture)
    else:
        kernel = functools.partial(_shrink_kernel, n_weights=len(weights), bt=bt, bk=bk,
                                   k_steps=k_steps, split_k=tile.split_k, mixture=mixture)
    return _call(kernel, args, shapes, poison=poison, grid=(_cdiv(n_tokens, bt), tile.split_k),
                 warps=tile.shrink_warps, stages=tile.shrink_stages, interpret=interpret, name="atmm_shrink")


def _expand(hs, weights, slot, merged, n_tokens: int, dtype, *, tile: TileConfig,
            mixture: bool, interpret: bool, poison: bool, base=None, columns: tuple | None = None):
    """y[w] = delta_w [T, D_out_w] in dtype, or base[w] + delta_w written over base[w]; with
    columns, the one fused base [T, N] with each delta_w added at columns[w], written over it."""
    bt, bn = tile.expand_block_t, tile.block_n
    tiles = np.cumsum([0] + [_cdiv(w.b.shape[-1], bn) for w in weights])
    if columns is not None:
        shapes = [jax.ShapeDtypeStruct(base[0].shape, dtype)]
    else:
        shapes = [jax.ShapeDtypeStruct((n_tokens, w.b.shape[-1]), dtype) for w in weights]
    args = [slot, merged, *hs, *[w.b for w in weights], *[w.scale.astype(jnp.float32) for w in weights],
            *[w.rank for w in weights]]
    common = dict(n_weights=len(weights), bn=bn, tile_offsets=tuple(int(t) for t in tiles), mixture=mixture,
                  has_base=base is not None, columns=columns)
    if bt == 1:
        kernel = functools.partial(_expand_token_kernel, **common)
    else:
        kernel = functools.partial(_expand_kernel, bt=bt, n_tokens=n_tokens, **common)
    return _call(kernel, args, shapes, poison=poison, grid=(_cdiv(n_tokens, bt), int(tiles[-1])),
                 warps=tile.expand_warps, stages=tile.expand_stages, interpret=interpret, name="atmm_expand",
                 base=base)


def _call(kernel, args, shapes, *, poison: bool, grid, warps: int, stages: int, interpret: bool, name: str,
          base=None):
    """pallas_call of kernel(*input refs, *output refs). Outputs are written over `base` (aliased
    inputs the kernel reads), or, with poison, over NaN-filled buffers the kernel never sees."""
    aliases = {}
    if base is not None:
        aliases = {len(args) + k: k for k in range(len(shapes))}
        args = [*args, *base]
    elif poison:
        aliases = {len(args) + k: k for k in range(len(shapes))}
        kernel = _ignore_aliased_inputs(kernel, len(args), len(shapes))
        args = [*args, *[jnp.full(s.shape, jnp.nan, s.dtype) for s in shapes]]
    return pl.pallas_call(
        kernel,
        out_shape=shapes,
        grid=grid,
        input_output_aliases=aliases,
        compiler_params=plt.CompilerParams(num_warps=warps, num_stages=stages),
        interpret=interpret,
        name=name,
    )(*args)


def _pad_rank(w: LoraWeight) -> LoraWeight:
    """Pads R up to the kernel's RB (a copy: pools should use a power of 2 >= 16 as R)."""
    r = w.a.shape[-1]
    if r == _padded_rank(r):
        return w
    pad = _padded_rank(r) - r
    return w._replace(a=jnp.pad(w.a, ((0, 0), (0, 0), (0, pad))),
                      b=jnp.pad(w.b, ((0, 0), (0, pad), (0, 0))))


def _ignore_aliased_inputs(kernel, n_inputs: int, n_aliased: int):
    """A kernel taking (inputs..., aliased poison inputs..., outputs...) that skips the poison."""
    def wrapped(*refs):
        return kernel(*refs[:n_inputs], *refs[n_inputs + n_aliased:])
    return wrapped


@functools.partial(jax.jit, static_argnames=("mixture", "tile", "interpret", "poison", "columns"))
def _lora_delta(x, weights, slot, merged_slot, base=None, *, mixture: bool, tile: TileConfig,
                interpret: bool, poison: bool = False, columns: tuple | None = None):
    n_tokens = x.shape[0]
    if tile.kernel == "mosaic":
        merged = jnp.asarray(merged_slot, jnp.int32).reshape(())
        sets = _token_sets(slot, jnp.ones(n_tokens, bool), merged, weights[0].a.shape[0], mixture)
        return atmm_mosaic.lora_delta_mosaic(
            x, weights, sets, block_k=tile.block_k, split_k=tile.split_k, block_n=tile.block_n,
            stages=tile.shrink_stages, interpret=interpret, base=base, columns=columns, poison=poison)
    bt = max(tile.shrink_block_t, tile.expand_block_t)
    t_pad = _cdiv(n_tokens, bt) * bt
    merged = jnp.asarray(merged_slot, jnp.int32).reshape(1)
    weights = [_pad_rank(w._replace(rank=w.rank.astype(jnp.int32))) for w in weights]
    common = dict(tile=tile, mixture=mixture, interpret=interpret, poison=poison)
    hs = _shrink(x, weights, slot, merged, t_pad=t_pad, **common)
    return tuple(_expand(hs, weights, slot, merged, n_tokens, x.dtype, base=base, columns=columns, **common))


def lora_delta(
    x: jax.Array,
    weights: Sequence[LoraWeight],
    slot: jax.Array,
    merged_slot: jax.Array | int = -1,
    *,
    mixture: bool = False,
    tile: TileConfig | None = None,
    interpret: bool = False,
    base: Sequence[jax.Array] | None = None,
    columns: Sequence[int] | None = None,
    kernels: str | None = None,
) -> tuple[jax.Array, ...]:
    """LoRA deltas of several weights sharing the input x, by the ATMM kernels.

    Same semantics as `lora_delta_reference` (see there):
        y[w][t] = [a != m or not mixture] * ([a >= 0] delta_w(a) - [mixture, m >= 0] delta_w(m))
        with a = slot[t], delta_w(s) = scale_w[s] * x[t] @ A_w[s][:, :rank_w[s]] @ B_w[s][:rank_w[s]]
    Slot ids outside [-1, S) (PAD_SLOT for padding tokens) add nothing in either mode; ranks
    above R count as R. With columns (the weights are parts of one fused linear):
        out[t, c_w : c_w + D_out_w] = base[0][t, c_w : c_w + D_out_w] + y[w][t]     (c_w = columns[w])
        out[t, n]                   = base[0][t, n] for every column n no part owns

    Args:
      x: [T, D_in] float32 / bfloat16 / float16 tokens.
      weights: LoraWeights with a [S, D_in, R_w] and b [S, R_w, D_out_w] in x.dtype, the same S.
      slot: [T] int32 adapter slot per token (-1 = base model only, PAD_SLOT = padding).
      merged_slot: int32 scalar, the merged adapter (mixture mode only).
      mixture: whether the step runs in mixture (deLoRA) mode.
      tile: the tile shapes and kernels; None = pick from the device's tuned table by shape bucket.
      interpret: run the kernels in the Pallas interpreter (CPU tests).
      base: optional [T, D_out_w] arrays in x.dtype (the base projections): then the result is
        base[w] + y[w], accumulated in float32 and written over base[w]'s buffer (inside a jit
        where base[w] is not used afterwards, no extra pass over the outputs). With columns:
        required, exactly one [T, N] array in x.dtype (the fused base projection).
      columns: optional static ints, weight w's first output column in the fused output; the
        parts' ranges [columns[w], columns[w] + D_out_w) must lie in [0, N) and not overlap.
      kernels: with tile None, whose tiles to pick: "triton", "mosaic" (bfloat16 / float16 only) or
        None = the device's (tiling.device_kernels).
    Returns: one [T, D_out_w] array per weight, in x.dtype; with columns, a tuple of one [T, N]
      array, base[0] with each weight's delta added at its columns (float32 accumulation, written
      over base[0]'s buffer; columns no part owns are base[0]'s, bit for bit).
    Raises: ValueError for inconsistent shapes or dtypes, bad base / columns, and, where slot /
      merged_slot / rank are host values, for slot ids outside [-1, S) other than PAD_SLOT and
      ranks outside [0, R].
    """
    weights = tuple(weights)
    _validate(x, weights, slot, merged_slot)
    if columns is not None:
        base = _validate_fused_base(base, x)
        columns = _check_columns(columns, [w.b.shape[-1] for w in weights], base[0].shape[1], "weights")
    elif base is not None:
        base = tuple(base)
        want = [(x.shape[0], w.b.shape[-1]) for w in weights]
        got = [(getattr(b, "shape", None), getattr(b, "dtype", None)) for b in base]
        if [g[0] for g in got] != want or any(g[1] != x.dtype for g in got):
            raise ValueError(f"base must be {len(want)} arrays of shapes {want} in {x.dtype}, got {got}")
    if tile is None:
        n_tokens, d_in = x.shape
        n_slots = weights[0].a.shape[0]
        tile = pick_tile(n_tokens, d_in, sum(w.b.shape[-1] for w in weights),
                         max(w.a.shape[-1] for w in weights), min(n_slots, n_tokens),
                         device_kind="interpret" if interpret else None, kernels=kernels)
    return _lora_delta(x, weights, jnp.asarray(slot), merged_slot, base, mixture=mixture, tile=tile,
                       interpret=interpret, columns=columns)


def _validate_fused_base(base, x) -> tuple:
    """base of the columns mode: a sequence of exactly one [T, N] array in x.dtype."""
    n_tokens = x.shape[0]
    if not isinstance(base, (list, tuple)) or len(base) != 1:
        got = type(base).__name__ if not isinstance(base, (list, tuple)) else f"{len(base)} arrays"
        raise ValueError(f"with columns, base must be a sequence of one [T={n_tokens}, N] array in "
                         f"{x.dtype}, got {got}")
    (b,) = base
    shape, dtype = getattr(b, "shape", None), getattr(b, "dtype", None)
    if shape is None or len(shape) != 2 or shape[0] != n_tokens or dtype != x.dtype:
        raise ValueError(f"with columns, base must be one [T={n_tokens}, N] array in {x.dtype}, got "
                         f"{dtype}{list(shape) if shape is not None else type(b).__name__}")
    return (b,)


def _check_columns(columns, widths: Sequence[int], n: int, what: str) -> tuple[int, ...]:
    """columns as a tuple of ints: one per part, part k's range [columns[k], columns[k] + widths[k])
    inside [0, n), no two ranges overlapping; else ValueError naming the culprit."""
    columns = tuple(columns)
    if len(columns) != len(widths):
        raise ValueError(f"columns has {len(columns)} entries for {len(widths)} {what}")
    not_ints = [k for k, c in enumerate(columns) if isinstance(c, bool) or not isinstance(c, (int, np.integer))]
    if not_ints:
        raise ValueError(f"columns[{not_ints[0]}]={columns[not_ints[0]]!r} must be a static int")
    columns = tuple(int(c) for c in columns)
    for k, (c, d) in enumerate(zip(columns, widths)):
        if c < 0 or c + d > n:
            raise ValueError(f"columns[{k}]={c}: part {k}'s columns [{c}, {c + d}) outside [0, N={n})")
    spans = sorted((c, c + d, k) for k, (c, d) in enumerate(zip(columns, widths)))
    for (c0, e0, k0), (c1, e1, k1) in itertools.pairwise(spans):
        if c1 < e0:
            raise ValueError(f"columns[{k0}]={c0} and columns[{k1}]={c1}: part ranges [{c0}, {e0}) and "
                             f"[{c1}, {e1}) overlap")
    return columns


def _validate(x, weights, slot, merged_slot):
    """Static checks (shapes, dtypes; values only of host arrays): ValueError naming the culprit."""
    if getattr(x, "ndim", None) != 2:
        raise ValueError(f"x must be [T, D_in], got shape {getattr(x, 'shape', None)}")
    if x.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"x dtype {x.dtype} not supported; expected one of float32, bfloat16, float16")
    n_tokens, d_in = x.shape
    if not weights:
        raise ValueError("weights is empty")
    n_slots = weights[0].a.shape[0] if getattr(weights[0].a, "ndim", 0) == 3 else None
    for k, w in enumerate(weights):
        if not isinstance(w, LoraWeight):
            raise ValueError(f"weights[{k}] is {type(w).__name__}, expected LoraWeight")
        if w.a.ndim != 3 or w.a.shape[:2] != (n_slots, d_in):
            raise ValueError(f"weights[{k}].a shape {w.a.shape} != [S={n_slots}, D_in={d_in}, R]")
        r = w.a.shape[2]
        if w.b.ndim != 3 or w.b.shape[:2] != (n_slots, r):
            raise ValueError(f"weights[{k}].b shape {w.b.shape} != [S={n_slots}, R={r}, D_out]")
        for name in ("a", "b"):
            if getattr(w, name).dtype != x.dtype:
                raise ValueError(f"weights[{k}].{name} dtype {getattr(w, name).dtype} != x dtype {x.dtype}")
        if w.scale.shape != (n_slots,) or not jnp.issubdtype(w.scale.dtype, jnp.floating):
            raise ValueError(f"weights[{k}].scale must be float [S={n_slots}], got "
                             f"{w.scale.dtype}{list(w.scale.shape)}")
        if w.rank.shape != (n_slots,) or not jnp.issubdtype(w.rank.dtype, jnp.integer):
            raise ValueError(f"weights[{k}].rank must be int [S={n_slots}], got "
                             f"{w.rank.dtype}{list(w.rank.shape)}")
        if isinstance(w.rank, np.ndarray) and ((w.rank < 0) | (w.rank > r)).any():
            raise ValueError(f"weights[{k}].rank {w.rank.tolist()} outside [0, R={r}]")
    if getattr(slot, "shape", None) != (n_tokens,) or slot.dtype != jnp.int32:
        raise ValueError(f"slot must be int32 [T={n_tokens}], got "
                         f"{getattr(slot, 'dtype', type(slot).__name__)}{list(getattr(slot, 'shape', ()))}")
    if isinstance(slot, np.ndarray):
        bad = slot[((slot < -1) | (slot >= n_slots)) & (slot != PAD_SLOT)]
        if bad.size:
            raise ValueError(f"slot ids {sorted(set(bad.tolist()))} outside [-1, S={n_slots}) "
                             f"and not PAD_SLOT ({PAD_SLOT})")
    if isinstance(merged_slot, (int, np.integer)):
        if not -1 <= merged_slot < n_slots:
            raise ValueError(f"merged_slot {merged_slot} outside [-1, S={n_slots})")
    elif getattr(merged_slot, "shape", None) not in ((), (1,)) or not jnp.issubdtype(
            merged_slot.dtype, jnp.integer):
        raise ValueError(f"merged_slot must be an int32 scalar, got {merged_slot!r}")
