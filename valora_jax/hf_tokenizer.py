"""Hugging Face tokenizers (tokenizer.json + chat template) behind ByteTokenizer's interface.

`HFTokenizer` encodes with the `tokenizers` library and renders conversations with the
checkpoint's Jinja chat template (sandboxed; trim_blocks / lstrip_blocks as transformers
renders them). Image parts become the checkpoint's image token, which the model expands to
its patch tokens (`expand_image_tokens`). `load_tokenizer(dir)` picks HFTokenizer for HF
and HF-imported model directories and ByteTokenizer for valora's own.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from valora_jax.hf_model import _read_json, hf_metadata
from valora_jax.tokenizer import ByteTokenizer, ChatTokenizer

DEFAULT_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] + ' ' }}{% else %}"
    "{% for part in message['content'] | selectattr('type', 'equalto', 'image') %}{{ image_token + '\\n' }}{% endfor %}"
    "{% for part in message['content'] | selectattr('type', 'equalto', 'text') %}{{ part['text'] + ' ' }}{% endfor %}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
"""LLaVA-1.5's conversation format, used when a checkpoint ships no chat template."""

_SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token")


class HFStreamDecoder:
    """Incremental detokenizer over an HF tokenizer: push ids, get the newly completed text.

    Text is held back while it ends in an incomplete character (U+FFFD); concatenating every
    `push` and a final `flush` equals `HFTokenizer.decode(all_ids, skip_special)`."""

    def __init__(self, tokenizer: HFTokenizer, skip_special: bool = True):
        self._tok, self.skip_special = tokenizer, skip_special
        self._ids: list[int] = []
        self._emitted = ""

    def push(self, token_id: int) -> str:
        self._ids.append(self._tok._check_id(token_id))
        text = self._tok.decode(self._ids, self.skip_special)
        if text.endswith("\ufffd"):
            return ""
        return self._advance(text)

    def flush(self) -> str:
        out = self._advance(self._tok.decode(self._ids, self.skip_special))
        self._ids, self._emitted = [], ""
        return out

    def _advance(self, text: str) -> str:
        new, self._emitted = text[len(self._emitted):], text
        return new


