"""Hugging Face / PEFT import: logit parity with transformers + peft on the committed fixtures
(tests/fixtures/make_hf_fixtures.py), the tokenizer, the CLI, and every refused input."""

import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from conftest import tol
from serve.cli import main
from valora_jax import LoraConfig, ModelRunner, load_model, tiny
from valora_jax.config import ALL_TARGETS
from valora_jax.hf_model import hf_config, import_hf, is_hf_checkpoint, load_hf_model
from valora_jax.hf_peft import import_peft, module_shapes_for, read_peft
from valora_jax.hf_tokenizer import HFTokenizer, load_tokenizer
from valora_jax.image import preprocess_batch
from valora_jax.lora import LoraContext
from valora_jax.tokenizer import ByteTokenizer

FIXTURES = Path(__file__).parent / "fixtures" / "hf"
REFS = np.load(FIXTURES / "references.npz")
CASES = json.loads((FIXTURES / "tokenizer_cases.json").read_text())
ADAPTERS = {"llava-gqa": ("lora-qv", "lora-patterns"), "llava-mha": ("lora-layers",)}
LORA = LoraConfig(max_loras=2, max_rank=8, targets=ALL_TARGETS)


# parity ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module", params=sorted(ADAPTERS))
def loaded(request):
    """(fixture name, runner of the HF directory read directly, adapters in slots 0.., image id)."""
    name = request.param
    runner = ModelRunner(load_hf_model(FIXTURES / name, lora=LORA))
    for slot, a in enumerate(ADAPTERS[name]):
        runner.write_slot(slot, read_peft(FIXTURES / f"{name}-{a}", runner.config))
    image_id = json.loads((FIXTURES / name / "config.json").read_text())["image_token_index"]
    return name, runner, image_id


def _logits(runner, name, image_id, slot=-1, mode="unmerged"):
    """Full-sequence logits [L, V] for the recorded prompt and pixel values."""
    ids = REFS[f"{name}/input_ids"]
    pixels = REFS[f"{name}/pixel_values"].transpose(0, 2, 3, 1)             # [N, 3, H, W] -> [N, H, W, 3]
    feats = runner.encode_images(pixels, [slot] * len(pixels), mode).reshape(-1, runner.config.text.hidden_size)
    n = len(ids)
    is_image = ids == image_id
    rows = np.where(is_image, np.cumsum(is_image) - 1, -1)
    ctx = LoraContext(jnp.full((n,), slot, jnp.int32), jnp.int32(runner.merged_slot), mode)
    out = runner.model()(ids[None], np.arange(n)[None], np.ones((1, n), bool), rows[None], feats, ctx)
    return np.asarray(out[0])


def test_base_logits_match_transformers(loaded):
    name, runner, image_id = loaded
    np.testing.assert_allclose(_logits(runner, name, image_id), REFS[f"{name}/base"], **tol(jnp.float32))


def test_adapter_logits_match_peft_unmerged_and_merged(loaded):
    name, runner, image_id = loaded
    for slot, a in enumerate(ADAPTERS[name]):
        np.testing.assert_allclose(_logits(runner, name, image_id, slot), REFS[f"{name}/{a}/unmerged"],
                                   **tol(jnp.float32), err_msg=f"{a} unmerged")
        runner.merge(slot)
        np.testing.assert_allclose(_logits(runner, name, image_id, slot, "merged"), REFS[f"{name}/{a}/merged"],
                                   **tol(jnp.float32), err_msg=f"{a} merged")


def test_config_of_each_fixture():
    gqa, mha = hf_config(FIXTURES / "llava-gqa"), hf_config(FIXTURES / "llava-mha")
    assert (gqa.text.num_heads, gqa.text.num_kv_heads, gqa.vision.feature_layer) == (4, 2, -2)
    assert (mha.text.num_kv_heads, mha.vision.feature_layer, mha.text.rope_theta) == (4, -1, 500000.0)
    assert mha.text.rms_norm_eps == mha.vision.layer_norm_eps == 1e-6
    assert gqa.name == "llava-gqa" and gqa.dtype == "float32" and gqa.tokens_per_image == 16


