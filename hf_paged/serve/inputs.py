"""OpenAI request bodies -> what the engine takes: each prompt's token ids and one ``SamplingParams`` for the
request (its ``n`` samples included), checked against the server's limits. Pure: no I/O and no engine; the
engine's own figures (context length, vocabulary size) come in through ``Limits``, the tokenizer as an argument.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..core.sequence import SamplingParams
from ..core.structured_output import StructuredOutputs
from . import tools
from .config import ServeConfig
from .protocol import APIError, ChatCompletionRequest, CompletionRequest, TokenizeRequest, unsupported

MAX_TEMPLATE_CHARS = 64 << 10  # a trusted request's own chat template

# Engine field names in ValueErrors -> the OpenAI parameter they come from.
_ENGINE_TO_API_PARAM = {"max_new_tokens": "max_tokens", "min_new_tokens": "min_tokens", "top_logprobs": "logprobs"}


@dataclass(frozen=True)
class Limits:
    """The server's limits together with the engine's: what every request is checked against."""

    config: ServeConfig
    max_model_len: int
    vocab_size: int
    kv_tokens: int  # what the KV pool holds: one sequence's most tokens

    @property
    def max_prompt_tokens(self) -> int:
        return min(self.config.max_prompt_tokens or self.max_model_len - 1, self.max_model_len - 1)

    @property
    def max_prompt_chars(self) -> int:
        """Longer text is refused before it is tokenized: no tokenizer makes a token of more characters than this
        allows on average."""
        return 32 * self.max_prompt_tokens


@dataclass
class EngineInput:
    """One API request as the engine takes it: its prompts (token ids) and their sampling parameters."""

    prompts: list[list[int]]
    params: SamplingParams


def check_model(model: str | None, limits: Limits) -> None:
    name = limits.config.model_name
    if model is not None and model != name:
        raise APIError(404, f"the model {model!r} does not exist; this server serves {name!r}", param="model",
                       code="model_not_found")


def check_token_ids(ids: list[int], limits: Limits, param: str) -> None:
    if not all(isinstance(t, int) and 0 <= t < limits.vocab_size for t in ids):
        raise APIError(400, f"{param}: token ids must be integers in [0, {limits.vocab_size})", param=param,
                       code="invalid_value")


def engine_error(exc: ValueError) -> APIError:
    """The engine's ValueError ("field: why") as a 400 naming the API's parameter."""
    message = str(exc)
    field = message.split(":", 1)[0].strip() if ":" in message else None
    param = _ENGINE_TO_API_PARAM.get(field, field) if field and field.isidentifier() else None
    if param and field != param:
        message = param + message[len(field):]
    return APIError(400, message, param=param, code="invalid_value")


# ---- the endpoints ---------------------------------------------------------------------------------------------
def completion_input(req: CompletionRequest, tokenizer: Any, limits: Limits) -> EngineInput:
    check_model(req.model, limits)
    if req.suffix:
        raise unsupported("suffix", "not supported by this server")
    if req.best_of not in (None, req.n):
        raise unsupported("best_of", "only best_of = n is supported")
    if req.logprobs is not None and not 0 <= req.logprobs <= 20:
        raise APIError(400, f"logprobs: must be between 0 and 20 (got {req.logprobs})", param="logprobs",
                       code="invalid_value")
    if req.echo and req.logprobs is not None:
        raise unsupported("echo", "echo with logprobs needs the prompt's logprobs, which the engine does not compute")
    prompts = _completion_prompts(req.prompt, tokenizer, limits)
    for ids in prompts:
        _check_prompt(ids, limits, "prompt")
    max_new = _max_new_tokens(req.max_tokens, max(len(p) for p in prompts), limits, "max_tokens")
    return EngineInput(prompts, _sampling_params(req, max_new, req.logprobs is not None, req.logprobs or 0, limits))


def chat_input(req: ChatCompletionRequest, tokenizer: Any, limits: Limits) -> EngineInput:
    check_model(req.model, limits)
    if req.functions:
        raise unsupported("functions", "deprecated by OpenAI; use tools")
    if req.top_logprobs is not None and not 0 <= req.top_logprobs <= 20:
        raise APIError(400, f"top_logprobs: must be between 0 and 20 (got {req.top_logprobs})", param="top_logprobs",
                       code="invalid_value")
    if req.top_logprobs and not req.logprobs:
        raise APIError(400, "top_logprobs: needs logprobs=true", param="top_logprobs", code="invalid_value")
    kwargs = req.chat_template_kwargs or {}
    template = kwargs.get("chat_template")
    if template is not None and not limits.config.trust_request_chat_template:
        raise APIError(400, "chat_template_kwargs: a chat template of the request's own runs only on a server "
                            "started with --trust-request-chat-template", param="chat_template_kwargs",
                       code="invalid_value")
    if template is not None and not (isinstance(template, str) and len(template) <= MAX_TEMPLATE_CHARS):
        raise APIError(400, f"chat_template_kwargs: chat_template must be a string of at most {MAX_TEMPLATE_CHARS} "
                            "characters", param="chat_template_kwargs", code="invalid_value")
    messages, tool_kwargs = tools.conversation(req, getattr(tokenizer, "chat_template", None) or "")
    ids = chat_prompt(tokenizer, messages, req.add_generation_prompt, req.continue_final_message,
                      {**kwargs, **tool_kwargs}, limits)
    _check_prompt(ids, limits, "messages")
    asked, param = ((req.max_completion_tokens, "max_completion_tokens") if req.max_completion_tokens is not None
                    else (req.max_tokens, "max_tokens"))
    max_new = _max_new_tokens(asked, len(ids), limits, param)
    return EngineInput([ids], _sampling_params(req, max_new, req.logprobs, req.top_logprobs or 0, limits,
                                               tools.constraint(req)))


def tokenize_input(req: TokenizeRequest, tokenizer: Any, limits: Limits) -> list[int]:
    """vLLM's ``/tokenize``: the text's token ids, or the messages' through the chat template."""
    check_model(req.model, limits)
    if (req.prompt is None) == (req.messages is None):
        raise APIError(400, "give either prompt or messages", param="prompt", code="invalid_value")
    if req.messages is not None:
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        return chat_prompt(tokenizer, messages, req.add_generation_prompt, req.continue_final_message, None, limits)
    _check_chars(req.prompt, limits, "prompt")
    return list(tokenizer(req.prompt, add_special_tokens=req.add_special_tokens)["input_ids"])


