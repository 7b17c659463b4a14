"""Byte-level tokenizer and chat template for the embedded models (no downloads).

Token ids 0..255 are raw UTF-8 bytes; eight special tokens follow. User text is always
encoded as bytes, so a literal "<image>" typed by a user can never become an image
placeholder. `chat_prompt` renders a conversation as

    <bos> (<|role|> content <|end|>)* [<|assistant|>]

where every image part of a content list emits one `<image>` placeholder; the model
expands each placeholder to its number of patch tokens (`expand_image_tokens`).
"""

from __future__ import annotations

import abc
import codecs
import operator
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

SPECIAL_TOKENS: tuple[str, ...] = (
    "<pad>", "<bos>", "<eos>", "<image>",
    "<|system|>", "<|user|>", "<|assistant|>", "<|end|>",
)
"""Special token strings; token id = 256 + index."""

_NUM_BYTES = 256
_ROLES = ("system", "user", "assistant")

Message = Mapping[str, Any]


class StreamDecoder:
    """Incremental detokenizer: push ids one at a time, get the newly completed text.

    Incomplete UTF-8 sequences are held back until completed, so a multi-byte character
    is never split across chunks; concatenating every `push` and a final `flush` equals
    `ByteTokenizer.decode(all_ids, skip_special)`.
    """

    def __init__(self, skip_special: bool = True):
        self.skip_special = skip_special
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        """Consume one id; return the text it completes ("" while a character is pending)."""
        tid = _check_id(token_id)
        if tid < _NUM_BYTES:
            return self._utf8.decode(bytes((tid,)))
        if self.skip_special:
            return ""
        return self.flush() + SPECIAL_TOKENS[tid - _NUM_BYTES]

    def flush(self) -> str:
        """Emit pending incomplete bytes (as U+FFFD) and reset the byte state."""
        text = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        return text


