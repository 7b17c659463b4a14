"""Hugging Face LLaVA checkpoints (LlavaForConditionalGeneration), and through `hf_qwen` the
Qwen-VL family's (Qwen2_5_VLForConditionalGeneration, Qwen2VLForConditionalGeneration), as
valora_jax models. The rest of this docstring is LLaVA's layout; `hf_qwen` describes Qwen-VL's.

A checkpoint directory holds config.json (model_type "llava" with text_config / vision_config),
safetensors weights (model.safetensors, or shards listed in model.safetensors.index.json),
and the tokenizer / image-processor files. Three key layouts are read:

    language_model.model.* / language_model.lm_head.*   vision_tower.vision_model.*   (transformers 4.x)
    model.language_model.* / lm_head.*                  model.vision_tower.*          (transformers 5 in memory)
    language_model.model.* / language_model.lm_head.*   vision_tower.*                (transformers 5 on disk)

plus multi_modal_projector.* / model.multi_modal_projector.*. Every tensor is mapped with a
shape check (HF linears store [D_out, D_in]; ours are [D_in, D_out]; the CLIP patch
convolution [D, 3, p, p] becomes [p*p*3, D] in (row, col, channel) order). Weights stream
shard by shard and are converted one tensor at a time, so the model is held once.
"""

import json
import re
import shutil
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from valora_jax import hf_qwen
from valora_jax.config import LMMConfig, LoraConfig, TextConfig, VisionConfig
from valora_jax.image import CLIP_MEAN, CLIP_STD
from valora_jax.lora import fuse_parameters, fused_layout
from valora_jax.model import LMM, split_model

ARCHITECTURE = "LlavaForConditionalGeneration"
HF_CONFIG = "hf_config.json"
"""Name under which an imported model keeps the checkpoint's original config.json."""
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "tokenizer.model", "chat_template.jinja", "chat_template.json", "generation_config.json",
                   "preprocessor_config.json", "processor_config.json")
"""Files an import copies beside the converted weights (those present)."""

# Defaults of the HF config classes: older config.json files store only non-default values.
_LLAMA_DEFAULTS = {"model_type": "llama", "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008,
                   "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": None,
                   "hidden_act": "silu", "max_position_embeddings": 2048, "rms_norm_eps": 1e-6,
                   "rope_theta": 10000.0, "rope_scaling": None, "attention_bias": False, "mlp_bias": False,
                   "tie_word_embeddings": False, "head_dim": None}
_CLIP_DEFAULTS = {"model_type": "clip_vision_model", "hidden_size": 768, "intermediate_size": 3072,
                  "num_hidden_layers": 12, "num_attention_heads": 12, "num_channels": 3, "image_size": 224,
                  "patch_size": 32, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5}
_LLAVA_VISION_DEFAULTS = {**_CLIP_DEFAULTS, "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
                          "num_attention_heads": 16, "image_size": 336, "patch_size": 14}
_LLAVA_DEFAULTS = {"image_token_index": 32000, "vision_feature_layer": -2, "vision_feature_select_strategy": "default",
                   "projector_hidden_act": "gelu", "multimodal_projector_bias": True, "tie_word_embeddings": False}

_PREFIXES = (("model.language_model.", "text."), ("language_model.model.", "text."),
             ("language_model.lm_head.", "lm_head."), ("lm_head.", "lm_head."),
             ("model.vision_tower.vision_model.", "vision."), ("vision_tower.vision_model.", "vision."),
             ("model.vision_tower.", "vision."), ("vision_tower.", "vision."),
             ("model.multi_modal_projector.", "projector."), ("multi_modal_projector.", "projector."))
_SKIPPED = re.compile(r"vision\.post_layernorm\.(weight|bias)|vision\.embeddings\.position_ids"
                      r"|text\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")
"""Tensors LLaVA never reads (CLIP's final LayerNorm, cached buffers): skipped on purpose."""

_TEXT_LINEARS = {"self_attn.q_proj": "q_proj", "self_attn.k_proj": "k_proj", "self_attn.v_proj": "v_proj",
                 "self_attn.o_proj": "o_proj", "mlp.gate_proj": "gate_proj", "mlp.up_proj": "up_proj",
                 "mlp.down_proj": "down_proj"}
