"""Video inputs: decoding and sampling (PyAV), the API's video_url parts and their refusals,
clips in requests, and `valora serve` on an imported Qwen2.5-VL answering the openai client
with an image and with a video."""

import base64
import io
import json
from pathlib import Path

import av
import numpy as np
import openai
import pytest
from PIL import Image

from serve.api_schema import APIError, ChatRequest, Limits, chat_messages, decode_video, load_video_url, parse
from valora_jax import Request, tiny
from valora_jax.request import Clip, RequestState
from valora_jax.tokenizer import ByteTokenizer

FIXTURES = Path(__file__).parent / "fixtures" / "hf"


def encode_video(frames: np.ndarray, fps: int = 4) -> bytes:
    """frames [F, H, W, 3] uint8 as an MPEG-4 video in an mp4 container."""
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "yuv420p"
        for pixels in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")))
        container.mux(stream.encode())
    return buffer.getvalue()


def _frames(n: int, size: int = 56, seed: int = 0) -> np.ndarray:
    """n frames, each a distinct flat colour (robust to lossy coding)."""
    levels = np.random.default_rng(seed).integers(30, 220, (n, 3))
    return np.broadcast_to(levels[:, None, None, :], (n, size, size, 3)).astype(np.uint8).copy()


def test_decode_video_samples_two_frames_a_second():
    frames = _frames(8)                                         # 2 s at 4 fps
    clip = decode_video(encode_video(frames, fps=4), Limits())
    assert clip.fps == 2.0 and len(clip.frames) == 4
    for got, want in zip(clip.frames, frames[::2]):            # t = 0, 0.5, 1, 1.5 s
        assert got.shape == (56, 56, 3) and np.abs(got.astype(int) - want).mean() < 6


def test_video_refusals():
    data = encode_video(_frames(8))
    with pytest.raises(APIError, match="longer than 3 frames") as e:
        decode_video(data, Limits(max_video_frames=3))
    assert e.value.status == 413
    with pytest.raises(APIError, match="more than the limit of 100") as e:
        decode_video(data, Limits(max_image_pixels=100))
    assert e.value.status == 413
    with pytest.raises(APIError, match="not a readable video"):
        decode_video(b"\x00" * 64, Limits())
    with pytest.raises(APIError, match="exceeds the limit of 10 bytes"):
        decode_video(data, Limits(max_video_bytes=10))
    with pytest.raises(APIError, match="video data URL must be data:video/<type>;base64"):
        load_video_url("data:image/png;base64,AAAA", Limits())
    with pytest.raises(APIError, match="remote video URLs are not fetched"):
        load_video_url("https://example.com/a.mp4", Limits())
    with pytest.raises(APIError, match="outside the allowed media roots"):
        load_video_url("file:///etc/passwd", Limits())
    url = "data:video/mp4;base64," + base64.b64encode(data).decode()
    assert len(load_video_url(url, Limits()).frames) == 4


def test_video_parts_in_chat_messages():
    body = parse(ChatRequest, {"model": "m", "messages": [{"role": "user", "content": [
        {"type": "video_url", "video_url": {"url": "data:video/mp4;base64,AA"}},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,BB"}},
        {"type": "text", "text": "what happens?"}]}]})
    messages, urls = chat_messages(body.messages)
    assert [p["type"] for p in messages[0]["content"]] == ["video", "image", "text"]
    assert urls.videos == ("data:video/mp4;base64,AA",) and urls.images == ("data:image/png;base64,BB",)
    with pytest.raises(APIError, match="messages.0.content"):          # no fields beyond url
        parse(ChatRequest, {"model": "m", "messages": [{"role": "user", "content": [
            {"type": "video_url", "video_url": {"url": "x", "fps": 3}}]}]})


