"""Engine outputs -> OpenAI's answers. A ``Sample`` gathers one choice's ``StreamDelta`` s; one formatter per
endpoint (``CompletionFormat``, ``ChatFormat``) turns them into its JSON: the whole answer (``response``) or, streamed,
its chunks as server-sent events (``opening``, ``chunks`` for each delta, ``closing``). Pure: no I/O and no engine;
the tokenizer only spells out the tokens of logprobs.
"""

from __future__ import annotations

import dataclasses
import json
import time
import uuid
from typing import Any

from ..core.sequence import FinishReason, StreamDelta
from . import tools
from .inputs import EngineInput
from .protocol import APIError, ChatCompletionRequest, CompletionRequest

DONE = b"data: [DONE]\n\n"


@dataclasses.dataclass
class Sample:
    """One choice of an answer: which prompt it continues and what it has produced so far."""

    index: int
    prompt_index: int
    request_id: str  # the engine's id of the sequence producing it
    text: str = ""
    token_ids: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[float] = dataclasses.field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = dataclasses.field(default_factory=list)
    finish_reason: str | None = None
    error: BaseException | None = None

    def add(self, delta: StreamDelta) -> None:
        self.text += delta.text
        self.token_ids.extend(delta.token_ids)
        self.logprobs.extend(delta.logprobs or ())
        self.top_logprobs.extend(delta.top_logprobs or ())
        if delta.finish_reason is not None:
            self.finish_reason = _reason(delta.finish_reason)
            self.error = delta.output.error if delta.output is not None else None


def sse(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode() + b"\n\n"


def _reason(reason: Any) -> str:
    return reason.value if isinstance(reason, FinishReason) else str(reason)


def _engine_failure(error: BaseException | None) -> APIError:
    if isinstance(error, ValueError):  # the request's own parameters left nothing to generate (sampling, grammar)
        return APIError(400, str(error), code="invalid_value")
    return APIError(500, f"the engine failed on this request: {error!r}", type_="server_error", code="engine_error")


class _Format:
    """What both endpoints' answers share: the response's id (which also names its engine requests), usage, engine
    failures (a 500, or in a stream an error event: OpenAI's clients raise on it) and, when the client asks for
    usage in a stream, ``usage: null`` on every chunk and the usage in a last chunk of its own. Each endpoint's
    subclass spells one sample's ``choice`` and a delta's chunks (``delta_chunks``)."""

    object = chunk_object = ""

    def __init__(self, model_name: str, tokenizer: Any, body: CompletionRequest | ChatCompletionRequest,
                 request: EngineInput) -> None:
        prefix = "cmpl" if self.object == "text_completion" else "chatcmpl"
        self.base = {"id": f"{prefix}-{uuid.uuid4().hex}", "object": self.object, "created": int(time.time()),
                     "model": model_name}
        self.tokenizer, self.request, self.params = tokenizer, request, request.params
        self.stream = body.stream
        self.include_usage = bool(body.stream_options and body.stream_options.include_usage)
        self.extra = {"usage": None} if self.include_usage else {}

    def usage(self, samples: list[Sample]) -> dict[str, int]:
        """OpenAI's usage: each prompt counted once (however many samples it has), every sample's tokens."""
        prompt_tokens = sum(len(p) for p in self.request.prompts)
        completion_tokens = sum(len(s.token_ids) for s in samples)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}

    def response(self, samples: list[Sample]) -> dict[str, Any]:
        failed = [s for s in samples if s.finish_reason == FinishReason.ERROR.value]
        if failed:
            raise _engine_failure(failed[0].error)
        return {**self.base, "choices": [self.choice(s) for s in samples], "usage": self.usage(samples)}

    def chunk(self, choice: dict[str, Any]) -> dict[str, Any]:
        return {**self.base, "object": self.chunk_object, "choices": [choice], **self.extra}

    def opening(self, samples: list[Sample]) -> list[dict[str, Any]]:
        return []

    def chunks(self, sample: Sample, delta: StreamDelta) -> list[dict[str, Any]]:
        if delta.output is not None and delta.output.error is not None:
            return [_engine_failure(delta.output.error).body()]
        finish = _reason(delta.finish_reason) if delta.finish_reason is not None else None
        return self.delta_chunks(sample, delta, finish)

    def closing(self, samples: list[Sample]) -> list[dict[str, Any]]:
        if not self.include_usage:
            return []
        return [{**self.base, "object": self.chunk_object, "choices": [], "usage": self.usage(samples)}]