_VISION_LINEARS = {"self_attn.q_proj": "q_proj", "self_attn.k_proj": "k_proj", "self_attn.v_proj": "v_proj",
                   "self_attn.out_proj": "out_proj", "mlp.fc1": "fc1", "mlp.fc2": "fc2"}


# config -------------------------------------------------------------------------------------
def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: cannot read JSON ({e})") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def is_hf_checkpoint(directory: str | Path) -> bool:
    """True for a Hugging Face model directory (config.json with model_type/architectures);
    False for valora's own model directories (config.json with "vision" and "text")."""
    path = Path(directory) / "config.json"
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(cfg, dict) and ("model_type" in cfg or "architectures" in cfg) and "vision" not in cfg


def _sub_configs(cfg: dict, path: Path) -> tuple[dict, dict, dict]:
    """(llava, text, vision) settings with the HF defaults filled in; refuses what we cannot run."""
    if cfg.get("model_type") != "llava":
        raise ValueError(f"{path}: model_type {cfg.get('model_type')!r} is not supported; expected 'llava' "
                         f"({ARCHITECTURE}), 'qwen2_5_vl' or 'qwen2_vl'")
    archs = cfg.get("architectures") or [ARCHITECTURE]
    if ARCHITECTURE not in archs:
        raise ValueError(f"{path}: architectures {archs} is not supported; expected {ARCHITECTURE!r}")
    llava = {**_LLAVA_DEFAULTS, **cfg}
    text = {**_LLAMA_DEFAULTS, **(cfg.get("text_config") or {})}
    vision_cfg = cfg.get("vision_config")
    vision = {**(_CLIP_DEFAULTS if vision_cfg is not None else _LLAVA_VISION_DEFAULTS), **(vision_cfg or {})}
    llava["tie_word_embeddings"] = bool(llava["tie_word_embeddings"] or text["tie_word_embeddings"])
    if cfg.get("quantization_config"):
        raise ValueError(f"{path}: quantization_config is not supported (quantized checkpoint)")
    _require(path, "text_config.model_type", text["model_type"], "llama")
    _require(path, "vision_config.model_type", vision["model_type"], "clip_vision_model")
    _require(path, "vision_feature_select_strategy", llava["vision_feature_select_strategy"], "default")
    _require(path, "projector_hidden_act", llava["projector_hidden_act"], "gelu")
    _require(path, "text_config.hidden_act", text["hidden_act"], "silu")
    _require(path, "vision_config.hidden_act", vision["hidden_act"], "quick_gelu")
    _require(path, "text_config.attention_bias", bool(text["attention_bias"]), False)
    _require(path, "text_config.mlp_bias", bool(text["mlp_bias"]), False)
    _require(path, "vision_config.num_channels", vision["num_channels"], 3)
    layer = llava["vision_feature_layer"]
    if isinstance(layer, bool) or not isinstance(layer, int):
        raise ValueError(f"{path}: vision_feature_layer {layer!r} is not supported; expected one int")
    rope = text.get("rope_parameters") or text.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise ValueError(f"{path}: text_config rope type {rope_type!r} (rope_scaling/rope_parameters) is not "
                         "supported; expected 'default'")
    text["rope_theta"] = rope.get("rope_theta", text["rope_theta"])
    heads = text["num_attention_heads"]
    if text["head_dim"] not in (None, text["hidden_size"] // heads):
        raise ValueError(f"{path}: text_config.head_dim {text['head_dim']} differs from hidden_size / "
                         f"num_attention_heads = {text['hidden_size'] // heads}; not supported")
    return llava, text, vision


def _require(path: Path, option: str, value: Any, expected: Any) -> None:
    if value != expected:
        raise ValueError(f"{path}: {option} {value!r} is not supported; expected {expected!r}")


def _image_settings(directory: Path, image_size: int) -> tuple[tuple, tuple]:
    """(mean, std) from preprocessor_config.json (or processor_config.json's image_processor),
    after checking that its resize / crop / rescale steps are the ones valora_jax applies."""
    path = directory / "preprocessor_config.json"
    if path.exists():
        proc = _read_json(path)
    elif (directory / "processor_config.json").exists():
        path = directory / "processor_config.json"
        proc = _read_json(path).get("image_processor") or {}
    else:
        return CLIP_MEAN, CLIP_STD
    size, crop = proc.get("size", image_size), proc.get("crop_size", image_size)
    short = size.get("shortest_edge") if isinstance(size, dict) else size
    crop_hw = (crop.get("height"), crop.get("width")) if isinstance(crop, dict) else (crop, crop)
    if not proc.get("do_center_crop", True) or short != image_size or crop_hw != (image_size, image_size):
        raise ValueError(f"{path}: size {size!r} / crop_size {crop!r} / do_center_crop "
                         f"{proc.get('do_center_crop', True)!r} is not supported; expected a resize of the short side "
                         f"to {image_size} and a {image_size}x{image_size} centre crop")
    for option, expected in (("do_resize", True), ("do_rescale", True), ("do_normalize", True), ("resample", 3),
                             ("do_pad", False)):
        if proc.get(option, expected) != expected:
            raise ValueError(f"{path}: {option} {proc[option]!r} is not supported; expected {expected!r}")
    if abs(float(proc.get("rescale_factor", 1 / 255)) - 1 / 255) > 1e-9:
        raise ValueError(f"{path}: rescale_factor {proc['rescale_factor']!r} is not supported; expected 1/255")
    mean, std = proc.get("image_mean", CLIP_MEAN), proc.get("image_std", CLIP_STD)
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(f"{path}: image_mean {mean!r} / image_std {std!r} must have 3 values")
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)


