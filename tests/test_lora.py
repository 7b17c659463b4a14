"""The LoRA branch: reference vs an independent loop, the three modes, exact unmerge."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import micro_config, tol
from pallas_kernels.lora_reference import LoraWeight, lora_delta_reference
from valora_jax import LoraContext, ModelRunner, init_model, random_adapter
from valora_jax.lora import Linear, adapter_slots, targeted_linears


def _random_weight(rng, s, d_in, d_out, r_max, ranks):
    """Slots with garbage beyond each rank, so any read of padding shows."""
    return LoraWeight(rng.standard_normal((s, d_in, r_max)).astype(np.float32),
                      rng.standard_normal((s, r_max, d_out)).astype(np.float32),
                      rng.uniform(0.5, 2.0, s).astype(np.float32), np.asarray(ranks, np.int32))


def _loop_delta(x, w, slot, merged, mixture):
    """Token by token in float64, written independently of the reference."""
    out = np.zeros((x.shape[0], w.b.shape[2]))
    def delta(t, s):
        r = w.rank[s]
        return w.scale[s] * (x[t].astype(np.float64) @ w.a[s][:, :r] @ w.b[s][:r])
    for t, a in enumerate(slot):
        if mixture and merged >= 0 and a == merged:
            continue
        if a >= 0:
            out[t] += delta(t, a)
        if mixture and merged >= 0:
            out[t] -= delta(t, merged)
    return out


@pytest.mark.parametrize("t", [1, 7, 33])
@pytest.mark.parametrize("mixture,merged", [(False, -1), (True, 2), (True, -1), (True, 0)])
def test_reference_matches_token_loop(t, mixture, merged):
    rng = np.random.default_rng(t * 7 + merged)
    s, d_in, r_max = 4, 24, 16
    weights = [_random_weight(rng, s, d_in, d_out, r_max, [4, 16, 8, 1]) for d_out in (12, 20)]
    x = rng.standard_normal((t, d_in)).astype(np.float32)
    slot = rng.integers(-1, s, t).astype(np.int32)
    slot[0] = -1                                     # always one base-model token
    got = lora_delta_reference(jnp.asarray(x), weights, jnp.asarray(slot), jnp.int32(merged), mixture=mixture)
    for w, y in zip(weights, got):
        np.testing.assert_allclose(y, _loop_delta(x, w, slot, merged, mixture), rtol=1e-4, atol=1e-4)


def test_reference_segment_per_token_and_single_adapter():
    rng = np.random.default_rng(0)
    w = _random_weight(rng, 8, 16, 16, 8, [8, 3, 5, 8, 1, 2, 8, 4])
    x = rng.standard_normal((8, 16)).astype(np.float32)
    for slot in (np.arange(8, dtype=np.int32), np.full(8, 5, np.int32), np.full(8, -1, np.int32)):
        (y,) = lora_delta_reference(jnp.asarray(x), [w], jnp.asarray(slot))
        np.testing.assert_allclose(y, _loop_delta(x, w, slot, -1, False), rtol=1e-4, atol=1e-4)


def _loaded_linear(rng, dtype=jnp.float32, parts=None, targets=None):
    """A linear (24 outputs, or `parts` fused) with random adapters in every targeted part's slots."""
    cfg = micro_config()
    lin = Linear(32, 24, rngs=nnx.Rngs(0), dtype=dtype, bias=True, lora=cfg.lora, parts=parts, targets=targets)
    for part, slots in lin.slots():
        w = _random_weight(rng, cfg.lora.max_loras, 32, part.width, cfg.lora.max_rank, [4, 16, 8, 2])
        keep = np.arange(cfg.lora.max_rank) < w.rank[:, None]          # the pool zero-pads
        slots.lora_a[...] = jnp.asarray(w.a * keep[:, None, :], dtype)
        slots.lora_b[...] = jnp.asarray(w.b * keep[:, :, None], dtype)
        slots.lora_scale[...], slots.lora_rank[...] = jnp.asarray(w.scale), jnp.asarray(w.rank)
    lin.bias[...] = jnp.asarray(rng.standard_normal(24), dtype)
    return lin


