"""The Mosaic GPU ATMM (TileConfig(kernel="mosaic")) against the jnp reference in GPU interpret
mode on CPU, its block plan against numpy, and its lowering for an H100 (no GPU here: lowering
only; results on the GPU are bench/gpu_smoke.py's job)."""

import dataclasses
import functools
import os
import re
import zlib

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import PAD_SLOT, TileConfig, atmm_mosaic, lora_delta
from pallas_kernels.atmm import _lora_delta
from pallas_kernels.atmm_mosaic import BLOCK_T, block_plan
from pallas_kernels.testing import CASES, FUSED_CASES, Case, check, check_fused, lowered_for, make_problem

MOSAIC = TileConfig(shrink_block_t=64, expand_block_t=64, block_k=32, split_k=2, block_n=32, kernel="mosaic")
MOSAIC_WIDE = dataclasses.replace(MOSAIC, block_k=64, split_k=1, block_n=64, shrink_stages=3)


def _half(case: Case) -> Case:
    """The case in bfloat16 (float16 for every third): the Mosaic kernels take 16-bit floats."""
    return case if case.dtype != "float32" else dataclasses.replace(case, dtype="bfloat16")


def _id(c: Case) -> str:
    mix = f"-mix-{c.merged}" if c.mixture else ""
    return f"T{c.tokens}-D{c.d_in}x{'+'.join(map(str, c.d_outs))}-R{c.max_rank}-S{c.slots}-{c.layout}-{c.dtype}{mix}"


@pytest.mark.parametrize("case", [_half(c) for c in CASES], ids=_id)
def test_matches_reference(case):
    """Each case draws its data from its own stable seed (its id's CRC): a failure replays."""
    check(case, seed=zlib.crc32(_id(case).encode()), tile=MOSAIC, interpret=True)


