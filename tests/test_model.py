"""Model forward: paged KV decode vs full recompute, images, modes, batch invariance, shapes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import assert_rel_close, micro_config, random_image, tol
from valora_jax import (LoraContext, ModelRunner, RowSpec, count_params, init_model, init_pages, pack_block,
                        random_adapter)
from valora_jax.config import llava_1_5_7b, llava_1_5_13b
from valora_jax.image import preprocess_batch
from pallas_kernels.testing import Case, lowered_for, make_problem
from valora_jax.lora import PAD_SLOT, merge_parts
from valora_jax.blocks import split_row
from valora_jax.runtime import token_slots


@pytest.fixture(scope="module")
def loaded(config):
    """A runner with adapters of ranks 4, 16, 8 in slots 0..2 (slot 3 empty)."""
    runner = ModelRunner(init_model(config, seed=5))
    for s, r in enumerate((4, 16, 8)):
        runner.write_slot(s, random_adapter(config, runner.module_shapes, f"m{s}", r, seed=20 + s, std=0.2))
    return runner


def _pixels(config, seeds):
    v = config.vision
    return preprocess_batch([random_image(s) for s in seeds], size=v.image_size, mean=v.image_mean, std=v.image_std)


def _sequence(config, rng, length, num_images, image_at=2):
    """Token ids with `num_images` runs of image tokens starting at image_at; image_rows for them."""
    p = config.tokens_per_image
    tokens = rng.integers(0, 256, length).astype(np.int32)
    rows = np.full(length, -1, np.int32)
    rows[image_at: image_at + num_images * p] = np.arange(num_images * p)
    tokens[rows >= 0] = 259
    return tokens, rows


def _dense(runner, tokens, rows, features, slot, mode="unmerged", merged_slot=-1):
    n = len(tokens)
    ctx = LoraContext(jnp.full((n,), slot, jnp.int32), jnp.int32(merged_slot), mode)
    logits = runner.model()(tokens[None], np.arange(n)[None], np.ones((1, n), bool), rows[None], features, ctx)
    return np.asarray(logits[0])


@pytest.mark.parametrize("slot", [-1, 1])
def test_paged_prefill_chunks_and_decode_equal_full_recompute(config, loaded, slot):
    rng = np.random.default_rng(slot + 2)
    tokens, rows = _sequence(config, rng, 29, num_images=1)
    features = loaded.encode_images(_pixels(config, [0]), [slot]).reshape(-1, config.text.hidden_size)
    dense = _dense(loaded, tokens, rows, features, slot)
    cache = init_pages(config.text, 8, config.page_size, jnp.float32)
    table = [3, 5, 1, 7]                                    # pages out of order on purpose
    got = {}
    for start, stop in ((0, 13), (13, 25), (25, 26), (26, 27), (27, 28), (28, 29)):
        block = pack_block([RowSpec(tokens[start:stop], start, rows[start:stop], slot, table)], min_tokens=16)
        _, logits, cache = loaded.step(cache, [block], features)
        got[stop - 1] = np.asarray(logits[0])
    for pos, logits in got.items():
        np.testing.assert_allclose(logits, dense[pos], **tol(jnp.float32))


@pytest.mark.parametrize("attention", ["reference", "pallas-interpret"])
def test_chunks_split_into_whole_rows_equal_one_row_each(config, loaded, attention):
    """A prefill block holding each chunk as consecutive rows of `width` tokens (split_row,
    pack_block(width=...)) computes what one row per chunk does: each chunk's last-token
    logits, and the keys/values in the cache; with an image inside a chunk, after a first
    chunk already in the cache, and a chunk shorter than a row."""
    rng = np.random.default_rng(11)
    tokens, rows = _sequence(config, rng, 30, num_images=1, image_at=9)
    other = rng.integers(0, 256, 5).astype(np.int32)
    features = loaded.encode_images(_pixels(config, [4]), [1]).reshape(-1, config.text.hidden_size)
    runner = loaded.twin(attention=attention)
    table, other_table = [3, 5, 1, 7], [2]
    first = pack_block([RowSpec(tokens[:4], 0, rows[:4], 1, table)])
    chunks = [RowSpec(tokens[4:], 4, rows[4:], 1, table), RowSpec(other, 0, None, 2, other_table)]

    def run(block):
        cache = init_pages(config.text, 8, config.page_size, jnp.float32)
        cache = runner.step(cache, [first], features)[2]
        _, logits, cache = runner.step(cache, [block], features)
        return np.asarray(logits), cache

    whole, whole_cache = run(pack_block(chunks))
    pieces = [split_row(c, 8) for c in chunks]
    assert [len(p) for p in pieces] == [4, 1] and [p.start for p in pieces[0]] == [4, 12, 20, 28]
    split, split_cache = run(pack_block([p for ps in pieces for p in ps], width=8))
    assert split.shape[0] == 5
    np.testing.assert_allclose(split[[3, 4]], whole, **tol(jnp.float32))
    for w, s in zip(jax.tree.leaves(whole_cache), jax.tree.leaves(split_cache)):
        np.testing.assert_allclose(s, w, **tol(jnp.float32))
    with pytest.raises(ValueError, match="row of 26 tokens does not fit width 8"):
        pack_block(chunks, width=8)


def test_each_image_feeds_its_own_placeholders(config, loaded):
    rng = np.random.default_rng(3)
    tokens, rows = _sequence(config, rng, 2 * config.tokens_per_image + 8, num_images=2)
    p, d = config.tokens_per_image, config.text.hidden_size
    feats = loaded.encode_images(_pixels(config, [1, 2]), [0, 0]).reshape(-1, d)
    swapped_feats = np.concatenate([feats[p:], feats[:p]])
    swapped_rows = np.where(rows >= 0, (rows + p) % (2 * p), -1)
    a = _dense(loaded, tokens, rows, feats, 0)
    np.testing.assert_allclose(_dense(loaded, tokens, swapped_rows, swapped_feats, 0), a, **tol(jnp.float32))
    same = np.concatenate([feats[:p], feats[:p]])
    assert np.abs(_dense(loaded, tokens, rows, same, 0)[-1] - a[-1]).max() > 1e-3


def test_vision_adapter_changes_image_features(config, loaded):
    px = _pixels(config, [4, 4])
    f = np.asarray(loaded.encode_images(px, [-1, 2]))
    assert np.abs(f[0] - f[1]).max() > 1e-3
    np.testing.assert_allclose(np.asarray(loaded.encode_images(px[:1], [-1]))[0], f[0], **tol(jnp.float32))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_merged_unmerged_mixture_agree(dtype):
    config = micro_config(dtype=dtype)
    runner = ModelRunner(init_model(config, seed=6))
    for s, r in enumerate((4, 16, 8)):
        runner.write_slot(s, random_adapter(config, runner.module_shapes, f"m{s}", r, seed=30 + s))
    tokens, rows = _sequence(config, np.random.default_rng(4), 20, num_images=0)
    empty = jnp.zeros((0, config.text.hidden_size), dtype)
    runner.merge(1)
    close = lambda a, b: assert_rel_close(a, b, dtype)
    for slot in (-1, 0, 1, 2):
        close(_dense(runner, tokens, rows, empty, slot, "mixture", 1), _dense(runner, tokens, rows, empty, slot))
    close(_dense(runner, tokens, rows, empty, 1, "merged", 1), _dense(runner, tokens, rows, empty, 1))


def test_batch_invariance_mixed_adapters_in_one_step(config, loaded):
    """Each row's logits in a batch of different adapters (and lengths) equal the row alone."""
    rng = np.random.default_rng(5)
    seqs = [(rng.integers(0, 256, n).astype(np.int32), s) for n, s in ((1, 0), (9, -1), (16, 2), (5, 0))]
    empty = jnp.zeros((0, config.text.hidden_size))
    def run(batch):
        cache = init_pages(config.text, 16, config.page_size, jnp.float32)
        rows = [RowSpec(t, 0, None, s, [1 + 2 * i, 2 + 2 * i]) for i, (t, s) in enumerate(batch)]
        return np.asarray(loaded.step(cache, [pack_block(rows)], empty)[1])
    together = run(seqs)
    for i, seq in enumerate(seqs):
        np.testing.assert_allclose(together[i], run([seq])[0], **tol(jnp.float32))


