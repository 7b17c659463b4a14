"""The Qwen-VL family's vision tower (Qwen2-VL, Qwen2.5-VL): images at their own resolution.

An image resized to (H, W) pixels (multiples of patch_size * spatial_merge_size, `image.qwen_patches`)
is a grid (t, h, w) of patches (t = frames / temporal_patch_size, h = H / patch_size, ...), given
as patches [t*h*w, C*T*p*p] in the processor's order: frame, then the (h/m) x (w/m) grid of merge
units row-major, then the m x m patches of a unit row-major (m = spatial_merge_size); a patch's
values run over channel, frame, pixel row, pixel column. The tower:

    x   = patches @ patch_embedding                                   [P, D_v]
    x  += attention(norm(x)) with 2-D rotary positions (row, column)  per block, attending within
          the patch's frame, or in Qwen2.5-VL within its window of (window_size / (p*m))^2 merge
          units except in the full_attention_layers
    x  += mlp(norm(x))                                                SwiGLU (2.5) / quick-GELU (2)
    out = merger(x): norm, the m^2 patches of each unit concatenated, Linear -> GELU -> Linear
                                                                      [P / m^2, D] (decoder width)

The blocks see the patches in window order (each window's units together, as HF's reordering
does), so that every attention segment, window or frame, is one run of patches and the
segment-attention kernel reads only the keys of its queries' runs; the merger's output goes back
to the processor's order. Several images (any sizes) run in one call, their layout (order, rows,
columns, attention segments) computed on the host (`patch_layout`) and passed as arrays, so one
compiled tower serves any mix of sizes that fits its number of patches; attention never crosses
an image or a frame.
"""

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pallas_kernels.segment_attention import segment_attention, segment_attention_reference
from valora_jax.config import LoraConfig, QwenVisionConfig
from valora_jax.decoder import RMSNorm, rotate
from valora_jax.lora import Linear, LoraContext
from valora_jax.vision import LayerNorm, quick_gelu

Grid = tuple[int, int, int]
"""(frames t, patch rows h, patch columns w) of one image or clip."""


def _lora_for(lora: LoraConfig | None, name: str) -> LoraConfig | None:
    return lora if lora is not None and name in lora.targets else None


