"""Qwen2.5-VL / Qwen2-VL import: parity with transformers + peft on the committed fixtures
(tests/fixtures/make_qwen_fixtures.py): the processor's patches, M-RoPE positions, the tower's
features, and the logits of the base model and of adapters in every mode, for one image, two
images of different sizes and a clip."""

import functools
import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tol
from valora_jax import LoraConfig, ModelRunner
from valora_jax.config import ALL_TARGETS
from valora_jax.hf_model import hf_config, load_hf_model
from valora_jax.hf_peft import read_peft
from valora_jax.image import qwen_patches
from valora_jax.lora import LoraContext
from valora_jax.qwen_vision import mrope_positions

FIXTURES = Path(__file__).parent / "fixtures" / "hf"
REFS = np.load(FIXTURES / "qwen_references.npz")
MODELS = {"qwen2_5-vl": ("lora", "lora-vision"), "qwen2-vl": ("lora",)}
CASES = ("one_image", "two_images", "video")
LORA = LoraConfig(max_loras=2, max_rank=8, targets=ALL_TARGETS)


@functools.cache
def _loaded(name: str):
    """(fixture name, runner of the HF directory read directly with its adapters in slots 0..,
    config.json)."""
    runner = ModelRunner(load_hf_model(FIXTURES / name, lora=LORA))
    for slot, adapter in enumerate(MODELS[name]):
        runner.write_slot(slot, read_peft(FIXTURES / f"{name}-{adapter}", runner.config))
    return name, runner, json.loads((FIXTURES / name / "config.json").read_text())


@pytest.fixture(scope="module", params=sorted(MODELS))
def loaded(request):
    return _loaded(request.param)


def _media(name: str, case: str):
    """(patches, grids, features key, media token key) of a recorded case."""
    video = case == "video"
    key = f"{name}/{case}/"
    patches = REFS[key + ("pixel_values_videos" if video else "pixel_values")]
    grids = [tuple(int(v) for v in g) for g in REFS[key + ("video_grid_thw" if video else "image_grid_thw")]]
    return patches, grids, "video_embeds" if video else "image_embeds", "video_token_id" if video else "image_token_id"


def _logits(runner, hf, name, case, slot=-1, mode="unmerged"):
    """Full-sequence logits [L, V] of a recorded case: the tower on the recorded patches (the
    image adapter `slot` on its linears), the recorded M-RoPE positions."""
    patches, grids, _, media = _media(name, case)
    model = runner.model()
    feats = model.encode_patches(jnp.asarray(patches), grids,
                                 LoraContext(jnp.full((len(grids),), slot, jnp.int32), jnp.int32(runner.merged_slot),
                                             mode))
    ids = REFS[f"{name}/{case}/input_ids"][0]
    is_media = ids == hf[media]
    rows = np.where(is_media, np.cumsum(is_media) - 1, -1)
    n = len(ids)
    ctx = LoraContext(jnp.full((n,), slot, jnp.int32), jnp.int32(runner.merged_slot), mode)
    rope = REFS[f"{name}/{case}/position_ids"][:, 0].T[None]                         # [1, L, 3]
    out = model(ids[None], np.arange(n)[None], np.ones((1, n), bool), rows[None], feats, ctx, rope)
    return np.asarray(out[0])


@pytest.mark.parametrize("case", CASES)
def test_tower_features_and_base_logits_match_transformers(loaded, case):
    name, runner, hf = loaded
    patches, grids, feats_key, _ = _media(name, case)
    none = LoraContext.unmerged(jnp.full((len(grids),), -1, jnp.int32))
    np.testing.assert_allclose(runner.model().encode_patches(jnp.asarray(patches), grids, none),
                               REFS[f"{name}/{case}/{feats_key}"], **tol(jnp.float32))
    np.testing.assert_allclose(_logits(runner, hf, name, case), REFS[f"{name}/{case}/logits_base"][0],
                               **tol(jnp.float32))


@pytest.mark.parametrize("case", CASES)
def test_adapter_logits_match_peft_in_every_mode_and_on_the_tower(loaded, case):
    name, runner, hf = loaded
    refs = REFS[f"{name}/{case}/logits_base"][0]
    unmerged = _logits(runner, hf, name, case, slot=0)
    assert np.abs(unmerged - refs).max() > 0.05                     # the adapter moves the logits
    np.testing.assert_allclose(unmerged, REFS[f"{name}/{case}/logits_lora_unmerged"][0], **tol(jnp.float32))
    runner.merge(0)
    np.testing.assert_allclose(_logits(runner, hf, name, case, slot=0, mode="merged"),
                               REFS[f"{name}/{case}/logits_lora_merged"][0], **tol(jnp.float32))
    # mixture, the decoder adapter merged: the base model's requests take it back out
    np.testing.assert_allclose(_logits(runner, hf, name, case, slot=-1, mode="mixture"), refs, **tol(jnp.float32))
    if "lora-vision" in MODELS[name]:
        vision = REFS[f"{name}/{case}/logits_lora_vision"][0]
        np.testing.assert_allclose(_logits(runner, hf, name, case, slot=1), vision, **tol(jnp.float32))
        np.testing.assert_allclose(_logits(runner, hf, name, case, slot=1, mode="mixture"), vision,
                                   **tol(jnp.float32))


