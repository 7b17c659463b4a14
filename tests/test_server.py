"""The HTTP server on the micro model, through a real uvicorn server on 127.0.0.1: the official
`openai` client (images, streaming, adapters by model name, models, runtime adapter loading),
property-based fuzzing of every endpoint, limits, overload, disconnects, auth and shutdown."""

import asyncio
import base64
import contextlib
import dataclasses
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from PIL import Image

from conftest import micro_config, random_image
from serve.api_schema import Limits
from serve.config import EngineConfig
from serve.engine import Engine
from serve.server import Server, create_app
from serve.service import EngineService
from valora_jax import (AdapterPool, ModelRunner, Request, TaskHead, init_model, random_adapter,
                        save_adapter, save_model)

BASE = "valora-tiny"
ENGINE = EngineConfig(max_rows=8, token_budget=128, prefill_chunk=64, num_pages=128, max_queue=4)
LIMITS = Limits(max_body_bytes=1 << 20, max_image_bytes=256 << 10)
FUZZ = settings(max_examples=40, deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _serving(app):
    """A uvicorn server for `app` on a free loopback port, in a thread; yields (server, url)."""
    server = Server(app, "127.0.0.1", _free_port(), log_level="warning", graceful_timeout=30)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.02)
    try:
        yield server, f"http://127.0.0.1:{server.config.port}"
    finally:
        server.shutdown_soon()
        thread.join(30)
        assert not thread.is_alive()


def _encoded(pixels: np.ndarray, format: str = "PNG") -> bytes:
    """The image encoded as PNG (or `format`)."""
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format)
    return buf.getvalue()


def _data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def _chat(model: str, text: str, images=(), **kw) -> dict:
    parts = [{"type": "image_url", "image_url": {"url": u}} for u in images] + [{"type": "text", "text": text}]
    return {"model": model, "messages": [{"role": "user", "content": parts}], **kw}


@dataclasses.dataclass
class Stack:
    runner: ModelRunner
    service: EngineService
    url: str
    adapter_root: Path
    media_root: Path
    expected: dict

    def client(self, **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0, timeout=60, **kw)

    def http(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=60)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """One server for the module: the micro model with adapter task0 and task-head adapter counter."""
    config = micro_config()
    runner = ModelRunner(init_model(config, seed=1))
    pool = AdapterPool(config, runner.module_shapes, runner.write_slot)
    pool.register(random_adapter(config, runner.module_shapes, "task0", 4, seed=10, std=0.2))
    rng = np.random.default_rng(1)
    head = TaskHead(rng.standard_normal((config.text.hidden_size, 3)).astype(np.float32), np.zeros(3, np.float32),
                    ("zero", "one", "many"))
    pool.register(dataclasses.replace(pool.get("task0"), name="counter", head=head))
    image, engine = random_image(1), Engine(runner, pool, config=ENGINE)
    expected = {                      # the engine driven directly, before the server owns it
        "image": engine.generate([Request("what is it?", [image], max_tokens=6)])[0],
        "task0": engine.generate([Request("hello", adapter="task0", max_tokens=6)])[0],
        "counter": engine.generate([Request("how many?", [image], adapter="counter")])[0],
    }
    adapter_root, media_root = tmp_path_factory.mktemp("adapters"), tmp_path_factory.mktemp("media")
    (media_root / "img.png").write_bytes(_encoded(image))
    service = EngineService(engine)
    app = create_app(service, adapter_root=adapter_root, media_roots=(media_root,), limits=LIMITS)
    with _serving(app) as (_, url):
        yield Stack(runner, service, url, adapter_root, media_root, expected)


@contextlib.contextmanager
def _engine_held(service: EngineService):
    """Block the engine thread (as a long step would) until the block exits."""
    release, held = threading.Event(), threading.Event()
    service.call(lambda engine: (held.set(), release.wait(30)))
    assert held.wait(30)
    try:
        yield
    finally:
        release.set()


def _wait_commands(service: EngineService, n: int) -> None:
    """Wait until n commands queue behind a held engine thread."""
    deadline = time.monotonic() + 30
    while len(service._commands) < n:
        assert time.monotonic() < deadline, f"{len(service._commands)} of {n} commands arrived"
        time.sleep(0.01)


