"""Request bodies of the OpenAI-compatible API and their translation into engine Requests.

Bodies are validated strictly with pydantic: a field the server does not implement (tools,
response_format, logit_bias, ...) is a 400 naming it, values are not coerced ("8" is not a
number, "yes" not a boolean), NaN/inf are refused; anything a client can get wrong raises
`APIError` with the HTTP status and OpenAI error type to answer.
Images come from `image_url` parts: `data:image/png|jpeg;base64,...` URLs, or `file://` URLs
inside the configured media roots; remote URLs are never fetched. Each image is checked for
its encoded size and, from its header before decoding, its pixel count. Videos (models of the
Qwen-VL family) come from `video_url` parts the same way (`data:video/<type>;base64,...` or
`file://`), decoded with PyAV and sampled at `Limits.video_fps` frames a second.

A conversation goes to the engine as chat messages in the tokenizer's format, each image (video)
part becoming an image (video) placeholder where it stands ("developer" turns count as "system").
"""

import base64
import binascii
import dataclasses
import io
import re
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import unquote, urlparse

from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from valora_jax.image import load_image
from valora_jax.request import Clip, Request


@dataclasses.dataclass(frozen=True)
class Limits:
    """What one request may ask for."""

    max_body_bytes: int = 32 << 20
    """Largest HTTP request body."""
    max_image_bytes: int = 16 << 20
    """Largest encoded image (after base64 decoding)."""
    max_image_pixels: int = 4096 * 4096
    """Largest width * height of an image, checked from its header before decoding."""
    max_images: int = 8
    """Most images in one request."""
    max_videos: int = 2
    """Most videos in one request."""
    max_video_bytes: int = 64 << 20
    """Largest encoded video (after base64 decoding)."""
    max_video_frames: int = 128
    """Most frames sampled from one video (a longer video is refused)."""
    video_fps: float = 2.0
    """Frames a second sampled from a video."""
    default_max_tokens: int = 256
    """max_tokens when a request sets none (capped by the context left after the prompt)."""


class APIError(Exception):
    """An error answered in OpenAI's format: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", *,
                 code: str | None = None, param: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type, code, param
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# bodies ------------------------------------------------------------------------------------------
class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class ImageURL(_Body):
    url: str
    detail: str | None = None


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ImagePart(_Body):
    type: Literal["image_url"]
    image_url: ImageURL


class VideoURL(_Body):
    url: str


class VideoPart(_Body):
    type: Literal["video_url"]
    video_url: VideoURL


class Message(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[Annotated[TextPart | ImagePart | VideoPart, Field(discriminator="type")]] | None = None
    name: str | None = None               # the participant's name (accepted, not used)


class StreamOptions(_Body):
    include_usage: bool = False


class _Sampling(_Body):
    """Fields shared by chat and text completions (OpenAI's defaults: temperature 1, top_p 1)."""

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = Field(None, ge=-(2 ** 63), lt=2 ** 64)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    user: str | None = None               # the end user's id (accepted, not used)
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0

    @field_validator("frequency_penalty", "presence_penalty")
    @classmethod
    def _no_penalty(cls, value: float, info) -> float:
        if value != 0:
            raise ValueError(f"{info.field_name} is not supported (only 0), got {value}")
        return value

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n: int) -> int:
        if n != 1:
            raise ValueError(f"only n=1 is supported, got {n}")
        return n

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, stop):
        items = [stop] if isinstance(stop, str) else stop or []
        if len(items) > 4 or any(not s for s in items):
            raise ValueError(f"stop must be at most 4 non-empty strings, got {stop!r}")
        return stop

    @property
    def stops(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())


class ChatRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, logprobs):
        if logprobs:
            raise ValueError("logprobs are not supported")
        return logprobs


class CompletionRequest(_Sampling):
    prompt: str | list[str]
    logprobs: int | None = None
    echo: bool = False

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, prompt):
        if isinstance(prompt, list) and len(prompt) != 1:
            raise ValueError(f"exactly one prompt is supported, got {len(prompt)}")
        return prompt

    @field_validator("logprobs", "echo")
    @classmethod
    def _unsupported(cls, value, info):
        if value:
            raise ValueError(f"{info.field_name} is not supported")
        return value


ADAPTER_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
"""What an adapter loaded at run time may be called: no spaces, control or path characters."""


class LoadAdapterRequest(_Body):
    lora_name: str = Field(pattern=ADAPTER_NAME)
    lora_path: str = Field(min_length=1, max_length=4096)


class UnloadAdapterRequest(_Body):
    lora_name: str = Field(min_length=1, max_length=128)


