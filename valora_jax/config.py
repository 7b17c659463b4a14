"""Frozen configuration dataclasses and named presets.

Each component gets only the config it needs: the vision tower a `VisionConfig`, the
decoder a `TextConfig`, the adapter machinery a `LoraConfig`; `LMMConfig` ties them
together. Presets: `tiny()` (the embedded default, fast on CPU), `llava_1_5_7b()` and
`llava_1_5_13b()` (real shapes, for GPU benchmarks with random weights).
"""

import dataclasses
import hashlib
import json
from typing import Any

DECODER_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
VISION_TARGETS = ("vision.q_proj", "vision.k_proj", "vision.v_proj", "vision.out_proj",
                  "vision.fc1", "vision.fc2")
PROJECTOR_TARGETS = ("projector.linear_1", "projector.linear_2")
ALL_TARGETS = DECODER_TARGETS + VISION_TARGETS + PROJECTOR_TARGETS


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """A CLIP-style ViT (pre-LayerNorm, class token, learned positions, quick-GELU)."""

    image_size: int = 64
    """Side of the square input image in pixels."""
    patch_size: int = 8
    """Side of a square patch; image_size must be a multiple of it."""
    hidden_size: int = 128
    """Width of the ViT residual stream."""
    num_layers: int = 2
    """Number of encoder layers."""
    num_heads: int = 4
    """Attention heads."""
    mlp_size: int = 512
    """Hidden width of each layer's MLP."""
    feature_layer: int = -1
    """Which hidden state feeds the projector (HF `vision_feature_layer`: 0 is the
    embeddings after pre-LayerNorm, -1 the last layer's output, -2 the one before)."""
    layer_norm_eps: float = 1e-5
    """LayerNorm epsilon."""
    image_mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    """Per-channel mean used to normalise pixels."""
    image_std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
    """Per-channel standard deviation used to normalise pixels."""

    def __post_init__(self):
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if not -self.num_layers - 1 <= self.feature_layer <= self.num_layers:
            raise ValueError(f"feature_layer {self.feature_layer} outside the {self.num_layers}-layer tower")

    @property
    def num_patches(self) -> int:
        """Patch tokens per image (the class token excluded)."""
        return (self.image_size // self.patch_size) ** 2

    @property
    def layers_used(self) -> int:
        """Encoder layers that must run to produce the selected hidden state."""
        return self.feature_layer % (self.num_layers + 1)


@dataclasses.dataclass(frozen=True)
class TextConfig:
    """A Llama-style decoder (RMSNorm, RoPE, grouped-query attention, SwiGLU)."""

    vocab_size: int = 272
    """Rows of the embedding table and of the LM head (>= the tokenizer's vocabulary)."""
    hidden_size: int = 256
    """Width of the residual stream (D)."""
    num_layers: int = 4
    """Number of decoder layers."""
    num_heads: int = 4
    """Query heads (H)."""
    num_kv_heads: int = 2
    """Key/value heads; num_heads must be a multiple (grouped-query attention)."""
    mlp_size: int = 512
    """Hidden width of the SwiGLU MLP."""
    max_position: int = 2048
    """Longest context (prompt + generated tokens) the model accepts."""
    rope_theta: float = 10000.0
    """RoPE base frequency."""
    rms_norm_eps: float = 1e-5
    """RMSNorm epsilon."""

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """The adapter pool every targeted linear carries."""

    max_loras: int = 4
    """Device slots per targeted weight (S)."""
    max_rank: int = 64
    """Padded rank of every slot (R); adapters of rank <= max_rank fit."""
    targets: tuple[str, ...] = DECODER_TARGETS
    """Modules that carry slots: names from `ALL_TARGETS`."""
    mergeable: bool = True
    """Keep a merged copy of each targeted weight so merged and mixture modes exist.
    Costs one extra copy of every targeted weight; the base weights are never written,
    so unmerging is exact by construction."""

    @property
    def slot_rank(self) -> int:
        """R of the slot buffers: max_rank rounded up to a power of two >= 16, the widths the ATMM
        kernel reads without re-padding the pool on every call (ranks beyond an adapter's own
        are never read)."""
        return max(16, 1 << (self.max_rank - 1).bit_length())

    def __post_init__(self):
        unknown = sorted(set(self.targets) - set(ALL_TARGETS))
        if unknown:
            raise ValueError(f"unknown LoRA target modules {unknown}; known: {list(ALL_TARGETS)}")
        if self.max_loras < 1:
            raise ValueError(f"max_loras must be >= 1, got {self.max_loras}")
        if self.max_rank < 1:
            raise ValueError(f"max_rank must be >= 1, got {self.max_rank}")


@dataclasses.dataclass(frozen=True)
class LMMConfig:
    """A LLaVA-style model: vision tower -> 2-layer GELU projector -> decoder."""

    name: str
    """Model identifier; adapters record it and are checked against it on load."""
    vision: VisionConfig
    text: TextConfig
    lora: LoraConfig = LoraConfig()
    dtype: str = "float32"
    """Parameter and activation dtype ("float32" or "bfloat16")."""
    page_size: int = 16
    """Tokens per KV-cache page."""

    @property
    def tokens_per_image(self) -> int:
        return self.vision.num_patches

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LMMConfig":
        d = dict(d)
        vision = VisionConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.pop("vision").items()})
        text = TextConfig(**d.pop("text"))
        lora_d = d.pop("lora")
        lora = LoraConfig(**{**lora_d, "targets": tuple(lora_d["targets"])})
        return cls(vision=vision, text=text, lora=lora, **d)

    @property
    def base_id(self) -> str:
        """Identity of the base architecture (name + shapes, not the LoRA pool):
        adapters trained for one base model are refused by another."""
        shapes = json.dumps([dataclasses.asdict(self.vision), dataclasses.asdict(self.text)], sort_keys=True)
        return f"{self.name}@{hashlib.sha256(shapes.encode()).hexdigest()[:12]}"


def tiny(**lora_overrides) -> LMMConfig:
    """The embedded default: ~3 M parameters, byte vocabulary, 64x64 images (64 patches)."""
    return LMMConfig(
        name="valora-tiny",
        vision=VisionConfig(),
        text=TextConfig(),
        lora=LoraConfig(**{"max_loras": 4, "max_rank": 32, **lora_overrides}),
    )


def llava_1_5_7b(**lora_overrides) -> LMMConfig:
    """LLaVA-1.5-7B shapes: CLIP ViT-L/14-336 (features of layer -2) + Vicuna-7B."""
    return LMMConfig(
        name="llava-1.5-7b",
        vision=VisionConfig(image_size=336, patch_size=14, hidden_size=1024, num_layers=24, num_heads=16,
                            mlp_size=4096, feature_layer=-2),
        text=TextConfig(vocab_size=32064, hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=32,
                        mlp_size=11008, max_position=4096),
        lora=LoraConfig(**{"max_loras": 8, "max_rank": 64, **lora_overrides}),
        dtype="bfloat16",
    )


def llava_1_5_13b(**lora_overrides) -> LMMConfig:
    """LLaVA-1.5-13B shapes: CLIP ViT-L/14-336 (features of layer -2) + Vicuna-13B."""
    base = llava_1_5_7b(**lora_overrides)
    return dataclasses.replace(
        base, name="llava-1.5-13b",
        text=TextConfig(vocab_size=32064, hidden_size=5120, num_layers=40, num_heads=40, num_kv_heads=40,
                        mlp_size=13824, max_position=4096))


PRESETS = {"tiny": tiny, "llava-1.5-7b": llava_1_5_7b, "llava-1.5-13b": llava_1_5_13b}