def test_preprocessing_matches_the_recorded_pixels():
    rng = np.random.default_rng(1)               # the fixture script's images(seed=1, n=2)
    images = [(rng.random((h, w, 3)) * 255).astype(np.uint8) for (w, h) in [(24, 18), (20, 30)]]
    v = hf_config(FIXTURES / "llava-gqa").vision
    ours = preprocess_batch(images, size=v.image_size, mean=v.image_mean, std=v.image_std)
    np.testing.assert_allclose(ours, REFS["llava-gqa/pixel_values"].transpose(0, 2, 3, 1), atol=1e-4)


def test_adapter_scales_follow_rslora_and_patterns():
    config = hf_config(FIXTURES / "llava-gqa", lora=LORA)
    a = read_peft(FIXTURES / "llava-gqa-lora-patterns", config)
    assert a.weights["decoder.layers.0.o_proj"][0].shape == (32, 2)          # rank_pattern o_proj: 2
    assert a.scales["decoder.layers.0.o_proj"] == pytest.approx(8 / 2 ** 0.5)
    assert a.scales["decoder.layers.0.gate_proj"] == pytest.approx(3 / 2)     # alpha_pattern gate_proj: 3
    assert a.scales["decoder.layers.1.k_proj"] == pytest.approx(16 / 2)
    assert a.scales["decoder.layers.0.k_proj"] == pytest.approx(8 / 2)
    assert a.weights["projector.linear_2"][0].shape == (32, 6)
    qv = read_peft(FIXTURES / "llava-gqa-lora-qv", config)
    assert qv.targets == ("q_proj", "v_proj", "vision.q_proj", "vision.v_proj")
    layers = read_peft(FIXTURES / "llava-mha-lora-layers", hf_config(FIXTURES / "llava-mha", lora=LORA))
    assert {p.split(".")[2] for p in layers.weights} == {"1"}                 # layers_to_transform=[1]


# tokenizer ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(FIXTURES / "llava-gqa")      # chat_template.jinja, starting with the bos token


def test_tokenizer_matches_recorded_ids(tok):
    assert isinstance(tok, HFTokenizer)
    assert (tok.vocab_size, tok.image_id, tok.stop_ids) == (CASES["vocab_size"], CASES["image_id"], (CASES["eos_id"],))
    for case in CASES["texts"]:
        assert tok.encode(case["text"]) == case["ids"]
        assert tok.decode(case["ids"], skip_special=False) == case["decoded_with_special"]
        if tok.image_id not in case["ids"]:
            assert tok.decode(case["ids"]) == case["decoded"] == case["text"]
    for case in CASES["chats"]:
        assert tok.chat_prompt(case["messages"], case["add_generation_prompt"]) == case["ids"]
        assert tok.render(case["messages"], case["add_generation_prompt"]) == case["text"]


def test_prompt_with_images_expands_like_the_processor():
    for case in CASES["processor_prompts"]:     # llava-mha: template in tokenizer_config.json, no bos in it
        model_tok, config = load_tokenizer(FIXTURES / case["model"]), hf_config(FIXTURES / case["model"])
        ids = model_tok.chat_prompt(case["messages"])
        assert model_tok.expand_image_tokens(ids, config.tokens_per_image) == case["input_ids"]
        assert ids[0] == CASES["bos_id"] and ids.count(CASES["bos_id"]) == 1
    (text,) = [p["text"] for p in case["messages"][0]["content"] if p["type"] == "text"]
    assert model_tok.prompt_ids(text, num_images=1) == ids


def test_stream_decoder_equals_decode(tok):
    for case in CASES["texts"]:
        for skip in (True, False):
            stream = tok.stream_decoder(skip)
            pieces = [stream.push(t) for t in case["ids"]] + [stream.flush()]
            assert "".join(pieces) == tok.decode(case["ids"], skip)
            assert all("\ufffd" not in p for p in pieces)