def test_clips_are_checked_and_refused_by_models_without_video():
    config, tok = tiny(), ByteTokenizer()
    clip = Clip(list(_frames(2)))
    with pytest.raises(ValueError, match="takes no video; got 1 clips"):
        RequestState.prepare(Request("hi", videos=[clip]), config, tok)
    from valora_jax.hf_model import hf_config
    from valora_jax.hf_tokenizer import load_tokenizer
    qwen, qtok = hf_config(FIXTURES / "qwen2_5-vl"), load_tokenizer(FIXTURES / "qwen2_5-vl")
    with pytest.raises(ValueError, match=r"videos\[0\].fps must be a number in \(0, 240\]"):
        RequestState.prepare(Request("hi", videos=[Clip(clip.frames, fps=0)]), qwen, qtok)
    with pytest.raises(ValueError, match=r"videos\[0\] has 0 frames"):
        RequestState.prepare(Request("hi", videos=[Clip([])]), qwen, qtok)
    with pytest.raises(ValueError, match="must be a Clip"):
        RequestState.prepare(Request("hi", videos=[clip.frames]), qwen, qtok)
    with pytest.raises(ValueError, match="the messages have 1 video parts but 0 videos were given"):
        RequestState.prepare(Request(messages=[{"role": "user", "content": [{"type": "video"}]}]), qwen, qtok)
    state = RequestState.prepare(Request("hi", videos=[clip], images=[_frames(1)[0]]), qwen, qtok)
    assert [g[0] for g in state.grids] == [1, 1]                # an image and a clip of one frame pair
    assert state.prompt_ids.count(qtok.video_id) == 4 and state.prompt_ids.count(qtok.image_id) == 4


def test_valora_serve_answers_the_openai_client_with_an_image_and_a_video(tmp_path):
    """The user's path: import the checkpoint, `valora serve --model` it, ask with an image
    (data URL) and with a video (file:// under an allowed media path); the answers are the
    engine's own for the same inputs."""
    from test_server import _valora_serve
    from serve.config import serving_config
    from serve.engine import Engine
    from valora_jax import AdapterPool, ModelRunner, load_model
    from valora_jax.hf_model import import_hf
    from valora_jax.hf_tokenizer import load_tokenizer

    model_dir, media = tmp_path / "qwen", tmp_path / "media"
    import_hf(FIXTURES / "qwen2_5-vl", model_dir)
    media.mkdir()
    video = encode_video(_frames(8, seed=1))
    (media / "clip.mp4").write_bytes(video)
    image = (np.random.default_rng(2).random((60, 90, 3)) * 255).astype(np.uint8)
    png = io.BytesIO()
    Image.fromarray(image).save(png, "PNG")
    parts = {"image": {"type": "image_url", "image_url": {"url": "data:image/png;base64,"
                                                                 + base64.b64encode(png.getvalue()).decode()}},
             "video": {"type": "video_url", "video_url": {"url": f"file://{media / 'clip.mp4'}"}}}
    runner = ModelRunner(load_model(model_dir))
    engine = Engine(runner, AdapterPool(runner.config, runner.module_shapes, runner.write_slot),
                    config=serving_config(runner.config), tokenizer=load_tokenizer(model_dir))
    decoded = Image.open(io.BytesIO(png.getvalue())).convert("RGB")
    expected = {kind: engine.generate([Request(
        messages=[{"role": "user", "content": [{"type": kind}, {"type": "text", "text": "What is it?"}]}],
        images=[decoded] if kind == "image" else [], max_tokens=6,
        videos=[decode_video(video, Limits())] if kind == "video" else [])])[0] for kind in parts}
    with _valora_serve(["--model", str(model_dir), "--allowed-local-media-path", str(media)], tmp_path) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused")
        name = client.models.list().data[0].id
        for kind, part in parts.items():
            answer = client.chat.completions.create(
                model=name, max_tokens=6, temperature=0,
                messages=[{"role": "user", "content": [part, {"type": "text", "text": "What is it?"}]}])
            assert answer.choices[0].message.content == expected[kind].text, kind
            assert answer.usage.prompt_tokens == expected[kind].prompt_tokens
    assert json.loads((model_dir / "config.json").read_text())["family"] == "qwen2_5_vl"