def test_padding_tokens_take_the_pad_slot():
    """The LoRA branch sees each valid token under its row's slot and every padding token (of the
    row and token buckets) under PAD_SLOT, which adds nothing in any mode."""
    blocks = [pack_block([RowSpec([1, 2, 3], 0, None, 2, [1]), RowSpec([4], 0, None, -1, [2]),
                          RowSpec([5, 6], 0, None, 0, [3])], min_tokens=4),
              pack_block([RowSpec([7], 9, None, 1, [4])])]
    p = PAD_SLOT
    want = [2, 2, 2, p, -1, p, p, p, 0, 0, p, p, p, p, p, p, 1]
    np.testing.assert_array_equal(np.asarray(token_slots(blocks)), want)


def test_mode_needs_a_merge_first(config):
    runner = ModelRunner(init_model(config, seed=0))
    empty = jnp.zeros((0, config.text.hidden_size))
    block = pack_block([RowSpec([1], 0, None, 0, [1])])
    with pytest.raises(ValueError, match="merged"):
        runner.step(init_pages(config.text, 2, config.page_size, jnp.float32), [block], empty, "mixture")
    with pytest.raises(ValueError, match="slot 9"):
        runner.merge(9)


def test_preset_parameter_counts():
    assert abs(count_params(llava_1_5_7b()) - 7.06e9) < 0.01e9
    assert abs(count_params(llava_1_5_13b()) - 13.35e9) < 0.05e9