class ChatTokenizer(abc.ABC):
    """What the generator needs beyond `chat_prompt` and `image_id`, shared by every tokenizer."""

    image_id: int
    video_id: int | None = None
    """The id that marks a clip's placeholder (None: the model takes no video)."""

    @abc.abstractmethod
    def chat_prompt(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> list[int]:
        """Ids of a conversation, one image placeholder per image part."""

    def prompt_ids(self, text: str, num_images: int = 0, num_videos: int = 0) -> list[int]:
        """`chat_prompt` of one user message: `num_images` image parts, `num_videos` video parts,
        then `text`."""
        for name, n in (("num_images", num_images), ("num_videos", num_videos)):
            if isinstance(n, bool) or not isinstance(n, int) or n < 0:
                raise ValueError(f"{name} must be an int >= 0, got {n!r}")
        parts: list[dict[str, Any]] = [{"type": "image"}] * num_images + [{"type": "video"}] * num_videos
        if text:
            parts.append({"type": "text", "text": text})
        return self.chat_prompt([{"role": "user", "content": parts}])

    def expand_image_tokens(self, ids: Iterable[int], tokens_per_image: int | Sequence[int]) -> list[int]:
        """`ids` with every `<image>` id repeated `tokens_per_image` times, or with a sequence,
        the i-th `<image>` id repeated tokens_per_image[i] times (one count per image)."""
        ids = list(ids)
        n_images = ids.count(self.image_id)
        counts = [tokens_per_image] * n_images if isinstance(tokens_per_image, (int, np.integer)) \
            else list(tokens_per_image)
        if len(counts) != n_images:
            raise ValueError(f"{len(counts)} token counts for {n_images} images")
        bad = [c for c in counts if isinstance(c, bool) or not isinstance(c, (int, np.integer)) or c < 1]
        if bad or (isinstance(tokens_per_image, bool)
                   or (isinstance(tokens_per_image, (int, np.integer)) and tokens_per_image < 1)):
            raise ValueError(f"tokens_per_image must be an int >= 1, got {bad[0] if bad else tokens_per_image!r}")
        out: list[int] = []
        images = iter(counts)
        for t in ids:
            out.extend([t] * next(images) if t == self.image_id else [t])
        return out


class ByteTokenizer(ChatTokenizer):
    """UTF-8 byte tokenizer with specials <pad> <bos> <eos> <image> and chat roles."""

    name = "byte"
    vocab_size = _NUM_BYTES + len(SPECIAL_TOKENS)  # 264
    pad_id = 256
    bos_id = 257
    eos_id = 258
    image_id = 259
    system_id = 260
    user_id = 261
    assistant_id = 262
    end_id = 263
    stop_ids: tuple[int, ...] = (eos_id, end_id)
    """Generation stops at any of these ids."""

    _role_ids = {"system": system_id, "user": user_id, "assistant": assistant_id}

    def encode(self, text: str) -> list[int]:
        """UTF-8 bytes of `text` as ids 0..255; never produces special ids."""
        if not isinstance(text, str):
            raise ValueError(f"encode expects str, got {type(text).__name__}: {text!r}")
        return list(text.encode("utf-8"))

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        """Text of `ids` (invalid UTF-8 becomes U+FFFD). Specials are dropped, or
        rendered as their strings (e.g. "<image>") when `skip_special=False`."""
        out: list[str] = []
        run = bytearray()
        for t in ids:
            tid = _check_id(t)
            if tid < _NUM_BYTES:
                run.append(tid)
            elif not skip_special:
                out.append(run.decode("utf-8", errors="replace"))
                out.append(SPECIAL_TOKENS[tid - _NUM_BYTES])
                run.clear()
        out.append(run.decode("utf-8", errors="replace"))
        return "".join(out)

    def stream_decoder(self, skip_special: bool = True) -> StreamDecoder:
        """A fresh `StreamDecoder` consistent with `decode(..., skip_special)`."""
        return StreamDecoder(skip_special)

    def chat_prompt(self, messages: Sequence[Message],
                    add_generation_prompt: bool = True) -> list[int]:
        """Ids of `<bos> (<|role|> content <|end|>)* [<|assistant|>]`.

        messages: dicts {"role": "system"|"user"|"assistant", "content": str | parts};
        parts are {"type": "text", "text": str} or {"type": "image"} (one `<image>` id each).
        Raises ValueError on an empty conversation, unknown role or part type, content of
        the wrong type, or a message whose content is empty.
        """
        if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, Sequence):
            raise ValueError(f"messages must be a list of dicts, got {messages!r}")
        if not messages:
            raise ValueError("empty conversation: messages=[]")
        ids = [self.bos_id]
        for i, msg in enumerate(messages):
            if not isinstance(msg, Mapping):
                raise ValueError(f"message {i} must be a dict, got {msg!r}")
            role = msg.get("role")
            if role not in _ROLES:
                raise ValueError(f"message {i}: unknown role {role!r}; expected one of {_ROLES}")
            if "content" not in msg:
                raise ValueError(f"message {i} has no 'content': {msg!r}")
            body = self._content_ids(msg["content"], i)
            if not body:
                raise ValueError(f"message {i} ({role}) has empty content: {msg['content']!r}")
            ids.append(self._role_ids[role])
            ids.extend(body)
            ids.append(self.end_id)
        if add_generation_prompt:
            ids.append(self.assistant_id)
        return ids

    def _content_ids(self, content: Any, i: int) -> list[int]:
        """Ids of one message's content (str or list of parts)."""
        if isinstance(content, str):
            return self.encode(content)
        if isinstance(content, (bytes, Mapping)) or not isinstance(content, Sequence):
            raise ValueError(f"message {i}: content must be str or list of parts, "
                             f"got {type(content).__name__}: {content!r}")
        ids: list[int] = []
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, Mapping) else None
            if kind == "image":
                ids.append(self.image_id)
            elif kind == "text":
                text = part.get("text")
                if not isinstance(text, str):
                    raise ValueError(f"message {i} part {j}: text must be str, got {text!r}")
                ids.extend(self.encode(text))
            elif isinstance(part, Mapping):
                raise ValueError(f"message {i} part {j}: unknown part type {kind!r}; "
                                 "expected 'text' or 'image'")
            else:
                raise ValueError(f"message {i} part {j} must be a dict, got {part!r}")
        return ids


def _check_id(token_id: Any) -> int:
    """`token_id` as int, or ValueError if it is not a valid id."""
    try:
        tid = operator.index(token_id)
    except TypeError:
        raise ValueError(f"token id must be an int, got {token_id!r}") from None
    if not 0 <= tid < ByteTokenizer.vocab_size:
        raise ValueError(f"token id {tid} out of range [0, {ByteTokenizer.vocab_size})")
    return tid
