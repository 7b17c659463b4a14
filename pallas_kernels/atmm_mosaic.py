"""ATMM on Mosaic GPU (Hopper): `atmm.lora_delta`'s semantics with TMA copies and wgmma.

Tokens stay in their order, cut into blocks of BLOCK_T = 64 rows (one warpgroup's wgmma). A plan
made from the slots alone (plain XLA, the same for every weight and layer of a step, so a jitted
step keeps one copy) lists each block's distinct adapters per token set j (`atmm._token_sets`):

    adapters[j, b, k] = the k-th distinct adapter of block b in set j, ascending (k < count[j, b])
    which[j, t]       = k of token t's adapter in its block's list; -1 = nothing to add

    shrink (grid: blocks x split_k): one TMA pipeline over (k, step of the share K_p of D_in) feeds
        x[block, K_p] @ A_w[u_k][K_p, :RB] into one accumulator per weight (x loaded once for all
        the weights of a launch, as many as shared memory holds), never reset: after adapter k's
        last step, the rows with which == k keep acc - acc after adapter k - 1's:
            h[w][j, p, block] = [BLOCK_T, RB] float32
    expand (grid: blocks x output tiles of every weight): one accumulator per [BLOCK_T, BN] tile,
            acc = sum_j sum_k (sign_j * scale_w[u_k] * mask_k(sum_p h[w][j, p, block])) @ B_w[u_k][:RB, tile]
        (mask_k: rows with which == k, columns < rank_w[u_k]; the B tiles come through a 2-deep
        pipeline over k, the base tile's load overlaps them), then y = base tile + acc (float32),
        rounded once, written by TMA.

With base, outputs are written over the base buffers (in place); with columns, over the one fused
base, where columns no part owns are never visited. Shapes off the blocks are padded in the wrapper
(T % 64: a copy of x and the outputs' rows; D_in % 16 or widths off BN: of the adapters too; fused
columns off BN: each part apart, then scattered into the base), copies that serving widths never pay. bfloat16 and
float16 only (wgmma operands). Adapter padding beyond a slot's rank must be finite (pools hold
zeros there): it is read, then masked by select.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.lora_reference import LoraWeight

BLOCK_T = 64
"""Tokens per program: the rows of one warpgroup's wgmma."""
SMEM_BYTES = 200 << 10
"""Shared memory a program of the Mosaic kernels may take (a Hopper SM has 227 KB)."""
DTYPES = (jnp.bfloat16, jnp.float16)
_WGMMA = plgpu.Layout.WGMMA


def _pow2_divisor(n: int, cap: int) -> int:
    """The largest power of 2 <= cap dividing n (1 if n is odd)."""
    return min(cap, n & -n) if n else cap