def test_config_errors():
    from valora_jax import LoraConfig, TextConfig, VisionConfig
    with pytest.raises(ValueError, match="'qq_proj'"):
        LoraConfig(targets=("q_proj", "qq_proj"))
    with pytest.raises(ValueError, match="num_kv_heads 3"):
        TextConfig(num_heads=4, num_kv_heads=3)
    with pytest.raises(ValueError, match="patch_size 7"):
        VisionConfig(image_size=64, patch_size=7)


def test_config_json_round_trip_and_base_id():
    from valora_jax import LMMConfig
    cfg = micro_config(targets=("q_proj",))
    again = LMMConfig.from_dict(__import__("json").loads(cfg.to_json()))
    assert again == cfg and again.base_id == cfg.base_id
    assert micro_config(max_loras=8).base_id == cfg.base_id          # the pool is not the base model
    assert llava_1_5_7b().base_id != cfg.base_id


def test_decode_and_prefill_blocks_in_one_step_equal_separate_steps(config, loaded):
    """Chunked prefill mixed with decodes: one call over two blocks == the blocks run alone."""
    rng = np.random.default_rng(8)
    empty = jnp.zeros((0, config.text.hidden_size))
    a, b, c = (rng.integers(0, 256, n).astype(np.int32) for n in (12, 7, 20))

    def prime(cache):
        # sequences a and b are decoding: their first tokens are already in the cache
        block = pack_block([RowSpec(a[:-1], 0, None, 0, [1, 2]), RowSpec(b[:-1], 0, None, 2, [3, 4])])
        return loaded.step(cache, [block], empty)[2]

    decode = pack_block([RowSpec(a[-1:], 11, None, 0, [1, 2]), RowSpec(b[-1:], 6, None, 2, [3, 4])])
    prefill = pack_block([RowSpec(c, 0, None, 1, [5, 6, 7, 8])])
    fresh = lambda: prime(init_pages(config.text, 12, config.page_size, jnp.float32))
    _, together, _ = loaded.step(fresh(), [decode, prefill], empty)
    _, dec_alone, _ = loaded.step(fresh(), [decode], empty)
    _, pre_alone, _ = loaded.step(fresh(), [prefill], empty)
    np.testing.assert_allclose(together[:2], dec_alone, **tol(jnp.float32))
    np.testing.assert_allclose(together[2:], pre_alone, **tol(jnp.float32))


def test_pallas_backend_matches_reference_through_the_model(config, loaded):
    """The model's LoRA branch on the ATMM kernel (interpreted on CPU) equals the jnp reference,
    in every mode, with mixed adapters and base-model tokens in one batch."""
    rng = np.random.default_rng(9)
    tokens, rows = _sequence(config, rng, 24, num_images=0)
    empty = jnp.zeros((0, config.text.hidden_size))
    loaded.merge(2)
    model = loaded.model()
    slots = jnp.asarray(np.repeat(np.array([-1, 0, 1, 2], np.int32), 6))
    args = (tokens[None], np.arange(24)[None], np.ones((1, 24), bool), rows[None], empty)
    for mode, merged in (("unmerged", -1), ("mixture", 2)):
        ref = model(*args, LoraContext(slots, jnp.int32(merged), mode, "reference"))
        got = model(*args, LoraContext(slots, jnp.int32(merged), mode, "pallas-interpret"))
        np.testing.assert_allclose(got, ref, **tol(jnp.float32))


