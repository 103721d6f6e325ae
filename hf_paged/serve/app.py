"""The OpenAI-compatible HTTP API on one running ``LLMEngine``: ``create_app(engine, tokenizer, config)``.

Every request, from any connection, becomes engine requests (one per choice: ``n`` choices are ``n`` requests, seeds
``seed + i``) that join the engine's running batch; their ``StreamDelta`` s come back through
``engine.astream_text`` and are turned into OpenAI chunks (streamed as server-sent events) or one answer.

Guarding, in order: the API key (``Authorization: Bearer KEY``; every route but ``/health``; the chat page at ``/``
also takes HTTP Basic auth with the key as password, so a browser can open it), shutdown (503 while draining), body
size (413), then per-route parsing and limits (400, 404 unknown model, 422 unsupported feature), then admission: at
most ``max_concurrent_requests`` generation requests at once, the rest refused at once with 429 (no queue in the
server: the engine already queues what it admitted). A client that disconnects aborts its engine requests at once
(their KV blocks go back to the pool in the engine's next step).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import dataclasses
import hmac
import json
import logging
import time
import uuid
from dataclasses import dataclass
from importlib import resources
from typing import Any, AsyncIterator, Awaitable, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..core.sequence import FinishReason, SamplingParams
from .metrics import CONTENT_TYPE_LATEST, ServerMetrics
from .protocol import (APIError, ChatCompletionRequest, ChatMessage, CompletionRequest, DetokenizeRequest,
                       TokenizeRequest, parse_body, unsupported)

logger = logging.getLogger("hf_paged.serve")

# Engine field names in ValueErrors -> the OpenAI parameter they come from.
_ENGINE_TO_API_PARAM = {"max_new_tokens": "max_tokens", "min_new_tokens": "min_tokens", "top_logprobs": "logprobs"}


@dataclass
class ServeConfig:
    """What the server answers as and its limits (each over-limit request gets the status in the comment)."""

    model_name: str = "hf_paged"
    api_key: str | None = None  # 401 without it
    max_body_bytes: int = 4 << 20  # 413
    max_prompt_tokens: int | None = None  # 400 (context_length_exceeded); default: the engine's context - 1
    max_tokens: int = 4096  # 400: the largest max_tokens a request may ask for (and the default of chat requests)
    max_n: int = 16  # 400
    max_prompts: int = 64  # 400: prompts in one /v1/completions request
    max_concurrent_requests: int = 512  # 429: generation requests in flight at once
    shutdown_grace_s: float = 30.0  # after SIGTERM: in-flight requests still running then are aborted


@dataclass
class _Choice:
    """One engine request of an API request: its prompt, its sampling parameters, what it has produced."""

    index: int
    prompt_ids: list[int]
    params: SamplingParams
    request_id: str
    text: str = ""
    token_ids: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[float] = dataclasses.field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = dataclasses.field(default_factory=list)
    finish_reason: str | None = None
    error: BaseException | None = None


class OpenAIServer:
    """The state behind one app: engine, tokenizer, limits, metrics, the requests in flight."""

    def __init__(self, engine: Any, tokenizer: Any, config: ServeConfig) -> None:
        self.engine = engine
        self.tokenizer = tokenizer
        self.config = config
        self.max_model_len = int(engine.max_model_len)
        self.max_prompt_tokens = min(config.max_prompt_tokens or self.max_model_len - 1, self.max_model_len - 1)
        self.metrics = ServerMetrics(engine.stats, config.model_name, self.max_model_len)
        self.in_flight = 0  # admitted generation requests
        self.live_request_ids: set[str] = set()  # engine requests not finished yet
        self.draining = False
        self.created = int(time.time())

    # ---- admission and shutdown ----------------------------------------------------------------
    def admit(self) -> Callable[[], None]:
        """Take a generation slot (429 when none is free); returns its release (idempotent)."""
        if self.in_flight >= self.config.max_concurrent_requests:
            raise APIError(429, f"too many concurrent requests (limit {self.config.max_concurrent_requests}); "
                                "retry later", code="too_many_requests")
        self.in_flight += 1
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self.in_flight -= 1
        return release

    def begin_shutdown(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """Stop admitting; abort whatever is still running ``shutdown_grace_s`` later. Callable from a signal
        handler: the abort is scheduled on the event loop."""
        if self.draining:
            return
        self.draining = True
        if loop is not None:
            loop.call_soon_threadsafe(loop.call_later, self.config.shutdown_grace_s, self.abort_all)

    def abort_all(self) -> None:
        for request_id in list(self.live_request_ids):
            self.engine.abort(request_id)

    # ---- checks --------------------------------------------------------------------------------
    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.config.model_name:
            raise APIError(404, f"the model {model!r} does not exist; this server serves {self.config.model_name!r}",
                           param="model", code="model_not_found")

    def check_prompt(self, ids: list[int], param: str) -> None:
        if not ids:
            raise APIError(400, f"{param}: the prompt is empty", param=param, code="invalid_value")
        if len(ids) > self.max_prompt_tokens:
            raise APIError(400, f"{param}: the prompt has {len(ids)} tokens; this server takes at most "
                                f"{self.max_prompt_tokens}", param=param, code="context_length_exceeded")
        if not all(isinstance(t, int) and 0 <= t < self.engine.vocab_size for t in ids):
            raise APIError(400, f"{param}: token ids must be integers in [0, {self.engine.vocab_size})", param=param,
                           code="invalid_value")

    def max_new_tokens(self, asked: int | None, prompt_len: int, param: str) -> int:
        room = self.max_model_len - prompt_len
        if asked is None:
            return max(1, min(self.config.max_tokens, room))
        if asked < 1:
            raise APIError(400, f"{param}: must be at least 1 (got {asked})", param=param, code="invalid_value")
        if asked > self.config.max_tokens:
            raise APIError(400, f"{param}: at most {self.config.max_tokens} on this server (got {asked})",
                           param=param, code="invalid_value")
        return asked

    def sampling_params(self, req: CompletionRequest | ChatCompletionRequest, max_new_tokens: int, logprobs: bool,
                        top_logprobs: int) -> SamplingParams:
        """The request's sampling parameters (validated by the engine: its ValueError becomes a 400)."""
        if req.n < 1 or req.n > self.config.max_n:
            raise APIError(400, f"n: must be between 1 and {self.config.max_n} on this server (got {req.n})",
                           param="n", code="invalid_value")
        if req.logit_bias:
            raise unsupported("logit_bias", "not supported by this server")
        if req.seed is not None and not -(1 << 63) <= req.seed < (1 << 63) - self.config.max_n:
            raise APIError(400, "seed: must be a 64-bit integer", param="seed", code="invalid_value")
        temperature = 1.0 if req.temperature is None else req.temperature
        if 0 < temperature < 1e-5:  # as vLLM: too small to sample with, so greedy
            temperature = 0.0
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        params = SamplingParams(
            max_new_tokens=max_new_tokens, min_new_tokens=req.min_tokens, temperature=temperature,
            top_k=0 if req.top_k in (None, -1) else req.top_k, top_p=1.0 if req.top_p is None else req.top_p,
            min_p=req.min_p or 0.0,
            repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
            presence_penalty=req.presence_penalty or 0.0, frequency_penalty=req.frequency_penalty or 0.0,
            seed=req.seed, stop=stop, stop_token_ids=list(req.stop_token_ids or []), ignore_eos=req.ignore_eos,
            logprobs=logprobs, top_logprobs=top_logprobs)
        try:
            params.validate()
        except ValueError as exc:
            raise _engine_error(exc) from None
        return params

    def choices(self, prompts: list[list[int]], params: SamplingParams, n: int, prefix: str) -> list[_Choice]:
        """One engine request per (prompt, sample); seeds ``seed + i``. Each is validated by the engine now, so a
        request that would fail fails here, before any answer starts."""
        out = []
        for p, ids in enumerate(prompts):
            for i in range(n):
                choice_params = dataclasses.replace(params, stop=list(params.stop),
                                                    seed=None if params.seed is None else params.seed + i)
                choice = _Choice(p * n + i, ids, choice_params, f"{prefix}-{p * n + i}")
                try:
                    self.engine.make_sequence(ids, choice_params, choice.request_id)  # validation only
                except ValueError as exc:
                    raise _engine_error(exc) from None
                out.append(choice)
        return out

    # ---- running choices -----------------------------------------------------------------------
    async def run_choice(self, choice: _Choice, on_delta: Callable[[_Choice, Any], Awaitable[None]] | None = None
                         ) -> None:
        """Run one engine request to its end (or until cancelled: then it is aborted), filling ``choice``."""
        self.live_request_ids.add(choice.request_id)
        last: float | None = None  # when the previous token arrived (the first token's latency is the TTFT)
        final = None
        try:
            stream = self.engine.astream_text(choice.prompt_ids, choice.params, request_id=choice.request_id)
            async with contextlib.aclosing(stream) as deltas:
                async for delta in deltas:
                    if delta.token_ids:
                        last = self.metrics.record_tokens(len(delta.token_ids), last)
                    choice.text += delta.text
                    choice.token_ids.extend(delta.token_ids)
                    if delta.logprobs:
                        choice.logprobs.extend(delta.logprobs)
                    if delta.top_logprobs:
                        choice.top_logprobs.extend(delta.top_logprobs)
                    if delta.output is not None:
                        final = delta.output
                        choice.finish_reason = _reason(delta.finish_reason)
                        choice.error = final.error
                    if on_delta is not None:
                        await on_delta(choice, delta)
        finally:
            self.live_request_ids.discard(choice.request_id)
            if final is not None:
                self.metrics.record_finished(choice.finish_reason, len(choice.prompt_ids), len(final.token_ids),
                                             final.metrics)
            else:  # cancelled (client gone) or failed before its end: the engine request was aborted
                self.metrics.record_finished("abort", len(choice.prompt_ids), len(choice.token_ids), {})

    async def run_all(self, choices: list[_Choice], request: Request) -> None:
        """Run the choices to their ends; a client that disconnects meanwhile aborts them all."""
        work = asyncio.ensure_future(asyncio.gather(*(self.run_choice(c) for c in choices)))
        gone = asyncio.ensure_future(_client_gone(request))
        try:
            await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not work.done():
                work.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await work
        if work.cancelled():
            raise APIError(400, "the client disconnected", code="client_disconnected")  # nobody reads it
        work.result()

    async def stream_choices(self, choices: list[_Choice]) -> AsyncIterator[tuple[_Choice, Any]]:
        """Each delta of each choice as it comes (choices interleaved); leaving early aborts them all."""
        queue: asyncio.Queue = asyncio.Queue()

        async def put(choice: _Choice, delta: Any) -> None:
            queue.put_nowait((choice, delta))

        tasks = [asyncio.ensure_future(self.run_choice(c, put)) for c in choices]
        for t in tasks:
            t.add_done_callback(lambda _t: queue.put_nowait(None))
        try:
            pending = len(tasks)
            while pending:
                item = await queue.get()
                if item is None:
                    pending -= 1
                    continue
                _, delta = item
                if delta.text or delta.token_ids or delta.finish_reason is not None:
                    yield item
            for t in tasks:
                t.result()  # an engine failure surfaces here
        finally:
            for t in tasks:
                if not t.done():
                    t.cancel()
            for t in tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await t

    # ---- text helpers --------------------------------------------------------------------------
    def token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    def chat_prompt(self, messages: list[ChatMessage], add_generation_prompt: bool, continue_final_message: bool,
                    template_kwargs: dict[str, Any] | None) -> list[int]:
        if not getattr(self.tokenizer, "chat_template", None):
            raise APIError(400, "messages: the model has no chat template; use /v1/completions", param="messages",
                           code="invalid_value")
        if continue_final_message and add_generation_prompt:
            raise APIError(400, "continue_final_message: cannot be combined with add_generation_prompt",
                           param="continue_final_message", code="invalid_value")
        conversation = [{"role": m.role, "content": m.text(), **({"name": m.name} if m.name else {})}
                        for m in messages]
        try:
            text = self.tokenizer.apply_chat_template(
                conversation, add_generation_prompt=add_generation_prompt,
                continue_final_message=continue_final_message, tokenize=False, **(template_kwargs or {}))
        except Exception as exc:  # the template's own checks (jinja raise_exception), bad kwargs
            raise APIError(400, f"messages: the chat template refused them: {exc}", param="messages",
                           code="invalid_value") from None
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])


