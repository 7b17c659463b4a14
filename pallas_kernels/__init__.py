"""Pallas GPU kernels of valora-jax: ATMM, the adaptive-tiling multi-adapter LoRA matmul."""

from pallas_kernels.atmm import lora_delta
from pallas_kernels.lora_reference import LoraWeight, lora_delta_reference
from pallas_kernels.tiling import STATIC_TILE, TileConfig, pick_tile

__all__ = ["STATIC_TILE", "LoraWeight", "TileConfig", "lora_delta", "lora_delta_reference", "pick_tile"]