class CompletionFormat(_Format):
    """``/v1/completions``; ``echo``: each prompt's text, put before its samples' (streamed: their first chunks)."""

    object = chunk_object = "text_completion"

    def __init__(self, model_name: str, tokenizer: Any, body: CompletionRequest, request: EngineInput) -> None:
        super().__init__(model_name, tokenizer, body, request)
        self.echo = [tokenizer.decode(p) for p in request.prompts] if body.echo else None
        self.text_offsets: dict[int, int] = {}  # streamed logprobs: each sample's text so far

    def logprobs(self, token_ids: list[int], logprobs: list[float], tops: list[list[tuple[int, float]]],
                 offset: int) -> dict[str, Any]:
        tokens, offsets, top_maps = [], [], []
        for i, token_id in enumerate(token_ids):
            token = self.tokenizer.decode([token_id])
            tokens.append(token)
            offsets.append(offset)
            offset += len(token)
            if self.params.top_logprobs and i < len(tops):
                top = {self.tokenizer.decode([t]): lp for t, lp in tops[i]}
                top.setdefault(token, logprobs[i])
                top_maps.append(top)
        return {"tokens": tokens, "token_logprobs": list(logprobs), "text_offset": offsets,
                "top_logprobs": top_maps if self.params.top_logprobs else None}

    def choice(self, sample: Sample) -> dict[str, Any]:
        logprobs = (self.logprobs(sample.token_ids, sample.logprobs, sample.top_logprobs, 0)
                    if self.params.logprobs else None)
        return {"index": sample.index, "text": (self.echo[sample.prompt_index] if self.echo else "") + sample.text,
                "logprobs": logprobs, "finish_reason": sample.finish_reason}

    def opening(self, samples: list[Sample]) -> list[dict[str, Any]]:
        return [self.chunk({"index": s.index, "text": self.echo[s.prompt_index], "logprobs": None,
                            "finish_reason": None}) for s in samples] if self.echo else []

    def delta_chunks(self, sample: Sample, delta: StreamDelta, finish: str | None) -> list[dict[str, Any]]:
        logprobs = None
        if self.params.logprobs:
            offset = self.text_offsets.get(sample.index, 0)
            logprobs = self.logprobs(delta.token_ids, delta.logprobs or [], delta.top_logprobs or [], offset)
            self.text_offsets[sample.index] = offset + sum(len(t) for t in logprobs["tokens"])
        return [self.chunk({"index": sample.index, "text": delta.text, "logprobs": logprobs, "finish_reason": finish})]


class ChatFormat(_Format):
    """``/v1/chat/completions``; streamed as vLLM does: each sample's role chunk comes with its first output."""

    object, chunk_object = "chat.completion", "chat.completion.chunk"

    def __init__(self, model_name: str, tokenizer: Any, body: ChatCompletionRequest, request: EngineInput) -> None:
        super().__init__(model_name, tokenizer, body, request)
        self.started: set[int] = set()
        self.body = body
        self.tool_calls = tools.offered(body)
        self.held: dict[int, str] = {}  # streamed text held back while it may be tool calls
        self.plain: set[int] = set()  # samples whose text is known to be content: streamed as it comes

    def _message(self, text: str, finish: str | None) -> tuple[dict[str, Any], str | None]:
        if not self.tool_calls:
            return {"content": text}, finish
        content, calls = tools.parse(text, self.body)
        if not calls:
            return {"content": content}, finish
        named = not isinstance(self.body.tool_choice, str) and self.body.tool_choice is not None
        return {"content": content, "tool_calls": calls}, (finish if named or finish != "stop" else "tool_calls")

    def logprobs(self, token_ids: list[int], logprobs: list[float],
                 tops: list[list[tuple[int, float]]]) -> dict[str, Any]:
        def entry(token_id: int, logprob: float) -> dict[str, Any]:
            text = self.tokenizer.decode([token_id])
            return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

        content = []
        for i, token_id in enumerate(token_ids):
            top = tops[i][: self.params.top_logprobs] if i < len(tops) else []
            content.append({**entry(token_id, logprobs[i]), "top_logprobs": [entry(t, lp) for t, lp in top]})
        return {"content": content}

    def choice(self, sample: Sample) -> dict[str, Any]:
        logprobs = (self.logprobs(sample.token_ids, sample.logprobs, sample.top_logprobs)
                    if self.params.logprobs else None)
        message, finish = self._message(sample.text, sample.finish_reason)
        return {"index": sample.index, "message": {"role": "assistant", **message}, "logprobs": logprobs,
                "finish_reason": finish}

    def delta_chunks(self, sample: Sample, delta: StreamDelta, finish: str | None) -> list[dict[str, Any]]:
        out = []
        if sample.index not in self.started:
            self.started.add(sample.index)
            out.append(self.chunk({"index": sample.index, "delta": {"role": "assistant", "content": ""},
                                   "logprobs": None, "finish_reason": None}))
        logprobs = (self.logprobs(delta.token_ids, delta.logprobs or [], delta.top_logprobs or [])
                    if self.params.logprobs else None)
        message: dict[str, Any] = {"content": delta.text} if delta.text else {}
        if self.tool_calls and sample.index not in self.plain:
            text = self.held.pop(sample.index, "") + delta.text
            if finish is not None:  # the whole output is known: calls or content
                message, finish = self._message(text, finish)
                for i, call in enumerate(message.get("tool_calls", [])):
                    call["index"] = i
                message = {k: v for k, v in message.items() if v}
            elif self.body.tool_choice not in (None, "auto") or tools.may_be_calls(text):
                self.held[sample.index] = text
                message = {}
            else:
                self.plain.add(sample.index)
                message = {"content": text}
        out.append(self.chunk({"index": sample.index, "delta": message, "logprobs": logprobs,
                               "finish_reason": finish}))
        return out