def test_the_mosaic_backend_runs_the_mosaic_kernels_through_the_model():
    """A bfloat16 model's step on "pallas-mosaic", lowered for an H100, runs its LoRA branches on
    the Mosaic ATMM (Triton nowhere), and lora.merge_parts on it the Mosaic merge. The kernels'
    results are checked by tests/test_atmm_mosaic.py and test_merge_mosaic.py, one jitted call at
    a time: a model's eager forward through the GPU interpreter's callbacks can deadlock."""
    config = micro_config(dtype="bfloat16")
    runner = ModelRunner(init_model(config, seed=6))
    model = runner.model()
    tokens, rows = _sequence(config, np.random.default_rng(9), 24, num_images=0)
    slots = jnp.asarray(np.repeat(np.array([-1, 0, 1, 2], np.int32), 6))
    args = (tokens[None], np.arange(24)[None], np.ones((1, 24), bool), rows[None],
            jnp.zeros((0, config.text.hidden_size), jnp.bfloat16))
    step = lowered_for("NVIDIA H100 80GB HBM3",
                       lambda *a: model(*a, LoraContext(slots, jnp.int32(2), "mixture", "pallas-mosaic")), *args)
    assert "custom_call @mosaic_gpu" in step and "xla.gpu.triton" not in step
    kernel = jnp.zeros((64, 128), jnp.bfloat16)
    _, parts, _, _ = make_problem(Case(1, 64, (64, 32), 16, 3, dtype="bfloat16"), seed=0)
    merge = lowered_for("NVIDIA H100 80GB HBM3",
                        lambda k, m, ws, s: merge_parts(k, m, ws, (0, 96), s, "pallas-mosaic"), kernel, kernel, parts,
                        jnp.int32(1))
    assert merge.count("custom_call @mosaic_gpu") == 1


def test_swift_merge_kernel_through_the_runner(loaded):
    """A runner on the pallas backend merges by the swift-merge kernel (interpreted): the merged
    weights match the jnp merge, the one-call and per-layer switches agree bit for bit and free
    the weights they replace, and the base weights stay untouched."""
    loaded.merge(2)
    want = jax.tree.leaves(loaded.merged)
    fused = loaded.twin(backend="pallas-interpret")
    base_before = [np.asarray(a) for a in jax.tree.leaves(fused.params)]
    fused.merge(1)
    replaced = jax.tree.leaves(fused.merged)
    fused.merge(2)
    per_layer = loaded.twin(backend="pallas-interpret")
    per_layer.merge_per_layer(1)
    replaced_per_layer = jax.tree.leaves(per_layer.merged)
    per_layer.merge_per_layer(2)                     # each old weight replaced in place of the last
    assert per_layer.merged_slot == 2
    # both switches write in place: the weights they replace are donated, not kept alive
    assert all(a.is_deleted() for a in replaced + replaced_per_layer)
    for w, f, p in zip(want, jax.tree.leaves(fused.merged), jax.tree.leaves(per_layer.merged)):
        np.testing.assert_allclose(f, w, **tol(jnp.float32))
        assert np.array_equal(np.asarray(f), np.asarray(p))
    assert all(np.array_equal(a, np.asarray(b)) for a, b in zip(base_before, jax.tree.leaves(fused.params)))