class HFTokenizer(ChatTokenizer):
    """A `tokenizers.Tokenizer` with the checkpoint's chat template, special tokens and image token
    (and video token, for models that take clips).

    image_id / video_id: the ids that mark an image / a clip placeholder; stop_ids: generation
    stops at these (eos ids of generation_config.json / config.json / tokenizer_config.json)."""

    name = "hf"

    def __init__(self, tokenizer, *, image_token: str, chat_template: str | None = None,
                 special_tokens: Mapping[str, str] | None = None, stop_ids: Iterable[int] = (),
                 video_token: str | None = None):
        self._tok = tokenizer
        self.image_token, self.video_token = image_token, video_token
        image_id = tokenizer.token_to_id(image_token)
        if image_id is None:
            raise ValueError(f"image token {image_token!r} is not in the tokenizer's vocabulary")
        self.image_id = image_id
        self.video_id = None if video_token is None else tokenizer.token_to_id(video_token)
        if video_token is not None and self.video_id is None:
            raise ValueError(f"video token {video_token!r} is not in the tokenizer's vocabulary")
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        self.special_tokens = dict(special_tokens or {})
        self.chat_template = chat_template or DEFAULT_CHAT_TEMPLATE
        self._template = _compile(self.chat_template)
        self.stop_ids = tuple(sorted({int(i) for i in stop_ids if 0 <= int(i) < self.vocab_size}))
        eos = self.special_tokens.get("eos_token")
        self.eos_id = tokenizer.token_to_id(eos) if eos else None

    @classmethod
    def from_dir(cls, directory: str | Path) -> HFTokenizer:
        """Read tokenizer.json, tokenizer_config.json / special_tokens_map.json, the chat template
        (chat_template.jinja, chat_template.json or tokenizer_config.json), generation_config.json,
        and the image (and video) token ids from the model's HF config when there is one (else
        "<image>", and no video)."""
        try:
            from tokenizers import Tokenizer
        except ImportError as e:
            raise ImportError("HF tokenizers need the tokenizers package: pip install 'valora-jax[hf]'") from e
        directory = Path(directory)
        path = directory / "tokenizer.json"
        try:
            tok = Tokenizer.from_file(str(path))
        except Exception as e:   # tokenizers raises its own exception type
            raise ValueError(f"{path}: cannot read tokenizer ({e})") from e
        tok_config, special_map = (_read_json(directory / f) if (directory / f).exists() else {}
                                   for f in ("tokenizer_config.json", "special_tokens_map.json"))
        special = {k: _token_text(v) for k, v in {**special_map, **tok_config}.items() if k in _SPECIAL_NAMES and v}
        meta = hf_metadata(directory) or {}
        image_token, video_token = "<image>", None
        for kind, index in (("image", meta.get("image_token_index", meta.get("image_token_id"))),
                            ("video", meta.get("video_token_id"))):
            if index is None:
                continue
            token = tok.id_to_token(index)
            if token is None:
                raise ValueError(f"{directory}: {kind} token id {index} (config {kind}_token_id) is not in {path}")
            image_token, video_token = (token, video_token) if kind == "image" else (image_token, token)
        stop = set(_ids(meta.get("eos_token_id")) + _ids((meta.get("text_config") or {}).get("eos_token_id")))
        if (directory / "generation_config.json").exists():
            stop |= set(_ids(_read_json(directory / "generation_config.json").get("eos_token_id")))
        if special.get("eos_token") and tok.token_to_id(special["eos_token"]) is not None:
            stop.add(tok.token_to_id(special["eos_token"]))
        return cls(tok, image_token=image_token, chat_template=_chat_template(directory, tok_config),
                   special_tokens=special, stop_ids=stop, video_token=video_token)

    # ids <-> text ----------------------------------------------------------------------------
    def _check_id(self, token_id: Any) -> int:
        if isinstance(token_id, bool) or not hasattr(token_id, "__index__"):
            raise ValueError(f"token id must be an int, got {token_id!r}")
        tid = token_id.__index__()
        if not 0 <= tid < self.vocab_size:
            raise ValueError(f"token id {tid} out of range [0, {self.vocab_size})")
        return tid

    def encode(self, text: str) -> list[int]:
        """Ids of `text` without added special tokens (bos/eos come from the chat template)."""
        if not isinstance(text, str):
            raise ValueError(f"encode expects str, got {type(text).__name__}: {text!r}")
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        """Text of `ids`; special tokens dropped unless skip_special=False."""
        return self._tok.decode([self._check_id(t) for t in ids], skip_special_tokens=skip_special)

    def stream_decoder(self, skip_special: bool = True) -> HFStreamDecoder:
        return HFStreamDecoder(self, skip_special)

    # prompts -----------------------------------------------------------------------------------
    def render(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True) -> str:
        """The chat template's text for `messages` (same message format as ByteTokenizer.chat_prompt)."""
        _check_messages(messages, self.image_token, self.video_token)
        return self._template.render(messages=[dict(m) for m in messages], add_generation_prompt=add_generation_prompt,
                                     image_token=self.image_token, video_token=self.video_token,
                                     **self.special_tokens)

    def chat_prompt(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True) -> list[int]:
        """Ids of the rendered conversation; each image (video) part yields one image (video)
        id. The tokenizer's own special tokens (e.g. a leading <s>) are added unless the rendered
        text already starts with the bos token, as transformers' processors do.

        Raises ValueError on malformed messages, text that contains the image or video token, a
        video part for a model without a video token, or a template that does not render one
        token per image and video part."""
        counts = _check_messages(messages, self.image_token, self.video_token)
        text = self.render(messages, add_generation_prompt)
        bos = self.special_tokens.get("bos_token")
        ids = self._tok.encode(text, add_special_tokens=not (bos and text.startswith(bos))).ids
        for kind, token, token_id, n in (("image", self.image_token, self.image_id, counts[0]),
                                         ("video", self.video_token, self.video_id, counts[1])):
            if token is not None and ids.count(token_id) != n:
                raise ValueError(f"the chat template rendered {ids.count(token_id)} {kind} tokens {token!r} for "
                                 f"{n} {kind} parts")
        return ids