def _finished(stack, reason: str) -> float:
    text = stack.http().get("/metrics").text
    line = f'valora_requests_finished_total{{finish_reason="{reason}"}}'
    return sum(float(row.split()[-1]) for row in text.splitlines() if row.startswith(line))


# the openai client -------------------------------------------------------------------------------
def test_chat_with_an_image_equals_the_engine_alone(stack):
    want = stack.expected["image"]
    out = stack.client().chat.completions.create(
        model=BASE, max_tokens=6, temperature=0, seed=0,
        messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": _data_url(_encoded(random_image(1)))}},
            {"type": "text", "text": "what is it?"}]}])
    assert out.choices[0].message.content == want.text and out.choices[0].message.role == "assistant"
    assert out.choices[0].finish_reason == ("length" if want.finish_reason == "length" else "stop")
    assert out.usage.prompt_tokens == want.prompt_tokens and out.usage.completion_tokens == len(want.token_ids)
    assert out.model == BASE and out.id.startswith("chatcmpl-")


def test_local_image_under_a_media_root(stack):
    body = _chat(BASE, "what is it?", [f"file://{stack.media_root / 'img.png'}"], max_tokens=6, temperature=0,
                 seed=0)
    r = stack.http().post("/v1/chat/completions", json=body)
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == stack.expected["image"].text
    outside = stack.media_root / ".." / stack.adapter_root.name
    r = stack.http().post("/v1/chat/completions", json=_chat(BASE, "x", [f"file://{outside}/img.png"]))
    assert r.status_code == 400 and "outside the allowed media roots" in r.json()["error"]["message"]


def test_streaming_matches_the_whole_answer(stack):
    client = stack.client()
    kw = dict(model="task0", max_tokens=6, temperature=0, seed=0, messages=[{"role": "user", "content": "hello"}])
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == stack.expected["task0"].text == client.chat.completions.create(**kw).choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    assert chunks[-1].usage.completion_tokens == len(stack.expected["task0"].token_ids)
    with stack.http().stream("POST", "/v1/chat/completions", json={**kw, "stream": True}) as r:
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines)


def test_adapter_chosen_by_model_and_task_head_answers_its_label(stack):
    client = stack.client()
    out = client.chat.completions.create(model="task0", max_tokens=6, temperature=0,
                                         messages=[{"role": "user", "content": "hello"}])
    assert out.choices[0].message.content == stack.expected["task0"].text
    image = _data_url(_encoded(random_image(1)))
    for stream in (False, True):
        msgs = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image}},
                                             {"type": "text", "text": "how many?"}]}]
        out = client.chat.completions.create(model="counter", messages=msgs, stream=stream)
        content = "".join(c.choices[0].delta.content or "" for c in out if c.choices) if stream \
            else out.choices[0].message.content
        assert content == stack.expected["counter"].label
    with pytest.raises(openai.NotFoundError, match="nope"):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])


def test_text_completions_and_stop_strings(stack):
    client = stack.client()
    out = client.completions.create(model=BASE, prompt="hello", max_tokens=8, temperature=0)
    assert out.object == "text_completion" and out.usage.completion_tokens <= 8
    text = out.choices[0].text
    assert len(text) >= 3 and text.find(text[1:3]) == 1 and "zz" not in text      # (greedy, fixed weights)
    kw = dict(model=BASE, prompt="hello", max_tokens=8, temperature=0, stop=["zz", text[1:3]])
    stopped = client.completions.create(**kw)
    assert stopped.choices[0].text == text[:1] and stopped.choices[0].finish_reason == "stop"
    streamed = client.completions.create(**kw, stream=True)      # a partial stop string is held back
    assert "".join(c.choices[0].text for c in streamed if c.choices) == text[:1]


def test_models_lists_base_and_adapters(stack):
    ids = [m.id for m in stack.client().models.list()]
    assert ids[0] == BASE and {"task0", "counter"} <= set(ids)


