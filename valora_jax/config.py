"""Frozen configuration dataclasses and named presets.

Each component gets only the config it needs: the vision tower a `VisionConfig` (LLaVA's
CLIP) or a `QwenVisionConfig` (the Qwen-VL family's dynamic-resolution ViT), the decoder a
`TextConfig`, the adapter machinery a `LoraConfig`; `LMMConfig` ties them together and names
the model family. Presets: `tiny()` (the embedded default, fast on CPU) and `qwen2_5_vl_tiny()` (its Qwen2.5-VL
counterpart), `llava_1_5_7b()`, `llava_1_5_13b()`, `qwen2_5_vl_3b()` and `qwen2_5_vl_7b()` (real
shapes, for GPU benchmarks with random weights).
"""

import dataclasses
import hashlib
import json
import math
from typing import Any

DECODER_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
VISION_TARGETS = ("vision.q_proj", "vision.k_proj", "vision.v_proj", "vision.out_proj",
                  "vision.fc1", "vision.fc2")
PROJECTOR_TARGETS = ("projector.linear_1", "projector.linear_2")
QWEN_VISION_TARGETS = ("vision.qkv", "vision.proj", "vision.gate_proj", "vision.up_proj", "vision.down_proj")
"""The Qwen-VL towers' linears adapters may target (Qwen2-VL's MLP is vision.fc1 / vision.fc2)."""
ALL_TARGETS = DECODER_TARGETS + VISION_TARGETS + PROJECTOR_TARGETS + QWEN_VISION_TARGETS
FAMILIES = ("llava", "qwen2_vl", "qwen2_5_vl")
"""Model families: LLaVA-1.5 (CLIP tower + projector), Qwen2-VL and Qwen2.5-VL."""


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
class QwenVisionConfig:
    """The Qwen-VL family's vision transformer: images at their own resolution, cut into
    patch_size^2 patches of temporal_patch_size frames (an image is its frame repeated), 2-D
    rotary positions, spatial_merge_size^2 neighbouring patches merged into one decoder token.
    Qwen2.5-VL: RMSNorm, SwiGLU MLP, attention within windows of window_size pixels except in
    the full_attention_layers; Qwen2-VL: LayerNorm, quick-GELU MLP, full attention."""

    num_layers: int = 2
    """Transformer blocks (HF `depth`)."""
    hidden_size: int = 64
    """Width of the ViT residual stream (HF `hidden_size` / `embed_dim`)."""
    num_heads: int = 4
    """Attention heads."""
    mlp_size: int = 128
    """Hidden width of each block's MLP."""
    patch_size: int = 14
    """Side of a square patch in pixels."""
    temporal_patch_size: int = 2
    """Frames per patch."""
    spatial_merge_size: int = 2
    """Side of the square of patches merged into one decoder token."""
    window_size: int = 0
    """Side of an attention window in pixels (a multiple of patch_size * spatial_merge_size);
    0: every block attends over the whole frame (Qwen2-VL)."""
    full_attention_layers: tuple[int, ...] = ()
    """Blocks that attend over the whole frame although window_size is set."""
    gated_mlp: bool = True
    """SwiGLU MLP (gate/up/down, SiLU) with RMSNorm (Qwen2.5-VL); else fc1/fc2 with quick-GELU and
    LayerNorm (Qwen2-VL)."""
    norm_eps: float = 1e-6
    """Norm epsilon."""
    min_pixels: int = 56 * 56
    """Fewest pixels an image is resized to (keeping its aspect ratio)."""
    max_pixels: int = 28 * 28 * 1280
    """Most pixels an image is resized to."""
    image_mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    """Per-channel mean used to normalise pixels."""
    image_std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
    """Per-channel standard deviation used to normalise pixels."""
    tokens_per_second: int = 2
    """Temporal rotary positions per second of video (Qwen2.5-VL)."""

    def __post_init__(self):
        if self.hidden_size % self.num_heads or (self.hidden_size // self.num_heads) % 4:
            raise ValueError(f"hidden_size {self.hidden_size} / num_heads {self.num_heads} must be a multiple of 4")
        unit = self.patch_size * self.spatial_merge_size
        if self.window_size % unit:
            raise ValueError(f"window_size {self.window_size} is not a multiple of patch_size * "
                             f"spatial_merge_size = {unit}")
        bad = [i for i in self.full_attention_layers if not 0 <= i < self.num_layers]
        if bad:
            raise ValueError(f"full_attention_layers {bad} outside the {self.num_layers}-layer tower")
        if not 0 < self.min_pixels <= self.max_pixels:
            raise ValueError(f"need 0 < min_pixels <= max_pixels, got {self.min_pixels}, {self.max_pixels}")

    @property
    def patch_dim(self) -> int:
        """Values in one flattened patch: channels x frames x patch_size^2."""
        return 3 * self.temporal_patch_size * self.patch_size ** 2

    @property
    def max_tokens_per_image(self) -> int:
        """Decoder tokens of the largest image (max_pixels)."""
        return self.max_pixels // (self.patch_size * self.spatial_merge_size) ** 2

    @property
    def image_size(self) -> int:
        """Side of the square images start-up calibration and the benchmarks draw: 448 pixels, or
        less to stay within max_pixels (a multiple of patch_size * spatial_merge_size)."""
        unit = self.patch_size * self.spatial_merge_size
        return max(unit, min(448, math.isqrt(self.max_pixels)) // unit * unit)


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
    qkv_bias: bool = False
    """Biases on the q/k/v projections (Qwen2)."""
    mrope_section: tuple[int, ...] = ()
    """Multimodal rotary positions (M-RoPE): frequencies per position axis (temporal, height,
    width), summing to head_dim / 2; () = one position per token (1-D RoPE)."""
    tie_word_embeddings: bool = False
    """The LM head is the embedding table (transposed)."""

    def __post_init__(self):
        if self.mrope_section and sum(self.mrope_section) != self.head_dim // 2:
            raise ValueError(f"mrope_section {list(self.mrope_section)} must sum to head_dim / 2 = "
                             f"{self.head_dim // 2}")
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
    """A multimodal model: a LLaVA-style vision tower -> 2-layer GELU projector -> decoder, or
    a Qwen-VL tower (its patch merger projects to the decoder's width) -> decoder."""

    name: str
    """Model identifier; adapters record it and are checked against it on load."""
    vision: VisionConfig | QwenVisionConfig
    text: TextConfig
    lora: LoraConfig = LoraConfig()
    dtype: str = "float32"
    """Parameter and activation dtype ("float32" or "bfloat16")."""
    page_size: int = 16
    """Tokens per KV-cache page."""
    family: str = "llava"
    """One of FAMILIES; the Qwen-VL families take a QwenVisionConfig and M-RoPE."""

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"unknown model family {self.family!r}; expected one of {FAMILIES}")
        want = VisionConfig if self.family == "llava" else QwenVisionConfig
        if not isinstance(self.vision, want):
            raise ValueError(f"family {self.family!r} takes a {want.__name__}, got {type(self.vision).__name__}")
        if (self.family != "llava") != bool(self.text.mrope_section):
            raise ValueError(f"family {self.family!r}: mrope_section {list(self.text.mrope_section)} "
                             f"({'needed' if self.family != 'llava' else 'not used'})")

    @property
    def is_qwen(self) -> bool:
        return self.family != "llava"

    @property
    def tokens_per_image(self) -> int:
        """Decoder tokens of an image (LLaVA: every image; Qwen-VL: the largest)."""
        return self.vision.max_tokens_per_image if self.is_qwen else self.vision.num_patches

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LMMConfig":
        d = dict(d)
        vision_type = VisionConfig if d.get("family", "llava") == "llava" else QwenVisionConfig
        vision = vision_type(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.pop("vision").items()})
        text = TextConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.pop("text").items()})
        lora_d = d.pop("lora")
        lora = LoraConfig(**{**lora_d, "targets": tuple(lora_d["targets"])})
        return cls(vision=vision, text=text, lora=lora, **d)

    @property
    def base_id(self) -> str:
        """Identity of the base architecture (name + shapes, not the LoRA pool):
        adapters trained for one base model are refused by another. Fields added after a
        model was first identified count only where they differ from their defaults, so
        existing models keep their identity."""
        shapes = [_identity(self.vision), _identity(self.text)]
        if self.family != "llava":
            shapes.append(self.family)
        digest = hashlib.sha256(json.dumps(shapes, sort_keys=True).encode()).hexdigest()[:12]
        return f"{self.name}@{digest}"