def test_attention_kernels_equal_reference(config, loaded):
    """Prefill chunks through the flash prefill kernel and decode rows through the paged
    decode-attention kernel (both interpreted) give the logits of the gather-based reference at
    every step: rows of different lengths, a second chunk attending to the first through the
    cache, padding rows included."""
    rng = np.random.default_rng(10)
    kernel = ModelRunner(loaded.model(), attention="pallas-interpret")
    empty = jnp.zeros((0, config.text.hidden_size))
    seqs = [rng.integers(0, 256, n).astype(np.int32) for n in (5, 17, 30)]
    slots, pages = (0, -1, 2), [[1, 2], [3, 4, 5], [6, 7, 8, 9]]
    cut = [2, 9, 20]                                        # first chunk: tokens [0, cut)
    steps = [pack_block([RowSpec(t[:c], 0, None, s, p) for t, c, s, p in zip(seqs, cut, slots, pages)]),
             pack_block([RowSpec(t[c:-1], c, None, s, p) for t, c, s, p in zip(seqs, cut, slots, pages)]),
             pack_block([RowSpec(t[-1:], len(t) - 1, None, s, p) for t, s, p in zip(seqs, slots, pages)])]
    results = []
    for runner in (loaded, kernel):
        cache, logits = init_pages(config.text, 12, config.page_size, jnp.float32), []
        for block in steps:
            _, out, cache = runner.step(cache, [block], empty)
            logits.append(np.asarray(out[:3]))
        results.append(logits)
    for got, want in zip(results[1], results[0], strict=True):
        np.testing.assert_allclose(got, want, **tol(jnp.float32))
    with pytest.raises(ValueError, match="'flash'"):
        ModelRunner(loaded.model(), attention="flash")


def test_backends_auto_picks_the_platforms_and_explicit_choices_are_honoured_or_refused(loaded, monkeypatch):
    """auto is the references on a CPU and the Pallas kernels on a GPU; an explicit choice is kept
    where it runs and refused by name where it cannot (compiled kernels without a GPU)."""
    from valora_jax.runtime import resolve_backends
    assert resolve_backends() == ("reference", "reference")                    # the tests run on a CPU
    assert resolve_backends("pallas-interpret", "pallas-interpret") == ("pallas-interpret", "pallas-interpret")
    assert resolve_backends("pallas-mosaic-interpret")[0] == "pallas-mosaic-interpret"
    runner = ModelRunner(loaded.model())
    assert (runner.backend, runner.attention) == ("reference", "reference")
    for backend, attention, message in (("pallas", "auto", "LoRA backend 'pallas' runs compiled GPU kernels"),
                                        ("auto", "pallas", "attention backend 'pallas' runs compiled GPU kernels"),
                                        ("pallas-static", "auto", "'pallas-static'"), ("fast", "auto", "'fast'"),
                                        ("pallas-mosaic", "auto", "'pallas-mosaic' runs compiled GPU kernels")):
        with pytest.raises(ValueError, match=message):
            resolve_backends(backend, attention)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert resolve_backends() == ("pallas", "pallas")
    assert resolve_backends("pallas-triton")[0] == "pallas-triton"
    with pytest.raises(ValueError, match=r"'pallas-mosaic' runs Mosaic GPU kernels for Hopper .* but this GPU is cpu"):
        resolve_backends("pallas-mosaic")          # the CPU device stands in for a GPU that is not a Hopper
    assert resolve_backends("reference", "pallas") == ("reference", "pallas")


def test_runner_states_round_trip_and_keep_their_structure(loaded):
    """params / lora / merged are stored flat for the jitted calls and read back as nnx states;
    assigning a state of another structure is refused."""
    before = [np.asarray(a) for a in jax.tree.leaves(loaded.lora)]
    loaded.lora = loaded.lora                                        # a round trip changes nothing
    assert all(np.array_equal(a, np.asarray(b)) for a, b in zip(before, jax.tree.leaves(loaded.lora)))
    with pytest.raises(ValueError, match="lora must keep the structure"):
        loaded.lora = loaded.merged


def test_twin_shares_the_base_and_owns_its_slots(loaded):
    twin = loaded.twin(backend="pallas-interpret")
    assert twin.backend == "pallas-interpret" and twin.attention == loaded.attention
    assert all(a is b for a, b in zip(jax.tree.leaves(twin.params), jax.tree.leaves(loaded.params)))
    assert not any(a is b for a, b in zip(jax.tree.leaves(twin.lora), jax.tree.leaves(loaded.lora)))
    twin.write_slot(0, None)                    # donates only the twin's slot buffers
    assert all(not a.is_deleted() for a in jax.tree.leaves(loaded.lora))


