"""Training-time forward passes of an LMM: loss, greedy decoding and task-head prediction.

A trained adapter is the tree `lora = {module path: {"a": [D_in, r], "b": [r, D_out]}}` with a
scale per module (alpha / r). Training runs it *folded into the merged weights*, the model's
own "merged" mode:

    merged = kernel + scale * a @ b          (every targeted linear, inside the traced function)
    y      = x @ merged                      (= x W + scale x A B, the unmerged LoRA output)

so a step costs one dense matmul per linear, where the multi-slot reference path gathers
A[slot(t)] per token (17x slower on the tiny model on CPU). Gradients reach `a` and `b` through
the fold; the base weights are inputs, never outputs. Without an adapter (`lora=None`) the
merged weights equal the kernels: the base model (and base pretraining, where `params` is
differentiated). The LoRA slots of the model are not used.

Batches are dicts as produced by train.data (B rows of L tokens, M images each, P patches).
"""

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from valora_jax.decoder import Block
from valora_jax.lora import LoraContext, adapter_key, targeted_linears
from valora_jax.model import LMM, split_model, with_lora
from valora_jax.tokenizer import ByteTokenizer


class Parts(NamedTuple):
    """A model split for training: graphdef (static), base params, and the (unused) LoRA slot
    and merged-weight states that complete the module."""

    graphdef: nnx.GraphDef
    params: nnx.State
    rest: tuple[nnx.State, nnx.State]


def split_for_training(model: LMM) -> Parts:
    """The model's pieces; a model built without merged weights is rebuilt with them (same params)."""
    model = with_lora(model, dataclasses.replace(model.config.lora, mergeable=True))
    graphdef, params, lora, merged = split_model(model)
    return Parts(graphdef, params, (lora, merged))


def _model(parts: "Parts", params, lora, scales) -> LMM:
    """The module with the adapter (None: nothing) folded into its merged weights: each targeted
    linear's merged = kernel + scale * a @ b on the columns of each adapted part (a new merged
    state, built functionally: the variables are not mutated under a transformation)."""
    slots, merged = parts.rest
    folded = {}
    for path, lin in targeted_linears(nnx.merge(parts.graphdef, params, slots, merged)):
        w = lin.kernel[...]
        for part in lin.parts:
            key = adapter_key(path, part)
            if lora is not None and key in lora:
                delta = scales[key] * (lora[key]["a"].astype(jnp.float32) @ lora[key]["b"].astype(jnp.float32))
                cols = slice(part.start, part.start + part.width)
                w = w.at[:, cols].set((w[:, cols].astype(jnp.float32) + delta).astype(w.dtype))
        folded[path] = w
    state = nnx.from_flat_state([(path, var.replace(folded[path[:-1]])) for path, var in nnx.to_flat_state(merged)])
    return nnx.merge(parts.graphdef, params, slots, state)


def _merged_ctx(n: int) -> LoraContext:
    return LoraContext(jnp.zeros((n,), jnp.int32), jnp.int32(0), "merged", "reference")


def normalize(pixels: jax.Array, mean, std) -> jax.Array:
    """uint8 pixels -> the vision tower's input, (x / 255 - mean) / std in float32: what
    valora_jax.image.preprocess computes for an image of the model's size (to within rounding)."""
    x = pixels.astype(jnp.float32) / jnp.float32(255.0)
    return (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


def _features(model: LMM, pixels: jax.Array) -> jax.Array:
    """uint8 pixels [B, M, S, S, 3] -> image features [B*M*P, D]."""
    b, m = pixels.shape[:2]
    v = model.config.vision
    x = normalize(pixels.reshape(b * m, *pixels.shape[2:]), v.image_mean, v.image_std)
    feats = model.encode_images(x, _merged_ctx(b * m))                                  # [B*M, P, D]
    return feats.reshape(-1, feats.shape[-1])


def _hidden(model: LMM, tokens, valid, image_rows, feats, images_per_row: int) -> jax.Array:
    """Final-normed hidden states [B, L, D] (dense causal attention within each row)."""
    b, length = tokens.shape
    p = model.config.tokens_per_image
    rows = jnp.where(image_rows >= 0, image_rows + (jnp.arange(b) * images_per_row * p)[:, None], -1)
    positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (b, length))
    blk = Block(tokens, positions, valid, rows, None, None)
    hidden, _ = model.decoder(model.embed([blk], feats), [blk], _merged_ctx(b * length))
    return hidden.reshape(b, length, -1)


