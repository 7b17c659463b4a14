"""Hugging Face Qwen2.5-VL / Qwen2-VL checkpoints (Qwen2_5_VLForConditionalGeneration,
Qwen2VLForConditionalGeneration): their config and tensor layout, for `hf_model`.

config.json holds the decoder's settings at its top level (older files) or under text_config,
the tower's under vision_config, M-RoPE's sections under rope_scaling / rope_parameters.
Tensor keys come in two layouts, mapped to canonical names:

    model.layers.* / model.embed_tokens / model.norm   visual.*         lm_head.*   (released checkpoints)
    model.language_model.*                             model.visual.*   lm_head.*   (recent transformers)

The tower's 3-D patch convolution [D, 3, T, p, p] becomes our [3*T*p*p, D] patch embedding
(values over channel, frame, pixel row, pixel column: the processor's patch order).
"""

import re
from pathlib import Path
from typing import Any

from valora_jax.config import LMMConfig, LoraConfig, QwenVisionConfig, TextConfig

ARCHITECTURES = {"qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration", "qwen2_vl": "Qwen2VLForConditionalGeneration"}
PREFIXES = (("model.language_model.", "text."), ("model.visual.", "vision."), ("visual.", "vision."),
            ("model.", "text."), ("lm_head.", "lm_head."))
SKIPPED = re.compile(r"text\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")
"""Cached buffers some checkpoints carry: skipped on purpose."""

VISION_LINEARS = {"attn.qkv": "qkv", "attn.proj": "proj", "mlp.gate_proj": "gate_proj", "mlp.up_proj": "up_proj",
                  "mlp.down_proj": "down_proj", "mlp.fc1": "fc1", "mlp.fc2": "fc2"}

_TEXT_DEFAULTS = {"vocab_size": 152064, "hidden_size": 8192, "intermediate_size": 29568, "num_hidden_layers": 80,
                  "num_attention_heads": 64, "num_key_value_heads": 8, "hidden_act": "silu",
                  "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "rope_theta": 1e6,
                  "tie_word_embeddings": False, "use_sliding_window": False}
_VISION_DEFAULTS = {
    "qwen2_5_vl": {"depth": 32, "hidden_size": 3584, "hidden_act": "silu", "intermediate_size": 3420,
                   "num_heads": 16, "in_channels": 3, "patch_size": 14, "spatial_merge_size": 2,
                   "temporal_patch_size": 2, "tokens_per_second": 4, "window_size": 112, "out_hidden_size": 3584,
                   "fullatt_block_indexes": [7, 15, 23, 31]},
    "qwen2_vl": {"depth": 32, "embed_dim": 1280, "hidden_size": 3584, "hidden_act": "quick_gelu", "mlp_ratio": 4,
                 "num_heads": 16, "in_channels": 3, "patch_size": 14, "spatial_merge_size": 2,
                 "temporal_patch_size": 2},
}


def family_of(cfg: dict) -> str | None:
    """The Qwen-VL family of an HF config.json, or None for other model types."""
    return cfg.get("model_type") if cfg.get("model_type") in ARCHITECTURES else None


def _require(path: Path, option: str, value: Any, expected: Any) -> None:
    if value != expected:
        raise ValueError(f"{path}: {option} {value!r} is not supported; expected {expected!r}")