@pytest.mark.parametrize("case", CASES)
def test_patches_and_positions_match_the_processor(loaded, case):
    """Our processing of the raw pixels gives the processor's patches and grids; our M-RoPE
    positions are transformers' for images. For a clip, the clip's own positions are too, and
    the text after it continues from 1 + the largest position before it, as Qwen2.5-VL's
    release does (transformers 5 continues from the clip's start + its height or width in
    units, which ignores its time extent)."""
    name, runner, hf = loaded
    key = f"{name}/{case}/"
    patches, grids, _, media = _media(name, case)
    if case == "video":
        ours, grid = qwen_patches(list(REFS[key + "raw_video"]), runner.config.vision)
        got, got_grids = ours, [grid]
    else:
        raws = (list(REFS[key + "raw_images"]) if case == "one_image"
                else [REFS[key + "raw_image0"], REFS[key + "raw_image1"]])
        results = [qwen_patches(r, runner.config.vision) for r in raws]
        got, got_grids = np.concatenate([p for p, _ in results]), [g for _, g in results]
    assert got_grids == grids
    np.testing.assert_allclose(got, patches, atol=0.05)              # resampling differs at the last bit
    assert np.abs(got - patches).mean() < 2e-3
    ids = REFS[key + "input_ids"][0]
    seconds = [float(s) for s in REFS[key + "second_per_grid_ts"]] if key + "second_per_grid_ts" in REFS else [1.0]
    kw = dict(video_grids=grids, video_seconds=seconds) if case == "video" else dict(image_grids=grids)
    positions, delta = mrope_positions(ids, hf["image_token_id"], hf["video_token_id"], runner.config.vision,
                                       scaled_time=runner.config.family == "qwen2_5_vl", **kw)
    recorded = REFS[key + "position_ids"][:, 0].T
    is_media = ids == hf[media]
    np.testing.assert_array_equal(positions[:np.argmax(is_media)], recorded[:np.argmax(is_media)])
    np.testing.assert_array_equal(positions[is_media], recorded[is_media])
    if case != "video" or (positions == recorded).all():
        np.testing.assert_array_equal(positions, recorded)
        assert delta == int(REFS[key + "rope_deltas"][0, 0])
    else:
        after = np.nonzero(is_media)[0][-1] + 1
        assert (positions[after:] == positions[after - 1].max() + 1 + np.arange(len(ids) - after)[:, None]).all()


def test_config_of_each_fixture():
    for name, family in (("qwen2_5-vl", "qwen2_5_vl"), ("qwen2-vl", "qwen2_vl")):
        cfg = hf_config(FIXTURES / name)
        assert cfg.family == family and cfg.text.qkv_bias and cfg.text.mrope_section == (1, 1, 2)
        assert cfg.text.tie_word_embeddings == (family == "qwen2_5_vl")
        assert cfg.vision.gated_mlp == (family == "qwen2_5_vl")
        assert (cfg.vision.min_pixels, cfg.vision.max_pixels) == (3136, 50176)


@pytest.mark.parametrize("decode_loop", [1, 4])
def test_engine_greedy_tokens_equal_transformers(loaded, decode_loop):
    """The recorded chats through the serving engine (our tokenizer, image processing and M-RoPE
    positions; images of different sizes batched, paged attention, the prompt in chunks, decodes
    one a step or several a device loop) give transformers' 16 greedy tokens; Qwen2-VL's clip too
    (Qwen2.5-VL's clip positions the text after it as the model's release does, not as the
    transformers version that recorded it: see test_patches_and_positions_match_the_processor)."""
    from serve.config import EngineConfig
    from serve.engine import Engine
    from valora_jax import AdapterPool, Request
    from valora_jax.hf_tokenizer import load_tokenizer
    from valora_jax.request import Clip

    name, runner, _ = loaded
    pool = AdapterPool(runner.config, runner.module_shapes, runner.write_slot)
    config = EngineConfig(num_pages=64, prefill_chunk=16, prefill_width=16, decode_loop=decode_loop)
    engine = Engine(runner, pool, config=config, policy="unmerged", tokenizer=load_tokenizer(FIXTURES / name))
    requests, want = [], []
    for case in json.loads((FIXTURES / "qwen_tokenizer_cases.json").read_text())["processor_prompts"]:
        if case["model"] != name or (case["case"] == "video" and name == "qwen2_5-vl"):
            continue
        key = f"{name}/{case['case']}/"
        media = ({"videos": [Clip(list(REFS[key + "raw_video"]))]} if case["case"] == "video" else
                 {"images": list(REFS[key + "raw_images"]) if case["case"] == "one_image"
                  else [REFS[key + "raw_image0"], REFS[key + "raw_image1"]]})
        requests.append(Request(messages=case["messages"], max_tokens=16, ignore_eos=True, **media))
        want.append(REFS[key + "greedy"].tolist())
    assert [list(c.token_ids) for c in engine.generate(requests)] == want