def test_adapters_loaded_replaced_and_unloaded_at_run_time(stack, capfd):
    """Loads, replacements and unloads at run time, with no checkpoint-reader noise on stderr."""
    config, shapes = stack.runner.config, stack.runner.module_shapes
    for i in (1, 2):
        save_adapter(stack.adapter_root / f"dyn{i}", random_adapter(config, shapes, f"dyn{i}", 8, seed=40 + i, std=0.3))
    http, client = stack.http(), stack.client()

    def load(name, path):
        return http.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": path})

    def ask(model):
        return client.chat.completions.create(model=model, max_tokens=8, temperature=0,
                                              messages=[{"role": "user", "content": "hi"}]).choices[0].message.content

    assert load("live", "dyn1").status_code == 200
    assert "live" in [m.id for m in client.models.list()]
    first = ask("live")
    r = load("live", str(stack.adapter_root / "dyn2"))                  # absolute paths inside the root work
    assert r.status_code == 200 and "replaced" in r.text
    assert load("other", "dyn2").status_code == 200
    assert ask("live") == ask("other") != first
    # unloading while a request uses the adapter is refused with 409; afterwards it succeeds
    with _engine_held(stack.service):
        pending = threading.Thread(target=ask, args=("other",))
        pending.start()
        _wait_commands(stack.service, 1)
        result = {}
        unload = threading.Thread(target=lambda: result.update(
            r=http.post("/v1/unload_lora_adapter", json={"lora_name": "other"})))
        unload.start()
        _wait_commands(stack.service, 2)
    unload.join(30), pending.join(30)
    assert result["r"].status_code == 409 and "Retry-After" in result["r"].headers
    for name in ("live", "other"):
        assert http.post("/v1/unload_lora_adapter", json={"lora_name": name}).status_code == 200
    assert http.post("/v1/unload_lora_adapter", json={"lora_name": "live"}).status_code == 404
    with pytest.raises(openai.NotFoundError):
        ask("live")
    # paths outside the adapter root are refused, also through a symlink
    (stack.adapter_root / "escape").symlink_to(stack.media_root, target_is_directory=True)
    for path in ("../x", "/etc", "escape", "dyn1/../../x", str(stack.media_root)):
        r = load("bad", path)
        assert r.status_code == 400 and "outside the adapter root" in r.json()["error"]["message"], path
    assert load("bad", "missing").status_code == 404
    (stack.adapter_root / "empty").mkdir()
    assert load("bad", "empty").status_code == 400
    assert "Event loop is closed" not in capfd.readouterr().err


# limits, disconnects, overload -------------------------------------------------------------------
def test_limits(stack):
    http = stack.http()
    big = http.post("/v1/chat/completions", content=b"{" + b" " * (2 << 20) + b"}")
    assert big.status_code == 413 and "body" in big.json()["error"]["message"]
    noise = _encoded((np.random.default_rng(0).random((400, 400, 3)) * 255).astype(np.uint8))
    r = http.post("/v1/chat/completions", json=_chat(BASE, "x", [_data_url(noise)]))
    assert r.status_code == 413 and "bytes" in r.json()["error"]["message"]
    png = _encoded(np.zeros((8, 8, 3), np.uint8))              # the IHDR chunk claims 20000 x 20000 pixels
    ihdr = b"IHDR" + (20000).to_bytes(4, "big") * 2 + png[24:29]
    bomb = png[:12] + ihdr + zlib.crc32(ihdr).to_bytes(4, "big") + png[33:]
    r = http.post("/v1/chat/completions", json=_chat(BASE, "x", [_data_url(bomb)]))
    assert r.status_code == 413 and "pixels" in r.json()["error"]["message"]
    r = http.post("/v1/chat/completions", json=_chat(BASE, "x", [_data_url(_encoded(random_image(1)))] * 9))
    assert r.status_code == 400 and "9 images" in r.json()["error"]["message"]
    r = http.post("/v1/chat/completions", json=_chat(BASE, "x", max_tokens=10_000))
    assert r.status_code == 400 and "context" in r.json()["error"]["message"]
    r = http.post("/v1/chat/completions", json=_chat(BASE, "x", ["https://example.com/a.png"]))
    assert r.status_code == 400 and "not fetched" in r.json()["error"]["message"]
    r = http.post("/v1/chat/completions", content=b'{"model": "valora-tiny", "messages": [], "temperature": NaN}')
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize("extra, message", [
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools: Extra inputs are not permitted"),
    ({"tool_choice": "auto"}, "tool_choice: Extra inputs"),
    ({"response_format": {"type": "json_object"}}, "response_format: Extra inputs"),
    ({"top_logprobs": 2}, "top_logprobs: Extra inputs"),
    ({"logprobs": True}, "logprobs are not supported"),
    ({"n": 2}, "only n=1"),
    ({"presence_penalty": 0.5}, "presence_penalty is not supported"),
    ({"max_tokens": "8"}, "max_tokens: Input should be a valid integer"),
    ({"stream": "yes"}, "stream: Input should be a valid boolean"),
    ({"temperature": "0.5"}, "temperature: Input should be a valid number"),
])
def test_fields_not_implemented_or_of_the_wrong_type_are_refused_by_name(stack, extra, message):
    r = stack.http().post("/v1/chat/completions", json={**_chat(BASE, "hi", max_tokens=2), **extra})
    assert r.status_code == 400 and message in r.json()["error"]["message"], r.text