def _hf_dtype(cfg: dict, text: dict) -> str:
    name = cfg.get("dtype") or cfg.get("torch_dtype") or text.get("dtype") or text.get("torch_dtype") or "float32"
    return "float32" if name == "float32" else "bfloat16"


def hf_config(directory: str | Path, *, lora: LoraConfig | None = None, dtype: str | None = None,
              name: str | None = None) -> LMMConfig:
    """The LMMConfig of a Hugging Face LLaVA directory.

    name: the model identifier (default: config.json's _name_or_path, else the directory name);
    dtype: "float32" | "bfloat16" (default: float32 checkpoints stay float32, others bfloat16);
    lora: the adapter pool to build (default LoraConfig(): decoder targets).
    Raises ValueError naming the option for anything this model family cannot run."""
    return _read_hf(Path(directory), lora, dtype, name)[0]


def _read_hf(directory: Path, lora, dtype, name) -> tuple[LMMConfig, dict]:
    """(LMMConfig, model-level settings with defaults: tie_word_embeddings, LLaVA's
    multimodal_projector_bias, ...) of an HF directory."""
    path = directory / "config.json"
    cfg = _read_json(path)
    if dtype not in (None, "float32", "bfloat16"):
        raise ValueError(f"dtype {dtype!r} is not supported; expected 'float32' or 'bfloat16'")
    name = name or cfg.get("_name_or_path") or directory.resolve().name
    if hf_qwen.family_of(cfg):
        text = cfg.get("text_config") or cfg
        processor = (_read_json(directory / "preprocessor_config.json")
                     if (directory / "preprocessor_config.json").exists() else {})
        return hf_qwen.read_config(cfg, path, processor, name=name, lora=lora, dtype=dtype or _hf_dtype(cfg, text))
    llava, text, vision = _sub_configs(cfg, path)
    mean, std = _image_settings(directory, vision["image_size"])
    try:
        vision_config = VisionConfig(
            image_size=vision["image_size"], patch_size=vision["patch_size"], hidden_size=vision["hidden_size"],
            num_layers=vision["num_hidden_layers"], num_heads=vision["num_attention_heads"],
            mlp_size=vision["intermediate_size"], feature_layer=llava["vision_feature_layer"],
            layer_norm_eps=float(vision["layer_norm_eps"]), image_mean=mean, image_std=std)
        text_config = TextConfig(
            vocab_size=text["vocab_size"], hidden_size=text["hidden_size"], num_layers=text["num_hidden_layers"],
            num_heads=text["num_attention_heads"],
            num_kv_heads=text["num_key_value_heads"] or text["num_attention_heads"],
            mlp_size=text["intermediate_size"], max_position=text["max_position_embeddings"],
            rope_theta=float(text["rope_theta"]), rms_norm_eps=float(text["rms_norm_eps"]))
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from e
    config = LMMConfig(name=name, vision=vision_config, text=text_config, lora=lora or LoraConfig(),
                       dtype=dtype or _hf_dtype(cfg, text))
    return config, llava