FUSED = [None, ({"q": 8, "k": 4, "v": 12}, ("q", "k", "v")), ({"q": 8, "k": 4, "v": 12}, ("q", "v"))]


@pytest.mark.parametrize("fused", FUSED, ids=["plain", "fused", "fused-partly-targeted"])
def test_linear_modes_agree(fused):
    """unmerged == mixture(m) for every token; merged == unmerged for tokens of m; plain and
    fused linears (a part without slots takes no delta in any mode)."""
    from valora_jax.lora import merged_kernel
    rng = np.random.default_rng(1)
    lin = _loaded_linear(rng, **(dict(zip(("parts", "targets"), fused)) if fused else {}))
    x = jnp.asarray(rng.standard_normal((2, 9, 32)), jnp.float32)
    slot = jnp.asarray(rng.integers(-1, 4, 18), jnp.int32)
    m = 2
    lin.merged[...] = merged_kernel(lin, jnp.int32(m))
    unmerged = lin(x, LoraContext(slot, jnp.int32(-1), "unmerged"))
    mixture = lin(x, LoraContext(slot, jnp.int32(m), "mixture"))
    np.testing.assert_allclose(mixture, unmerged, **tol(jnp.float32))
    all_m = jnp.full_like(slot, m)
    merged = lin(x, LoraContext(all_m, jnp.int32(m), "merged"))
    np.testing.assert_allclose(merged, lin(x, LoraContext(all_m, jnp.int32(-1), "unmerged")), **tol(jnp.float32))
    base = x.reshape(-1, 32) @ lin.kernel[...] + lin.bias[...]
    minus_one = lin(x, LoraContext(jnp.full_like(slot, -1), jnp.int32(m), "mixture"))
    np.testing.assert_allclose(minus_one.reshape(-1, 24), base, **tol(jnp.float32))


@pytest.mark.parametrize("targets", [("q", "k", "v"), ("q", "v")])
def test_fused_linear_equals_its_parts_as_plain_linears(targets):
    """A fused linear's output columns are each part's plain linear with that part's adapter
    (an untargeted part: the base alone), and its merged weight each part's merged kernel."""
    from valora_jax.lora import merged_kernel
    parts = {"q": 8, "k": 4, "v": 12}
    fused = _loaded_linear(np.random.default_rng(2), parts=parts, targets=targets)
    cfg = micro_config()
    x = jnp.asarray(np.random.default_rng(3).standard_normal((5, 32)), jnp.float32)
    ctx = LoraContext.unmerged(jnp.asarray([0, -1, 3, 3, 1]))
    y = fused(x, ctx)
    slots = dict((p.name, s) for p, s in fused.slots())
    fused.merged[...] = merged_kernel(fused, jnp.int32(1))
    for part in fused.parts:
        cols = slice(part.start, part.start + part.width)
        plain = Linear(32, part.width, rngs=nnx.Rngs(0), dtype=jnp.float32, bias=True,
                       lora=cfg.lora if part.name in slots else None)
        plain.kernel[...], plain.bias[...] = fused.kernel[...][:, cols], fused.bias[...][cols]
        if part.name in slots:
            for var in ("lora_a", "lora_b", "lora_scale", "lora_rank"):
                getattr(plain.lora, var)[...] = getattr(slots[part.name], var)[...]
            np.testing.assert_allclose(fused.merged[...][:, cols], merged_kernel(plain, jnp.int32(1)), rtol=1e-6,
                                       atol=1e-6)
        else:
            np.testing.assert_array_equal(fused.merged[...][:, cols], fused.kernel[...][:, cols])
        np.testing.assert_allclose(y[:, cols], plain(x, ctx), rtol=1e-5, atol=1e-5)