class PatchLayout(NamedTuple):
    """Where the tower's P patches (of some images, in window order) come from and attend (int32):

    order [P]: the processor-order index of the patch at each tower position;
    row [P], col [P]: the patch's row and column in its frame;
    segments [2, P]: its attention group in a full-attention block (its frame) and in a windowed
      block (its window; the frame again without windows), each group one run of positions;
    restore [P / m^2]: the tower position of each merge unit in the processor's order."""

    order: np.ndarray
    row: np.ndarray
    col: np.ndarray
    segments: np.ndarray
    restore: np.ndarray

    def padded(self, size: int, units: int) -> "PatchLayout":
        """The layout of `size` patches (a multiple of `units` = m^2): padding patches after these,
        in their own segment (-1, attending only each other), in place in both orders."""
        n, extra = len(self.order), size - len(self.order)
        return PatchLayout(np.concatenate([self.order, np.arange(n, size, dtype=np.int32)]),
                           np.pad(self.row, (0, extra)), np.pad(self.col, (0, extra)),
                           np.pad(self.segments, ((0, 0), (0, extra)), constant_values=-1),
                           np.concatenate([self.restore, np.arange(n // units, size // units, dtype=np.int32)]))


def patch_layout(cfg: QwenVisionConfig, grids: Sequence[Grid]) -> PatchLayout:
    """Host-side index maths of the patches of `grids` (`PatchLayout`). Windows keep the
    processor's order of their patches, frames and images their order of windows; segments of
    different images never coincide."""
    m = cfg.spatial_merge_size
    rows, cols, frames, windows = [], [], [], []
    ws = cfg.window_size // (cfg.patch_size * m) if cfg.window_size else 0
    frame0 = window0 = 0
    for t, h, w in grids:
        if h % m or w % m:
            raise ValueError(f"grid {(t, h, w)}: h and w must be multiples of spatial_merge_size {m}")
        r = np.arange(h).reshape(h // m, m)[:, None, :, None]                    # [h/m, 1, m, 1]
        c = np.arange(w).reshape(w // m, m)[None, :, None, :]                    # [1, w/m, 1, m]
        r, c = np.broadcast_arrays(r, c)                                         # [h/m, w/m, m, m]
        rows.append(np.tile(r.reshape(-1), t))
        cols.append(np.tile(c.reshape(-1), t))
        per_frame = h * w
        frames.append(frame0 + np.repeat(np.arange(t), per_frame))
        if ws:
            nw = -(-(w // m) // ws)                                              # windows per window row
            unit_window = ((r[..., 0, 0] // m // ws) * nw + (c[..., 0, 0] // m // ws))   # [h/m, w/m]
            in_frame = np.repeat(unit_window.reshape(-1), m * m)                 # [h*w]
            n_windows = -(-(h // m) // ws) * nw
            windows.append(window0 + (np.arange(t)[:, None] * n_windows + in_frame[None, :]).reshape(-1))
            window0 += t * n_windows
        frame0 += t
    row, col, frame = (np.concatenate(a).astype(np.int32) for a in (rows, cols, frames))
    window = np.concatenate(windows).astype(np.int32) if ws else frame
    order = np.argsort(window, kind="stable").astype(np.int32)     # windows are whole merge units
    restore = np.argsort(order[::m * m]).astype(np.int32)
    return PatchLayout(order, row[order], col[order], np.stack([frame, window])[:, order], restore)


def vision_rope_angles(row: jax.Array, col: jax.Array, head_dim: int, theta: float = 10000.0) -> jax.Array:
    """2-D rotary angles [P, head_dim / 2] float32: the first half of the frequencies turn with
    the patch's row, the second with its column (inv_freq_i = theta^(-4i / head_dim))."""
    dim = head_dim // 2
    inv_freq = 1.0 / theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim)       # [head_dim / 4]
    row, col = jnp.asarray(row, jnp.float32), jnp.asarray(col, jnp.float32)
    return jnp.concatenate([row[:, None] * inv_freq, col[:, None] * inv_freq], -1)


class QwenVisionBlock(nnx.Module):
    """x += proj(attention(qkv(norm1 x))); x += mlp(norm2 x)."""

    def __init__(self, cfg: QwenVisionConfig, lora: LoraConfig | None, dtype, rngs: nnx.Rngs):
        d, f = cfg.hidden_size, cfg.mlp_size
        self.num_heads = cfg.num_heads
        norm = RMSNorm if cfg.gated_mlp else LayerNorm

        def lin(d_in, d_out, name):
            return Linear(d_in, d_out, rngs=rngs, dtype=dtype, bias=True, lora=_lora_for(lora, f"vision.{name}"))

        self.norm1, self.norm2 = norm(d, cfg.norm_eps, dtype), norm(d, cfg.norm_eps, dtype)
        self.qkv, self.proj = lin(d, 3 * d, "qkv"), lin(d, d, "proj")
        if cfg.gated_mlp:             # gate and up as one GEMM; adapters address each part
            targeted = [n for n in ("gate_proj", "up_proj") if _lora_for(lora, f"vision.{n}") is not None]
            self.gate_up_proj = Linear(d, 2 * f, rngs=rngs, dtype=dtype, bias=True,
                                       parts={"gate_proj": f, "up_proj": f}, lora=lora if targeted else None,
                                       targets=targeted)
            self.down_proj = lin(f, d, "down_proj")
        else:
            self.fc1, self.fc2 = lin(d, f, "fc1"), lin(f, d, "fc2")

    def mlp(self, x: jax.Array, ctx: LoraContext) -> jax.Array:
        if hasattr(self, "gate_up_proj"):
            gate, up = jnp.split(self.gate_up_proj(x, ctx), 2, axis=-1)
            return self.down_proj(jax.nn.silu(gate) * up, ctx)
        return self.fc2(quick_gelu(self.fc1(x, ctx)), ctx)

    def __call__(self, x: jax.Array, angles: jax.Array, segment: jax.Array, ctx: LoraContext,
                 attention: str = "reference") -> jax.Array:
        """x [P, D_v], angles [P, Dh/2], segment [P] (patches attend within theirs: runs, for the
        kernel backends) -> [P, D_v]."""
        p, d = x.shape
        dh = d // self.num_heads
        q, k, v = (t.reshape(p, self.num_heads, dh) for t in jnp.split(self.qkv(self.norm1(x), ctx), 3, axis=-1))
        q, k = rotate(q, angles), rotate(k, angles)
        x = x + self.proj(_segment_attention(q, k, v, segment, attention).reshape(p, d), ctx)
        return x + self.mlp(self.norm2(x), ctx)


def _segment_attention(q, k, v, segment, backend: str) -> jax.Array:
    """Attention within segments by the attention backend (decoder.ATTENTION_BACKENDS)."""
    if backend == "reference":
        return segment_attention_reference(q, k, v, segment)
    return segment_attention(q, k, v, segment, interpret=backend == "pallas-interpret")


class PatchMerger(nnx.Module):
    """norm -> the m^2 patches of each merge unit concatenated -> Linear -> GELU -> Linear."""

    def __init__(self, cfg: QwenVisionConfig, d_text: int, dtype, rngs: nnx.Rngs):
        d, units = cfg.hidden_size, cfg.spatial_merge_size ** 2
        self.units = units
        self.ln_q = (RMSNorm if cfg.gated_mlp else LayerNorm)(d, cfg.norm_eps, dtype)
        self.linear_1 = Linear(d * units, d * units, rngs=rngs, dtype=dtype, bias=True)
        self.linear_2 = Linear(d * units, d_text, rngs=rngs, dtype=dtype, bias=True)

    def __call__(self, x: jax.Array, ctx: LoraContext) -> jax.Array:
        """x [P, D_v], ctx.slot [P / m^2] -> [P / m^2, D]."""
        h = self.ln_q(x).reshape(-1, x.shape[-1] * self.units)
        return self.linear_2(jax.nn.gelu(self.linear_1(h, ctx), approximate=False), ctx)


class QwenVisionTower(nnx.Module):
    """Patch embedding (no bias), the blocks, the patch merger (see the module docstring)."""

    def __init__(self, cfg: QwenVisionConfig, d_text: int, lora: LoraConfig | None, dtype, rngs: nnx.Rngs):
        self.cfg = cfg
        self.patch_embedding = nnx.Param(
            (0.02 * jax.random.normal(rngs.params(), (cfg.patch_dim, cfg.hidden_size))).astype(dtype))
        self.blocks = nnx.List([QwenVisionBlock(cfg, lora, dtype, rngs) for _ in range(cfg.num_layers)])
        self.merger = PatchMerger(cfg, d_text, dtype, rngs)

    def __call__(self, patches: jax.Array, layout: PatchLayout, ctx: LoraContext,
                 attention: str = "reference") -> jax.Array:
        """patches [P, C*T*p*p] in the processor's order, their `layout` (`patch_layout`, as
        arrays; padding patches: a segment of their own), ctx.slot [P] (the vision adapter of
        each patch's image, processor order), attention: the attention backend -> features
        [P / m^2, D] in the processor's order. P must be a multiple of m^2 (an image's patches are)."""
        cfg = self.cfg
        units = cfg.spatial_merge_size ** 2
        angles = vision_rope_angles(layout.row, layout.col, cfg.hidden_size // cfg.num_heads)
        full = set(cfg.full_attention_layers) if cfg.window_size else set(range(cfg.num_layers))
        x = patches[layout.order].astype(self.patch_embedding.dtype) @ self.patch_embedding[...]
        ctx = ctx.for_tokens(ctx.slot[layout.order])
        for i, block in enumerate(self.blocks):
            x = block(x, angles, layout.segments[0 if i in full else 1], ctx, attention)
        return self.merger(x, ctx.for_tokens(ctx.slot[::units]))[layout.restore]


def mrope_positions(tokens: Sequence[int], image_id: int, video_id: int, cfg: QwenVisionConfig,
                    image_grids: Sequence[Grid] = (), video_grids: Sequence[Grid] = (),
                    video_seconds: Sequence[float] = (), scaled_time: bool = True) -> tuple[np.ndarray, int]:
    """The M-RoPE positions [L, 3] (temporal, row, column) of a prompt's tokens, and its delta:
    the positions of the tokens after the prompt are (index + delta) on every axis.

    The image_id (video_id) tokens are the images (clips) of image_grids (video_grids), in
    order, each t * h * w / m^2 consecutive tokens (adjacent media included). A text token's position is 1 + the largest position
    before it, on all three axes; a media token's is (time, unit row, unit column) + the
    position its run starts at. time = frame index t, or with scaled_time (Qwen2.5-VL)
    int(t * seconds per frame pair * tokens_per_second) (video_seconds[i]; 0 for images)."""
    m = cfg.spatial_merge_size
    tokens = np.asarray(tokens)
    queues = {image_id: [(g, 0.0) for g in image_grids],
              video_id: list(zip(video_grids, video_seconds or [0.0] * len(video_grids)))}
    if len(queues[video_id]) != len(video_grids):
        raise ValueError(f"{len(video_seconds)} video_seconds for {len(video_grids)} clips")
    parts, next_pos, i = [], 0, 0
    while i < len(tokens):
        j = i
        while j < len(tokens) and tokens[j] not in queues:
            j += 1
        parts.append(np.repeat(next_pos + np.arange(j - i)[:, None], 3, axis=1))      # text
        next_pos += j - i
        if j == len(tokens):
            break
        kind = int(tokens[j])
        if not queues[kind]:
            raise ValueError(f"more {'image' if kind == image_id else 'video'} runs in the prompt than grids given")
        (t, h, w), seconds = queues[kind].pop(0)
        n = t * (h // m) * (w // m)
        if j + n > len(tokens) or np.any(tokens[j:j + n] != kind):
            raise ValueError(f"the {kind} tokens at {j} are fewer than the {n} of grid {(t, h, w)}")
        time = np.arange(t) * (seconds * cfg.tokens_per_second if scaled_time else 1.0)
        tt, hh, ww = np.meshgrid(time.astype(np.int64), np.arange(h // m), np.arange(w // m), indexing="ij")
        parts.append(next_pos + np.stack([tt, hh, ww], -1).reshape(-1, 3))
        next_pos = int(parts[-1].max()) + 1
        i = j + n
    left = [k for k, q in queues.items() if q]
    if left:
        raise ValueError(f"{sum(len(queues[k]) for k in left)} grids without their tokens in the prompt")
    positions = np.concatenate(parts).astype(np.int32) if parts else np.zeros((0, 3), np.int32)
    return positions, next_pos - len(tokens)
