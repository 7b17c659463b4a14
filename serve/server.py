"""The OpenAI-compatible HTTP server (FastAPI + uvicorn) over an EngineService.

Endpoints (vLLM's and OpenAI's shapes):
  POST /v1/chat/completions     messages with text and image_url parts; `model` is the base
                                model's name or an adapter's; SSE streaming ending in [DONE]
  POST /v1/completions          text only
  GET  /v1/models               the base model and every loaded adapter
  POST /v1/load_lora_adapter    {"lora_name", "lora_path"}: lora_path inside the adapter root;
                                loading a loaded name replaces it (running requests keep the old version)
  POST /v1/unload_lora_adapter  {"lora_name"}: 409 while requests use the adapter (retry later)
  GET  /metrics                 Prometheus
  GET  /health                  200 while serving; 503 once shutting down, while steps fail or one stalls
Errors use OpenAI's error object: 400 bad request, 401 bad API key, 404 unknown model or
adapter, 409 adapter in use, 413 too large, 429 queue full (Retry-After), 503 shutting down.
With an API key, every /v1 endpoint needs `Authorization: Bearer KEY`.
A client that disconnects cancels its request. On SIGINT/SIGTERM the server stops accepting
requests, finishes the ones in flight, then stops the engine.
"""

import asyncio
import contextlib
import hmac
import json
import logging
import secrets
import time
import uuid
from pathlib import Path

import uvicorn
from fastapi import FastAPI, Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException

from serve.api_schema import (APIError, ChatRequest, CompletionRequest, Limits, LoadAdapterRequest,
                              MediaURLs, UnloadAdapterRequest, chat_messages, load_image_url, load_video_url,
                              make_request, parse)
from serve.engine import AdapterInUse, Overloaded
from serve.service import EngineService, ShuttingDown, UnknownModel
from valora_jax.checkpoint import load_adapter

log = logging.getLogger("valora.serve")

_ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/v1/load_lora_adapter",
              "/v1/unload_lora_adapter", "/metrics", "/health")