def test_harmless_openai_fields_are_accepted(stack):
    body = {**_chat(BASE, "hi", max_tokens=2), "user": "u-1", "presence_penalty": 0, "frequency_penalty": 0.0}
    body["messages"][0]["name"] = "alice"
    assert stack.http().post("/v1/chat/completions", json=body).status_code == 200


@pytest.mark.parametrize("name", ["bad\nname", "../up", "a b", "x/y", "-lead", "é", "a" * 129])
def test_adapter_names_outside_the_safe_set_are_refused(stack, name):
    r = stack.http().post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": "x"})
    assert r.status_code == 400 and "lora_name" in r.json()["error"]["message"]


def test_client_disconnect_cancels_the_request(stack):
    before = _finished(stack, "cancelled")
    body = _chat(BASE, "go on", max_tokens=400, temperature=1.0, seed=3, stream=True)
    with stack.http().stream("POST", "/v1/chat/completions", json=body) as r:
        next(r.iter_lines())
    deadline = time.monotonic() + 20
    while _finished(stack, "cancelled") == before:
        assert time.monotonic() < deadline, "the request was not cancelled"
        time.sleep(0.05)


def test_a_failing_step_fails_its_requests_and_health_until_a_step_succeeds(stack, monkeypatch):
    """A step that raises fails the requests it held (500 with the error) and /health answers 503
    "failing" (the metrics count it) until a step succeeds again; a stall shows the same way."""
    http, step = stack.http(), stack.runner.sample_step
    failures = lambda: sum(float(r.split()[-1]) for r in http.get("/metrics").text.splitlines()
                           if r.startswith("valora_step_failures_total"))
    before = failures()

    def broken(*args, **kwargs):
        raise RuntimeError("device fault")

    monkeypatch.setattr(stack.runner, "sample_step", broken)
    failed = http.post("/v1/chat/completions", json=_chat(BASE, "hi", max_tokens=3))
    assert failed.status_code == 500 and "device fault" in failed.text
    health = http.get("/health")
    assert health.status_code == 503 and health.json()["status"] == "failing"
    assert "device fault" in health.json()["last_error"]
    deadline = time.monotonic() + 10             # the engine thread moves its counts into the metrics
    while failures() != before + 1:
        assert time.monotonic() < deadline, (failures(), before)
        time.sleep(0.05)
    monkeypatch.setattr(stack.runner, "sample_step", step)
    assert http.post("/v1/chat/completions", json=_chat(BASE, "hi", max_tokens=3)).status_code == 200
    assert http.get("/health").json()["status"] == "ok"
    monkeypatch.setattr(stack.service, "stall_after_s", 0.0)
    with _engine_held(stack.service):              # a step that does not return
        monkeypatch.setattr(stack.service, "_step_started", time.monotonic() - 1.0)
        stalled = http.get("/health")
    assert stalled.status_code == 503 and stalled.json()["status"] == "stalled"