def test_compile_seconds_of_this_thread_leave_out_other_threads_compiles():
    """A step's compile time counts the stepping thread's compiles only: a compile on another
    thread (an adapter copy, a request's preprocessing) is the process's, not the step's."""
    import threading

    from valora_jax.runtime import compile_seconds
    here, everywhere = compile_seconds(this_thread=True), compile_seconds()
    worker = threading.Thread(target=lambda: jax.jit(lambda x: x * 3 + 1).lower(jnp.ones(7)).compile())
    worker.start()
    worker.join()
    assert compile_seconds() > everywhere and compile_seconds(this_thread=True) == here
    jax.jit(lambda x: x * 5 - 2).lower(jnp.ones(9)).compile()
    assert compile_seconds(this_thread=True) > here


def test_sampling_inside_the_step_draws_what_the_sampler_draws(config, loaded):
    """sample_step's tokens are sample() of step's logits over the first vocab_size ids, row by
    row (greedy, temperature and nucleus rows, each with its own seed and step)."""
    from valora_jax.runtime import Sampling
    from valora_jax.sampling import sample
    rng = np.random.default_rng(4)
    block = pack_block([RowSpec(rng.integers(0, 256, 5).tolist(), 0, None, s, [1 + i])
                        for i, s in enumerate((0, -1, 2, 1))])
    empty = jnp.zeros((0, config.text.hidden_size))
    sampling = Sampling(np.array([0.0, 0.8, 1.3, 0.5], np.float32), np.array([1.0, 0.9, 0.5, 1.0], np.float32),
                        np.array([1, 2, 3, 4], np.uint32), np.array([0, 4, 7, 2], np.int32))
    cache = lambda: init_pages(config.text, 8, config.page_size, jnp.float32)
    _, logits, _ = loaded.step(cache(), [block], empty)
    _, tokens, _ = loaded.sample_step(cache(), [block], empty, sampling, vocab_size=200)
    want = sample(logits.at[:, 200:].set(-jnp.inf), *map(jnp.asarray, sampling))
    assert np.asarray(tokens).tolist() == np.asarray(want).tolist() and max(np.asarray(tokens)) < 200


def test_page_writes_store_valid_tokens_and_drop_padding():
    """Each valid token lands at its page and offset; padding (many rows' worth, all at position
    0) writes nothing, the null page included; other slots keep what they held."""
    from valora_jax.decoder import write_pages

    rng = np.random.default_rng(3)
    h, pages_n, size, dh = 2, 6, 4, 8
    pages = jnp.asarray(rng.standard_normal((h, pages_n, size, dh)), jnp.float32)
    table = np.array([[3, 1, 0], [5, 0, 0], [0, 0, 0]], np.int32)          # row 2: all padding
    positions = np.array([[2, 3, 4, 5], [1, 0, 0, 0], [0, 0, 0, 0]], np.int32)
    valid = np.array([[True] * 4, [True, False, False, False], [False] * 4])
    new = jnp.asarray(rng.standard_normal((3, 4, h, dh)), jnp.float32)
    got, want = np.asarray(write_pages(pages, new, positions, valid, table)), np.array(pages)
    for b, q in zip(*np.nonzero(valid)):
        p = positions[b, q]
        want[:, table[b, p // size], p % size] = np.asarray(new[b, q])
    np.testing.assert_array_equal(got, want)
    assert (got[:, 0] == np.asarray(pages)[:, 0]).all()


def test_a_step_passes_only_the_arrays_its_mode_reads(loaded):
    """Unmerged steps leave out the merged copies, merged steps the adapter slots and the base
    kernels their merged copies stand in for, mixture steps those base kernels (and none passes the
    vision tower's): fewer arrays to dispatch."""
    from valora_jax.lora import targeted_linears

    leaves = {mode: loaded._decoder_leaves(mode) for mode in ("unmerged", "merged", "mixture")}
    targeted = len(targeted_linears(loaded.model().decoder))
    assert leaves["unmerged"][2] == () and leaves["merged"][1] == ()
    assert len(leaves["merged"][0]) == len(leaves["mixture"][0]) == len(leaves["unmerged"][0]) - targeted
    assert len(leaves["mixture"][1]) == len(leaves["unmerged"][1]) > 0
    assert len(leaves["merged"][2]) == len(leaves["mixture"][2]) == targeted
    assert len(leaves["unmerged"][0]) < len(loaded._leaves["params"])         # no vision tower