def _swizzled(minor: int, dtype) -> tuple:
    """SMEM transforms of a wgmma operand (or staging tile) with `minor` elements per row: both
    operands of one wgmma must share the swizzle, so callers pass the narrower minor dim."""
    bits = jnp.dtype(dtype).itemsize * 8
    swizzle = plgpu.find_swizzle(minor * bits)
    return plgpu.TilingTransform((8, swizzle * 8 // bits)), plgpu.SwizzleTransform(swizzle)


def _rows(vector, width: int):
    """A [BLOCK_T] row vector (WGMMA row layout) broadcast to [BLOCK_T, width] in WGMMA layout."""
    return plgpu.layout_cast(jax.lax.broadcast_in_dim(vector, (BLOCK_T, width), (0,)), _WGMMA)


def _columns_below(bound, width: int):
    """[BLOCK_T, width] bool, column < bound."""
    return plgpu.broadcasted_iota(jnp.int32, (BLOCK_T, width), 1, layout=_WGMMA) < bound


def _load_which(which, b, n_sets: int, body):
    """body(rows) with rows[j] = which[j, block b] as [BLOCK_T] WGMMA row vectors."""
    def scoped(which_s, bar):
        plgpu.copy_gmem_to_smem(which.at[:, pl.ds(b * BLOCK_T, BLOCK_T)], which_s, bar)
        plgpu.barrier_wait(bar)
        return body([plgpu.load(which_s.at[j], layout=_WGMMA.reduce(1)) for j in range(n_sets)])
    return pl.run_scoped(scoped, plgpu.SMEM((n_sets, BLOCK_T), jnp.int32), plgpu.Barrier(num_arrivals=1))


def _shrink_body(adapters, counts, which, x, *refs, n_weights: int, n_sets: int, bk: int, k_steps: int,
                 stages: int):
    """Program (b, p): h[w][j, p, block b] for every weight w and token set j."""
    a_refs, h_refs = refs[:n_weights], refs[n_weights:]
    rb = a_refs[0].shape[-1]
    b, p = jax.lax.axis_index("b"), jax.lax.axis_index("p")
    operand = _swizzled(min(bk, rb), x.dtype)
    x_spec = plgpu.BlockSpec((BLOCK_T, bk), lambda k, s: (b, p * k_steps + s), transforms=operand)
    zero = plgpu.layout_cast(jnp.zeros((BLOCK_T, rb), jnp.float32), _WGMMA)

    def with_rows(rows):
        def scoped(*buffers):
            kept, before = buffers[:n_weights], buffers[n_weights:]
            for j in range(n_sets):
                token_k = _rows(rows[j], rb)
                for buffer in buffers:
                    buffer[...] = zero

                def products(*accs, j=j):
                    """One pipeline over (k, K_p step) feeding x[block, K_p] @ A_w[u_k][K_p] into accs, never
                    reset: after adapter k's last step, its rows keep acc - (acc after adapter k - 1's)."""
                    def step(index, x_s, *a_s):
                        k, s = index
                        for acc, a in zip(accs, a_s):
                            plgpu.wgmma(acc, x_s, a)
                        plgpu.wgmma_wait(0)

                        @pl.when(s == k_steps - 1)
                        def _():
                            for acc, h, h0 in zip(accs, kept, before):
                                now = acc[...]
                                h[...] = jnp.where(token_k == k, now - h0[...], h[...])
                                h0[...] = now

                    a_spec = plgpu.BlockSpec((None, bk, rb), lambda k, s: (adapters[j, b, k], p * k_steps + s, 0),
                                             transforms=operand)
                    plgpu.emit_pipeline(step, grid=(counts[j, b], k_steps), in_specs=[x_spec] + [a_spec] * n_weights,
                                        max_concurrent_steps=stages)(x, *a_refs)

                pl.run_scoped(products, *[plgpu.ACC((BLOCK_T, rb), jnp.float32)] * n_weights)
                plgpu.commit_smem()
                for h_ref, h in zip(h_refs, kept):
                    plgpu.copy_smem_to_gmem(h, h_ref.at[j, p, pl.ds(b * BLOCK_T, BLOCK_T)])
                plgpu.wait_smem_to_gmem(0)

        staging = plgpu.SMEM((BLOCK_T, rb), jnp.float32, transforms=_swizzled(rb, jnp.float32))
        pl.run_scoped(scoped, *[staging] * (2 * n_weights))

    _load_which(which, b, n_sets, with_rows)


def _expand_body(adapters, counts, which, *refs, n_weights: int, signs: tuple, bn: int, tile_offsets: tuple,
                 columns: tuple | None, has_base: bool):
    """Program (b, tile): the output tile of the weight that owns it, over base (or from zero)."""
    groups = [refs[k * n_weights:(k + 1) * n_weights] for k in range(4)]
    outs = refs[4 * n_weights:]
    if columns is not None:
        outs, offsets = outs * n_weights, columns
    else:
        offsets = (0,) * n_weights
    b, tile = jax.lax.axis_index("b"), jax.lax.axis_index("n")
    n_sets = len(signs)

    def weight_tile(n_block, c0, h_ref, b_ref, scale_ref, rank_ref, out_ref, rows):
        split_k, rb = h_ref.shape[1], h_ref.shape[-1]
        dtype = b_ref.dtype
        block = pl.ds(b * BLOCK_T, BLOCK_T)
        target = out_ref.at[block, pl.ds(c0 + n_block * bn, bn)]
        operand = _swizzled(min(rb, bn), dtype)

        def scoped(h_s, hu_s, y_s, h_bar, y_bar):
            if has_base:                                                # in flight while the deltas accumulate
                plgpu.copy_gmem_to_smem(target, y_s, y_bar)

            def accumulate(acc):
                for j, sign in enumerate(signs):
                    plgpu.copy_gmem_to_smem(h_ref.at[j, :, block], h_s, h_bar)
                    plgpu.barrier_wait(h_bar)
                    h = sum(h_s[q] for q in range(split_k))                          # [BLOCK_T, RB] float32
                    token_k = _rows(rows[j], rb)

                    def step(index, b_s):                                # B_w[u_k]'s tile, loads pipelined over k
                        (k,) = index
                        u = adapters[j, b, k]
                        keep = (token_k == k) & _columns_below(rank_ref[u], rb)
                        hu_s[...] = jnp.where(keep, h * (sign * scale_ref[u]), 0.0).astype(dtype)
                        plgpu.commit_smem()
                        plgpu.wgmma(acc, hu_s, b_s)
                        plgpu.wgmma_wait(0)

                    b_spec = plgpu.BlockSpec((None, rb, bn), lambda k, j=j: (adapters[j, b, k], 0, n_block),
                                             transforms=operand)
                    plgpu.emit_pipeline(step, grid=(counts[j, b],), in_specs=[b_spec], max_concurrent_steps=2)(b_ref)
                return acc[...]

            y = pl.run_scoped(accumulate, plgpu.ACC((BLOCK_T, bn), jnp.float32))
            if has_base:
                plgpu.barrier_wait(y_bar)
                y = y + y_s[...].astype(jnp.float32)
            y_s[...] = y.astype(y_s.dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(y_s, target)
            plgpu.wait_smem_to_gmem(0)

        pl.run_scoped(
            scoped,
            plgpu.SMEM((split_k, BLOCK_T, rb), jnp.float32, transforms=_swizzled(rb, jnp.float32)),
            plgpu.SMEM((BLOCK_T, rb), dtype, transforms=operand),
            plgpu.SMEM((BLOCK_T, bn), out_ref.dtype, transforms=_swizzled(bn, out_ref.dtype)),
            *[plgpu.Barrier(num_arrivals=1)] * 2)

    def with_rows(rows):
        for w, (c0, *weight_refs, out_ref) in enumerate(zip(offsets, *groups, outs)):
            first, last = tile_offsets[w], tile_offsets[w + 1]
            pl.when((tile >= first) & (tile < last))(
                functools.partial(weight_tile, tile - first, c0, *weight_refs, out_ref, rows))

    _load_which(which, b, n_sets, with_rows)


def _launch(body, args, outs, *, grid: tuple, names: tuple, interpret: bool, in_place: bool):
    """body(*arg refs, *out refs) over the grid: outs written in place (in_place: the given
    arrays are the outputs' initial values, aliased) or fresh buffers of outs' shapes."""
    params = dict(compiler_params=plgpu.CompilerParams(), interpret=plgpu.InterpretGPUParams() if interpret else None)
    if not in_place:
        return plgpu.kernel(body, out_type=tuple(outs), grid=grid, grid_names=names, **params)(*args)

    def stateful(refs):
        pl.kernel(lambda: body(*refs), out_type=(), mesh=plgpu.Mesh(grid=grid, grid_names=names), **params)()

    return tuple(pl.run_state(stateful)((*args, *outs))[len(args):])


def block_plan(sets, n_slots: int, t_pad: int):
    """(adapters [J, NB, U], counts [J, NB], which [J, t_pad]) int32 of the token sets' per-token
    adapters sets [J][T] (-1 = none; U = min(BLOCK_T, n_slots)): see the module docstring."""
    ids = jnp.stack([jnp.pad(s, (0, t_pad - s.shape[0]), constant_values=-1) for s in sets])   # [J, t_pad]
    n_sets, n_blocks, width = len(sets), t_pad // BLOCK_T, min(BLOCK_T, n_slots)
    per_block = ids.reshape(n_sets, n_blocks, BLOCK_T)
    present = (per_block[..., None] == jnp.arange(n_slots)).any(axis=2)                         # [J, NB, S]
    counts = present.sum(-1, dtype=jnp.int32)
    order = jnp.argsort(jnp.where(present, 0, 1) * n_slots + jnp.arange(n_slots), axis=-1)[..., :width]
    adapters = jnp.where(jnp.arange(width) < counts[..., None], order, -1).astype(jnp.int32)
    position = jnp.cumsum(present, axis=-1, dtype=jnp.int32) - 1                              # [J, NB, S]
    index = jnp.take_along_axis(position, jnp.maximum(per_block, 0), axis=-1)
    which = jnp.where(per_block >= 0, index, -1).reshape(n_sets, t_pad)
    return adapters, counts, which


def _shrink_plan(n_weights: int, rb: int, bk: int, stages: int, itemsize: int) -> tuple[int, int, int]:
    """(weights per shrink launch, block_k, stages) within SMEM_BYTES (the pipeline's x and adapter
    tiles, two [BLOCK_T, RB] float32 buffers per weight): as many weights per launch as fit (x is
    read once per launch), at the given pipeline, else 2 stages, else narrower steps."""
    def smem(n, bk, stages):
        return stages * (BLOCK_T * bk + n * bk * rb) * itemsize + 2 * n * BLOCK_T * rb * 4

    pipelines = [(bk, stages), (bk, min(stages, 2))] + [(bk >> i, min(stages, 2)) for i in range(1, 4) if bk >> i >= 16]
    for n in range(n_weights, 0, -1):
        for k, st in pipelines:
            if smem(n, k, st) <= SMEM_BYTES:
                return n, k, st
    return 1, *pipelines[-1]


def _pad_to(a, shape):
    return a if a.shape == tuple(shape) else jnp.pad(a, [(0, n - d) for d, n in zip(a.shape, shape)])


def lora_delta_mosaic(x, weights, sets, *, block_k: int, split_k: int, block_n: int, stages: int,
                      interpret: bool, base=None, columns: tuple | None = None, poison: bool = False):
    """The Mosaic GPU ATMM (traced inside `atmm._lora_delta`; arguments already validated).

    x [T, D_in]; weights with a [S, D_in, R_w], b [S, R_w, D_out_w]; sets: (per-token adapter [T]
    int32, sign) per token set, from `atmm._token_sets`. Returns `atmm.lora_delta`'s outputs:
    deltas [T, D_out_w] in x.dtype, or base[w] + delta (base given), or with columns the one fused
    base [T, N] with each delta added at its columns.
    """
    n_tokens, d_in = x.shape
    if x.dtype not in DTYPES:
        raise ValueError(f"the mosaic ATMM takes bfloat16 or float16 tokens, got {x.dtype}: use a triton tile "
                         "(or the reference) for float32")
    widths = [w.b.shape[-1] for w in weights]
    if n_tokens == 0:
        return tuple(base) if base is not None else tuple(jnp.zeros((0, d), x.dtype) for d in widths)
    t_pad = pl.cdiv(n_tokens, BLOCK_T) * BLOCK_T
    rb = max(max(16, 1 << (w.a.shape[-1] - 1).bit_length()) for w in weights)
    block_n = min(block_n, max(16, 16384 // rb))            # the expand's two B tiles in flight: <= 64 KB
    bn = _pow2_divisor(int(np.gcd.reduce(widths + list(columns or []))), block_n)
    if columns is not None and bn < 16:                      # parts off the blocks: per part, then scattered
        parts = [base[0][:, c:c + d] for c, d in zip(columns, widths)]
        ys = lora_delta_mosaic(x, weights, sets, block_k=block_k, split_k=split_k, block_n=block_n,
                               stages=stages, interpret=interpret, base=parts)
        out = base[0]
        for c, y in zip(columns, ys):
            out = out.at[:, c:c + y.shape[1]].set(y)
        return (out,)
    if bn < 16:
        bn = min(block_n, max(16, 1 << (min(widths) - 1).bit_length()))
    per_launch, bk, stages = _shrink_plan(len(weights), rb, max(16, _pow2_divisor(d_in, block_k)), stages,
                                          x.dtype.itemsize)
    split_k = min(split_k, max(1, 256 // rb))                # the expand holds a block's partial sums: <= 64 KB
    split = _pow2_divisor(max(1, d_in // bk), split_k)
    d_pad = pl.cdiv(d_in, bk * split) * bk * split
    n_slots = weights[0].a.shape[0]
    n_pads = [pl.cdiv(d, bn) * bn for d in widths]
    weights = [LoraWeight(_pad_to(w.a, (n_slots, d_pad, rb)), _pad_to(w.b, (n_slots, rb, n)),
                          w.scale.astype(jnp.float32), w.rank.astype(jnp.int32)) for w, n in zip(weights, n_pads)]
    adapters, counts, which = block_plan([s for s, _ in sets], n_slots, t_pad)
    n_blocks, n_sets = t_pad // BLOCK_T, len(sets)
    plan = (adapters, counts, which)
    x = _pad_to(x, (t_pad, d_pad))
    hs = []
    for first in range(0, len(weights), per_launch):
        group = weights[first:first + per_launch]
        hs += _launch(
            functools.partial(_shrink_body, n_weights=len(group), n_sets=n_sets, bk=bk, k_steps=d_pad // bk // split,
                              stages=stages),
            (*plan, x, *[w.a for w in group]),
            [jax.ShapeDtypeStruct((n_sets, split, t_pad, rb), jnp.float32)] * len(group),
            grid=(n_blocks, split), names=("b", "p"), in_place=False, interpret=interpret)

    tiles = tuple(int(t) for t in np.cumsum([0] + [n // bn for n in n_pads]))
    if columns is not None:
        outs = [_pad_to(base[0], (t_pad, base[0].shape[1]))]
    elif base is not None:
        outs = [_pad_to(y, (t_pad, n)) for y, n in zip(base, n_pads)]
    elif poison:
        outs = [jnp.full((t_pad, n), jnp.nan, x.dtype) for n in n_pads]
    else:
        outs = [jax.ShapeDtypeStruct((t_pad, n), x.dtype) for n in n_pads]
    ys = _launch(
        functools.partial(_expand_body, n_weights=len(weights), signs=tuple(sign for _, sign in sets), bn=bn,
                          tile_offsets=tiles, columns=columns, has_base=base is not None),
        (*plan, *hs, *[w.b for w in weights], *[w.scale for w in weights], *[w.rank for w in weights]),
        outs, grid=(n_blocks, tiles[-1]), names=("b", "n"), in_place=base is not None or poison, interpret=interpret)
    if columns is not None:
        return (ys[0][:n_tokens],)
    return tuple(y[:n_tokens, :d] for y, d in zip(ys, widths))
