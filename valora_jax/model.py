"""The LMM as one Flax NNX module: a LLaVA-style vision tower + projector, or a Qwen-VL tower
(`visual`), and the decoder.

Image features replace the prompt's image placeholder tokens: each token's `image_rows`
entry names the row of `image_features [F, D]` that replaces its embedding (-1 = a text
token), so any number of images per request fits one static shape.
"""

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from valora_jax.config import LMMConfig, LoraConfig
from valora_jax.decoder import Block, Decoder
from valora_jax.lora import LoraContext, MergedWeight, LoraSlot
from valora_jax.qwen_vision import Grid, PatchLayout, QwenVisionTower, patch_layout
from valora_jax.vision import Projector, VisionTower


class LMM(nnx.Module):
    def __init__(self, config: LMMConfig, *, rngs: nnx.Rngs):
        self.config = config
        dtype = jnp.dtype(config.dtype)
        lora = config.lora
        if config.is_qwen:
            self.visual = QwenVisionTower(config.vision, config.text.hidden_size, lora, dtype, rngs)
        else:
            self.vision_tower = VisionTower(config.vision, lora, dtype, rngs)
            self.projector = Projector(config.vision.hidden_size, config.text.hidden_size, lora, dtype, rngs)
        self.decoder = Decoder(config.text, lora, dtype, rngs)

    def encode_images(self, pixels: jax.Array, ctx: LoraContext) -> jax.Array:
        """LLaVA: pixels [N, H, W, 3] normalised, ctx.slot [N] (vision adapter per image) -> [N, P, D]."""
        if self.config.is_qwen:
            raise ValueError(f"{self.config.family} encodes patches of any grid: use encode_patches")
        return self.projector(self.vision_tower(pixels, ctx), ctx)

    def encode_patches(self, patches: jax.Array, grids: Sequence[Grid], ctx: LoraContext,
                       attention: str = "reference") -> jax.Array:
        """Qwen-VL: patches [P, C*T*p*p] of images of `grids`, ctx.slot [len(grids)] (vision
        adapter per image) -> features [P / m^2, D], each image's tokens in order (qwen_vision;
        attention: the tower's attention backend)."""
        if not self.config.is_qwen:
            raise ValueError("LLaVA encodes whole images: use encode_images")
        sizes = [t * h * w for t, h, w in grids]
        if patches.shape != (sum(sizes), self.config.vision.patch_dim):
            raise ValueError(f"patches {patches.shape} do not match grids {list(grids)}: expected "
                             f"[{sum(sizes)}, {self.config.vision.patch_dim}]")
        layout = PatchLayout(*map(jnp.asarray, patch_layout(self.config.vision, grids)))
        slot = jnp.repeat(ctx.slot, np.array(sizes), total_repeat_length=sum(sizes))
        return self.visual(patches, layout, ctx.for_tokens(slot), attention)

    def embed(self, blocks: Sequence[Block], image_features: jax.Array) -> jax.Array:
        """The blocks' tokens flattened in order -> embeddings [T, D]; image tokens take rows of
        image_features [F, D]."""
        tokens = jnp.concatenate([blk.tokens.reshape(-1) for blk in blocks])
        text = self.decoder.embed_tokens[...][tokens]
        if image_features.shape[0] == 0:
            return text
        rows = jnp.concatenate([blk.image_rows.reshape(-1) for blk in blocks])
        image = image_features[jnp.clip(rows, 0)].astype(text.dtype)
        return jnp.where((rows >= 0)[:, None], image, text)

    def __call__(self, tokens, positions, valid, image_rows, image_features, ctx: LoraContext,
                 rope_positions=None) -> jax.Array:
        """Full forward without a cache: float32 logits [B, Q, V] for every token.

        tokens/positions/image_rows [B, Q], valid [B, Q] bool, ctx.slot [B*Q], rope_positions
        [B, Q, 3] (M-RoPE) or None."""
        blocks = [Block(tokens, positions, valid, image_rows, None, None, rope_positions)]
        hidden, _ = self.decoder(self.embed(blocks, image_features), blocks, ctx)
        return self.decoder.logits(hidden).reshape(*tokens.shape, -1)

    def step(self, cache, blocks: Sequence[Block], image_features: jax.Array, ctx: LoraContext,
             attention_backend: str = "reference"):
        """One prefill/decode step over the paged cache (every block has a page table).

        Writes the blocks' keys/values into the cache and returns (hidden [R, D], logits [R, V]
        float32, new cache) for the last valid token of each of the R = sum of B rows."""
        hidden, cache = self.decoder(self.embed(blocks, image_features), blocks, ctx, cache, attention_backend)
        last, start = [], 0
        for blk in blocks:
            b, nq = blk.valid.shape
            last.append(start + jnp.arange(b) * nq + jnp.maximum(blk.valid.sum(axis=1) - 1, 0))
            start += b * nq
        h_last = hidden[jnp.concatenate(last)]                                        # [R, D]
        return h_last, self.decoder.logits(h_last), cache


def init_model(config: LMMConfig, seed: int = 0) -> LMM:
    return LMM(config, rngs=nnx.Rngs(params=seed))


def count_params(config: LMMConfig) -> int:
    """Base-model parameters (nnx.Param leaves), computed abstractly: no memory is allocated."""
    abstract = nnx.eval_shape(lambda: LMM(config, rngs=nnx.Rngs(0)))
    return sum(x.size for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))


def with_lora(model: LMM, lora: LoraConfig) -> LMM:
    """The same base weights under another adapter-pool config (slots, rank, mergeability; not
    targets' shapes: the base model and its base_id are unchanged), with empty slots."""
    if lora == model.config.lora:
        return model
    config = dataclasses.replace(model.config, lora=lora)
    graphdef, _, slots, merged = split_model(nnx.eval_shape(lambda: LMM(config, rngs=nnx.Rngs(0))))
    zeros = lambda state: jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), state)
    return nnx.merge(graphdef, nnx.state(model, nnx.Param), zeros(slots), zeros(merged))


def split_model(model: LMM):
    """(graphdef, params, lora slots, merged weights): the pieces the jitted steps take."""
    return nnx.split(model, nnx.Param, LoraSlot, MergedWeight)