def test_a_step_that_compiles_while_serving_is_counted_and_logged(stack, caplog):
    """A step that compiled a shape start-up did not is counted in /metrics and logged."""
    from serve.metrics import StepMetrics

    metric = lambda name: sum(float(r.split()[-1]) for r in stack.http().get("/metrics").text.splitlines()
                              if r.startswith(name))
    steps, seconds = metric("valora_compiling_steps_total"), metric("valora_compile_seconds_total")
    compiled = StepMetrics(0.0, 2.0, 0.0, "mixture", "task0", 3, 1, 40, 20.0, 2, 1.5)
    with caplog.at_level("WARNING", logger="valora.serve"):
        stack.service.call(lambda engine: engine.step_metrics.append(compiled)).result(10)
        deadline = time.monotonic() + 10
        while metric("valora_compiling_steps_total") != steps + 1:
            assert time.monotonic() < deadline, "the compiling step was not counted"
            time.sleep(0.02)
    assert metric("valora_compile_seconds_total") == seconds + 1.5
    assert "a mixture step of 3 decode and 1 prefill rows compiled for 1.50 s while serving" in caplog.text


def test_a_non_streaming_client_that_gives_up_cancels_its_request_cleanly(stack, monkeypatch):
    """A client that stops waiting for a whole answer cancels its request: the engine counts it
    cancelled and the server answers 499 without raising (no 500)."""
    http, step = stack.http(), stack.runner.sample_step

    def slow(*args, **kwargs):                     # steps of 0.3 s: the answer outlasts the client
        time.sleep(0.3)
        return step(*args, **kwargs)

    monkeypatch.setattr(stack.runner, "sample_step", slow)
    status = lambda code: sum(float(r.split()[-1]) for r in http.get("/metrics").text.splitlines()
                              if r.startswith('valora_http_requests_total{endpoint="/v1/chat/completions",'
                                              f'status="{code}"}}'))
    cancelled, errors, gave_up = _finished(stack, "cancelled"), status(500), status(499)
    body = _chat(BASE, "go on", max_tokens=400, temperature=1.0, seed=5)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{stack.url}/v1/chat/completions", json=body, timeout=httpx.Timeout(30, read=0.5))
    deadline = time.monotonic() + 20
    while _finished(stack, "cancelled") == cancelled or status(499) == gave_up:
        assert time.monotonic() < deadline, "the request was not cancelled with a 499"
        time.sleep(0.05)
    assert status(500) == errors


def test_overload_burst_gets_429_and_every_accepted_request_completes(stack):
    n, before = 10, _finished(stack, "length") + _finished(stack, "stop")

    async def burst():
        async with httpx.AsyncClient(base_url=stack.url, timeout=60) as client:
            return await asyncio.gather(*[client.post("/v1/completions", json={
                "model": BASE, "prompt": "p" * (i + 1), "max_tokens": 3, "temperature": 0}) for i in range(n)])

    with _engine_held(stack.service):
        result = {}
        sender = threading.Thread(target=lambda: result.update(responses=asyncio.run(burst())))
        sender.start()
        _wait_commands(stack.service, ENGINE.max_queue)    # the queue's worth; the others are refused at once
        # admission comes before any work: a request with a broken image is refused for load, not read
        broken = stack.http().post("/v1/chat/completions", json=_chat(BASE, "x", ["data:image/png;base64,!!"]))
        assert broken.status_code == 429
    sender.join(60)
    responses = result["responses"]
    ok = [(i, r) for i, r in enumerate(responses) if r.status_code == 200]
    refused = [r for r in responses if r.status_code == 429]
    assert len(ok) == ENGINE.max_queue and len(refused) == n - ENGINE.max_queue
    assert all(r.headers["Retry-After"] == "1" and r.json()["error"]["type"] == "rate_limit_error" for r in refused)
    # each accepted request got its own answer: prompt lengths differ by one token per request
    lengths = [r.json()["usage"]["prompt_tokens"] - i for i, r in ok]
    assert len(set(lengths)) == 1 and len({r.json()["id"] for _, r in ok}) == len(ok)
    deadline = time.monotonic() + 10
    while _finished(stack, "length") + _finished(stack, "stop") != before + len(ok):
        assert time.monotonic() < deadline, "finished count does not match the accepted requests"
        time.sleep(0.05)


# fuzzing -----------------------------------------------------------------------------------------
_json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2 ** 70), max_value=2 ** 70)
    | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12)
