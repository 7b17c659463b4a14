"""Requests, their validation and tokenisation, per-request decoding state, and completions.

Shared by the serving engine and the tests' oracle: `RequestState.prepare` checks a
request against the model and tokenizer (raising ValueError naming the bad value) before
anything else happens, and `append` applies the stop rules to each new token.
"""

import dataclasses
from typing import Any, Sequence

import numpy as np

from valora_jax.config import LMMConfig
from valora_jax.image import preprocess_batch, qwen_patches
from valora_jax.qwen_vision import mrope_positions


@dataclasses.dataclass(frozen=True)
class Clip:
    """A video as frames (each as `Request.images` takes an image), sampled at `fps` frames a
    second. Models of the Qwen-VL family take clips."""

    frames: Sequence[Any]
    fps: float = 2.0


MAX_CLIP_FRAMES = 768
"""The most frames a clip may have."""


@dataclasses.dataclass(frozen=True)
class Request:
    """prompt: the user's text, with `images` (bytes, path, PIL image, HxWx3 uint8 array) and
    `videos` (Clips) placed before it; or `messages`: a whole conversation (the tokenizer's
    `chat_prompt` format, content text or a list of {"type": "text", "text"} / {"type": "image"} /
    {"type": "video"} parts) whose image and video parts `images` and `videos` fill in order.
    adapter: adapter name or None for the base model."""

    prompt: str = ""
    images: Sequence[Any] = ()
    adapter: str | None = None
    max_tokens: int = 32
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    stop: Sequence[str] = ()
    ignore_eos: bool = False
    """Keep generating through stop tokens until max_tokens (fixed-length benchmark requests)."""
    messages: Sequence[Any] | None = None
    videos: Sequence[Clip] = ()


@dataclasses.dataclass(frozen=True)
class Completion:
    text: str
    token_ids: tuple[int, ...]
    finish_reason: str            # "stop" | "length" | "cancelled" | "error"
    prompt_tokens: int
    label: str | None = None      # the task head's answer, for adapters with a head
    error: str | None = None      # why the request failed, for finish_reason "error"