def create_app(service: EngineService, *, adapter_root: str | Path | None = None, api_key: str | None = None,
               limits: Limits = Limits(), media_roots: tuple[str | Path, ...] = (),
               retry_after: int = 1) -> FastAPI:
    """The FastAPI app; its lifespan starts the service's engine thread and stops it (after the
    requests in flight finish). adapter_root: the only directory load_lora_adapter reads from
    (None: runtime loading is off); media_roots: directories file:// images may come from."""

    @contextlib.asynccontextmanager
    async def lifespan(app):
        service.start()
        yield
        await asyncio.to_thread(service.stop, 60)

    docs = {} if api_key is None else {"docs_url": None, "redoc_url": None, "openapi_url": None}   # no open docs
    app = FastAPI(title="valora", lifespan=lifespan, **docs)
    app.state.service = service
    roots = tuple(Path(r) for r in media_roots)
    tokenizer, config = service.engine.tokenizer, service.engine.runner.config
    load_lock = asyncio.Lock()

    # errors ---------------------------------------------------------------------------------
    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        return JSONResponse(exc.body(), exc.status, headers=exc.headers)

    @app.exception_handler(HTTPException)
    async def _http_error(request, exc: HTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(APIError(exc.status_code, str(exc.detail), kind).body(), exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, exc: RequestValidationError):
        return JSONResponse(APIError(400, str(exc.errors()[:1])[:500]).body(), 400)

    @app.exception_handler(Exception)
    async def _internal_error(request, exc: Exception):
        log.exception("unhandled error")
        return JSONResponse(APIError(500, f"internal error: {type(exc).__name__}", "server_error").body(), 500)

    # generation -----------------------------------------------------------------------------
    async def _admit(body, urls: MediaURLs, rid: str, **text) -> asyncio.Queue:
        """Admission first (429 while the requests queued and on their way there fill the queue,
        before any image is decoded), then the request prepared and submitted; its event queue."""
        if service.queued + service.admitting >= service.engine.config.max_queue:
            raise APIError(429, f"server overloaded: {service.queued} requests queued and {service.admitting} "
                                "arriving; retry later", "rate_limit_error", headers={"Retry-After": str(retry_after)})
        service.admitting += 1
        try:
            return await _start(await _prepare(body, urls, **text), rid)
        finally:
            service.admitting -= 1

    async def _prepare(body, urls: MediaURLs, **text):
        """The engine Request (text: prompt= or messages=): adapter from `model`, images and
        videos decoded off the event loop."""
        if body.model != service.model_name and body.model not in service.adapters:
            raise APIError(404, f"the model {body.model!r} does not exist; models: "
                                f"{[service.model_name, *service.adapters]}", "not_found_error",
                           code="model_not_found", param="model")
        for kind, given, most in (("images", urls.images, limits.max_images),
                                  ("videos", urls.videos, limits.max_videos)):
            if len(given) > most:
                raise APIError(400, f"{len(given)} {kind} in one request; the limit is {most}")
        if urls.videos and tokenizer.video_id is None:
            raise APIError(400, f"the model {service.model_name!r} takes no video")

        def build():
            images = [load_image_url(u, limits, roots) for u in urls.images]
            videos = tuple(load_video_url(u, limits, roots) for u in urls.videos)
            seed = body.seed if body.seed is not None else secrets.randbelow(2 ** 32)
            try:
                return make_request(body, images, None if body.model == service.model_name else body.model,
                                    seed, tokenizer, config, limits, videos=videos, **text)
            except ValueError as e:
                raise APIError(400, str(e)) from None

        return await asyncio.to_thread(build)

    async def _start(request, rid: str) -> asyncio.Queue:
        """Submit to the engine, mapping its refusals to HTTP errors."""
        try:
            return await service.submit(request, rid)
        except UnknownModel as e:
            raise APIError(404, str(e), "not_found_error", code="model_not_found", param="model") from None
        except Overloaded as e:
            raise APIError(429, f"server overloaded: {e}; retry later", "rate_limit_error",
                           headers={"Retry-After": str(retry_after)}) from None
        except ShuttingDown as e:
            raise APIError(503, str(e), "service_unavailable") from None
        except ValueError as e:
            raise APIError(400, str(e), code="context_length_exceeded" if "context" in str(e) else None) from None
        except asyncio.CancelledError:
            service.cancel(rid)
            raise

    async def _complete(http: HTTPRequest, rid: str, events: asyncio.Queue):
        """Wait for the completion, cancelling the request if the client goes away first."""
        async def collect():
            while True:
                _, completion = await events.get()
                if completion is not None:
                    return completion

        async def disconnected():
            while (await http.receive())["type"] != "http.disconnect":
                pass

        result, gone = asyncio.ensure_future(collect()), asyncio.ensure_future(disconnected())
        try:
            await asyncio.wait({result, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not result.done():          # the client went away first (or this handler was cancelled)
                result.cancel()
                service.cancel(rid)
        if not result.done() or result.cancelled():    # a cancelled task is done only once it has run
            return None
        completion = result.result()
        if completion.finish_reason == "error":
            raise APIError(500, f"request failed: {completion.error}", "server_error")
        return completion

    def _usage(completion) -> dict:
        n = len(completion.token_ids)
        return {"prompt_tokens": completion.prompt_tokens, "completion_tokens": n,
                "total_tokens": completion.prompt_tokens + n}

    async def _stream(events: asyncio.Queue, chunk, include_usage: bool, stops: tuple[str, ...]):
        """SSE: chunk(text, finish_reason) per piece of text, then usage (if asked) and [DONE].
        Text that may begin a stop string is held back until the engine decides."""
        sent, pending = "", ""
        while True:
            delta, completion = await events.get()
            if completion is None:
                pending += delta
                safe = _stop_safe(pending, stops)
                if safe:
                    sent, pending = sent + safe, pending[len(safe):]
                    yield chunk(safe, None)
                continue
            if completion.finish_reason == "error":
                yield _sse(APIError(500, f"request failed: {completion.error}", "server_error").body())
                break
            text = completion.label if completion.label is not None else completion.text
            rest = text[len(sent):] if text.startswith(sent) else ""
            if rest:
                yield chunk(rest, None)
            yield chunk(None, _finish_reason(completion))
            if include_usage:
                yield chunk(None, None, usage=_usage(completion))
            break
        yield "data: [DONE]\n\n"

    def _sse_response(rid: str, events) -> StreamingResponse:
        """The SSE response; however it ends (done, client gone), the request is cancelled if still live."""
        return _SSEResponse(events, on_close=lambda: service.cancel(rid))

    def _finish_reason(completion) -> str:
        return "length" if completion.finish_reason == "length" else "stop"

    @app.post("/v1/chat/completions")
    async def chat_completions(http: HTTPRequest):
        body = parse(ChatRequest, await _json(http))
        messages, urls = chat_messages(body.messages)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        events = await _admit(body, urls, rid, messages=messages)
        head = {"id": rid, "created": created, "model": body.model}
        if body.stream:
            first = [True]

            def chunk(text, reason, usage=None):
                delta = {} if text is None else {"content": text}
                if first[0] and usage is None:
                    delta, first[0] = {"role": "assistant", **delta}, False
                choices = [] if usage else [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}]
                return _sse({**head, "object": "chat.completion.chunk", "choices": choices,
                             **({"usage": usage} if usage else {})})

            include = bool(body.stream_options and body.stream_options.include_usage)
            return _sse_response(rid, _stream(events, chunk, include, body.stops))
        completion = await _complete(http, rid, events)
        if completion is None:
            return Response(status_code=499)
        content = completion.label if completion.label is not None else completion.text
        return {**head, "object": "chat.completion",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                             "logprobs": None, "finish_reason": _finish_reason(completion)}],
                "usage": _usage(completion)}

    @app.post("/v1/completions")
    async def completions(http: HTTPRequest):
        body = parse(CompletionRequest, await _json(http))
        prompt = body.prompt if isinstance(body.prompt, str) else body.prompt[0]
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        events = await _admit(body, MediaURLs(), rid, prompt=prompt)
        head = {"id": rid, "object": "text_completion", "created": created, "model": body.model}
        if body.stream:
            def chunk(text, reason, usage=None):
                choices = [] if usage else [{"index": 0, "text": text or "", "logprobs": None,
                                             "finish_reason": reason}]
                return _sse({**head, "choices": choices, **({"usage": usage} if usage else {})})

            include = bool(body.stream_options and body.stream_options.include_usage)
            return _sse_response(rid, _stream(events, chunk, include, body.stops))
        completion = await _complete(http, rid, events)
        if completion is None:
            return Response(status_code=499)
        text = completion.label if completion.label is not None else completion.text
        return {**head, "choices": [{"index": 0, "text": text, "logprobs": None,
                                     "finish_reason": _finish_reason(completion)}],
                "usage": _usage(completion)}

    # models and adapters --------------------------------------------------------------------
    @app.get("/v1/models")
    async def models():
        created = int(time.time())
        base = {"id": service.model_name, "object": "model", "created": created, "owned_by": "valora",
                "root": service.model_name, "parent": None}
        return {"object": "list", "data": [base] + [
            {**base, "id": name, "root": name, "parent": service.model_name} for name in service.adapters]}

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(http: HTTPRequest):
        body = parse(LoadAdapterRequest, await _json(http))
        if body.lora_name == service.model_name:
            raise APIError(400, f"lora_name {body.lora_name!r} is the base model's name", param="lora_name")
        directory = _inside_root(body.lora_path, adapter_root)
        async with load_lock:           # one load at a time: each may read a large checkpoint
            try:
                adapter = await asyncio.to_thread(load_adapter, directory, config, service.engine.runner.module_shapes,
                                                  body.lora_name)
                version = await service.register_adapter(adapter)
            except ShuttingDown as e:
                raise APIError(503, str(e), "service_unavailable") from None
            except ValueError as e:
                raise APIError(400, f"cannot load adapter {body.lora_name!r} from {body.lora_path!r}: {e}",
                               param="lora_path") from None
        verb = "added" if version == 1 else "replaced"
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' {verb} successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(http: HTTPRequest):
        body = parse(UnloadAdapterRequest, await _json(http))
        try:
            await service.unregister_adapter(body.lora_name)
        except UnknownModel as e:
            raise APIError(404, str(e), "not_found_error", param="lora_name") from None
        except AdapterInUse as e:
            raise APIError(409, f"{e}; retry when they finish", "conflict_error",
                           headers={"Retry-After": str(retry_after)}) from None
        except ShuttingDown as e:
            raise APIError(503, str(e), "service_unavailable") from None
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")

    # operations -----------------------------------------------------------------------------
    @app.get("/metrics")
    async def metrics():
        return Response(generate_latest(service.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/health")
    async def health():
        healthy, report = service.health()
        return report if healthy else JSONResponse(report, 503)

    app.add_middleware(_Guard, api_key=api_key, max_body=limits.max_body_bytes, counter=service.metrics.http)
    return app


class _Guard:
    """ASGI middleware: counts responses per endpoint and status, checks the API key on /v1
    paths (401) and reads the body up to max_body bytes (413) before the app sees it."""

    def __init__(self, app, *, api_key: str | None, max_body: int, counter):
        self.app, self.api_key, self.max_body, self.counter = app, api_key, max_body, counter

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        endpoint = path if path in _ENDPOINTS else "other"

        async def counted_send(message):
            if message["type"] == "http.response.start":
                self.counter.labels(endpoint, str(message["status"])).inc()
            await send(message)

        if self.api_key is not None and path.startswith("/v1"):
            headers = dict(scope["headers"])
            given = headers.get(b"authorization", b"").decode("latin-1")
            if not hmac.compare_digest(given.encode(), f"Bearer {self.api_key}".encode()):
                error = APIError(401, "missing or invalid API key (Authorization: Bearer KEY)",
                                 "authentication_error", code="invalid_api_key")
                return await JSONResponse(error.body(), 401)(scope, receive, counted_send)
        body, more = bytearray(), scope["method"] in ("POST", "PUT", "PATCH")
        declared = dict(scope["headers"]).get(b"content-length", b"0")
        if more and (int(declared) if declared.isdigit() else 0) > self.max_body:
            more, body = False, None
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_body:
                body = None
                break
        if body is None:
            error = APIError(413, f"request body exceeds the limit of {self.max_body} bytes")
            return await JSONResponse(error.body(), 413, headers={"Connection": "close"})(scope, receive, counted_send)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        await self.app(scope, replay, counted_send)


async def _json(http: HTTPRequest):
    """The decoded JSON body (a large one parsed off the event loop); APIError 400 if it is not JSON."""
    raw = await http.body()
    try:
        return json.loads(raw) if len(raw) < 1 << 16 else await asyncio.to_thread(json.loads, raw)
    except (ValueError, RecursionError) as e:
        raise APIError(400, f"request body is not valid JSON: {str(e)[:200]}") from None


def _inside_root(lora_path: str, root: str | Path | None) -> Path:
    """The adapter directory lora_path names, refused unless it resolves inside root."""
    if root is None:
        raise APIError(400, "runtime adapter loading is off: the server has no adapter root")
    root = Path(root).resolve()
    try:
        resolved = (root / lora_path).resolve()
    except (OSError, RuntimeError, ValueError) as e:
        raise APIError(400, f"lora_path {lora_path!r} cannot be resolved: {e}", param="lora_path") from None
    if not resolved.is_relative_to(root):
        raise APIError(400, f"lora_path {lora_path!r} is outside the adapter root {str(root)!r}", param="lora_path")
    if not resolved.is_dir():
        raise APIError(404, f"no adapter directory at lora_path {lora_path!r} under {str(root)!r}",
                       "not_found_error", param="lora_path")
    return resolved


def _stop_safe(text: str, stops: tuple[str, ...]) -> str:
    """The longest prefix of `text` that cannot be the start of a stop string."""
    keep = len(text)
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:k]):
                keep = min(keep, len(text) - k)
                break
    return text[:keep]


def _sse(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


class _SSEResponse(StreamingResponse):
    """A text/event-stream response that calls on_close() once it has ended, however it ended."""

    def __init__(self, events, on_close):
        super().__init__(events, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._on_close = on_close

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


class Server(uvicorn.Server):
    """uvicorn's server that, on SIGINT/SIGTERM (or `shutdown()`), first makes the service refuse new
    requests (503); uvicorn then waits for the requests in flight and the lifespan stops the engine."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 8000, *, log_level: str = "info",
                 graceful_timeout: float | None = 300):
        super().__init__(uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on",
                                        timeout_graceful_shutdown=graceful_timeout))
        self.service: EngineService = app.state.service

    def handle_exit(self, sig, frame) -> None:
        self.service.begin_drain()
        super().handle_exit(sig, frame)

    def shutdown_soon(self) -> None:
        """Graceful stop from another thread (tests, embedding)."""
        self.service.begin_drain()
        self.should_exit = True