_LATER_FIELDS = {TextConfig: ("qkv_bias", "mrope_section", "tie_word_embeddings")}


def _identity(config) -> dict:
    """config's fields, less those added later that hold their defaults."""
    later = {f.name: f.default for f in dataclasses.fields(config) if f.name in _LATER_FIELDS.get(type(config), ())}
    return {k: v for k, v in dataclasses.asdict(config).items() if k not in later or v != later[k]}


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


def _qwen2_5_vl_vision() -> QwenVisionConfig:
    return QwenVisionConfig(num_layers=32, hidden_size=1280, num_heads=16, mlp_size=3420, window_size=112,
                            full_attention_layers=(7, 15, 23, 31))


def qwen2_5_vl_3b(**lora_overrides) -> LMMConfig:
    """Qwen2.5-VL-3B-Instruct shapes: the 32-block windowed ViT + a Qwen2.5-3B decoder (tied LM head)."""
    return LMMConfig(
        name="qwen2.5-vl-3b", family="qwen2_5_vl", vision=_qwen2_5_vl_vision(),
        text=TextConfig(vocab_size=151936, hidden_size=2048, num_layers=36, num_heads=16, num_kv_heads=2,
                        mlp_size=11008, max_position=128000, rope_theta=1e6, rms_norm_eps=1e-6, qkv_bias=True,
                        mrope_section=(16, 24, 24), tie_word_embeddings=True),
        lora=LoraConfig(**{"max_loras": 8, "max_rank": 64, **lora_overrides}),
        dtype="bfloat16",
    )