def _reason(reason: Any) -> str:
    return reason.value if isinstance(reason, FinishReason) else str(reason)


def _engine_error(exc: ValueError) -> APIError:
    """The engine's ValueError ("field: why") as a 400 naming the API's parameter."""
    message = str(exc)
    field = message.split(":", 1)[0].strip() if ":" in message else None
    param = _ENGINE_TO_API_PARAM.get(field, field) if field and field.isidentifier() else None
    if param and field != param:
        message = param + message[len(field):]
    return APIError(400, message, param=param, code="invalid_value")


async def _client_gone(request: Request) -> None:
    """Returns when the client has disconnected (the body has been read already)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def _usage(choices: list[_Choice], prompts: list[list[int]]) -> dict[str, int]:
    """OpenAI's usage: each prompt counted once (however many choices it has), every choice's tokens."""
    prompt_tokens = sum(len(p) for p in prompts)
    completion_tokens = sum(len(c.token_ids) for c in choices)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _sse(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode() + b"\n\n"


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


# ---- completions and chat: logprobs formats --------------------------------------------------------------------
def _completion_logprobs(server: OpenAIServer, choice: _Choice, start: int, end: int, offset: int) -> dict[str, Any]:
    tokens, offsets, tops = [], [], []
    for i in range(start, end):
        token = server.token_text(choice.token_ids[i])
        tokens.append(token)
        offsets.append(offset)
        offset += len(token)
        if choice.params.top_logprobs and i < len(choice.top_logprobs):
            top = {server.token_text(t): lp for t, lp in choice.top_logprobs[i]}
            top.setdefault(token, choice.logprobs[i])
            tops.append(top)
    return {"tokens": tokens, "token_logprobs": choice.logprobs[start:end], "text_offset": offsets,
            "top_logprobs": tops if choice.params.top_logprobs else None}


def _chat_logprobs(server: OpenAIServer, choice: _Choice, start: int, end: int) -> dict[str, Any]:
    def entry(token_id: int, logprob: float) -> dict[str, Any]:
        text = server.token_text(token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    content = []
    for i in range(start, end):
        item = entry(choice.token_ids[i], choice.logprobs[i])
        tops = choice.top_logprobs[i] if i < len(choice.top_logprobs) else []
        item["top_logprobs"] = [entry(t, lp) for t, lp in tops[: choice.params.top_logprobs]]
        content.append(item)
    return {"content": content}


# ---- the app ---------------------------------------------------------------------------------------------------
def create_app(engine: Any, tokenizer: Any, config: ServeConfig | None = None) -> FastAPI:
    """The FastAPI app serving ``engine``. The engine's lifetime is the caller's (``cli.run`` closes it)."""
    config = config or ServeConfig()
    server = OpenAIServer(engine, tokenizer, config)
    app = FastAPI(title="hf_paged", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server
    chat_page = resources.files("hf_paged.serve").joinpath("static/chat.html").read_text(encoding="utf-8")

    # ---- errors: always OpenAI's shape -----------------------------------------------------------
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        err = APIError(exc.status_code, str(exc.detail), code="not_found" if exc.status_code == 404 else None)
        return JSONResponse(err.body(), status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(APIError(400, str(exc)).body(), status_code=400)

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("internal error on %s", request.url.path)
        return JSONResponse(APIError(500, f"internal error: {type(exc).__name__}", type_="server_error").body(),
                            status_code=500)

    async def read_body(request: Request) -> bytes:
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > config.max_body_bytes:
                raise APIError(413, f"the body is larger than {config.max_body_bytes} bytes", code="body_too_large")
            chunks.append(chunk)
        return b"".join(chunks)

    # ---- plain routes ----------------------------------------------------------------------------
    @app.get("/health")
    async def health() -> Response:
        return Response(status_code=503 if server.draining else 200)

    @app.get("/", response_class=HTMLResponse)
    async def chat() -> HTMLResponse:
        return HTMLResponse(chat_page)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(server.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{
            "id": config.model_name, "object": "model", "created": server.created, "owned_by": "hf_paged",
            "root": config.model_name, "parent": None, "max_model_len": server.max_model_len, "permission": []}]}

    @app.post("/tokenize")
    async def tokenize(request: Request) -> dict[str, Any]:
        req = parse_body(await read_body(request), TokenizeRequest)
        server.check_model(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise APIError(400, "give either prompt or messages", param="prompt", code="invalid_value")
        if req.messages is not None:
            ids = server.chat_prompt(req.messages, req.add_generation_prompt, req.continue_final_message, None)
        else:
            ids = list(tokenizer(req.prompt, add_special_tokens=req.add_special_tokens)["input_ids"])
        return {"count": len(ids), "max_model_len": server.max_model_len, "tokens": ids,
                "token_strs": tokenizer.convert_ids_to_tokens(ids) if req.return_token_strs else None}

    @app.post("/detokenize")
    async def detokenize(request: Request) -> dict[str, Any]:
        req = parse_body(await read_body(request), DetokenizeRequest)
        server.check_model(req.model)
        if not all(0 <= t < engine.vocab_size for t in req.tokens):
            raise APIError(400, f"tokens: token ids must be in [0, {engine.vocab_size})", param="tokens",
                           code="invalid_value")
        return {"prompt": tokenizer.decode(req.tokens)}

    # ---- completions -----------------------------------------------------------------------------
    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        req = parse_body(await read_body(request), CompletionRequest)
        server.check_model(req.model)
        if req.suffix:
            raise unsupported("suffix", "not supported by this server")
        if req.best_of not in (None, req.n):
            raise unsupported("best_of", "only best_of = n is supported")
        if req.logprobs is not None and not 0 <= req.logprobs <= 20:
            raise APIError(400, f"logprobs: must be between 0 and 20 (got {req.logprobs})", param="logprobs",
                           code="invalid_value")
        if req.echo and req.logprobs is not None:
            raise unsupported("echo", "echo with logprobs needs the prompt's logprobs, which the engine does not "
                                      "compute")
        prompts = _completion_prompts(server, req.prompt)
        for ids in prompts:
            server.check_prompt(ids, "prompt")
        max_new = server.max_new_tokens(req.max_tokens, max(len(p) for p in prompts), "max_tokens")
        params = server.sampling_params(req, max_new, req.logprobs is not None, req.logprobs or 0)
        release = server.admit()
        response_id = f"cmpl-{uuid.uuid4().hex}"
        try:
            choices = server.choices(prompts, params, req.n, response_id)
        except BaseException:
            release()
            raise
        created = int(time.time())
        base = {"id": response_id, "object": "text_completion", "created": created, "model": config.model_name}
        prompt_texts = [tokenizer.decode(p) for p in prompts] if req.echo else None
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return _EventStream(_completion_events(server, choices, prompts, base, prompt_texts, req.n,
                                                   include_usage), release)
        try:
            await server.run_all(choices, request)
        finally:
            release()
        out = []
        for c in choices:
            text = (prompt_texts[c.index // req.n] if prompt_texts else "") + c.text
            logprobs = _completion_logprobs(server, c, 0, len(c.logprobs), 0) if c.params.logprobs else None
            out.append({"index": c.index, "text": text, "logprobs": logprobs, "finish_reason": c.finish_reason})
        _raise_engine_failure(choices)
        return JSONResponse({**base, "choices": out, "usage": _usage(choices, prompts)})

    # ---- chat ------------------------------------------------------------------------------------
    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        req = parse_body(await read_body(request), ChatCompletionRequest)
        server.check_model(req.model)
        if req.tools or req.functions:
            raise unsupported("tools", "tool calling is not supported by this server")
        if req.tool_choice not in (None, "none"):
            raise unsupported("tool_choice", "tool calling is not supported by this server")
        if req.response_format is not None and req.response_format.type != "text":
            raise unsupported("response_format", "only the text format is supported")
        if req.top_logprobs is not None and not 0 <= req.top_logprobs <= 20:
            raise APIError(400, f"top_logprobs: must be between 0 and 20 (got {req.top_logprobs})",
                           param="top_logprobs", code="invalid_value")
        if req.top_logprobs and not req.logprobs:
            raise APIError(400, "top_logprobs: needs logprobs=true", param="top_logprobs", code="invalid_value")
        ids = server.chat_prompt(req.messages, req.add_generation_prompt, req.continue_final_message,
                                 req.chat_template_kwargs)
        server.check_prompt(ids, "messages")
        asked, param = ((req.max_completion_tokens, "max_completion_tokens") if req.max_completion_tokens is not None
                        else (req.max_tokens, "max_tokens"))
        max_new = server.max_new_tokens(asked, len(ids), param)
        params = server.sampling_params(req, max_new, req.logprobs, req.top_logprobs or 0)
        release = server.admit()
        response_id = f"chatcmpl-{uuid.uuid4().hex}"
        try:
            choices = server.choices([ids], params, req.n, response_id)
        except BaseException:
            release()
            raise
        base = {"id": response_id, "object": "chat.completion", "created": int(time.time()),
                "model": config.model_name}
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return _EventStream(_chat_events(server, choices, [ids], base, include_usage), release)
        try:
            await server.run_all(choices, request)
        finally:
            release()
        _raise_engine_failure(choices)
        out = [{"index": c.index, "message": {"role": "assistant", "content": c.text},
                "logprobs": _chat_logprobs(server, c, 0, len(c.logprobs)) if c.params.logprobs else None,
                "finish_reason": c.finish_reason} for c in choices]
        return JSONResponse({**base, "choices": out, "usage": _usage(choices, [ids])})

    return _Guard(app, server)


def _raise_engine_failure(choices: list[_Choice]) -> None:
    failed = [c for c in choices if c.finish_reason == FinishReason.ERROR.value]
    if failed:
        raise APIError(500, f"the engine failed on this request: {failed[0].error!r}", type_="server_error",
                       code="engine_error")


def _completion_prompts(server: OpenAIServer, prompt: Any) -> list[list[int]]:
    """OpenAI's four prompt forms (text, texts, token ids, lists of token ids) as lists of token ids."""
    if isinstance(prompt, str):
        prompts: list[Any] = [prompt]
    elif prompt and all(isinstance(p, int) for p in prompt):
        prompts = [prompt]
    else:
        prompts = list(prompt)
    if not prompts:
        raise APIError(400, "prompt: must not be empty", param="prompt", code="invalid_value")
    if len(prompts) > server.config.max_prompts:
        raise APIError(400, f"prompt: at most {server.config.max_prompts} prompts per request", param="prompt",
                       code="invalid_value")
    return [list(server.tokenizer(p)["input_ids"]) if isinstance(p, str) else list(p) for p in prompts]


