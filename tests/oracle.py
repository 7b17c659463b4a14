"""The tests' oracle: one request generated alone, by full recomputation.

It shares no step code with the engine or the runner: no KV cache or pages, no batching, no
packed blocks, no adapter slots or kernels. The request's adapter is folded into a copy of the
model's weights in float32 (W + s A B on each adapted part's columns); each token then comes
from a dense forward over the whole sequence so far (the model's layers in merged mode, plain
jnp), is drawn by `sampling.sample` (the sampling rule is the specification) and recorded by
RequestState's stop rules.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from valora_jax.adapters import Adapter
from valora_jax.decoder import Block
from valora_jax.lora import LoraContext, adapter_key, targeted_linears
from valora_jax.model import LMM, split_model
from valora_jax.request import Completion, Request, RequestState
from valora_jax.sampling import sample
from valora_jax.tokenizer import ByteTokenizer


def folded(model: LMM, adapter: Adapter | None) -> LMM:
    """A module whose merged weights are `model`'s kernels with `adapter` (None: nothing) added;
    `model` is not changed."""
    graphdef, params, slots, merged = split_model(model)
    weights = {}
    for path, lin in targeted_linears(model):
        w = np.asarray(lin.kernel[...], np.float32).copy()
        for part in lin.parts:
            key = adapter_key(path, part)
            if adapter is not None and key in adapter.weights:
                a, b = adapter.weights[key]
                w[:, part.start: part.start + part.width] += adapter.scales[key] * (
                    np.asarray(a, np.float32) @ np.asarray(b, np.float32))
        weights[path] = jnp.asarray(w, lin.kernel[...].dtype)
    flat = [(path, var.replace(weights[path[:-1]])) for path, var in nnx.to_flat_state(merged)]
    return nnx.merge(graphdef, params, slots, nnx.from_flat_state(flat))


def _merged(n: int) -> LoraContext:
    return LoraContext(jnp.zeros((n,), jnp.int32), jnp.int32(0), "merged", "reference")


def _features(model: LMM, state: RequestState) -> jax.Array:
    """The request's image (and clip) features [F, D], in the order of its placeholders."""
    d = model.config.text.hidden_size
    if not len(state.pixels):
        return jnp.zeros((0, d), jnp.dtype(model.config.dtype))
    if model.config.is_qwen:
        return model.encode_patches(jnp.concatenate(state.pixels), state.grids, _merged(len(state.grids)))
    return model.encode_images(jnp.asarray(state.pixels, jnp.float32), _merged(len(state.pixels))).reshape(-1, d)


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, tokens, image_rows, feats, rope, length):
    """tokens / image_rows [L] (the sequence padded), feats [F, D], rope [L, 3] M-RoPE positions
    (or None) -> (final hidden [D], float32 logits [V]) at position length - 1."""
    model = nnx.merge(graphdef, state)
    n = tokens.shape[0]
    positions = jnp.arange(n, dtype=jnp.int32)
    blk = Block(tokens[None], positions[None], (positions < length)[None], image_rows[None], None, None,
                None if rope is None else rope[None])
    hidden, _ = model.decoder(model.embed([blk], feats), [blk], _merged(n))
    return hidden[length - 1], model.decoder.logits(hidden[length - 1])


def reference_completion(model: LMM, adapter: Adapter | None, request: Request, tokenizer=None) -> Completion:
    """`request` (on `adapter`, whose name it gives) completed alone by full recomputation."""
    tokenizer = tokenizer or ByteTokenizer()
    state = RequestState.prepare(request, model.config, tokenizer)
    merged = folded(model, adapter)
    graphdef, weights = nnx.split(merged)
    size = 64 * -(-(len(state.prompt_ids) + request.max_tokens) // 64)      # one compile per 64 positions
    image_rows = np.full(size, -1, np.int32)
    image_rows[: len(state.image_rows)] = state.image_rows
    feats, rope = _features(merged, state), state.rope_positions(0, size)
    while state.finish is None:
        tokens = np.zeros(size, np.int32)
        tokens[: len(state.tokens)] = state.tokens
        hidden, logits = _forward(graphdef, weights, tokens, image_rows, feats, rope, jnp.int32(len(state.tokens)))
        if adapter is not None and adapter.head is not None:
            state.label, state.finish = adapter.head.answer(np.asarray(hidden)), "stop"
            break
        logits = logits.at[tokenizer.vocab_size:].set(-jnp.inf)[None]
        token = sample(logits, jnp.float32([request.temperature]), jnp.float32([request.top_p]),
                       jnp.uint32([request.seed]), jnp.int32([len(state.out)]))
        state.append(int(token[0]), tokenizer)
    return state.completion(tokenizer)