def parse(model: type[BaseModel], data) -> BaseModel:
    """Validate a decoded JSON body; APIError 400 naming the first problem."""
    try:
        return model.model_validate(data)
    except ValidationError as e:
        err = e.errors(include_url=False, include_input=False)[0]
        where = ".".join(str(x) for x in err["loc"]) or "body"
        raise APIError(400, f"{where}: {err['msg']}"[:500], param=where) from None


# translation -------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class MediaURLs:
    """The URLs of a request's image and video parts, each kind in order."""

    images: tuple[str, ...] = ()
    videos: tuple[str, ...] = ()


def chat_messages(messages: list[Message]) -> tuple[list[dict], MediaURLs]:
    """(the conversation in the tokenizer's chat format, its image and video URLs)."""
    converted, images, videos = [], [], []
    for m in messages:
        if isinstance(m.content, str) or m.content is None:
            content = m.content or ""
        else:
            content = []
            for p in m.content:
                if isinstance(p, ImagePart):
                    images.append(p.image_url.url)
                    content.append({"type": "image"})
                elif isinstance(p, VideoPart):
                    videos.append(p.video_url.url)
                    content.append({"type": "video"})
                else:
                    content.append({"type": "text", "text": p.text})
        converted.append({"role": "system" if m.role == "developer" else m.role, "content": content})
    return converted, MediaURLs(tuple(images), tuple(videos))