def chat_prompt(tokenizer: Any, conversation: list[dict[str, Any]], add_generation_prompt: bool,
                continue_final_message: bool, template_kwargs: dict[str, Any] | None, limits: Limits) -> list[int]:
    if not getattr(tokenizer, "chat_template", None):
        raise APIError(400, "messages: the model has no chat template; use /v1/completions", param="messages",
                       code="invalid_value")
    if continue_final_message and add_generation_prompt:
        raise APIError(400, "continue_final_message: cannot be combined with add_generation_prompt",
                       param="continue_final_message", code="invalid_value")
    _check_chars("".join(m["content"] for m in conversation), limits, "messages")
    try:
        text = tokenizer.apply_chat_template(
            conversation, add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message, tokenize=False, **(template_kwargs or {}))
    except Exception as exc:  # the template's own checks (jinja raise_exception), bad kwargs
        raise APIError(400, f"messages: the chat template refused them: {exc}", param="messages",
                       code="invalid_value") from None
    _check_chars(text, limits, "messages")
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


# ---- the parts -------------------------------------------------------------------------------------------------
def _completion_prompts(prompt: Any, tokenizer: Any, limits: Limits) -> list[list[int]]:
    """OpenAI's four prompt forms (text, texts, token ids, lists of token ids) as lists of token ids."""
    if isinstance(prompt, str):
        prompts: list[Any] = [prompt]
    elif prompt and all(isinstance(p, int) for p in prompt):
        prompts = [prompt]
    else:
        prompts = list(prompt)
    if not prompts:
        raise APIError(400, "prompt: must not be empty", param="prompt", code="invalid_value")
    if len(prompts) > limits.config.max_prompts:
        raise APIError(400, f"prompt: at most {limits.config.max_prompts} prompts per request", param="prompt",
                       code="invalid_value")
    for p in prompts:
        if isinstance(p, str):
            _check_chars(p, limits, "prompt")
    return [list(tokenizer(p)["input_ids"]) if isinstance(p, str) else list(p) for p in prompts]


def _check_chars(text: str, limits: Limits, param: str) -> None:
    if len(text) > limits.max_prompt_chars:
        raise APIError(400, f"{param}: {len(text)} characters; this server takes prompts of at most "
                            f"{limits.max_prompt_tokens} tokens", param=param, code="context_length_exceeded")


def _check_prompt(ids: list[int], limits: Limits, param: str) -> None:
    if not ids:
        raise APIError(400, f"{param}: the prompt is empty", param=param, code="invalid_value")
    if len(ids) > limits.max_prompt_tokens:
        raise APIError(400, f"{param}: the prompt has {len(ids)} tokens; this server takes at most "
                            f"{limits.max_prompt_tokens}", param=param, code="context_length_exceeded")
    check_token_ids(ids, limits, param)