def test_engine_serves_clips_images_and_adapters_as_the_oracle():
    """A clip, images of different sizes, the decoder adapter and the vision-tower adapter
    served together in merged steps (one adapter at a time) give each request what the
    full-recompute oracle gives it alone (Qwen2.5-VL; the unmerged engine is checked against
    transformers in test_engine_greedy_tokens_equal_transformers)."""
    from oracle import reference_completion
    from serve.config import EngineConfig
    from serve.engine import Engine
    from valora_jax import AdapterPool, Request
    from valora_jax.hf_tokenizer import load_tokenizer
    from valora_jax.request import Clip

    name, runner, _ = _loaded("qwen2_5-vl")
    runner, policy = runner.twin(), "merged"
    tokenizer = load_tokenizer(FIXTURES / name)
    pool = AdapterPool(runner.config, runner.module_shapes, runner.write_slot)
    adapters = {a: read_peft(FIXTURES / f"{name}-{a}", runner.config, name=a) for a in MODELS[name]}
    for adapter in adapters.values():
        pool.register(adapter)
    engine = Engine(runner, pool, config=EngineConfig(num_pages=64, prefill_chunk=32, prefill_width=32),
                    policy=policy, tokenizer=tokenizer)
    cases = {c["case"]: c for c in json.loads((FIXTURES / "qwen_tokenizer_cases.json").read_text())["processor_prompts"]
             if c["model"] == name}
    key = f"{name}/"
    clip = Request(messages=cases["video"]["messages"], videos=[Clip(list(REFS[key + "video/raw_video"]))],
                   max_tokens=8, ignore_eos=True)
    requests = [clip,
                Request(messages=cases["one_image"]["messages"], images=list(REFS[key + "one_image/raw_images"]),
                        adapter="lora", max_tokens=6, ignore_eos=True),
                Request(messages=cases["two_images"]["messages"], adapter=list(adapters)[-1], max_tokens=6,
                        images=[REFS[key + "two_images/raw_image0"], REFS[key + "two_images/raw_image1"]],
                        ignore_eos=True)]
    got = engine.generate(requests)
    model = runner.model()
    for request, completion in zip(requests, got):
        want = reference_completion(model, adapters.get(request.adapter), request, tokenizer)
        assert completion.token_ids == want.token_ids, request.adapter


def test_precompiled_qwen_engine_compiles_nothing_while_serving():
    """precompile covers the Qwen-VL tower's patch buckets and the steps with M-RoPE positions:
    images of several sizes and a clip are then served without compiling a step or a tower call
    (Qwen2.5-VL; Qwen2-VL's steps and tower have the same shapes)."""
    from serve.config import EngineConfig, precompile
    from serve.engine import Engine
    from valora_jax import AdapterPool, Request
    from valora_jax.hf_tokenizer import load_tokenizer
    from valora_jax.request import Clip
    from valora_jax.runtime import compile_seconds_by_function

    def compiled_step_functions():
        functions = ("jit(_sample_step_impl)", "jit(_encode_patches_impl)", "jit(_decode_loop_impl)")
        return {f: s for f, s in compile_seconds_by_function().items() if f in functions}

    runner = ModelRunner(load_hf_model(FIXTURES / "qwen2_5-vl"))
    tokenizer = load_tokenizer(FIXTURES / "qwen2_5-vl")
    config = EngineConfig(num_pages=64, prefill_chunk=32, prefill_width=32, token_budget=64, max_rows=4, min_rows=4,
                          min_pages=16, min_features=256, encoder_batches=(1, 2, 4), precompile=True, decode_loop=2)
    pool = AdapterPool(runner.config, runner.module_shapes, runner.write_slot)
    precompile(runner, config, ("unmerged",), vocab_size=tokenizer.vocab_size)
    compiled = compiled_step_functions()
    assert len(compiled) == 3
    engine = Engine(runner, pool, config=config, policy="unmerged", tokenizer=tokenizer)
    rng = np.random.default_rng(0)

    def image(h, w):
        return rng.integers(0, 256, (h, w, 3), np.uint8)

    engine.generate([Request("one", [image(60, 90)], max_tokens=5), Request("two", [image(40, 40), image(200, 120)]),
                     Request("clip", videos=[Clip([image(56, 56)] * 3)], max_tokens=5)])
    assert compiled_step_functions() == compiled
