"""Llama-style decoder (RMSNorm, RoPE, grouped-query attention, SwiGLU) over a paged KV cache;
with TextConfig's options also Qwen2's (q/k/v biases, multimodal rotary positions, tied LM head).

A step's tokens are one flat [T, D] array made of blocks: a `Block` is B rows of Q padded
tokens (say, one block of decode rows with Q=1 and one of prefill chunks with Q=256), so
the linears and their LoRA branch see every token of the step at once, while attention
runs per block. `valid [B, Q]` marks real tokens. Two attention sources:
  * dense (page_table None): each token attends to the valid tokens of its own row at
    positions <= its own (training, full recompute);
  * paged: the row's keys/values are first written to cache pages
    (`page_table[b, pos // page_size]`, offset `pos % page_size`; padding writes nothing),
    then each token attends to positions 0..pos of its sequence.
"""

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pallas_kernels.decode_attention import decode_attention
from pallas_kernels.prefill_attention import prefill_attention
from valora_jax.config import LoraConfig, TextConfig
from valora_jax.lora import Linear, LoraContext

class Block(NamedTuple):
    """B rows of Q padded tokens. tokens, positions, image_rows: [B, Q] int32 (image_rows: row of
    the step's image features replacing the token's embedding, -1 = text); valid: [B, Q] bool;
    slot: [B] int32 adapter slot per row; page_table: [B, Pmax] int32, or None for dense attention;
    rope_positions: [B, Q, A] int32 rotary positions per axis of M-RoPE (TextConfig.mrope_section,
    A axes), or None: each token's position on every axis."""

    tokens: jax.Array
    positions: jax.Array
    valid: jax.Array
    image_rows: jax.Array
    slot: jax.Array
    page_table: jax.Array | None
    rope_positions: jax.Array | None = None


NULL_PAGE = 0  # what unused page-table entries point at; never holds real data
_MASKED = -1e30


class RMSNorm(nnx.Module):
    def __init__(self, d: int, eps: float, dtype):
        self.weight = nnx.Param(jnp.ones((d,), dtype))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.square(xf).mean(-1, keepdims=True) + self.eps)
        return self.weight[...] * y.astype(x.dtype)


def rope_angles(positions: jax.Array, head_dim: int, theta: float, sections: Sequence[int] = ()) -> jax.Array:
    """Rotary angles [T, Dh/2] float32: position x inv_freq_i, inv_freq_i = theta^(-2i/Dh). With
    sections (M-RoPE), positions are [T, len(sections)] and frequency i takes the position of
    the axis whose section holds it (sections[0] frequencies the first axis', and so on);
    without, positions are [T]."""
    inv_freq = 1.0 / theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)   # [Dh/2]
    positions = positions.astype(jnp.float32)
    if sections:
        axis = np.repeat(np.arange(len(sections)), sections)                            # [Dh/2]
        return positions[:, axis] * inv_freq
    return positions[:, None] * inv_freq


def rotate(x: jax.Array, angles: jax.Array) -> jax.Array:
    """Rotary embedding, rotate-half convention: x [T, H, Dh] by angles [T, Dh/2]."""
    angles = jnp.concatenate([angles, angles], -1)[:, None, :]                      # [T, 1, Dh]
    xf = x.astype(jnp.float32)
    x1, x2 = jnp.split(xf, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], -1)
    return (xf * jnp.cos(angles) + rotated * jnp.sin(angles)).astype(x.dtype)