_bad_images = st.sampled_from([
    "data:image/png;base64,!!!not base64!!!", "data:image/png;base64," + base64.b64encode(b"GIF89a junk").decode(),
    "data:image/jpeg;base64," + base64.b64encode(b"\xff\xd8\xff" + b"\x00" * 50).decode(),
    "data:image/png;base64," + base64.b64encode(_encoded(random_image(2))[:60]).decode(),
    "data:text/plain;base64,aGk=", "data:image/png;base64,", "file:///etc/passwd", "file://../../etc/passwd",
    "http://127.0.0.1:1/x.png", "/etc/passwd", "", "data:image/png;base64," + "A" * 400_000,
    "data:image/png;base64," + "A" * 2_000_000,
])
_good_image = _data_url(_encoded(random_image(3)))
_good_jpeg = _data_url(_encoded(random_image(4), "JPEG"), "image/jpeg")
_WILD = st.one_of(st.integers(min_value=-(2 ** 80), max_value=2 ** 80), st.floats(), st.text(max_size=4),
                  _json_values)


@st.composite
def _mutated(draw, valid: dict, wild: dict):
    """A valid body (drawn from `valid`, a field -> strategy dict) with 0 to 2 fields replaced by
    wild values (from `wild`, or any JSON value) or dropped: about a fifth of the bodies stay valid."""
    body = {k: draw(v) for k, v in valid.items()}
    for _ in range(draw(st.sampled_from([1, 2, 0, 1, 2]))):
        key = draw(st.sampled_from(sorted(valid) + sorted(wild)))
        if draw(st.integers(0, 5)) == 0:
            body.pop(key, None)
        else:
            body[key] = draw(wild.get(key, _WILD) | _WILD)
    return body


_text = st.text(min_size=1, max_size=3)                   # valid bodies stay in a few compiled shapes
_good_parts = st.lists(st.sampled_from([_good_image, _good_jpeg]), max_size=1).flatmap(
    lambda urls: _text.map(lambda t: [{"type": "image_url", "image_url": {"url": u}} for u in urls]
                           + [{"type": "text", "text": t}]))
_bad_parts = st.lists(st.one_of(
    st.fixed_dictionaries({"type": st.just("image_url"), "image_url": st.fixed_dictionaries({"url": _bad_images})}),
    st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url", "audio", ""]), "text": _WILD,
                           "image_url": _WILD}),
    _json_values), min_size=1, max_size=3).flatmap(lambda bad: _good_parts.map(lambda good: good + bad))
_bad_messages = st.lists(st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "system", "assistant", "tool", "", 3]),
     "content": st.one_of(_text, _good_parts, _bad_parts, _WILD)}), max_size=3)
_sampling = {"max_tokens": st.integers(1, 4), "temperature": st.floats(0, 2), "top_p": st.floats(0.05, 1),
             "seed": st.integers(-(2 ** 63), 2 ** 64 - 1), "stream": st.booleans(),
             "stop": st.text(min_size=1, max_size=3) | st.lists(st.text(min_size=1, max_size=3), max_size=4)}
_wild_sampling = {"model": st.sampled_from(["nope", "", "../task0", BASE.upper()]) | st.text(max_size=8),
                  "max_tokens": st.integers(-(2 ** 80), 2 ** 80), "n": st.integers(-5, 5),
                  "stop": st.lists(st.text(max_size=3), min_size=5, max_size=6) | st.just(""),
                  "stream_options": st.fixed_dictionaries({"include_usage": _WILD}),
                  "temperature": st.floats(), "top_p": st.floats(), "seed": st.integers(-(2 ** 90), 2 ** 90)}
_chat_bodies = _mutated({"model": st.sampled_from([BASE, "task0", "counter"]),
                         "messages": _good_parts.map(lambda c: [{"role": "user", "content": c}]), **_sampling},
                        {**_wild_sampling, "messages": _bad_messages, "logprobs": st.just(True),
                         "max_completion_tokens": st.integers(-3, 3)})
_completion_bodies = _mutated({"model": st.sampled_from([BASE, "task0"]), "prompt": _text, **_sampling},
                              {**_wild_sampling, "prompt": st.lists(_text, max_size=3) | st.just(""),
                               "echo": st.just(True), "logprobs": st.integers(0, 3)})
_raw = st.one_of(st.binary(max_size=64), st.sampled_from([b"{", b"[" * 100_000, b'{"model": NaN}', b"\xff\xfe",
                                                          b"null", b'"x"', b"1e999999"]),
                 _json_values.map(lambda v: json.dumps(v).encode()))