# weights ------------------------------------------------------------------------------------
def canonical_name(key: str, family: str = "llava") -> str | None:
    """An HF tensor or module name of the family in any key layout as text.* / vision.* /
    projector.* (LLaVA) / lm_head.*, or None when it belongs to none of them."""
    for prefix, canon in (_PREFIXES if family == "llava" else hf_qwen.PREFIXES):
        if key.startswith(prefix):
            return canon + key[len(prefix):]
    return None


def module_path(hf_module: str, family: str = "llava") -> str | None:
    """Our module path of an HF linear: model.language_model.layers.3.self_attn.q_proj ->
    decoder.layers.3.q_proj; vision_tower.vision_model.encoder.layers.0.mlp.fc1 ->
    vision_tower.layers.0.fc1; multi_modal_projector.linear_1 -> projector.linear_1 (Qwen-VL:
    hf_qwen.module_path). None for modules that are not such linears (embeddings, lm_head, norms, ...)."""
    canon = canonical_name(hf_module, family)
    if canon is None:
        return None
    m = re.fullmatch(r"text\.layers\.(\d+)\.(.+)", canon)
    if m and m.group(2) in _TEXT_LINEARS:
        return f"decoder.layers.{m.group(1)}.{_TEXT_LINEARS[m.group(2)]}"
    if family != "llava":
        return hf_qwen.vision_module_path(canon)
    m = re.fullmatch(r"vision\.encoder\.layers\.(\d+)\.(.+)", canon)
    if m and m.group(2) in _VISION_LINEARS:
        return f"vision_tower.layers.{m.group(1)}.{_VISION_LINEARS[m.group(2)]}"
    if canon in ("projector.linear_1", "projector.linear_2"):
        return canon
    return None


def _decoder_plan(config: LMMConfig, tied: bool) -> dict[str, tuple[str, str]]:
    """canonical HF tensor name -> (our parameter path, transform: "copy" | "T") of the decoder's
    tensors (both families name them alike)."""
    plan = {"text.embed_tokens.weight": ("decoder.embed_tokens", "copy"),
            "text.norm.weight": ("decoder.norm.weight", "copy")}
    if not tied:
        plan["lm_head.weight"] = ("decoder.lm_head", "T")
    for i in range(config.text.num_layers):
        for norm in ("input_layernorm", "post_attention_layernorm"):
            plan[f"text.layers.{i}.{norm}.weight"] = (f"decoder.layers.{i}.{norm}.weight", "copy")
        for hf, ours in _TEXT_LINEARS.items():
            plan[f"text.layers.{i}.{hf}.weight"] = (f"decoder.layers.{i}.{ours}.kernel", "T")
            if config.text.qkv_bias and ours in ("q_proj", "k_proj", "v_proj"):
                plan[f"text.layers.{i}.{hf}.bias"] = (f"decoder.layers.{i}.{ours}.bias", "copy")
    return plan


def _llava_vision_plan(config: LMMConfig, projector_bias: bool) -> dict[str, tuple[str, str]]:
    """canonical HF tensor name -> (our parameter path, transform): "copy" | "T" | "patch" of
    LLaVA's vision tower and projector."""
    plan = {"vision.embeddings.patch_embedding.weight": ("vision_tower.patch_embedding", "patch"),
            "vision.embeddings.class_embedding": ("vision_tower.class_embedding", "copy"),
            "vision.embeddings.position_embedding.weight": ("vision_tower.position_embedding", "copy"),
            "vision.pre_layrnorm.weight": ("vision_tower.pre_layernorm.scale", "copy"),
            "vision.pre_layrnorm.bias": ("vision_tower.pre_layernorm.bias", "copy")}
    for i in range(config.vision.num_layers):
        for norm in ("layer_norm1", "layer_norm2"):
            plan[f"vision.encoder.layers.{i}.{norm}.weight"] = (f"vision_tower.layers.{i}.{norm}.scale", "copy")
            plan[f"vision.encoder.layers.{i}.{norm}.bias"] = (f"vision_tower.layers.{i}.{norm}.bias", "copy")
        for hf, ours in _VISION_LINEARS.items():
            plan[f"vision.encoder.layers.{i}.{hf}.weight"] = (f"vision_tower.layers.{i}.{ours}.kernel", "T")
            plan[f"vision.encoder.layers.{i}.{hf}.bias"] = (f"vision_tower.layers.{i}.{ours}.bias", "copy")
    for lin in ("linear_1", "linear_2"):
        plan[f"projector.{lin}.weight"] = (f"projector.{lin}.kernel", "T")
        if projector_bias:
            plan[f"projector.{lin}.bias"] = (f"projector.{lin}.bias", "copy")
    return plan


