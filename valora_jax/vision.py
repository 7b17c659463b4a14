"""CLIP-style vision tower and the 2-layer GELU projector of LLaVA-1.5.

pixels [N, H, W, 3] -> patches [N, P, C*p*p] -> ViT -> hidden state of `feature_layer`
without the class token [N, P, D_v] -> projector -> [N, P, D] (the decoder's width).
"""

import jax
import jax.numpy as jnp
from flax import nnx

from valora_jax.config import LoraConfig, VisionConfig
from valora_jax.lora import Linear, LoraContext


def _lora_for(lora: LoraConfig | None, name: str) -> LoraConfig | None:
    return lora if lora is not None and name in lora.targets else None


def quick_gelu(x: jax.Array) -> jax.Array:
    return x * jax.nn.sigmoid(1.702 * x)


class LayerNorm(nnx.Module):
    def __init__(self, d: int, eps: float, dtype):
        self.scale = nnx.Param(jnp.ones((d,), dtype))
        self.bias = nnx.Param(jnp.zeros((d,), dtype))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        mean = xf.mean(-1, keepdims=True)
        var = jnp.square(xf - mean).mean(-1, keepdims=True)
        y = (xf - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)).astype(x.dtype)


class VisionLayer(nnx.Module):
    """Pre-LN transformer block: x += attn(LN1 x); x += fc2(quick_gelu(fc1(LN2 x)))."""

    def __init__(self, cfg: VisionConfig, lora: LoraConfig | None, dtype, rngs: nnx.Rngs):
        d = cfg.hidden_size
        self.num_heads = cfg.num_heads
        lin = lambda i, o, name: Linear(i, o, rngs=rngs, dtype=dtype, bias=True,
                                        lora=_lora_for(lora, f"vision.{name}"))
        qkv = ("q_proj", "k_proj", "v_proj")            # one fused GEMM; adapters address each part
        targeted = [name for name in qkv if _lora_for(lora, f"vision.{name}") is not None]
        self.layer_norm1 = LayerNorm(d, cfg.layer_norm_eps, dtype)
        self.qkv_proj = Linear(d, 3 * d, rngs=rngs, dtype=dtype, bias=True, parts=dict.fromkeys(qkv, d),
                               lora=lora if targeted else None, targets=targeted)
        self.out_proj = lin(d, d, "out_proj")
        self.layer_norm2 = LayerNorm(d, cfg.layer_norm_eps, dtype)
        self.fc1, self.fc2 = lin(d, cfg.mlp_size, "fc1"), lin(cfg.mlp_size, d, "fc2")

    def __call__(self, x: jax.Array, ctx: LoraContext) -> jax.Array:
        n, l, d = x.shape                                               # [N, L, D_v]
        dh = d // self.num_heads
        h = self.layer_norm1(x)
        q, k, v = (t.reshape(n, l, self.num_heads, dh) for t in jnp.split(self.qkv_proj(h, ctx), 3, axis=-1))
        scores = jnp.einsum("NQHd,NKHd->NHQK", q, k, preferred_element_type=jnp.float32) / jnp.sqrt(dh)
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        attn = jnp.einsum("NHQK,NKHd->NQHd", probs, v).reshape(n, l, d)
        x = x + self.out_proj(attn, ctx)
        return x + self.fc2(quick_gelu(self.fc1(self.layer_norm2(x), ctx)), ctx)


class VisionTower(nnx.Module):
    """CLIP ViT: patch embedding (no bias), class token, learned positions, pre-LayerNorm."""

    def __init__(self, cfg: VisionConfig, lora: LoraConfig | None, dtype, rngs: nnx.Rngs):
        self.cfg = cfg
        d, p = cfg.hidden_size, cfg.patch_size
        self.patch_embedding = nnx.Param((0.02 * jax.random.normal(rngs.params(), (p * p * 3, d))).astype(dtype))
        self.class_embedding = nnx.Param((0.02 * jax.random.normal(rngs.params(), (d,))).astype(dtype))
        self.position_embedding = nnx.Param(
            (0.02 * jax.random.normal(rngs.params(), (cfg.num_patches + 1, d))).astype(dtype))
        self.pre_layernorm = LayerNorm(d, cfg.layer_norm_eps, dtype)
        # Every layer exists (checkpoints carry them all); only those up to feature_layer run.
        self.layers = nnx.List([VisionLayer(cfg, lora, dtype, rngs) for _ in range(cfg.num_layers)])

    def __call__(self, pixels: jax.Array, ctx: LoraContext) -> jax.Array:
        """pixels [N, H, W, 3] (normalised), ctx.slot [N] -> features [N, P, D_v] (no class token)."""
        n, hgt, wid, c = pixels.shape
        p = self.cfg.patch_size
        patches = pixels.reshape(n, hgt // p, p, wid // p, p, c).transpose(0, 1, 3, 2, 4, 5)
        patches = patches.reshape(n, -1, p * p * c).astype(self.patch_embedding.dtype)   # [N, P, p*p*3]
        x = patches @ self.patch_embedding[...]                                          # [N, P, D_v]
        cls = jnp.broadcast_to(self.class_embedding[...], (n, 1, x.shape[-1]))
        x = jnp.concatenate([cls, x], axis=1) + self.position_embedding[...]
        x = self.pre_layernorm(x)
        token_ctx = ctx.for_tokens(jnp.repeat(ctx.slot, x.shape[1]))
        for layer in self.layers[: self.cfg.layers_used]:
            x = layer(x, token_ctx)
        return x[:, 1:]


class Projector(nnx.Module):
    """linear_1 -> GELU -> linear_2, from the ViT width to the decoder width."""

    def __init__(self, d_vision: int, d_text: int, lora: LoraConfig | None, dtype, rngs: nnx.Rngs):
        self.linear_1 = Linear(d_vision, d_text, rngs=rngs, dtype=dtype, bias=True,
                               lora=_lora_for(lora, "projector.linear_1"))
        self.linear_2 = Linear(d_text, d_text, rngs=rngs, dtype=dtype, bias=True,
                               lora=_lora_for(lora, "projector.linear_2"))

    def __call__(self, x: jax.Array, ctx: LoraContext) -> jax.Array:
        """x [N, P, D_v], ctx.slot [N] -> [N, P, D]."""
        token_ctx = ctx.for_tokens(jnp.repeat(ctx.slot, x.shape[1]))
        return self.linear_2(jax.nn.gelu(self.linear_1(x, token_ctx), approximate=False), token_ctx)