_POSTS = ["/v1/chat/completions", "/v1/completions", "/v1/load_lora_adapter", "/v1/unload_lora_adapter"]


def _send(http: httpx.Client, path: str, body) -> httpx.Response:
    """POST (raw bytes or a JSON value, capped generation) and check the server answered below 500."""
    if isinstance(body, dict) and path in _POSTS[:2]:        # bound generation: at most 4 tokens unless beyond the context
        max_tokens = body.setdefault("max_tokens", 4)
        if type(max_tokens) is int and 4 < max_tokens <= 10_000:
            body["max_tokens"] = 4
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = http.post(path, content=content, headers={"content-type": "application/json"})
    assert r.status_code < 500, (path, content[:300], r.text[:300])
    if r.status_code >= 400:
        assert set(r.json()["error"]) >= {"message", "type"}, r.text
    return r


def _still_serving(stack) -> None:
    out = stack.client().chat.completions.create(model="task0", max_tokens=6, temperature=0,
                                                 messages=[{"role": "user", "content": "hello"}])
    assert out.choices[0].message.content == stack.expected["task0"].text


def test_fuzz_chat_bodies(stack):
    http = stack.http()

    @FUZZ
    @given(_chat_bodies)
    def run(body):
        _send(http, "/v1/chat/completions", body)

    run()
    _still_serving(stack)


def test_fuzz_completion_bodies(stack):
    http = stack.http()

    @FUZZ
    @given(_completion_bodies)
    def run(body):
        _send(http, "/v1/completions", body)

    run()
    _still_serving(stack)


def test_fuzz_adapter_endpoints_and_path_traversal(stack):
    http = stack.http()
    paths = st.one_of(st.sampled_from(["..", "../..", "/", "/etc", "..%2f..%2fetc", "task0/../../..", "\x00",
                                       "~", "a" * 5000, "."]),
                      st.text(max_size=20), st.lists(st.sampled_from(["..", ".", "x", "/"]), max_size=8).map("".join))
    names = st.one_of(st.sampled_from(["x", BASE, "", "a" * 200]), st.text(max_size=10), _json_values)
    bodies = st.one_of(st.fixed_dictionaries({"lora_name": names, "lora_path": paths | _json_values}), _json_values)

    @FUZZ
    @given(st.sampled_from(_POSTS[2:]), bodies)
    def run(path, body):
        assert _send(http, path, body).status_code != 200

    run()
    assert {"task0", "counter"} <= {m.id for m in stack.client().models.list()}
    _still_serving(stack)


def test_fuzz_raw_bodies_on_every_endpoint(stack):
    http = stack.http()

    @FUZZ
    @given(st.sampled_from(_POSTS), _raw)
    def run(path, body):
        _send(http, path, body)

    run()
    for path in ("/v1/models", "/health", "/metrics", "/nope", "/v1/chat/completions"):
        assert http.get(path).status_code < 500
    _still_serving(stack)


def test_a_precompiling_engine_compiles_a_loaded_adapters_slot_write_as_it_loads(stack):
    """Where the engine precompiles, a run-time adapter of a new layout has its slot write compiled
    off the engine thread before its load returns, so serving it compiles no write; a bad adapter
    is refused by name and compiles nothing."""
    from valora_jax.runtime import compile_seconds_by_function

    runner = stack.runner.twin()
    config = dataclasses.replace(ENGINE, min_rows=ENGINE.max_rows, precompile=True)
    service = EngineService(Engine(runner, AdapterPool(runner.config, runner.module_shapes, runner.write_slot),
                                   config=config))
    writes = lambda: compile_seconds_by_function()["jit(_write_impl)"]
    fresh = random_adapter(runner.config, runner.module_shapes, "fresh", 12, seed=77, std=0.2)   # a new rank
    bad = dataclasses.replace(fresh, name="bad", base_id="another model")
    service.start()
    try:
        before = writes()
        with pytest.raises(ValueError, match="another model"):
            asyncio.run(service.register_adapter(bad))
        assert writes() == before
        assert asyncio.run(service.register_adapter(fresh)) == 1
        compiled = writes()
        assert compiled > before
        service.call(lambda engine: engine.generate([Request("hi", adapter="fresh", max_tokens=2)])).result(120)
        assert writes() == compiled
    finally:
        service.stop(60)


