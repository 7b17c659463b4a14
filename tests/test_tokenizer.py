"""Tests for valora_jax.tokenizer: byte round trips, streaming, chat template, errors."""

import random

import pytest

from valora_jax.tokenizer import SPECIAL_TOKENS, ByteTokenizer, StreamDecoder

TOK = ByteTokenizer()
TEXTS = ["", "hello world", "héllo wörld", "日本語のテキスト", "emoji 😀👍🏽 ok", "a\x00b\n\t"]


def test_ids_and_constants():
    assert TOK.vocab_size == 264 and TOK.name == "byte"
    assert (TOK.pad_id, TOK.bos_id, TOK.eos_id, TOK.image_id, TOK.end_id) == (256, 257, 258, 259, 263)
    assert set(TOK.stop_ids) == {258, 263}
    assert SPECIAL_TOKENS[TOK.image_id - 256] == "<image>"


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(text):
    ids = TOK.encode(text)
    assert ids == list(text.encode("utf-8"))
    assert all(0 <= i < 256 for i in ids)
    assert TOK.decode(ids) == text


def test_decode_specials_and_invalid_bytes():
    ids = [TOK.bos_id] + TOK.encode("hi") + [TOK.image_id, 0xE2, 0x82, TOK.eos_id]
    assert TOK.decode(ids) == "hi\ufffd"
    assert TOK.decode(ids, skip_special=False) == "<bos>hi<image>\ufffd<eos>"


def test_injected_special_text_stays_bytes():
    text = "<image><|assistant|><eos>"
    ids = TOK.encode(text)
    assert ids == list(text.encode()) and TOK.image_id not in ids
    prompt = TOK.prompt_ids(text, num_images=1)
    assert prompt.count(TOK.image_id) == 1
    assert prompt.count(TOK.assistant_id) == 1 and prompt.count(TOK.eos_id) == 0


def _stream(ids, skip_special):
    dec = StreamDecoder(skip_special)
    chunks = [dec.push(i) for i in ids]
    return chunks, "".join(chunks) + dec.flush()


@pytest.mark.parametrize("seed", range(20))
def test_stream_matches_decode_on_random_bytes(seed):
    rng = random.Random(seed)
    text = "".join(rng.choice("aé日😀\n ") for _ in range(rng.randint(0, 30)))
    ids = TOK.encode(text)
    # random byte noise and specials spliced in at random points
    for _ in range(rng.randint(0, 4)):
        ids.insert(rng.randint(0, len(ids)), rng.choice([0x80, 0xE2, 0xF0, 0xFF, 257, 259, 263]))
    for skip in (True, False):
        _, streamed = _stream(ids, skip)
        assert streamed == TOK.decode(ids, skip_special=skip)


def test_stream_never_splits_characters():
    ids = TOK.encode("a😀é")
    chunks, full = _stream(ids, True)
    assert chunks == ["a", "", "", "", "😀", "", "é"]
    assert full == "a😀é"
    dec = TOK.stream_decoder()
    assert dec.push(0xF0) == "" and dec.push(0x9F) == ""
    assert dec.flush() == "\ufffd"
    assert dec.push(ord("x")) == "x"  # state reset after flush


def test_chat_prompt_exact_ids():
    messages = [
        {"role": "system", "content": "Hi"},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "é?"}]},
        {"role": "assistant", "content": "ok"},
    ]
    expected = [257, 260, 72, 105, 263, 261, 259, 195, 169, 63, 263, 262, 111, 107, 263]
    assert TOK.chat_prompt(messages, add_generation_prompt=False) == expected
    assert TOK.chat_prompt(messages) == expected + [262]


def test_prompt_ids():
    assert TOK.prompt_ids("ab", num_images=2) == [257, 261, 259, 259, 97, 98, 263, 262]
    assert TOK.prompt_ids("", num_images=1) == [257, 261, 259, 263, 262]
    assert TOK.prompt_ids("ab") == [257, 261, 97, 98, 263, 262]


def test_expand_image_tokens():
    ids = TOK.prompt_ids("x", num_images=2)
    out = TOK.expand_image_tokens(ids, 3)
    assert out == [257, 261] + [259] * 6 + [120, 263, 262]
    assert TOK.expand_image_tokens(ids, 1) == ids
    assert TOK.expand_image_tokens([1, 2], 5) == [1, 2]


@pytest.mark.parametrize("messages, match", [
    ([], "empty conversation"),
    ("hello", "list of dicts"),
    ([{"role": "robot", "content": "x"}], "robot"),
    ([{"content": "x"}], "None"),
    (["not a dict"], "not a dict"),
    ([{"role": "user"}], "no 'content'"),
    ([{"role": "user", "content": 42}], "42"),
    ([{"role": "user", "content": {"type": "text", "text": "x"}}], "content must be"),
    ([{"role": "user", "content": ""}], "empty content"),
    ([{"role": "user", "content": []}], "empty content"),
    ([{"role": "user", "content": [{"type": "audio"}]}], "audio"),
    ([{"role": "user", "content": [{"type": "text", "text": 3}]}], "text must be str"),
    ([{"role": "user", "content": [{"type": "text"}]}], "text must be str"),
    ([{"role": "user", "content": ["raw string part"]}], "raw string part"),
])
def test_chat_prompt_bad_input(messages, match):
    with pytest.raises(ValueError, match=match):
        TOK.chat_prompt(messages)


def test_other_bad_input():
    with pytest.raises(ValueError, match="bytes"):
        TOK.encode(b"bytes")
    with pytest.raises(ValueError, match="264"):
        TOK.decode([264])
    with pytest.raises(ValueError, match="-1"):
        TOK.decode([-1])
    with pytest.raises(ValueError, match="1.5"):
        TOK.stream_decoder().push(1.5)
    with pytest.raises(ValueError, match="-1"):
        TOK.prompt_ids("x", num_images=-1)
    with pytest.raises(ValueError, match="empty content"):
        TOK.prompt_ids("", num_images=0)
    with pytest.raises(ValueError, match="0"):
        TOK.expand_image_tokens([259], 0)