def test_fused_parameters_round_trip_and_refuse_missing_parts():
    from valora_jax.lora import fuse_parameters, fused_layout
    model = init_model(micro_config(), seed=0)
    layout = fused_layout(model)
    assert layout["decoder.layers.0.k_proj.kernel"][0] == "decoder.layers.0.qkv_proj.kernel"
    assert layout["vision_tower.layers.0.v_proj.bias"][0] == "vision_tower.layers.0.qkv_proj.bias"
    flat = {"decoder.layers.0.qkv_proj.kernel": model.decoder.layers[0].qkv_proj.kernel[...]}
    unfused = {p: flat[f][..., s: s + w] for p, (f, s, w) in layout.items() if f in flat}
    assert sorted(unfused) == ["decoder.layers.0.k_proj.kernel", "decoder.layers.0.q_proj.kernel",
                               "decoder.layers.0.v_proj.kernel"]
    refused = {p: unfused[p] for p in unfused if "k_proj" not in p}
    narrow = {**unfused, "decoder.layers.0.k_proj.kernel": unfused["decoder.layers.0.k_proj.kernel"][:, :1]}
    layer0 = {p: v for p, v in layout.items() if v[0] in flat}
    np.testing.assert_array_equal(fuse_parameters(unfused, layer0)["decoder.layers.0.qkv_proj.kernel"],
                                  flat["decoder.layers.0.qkv_proj.kernel"])
    with pytest.raises(ValueError, match="k_proj.kernel.*missing"):
        fuse_parameters(refused, layer0)
    with pytest.raises(ValueError, match="k_proj.kernel: shape"):
        fuse_parameters(narrow, layer0)


def test_unknown_mode_and_backend_rejected():
    with pytest.raises(ValueError, match="'fused'"):
        LoraContext(jnp.zeros(1, jnp.int32), jnp.int32(-1), "fused")
    with pytest.raises(ValueError, match="'cuda'"):
        LoraContext(jnp.zeros(1, jnp.int32), jnp.int32(-1), "unmerged", "cuda")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_unmerge_is_bit_exact_after_100_cycles(dtype):
    cfg = micro_config(dtype=dtype)
    runner = ModelRunner(init_model(cfg, seed=3))
    for s, r in enumerate((4, 16)):
        runner.write_slot(s, random_adapter(cfg, runner.module_shapes, f"a{s}", r, seed=s, std=0.3))
    before = [np.asarray(x).copy() for x in jax.tree.leaves(runner.params)]
    runner.merge(0)
    first = [np.asarray(x).copy() for x in jax.tree.leaves(runner.merged)]
    for cycle in range(100):
        runner.merge(cycle % 2)
    runner.merge(0)
    after = jax.tree.leaves(runner.params)
    assert all(np.array_equal(a, b) for a, b in zip(before, after))
    assert all(np.array_equal(a, b) for a, b in zip(first, jax.tree.leaves(runner.merged)))
    # the merged mode reads weights that differ from the base ones
    linears = targeted_linears(runner.model())
    assert all(not np.array_equal(lin.merged[...], lin.kernel[...]) for _, lin in linears)


def test_slots_are_allocated_at_kernel_widths_and_padding_is_never_read():
    from valora_jax import LoraConfig
    assert [LoraConfig(max_rank=r).slot_rank for r in (1, 8, 16, 24, 64, 100)] == [16, 16, 16, 32, 64, 128]
    outputs = []
    for max_rank in (24, 32):                        # the same rank-24 adapter in 32-wide slots both times
        cfg = micro_config(max_rank=max_rank)
        runner = ModelRunner(init_model(cfg, seed=4))
        assert {slots.lora_a.shape[-1] for _, slots in adapter_slots(runner.model())} == {32}
        runner.write_slot(1, random_adapter(cfg, runner.module_shapes, "r24", 24, seed=8))
        runner.merge(1)
        outputs.append([np.asarray(x) for x in jax.tree.leaves(runner.merged)])
    assert all(np.array_equal(a, b) for a, b in zip(*outputs))