def forward(parts: Parts, params, lora, scales, batch) -> tuple[jax.Array, jax.Array]:
    """-> (hidden [B, L, D], float32 logits [B, L, V]) of the batch under the adapter (None: base)."""
    model = _model(parts, params, lora, scales)
    feats = _features(model, batch["pixels"])
    hidden = _hidden(model, batch["tokens"], batch["valid"], batch["image_rows"], feats, batch["pixels"].shape[1])
    return hidden, model.decoder.logits(hidden)


def head_logits(hidden: jax.Array, prompt_len: jax.Array, head) -> jax.Array:
    """The task head on the last prompt token: hidden [B, L, D], prompt_len [B] -> [B, labels]."""
    h = hidden[jnp.arange(hidden.shape[0]), prompt_len - 1].astype(jnp.float32)          # [B, D]
    return h @ head["kernel"] + head["bias"]


def loss(parts: Parts, params, lora, scales, head, batch, head_weight: float = 1.0):
    """-> (total loss, metrics). Token cross-entropy on the answer tokens (`loss_mask`), plus
    head_weight * the head's cross-entropy on rows whose answer is a label (when a head is given)."""
    hidden, logits = forward(parts, params, lora, scales, batch)
    weight = batch["weight"]
    logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)                                   # [B, L-1, V]
    nll = -jnp.take_along_axis(logp, batch["tokens"][:, 1:, None], axis=-1)[..., 0]
    mask = batch["loss_mask"][:, 1:] * weight[:, None]
    lm = (nll * mask).sum() / jnp.maximum(mask.sum(), 1.0)
    metrics = {"lm_loss": lm}
    total = lm
    if head is not None:
        scores = head_logits(hidden, batch["prompt_len"], head)
        has = (batch["label"] >= 0) * weight
        label = jnp.clip(batch["label"], 0)
        ce = -jnp.take_along_axis(jax.nn.log_softmax(scores), label[:, None], axis=-1)[:, 0]
        head_loss = (ce * has).sum() / jnp.maximum(has.sum(), 1.0)
        metrics["head_loss"] = head_loss
        metrics["head_acc"] = ((jnp.argmax(scores, -1) == label) * has).sum() / jnp.maximum(has.sum(), 1.0)
        total = total + head_weight * head_loss
    metrics["loss"] = total
    return total, metrics


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new"))
def _greedy(graphdef, params, rest, lora, scales, batch, max_new: int):
    model = _model(Parts(graphdef, params, rest), params, lora, scales)
    feats = _features(model, batch["pixels"])
    b, length = batch["tokens"].shape
    rows = jnp.arange(b)
    prompt_len = batch["prompt_len"]
    tok = ByteTokenizer()
    prompt = jnp.arange(length)[None, :] < prompt_len[:, None]
    tokens = jnp.where(prompt, batch["tokens"], tok.pad_id)          # drop the reference answer
    valid = jnp.ones_like(prompt)                                     # causal: later tokens never leak back
    image_rows = jnp.where(prompt, batch["image_rows"], -1)

    def step(i, tokens):
        hidden = _hidden(model, tokens, valid, image_rows, feats, batch["pixels"].shape[1])
        last = hidden[rows, jnp.minimum(prompt_len + i - 1, length - 1)]                 # [B, D]
        logits = model.decoder.logits(last)[:, : tok.vocab_size]
        nxt = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        return tokens.at[rows, jnp.minimum(prompt_len + i, length - 1)].set(nxt)

    tokens = jax.lax.fori_loop(0, max_new, step, tokens)
    cols = jnp.minimum(prompt_len[:, None] + jnp.arange(max_new)[None, :], length - 1)
    return jnp.take_along_axis(tokens, cols, axis=1)                                     # [B, max_new]


def greedy_decode(parts: Parts, params, lora, scales, batch, max_new: int) -> jax.Array:
    """Greedy answers: generated token ids [B, max_new] after each row's prompt (the reference
    answer in the batch is ignored). Rows whose prompt + max_new exceed L stop at L."""
    return _greedy(parts.graphdef, params, parts.rest, lora, scales, _arrays(batch), max_new)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _head_predict(graphdef, params, rest, lora, scales, head, batch):
    hidden, _ = forward(Parts(graphdef, params, rest), params, lora, scales, batch)
    return jnp.argmax(head_logits(hidden, batch["prompt_len"], head), axis=-1)


def head_predict(parts: Parts, params, lora, scales, head, batch) -> jax.Array:
    """Label index [B] the head picks for each row."""
    return _head_predict(parts.graphdef, params, parts.rest, lora, scales, head, _arrays(batch))


def _arrays(batch) -> dict:
    """The batch without host-only fields (reference answers)."""
    return {k: v for k, v in batch.items() if k != "answer"}