@dataclasses.dataclass
class RequestState:
    """A request in flight. prompt_ids: chat-formatted ids with image placeholders expanded;
    image_rows: per prompt token, the row of this request's image features (its images' tokens
    one after the other), or -1 for text; pixels: LLaVA: [N, H, W, 3] preprocessed images;
    Qwen-VL: each image's patches [t*h*w, C*T*p*p], of grids[i] = (t, h, w); rope: Qwen-VL's
    M-RoPE positions [len(prompt_ids), 3] of the prompt, rope_delta: the offset of the tokens
    after it (`rope_positions`)."""

    request: Request
    prompt_ids: list[int]
    image_rows: list[int]
    pixels: np.ndarray | tuple[np.ndarray, ...]
    out: list[int] = dataclasses.field(default_factory=list)
    finish: str | None = None
    label: str | None = None
    error: str | None = None
    grids: tuple[tuple[int, int, int], ...] = ()
    rope: np.ndarray | None = None
    rope_delta: int = 0

    @classmethod
    def prepare(cls, req: Request, config: LMMConfig, tokenizer) -> "RequestState":
        if req.messages is None and (not isinstance(req.prompt, str) or not req.prompt.strip()):
            raise ValueError(f"prompt must be non-empty text, got {req.prompt!r}")
        if req.messages is not None and req.prompt:
            raise ValueError("give either prompt or messages, not both")
        if req.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {req.max_tokens}")
        if req.temperature < 0 or not 0 < req.top_p <= 1:
            raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got {req.temperature}, {req.top_p}")
        v = config.vision
        if req.videos and (not config.is_qwen or tokenizer.video_id is None):
            raise ValueError(f"{config.name} takes no video; got {len(req.videos)} clips")
        _check_clips(req.videos)
        if req.messages is None:
            ids = tokenizer.prompt_ids(req.prompt, len(req.images), len(req.videos))
        else:
            ids = tokenizer.chat_prompt(list(req.messages))
            for kind, token, given in (("image", tokenizer.image_id, len(req.images)),
                                       ("video", tokenizer.video_id, len(req.videos))):
                if token is not None and ids.count(token) != given:
                    raise ValueError(f"the messages have {ids.count(token)} {kind} parts but {given} {kind}s "
                                     "were given")
        if not config.is_qwen:
            pixels = preprocess_batch(list(req.images), size=v.image_size, mean=v.image_mean, std=v.image_std)
            return cls._with_ids(req, tokenizer.expand_image_tokens(ids, config.tokens_per_image), config, tokenizer,
                                 pixels=pixels)
        # (patches, grid, seconds per frame pair: None for an image) in the order of their placeholders
        images, clips, media = iter(req.images), iter(req.videos), []
        for t in ids:
            if t == tokenizer.image_id:
                media.append((*qwen_patches(next(images), v), None))
            elif t == tokenizer.video_id:
                clip = next(clips)
                media.append((*qwen_patches(list(clip.frames), v), v.temporal_patch_size / clip.fps))
        counts = iter([t * h * w // v.spatial_merge_size ** 2 for _, (t, h, w), _ in media])
        placeholders = (tokenizer.image_id, tokenizer.video_id)
        ids = [x for t in ids for x in ([t] * next(counts) if t in placeholders else [t])]
        rope, delta = mrope_positions(ids, tokenizer.image_id, tokenizer.video_id, v,
                                      image_grids=[g for _, g, s in media if s is None],
                                      video_grids=[g for _, g, s in media if s is not None],
                                      video_seconds=[s for _, _, s in media if s is not None],
                                      scaled_time=config.family == "qwen2_5_vl")
        return cls._with_ids(req, ids, config, tokenizer, pixels=tuple(m[0] for m in media),
                             grids=tuple(m[1] for m in media), rope=rope, rope_delta=delta)

    @classmethod
    def _with_ids(cls, req: Request, ids: list[int], config: LMMConfig, tokenizer, **media) -> "RequestState":
        """The state of a request of prompt `ids` (media placeholders expanded), its image rows
        numbering the media tokens in order; ValueError when it overflows the context."""
        if len(ids) + req.max_tokens > config.text.max_position:
            raise ValueError(f"prompt of {len(ids)} tokens + max_tokens {req.max_tokens} exceeds the "
                             f"context of {config.text.max_position} tokens")
        is_media = np.isin(ids, [t for t in (tokenizer.image_id, tokenizer.video_id) if t is not None])
        rows = np.where(is_media, np.cumsum(is_media) - 1, -1)
        return cls(req, ids, rows.tolist(), **media)

    def rope_positions(self, start: int, n: int) -> np.ndarray | None:
        """M-RoPE positions [n, 3] of tokens start..start+n-1 (the prompt's, then each later
        token's index + rope_delta on every axis), or None for a model without them."""
        if self.rope is None:
            return None
        later = np.arange(max(start, len(self.rope)), start + n) + self.rope_delta
        return np.concatenate([self.rope[start: start + n], np.repeat(later[:, None], 3, axis=1)]).astype(np.int32)

    @property
    def tokens(self) -> list[int]:
        """Prompt and generated ids so far."""
        return self.prompt_ids + self.out

    def append(self, token: int, tokenizer) -> None:
        """Record a sampled token, setting `finish` when a stop rule fires (stop ids are not kept)."""
        req = self.request
        if token in tokenizer.stop_ids and not req.ignore_eos:
            self.finish = "stop"
            return
        self.out.append(token)
        if req.stop and any(s in tokenizer.decode(self.out) for s in req.stop):
            self.finish = "stop"
        elif len(self.out) >= req.max_tokens:
            self.finish = "length"

    def completion(self, tokenizer) -> Completion:
        if self.label is not None:
            return Completion(self.label, (), "stop", len(self.prompt_ids), label=self.label)
        text = tokenizer.decode(self.out)
        for s in self.request.stop:
            if s in text:
                text = text[: text.index(s)]
        return Completion(text, tuple(self.out), self.finish or "length", len(self.prompt_ids), error=self.error)


def _check_clips(clips: Sequence[Any]) -> None:
    for i, clip in enumerate(clips):
        if not isinstance(clip, Clip):
            raise ValueError(f"videos[{i}] must be a Clip, got {type(clip).__name__}")
        if isinstance(clip.fps, bool) or not isinstance(clip.fps, (int, float)) or not 0 < clip.fps <= 240:
            raise ValueError(f"videos[{i}].fps must be a number in (0, 240], got {clip.fps!r}")
        if not 1 <= len(clip.frames) <= MAX_CLIP_FRAMES:
            raise ValueError(f"videos[{i}] has {len(clip.frames)} frames; a clip has 1 to {MAX_CLIP_FRAMES}")
