"""The Qwen-VL family's pieces on their own: configs and presets, M-RoPE positions, the tower's
patch layout and windows, image patches, and the decoder's Qwen2 options against plain maths."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from valora_jax import LMMConfig, LoraConfig, TextConfig
from valora_jax.config import DECODER_TARGETS, QwenVisionConfig, qwen2_5_vl_3b, qwen2_5_vl_7b
from valora_jax.decoder import rope_angles
from valora_jax.image import qwen_patches, smart_resize
from valora_jax.lora import LoraContext
from valora_jax.model import count_params, init_model
from valora_jax.qwen_vision import mrope_positions, patch_layout, vision_rope_angles

VISION = QwenVisionConfig(num_layers=2, hidden_size=16, num_heads=2, mlp_size=32, window_size=56,
                          full_attention_layers=(1,), min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 64)
TEXT = TextConfig(vocab_size=300, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_size=64,
                  rope_theta=1e6, rms_norm_eps=1e-6, qkv_bias=True, mrope_section=(1, 1, 2), tie_word_embeddings=True)


def tiny_qwen(family: str = "qwen2_5_vl", **lora) -> LMMConfig:
    vision = VISION if family == "qwen2_5_vl" else dataclasses.replace(VISION, window_size=0, full_attention_layers=(),
                                                                       gated_mlp=False)
    return LMMConfig(name=f"tiny-{family}", family=family, vision=vision, text=TEXT,
                     lora=LoraConfig(**{"max_loras": 2, "max_rank": 8, "targets": DECODER_TARGETS, **lora}))


def test_presets_have_the_checkpoints_parameter_counts():
    """Qwen2.5-VL-3B/7B-Instruct hold 3,754,622,976 and 8,292,166,656 parameters (3B: the LM head
    tied to the embeddings)."""
    assert count_params(qwen2_5_vl_3b()) == 3_754_622_976
    assert count_params(qwen2_5_vl_7b()) == 8_292_166_656


def test_config_round_trip_and_errors():
    cfg = tiny_qwen()
    again = LMMConfig.from_dict(__import__("json").loads(cfg.to_json()))
    assert again == cfg and again.base_id == cfg.base_id
    assert tiny_qwen("qwen2_vl").base_id != cfg.base_id
    with pytest.raises(ValueError, match="family 'llava' takes a VisionConfig"):
        dataclasses.replace(cfg, family="llava")
    with pytest.raises(ValueError, match="unknown model family 'qwen3'"):
        dataclasses.replace(cfg, family="qwen3")
    with pytest.raises(ValueError, match=r"mrope_section \[\] \(needed\)"):
        dataclasses.replace(cfg, text=dataclasses.replace(TEXT, mrope_section=()))
    with pytest.raises(ValueError, match=r"mrope_section \[1, 1, 1\] must sum to head_dim / 2 = 4"):
        dataclasses.replace(TEXT, mrope_section=(1, 1, 1))
    with pytest.raises(ValueError, match="window_size 50"):
        dataclasses.replace(VISION, window_size=50)
    with pytest.raises(ValueError, match=r"full_attention_layers \[2\]"):
        dataclasses.replace(VISION, full_attention_layers=(2,))


def test_mrope_positions_of_text_images_and_video():
    """Text counts on from the largest position before it; an image's tokens take (0, row,
    column) from where its run starts; a clip's time axis counts frame pairs, scaled by seconds
    in Qwen2.5-VL."""
    img, vid = 9, 8
    pos, delta = mrope_positions([1, 2, 3], img, vid, VISION)
    assert (pos == np.arange(3)[:, None]).all() and delta == 0
    tokens = [1, img, img, img, img, img, img, 2, vid, vid, vid, vid, 3]
    pos, delta = mrope_positions(tokens, img, vid, VISION, image_grids=[(1, 4, 6)], video_grids=[(2, 2, 4)],
                                 video_seconds=[1.5])
    np.testing.assert_array_equal(pos[1:7], 1 + np.array([[0, 0, 0], [0, 0, 1], [0, 0, 2],
                                                           [0, 1, 0], [0, 1, 1], [0, 1, 2]]))
    assert pos[7].tolist() == [4, 4, 4]                                   # 1 + the largest before it
    np.testing.assert_array_equal(pos[8:12], 5 + np.array([[0, 0, 0], [0, 0, 1], [3, 0, 0], [3, 0, 1]]))
    assert pos[12].tolist() == [9, 9, 9] and delta == 10 - len(tokens)
    unscaled, _ = mrope_positions(tokens, img, vid, VISION, image_grids=[(1, 4, 6)], video_grids=[(2, 2, 4)],
                                  video_seconds=[1.5], scaled_time=False)
    assert unscaled[10].tolist() == [6, 5, 5]
    with pytest.raises(ValueError, match="fewer than the 6 of grid"):
        mrope_positions([img] * 5, img, vid, VISION, image_grids=[(1, 4, 6)])
    adjacent, _ = mrope_positions([img] * 12, img, vid, VISION, image_grids=[(1, 4, 6), (1, 4, 6)])
    assert adjacent[6].tolist() == [3, 3, 3]                              # the second image starts after the first
    with pytest.raises(ValueError, match="more image runs"):
        mrope_positions([img] * 6, img, vid, VISION)
    with pytest.raises(ValueError, match="1 grids without their tokens"):
        mrope_positions([1, 2], img, vid, VISION, image_grids=[(1, 4, 6)])


def test_patch_layout_windows_and_frames():
    """Patches come merge unit by merge unit; a window holds (56 / 28)^2 = 4 units and the tower
    takes them window by window, so that every frame and window is one run; segments of two
    images never meet; restore puts the units back in the processor's order."""
    layout = patch_layout(VISION, [(1, 4, 6), (2, 2, 2)])
    order, row, col, (frame, window), restore = layout
    assert (order.reshape(-1, 4) % 4 == np.arange(4)).all()                 # whole units, in their order
    assert (order[::4] // 4).tolist() == [0, 1, 3, 4, 2, 5, 6, 7]           # image 0: units 2 x 3, windows of 2 x 2
    assert row[:12].tolist() == [0, 0, 1, 1, 0, 0, 1, 1, 2, 2, 3, 3]
    assert col[:12].tolist() == [0, 1, 0, 1, 2, 3, 2, 3, 0, 1, 0, 1]
    assert frame.tolist() == [0] * 24 + [1] * 4 + [2] * 4
    assert window.tolist() == [0] * 16 + [1] * 8 + [2] * 4 + [3] * 4
    assert ((order[::4] // 4)[restore] == np.arange(8)).all()
    no_windows = dataclasses.replace(VISION, window_size=0, full_attention_layers=())
    plain = patch_layout(no_windows, [(1, 4, 6)])
    assert (plain.segments[1] == 0).all() and (plain.order == np.arange(24)).all()
    padded = layout.padded(40, 4)
    assert padded.order[32:].tolist() == list(range(32, 40)) and (padded.segments[:, 32:] == -1).all()
    assert padded.restore.tolist() == restore.tolist() + [8, 9]
    angles = vision_rope_angles(row, col, head_dim=8)
    assert angles.shape == (32, 4) and angles[5, 0] == row[5] and angles[5, 2] == col[5]


def test_smart_resize_and_patch_order():
    assert smart_resize(45, 70, 28, 28 * 28 * 4, 28 * 28 * 64) == (56, 56)
    assert smart_resize(2000, 1000, 28, 28 * 28 * 4, 28 * 28 * 64) == (308, 140)       # over the budget: scaled down
    with pytest.raises(ValueError, match="aspect ratio"):
        smart_resize(1, 300, 28, 1, 10**6)
    rng = np.random.default_rng(0)
    image = (rng.random((56, 84, 3)) * 255).astype(np.uint8)
    patches, grid = qwen_patches(image, VISION)
    assert grid == (1, 4, 6) and patches.shape == (24, VISION.patch_dim)
    # patch 5 = unit (0, 1), its patch (0, 1): pixels rows 0..13, columns 42..55; channel 1, frame 1
    pixel = (image[3, 42 + 7, 1] / 255.0 - VISION.image_mean[1]) / VISION.image_std[1]
    values = patches[5].reshape(3, 2, 14, 14)
    np.testing.assert_allclose(values[1, 1, 3, 7], pixel, rtol=1e-5)
    np.testing.assert_array_equal(values[:, 0], values[:, 1])                   # an image is its frame twice
    clip, grid = qwen_patches([image] * 3, VISION)
    assert grid == (2, 4, 6)                                                    # 3 frames padded to 4


def test_mrope_with_equal_axes_is_rope_and_qwen2_options():
    """With every axis at the token's position, M-RoPE turns each frequency as 1-D RoPE does; the
    q/k/v biases and the tied head are what the decoder computes."""
    pos = jnp.arange(7)
    np.testing.assert_array_equal(rope_angles(jnp.stack([pos] * 3, -1), 8, 1e6, (1, 1, 2)),
                                  rope_angles(pos, 8, 1e6))
    cfg = tiny_qwen()
    model = init_model(cfg, seed=1)
    plain = init_model(dataclasses.replace(cfg, family="llava", vision=__import__("valora_jax").VisionConfig(),
                                           text=dataclasses.replace(TEXT, mrope_section=())), seed=1)
    from flax import nnx
    nnx.update(plain.decoder, nnx.state(model.decoder))
    tokens = jnp.array([[5, 9, 17, 3, 250]], jnp.int32)
    positions, valid = jnp.arange(5)[None], jnp.ones((1, 5), bool)
    ctx = LoraContext.unmerged(jnp.full((5,), -1, jnp.int32))
    feats = jnp.zeros((0, TEXT.hidden_size))
    logits = model(tokens, positions, valid, -jnp.ones_like(tokens), feats, ctx)
    np.testing.assert_allclose(logits, plain(tokens, positions, valid, -jnp.ones_like(tokens), feats, ctx), rtol=1e-6)
    three = jnp.stack([positions] * 3, -1)
    np.testing.assert_allclose(model(tokens, positions, valid, -jnp.ones_like(tokens), feats, ctx, three), logits,
                               rtol=1e-6)
    assert model.decoder.lm_head is None and float(jnp.abs(model.decoder.layers[0].qkv_proj.bias[...]).sum()) == 0
    model.decoder.layers[0].qkv_proj.bias[...] = jnp.ones_like(model.decoder.layers[0].qkv_proj.bias[...])
    assert not np.allclose(model(tokens, positions, valid, -jnp.ones_like(tokens), feats, ctx), logits)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen2_vl"])
def test_tower_runs_images_of_any_size_together(family):
    """Two images of different grids in one call give each image the features it gets alone
    (attention never crosses images), one decoder-width token per merge unit."""
    cfg = tiny_qwen(family)
    model = init_model(cfg, seed=2)
    rng = np.random.default_rng(1)
    grids = [(1, 4, 6), (1, 8, 4)]
    patches = [rng.standard_normal((t * h * w, cfg.vision.patch_dim)).astype(np.float32) for t, h, w in grids]

    def none(n):
        return LoraContext.unmerged(jnp.full((n,), -1, jnp.int32))

    both = model.encode_patches(jnp.concatenate(patches), grids, none(2))
    assert both.shape == (6 + 8, TEXT.hidden_size)
    alone = [model.encode_patches(jnp.asarray(p), [g], none(1)) for p, g in zip(patches, grids)]
    np.testing.assert_allclose(both, jnp.concatenate(alone), rtol=2e-5, atol=2e-6)
    with pytest.raises(ValueError, match="do not match grids"):
        model.encode_patches(jnp.concatenate(patches)[1:], grids, none(2))
    with pytest.raises(ValueError, match="use encode_patches"):
        model.encode_images(jnp.zeros((1, 28, 28, 3)), none(1))


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen2_vl"])
def test_tower_attention_kernel_matches_the_reference(family):
    """The segment-attention kernel (interpreted) in the tower, windowed and full blocks, on two
    images and a clip, through the runner's padded patch buffers, as the dense reference does."""
    from valora_jax import ModelRunner

    cfg = tiny_qwen(family)
    runner = ModelRunner(init_model(cfg, seed=3), backend="reference", attention="reference")
    kernel = runner.twin(attention="pallas-interpret")
    rng = np.random.default_rng(4)
    grids = [(1, 4, 6), (2, 4, 4), (1, 2, 2)]
    patches = [rng.standard_normal((t * h * w, cfg.vision.patch_dim)).astype(np.float32) for t, h, w in grids]
    want, got = (r.encode_patches(patches, grids, [-1, -1, -1]) for r in (runner, kernel))
    for w, g in zip(want, got):
        np.testing.assert_allclose(g.rows[g.start:g.start + g.count], w.rows[w.start:w.start + w.count],
                                   rtol=2e-5, atol=2e-6)