def read_config(cfg: dict, path: Path, processor: dict, *, name: str, lora: LoraConfig | None,
                dtype: str) -> tuple[LMMConfig, dict]:
    """(LMMConfig, settings: tie_word_embeddings) of a Qwen-VL config.json (and its
    preprocessor_config.json); ValueError naming any option this family cannot run."""
    family = family_of(cfg)
    archs = cfg.get("architectures") or [ARCHITECTURES[family]]
    if ARCHITECTURES[family] not in archs:
        raise ValueError(f"{path}: architectures {archs} is not supported; expected {ARCHITECTURES[family]!r}")
    if cfg.get("quantization_config"):
        raise ValueError(f"{path}: quantization_config is not supported (quantized checkpoint)")
    nested = cfg.get("text_config") or {}
    text = {**_TEXT_DEFAULTS, **{k: v for k, v in cfg.items() if k not in ("text_config", "vision_config")},
            **nested}
    vision = {**_VISION_DEFAULTS[family], **(cfg.get("vision_config") or {})}
    _require(path, "hidden_act", text["hidden_act"], "silu")
    _require(path, "use_sliding_window", bool(text["use_sliding_window"]), False)
    _require(path, "vision_config.in_channels", vision.get("in_chans", vision["in_channels"]), 3)
    _require(path, "vision_config.hidden_act", vision["hidden_act"], "silu" if family == "qwen2_5_vl" else "quick_gelu")
    rope = text.get("rope_parameters") or text.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("mrope", "default") or not rope.get("mrope_section"):
        raise ValueError(f"{path}: rope_scaling / rope_parameters {rope!r} is not supported; expected M-RoPE "
                         "sections (mrope_section)")
    pixels = {k: processor.get(k, (processor.get("size") or {}).get(s))
              for k, s in (("min_pixels", "shortest_edge"), ("max_pixels", "longest_edge"))}
    for option, expected in (("do_resize", True), ("do_rescale", True), ("do_normalize", True),
                             ("resample", 3)):
        if processor.get(option, expected) != expected:
            raise ValueError(f"{path.parent / 'preprocessor_config.json'}: {option} {processor[option]!r} is not "
                             f"supported; expected {expected!r}")
    d_vision = vision["hidden_size"] if family == "qwen2_5_vl" else vision["embed_dim"]
    try:
        vision_config = QwenVisionConfig(
            num_layers=vision["depth"], hidden_size=d_vision, num_heads=vision["num_heads"],
            mlp_size=vision["intermediate_size"] if family == "qwen2_5_vl" else d_vision * vision["mlp_ratio"],
            patch_size=vision["patch_size"], temporal_patch_size=vision["temporal_patch_size"],
            spatial_merge_size=vision["spatial_merge_size"],
            window_size=vision["window_size"] if family == "qwen2_5_vl" else 0,
            full_attention_layers=tuple(vision["fullatt_block_indexes"]) if family == "qwen2_5_vl" else (),
            gated_mlp=family == "qwen2_5_vl",
            min_pixels=int(pixels["min_pixels"] or QwenVisionConfig.min_pixels),
            max_pixels=int(pixels["max_pixels"] or QwenVisionConfig.max_pixels),
            image_mean=tuple(float(v) for v in processor.get("image_mean", QwenVisionConfig.image_mean)),
            image_std=tuple(float(v) for v in processor.get("image_std", QwenVisionConfig.image_std)),
            tokens_per_second=int(vision.get("tokens_per_second", 2)))
        text_config = TextConfig(
            vocab_size=text["vocab_size"], hidden_size=text["hidden_size"], num_layers=text["num_hidden_layers"],
            num_heads=text["num_attention_heads"], num_kv_heads=text["num_key_value_heads"],
            mlp_size=text["intermediate_size"], max_position=text["max_position_embeddings"],
            rope_theta=float(rope.get("rope_theta", text["rope_theta"])), rms_norm_eps=float(text["rms_norm_eps"]),
            qkv_bias=True, mrope_section=tuple(rope["mrope_section"]),
            tie_word_embeddings=bool(text["tie_word_embeddings"] or cfg.get("tie_word_embeddings")))
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from e
    out = vision.get("out_hidden_size", vision["hidden_size"])
    if out != text_config.hidden_size:
        raise ValueError(f"{path}: the vision tower's output width {out} differs from the decoder's hidden size "
                         f"{text_config.hidden_size}")
    config = LMMConfig(name=name, family=family, vision=vision_config, text=text_config, lora=lora or LoraConfig(),
                       dtype=dtype)
    return config, {"tie_word_embeddings": text_config.tie_word_embeddings}


def vision_module_path(canon: str) -> str | None:
    """Our module path of a canonical Qwen-VL tower linear (vision.blocks.0.attn.qkv ->
    visual.blocks.0.qkv), else None."""
    m = re.fullmatch(r"vision\.blocks\.(\d+)\.(.+)", canon)
    if m and m.group(2) in VISION_LINEARS:
        return f"visual.blocks.{m.group(1)}.{VISION_LINEARS[m.group(2)]}"
    return None


def vision_plan(config: LMMConfig) -> dict[str, tuple[str, str]]:
    """canonical HF tensor name -> (our parameter path, transform: "copy" | "T" | "patch3d") of
    the tower's tensors (the decoder's are hf_model's)."""
    vision = config.vision
    norm = ("weight",) if vision.gated_mlp else ("weight", "bias")
    ours_norm = {"weight": "weight"} if vision.gated_mlp else {"weight": "scale", "bias": "bias"}
    out = {"vision.patch_embed.proj.weight": ("visual.patch_embedding", "patch3d")}
    mlp = ("gate_proj", "up_proj", "down_proj") if vision.gated_mlp else ("fc1", "fc2")
    for i in range(vision.num_layers):
        for n in ("norm1", "norm2"):
            for v in norm:
                out[f"vision.blocks.{i}.{n}.{v}"] = (f"visual.blocks.{i}.{n}.{ours_norm[v]}", "copy")
        for hf in ("attn.qkv", "attn.proj", *(f"mlp.{m}" for m in mlp)):
            ours = VISION_LINEARS[hf]
            out[f"vision.blocks.{i}.{hf}.weight"] = (f"visual.blocks.{i}.{ours}.kernel", "T")
            out[f"vision.blocks.{i}.{hf}.bias"] = (f"visual.blocks.{i}.{ours}.bias", "copy")
    for v in norm:
        out[f"vision.merger.ln_q.{v}"] = (f"visual.merger.ln_q.{ours_norm[v]}", "copy")
    for hf, ours in (("mlp.0", "linear_1"), ("mlp.2", "linear_2")):
        out[f"vision.merger.{hf}.weight"] = (f"visual.merger.{ours}.kernel", "T")
        out[f"vision.merger.{hf}.bias"] = (f"visual.merger.{ours}.bias", "copy")
    return out