def _step_rope_angles(cfg: TextConfig, blocks: Sequence[Block]) -> jax.Array:
    """The rotary angles [T, Dh/2] of the blocks' tokens, flattened in order."""
    if not cfg.mrope_section:
        positions = jnp.concatenate([blk.positions.reshape(-1) for blk in blocks])
    else:
        axes = len(cfg.mrope_section)
        positions = jnp.concatenate([
            (blk.rope_positions if blk.rope_positions is not None
             else jnp.broadcast_to(blk.positions[..., None], (*blk.positions.shape, axes))).reshape(-1, axes)
            for blk in blocks])
    return rope_angles(positions, cfg.head_dim, cfg.rope_theta, cfg.mrope_section)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """Grouped-query attention. q [B, Q, H, Dh], k/v [B, C, H_kv, Dh], mask [B, Q, C] -> [B, Q, H*Dh]."""
    b, nq, h, dh = q.shape
    hkv = k.shape[2]
    q = q.reshape(b, nq, hkv, h // hkv, dh)
    scores = jnp.einsum("BQKGd,BCKd->BKGQC", q, k, preferred_element_type=jnp.float32) / jnp.sqrt(dh)
    scores = jnp.where(mask[:, None, None], scores, _MASKED)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    v = jnp.where(mask.any(axis=1)[:, :, None, None], v, 0)       # select: unattended keys' garbage stays out
    out = jnp.einsum("BKGQC,BCKd->BQKGd", probs, v)
    return out.reshape(b, nq, h * dh)


def write_pages(pages: jax.Array, new: jax.Array, positions: jax.Array, valid: jax.Array,
                page_table: jax.Array) -> jax.Array:
    """pages [H_kv, P, page, Dh] with new [B, Q, H_kv, Dh] stored at each valid token's position;
    padding tokens write nothing. Valid tokens of a step hold distinct (page, offset) pairs, so
    the scatter is declared unique: plain stores (padding tokens all writing one place made it
    serialize on atomics, 37 ms of a 7B prefill step of 4096 positions)."""
    page_size = pages.shape[2]
    col = jnp.clip(positions // page_size, 0, page_table.shape[1] - 1)
    page = jnp.where(valid, jnp.take_along_axis(page_table, col, axis=1), pages.shape[1])   # [B, Q]; P: dropped
    return pages.at[:, page, positions % page_size].set(new.transpose(2, 0, 1, 3).astype(pages.dtype),
                                                         mode="drop", unique_indices=True)


def gather_pages(pages: jax.Array, page_table: jax.Array) -> jax.Array:
    """pages [H_kv, P, page, Dh], page_table [B, Pmax] -> context [B, Pmax*page, H_kv, Dh]."""
    ctx = pages[:, page_table]                                                       # [H_kv, B, Pmax, page, Dh]
    hkv, b, n, ps, dh = ctx.shape
    return ctx.transpose(1, 2, 3, 0, 4).reshape(b, n * ps, hkv, dh)


ATTENTION_BACKENDS = ("reference", "pallas", "pallas-interpret")


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: TextConfig, lora: LoraConfig | None, dtype, rngs: nnx.Rngs):
        d, dh = cfg.hidden_size, cfg.head_dim
        self.cfg = cfg
        def lin(d_in, parts: dict[str, int], bias: bool = False):
            """One linear, or several fused into one GEMM (adapters still address each part by name)."""
            targeted = lora is not None and any(name in lora.targets for name in parts)
            fused = parts if len(parts) > 1 else None
            return Linear(d_in, sum(parts.values()), rngs=rngs, dtype=dtype, parts=fused, bias=bias,
                          lora=lora if targeted else None)

        q, kv = cfg.num_heads * dh, cfg.num_kv_heads * dh
        self.input_layernorm = RMSNorm(d, cfg.rms_norm_eps, dtype)
        self.qkv_proj = lin(d, {"q_proj": q, "k_proj": kv, "v_proj": kv}, bias=cfg.qkv_bias)
        self.o_proj = lin(q, {"o_proj": d})
        self.post_attention_layernorm = RMSNorm(d, cfg.rms_norm_eps, dtype)
        self.gate_up_proj = lin(d, {"gate_proj": cfg.mlp_size, "up_proj": cfg.mlp_size})
        self.down_proj = lin(cfg.mlp_size, {"down_proj": d})

    def __call__(self, x: jax.Array, blocks: Sequence[Block], ctx: LoraContext, cache=None,
                 attention_backend: str = "reference"):
        """x [T, D] (the blocks' tokens, flattened in order) -> (x, cache).
        cache = (k_pages, v_pages) of this layer, or None when every block is dense.
        attention_backend: how paged blocks attend: "reference" gathers their pages and computes
        dense masked attention; "pallas" runs the paged decode-attention kernel on blocks of one
        token per row (decodes) and the flash prefill kernel over the pages of the others (both read
        the pages through the page table)."""
        cfg = self.cfg
        h = self.input_layernorm(x)
        q, k, v = jnp.split(self.qkv_proj(h, ctx), [cfg.num_heads * cfg.head_dim,
                                                    (cfg.num_heads + cfg.num_kv_heads) * cfg.head_dim], axis=-1)
        angles = _step_rope_angles(cfg, blocks)                                         # [T, Dh/2]
        q = rotate(q.reshape(-1, cfg.num_heads, cfg.head_dim), angles)
        k = rotate(k.reshape(-1, cfg.num_kv_heads, cfg.head_dim), angles)
        v = v.reshape(-1, cfg.num_kv_heads, cfg.head_dim)
        outputs, start = [], 0
        for blk in blocks:
            b, nq = blk.positions.shape
            rows = slice(start, start + b * nq)
            start += b * nq
            qb, kb, vb = (t[rows].reshape(b, nq, *t.shape[1:]) for t in (q, k, v))
            if blk.page_table is None:
                mask = blk.valid[:, None, :] & (blk.positions[:, None, :] <= blk.positions[:, :, None])  # [B, Q, Q]
                out = attention(qb, kb, vb, mask)
            else:
                k_pages = write_pages(cache[0], kb, blk.positions, blk.valid, blk.page_table)
                v_pages = write_pages(cache[1], vb, blk.positions, blk.valid, blk.page_table)
                cache = (k_pages, v_pages)
                if nq == 1 and attention_backend != "reference":
                    lengths = jnp.where(blk.valid[:, 0], blk.positions[:, 0] + 1, 0).astype(jnp.int32)
                    out = decode_attention(qb[:, 0], k_pages, v_pages, blk.page_table, lengths,
                                           interpret=attention_backend == "pallas-interpret")
                elif attention_backend != "reference":
                    out = prefill_attention(qb, k_pages, v_pages, blk.page_table, blk.positions,
                                            interpret=attention_backend == "pallas-interpret")
                else:
                    keys, values = (gather_pages(p, blk.page_table).astype(q.dtype) for p in (k_pages, v_pages))
                    mask = jnp.arange(keys.shape[1])[None, None, :] <= blk.positions[:, :, None]  # [B, Q, C]
                    out = attention(qb, keys, values, mask)
            outputs.append(out.reshape(b * nq, -1))
        x = x + self.o_proj(jnp.concatenate(outputs), ctx)
        h = self.post_attention_layernorm(x)
        gate, up = jnp.split(self.gate_up_proj(h, ctx), 2, axis=-1)
        return x + self.down_proj(jax.nn.silu(gate) * up, ctx), cache


class Decoder(nnx.Module):
    """Embedding, decoder layers, final norm, LM head (the embedding table when tied)."""

    def __init__(self, cfg: TextConfig, lora: LoraConfig | None, dtype, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed_tokens = nnx.Param((0.02 * jax.random.normal(rngs.params(), (cfg.vocab_size, cfg.hidden_size)))
                                      .astype(dtype))
        self.layers = nnx.List([DecoderLayer(cfg, lora, dtype, rngs) for _ in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.lm_head = None if cfg.tie_word_embeddings else nnx.Param(
            (0.02 * jax.random.normal(rngs.params(), (cfg.hidden_size, cfg.vocab_size))).astype(dtype))

    def __call__(self, x: jax.Array, blocks: Sequence[Block], ctx: LoraContext, cache=None,
                 attention_backend: str = "reference"):
        """x [T, D] embeddings -> (final-normed hidden [T, D], cache: a (k, v) pair per layer, or None)."""
        new_cache = []
        for i, layer in enumerate(self.layers):
            x, layer_cache = layer(x, blocks, ctx, None if cache is None else cache[i], attention_backend)
            new_cache.append(layer_cache)
        return self.norm(x), (None if cache is None else new_cache)

    def logits(self, hidden: jax.Array) -> jax.Array:
        """hidden [..., D] -> float32 logits [..., V]."""
        if self.lm_head is None:
            return jnp.dot(hidden, self.embed_tokens[...].T, preferred_element_type=jnp.float32)
        return jnp.dot(hidden, self.lm_head[...], preferred_element_type=jnp.float32)
