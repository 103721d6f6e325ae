"""The OpenAI-compatible HTTP API on one running ``LLMEngine``: ``create_app(engine, tokenizer, config)``.

Thin routes: each parses its body (``protocol``), maps it to engine input (``inputs``), runs it through the engine
(``adapter``) and formats the answer (``outputs``), as one JSON answer or as server-sent events; ``guard`` stands
in front of them all. Generation requests are admitted up to ``max_concurrent_requests`` at once, the rest refused
at once with 429 (no queue in the server: the engine already queues what it admitted).
"""

from __future__ import annotations

import contextlib
from importlib import resources
from typing import Any, AsyncIterator, Callable

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse

from .adapter import EngineAdapter, Job
from .config import ServeConfig
from .guard import Guard, install_error_handlers, read_body
from .inputs import chat_input, check_model, check_token_ids, completion_input, tokenize_input
from .metrics import CONTENT_TYPE_LATEST
from .outputs import DONE, ChatFormat, CompletionFormat, sse
from .protocol import ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest, parse_body


def create_app(engine: Any, tokenizer: Any, config: ServeConfig | None = None) -> FastAPI:
    """The FastAPI app serving ``engine``; ``app.state.adapter.begin_shutdown`` drains it. The engine's lifetime is
    the caller's (``cli.run`` closes it)."""
    config = config or ServeConfig()
    adapter = EngineAdapter(engine, config)
    app = FastAPI(title="hf_paged", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.adapter = adapter
    app.add_middleware(Guard, api_key=config.api_key, max_body_bytes=config.max_body_bytes,
                       draining=lambda: adapter.draining, allowed_origins=config.allowed_origins)
    if config.allowed_origins:  # outside the guard: a browser's preflight carries no API key
        app.add_middleware(CORSMiddleware, allow_origins=list(config.allowed_origins), allow_methods=["*"],
                           allow_headers=["*"])
    install_error_handlers(app)
    _plain_routes(app, adapter, tokenizer)
    _generation_routes(app, adapter, tokenizer)
    return app


def _plain_routes(app: FastAPI, adapter: EngineAdapter, tokenizer: Any) -> None:
    limits = adapter.limits
    config = limits.config
    chat_page = resources.files("hf_paged.serve").joinpath("static/chat.html").read_text(encoding="utf-8")

    @app.get("/health")
    async def health() -> Response:
        return Response(status_code=503 if adapter.draining else 200)

    @app.get("/", response_class=HTMLResponse)
    async def chat() -> HTMLResponse:
        return HTMLResponse(chat_page)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(adapter.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    model_card = {"id": config.model_name, "object": "model", "created": adapter.created, "owned_by": "hf_paged",
                  "root": config.model_name, "parent": None, "max_model_len": limits.max_model_len, "permission": []}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card]}

    @app.get("/v1/models/{model:path}")
    async def model(model: str) -> dict[str, Any]:
        check_model(model, limits)
        return model_card

    @app.post("/tokenize")
    async def tokenize(request: Request) -> dict[str, Any]:
        raw = await read_body(request, config.max_body_bytes)

        def work() -> dict[str, Any]:
            req = parse_body(raw, TokenizeRequest)
            ids = tokenize_input(req, tokenizer, limits)
            return {"count": len(ids), "max_model_len": limits.max_model_len, "tokens": ids,
                    "token_strs": tokenizer.convert_ids_to_tokens(ids) if req.return_token_strs else None}

        return await adapter.off_loop(work)

    @app.post("/detokenize")
    async def detokenize(request: Request) -> dict[str, Any]:
        req = parse_body(await read_body(request, config.max_body_bytes), DetokenizeRequest)
        check_model(req.model, limits)
        check_token_ids(req.tokens, limits, "tokens")
        return {"prompt": tokenizer.decode(req.tokens)}


def _generation_routes(app: FastAPI, adapter: EngineAdapter, tokenizer: Any) -> None:
    limits = adapter.limits
    config = limits.config

    async def prepare(request: Request, body: type, to_input: Callable, answer: type) -> Response:
        raw = await read_body(request, config.max_body_bytes)

        def work() -> CompletionFormat | ChatFormat:  # parsing, templating, tokenizing: off the event loop
            req = parse_body(raw, body)
            return answer(config.model_name, tokenizer, req, to_input(req, tokenizer, limits))

        prepared = await adapter.off_loop(work)
        return await _answer(adapter, request, prepared.stream, prepared)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await prepare(request, CompletionRequest, completion_input, CompletionFormat)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await prepare(request, ChatCompletionRequest, chat_input, ChatFormat)


async def _answer(adapter: EngineAdapter, request: Request, stream: bool, answer: CompletionFormat | ChatFormat
                  ) -> Response:
    """Admit the request and run it: one JSON answer, or server-sent events as it generates."""
    job = adapter.start(answer.request, answer.base["id"])
    if stream:
        return _EventStream(_events(adapter, job, answer), job.release)
    await adapter.run(job, _client_gone(request))
    return JSONResponse(answer.response(job.samples))


async def _events(adapter: EngineAdapter, job: Job, answer: CompletionFormat | ChatFormat) -> AsyncIterator[bytes]:
    for chunk in answer.opening(job.samples):
        yield sse(chunk)
    async with contextlib.aclosing(adapter.stream(job)) as deltas:  # closing it aborts the job at once
        async for sample, delta in deltas:
            for chunk in answer.chunks(sample, delta):
                yield sse(chunk)
    for chunk in answer.closing(job.samples):
        yield sse(chunk)
    yield DONE


async def _client_gone(request: Request) -> None:
    """Returns when the client has disconnected (the body has been read already)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


class _EventStream(StreamingResponse):
    """Server-sent events whose generator is always closed (aborting its engine requests) and whose admission slot
    is always released, however the response ends: finished, client gone, server shutting down."""

    def __init__(self, events: AsyncIterator[bytes], release: Callable[[], None]) -> None:
        super().__init__(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self._events = events
        self._release = release

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            try:
                await self._events.aclose()
            finally:
                self._release()