# shutdown, CLI and auth --------------------------------------------------------------------------
def test_graceful_shutdown_finishes_requests_in_flight(stack):
    """A second server on the same runner (base model only, while the first is idle)."""
    pool = AdapterPool(stack.runner.config, stack.runner.module_shapes, stack.runner.write_slot)
    service = EngineService(Engine(stack.runner, pool, config=ENGINE))
    with _serving(create_app(service)) as (server, url):
        http = httpx.Client(base_url=url, timeout=60)
        body = _chat(BASE, "go on", max_tokens=60, temperature=1.0, seed=3, stream=True)
        with http.stream("POST", "/v1/chat/completions", json=body) as r:
            lines = r.iter_lines()
            next(lines)
            service.begin_drain()
            refused = httpx.post(f"{url}/v1/chat/completions", json=_chat(BASE, "late"), timeout=30)
            assert refused.status_code == 503 and httpx.get(f"{url}/health").status_code == 503
            server.should_exit = True
            rest = [line for line in lines if line]
        assert rest[-1] == "data: [DONE]" and json.loads(rest[-2][6:])["choices"][0]["finish_reason"]
    assert not service.alive


@contextlib.contextmanager
def _valora_serve(args: list[str], tmp_path: Path):
    """`valora serve ARGS` in a subprocess on a free loopback port; yields its URL once healthy,
    then stops it with SIGTERM and checks that it shut down cleanly."""
    port = _free_port()
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "VALORA_XLA_CACHE": str(tmp_path / "xla")}
    proc = subprocess.Popen([sys.executable, "-m", "serve.cli", "serve", "--port", str(port), *args], env=env,
                            cwd=Path(__file__).parents[1], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.stdout.read().decode()
            try:
                if httpx.get(f"{url}/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "valora serve did not come up"
            time.sleep(0.2)
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        out = proc.communicate(timeout=30)[0].decode()
    assert proc.returncode in (0, -signal.SIGTERM) and "Application shutdown complete" in out, out


def test_cli_serve_with_api_key_and_max_loras(tmp_path):
    save_model(tmp_path / "model", init_model(micro_config(), seed=2))
    args = ["--model", str(tmp_path / "model"), "--api-key", "sesame", "--max-loras", "2",
            "--adapter-root", str(tmp_path)]
    with _valora_serve(args, tmp_path) as url:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sesame"}):
            r = httpx.get(f"{url}/v1/models", headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
            r = httpx.post(f"{url}/v1/chat/completions", headers=headers, json=_chat(BASE, "hi"))
            assert r.status_code == 401
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).models.list()
        models = openai.OpenAI(base_url=f"{url}/v1", api_key="sesame", max_retries=0).models.list()
        assert [m.id for m in models] == [BASE]
        assert "valora_adapter_slots 2.0" in httpx.get(f"{url}/metrics").text
        for docs in ("/docs", "/redoc", "/openapi.json"):           # with a key, no open documentation
            assert httpx.get(f"{url}{docs}").status_code == 404


def test_cli_serves_an_imported_hugging_face_model_and_peft_adapter(tmp_path):
    from serve.cli import main
    fixtures = Path(__file__).parent / "fixtures" / "hf"
    main(["import-hf", str(fixtures / "llava-gqa"), str(tmp_path / "model"), "--lora-targets", "all"])
    main(["import-peft", str(fixtures / "llava-gqa-lora-qv"), str(tmp_path / "qv"), "--model", str(tmp_path / "model")])
    args = ["--model", str(tmp_path / "model"), "--adapter", f"qv={tmp_path / 'qv'}"]
    image = _data_url(_encoded(random_image(4)))
    with _valora_serve(args, tmp_path) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        names = [m.id for m in client.models.list()]
        assert "qv" in names
        for model in names:
            reply = client.chat.completions.create(   # seeded: a random draw may stop at once
                model=model, max_tokens=4, seed=0, messages=[{"role": "user", "content": [
                    {"type": "image_url", "image_url": {"url": image}}, {"type": "text", "text": "what is it"}]}])
            assert reply.usage.completion_tokens >= 1 and reply.choices[0].finish_reason in ("stop", "length")