def load_tokenizer(directory: str | Path | None) -> HFTokenizer | ByteTokenizer:
    """HFTokenizer for a directory with tokenizer.json; ByteTokenizer for valora's own model
    directories (and None). An HF or HF-imported model directory without tokenizer.json is refused."""
    if directory is None:
        return ByteTokenizer()
    directory = Path(directory)
    if (directory / "tokenizer.json").is_file():
        return HFTokenizer.from_dir(directory)
    if hf_metadata(directory) is not None:
        raise ValueError(f"{directory}: Hugging Face model without tokenizer.json (only the `tokenizers` JSON "
                         "format is read)")
    return ByteTokenizer()


# helpers -------------------------------------------------------------------------------------
def _token_text(value: Any) -> str:
    """A special token as configured: a string or an AddedToken dict {"content": ...}."""
    return value["content"] if isinstance(value, Mapping) else str(value)


def _ids(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, list) else [int(value)]


def _chat_template(directory: Path, tok_config: Mapping[str, Any]) -> str | None:
    """The processor's template (chat_template.jinja / .json) if present, else tokenizer_config.json's."""
    if (directory / "chat_template.jinja").is_file():
        return (directory / "chat_template.jinja").read_text()
    if (directory / "chat_template.json").is_file():
        return _read_json(directory / "chat_template.json").get("chat_template")
    template = tok_config.get("chat_template")
    if isinstance(template, list):          # named templates: [{"name": ..., "template": ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, Mapping)}
        template = named.get("default")
    return template


def _compile(template: str):
    try:
        import jinja2
    except ImportError as e:
        raise ImportError("chat templates need jinja2: pip install 'valora-jax[hf]'") from e
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class _Generation(Extension):
        """{% generation %}...{% endgeneration %} (marks assistant text for training masks): renders its body."""

        tags = {"generation"}

        def parse(self, parser):
            next(parser.stream)
            return parser.parse_statements(("name:endgeneration",), drop_needle=True)

    def raise_exception(message):
        raise ValueError(f"chat template: {message}")

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols, _Generation])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except jinja2.TemplateError as e:
        raise ValueError(f"chat template does not compile: {e}") from e


def _check_messages(messages: Any, image_token: str, video_token: str | None = None) -> tuple[int, int]:
    """Validate a conversation (video parts only where there is a video token); returns its
    numbers of image and video parts."""
    if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, Sequence):
        raise ValueError(f"messages must be a list of dicts, got {messages!r}")
    if not messages:
        raise ValueError("empty conversation: messages=[]")
    images = videos = 0
    for i, msg in enumerate(messages):
        if not isinstance(msg, Mapping):
            raise ValueError(f"message {i} must be a dict, got {msg!r}")
        if not isinstance(msg.get("role"), str) or not msg["role"]:
            raise ValueError(f"message {i}: role must be a non-empty string, got {msg.get('role')!r}")
        content = msg.get("content")
        texts = [content] if isinstance(content, str) else []
        if not isinstance(content, str):
            if isinstance(content, (bytes, Mapping)) or not isinstance(content, Sequence) or not content:
                raise ValueError(f"message {i}: content must be str or a non-empty list of parts, got {content!r}")
            for j, part in enumerate(content):
                kind = part.get("type") if isinstance(part, Mapping) else None
                if kind == "image":
                    images += 1
                elif kind == "video" and video_token is not None:
                    videos += 1
                elif kind == "text" and isinstance(part.get("text"), str):
                    texts.append(part["text"])
                else:
                    video = " or {'type': 'video'}" if video_token is not None else " (this model takes no video)"
                    raise ValueError(f"message {i} part {j}: expected {{'type': 'image'}}{video} or "
                                     f"{{'type': 'text', 'text': str}}, got {part!r}")
        for text in texts:
            for kind, token in (("image", image_token), ("video", video_token)):
                if token is not None and token in text:
                    raise ValueError(f"message {i}: text contains the {kind} token {token!r}; {kind}s are "
                                     f"passed as {kind} parts")
    return images, videos