def _hf_shape(shape: tuple[int, ...], transform: str, config: LMMConfig) -> tuple[int, ...]:
    """The HF tensor shape that becomes our `shape` under `transform`."""
    p = config.vision.patch_size
    if transform == "T":
        return shape[::-1]
    if transform == "patch":
        return (shape[1], 3, p, p)
    if transform == "patch3d":
        return (shape[1], 3, config.vision.temporal_patch_size, p, p)
    return shape


def _convert(x: jax.Array, transform: str, dtype) -> jax.Array:
    if transform == "T":
        x = x.T
    elif transform == "patch":                       # [D, 3, p, p] -> [p, p, 3, D] -> [p*p*3, D]
        x = x.transpose(2, 3, 1, 0).reshape(-1, x.shape[0])
    elif transform == "patch3d":                     # [D, 3, T, p, p] -> [3*T*p*p, D]
        x = x.reshape(x.shape[0], -1).T
    return jnp.asarray(x, dtype)


def _weight_files(directory: Path) -> dict[str, str]:
    """tensor key -> safetensors file name, checking that every file exists."""
    index_path = directory / "model.safetensors.index.json"
    if index_path.exists():
        weight_map = _read_json(index_path).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index_path}: no weight_map")
        for shard in sorted(set(weight_map.values())):
            if not (directory / shard).is_file():
                raise ValueError(f"{index_path}: shard {shard!r} is missing from {directory}")
        return weight_map
    single = directory / "model.safetensors"
    if not single.is_file():
        other = sorted(p.name for p in directory.glob("*.bin")) or "none"
        raise ValueError(f"{directory}: no model.safetensors or model.safetensors.index.json (found .bin files: "
                         f"{other}); only safetensors checkpoints are read")
    try:
        with _safetensors_open()(single, framework="flax") as f:
            return {k: single.name for k in f.keys()}
    except Exception as e:   # safetensors raises its own error types for corrupt headers
        raise ValueError(f"{single}: not a readable safetensors file ({e})") from e


def _load_params(directory: Path, config: LMMConfig, settings: dict, expected: dict,
                 layout: dict[str, tuple[str, int, int]]) -> dict[str, jax.Array]:
    """Our flat parameter path -> array, read shard by shard with shape checks against
    `expected` (flat path -> abstract leaf); HF's separate q/k/v (and gate/up) are fused as
    `layout` (lora.fused_layout) says."""
    safe_open = _safetensors_open()
    shapes = {path: leaf.shape for path, leaf in expected.items()}
    shapes |= {path: (*shapes[fused][:-1], width) for path, (fused, _, width) in layout.items()}
    tied = bool(settings["tie_word_embeddings"])
    if config.is_qwen:
        plan, skipped = _decoder_plan(config, tied) | hf_qwen.vision_plan(config), hf_qwen.SKIPPED
    else:
        plan = _decoder_plan(config, tied) | _llava_vision_plan(config, bool(settings["multimodal_projector_bias"]))
        skipped = _SKIPPED
    weight_map = _weight_files(directory)
    by_canon: dict[str, str] = {}
    for key in weight_map:
        canon = canonical_name(key, config.family)
        if canon in plan:
            if canon in by_canon:
                raise ValueError(f"{directory}: tensors {by_canon[canon]!r} and {key!r} both map to {canon!r}")
            by_canon[canon] = key
        elif canon is None or not (skipped.fullmatch(canon) or (canon == "lm_head.weight" and tied)):
            raise ValueError(f"{directory}: unexpected tensor {key!r} (file {weight_map[key]}) in a {config.family} "
                             f"checkpoint with {config.text.num_layers} decoder and {config.vision.num_layers} "
                             "vision layers")
    missing = sorted(set(plan) - set(by_canon))
    if missing:
        raise ValueError(f"{directory}: missing tensors {missing[:5]}{' ...' if len(missing) > 5 else ''} "
                         f"({len(missing)} in all)")
    dtype = jnp.dtype(config.dtype)
    params: dict[str, jax.Array] = {}
    for shard in sorted(set(weight_map[k] for k in by_canon.values())):
        wanted = {k: c for c, k in by_canon.items() if weight_map[k] == shard}
        try:
            with safe_open(directory / shard, framework="flax") as f:
                present = set(f.keys())
                for key, canon in wanted.items():
                    if key not in present:
                        raise ValueError(f"{directory / shard}: tensor {key!r} listed in the index is not in this file")
                    ours, transform = plan[canon]
                    want = _hf_shape(shapes[ours], transform, config)
                    got = tuple(f.get_slice(key).get_shape())
                    if got != want:
                        raise ValueError(f"{directory / shard}: tensor {key!r} has shape {list(got)}, expected "
                                         f"{list(want)} for this config")
                    params[ours] = _convert(f.get_tensor(key), transform, dtype)
        except ValueError:
            raise
        except Exception as e:
            raise ValueError(f"{directory / shard}: not a readable safetensors file ({e})") from e
    if not config.is_qwen:        # LLaVA keeps an untied head (a copy) and projector biases (zero if absent)
        if tied:
            params["decoder.lm_head"] = params["decoder.embed_tokens"].T
        for lin in ("linear_1", "linear_2"):
            params.setdefault(f"projector.{lin}.bias", jnp.zeros(expected[f"projector.{lin}.bias"].shape, dtype))
    params = fuse_parameters(params, layout)
    assert set(params) == set(expected), sorted(set(params) ^ set(expected))
    return params