@pytest.mark.parametrize("tile", [MOSAIC, MOSAIC_WIDE], ids=["k32x2-n32", "k64-n64"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_ragged_shapes_and_tiles(tile, dtype):
    # T, D_in and D_out off every block; several token blocks; mixture with the merged slot present.
    check(Case(150, 80, (72, 24), 32, 7, layout="segments", mixture=True, dtype=dtype), seed=3, tile=tile,
          interpret=True)


@pytest.mark.parametrize("mixture", [False, True])
def test_base_is_accumulated(mixture):
    check(Case(37, 64, (48, 80), 32, 5, layout="segments", dtype="bfloat16", mixture=mixture), seed=11,
          tile=MOSAIC, interpret=True, with_base=True)


@pytest.mark.parametrize("fused", [(dataclasses.replace(_half(c), mixture=k > 0), cols, n)
                                   for k, (c, cols, n) in enumerate(FUSED_CASES)],
                         ids=lambda f: f"{_id(f[0])}-at{'+'.join(map(str, f[1]))}-N{f[2]}")
def test_fused_columns_match_reference(fused):
    """Parts of one fused base: each part's deltas in its columns, the rest base's bit for bit
    (widths or columns off the block go through the per-part path). Mixture mode but for the first
    case: its own-adapter token set is the whole unmerged path."""
    case, columns, width = fused
    check_fused(case, columns, width, seed=zlib.crc32(f"{_id(case)}{columns}".encode()), tile=MOSAIC,
                interpret=True)


def test_fused_columns_on_the_blocks_every_kind_of_token():
    """The direct fused path (T, widths and columns multiples of the blocks): padding, base-model and
    empty-slot tokens next to adapters, one part's columns (k) untargeted."""
    rng = np.random.default_rng(9)
    slot = rng.choice([PAD_SLOT, -1, 0, 1, 2, 3], size=128).astype(np.int32)
    case = Case(128, 64, (64, 32), 16, 4, layout="segments", mixture=True, dtype="bfloat16")   # q 64 | k 32 | v 32
    check_fused(case, (0, 96), 128, seed=5, tile=MOSAIC, interpret=True, slot=slot)


def test_weights_split_over_shrink_launches_when_shared_memory_is_short(monkeypatch):
    """With too little shared memory for every weight's buffers, the weights share x over several
    shrink launches, first trading pipeline depth and step width; the result does not change."""
    monkeypatch.setattr(atmm_mosaic, "SMEM_BYTES", 48 << 10)
    assert atmm_mosaic._shrink_plan(3, 32, 64, 3, 2) == (2, 32, 2)          # 2 launches: q and k, then v
    assert atmm_mosaic._shrink_plan(2, 16, 64, 3, 2) == (2, 64, 2)
    assert atmm_mosaic._shrink_plan(1, 128, 128, 3, 2) == (1, 16, 2)        # nothing fits: the smallest pipeline
    check(Case(66, 96, (64, 32, 48), 32, 5, layout="segments", dtype="bfloat16", mixture=True), seed=13,
          tile=MOSAIC_WIDE, interpret=True, with_base=True)


def test_public_op_and_refusals():
    case = Case(20, 64, (32, 64), 16, 4, layout="uniform", dtype="bfloat16")
    x, weights, slot, _ = make_problem(case, seed=7)
    got = lora_delta(x, list(weights), slot, tile=MOSAIC, interpret=True)
    assert [g.shape for g in got] == [(20, 32), (20, 64)] and all(g.dtype == jnp.bfloat16 for g in got)
    x32, w32, slot32, _ = make_problem(dataclasses.replace(case, dtype="float32"), seed=7)
    with pytest.raises(ValueError, match="the mosaic ATMM takes bfloat16 or float16 tokens, got float32"):
        lora_delta(x32, w32, slot32, tile=MOSAIC, interpret=True)
    with pytest.raises(ValueError, match="kernel='cuda' must be one of"):
        TileConfig(kernel="cuda")
    with pytest.raises(ValueError, match="token blocks of 64 .* shrink_block_t=32"):
        TileConfig(shrink_block_t=32, kernel="mosaic")


def test_no_tokens():
    x, weights, slot, _ = make_problem(Case(4, 32, (16,), 16, 3, dtype="bfloat16"), seed=1)
    (y,) = lora_delta(x[:0], weights, slot[:0], tile=MOSAIC, interpret=True)
    assert y.shape == (0, 16) and y.dtype == jnp.bfloat16
    base = jnp.ones((0, 48), jnp.bfloat16)
    (y,) = lora_delta(x[:0], weights, slot[:0], tile=MOSAIC, interpret=True, base=[base], columns=[8])
    assert y.shape == (0, 48)


def _plan_numpy(sets: np.ndarray, n_slots: int):
    n_sets, t = sets.shape
    n_blocks = -(-t // BLOCK_T)
    adapters = np.full((n_sets, n_blocks, min(BLOCK_T, n_slots)), -1)
    counts = np.zeros((n_sets, n_blocks), int)
    which = np.full((n_sets, n_blocks * BLOCK_T), -1)
    for j in range(n_sets):
        for b in range(n_blocks):
            block = sets[j, b * BLOCK_T:(b + 1) * BLOCK_T]
            ids = sorted(set(block[block >= 0].tolist()))
            adapters[j, b, :len(ids)], counts[j, b] = ids, len(ids)
            for i, u in enumerate(block):
                if u >= 0:
                    which[j, b * BLOCK_T + i] = ids.index(u)
    return adapters, counts, which


@pytest.mark.parametrize("tokens, slots", [(1, 4), (64, 3), (200, 100), (130, 1)])
def test_block_plan_matches_numpy(tokens, slots):
    rng = np.random.default_rng(tokens * 1000 + slots)
    sets = rng.integers(-1, slots, size=(2, tokens))
    t_pad = -(-tokens // BLOCK_T) * BLOCK_T
    got = block_plan([jnp.asarray(s, jnp.int32) for s in sets], slots, t_pad)
    for g, w in zip(got, _plan_numpy(sets, slots)):
        np.testing.assert_array_equal(np.asarray(g), w)
        assert g.dtype == jnp.int32


def _lowered(fn, *args) -> str:
    return lowered_for("NVIDIA H100 80GB HBM3", fn, *args)


@pytest.mark.parametrize("case, columns, width, launches", [
    (Case(64, 4096, (4096, 1024, 1024), 16, 8, dtype="bfloat16"), (0, 4096, 5120), 6144, 2),   # decode q/k/v
    (Case(64, 4096, (11008, 11008), 64, 8, dtype="bfloat16", mixture=True), (0, 11008), 22016, 2),
    (Case(256, 4096, (4096,), 128, 8, dtype="bfloat16"), None, None, 2),                        # prefill o_proj
    (Case(128, 3584, (18944,), 16, 4, dtype="float16", mixture=True), None, None, 2),           # Qwen2.5-7B MLP
    (Case(256, 4096, (4096, 4096, 4096), 128, 4, dtype="bfloat16"), (0, 4096, 8192), 12288, 3),
], ids=["decode-qkv", "decode-gate-up-mixture", "prefill-r128", "qwen-mlp-f16", "qkv-r128-two-shrinks"])
def test_lowers_for_hopper(case, columns, width, launches):
    """A shrink and an expand kernel per call (two shrinks where one would not fit shared memory:
    q/k/v at rank 128); with a base, the output aliases it."""
    x, weights, slot, merged = make_problem(case, seed=0)
    base = None
    if columns is not None:
        base = (jnp.zeros((case.tokens, width), x.dtype),)
    tile = dataclasses.replace(MOSAIC_WIDE, block_k=128, block_n=128)
    fn = functools.partial(_lora_delta, mixture=case.mixture, tile=tile, interpret=False,
                           columns=columns)
    text = _lowered(fn, x, weights, slot, jnp.int32(merged), base)
    assert len(re.findall(r"custom_call @mosaic_gpu", text)) == launches
    assert ("output_operand_alias" in text) == (base is not None)