def test_tokenizer_refusals(tok, tmp_path):
    with pytest.raises(ValueError, match="image token"):
        tok.prompt_ids("look: <image>", num_images=1)
    with pytest.raises(ValueError, match="part 0"):
        tok.chat_prompt([{"role": "user", "content": [{"type": "video"}]}])
    with pytest.raises(ValueError, match="out of range"):
        tok.decode([tok.vocab_size])
    d = _copy(tmp_path, "llava-gqa")
    (d / "chat_template.jinja").write_text("{% for m in messages %}{{ m['role'] }}{% endfor %}")
    with pytest.raises(ValueError, match="rendered 0 image tokens"):
        load_tokenizer(d).prompt_ids("hi", num_images=1)
    (d / "tokenizer.json").unlink()
    with pytest.raises(ValueError, match="tokenizer.json"):
        load_tokenizer(d)
    (tmp_path / "own").mkdir()
    (tmp_path / "own" / "config.json").write_text(tiny().to_json())       # valora's own model directory
    assert isinstance(load_tokenizer(tmp_path / "own"), ByteTokenizer) and not is_hf_checkpoint(tmp_path / "own")
    assert is_hf_checkpoint(FIXTURES / "llava-mha")


# bad model input ------------------------------------------------------------------------------
def _copy(tmp_path: Path, name: str) -> Path:
    dst = tmp_path / name
    shutil.copytree(FIXTURES / name, dst)
    return dst


def _edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    for key, value in changes.items():
        target = data
        *parents, leaf = key.split("__")
        for p in parents:
            target = target[p]
        target[leaf] = value
    path.write_text(json.dumps(data))


def _edit_tensors(path: Path, edit) -> None:
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)


