"""Pallas GPU kernels of valora-jax: ATMM, the adaptive-tiling multi-adapter LoRA matmul, the
swift merge of an adapter into a weight, paged flash attention for prefill chunks, paged
attention for decode rows and flash attention within segments (the Qwen-VL tower)."""

from pallas_kernels.atmm import lora_delta
from pallas_kernels.decode_attention import decode_attention, decode_attention_reference
from pallas_kernels.lora_reference import (PAD_SLOT, LoraWeight, lora_delta_reference, merge_parts_reference,
                                           merge_weight_reference)
from pallas_kernels.merge import merge_parts, merge_weight
from pallas_kernels.prefill_attention import prefill_attention, prefill_attention_reference
from pallas_kernels.segment_attention import segment_attention, segment_attention_reference
from pallas_kernels.tiling import STATIC_TILE, MergeTile, TileConfig, pick_merge_tile, pick_tile

__all__ = ["PAD_SLOT", "STATIC_TILE", "LoraWeight", "MergeTile", "TileConfig", "decode_attention",
           "decode_attention_reference", "lora_delta", "lora_delta_reference", "merge_parts",
           "merge_parts_reference", "merge_weight", "merge_weight_reference", "pick_merge_tile", "pick_tile",
           "prefill_attention", "prefill_attention_reference", "segment_attention", "segment_attention_reference"]