def make_request(body: _Sampling, images: list, adapter: str | None, seed: int, tokenizer, config,
                 limits: Limits, *, prompt: str = "", messages: list[dict] | None = None,
                 videos: tuple[Clip, ...] = ()) -> Request:
    """The engine Request for a text `prompt` or chat `messages`; max_tokens defaults to
    limits.default_max_tokens within the context left (counting each image at the model's
    largest, and each video's frame pairs as images)."""
    max_tokens = getattr(body, "max_completion_tokens", None) or body.max_tokens
    if max_tokens is None:
        ids = tokenizer.prompt_ids(prompt, len(images)) if messages is None else tokenizer.chat_prompt(messages)
        n = len(tokenizer.expand_image_tokens(ids, config.tokens_per_image)) + sum(
            -(-len(clip.frames) // 2) * config.tokens_per_image for clip in videos)
        left = config.text.max_position - n
        if left < 1:
            raise APIError(400, f"prompt of {n} tokens fills the context of {config.text.max_position} tokens",
                           code="context_length_exceeded")
        max_tokens = min(limits.default_max_tokens, left)
    return Request(prompt, images, adapter=adapter, max_tokens=max_tokens, messages=messages, videos=videos,
                   temperature=1.0 if body.temperature is None else body.temperature,
                   top_p=1.0 if body.top_p is None else body.top_p, seed=seed % 2 ** 32, stop=body.stops)


# images ------------------------------------------------------------------------------------------
_DATA_URL = re.compile(r"data:(image/(?:png|jpeg|jpg));base64,(.*)", re.DOTALL)
_FORMATS = ("PNG", "JPEG")


_VIDEO_DATA_URL = re.compile(r"data:(video/[a-zA-Z0-9.+-]+);base64,(.*)", re.DOTALL)


def load_image_url(url: str, limits: Limits, media_roots: tuple[Path, ...] = ()) -> Image.Image:
    """Decode one image_url (data URL, or file:// inside a media root) into an RGB image."""
    return decode_image(_url_bytes(url, "image", _DATA_URL, "data:image/png|jpeg;base64,...", limits.max_image_bytes,
                                   media_roots), limits)


def load_video_url(url: str, limits: Limits, media_roots: tuple[Path, ...] = ()) -> Clip:
    """Decode one video_url (data URL, or file:// inside a media root) into a Clip of frames
    sampled at limits.video_fps."""
    return decode_video(_url_bytes(url, "video", _VIDEO_DATA_URL, "data:video/<type>;base64,...",
                                   limits.max_video_bytes, media_roots), limits)


def _url_bytes(url: str, kind: str, data_url: re.Pattern, form: str, max_bytes: int,
               media_roots: tuple[Path, ...]) -> bytes:
    """The bytes an image or video URL names: a base64 data URL of `form`, or a file:// URL inside
    a media root (remote URLs are never fetched); APIError 400 / 413 otherwise."""
    if url.startswith("data:"):
        match = data_url.fullmatch(url)
        if match is None:
            raise APIError(400, f"{kind} data URL must be {form}; got {url[:40]!r}...")
        encoded = match.group(2)
        if len(encoded) * 3 // 4 > max_bytes + 3:
            raise APIError(413, f"{kind} of about {len(encoded) * 3 // 4} bytes exceeds the limit of {max_bytes} bytes")
        try:
            return base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError) as e:
            raise APIError(400, f"{kind} data URL is not valid base64: {e}") from None
    if url.startswith("file://"):
        return _read_local(unquote(urlparse(url).path), kind, max_bytes, media_roots)
    if re.match(r"[a-zA-Z][a-zA-Z0-9+.-]*://", url):
        raise APIError(400, f"remote {kind} URLs are not fetched: {url[:80]!r}; send a base64 data URL")
    raise APIError(400, f"{kind}_url must be a data URL or a file:// URL, got {url[:80]!r}")


def _read_local(path: str, kind: str, max_bytes: int, media_roots: tuple[Path, ...]) -> bytes:
    """The bytes of a local image or video, only if it resolves inside one of the media roots."""
    resolved = Path(path).resolve()
    if not any(resolved.is_relative_to(root.resolve()) for root in media_roots):
        raise APIError(400, f"local {kind} {path!r} is outside the allowed media roots "
                            f"({[str(r) for r in media_roots] or 'none configured'})")
    if not resolved.is_file():
        raise APIError(400, f"local {kind} {path!r} is not a file")
    try:
        size = resolved.stat().st_size
        if size > max_bytes:
            raise APIError(413, f"{kind} {path!r} of {size} bytes exceeds the limit of {max_bytes} bytes")
        return resolved.read_bytes()
    except OSError as e:
        raise APIError(400, f"cannot read local {kind} {path!r}: {e.strerror}") from None


def decode_video(data: bytes, limits: Limits) -> Clip:
    """Video bytes (any container and codec FFmpeg reads) -> a Clip of RGB frames, one every
    1 / limits.video_fps seconds from the first; its frame size is checked before decoding."""
    if len(data) > limits.max_video_bytes:
        raise APIError(413, f"video of {len(data)} bytes exceeds the limit of {limits.max_video_bytes} bytes")
    try:
        import av
    except ImportError:
        raise APIError(400, "this server cannot decode videos: it needs PyAV (pip install 'valora-jax[video]')")
    frames, next_time = [], 0.0
    try:
        with av.open(io.BytesIO(data)) as container:
            if not container.streams.video:
                raise APIError(400, "the video has no video stream")
            stream = container.streams.video[0]
            w, h = stream.codec_context.width, stream.codec_context.height
            if w * h > limits.max_image_pixels:
                raise APIError(413, f"video frames are {w}x{h} = {w * h} pixels, more than the limit of "
                                    f"{limits.max_image_pixels}")
            for frame in container.decode(stream):
                time = frame.time if frame.time is not None else next_time
                if time + 1e-6 < next_time:
                    continue
                if len(frames) == limits.max_video_frames:
                    raise APIError(413, f"video longer than {limits.max_video_frames} frames at {limits.video_fps} "
                                        f"a second ({limits.max_video_frames / limits.video_fps:g} s)")
                frames.append(frame.to_ndarray(format="rgb24"))
                next_time = len(frames) / limits.video_fps
    except APIError:
        raise
    except Exception as e:     # FFmpeg raises many types for garbage input
        raise APIError(400, f"not a readable video ({len(data)} bytes): {e}") from None
    if not frames:
        raise APIError(400, "the video has no frames")
    return Clip(tuple(frames), limits.video_fps)


def decode_image(data: bytes, limits: Limits) -> Image.Image:
    """PNG/JPEG bytes -> RGB image; the pixel count is checked from the header before decoding."""
    if len(data) > limits.max_image_bytes:
        raise APIError(413, f"image of {len(data)} bytes exceeds the limit of {limits.max_image_bytes} bytes")
    try:
        with Image.open(io.BytesIO(data)) as probe:
            (w, h), fmt = probe.size, probe.format
    except Image.DecompressionBombError:
        raise APIError(413, "image has too many pixels (decompression bomb)") from None
    except Exception as e:     # Pillow raises many types for garbage input
        raise APIError(400, f"not a readable image ({len(data)} bytes): {e}") from None
    if fmt not in _FORMATS:
        raise APIError(400, f"image format {fmt} is not supported; send PNG or JPEG")
    if w * h > limits.max_image_pixels:
        raise APIError(413, f"image is {w}x{h} = {w * h} pixels, more than the limit of {limits.max_image_pixels}")
    try:
        return load_image(data, max_pixels=limits.max_image_pixels)
    except ValueError as e:
        raise APIError(400, str(e)) from None
    except Exception as e:
        raise APIError(400, f"corrupt image data: {e}") from None