@pytest.mark.parametrize("changes,message", [
    ({"model_type": "mllama"}, "model_type 'mllama'"),
    ({"architectures": ["LlavaNextForConditionalGeneration"]}, "LlavaNextForConditionalGeneration"),
    ({"text_config__model_type": "mistral"}, "text_config.model_type"),
    ({"vision_feature_select_strategy": "full"}, "vision_feature_select_strategy 'full'"),
    ({"vision_feature_layer": [-2, -1]}, "vision_feature_layer"),
    ({"text_config__attention_bias": True}, "attention_bias"),
    ({"text_config__mlp_bias": True}, "mlp_bias"),
    ({"text_config__rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}}, "rope type 'linear'"),
    ({"text_config__head_dim": 16}, "head_dim"),
    ({"vision_config__hidden_act": "gelu"}, "vision_config.hidden_act"),
    ({"projector_hidden_act": "relu"}, "projector_hidden_act"),
])
def test_unsupported_config_is_refused(tmp_path, changes, message):
    d = _copy(tmp_path, "llava-gqa")
    _edit_json(d / "config.json", **changes)
    with pytest.raises(ValueError, match=message):
        load_hf_model(d)


def test_unsupported_image_processing_is_refused(tmp_path):
    d = _copy(tmp_path, "llava-mha")
    _edit_json(d / "preprocessor_config.json", crop_size={"height": 12, "width": 12})
    with pytest.raises(ValueError, match="crop_size"):
        hf_config(d)
    _edit_json(d / "preprocessor_config.json", crop_size={"height": 16, "width": 16}, resample=2)
    with pytest.raises(ValueError, match="resample 2"):
        hf_config(d)


def _rename(tensors, old, new):
    tensors[new] = tensors.pop(old)


@pytest.mark.parametrize("name,edit,message", [
    ("llava-gqa", lambda t: t.update({"language_model.model.layers.0.self_attn.k_proj.weight": np.zeros((32, 32),
                                                                                                       np.float32)}),
     r"language_model.model.layers.0.self_attn.k_proj.weight' has shape \[32, 32\], expected \[16, 32\]"),
    ("llava-gqa", lambda t: t.pop("vision_tower.encoder.layers.2.mlp.fc1.bias"), "missing tensors.*fc1.bias"),
    ("llava-gqa", lambda t: t.update({"language_model.model.layers.2.mlp.up_proj.weight": np.zeros((64, 32),
                                                                                                  np.float32)}),
     "unexpected tensor 'language_model.model.layers.2.mlp.up_proj.weight'"),
    ("llava-gqa", lambda t: t.update({"image_newline": np.zeros((32,), np.float32)}),
     "unexpected tensor 'image_newline'"),
    ("llava-gqa", lambda t: t.pop("language_model.lm_head.weight"), r"missing tensors \['lm_head.weight'\]"),
])
def test_bad_tensors_are_refused(tmp_path, name, edit, message):
    d = _copy(tmp_path, name)
    _edit_tensors(d / "model.safetensors", edit)
    with pytest.raises(ValueError, match=message):
        load_hf_model(d)


def test_missing_shard_and_bin_only_checkpoints_are_refused(tmp_path):
    d = _copy(tmp_path, "llava-mha")
    (d / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ValueError, match="shard 'model-00002-of-00002.safetensors' is missing"):
        load_hf_model(d)
    for f in d.glob("model*"):
        f.unlink()
    (d / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="pytorch_model.bin"):
        load_hf_model(d)


def test_failed_import_leaves_nothing(tmp_path, monkeypatch):
    bad = _copy(tmp_path, "llava-mha")
    (bad / "model-00001-of-00002.safetensors").unlink()
    out = tmp_path / "out" / "model"
    with pytest.raises(ValueError, match="model-00001"):
        import_hf(bad, out)
    assert not out.exists()

    def broken_save(directory, model):
        (Path(directory) / "config.json").write_text("{}")
        raise OSError("disk full")

    monkeypatch.setattr("valora_jax.checkpoint.save_model", broken_save)
    with pytest.raises(OSError, match="disk full"):
        import_hf(FIXTURES / "llava-mha", out)
    assert not out.exists() and list(out.parent.iterdir()) == []
    out.mkdir()
    (out / "keep").write_text("x")
    with pytest.raises(ValueError, match="not an empty directory"):
        import_hf(FIXTURES / "llava-mha", out)


# bad adapter input ----------------------------------------------------------------------------
@pytest.mark.parametrize("changes,message", [
    ({"use_dora": True}, "use_dora=True"),
    ({"bias": "lora_only"}, "bias='lora_only'"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ({"lora_bias": True}, "lora_bias"),
    ({"peft_type": "IA3"}, "peft_type 'IA3'"),
    ({"base_model_name_or_path": "meta-llama/Llama-2-7b-hf"}, "base_model_name_or_path 'meta-llama/Llama-2-7b-hf'"),
    ({"target_modules": ["q_proj"]}, "v_proj'.*target_modules"),
    ({"target_modules": ["q_proj", "v_proj"], "layers_to_transform": [0]}, "layers.1.*layers_to_transform"),
    ({"rank_pattern": {"v_proj": 8}}, "rank 4.*rank_pattern say 8"),
])
def test_unsupported_peft_options_are_refused(tmp_path, changes, message):
    d = _copy(tmp_path, "llava-gqa-lora-qv")
    _edit_json(d / "adapter_config.json", **changes)
    with pytest.raises(ValueError, match=message):
        read_peft(d, hf_config(FIXTURES / "llava-gqa", lora=LORA))


P = "base_model.model.model.language_model.layers.0.self_attn.q_proj"


@pytest.mark.parametrize("edit,message", [
    (lambda t: t.update({"base_model.model.lm_head.lora_A.weight": np.zeros((4, 32), np.float32),
                         "base_model.model.lm_head.lora_B.weight": np.zeros((320, 4), np.float32)}),
     "module 'lm_head'.*not a LoRA target"),
    (lambda t: t.update({"base_model.model.model.language_model.embed_tokens.lora_embedding_A":
                         np.zeros((4, 320), np.float32)}), "lora_embedding_A' is not a LoRA A/B weight"),
    (lambda t: t.update({f"{P}.lora_A.weight": np.zeros((4, 16), np.float32)}),
     r"lora_A \[4, 16\] / lora_B \[32, 4\], expected \[r, 32\] / \[32, r\]"),
    (lambda t: t.pop(f"{P}.lora_B.weight"), "has lora_A but not lora_B"),
    (lambda t: _rename(t, f"{P}.lora_A.weight", P.replace("layers.0", "layers.7") + ".lora_A.weight"),
     "does not exist in 'llava-gqa'"),
])
def test_bad_adapter_tensors_are_refused(tmp_path, edit, message):
    d = _copy(tmp_path, "llava-gqa-lora-qv")
    _edit_json(d / "adapter_config.json", target_modules=r".*")
    _edit_tensors(d / "adapter_model.safetensors", edit)
    with pytest.raises(ValueError, match=message):
        read_peft(d, hf_config(FIXTURES / "llava-gqa", lora=LORA))


def test_adapter_needing_targets_the_model_lacks_is_refused(tmp_path):
    decoder_only = hf_config(FIXTURES / "llava-gqa")          # default LoraConfig: decoder targets
    with pytest.raises(ValueError, match="'vision.q_proj'.*--lora-targets"):
        read_peft(FIXTURES / "llava-gqa-lora-qv", decoder_only)
    assert "vision_tower.layers.0.q_proj" in module_shapes_for(decoder_only, all_targets=True)
    with pytest.raises(ValueError, match="max_rank=2"):
        read_peft(FIXTURES / "llava-gqa-lora-qv", hf_config(FIXTURES / "llava-gqa",
                                                            lora=LoraConfig(max_rank=2, targets=ALL_TARGETS)))
    other = _copy(tmp_path, "llava-gqa-lora-qv")
    _edit_json(other / "adapter_config.json", base_model_name_or_path=str(FIXTURES / "llava-mha"))
    with pytest.raises(ValueError, match="other shapes"):
        read_peft(other, hf_config(FIXTURES / "llava-gqa", lora=LORA))
    (other / "adapter_model.safetensors").unlink()
    with pytest.raises(ValueError, match="no adapter_model.safetensors"):
        read_peft(other, hf_config(FIXTURES / "llava-gqa", lora=LORA), check_base=False)
    out = tmp_path / "adapter-out"
    with pytest.raises(ValueError):
        import_peft(other, out, hf_config(FIXTURES / "llava-gqa", lora=LORA), check_base=False)
    assert not out.exists() and not list(tmp_path.glob(".adapter-out*"))


# CLI ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """`valora import-hf` of llava-gqa (all LoRA targets) and `valora import-peft` of lora-qv."""
    root = tmp_path_factory.mktemp("cli")
    main(["import-hf", str(FIXTURES / "llava-gqa"), str(root / "model"), "--lora-targets", "all",
          "--max-loras", "2", "--max-rank", "8"])
    main(["import-peft", str(FIXTURES / "llava-gqa-lora-qv"), str(root / "qv"), "--model", str(root / "model")])
    return root


def test_imported_model_equals_the_direct_load(imported):
    model = load_model(imported / "model")
    direct = load_hf_model(FIXTURES / "llava-gqa", lora=model.config.lora)
    assert model.config == direct.config
    for a, b in zip(jax.tree.leaves(nnx.state(model, nnx.Param)), jax.tree.leaves(nnx.state(direct, nnx.Param))):
        np.testing.assert_array_equal(a, b)
    assert json.loads((imported / "model" / "hf_config.json").read_text())["model_type"] == "llava"
    tok = load_tokenizer(imported / "model")
    assert isinstance(tok, HFTokenizer) and tok.image_id == CASES["image_id"]
    assert not is_hf_checkpoint(imported / "model")


def test_generate_with_imported_model_and_adapter(imported, capsys):
    from PIL import Image
    Image.fromarray(np.full((20, 28, 3), 120, np.uint8)).save(imported / "img.png")
    main(["generate", "--model", str(imported / "model"), "--adapter", f"qv={imported / 'qv'}",
          "--image", str(imported / "img.png"), "--prompt", "What is shown?", "--max-tokens", "4"])
    captured = capsys.readouterr()
    assert "llava-gqa" in captured.err and "adapter: qv" in captured.err
    assert "4 generated" in captured.err or "finish: stop" in captured.err
    main(["generate", "--model", str(FIXTURES / "llava-mha"), "--prompt", "Hello", "--max-tokens", "2"])
    assert "not converted" in capsys.readouterr().err


def test_cli_import_errors_exit_with_a_message(imported, tmp_path):
    with pytest.raises(SystemExit, match="vision.q_proj"):
        main(["import-peft", str(FIXTURES / "llava-gqa-lora-qv"), str(tmp_path / "a"),
              "--model", str(FIXTURES / "llava-gqa")])
    with pytest.raises(SystemExit, match="base_model_name_or_path"):
        main(["import-peft", str(FIXTURES / "llava-mha-lora-layers"), str(tmp_path / "b"),
              "--model", str(imported / "model")])
    with pytest.raises(SystemExit, match="unknown LoRA target"):
        main(["import-hf", str(FIXTURES / "llava-gqa"), str(tmp_path / "c"), "--lora-targets", "lm_head"])
    with pytest.raises(SystemExit, match="not an empty directory"):
        main(["import-hf", str(FIXTURES / "llava-gqa"), str(imported / "model")])
    assert not any((tmp_path / n).exists() for n in "abc")