def _safetensors_open():
    try:
        from safetensors import safe_open
    except ImportError as e:
        raise ImportError("reading Hugging Face checkpoints needs safetensors: pip install 'valora-jax[hf]'") from e
    return safe_open


def flatten_tree(tree, prefix: str = ""):
    """(dotted path, leaf) pairs of a nested mapping."""
    for k, v in tree.items():
        if hasattr(v, "items"):
            yield from flatten_tree(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def fill_tree(tree, values: dict[str, Any], prefix: str = "") -> dict:
    """A copy of nested `tree` (as nested dicts) with each leaf replaced by values[dotted path]."""
    return {k: fill_tree(v, values, f"{prefix}{k}.") if hasattr(v, "items") else values[f"{prefix}{k}"]
            for k, v in tree.items()}


def load_hf_model(directory: str | Path, *, lora: LoraConfig | None = None, dtype: str | None = None,
                  name: str | None = None) -> LMM:
    """An LMM with the weights of a Hugging Face LLaVA directory (no conversion step); LoRA
    slots start empty. Options as in `hf_config`."""
    config, settings = _read_hf(Path(directory), lora, dtype, name)
    abstract = nnx.eval_shape(lambda: LMM(config, rngs=nnx.Rngs(0)))
    graphdef, abs_params, abs_lora, abs_merged = split_model(abstract)
    tree = nnx.to_pure_dict(abs_params)
    params = _load_params(Path(directory), config, settings, dict(flatten_tree(tree)), fused_layout(abstract))
    nnx.replace_by_pure_dict(abs_params, fill_tree(tree, params))
    zeros = lambda s: jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), s)
    return nnx.merge(graphdef, abs_params, zeros(abs_lora), zeros(abs_merged))


def import_hf(src: str | Path, out: str | Path, *, lora: LoraConfig | None = None, dtype: str | None = None,
              name: str | None = None) -> LMMConfig:
    """Convert a Hugging Face LLaVA directory into a valora model directory `out`: the Orbax
    checkpoint (save_model), the tokenizer / processor files, and the original config.json as
    hf_config.json. Written to a temporary directory beside `out` and renamed at the end, so a
    failure leaves nothing at `out`. `out` must not exist or be an empty directory."""
    from valora_jax.checkpoint import atomic_directory, save_model

    src, out = Path(src), Path(out).absolute()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"output {out} already exists and is not an empty directory")
    model = load_hf_model(src, lora=lora, dtype=dtype, name=name)
    with atomic_directory(out) as tmp:
        save_model(tmp, model)
        shutil.copyfile(src / "config.json", tmp / HF_CONFIG)
        for f in TOKENIZER_FILES:
            if (src / f).is_file():
                shutil.copyfile(src / f, tmp / f)
    return model.config


def hf_metadata(directory: str | Path) -> dict | None:
    """The original HF config.json of an HF or HF-imported model directory, else None."""
    directory = Path(directory)
    if (directory / HF_CONFIG).is_file():
        return _read_json(directory / HF_CONFIG)
    if is_hf_checkpoint(directory):
        return _read_json(directory / "config.json")
    return None

