"""Tool calling on the chat endpoint: the request's tools shown to the model, ``tool_choice`` enforced, the output
read back as OpenAI ``tool_calls``. Pure: no I/O, no engine.

- The tools reach the model through its own chat template when the template renders ``tools``; otherwise as the
  Hermes-style system prompt most open chat models are trained on (``<tools>`` JSON, calls in ``<tool_call>`` tags).
  Earlier calls (an assistant message's ``tool_calls``) are written back in the same format.
- ``required`` and a named function are constraints for the structured-output engine (as vLLM does it): a named
  function's output is its arguments object; ``required``'s is a JSON array of ``{"name", "arguments"}`` calls, one
  at most without ``parallel_tool_calls``. So their calls are always valid JSON for the function's schema.
- ``auto``: the output is parsed for calls in the common formats: Hermes / Qwen ``<tool_call>{...}</tool_call>``,
  Mistral ``[TOOL_CALLS] [...]``, and Llama 3's bare ``{"name": ..., "parameters": ...}`` (after an optional
  ``<|python_tag|>``).
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

from ..core.structured_output import StructuredOutputs
from .protocol import APIError, ChatCompletionRequest, ChatMessage, NamedToolChoice, Tool

_HERMES_CALL = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)


def _system_prompt(tools: list[Tool]) -> str:
    listed = "\n".join(json.dumps(t.model_dump(exclude_none=True)) for t in tools)
    return ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with "
            f"function signatures within <tools></tools> XML tags:\n<tools>\n{listed}\n</tools>\n\nFor each function "
            "call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n"
            '<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>')


def _call_text(message: ChatMessage) -> str:
    calls = "\n".join('<tool_call>\n{"name": %s, "arguments": %s}\n</tool_call>'
                      % (json.dumps(c.function.name), c.function.arguments or "{}") for c in message.tool_calls or [])
    return "\n".join(part for part in (message.text(), calls) if part)


def offered(req: ChatCompletionRequest) -> bool:
    """Whether the request offers the model tools (some, and ``tool_choice`` not ``none``)."""
    return bool(req.tools) and req.tool_choice != "none"


def conversation(req: ChatCompletionRequest, template: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The messages as the chat template takes them, and the template's extra arguments (``tools`` where the
    template renders them itself)."""
    native = "tools" in template
    messages = []
    for m in req.messages:
        entry: dict[str, Any] = {"role": m.role, "content": m.text()}
        if m.name:
            entry["name"] = m.name
        if m.tool_calls:
            if native and "tool_calls" in template:
                entry["tool_calls"] = [c.model_dump(exclude_none=True) for c in m.tool_calls]
            else:
                entry["content"] = _call_text(m)
        if m.tool_call_id:
            entry["tool_call_id"] = m.tool_call_id
        messages.append(entry)
    if not offered(req):
        return messages, {}
    if native:
        return messages, {"tools": [t.model_dump(exclude_none=True) for t in req.tools]}
    prompt = _system_prompt(req.tools)
    if messages and messages[0]["role"] in ("system", "developer"):
        messages[0] = {**messages[0], "content": messages[0]["content"] + "\n\n" + prompt}
    else:
        messages.insert(0, {"role": "system", "content": prompt})
    return messages, {}


def _named(req: ChatCompletionRequest) -> Tool | None:
    if not isinstance(req.tool_choice, NamedToolChoice):
        return None
    name = req.tool_choice.function.get("name")
    for tool in req.tools or []:
        if tool.function.name == name:
            return tool
    raise APIError(400, f"tool_choice: no tool named {name!r} among tools", param="tool_choice", code="invalid_value")


def _parameters(tool: Tool) -> dict[str, Any]:
    return tool.function.parameters or {"type": "object"}


def constraint(req: ChatCompletionRequest) -> StructuredOutputs | None:
    """The structured-output constraint ``tool_choice`` asks for (None for ``auto`` / ``none`` / no tools)."""
    if req.tool_choice not in (None, "none", "auto") and not req.tools:
        raise APIError(400, "tool_choice: needs tools", param="tool_choice", code="invalid_value")
    named = _named(req)
    if named is not None:
        return StructuredOutputs(json=_parameters(named))
    if req.tool_choice != "required":
        return None
    calls = [{"type": "object", "properties": {"name": {"const": t.function.name}, "arguments": _parameters(t)},
              "required": ["name", "arguments"], "additionalProperties": False} for t in req.tools]
    array: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"anyOf": calls}}
    if not req.parallel_tool_calls:
        array["maxItems"] = 1
    return StructuredOutputs(json=array)


def _call(name: str, arguments: Any) -> dict[str, Any]:
    text = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function", "function": {"name": name, "arguments": text}}


def _json_calls(text: str, names: set[str]) -> list[dict[str, Any]] | None:
    """Calls from JSON text: one object or a list of objects, each ``name`` + ``arguments`` / ``parameters``."""
    try:
        data = json.loads(text)
    except ValueError:
        return None
    items = data if isinstance(data, list) else [data]
    calls = []
    for item in items:
        if not (isinstance(item, dict) and item.get("name") in names):
            return None
        calls.append(_call(item["name"], item.get("arguments", item.get("parameters", {}))))
    return calls or None


def parse(text: str, req: ChatCompletionRequest) -> tuple[str | None, list[dict[str, Any]]]:
    """The answer's content and its tool calls (content None when the whole output is calls)."""
    if not offered(req):
        return text, []
    named = _named(req)
    if named is not None:
        return None, [_call(named.function.name, text.strip())]
    names = {t.function.name for t in req.tools}
    if req.tool_choice == "required":
        return None, _json_calls(text, names) or []
    if "<tool_call>" in text:
        found = [_json_calls(body, names) for body in _HERMES_CALL.findall(text)]
        if found and all(found):
            content = text[: text.index("<tool_call>")].strip()
            return content or None, [c for calls in found for c in calls]
    if "[TOOL_CALLS]" in text:
        calls = _json_calls(text.split("[TOOL_CALLS]", 1)[1].strip(), names)
        if calls:
            return text.split("[TOOL_CALLS]", 1)[0].strip() or None, calls
    calls = _json_calls(text.replace("<|python_tag|>", "").strip(), names)
    if calls:
        return None, calls
    return text, []


def may_be_calls(text: str) -> bool:
    """Whether streamed text could still turn out to be tool calls (``auto``): held back until it is decided."""
    start = text.lstrip().replace("<|python_tag|>", "")
    if not start:
        return True
    return any(marker.startswith(start[: len(marker)]) for marker in ("<tool_call>", "[TOOL_CALLS]", "{", "["))
