"""Random ATMM, merge, prefill-, decode- and segment-attention problems and the kernel-vs-reference checks (shared
by tests/ and bench/gpu_smoke.py), for single and fused (columns) linears.

Problems use fresh random data: adapter padding beyond each slot's rank holds large garbage
(a kernel that reads it fails), slot 0 of every pool may be empty (rank 0), token layouts mimic
serving batches, prefill-attention caches hold NaN wherever no row attends. The kernel's outputs
are poisoned with NaN before it runs.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.atmm import _lora_delta
from pallas_kernels.decode_attention import decode_attention, decode_attention_reference
from pallas_kernels.lora_reference import (PAD_SLOT, LoraWeight, lora_delta_reference, merge_parts_reference,
                                           merge_weight_reference)
from pallas_kernels.merge import _merge, merge_parts
from pallas_kernels.prefill_attention import prefill_attention, prefill_attention_reference
from pallas_kernels.segment_attention import segment_attention, segment_attention_reference
from pallas_kernels.tiling import MergeTile, TileConfig, pick_tile

def lowered_for(device_kind: str, fn, *args) -> str:
    """The StableHLO text of jit(fn)(*args) lowered for a CUDA GPU of `device_kind` through an
    abstract device (JAX's public way to lower for a GPU that is not here; nothing runs)."""
    mesh = jax.sharding.AbstractMesh((1,), ("x",), abstract_device=jax.sharding.AbstractDevice(
        device_kind=device_kind, num_cores=None, platform="cuda"))
    with jax.sharding.use_abstract_mesh(mesh):
        return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


TOLERANCE = {"float32": 2e-3, "bfloat16": 2e-2, "float16": 5e-3}
"""Max relative Frobenius error per output, by dtype (float32 dots run as TF32 on GPU)."""

LAYOUTS = ("segments", "uniform", "skewed", "distinct")


@dataclasses.dataclass(frozen=True)
class Case:
    """One ATMM problem shape."""

    tokens: int
    d_in: int
    d_outs: tuple = (64,)
    max_rank: int = 16
    """R of every pool (ranks are drawn in [1, R], or fixed by `rank`)."""
    slots: int = 4
    rank: int | None = None
    """Every adapter's rank; None = mixed ranks (powers of 2 and odd ones up to R)."""
    layout: str = "segments"
    """How tokens pick slots: segments (requests of random length, some empty, some single
    tokens, some slot -1, some padding), uniform, skewed (one hot adapter), distinct (token t -> t % S)."""
    dtype: str = "float32"
    mixture: bool = False
    merged: str = "present"
    """Mixture mode only: the merged slot is 'present' among the tokens, 'absent', or 'none' (-1)."""


def _slots(case: Case, rng) -> np.ndarray:
    t, s = case.tokens, case.slots
    if case.layout == "uniform":
        return rng.integers(PAD_SLOT, s, t).astype(np.int32)
    if case.layout == "skewed":
        hot = rng.integers(0, s)
        return np.where(rng.random(t) < 0.8, hot, rng.integers(-1, s, t)).astype(np.int32)
    if case.layout == "distinct":
        return (np.arange(t) % s).astype(np.int32)
    out, pos = [], 0
    while pos < t:                                    # request segments, some empty or single
        n = min(t - pos, int(rng.choice([0, 1, 1 + rng.integers(0, max(1, t // 3))])))
        out += [int(rng.integers(PAD_SLOT, s))] * n
        pos += n
    return np.asarray(out, np.int32)


def _weight(case: Case, d_out: int, rng) -> LoraWeight:
    s, r = case.slots, case.max_rank
    if case.rank is not None:
        rank = np.full(s, case.rank)
    else:
        choices = sorted({min(r, v) for v in (1, 3, 8, 16, 24, 32, 64, 100, 128)})
        rank = rng.choice(choices, s)
    if s > 1:
        rank[0] = 0                                   # an empty slot
    a = rng.normal(size=(s, case.d_in, r)) / np.sqrt(case.d_in)
    b = rng.normal(size=(s, r, d_out)) / np.sqrt(r)
    for k in range(s):                                # garbage beyond the rank
        a[k, :, rank[k]:] = rng.uniform(100, 1000, (case.d_in, r - rank[k]))
        b[k, rank[k]:] = rng.uniform(100, 1000, (r - rank[k], d_out))
    return LoraWeight(jnp.asarray(a, case.dtype), jnp.asarray(b, case.dtype),
                      jnp.asarray(rng.uniform(0.5, 2.0, s), jnp.float32), jnp.asarray(rank, jnp.int32))


def make_problem(case: Case, seed: int):
    """(x [T, D_in], weights, slot [T] int32, merged_slot) drawn fresh from the seed."""
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(case.tokens, case.d_in)), case.dtype)
    weights = tuple(_weight(case, d, rng) for d in case.d_outs)
    slot = _slots(case, rng)
    used = sorted(set(slot[slot >= 0].tolist()) - {0})
    unused = sorted(set(range(1, case.slots)) - set(used))
    merged = -1
    if case.mixture and case.merged == "present" and used:
        merged = int(rng.choice(used))
    elif case.mixture and case.merged == "absent" and unused:
        merged = int(rng.choice(unused))
    return x, weights, jnp.asarray(slot), merged


def check(case: Case, seed: int = 0, tile: TileConfig | None = None, interpret: bool = False,
          with_base: bool = False) -> float:
    """Runs the kernel (outputs poisoned, or with_base: accumulated over random base outputs)
    and the reference; returns the worst relative error of the deltas.

    Raises AssertionError when an output holds NaN, exceeds TOLERANCE[dtype], or has a delta on
    a token that must get none.
    """
    x, weights, slot, merged = make_problem(case, seed)
    rng = np.random.default_rng(seed + 1)
    base = tuple(jnp.asarray(rng.normal(size=(case.tokens, d)), case.dtype) for d in case.d_outs) \
        if with_base else None
    if tile is None:
        tile = pick_tile(case.tokens, case.d_in, sum(case.d_outs), case.max_rank,
                         min(case.slots, case.tokens),
                         device_kind="interpret" if interpret else None)
    got = _lora_delta(x, weights, slot, jnp.int32(merged), base, mixture=case.mixture, tile=tile,
                      interpret=interpret, poison=True)
    if with_base:                                     # the rounded sums, as deltas
        got = [np.asarray(g, np.float32) - np.asarray(b, np.float32) for g, b in zip(got, base)]
    with jax.default_matmul_precision("highest"):
        want = lora_delta_reference(x, weights, slot, merged, mixture=case.mixture)
    slot = np.asarray(slot)
    silent = (slot == PAD_SLOT) | ((slot == merged) if case.mixture and merged >= 0 else (slot == -1))
    worst = 0.0
    for k, (g, w) in enumerate(zip(got, want)):
        g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
        assert g.shape == w.shape, (k, g.shape, w.shape)
        assert not np.isnan(g).any(), f"output {k}: {np.isnan(g).sum()} NaN (unwritten or garbage read)"
        assert not g[silent].any(), f"output {k}: nonzero delta on tokens that take none"
        err = float(np.linalg.norm(g - w) / max(np.linalg.norm(w), 1e-30))
        assert err <= TOLERANCE[case.dtype], f"output {k}: relative error {err:.3g} > {TOLERANCE[case.dtype]}"
        worst = max(worst, err)
    return worst


# The kernel-vs-reference grid of the CPU tests; bench/gpu_smoke.py runs it on the GPU too.
CASES = [
    # T from 1 up; mixed ranks up to 128; 1..16 slots; every layout; f32 and bf16.
    Case(1, 64, (64,), 16, 4, layout="uniform"),
    Case(2, 32, (32,), 16, 1, layout="distinct"),
    Case(17, 64, (48, 96), 32, 3, layout="segments"),
    Case(40, 64, (64,), 128, 16, layout="distinct"),
    Case(53, 96, (80,), 64, 8, layout="skewed", dtype="bfloat16"),
    Case(64, 64, (64, 32, 32), 16, 5, rank=16, layout="segments", dtype="bfloat16"),
    Case(33, 64, (64,), 8, 4, rank=8, layout="uniform", dtype="bfloat16"),   # R < 16
    Case(70, 48, (40,), 24, 6, layout="segments"),                           # R not a power of 2
    Case(100, 64, (64,), 128, 16, layout="uniform", dtype="bfloat16"),
    # mixture: merged slot present among the tokens, absent, or none
    Case(45, 64, (64, 48), 32, 6, layout="segments", mixture=True, merged="present"),
    Case(31, 64, (64,), 16, 6, layout="uniform", mixture=True, merged="absent", dtype="bfloat16"),
    Case(16, 32, (32,), 16, 4, layout="distinct", mixture=True, merged="none"),
    Case(1, 64, (64,), 64, 3, layout="uniform", mixture=True, merged="absent"),
]


def fused_reference(x, weights, slot, merged_slot, base, columns, *, mixture: bool = False) -> jax.Array:
    """The columns mode of `lora_delta` in plain jnp: base [T, N] in float32 with each weight's
    delta (lora_delta_reference, unrounded) added at its columns, rounded once to x.dtype."""
    f32 = [w._replace(a=w.a.astype(jnp.float32), b=w.b.astype(jnp.float32)) for w in weights]
    deltas = lora_delta_reference(x.astype(jnp.float32), f32, slot, merged_slot, mixture=mixture)
    out = base.astype(jnp.float32)
    for d, c in zip(deltas, columns):
        out = out.at[:, c:c + d.shape[1]].add(d)
    return out.astype(x.dtype)


def _bits(a: np.ndarray) -> np.ndarray:
    """a's bit patterns (exact comparison, NaN and -0.0 included)."""
    return a.view(f"u{a.dtype.itemsize}")


def check_fused(case: Case, columns: tuple, width: int, seed: int = 0, tile: TileConfig | None = None,
                interpret: bool = False, slot=None) -> float:
    """The columns mode: weights of widths case.d_outs at `columns` of a fused base [T, width]
    (random), kernel vs `fused_reference`; `slot` overrides the drawn one. Returns the worst
    relative error of a part's deltas.

    Raises AssertionError when an output holds NaN, a column no part owns or a token that takes
    no delta differs from base by a bit, or a part's deltas exceed TOLERANCE[dtype].
    """
    x, weights, drawn, merged = make_problem(case, seed)
    slot = drawn if slot is None else jnp.asarray(slot, jnp.int32)
    base = jnp.asarray(np.random.default_rng(seed + 1).normal(size=(case.tokens, width)), case.dtype)
    if tile is None:
        tile = pick_tile(case.tokens, case.d_in, sum(case.d_outs), case.max_rank,
                         min(case.slots, case.tokens), device_kind="interpret" if interpret else None)
    got = _lora_delta(x, weights, slot, jnp.int32(merged), (base,), mixture=case.mixture, tile=tile,
                      interpret=interpret, columns=tuple(columns))
    assert isinstance(got, tuple) and len(got) == 1, type(got)
    with jax.default_matmul_precision("highest"):
        want = fused_reference(x, weights, slot, merged, base, columns, mixture=case.mixture)
    got_raw, base_raw = np.asarray(got[0]), np.asarray(base)
    assert got_raw.shape == base_raw.shape and got_raw.dtype == base_raw.dtype, (got_raw.shape, got_raw.dtype)
    assert not np.isnan(got_raw).any(), f"{np.isnan(got_raw).sum()} NaN in the output"
    owned = np.zeros(width, bool)
    for c, d in zip(columns, case.d_outs):
        owned[c:c + d] = True
    assert np.array_equal(_bits(got_raw[:, ~owned]), _bits(base_raw[:, ~owned])), \
        "columns no part owns must be base's, bit for bit"
    slot = np.asarray(slot)
    silent = slot == PAD_SLOT
    if case.mixture and merged >= 0:
        silent |= slot == merged
    else:                                             # no merged delta: -1 and empty slots add nothing
        empty = np.all([np.asarray(w.rank)[np.clip(slot, 0, case.slots - 1)] == 0 for w in weights], axis=0)
        silent |= (slot == -1) | ((slot >= 0) & empty)
    assert np.array_equal(_bits(got_raw[silent]), _bits(base_raw[silent])), \
        "tokens that take no delta must keep base, bit for bit"
    g, w, b = (np.asarray(a, np.float32) for a in (got_raw, want, base_raw))
    worst = 0.0
    for k, (c, d) in enumerate(zip(columns, case.d_outs)):
        dg, dw = g[:, c:c + d] - b[:, c:c + d], w[:, c:c + d] - b[:, c:c + d]
        err = float(np.linalg.norm(dg - dw) / max(np.linalg.norm(dw), 1e-30))
        assert err <= TOLERANCE[case.dtype], f"part {k}: relative error {err:.3g} > {TOLERANCE[case.dtype]}"
        worst = max(worst, err)
    return worst


# Fused linears (case with the targeted parts' widths, their columns, the fused width N).
FUSED_CASES = [
    (Case(37, 64, (64, 32, 32), 16, 5, layout="segments"), (0, 64, 96), 128),             # q/k/v, GQA-like
    (Case(29, 48, (48, 24, 24), 32, 4, layout="uniform", dtype="bfloat16"), (0, 48, 72), 96),  # widths and
    # offsets not multiples of block_n
    (Case(21, 64, (64, 32), 16, 4, layout="segments"), (0, 96), 128),                    # q, v only: k untouched
    (Case(33, 32, (80, 80), 24, 6, layout="skewed", dtype="bfloat16"), (0, 80), 160),     # gate/up
    (Case(19, 64, (40,), 16, 3, layout="uniform"), (24,), 88),                           # one part in the middle
    (Case(1, 64, (32, 64), 64, 3, layout="uniform"), (96, 0), 128),                      # T = 1, parts out of order
]


@dataclasses.dataclass(frozen=True)
class MergeCase:
    """One merge problem: a [D_in, D_out] weight and a pool of `slots` adapters of pool rank R."""

    d_in: int
    d_out: int
    max_rank: int = 16
    slots: int = 4
    dtype: str = "float32"
    tile: MergeTile = MergeTile()


def check_merge(case: MergeCase, seed: int = 0, interpret: bool = False) -> float:
    """Merges every slot by the kernel (output poisoned) and the reference; returns the worst
    relative error of the merged delta (W_m - W). Raises AssertionError on NaN or beyond
    TOLERANCE[dtype]; the empty slot 0 must give W back bit for bit."""
    rng = np.random.default_rng(seed)
    kernel = jnp.asarray(rng.normal(size=(case.d_in, case.d_out)) * 0.05, case.dtype)
    w = _weight(Case(1, case.d_in, (case.d_out,), case.max_rank, case.slots, dtype=case.dtype), case.d_out, rng)
    worst = 0.0
    for s in range(case.slots):
        got = np.asarray(_merge(kernel, w, jnp.int32(s), tile=case.tile, interpret=interpret, poison=True),
                         np.float32)
        with jax.default_matmul_precision("highest"):
            want = np.asarray(merge_weight_reference(kernel, w, jnp.int32(s)), np.float32)
        base = np.asarray(kernel, np.float32)
        assert not np.isnan(got).any(), f"slot {s}: {np.isnan(got).sum()} NaN (unwritten or garbage read)"
        if int(w.rank[s]) == 0:
            assert np.array_equal(got, base), f"slot {s} is empty: the weight must come back unchanged"
            continue
        err = float(np.linalg.norm((got - base) - (want - base)) / max(np.linalg.norm(want - base), 1e-30))
        assert err <= TOLERANCE[case.dtype], f"slot {s}: relative error {err:.3g} > {TOLERANCE[case.dtype]}"
        worst = max(worst, err)
    return worst


MERGE_CASES = [
    MergeCase(64, 256, 16, 3),
    MergeCase(100, 300, 32, 4, tile=MergeTile(32, 64, 4)),                    # ragged edges, mixed ranks
    MergeCase(48, 80, 8, 2, dtype="bfloat16", tile=MergeTile(16, 32, 4)),      # R < 16
    MergeCase(128, 128, 128, 5, dtype="bfloat16"),
    MergeCase(96, 64, 24, 3, dtype="float16", tile=MergeTile(32, 32, 2)),      # R not a power of 2
    MergeCase(100, 80, 16, 2, tile=MergeTile(16, 32, 4, row_tiles=3, stages=2)),  # loop over rows, ragged tail
]


@dataclasses.dataclass(frozen=True)
class MergePartsCase:
    """A fused [D_in, width] weight whose parts at `columns` (widths `d_outs`, pool ranks `ranks`)
    have adapters; columns outside them belong to parts without one."""

    d_in: int
    d_outs: tuple
    columns: tuple
    width: int
    ranks: tuple
    slots: int = 4
    dtype: str = "float32"
    tile: MergeTile = dataclasses.field(default_factory=MergeTile)


def check_merge_parts(case: MergePartsCase, seed: int = 0, interpret: bool = False) -> float:
    """Merges every slot into the fused weight by the kernel and `merge_parts_reference`; returns
    the worst relative error of a part's merged delta. The merged copy passed in holds NaN in the
    parts' columns (must be overwritten) and random values elsewhere (must stay, bit for bit);
    a part whose slot is empty (rank 0) must give kernel's columns back bit for bit."""
    rng = np.random.default_rng(seed)
    kernel = jnp.asarray(rng.normal(size=(case.d_in, case.width)) * 0.05, case.dtype)
    parts = [_weight(Case(1, case.d_in, (d,), r, case.slots, dtype=case.dtype), d, rng)
             for d, r in zip(case.d_outs, case.ranks)]
    owned = np.zeros(case.width, bool)
    for c, d in zip(case.columns, case.d_outs):
        owned[c:c + d] = True
    old = rng.normal(size=(case.d_in, case.width))
    merged = jnp.asarray(np.where(owned[None, :], np.nan, old), case.dtype)
    worst = 0.0
    for s in range(case.slots):
        got = np.asarray(merge_parts(kernel, merged, parts, case.columns, jnp.int32(s), tile=case.tile,
                                     interpret=interpret))
        with jax.default_matmul_precision("highest"):
            want = np.asarray(merge_parts_reference(kernel, merged, parts, case.columns, jnp.int32(s)), np.float32)
        assert got.dtype == kernel.dtype and got.shape == kernel.shape, (got.dtype, got.shape)
        assert not np.isnan(got).any(), f"slot {s}: {np.isnan(got).sum()} NaN (part columns unwritten)"
        assert np.array_equal(_bits(got[:, ~owned]), _bits(np.asarray(merged)[:, ~owned])), \
            f"slot {s}: columns of parts not listed must keep merged's values"
        for k, (c, d, w) in enumerate(zip(case.columns, case.d_outs, parts)):
            g, base = got[:, c:c + d].astype(np.float32), np.asarray(kernel[:, c:c + d], np.float32)
            if int(w.rank[s]) == 0:
                assert np.array_equal(g, base), f"slot {s}, part {k} is empty: kernel's columns must come back"
                continue
            err = float(np.linalg.norm((g - base) - (want[:, c:c + d] - base))
                        / max(np.linalg.norm(want[:, c:c + d] - base), 1e-30))
            assert err <= TOLERANCE[case.dtype], \
                f"slot {s}, part {k}: relative error {err:.3g} > {TOLERANCE[case.dtype]}"
            worst = max(worst, err)
    return worst


MERGE_PARTS_CASES = [
    MergePartsCase(64, (64, 32, 32), (0, 64, 96), 128, (16, 8, 32), 3, tile=MergeTile(32, 32, 4)),   # q/k/v
    MergePartsCase(100, (48, 24), (0, 72), 96, (24, 16), 4, dtype="bfloat16",
                   tile=MergeTile(32, 32, 4)),                     # k not listed, ragged rows and widths
    MergePartsCase(48, (80, 80), (0, 80), 160, (16, 64), 3, dtype="bfloat16",
                   tile=MergeTile(16, 64, 4, row_tiles=2, stages=2)),                   # gate/up, row loop
    MergePartsCase(40, (40,), (24,), 88, (8,), 2, tile=MergeTile(16, 16, 2)),           # one part in the middle
    MergePartsCase(32, (32, 64), (96, 16), 160, (128, 16), 3, dtype="float16",
                   tile=MergeTile(16, 32, 4)),                     # parts out of order, gaps on both sides
]


@dataclasses.dataclass(frozen=True)
class AttentionCase:
    """One prefill-attention problem: `rows` rows of `queries` padded query slots over page tables
    covering `context` keys (rounded up to whole pages of `page_size`), H query and H_kv key/value
    heads of dim Dh; block_q / block_k as prefill_attention takes them."""

    rows: int
    queries: int
    context: int
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 64
    dtype: str = "float32"
    block_q: int = 64
    block_k: int = 64
    page_size: int = 16

    def width(self) -> int:
        """Pages of each row's table."""
        return -(-self.context // self.page_size)


def _attention_positions(case: AttentionCase, rng) -> np.ndarray:
    """Per row, a chunk of consecutive positions starting anywhere in the table's keys (earlier
    chunks already cached), followed by padding (-1); with two rows or more the last runs past the
    table's keys (it attends every page), with three or more the second is all padding."""
    keys = case.width() * case.page_size
    pos = np.full((case.rows, case.queries), -1, np.int32)
    for r in range(case.rows):
        if r == 1 and case.rows > 2:
            continue
        n = int(rng.integers(1, case.queries + 1))
        start = int(rng.integers(0, max(1, keys - n + 1)))
        if r == case.rows - 1 and case.rows > 1:
            start = keys - 1                                            # positions past the keys
        pos[r, :n] = start + np.arange(n)
    return pos


def attention_problem(case: AttentionCase, seed: int = 0) -> tuple:
    """(q, k_pages, v_pages, page_table, positions) of fresh random data. Each row's pages (those
    holding keys up to its largest position) are drawn without replacement from the cache, so
    they are scattered and shuffled and rows share none; the rest of each table is garbage page
    ids (out of range too). Every page no row uses (the first and last ones included, where
    out-of-range ids clip to) and every slot past a row's largest position holds NaN."""
    rng = np.random.default_rng(seed)
    width = case.width()
    positions = _attention_positions(case, rng)
    last = np.minimum(positions.max(axis=1), width * case.page_size - 1)               # -1: a row of padding
    used = -(-(last + 1) // case.page_size)
    pages = 2 + int(used.sum()) + 3                                     # spares, and NaN pages at both ends
    owned = rng.choice(np.arange(1, pages - 1), int(used.sum()), replace=False)
    table = rng.integers(-5, pages + 5, (case.rows, width))
    shape = (case.kv_heads, pages, case.page_size, case.head_dim)
    k, v = (np.full(shape, np.nan, np.float32) for _ in range(2))
    for r, (n, own) in enumerate(zip(used, np.split(owned, np.cumsum(used)[:-1]))):
        table[r, :n] = own
        for t in (k, v):
            t[:, own] = rng.standard_normal((case.kv_heads, n, case.page_size, case.head_dim))
            if n:
                t[:, own[-1], last[r] % case.page_size + 1:] = np.nan           # slots past the row's last key
    q = rng.standard_normal((case.rows, case.queries, case.heads, case.head_dim))
    return (jnp.asarray(q, case.dtype), jnp.asarray(k, case.dtype), jnp.asarray(v, case.dtype),
            jnp.asarray(table, jnp.int32), jnp.asarray(positions))


def check_attention(case: AttentionCase, seed: int = 0, interpret: bool = False) -> float:
    """The prefill-attention kernel against its reference on fresh random data (attention_problem);
    returns the worst relative error over the real (non-padding) queries. Raises AssertionError on
    NaN anywhere in the kernel's output or the reference's real queries, or an error beyond
    TOLERANCE[dtype]."""
    q, k, v, table, positions = attention_problem(case, seed)
    got = np.asarray(prefill_attention(q, k, v, table, positions, block_q=case.block_q, block_k=case.block_k,
                                       interpret=interpret), np.float32)
    with jax.default_matmul_precision("highest"):
        want = np.asarray(prefill_attention_reference(q, k, v, table, positions), np.float32)
    assert not np.isnan(got).any(), f"{np.isnan(got).sum()} NaN in the output"
    real = np.asarray(positions) >= 0
    assert not np.isnan(want[real]).any(), f"{np.isnan(want[real]).sum()} NaN in the reference"
    err = float(np.linalg.norm(got[real] - want[real]) / max(np.linalg.norm(want[real]), 1e-30))
    assert err <= TOLERANCE[case.dtype], f"relative error {err:.3g} > {TOLERANCE[case.dtype]}"
    return err


ATTENTION_CASES = [
    AttentionCase(1, 1, 16),                                            # one query, one page
    AttentionCase(3, 5, 48, block_q=16, block_k=16, page_size=4),       # ragged Q, 4 pages per step, a padding row
    AttentionCase(2, 64, 200, heads=4, kv_heads=4, block_k=32),          # 13 pages: the table padded to whole steps
    AttentionCase(2, 100, 256, heads=8, kv_heads=1, head_dim=16, dtype="bfloat16", block_q=32, page_size=8),
    AttentionCase(4, 32, 128, heads=2, kv_heads=2, head_dim=32, dtype="float16", block_q=16, block_k=128),
    AttentionCase(3, 20, 96, heads=4, kv_heads=2, head_dim=16, block_q=16, block_k=16, page_size=32),  # page > block
]


@dataclasses.dataclass(frozen=True)
class DecodeCase:
    """One paged decode-attention problem: `rows` queries over a cache of `pages` pages of
    `page_size` keys, page tables `width` pages wide, H query and H_kv key/value heads of dim Dh;
    pages_per_block / splits as decode_attention takes them."""

    rows: int
    width: int
    pages: int
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 64
    page_size: int = 16
    dtype: str = "float32"
    pages_per_block: int = 8
    splits: int | None = None


def decode_problem(case: DecodeCase, seed: int = 0) -> tuple:
    """(q, k_pages, v_pages, page_table, lengths) of fresh random data: each row's pages drawn
    without replacement from the cache (rows may share none), the unused table entries are
    garbage page ids (out of range too), lengths ragged: 0 (an idle row), one key, a whole table
    and random ones in between."""
    rng = np.random.default_rng(seed)
    normal = lambda *shape: jnp.asarray(rng.standard_normal(shape), case.dtype)
    q = normal(case.rows, case.heads, case.head_dim)
    k, v = (normal(case.kv_heads, case.pages, case.page_size, case.head_dim) for _ in range(2))
    full = case.width * case.page_size
    lengths = rng.integers(1, full + 1, case.rows)
    lengths[: min(3, case.rows)] = (0, 1, full)[: min(3, case.rows)]
    table = rng.integers(-5, case.pages + 5, (case.rows, case.width))                   # garbage past the length
    for r, n in enumerate(lengths):
        used = -(-int(n) // case.page_size)
        table[r, :used] = rng.choice(case.pages, used, replace=False)
    return q, k, v, jnp.asarray(table, jnp.int32), jnp.asarray(lengths, jnp.int32)


def check_decode_attention(case: DecodeCase, seed: int = 0, interpret: bool = False) -> float:
    """The decode-attention kernel against its reference on fresh random data; the relative error.
    Raises AssertionError on NaN, an idle row that is not 0, or an error beyond TOLERANCE[dtype]."""
    q, k, v, table, lengths = decode_problem(case, seed)
    got = np.asarray(decode_attention(q, k, v, table, lengths, pages_per_block=case.pages_per_block,
                                      splits=case.splits, interpret=interpret), np.float32)
    safe = jnp.where(jnp.arange(case.width)[None, :] * case.page_size < lengths[:, None], table, 0)
    with jax.default_matmul_precision("highest"):
        want = np.asarray(decode_attention_reference(q, k, v, safe, lengths), np.float32)
    assert not np.isnan(got).any(), f"{np.isnan(got).sum()} NaN in the output"
    idle = np.asarray(lengths) == 0
    assert not got[idle].any(), "a row of length 0 must get 0"
    err = float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))
    assert err <= TOLERANCE[case.dtype], f"relative error {err:.3g} > {TOLERANCE[case.dtype]}"
    return err


DECODE_CASES = [
    DecodeCase(1, 1, 4, page_size=8, pages_per_block=1),                 # one row, one page
    DecodeCase(5, 6, 40, page_size=4, pages_per_block=2, splits=3),      # ragged, uneven splits
    DecodeCase(4, 8, 64, heads=8, kv_heads=8, head_dim=16, pages_per_block=4),   # MHA, automatic splits
    DecodeCase(3, 16, 64, heads=8, kv_heads=1, head_dim=32, dtype="bfloat16", pages_per_block=4, splits=2),
    DecodeCase(6, 4, 32, heads=4, kv_heads=2, head_dim=16, dtype="float16", page_size=8, pages_per_block=8),
]


@dataclasses.dataclass(frozen=True)
class SegmentCase:
    """A packed sequence of runs of `lengths` positions (segment ids in no order, negative ones
    included) of `heads` heads of head_dim."""

    lengths: tuple[int, ...]
    heads: int = 2
    head_dim: int = 16
    dtype: str = "float32"
    block_q: int = 16
    block_k: int = 16


def segment_problem(case: SegmentCase, seed: int = 0) -> tuple:
    """(q, k, v [P, H, Dh], segment [P]) of fresh random data."""
    rng = np.random.default_rng(seed)
    p = sum(case.lengths)
    q, k, v = (jnp.asarray(rng.standard_normal((p, case.heads, case.head_dim)), case.dtype) for _ in range(3))
    ids = rng.permutation(len(case.lengths)) * 3 - 5
    return q, k, v, jnp.asarray(np.repeat(ids, case.lengths), jnp.int32)


def check_segment_attention(case: SegmentCase, seed: int = 0, interpret: bool = False) -> float:
    """The segment-attention kernel against its reference on segment_problem; returns the
    relative error. Raises AssertionError on NaN or an error beyond TOLERANCE[dtype]."""
    q, k, v, segment = segment_problem(case, seed)
    got = np.asarray(segment_attention(q, k, v, segment, block_q=case.block_q, block_k=case.block_k,
                                       interpret=interpret), np.float32)
    with jax.default_matmul_precision("highest"):
        want = np.asarray(segment_attention_reference(q, k, v, segment), np.float32)
    assert not np.isnan(got).any(), f"{np.isnan(got).sum()} NaN in the output"
    err = float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))
    assert err <= TOLERANCE[case.dtype], f"relative error {err:.3g} > {TOLERANCE[case.dtype]}"
    return err


SEGMENT_CASES = [
    SegmentCase((1,), 1),
    SegmentCase((7, 1, 30, 16, 2, 40), head_dim=80),                    # runs across blocks, Dh not a power of 2
    SegmentCase((100,), 3, 32, "bfloat16", block_q=32),                 # one segment, P padded
    SegmentCase((16, 16, 16, 16), 2, 64, "float16", block_k=32),        # runs on block edges
    SegmentCase((64, 5, 3, 64, 1, 1, 50), 4, 24, "bfloat16", block_q=64),
]