def _engine_failure_event(delta: Any) -> bytes | None:
    """An error event for a delta that ends its request with an engine failure (OpenAI's clients raise on it)."""
    if delta.output is not None and delta.output.error is not None:
        return _sse(APIError(500, f"the engine failed on this request: {delta.output.error!r}",
                             type_="server_error", code="engine_error").body())
    return None


async def _completion_events(server: OpenAIServer, choices: list[_Choice], prompts: list[list[int]],
                             base: dict[str, Any], prompt_texts: list[str] | None, n: int,
                             include_usage: bool) -> AsyncIterator[bytes]:
    extra = {"usage": None} if include_usage else {}
    sent_logprobs = {c.index: 0 for c in choices}
    offsets = {c.index: 0 for c in choices}
    if prompt_texts is not None:
        for c in choices:
            yield _sse({**base, "choices": [{"index": c.index, "text": prompt_texts[c.index // n], "logprobs": None,
                                             "finish_reason": None}], **extra})
    async with contextlib.aclosing(server.stream_choices(choices)) as items:
        async for choice, delta in items:
            failure = _engine_failure_event(delta)
            if failure is not None:
                yield failure
                continue
            logprobs = None
            if choice.params.logprobs:
                start, end = sent_logprobs[choice.index], len(choice.logprobs)
                logprobs = _completion_logprobs(server, choice, start, end, offsets[choice.index])
                sent_logprobs[choice.index] = end
                offsets[choice.index] += sum(len(t) for t in logprobs["tokens"])
            finish = _reason(delta.finish_reason) if delta.finish_reason is not None else None
            yield _sse({**base, "choices": [{"index": choice.index, "text": delta.text, "logprobs": logprobs,
                                             "finish_reason": finish}], **extra})
    if include_usage:
        yield _sse({**base, "choices": [], "usage": _usage(choices, prompts)})
    yield b"data: [DONE]\n\n"


async def _chat_events(server: OpenAIServer, choices: list[_Choice], prompts: list[list[int]], base: dict[str, Any],
                       include_usage: bool) -> AsyncIterator[bytes]:
    base = {**base, "object": "chat.completion.chunk"}
    extra = {"usage": None} if include_usage else {}
    sent_logprobs = {c.index: 0 for c in choices}
    started: set[int] = set()
    async with contextlib.aclosing(server.stream_choices(choices)) as items:
        async for choice, delta in items:
            failure = _engine_failure_event(delta)
            if failure is not None:
                yield failure
                continue
            if choice.index not in started:  # as vLLM: the role chunk comes with the first output, not before
                started.add(choice.index)
                yield _sse({**base, "choices": [{"index": choice.index, "delta": {"role": "assistant", "content": ""},
                                                 "logprobs": None, "finish_reason": None}], **extra})
            logprobs = None
            if choice.params.logprobs:
                start, end = sent_logprobs[choice.index], len(choice.logprobs)
                logprobs = _chat_logprobs(server, choice, start, end)
                sent_logprobs[choice.index] = end
            finish = _reason(delta.finish_reason) if delta.finish_reason is not None else None
            yield _sse({**base, "choices": [{"index": choice.index, "delta": {"content": delta.text} if delta.text
                                             else {}, "logprobs": logprobs, "finish_reason": finish}], **extra})
    if include_usage:
        yield _sse({**base, "choices": [], "usage": _usage(choices, prompts)})
    yield b"data: [DONE]\n\n"


class _Guard:
    """ASGI middleware in front of the app: API key, shutdown, declared body size. Streams pass through untouched
    (no buffering, disconnects seen at once)."""

    def __init__(self, app: FastAPI, server: OpenAIServer) -> None:
        self.app = app
        self.server = server
        self.state = app.state  # tests and the CLI reach the server through app.state.server

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        config = self.server.config
        if config.api_key and path != "/health" and not _authorized(headers.get("authorization", ""), config.api_key):
            challenge = 'Basic realm="hf-paged", charset="UTF-8"' if path == "/" else "Bearer"
            await _send_error(send, APIError(401, "missing or wrong API key (Authorization: Bearer KEY)",
                                             code="invalid_api_key"), {"www-authenticate": challenge})
            return
        if self.server.draining and path not in ("/health", "/metrics"):
            await _send_error(send, APIError(503, "the server is shutting down", code="shutting_down"))
            return
        length = headers.get("content-length")
        if length is not None:
            if not length.isdigit():
                await _send_error(send, APIError(400, "bad Content-Length header", code="invalid_request"))
                return
            if int(length) > config.max_body_bytes:
                await _send_error(send, APIError(413, f"the body is larger than {config.max_body_bytes} bytes",
                                                 code="body_too_large"), {"connection": "close"})
                return
        await self.app(scope, receive, send)


def _authorized(header: str, api_key: str) -> bool:
    scheme, _, value = header.partition(" ")
    scheme = scheme.lower()
    if scheme == "bearer":
        return hmac.compare_digest(value.strip().encode(), api_key.encode())
    if scheme == "basic":  # browsers: any user name, the key as password
        try:
            _, _, password = base64.b64decode(value.strip(), validate=True).decode("utf-8").partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return False
        return hmac.compare_digest(password.encode(), api_key.encode())
    return False


async def _send_error(send, error: APIError, headers: dict[str, str] | None = None) -> None:
    body = json.dumps(error.body()).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": error.status, "headers": raw})
    await send({"type": "http.response.body", "body": body})