def _max_new_tokens(asked: int | None, prompt_len: int, limits: Limits, param: str) -> int:
    most = limits.config.max_tokens
    if asked is None:  # up to the context and the pool, as vLLM
        return max(1, min(most, limits.max_model_len - prompt_len, limits.kv_tokens - prompt_len))
    if asked < 1:
        raise APIError(400, f"{param}: must be at least 1 (got {asked})", param=param, code="invalid_value")
    if asked > most:
        raise APIError(400, f"{param}: at most {most} on this server (got {asked})", param=param,
                       code="invalid_value")
    return asked


def _structured_outputs(req: CompletionRequest | ChatCompletionRequest,
                        tool_constraint: StructuredOutputs | None) -> StructuredOutputs | None:
    """The one constraint a request asks for, under any of its names (400 for two)."""
    given: list[tuple[str, StructuredOutputs]] = []
    response_format = getattr(req, "response_format", None)
    if response_format is not None and response_format.type == "json_object":
        given.append(("response_format", StructuredOutputs(json_object=True)))
    elif response_format is not None and response_format.type == "json_schema":
        if response_format.json_schema is None or not response_format.json_schema.json_schema:
            raise APIError(400, "response_format: json_schema needs a schema", param="response_format",
                           code="invalid_value")
        given.append(("response_format", StructuredOutputs(json=response_format.json_schema.json_schema)))
    if req.structured_outputs is not None:
        known = {"json", "json_object", "regex", "choice", "grammar"}
        if not set(req.structured_outputs) <= known:
            raise APIError(400, f"structured_outputs: takes {', '.join(sorted(known))}", param="structured_outputs",
                           code="invalid_value")
        given.append(("structured_outputs", StructuredOutputs(**req.structured_outputs)))
    for name, key in (("guided_json", "json"), ("guided_regex", "regex"), ("guided_choice", "choice"),
                      ("guided_grammar", "grammar")):
        if getattr(req, name) is not None:
            given.append((name, StructuredOutputs(**{key: getattr(req, name)})))
    if tool_constraint is not None:
        given.append(("tool_choice", tool_constraint))
    if len(given) > 1:
        raise APIError(400, f"{given[1][0]}: one output constraint at most (also given: {given[0][0]})",
                       param=given[1][0], code="invalid_value")
    return given[0][1] if given else None


def _sampling_params(req: CompletionRequest | ChatCompletionRequest, max_new_tokens: int, logprobs: bool,
                     top_logprobs: int, limits: Limits, tool_constraint: StructuredOutputs | None = None
                     ) -> SamplingParams:
    """The request's sampling parameters, its ``n`` samples one engine group (sample ``i`` seeded ``seed + i``);
    validated by the engine's rules, whose ValueError becomes a 400."""
    max_n = limits.config.max_n
    if req.n < 1 or req.n > max_n:
        raise APIError(400, f"n: must be between 1 and {max_n} on this server (got {req.n})", param="n",
                       code="invalid_value")
    if req.logit_bias:
        raise unsupported("logit_bias", "not supported by this server")
    if req.seed is not None and not -(1 << 63) <= req.seed < (1 << 63) - max_n:  # room for seed + i
        raise APIError(400, "seed: must be a 64-bit integer", param="seed", code="invalid_value")
    temperature = 1.0 if req.temperature is None else req.temperature
    if 0 < temperature < 1e-5:  # as vLLM: too small to sample with, so greedy
        temperature = 0.0
    params = SamplingParams(
        max_new_tokens=max_new_tokens, min_new_tokens=req.min_tokens, temperature=temperature,
        top_k=0 if req.top_k in (None, -1) else req.top_k, top_p=1.0 if req.top_p is None else req.top_p,
        min_p=req.min_p or 0.0, repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
        presence_penalty=req.presence_penalty or 0.0, frequency_penalty=req.frequency_penalty or 0.0,
        seed=req.seed, stop=[req.stop] if isinstance(req.stop, str) else list(req.stop or []),
        stop_token_ids=list(req.stop_token_ids or []), ignore_eos=req.ignore_eos, logprobs=logprobs,
        top_logprobs=top_logprobs, n=req.n, structured_outputs=_structured_outputs(req, tool_constraint))
    try:
        params.validate()
    except ValueError as exc:
        raise engine_error(exc) from None
    return params
