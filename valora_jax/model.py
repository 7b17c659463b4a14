"""The LLaVA-style LMM: vision tower + projector + decoder, as one Flax NNX module.

Image features replace the prompt's image placeholder tokens: the caller passes
`image_rows [B, Q]`, for each token the row of `image_features [F, D]` that replaces its
embedding (-1 = a text token), so any number of images per request fits one static shape.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from valora_jax.config import LMMConfig
from valora_jax.decoder import Decoder
from valora_jax.lora import LoraContext, MergedWeight, LoraSlot
from valora_jax.vision import Projector, VisionTower


class LMM(nnx.Module):
    def __init__(self, config: LMMConfig, *, rngs: nnx.Rngs):
        self.config = config
        dtype = jnp.dtype(config.dtype)
        lora = config.lora
        self.vision_tower = VisionTower(config.vision, lora, dtype, rngs)
        self.projector = Projector(config.vision.hidden_size, config.text.hidden_size, lora, dtype, rngs)
        self.decoder = Decoder(config.text, lora, dtype, rngs)

    def encode_images(self, pixels: jax.Array, ctx: LoraContext) -> jax.Array:
        """pixels [N, H, W, 3] normalised, ctx.slot [N] (vision adapter per image) -> [N, P, D]."""
        return self.projector(self.vision_tower(pixels, ctx), ctx)

    def embed(self, tokens: jax.Array, image_rows: jax.Array, image_features: jax.Array) -> jax.Array:
        """tokens [B, Q], image_rows [B, Q], image_features [F, D] -> embeddings [B, Q, D]."""
        text = self.decoder.embed_tokens[...][tokens]
        if image_features.shape[0] == 0:
            return text
        image = image_features[jnp.clip(image_rows, 0)].astype(text.dtype)
        return jnp.where((image_rows >= 0)[..., None], image, text)

    def __call__(self, tokens, positions, valid, image_rows, image_features, ctx: LoraContext) -> jax.Array:
        """Full forward without a cache: logits [B, Q, V] (float32) for every token.

        tokens/positions/image_rows [B, Q], valid [B, Q] bool, ctx.slot [B*Q]."""
        x = self.embed(tokens, image_rows, image_features)
        hidden, _ = self.decoder(x, positions, valid, ctx)
        return self.decoder.logits(hidden)

    def step(self, cache, page_table, tokens, positions, valid, image_rows, image_features, ctx: LoraContext):
        """One prefill/decode step over the paged cache.

        Writes the block's keys/values into the cache and returns
        (hidden [B, D] of each row's last valid token, logits [B, V] float32, new cache)."""
        x = self.embed(tokens, image_rows, image_features)
        hidden, cache = self.decoder(x, positions, valid, ctx, cache, page_table)
        last = jnp.maximum(valid.sum(axis=1) - 1, 0)                                  # [B]
        h_last = jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]      # [B, D]
        return h_last, self.decoder.logits(h_last), cache


def init_model(config: LMMConfig, seed: int = 0) -> LMM:
    return LMM(config, rngs=nnx.Rngs(params=seed))


def count_params(config: LMMConfig) -> int:
    """Base-model parameters (nnx.Param leaves), computed abstractly: no memory is allocated."""
    abstract = nnx.eval_shape(lambda: LMM(config, rngs=nnx.Rngs(0)))
    return sum(x.size for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))


def split_model(model: LMM):
    """(graphdef, params, lora slots, merged weights): the pieces the jitted steps take."""
    return nnx.split(model, nnx.Param, LoraSlot, MergedWeight)