def qwen2_5_vl_7b(**lora_overrides) -> LMMConfig:
    """Qwen2.5-VL-7B-Instruct shapes: the 32-block windowed ViT + a Qwen2.5-7B decoder."""
    base = qwen2_5_vl_3b(**lora_overrides)
    return dataclasses.replace(
        base, name="qwen2.5-vl-7b",
        text=dataclasses.replace(base.text, vocab_size=152064, hidden_size=3584, num_layers=28, num_heads=28,
                                 num_kv_heads=4, mlp_size=18944, tie_word_embeddings=False))


def qwen2_5_vl_tiny(**lora_overrides) -> LMMConfig:
    """Qwen2.5-VL's architecture at the embedded default's size (fast on CPU): a 2-block windowed
    tower, images of up to 16 tokens, the byte vocabulary."""
    return LMMConfig(
        name="qwen2.5-vl-tiny", family="qwen2_5_vl",
        vision=QwenVisionConfig(window_size=56, full_attention_layers=(1,), min_pixels=56 * 56,
                                max_pixels=112 * 112),
        text=dataclasses.replace(TextConfig(), qkv_bias=True, mrope_section=(8, 12, 12), rope_theta=1e6),
        lora=LoraConfig(**{"max_loras": 4, "max_rank": 32, **lora_overrides}),
    )


PRESETS = {"tiny": tiny, "llava-1.5-7b": llava_1_5_7b, "llava-1.5-13b": llava_1_5_13b,
           "qwen2.5-vl-tiny": qwen2_5_vl_tiny, "qwen2.5-vl-3b": qwen2_5_vl_3b, "qwen2.5-vl-7b": qwen2_5_vl_7b}
