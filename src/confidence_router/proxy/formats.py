"""Wire formats of the proxy's two fronts, to and from LangChain messages.

OpenAI chat completions (requests, responses, stream chunks, errors) and the Ollama chat API
(the request parsing and reply objects come from :mod:`confidence_router.serving.protocol`,
the same code the test-bed Ollama server speaks). No HTTP framework here.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    BaseMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
)

from confidence_router.errors import InvalidArgumentError
from confidence_router.serving.protocol import ChatRequest

__all__ = [
    "ROUTING_HEADERS",
    "OpenAIRequest",
    "RequestError",
    "finish_reason",
    "ollama_messages",
    "openai_chunk",
    "openai_error",
    "openai_response",
    "parse_openai_request",
    "routing_headers",
    "structured_schema",
]

#: Response headers carrying the decision (the full record is the ``routing`` field).
ROUTING_HEADERS = (
    "x-confidence-router-decision",
    "x-confidence-router-reason",
    "x-confidence-router-confidence",
    "x-confidence-router-tier",
)


class RequestError(InvalidArgumentError):
    """A malformed request: 400 with ``message``; ``param`` names the offending field."""

    def __init__(self, message: str, *, param: str | None = None, status: int = 400) -> None:
        super().__init__(message)
        self.param = param
        self.status = status


# ---------------------------------------------------------------------------------------------
# Routing decision -> headers
# ---------------------------------------------------------------------------------------------


def routing_headers(routing: Mapping[str, Any] | None, tier: str | None = None) -> dict[str, str]:
    """The ``x-confidence-router-*`` response headers of a decision.

    ``tier`` is the model that produced the answer (falls back to the decision, ``local`` or
    ``cloud``); ``confidence`` is ``unknown`` when the local answer had no score.
    """
    if not routing:
        return {}
    confidence = routing.get("confidence")
    return {
        "x-confidence-router-decision": str(routing.get("decision")),
        "x-confidence-router-reason": str(routing.get("reason")),
        "x-confidence-router-confidence": (
            "unknown" if confidence is None else format(float(confidence), ".6g")
        ),
        "x-confidence-router-tier": _header_safe(tier or str(routing.get("decision"))),
    }


def _header_safe(text: str) -> str:
    return "".join(c if 32 <= ord(c) < 127 else "?" for c in text)[:200]


def jsonable(value: Any) -> Any:
    """``value`` as strict JSON data: non-finite floats become ``None`` and anything JSON
    cannot hold becomes its ``str`` (routing records are plain data; this keeps one odd field
    from breaking a response)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (str, int, bool)):
        return value
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return str(value)


# ---------------------------------------------------------------------------------------------
# OpenAI
# ---------------------------------------------------------------------------------------------


@dataclass
class OpenAIRequest:
    """A validated ``/v1/chat/completions`` request."""

    model: str
    messages: list[BaseMessage]
    stream: bool = False
    include_usage: bool = False
    tools: list[dict[str, Any]] = field(default_factory=list)
    tool_choice: Any = None
    response_format: dict[str, Any] | None = None
    stop: list[str] | None = None


def openai_error(
    message: str, *, type_: str = "invalid_request_error", param: str | None = None,
    code: str | None = None,
) -> dict[str, Any]:
    """OpenAI's error body: ``{"error": {"message", "type", "param", "code"}}``."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def _parse_arguments(raw: Any, param: str) -> dict[str, Any]:
    if isinstance(raw, dict):
        return raw
    if raw in (None, ""):
        return {}
    try:
        args = json.loads(raw)
    except (TypeError, ValueError):
        raise RequestError(f"{param} must be a JSON object string", param=param) from None
    if not isinstance(args, dict):
        raise RequestError(f"{param} must encode a JSON object", param=param)
    return args


#: OpenAI content part types the router's tiers can take (others are a 400, not a 502 after
#: both tiers refused them).
_OPENAI_PART_TYPES = ("text", "image_url")


def _openai_parts(parts: list[Any], where: str, role: Any) -> list[str | dict[str, Any]]:
    """Validate a list of OpenAI content parts (text and images; an assistant's refusal is
    kept as text)."""
    checked: list[str | dict[str, Any]] = []
    for j, part in enumerate(parts):
        here = f"{where}.content[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "refusal" and role == "assistant" and isinstance(part.get("refusal"), str):
            checked.append({"type": "text", "text": part["refusal"]})
            continue
        if kind not in _OPENAI_PART_TYPES:
            raise RequestError(
                f"{here} must be a content part with type one of {list(_OPENAI_PART_TYPES)}, "
                f"got {kind if kind is not None else part!r}"[:300],
                param=here,
            )
        if kind == "text" and not isinstance(part.get("text"), str):
            raise RequestError(f"{here}.text must be a string", param=here)
        if kind == "image_url":
            image = part.get("image_url")
            url = image.get("url") if isinstance(image, dict) else image
            if not isinstance(url, str) or not url:
                raise RequestError(f"{here}.image_url.url must be a string", param=here)
            if not url.startswith("data:image/") or ";base64," not in url:
                # Neither tier fetches URLs: both would refuse it, after the local attempt.
                raise RequestError(
                    f"{here}.image_url.url must be a data:image/...;base64,... URL (images "
                    "are not fetched)", param=here)
        checked.append(part)
    return checked


def _openai_message(raw: Any, i: int) -> BaseMessage:
    where = f"messages[{i}]"
    if not isinstance(raw, dict):
        raise RequestError(f"{where} must be an object", param=where)
    role = raw.get("role")
    raw_content = raw.get("content")
    if raw_content is None:
        raw_content = ""
    if not isinstance(raw_content, (str, list)):
        raise RequestError(f"{where}.content must be a string or a list of parts",
                           param=f"{where}.content")
    content: str | list[str | dict[str, Any]] = (
        _openai_parts(raw_content, where, role) if isinstance(raw_content, list) else raw_content
    )
    if role in ("system", "developer"):
        return SystemMessage(content=content)
    if role == "user":
        return HumanMessage(content=content)
    if role == "assistant":
        tool_calls = []
        raw_calls = raw.get("tool_calls") or []
        if not isinstance(raw_calls, list):
            raise RequestError(f"{where}.tool_calls must be a list", param=f"{where}.tool_calls")
        for j, call in enumerate(raw_calls):
            fn = call.get("function") if isinstance(call, dict) else None
            if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                raise RequestError(f"{where}.tool_calls[{j}] needs function.name",
                                   param=f"{where}.tool_calls")
            tool_calls.append({
                "id": call.get("id") or f"call_{uuid.uuid4().hex[:12]}",
                "name": fn["name"],
                "args": _parse_arguments(fn.get("arguments"), f"{where}.tool_calls[{j}].arguments"),
            })
        return AIMessage(content=content, tool_calls=tool_calls)
    if role == "tool":
        call_id = raw.get("tool_call_id")
        if not isinstance(call_id, str) or not call_id:
            raise RequestError(f"{where}.tool_call_id is required for a tool message",
                               param=f"{where}.tool_call_id")
        return ToolMessage(content=content, tool_call_id=call_id)
    raise RequestError(f"{where}.role must be system, developer, user, assistant or tool, "
                       f"got {role!r}", param=f"{where}.role")


def parse_openai_request(body: Any) -> OpenAIRequest:
    """Validate a chat-completions body (routing knobs are parsed separately).

    Raises:
        RequestError: a missing or malformed field, or ``n`` > 1 (one answer per request).
    """
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise RequestError("model is required (any name: the router picks the tier)",
                           param="model")
    raw_messages = body.get("messages")
    if not isinstance(raw_messages, list) or not raw_messages:
        raise RequestError("messages must be a non-empty list", param="messages")
    messages = [_openai_message(m, i) for i, m in enumerate(raw_messages)]
    n = body.get("n", 1)
    if n is not None and (isinstance(n, bool) or n != 1):
        raise RequestError("only n=1 is supported (one routed answer per request)", param="n")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise RequestError("stream must be a boolean", param="stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise RequestError("stream_options must be an object", param="stream_options")
    tools = body.get("tools") or []
    if not isinstance(tools, list) or not all(
        isinstance(t, dict) and isinstance(t.get("function"), dict)
        and isinstance(t["function"].get("name"), str)
        for t in tools
    ):
        raise RequestError("tools must be a list of {type: function, function: {name, ...}}",
                           param="tools")
    for i, tool in enumerate(tools):
        if tool["function"].get("parameters") is not None and not isinstance(
            tool["function"]["parameters"], dict
        ):
            raise RequestError(f"tools[{i}].function.parameters must be a JSON schema object",
                               param="tools")
    tool_choice = body.get("tool_choice")
    _check_tool_choice(tool_choice, tools)
    response_format = body.get("response_format")
    if response_format is not None:
        structured_schema(response_format)  # validates
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and (not isinstance(stop, list) or not all(isinstance(s, str) for s in stop)):
        raise RequestError("stop must be a string or a list of strings", param="stop")
    return OpenAIRequest(
        model=model,
        messages=messages,
        stream=stream,
        include_usage=bool(options.get("include_usage")),
        tools=tools,
        tool_choice=tool_choice,
        response_format=response_format,
        stop=stop or None,
    )


def _check_tool_choice(choice: Any, tools: list[dict[str, Any]]) -> None:
    """``tool_choice``: ``none``, ``auto``, ``required`` or ``{"type": "function",
    "function": {"name": <one of tools>}}``."""
    if choice == "required" and not tools:
        raise RequestError('tool_choice "required" needs tools', param="tool_choice")
    if choice is None or choice in ("none", "auto", "required"):
        return
    function = choice.get("function") if isinstance(choice, dict) else None
    name = function.get("name") if isinstance(function, dict) else None
    if not isinstance(name, str):
        raise RequestError(
            'tool_choice must be "none", "auto", "required" or {"type": "function", '
            '"function": {"name": ...}}', param="tool_choice")
    if name not in {t["function"]["name"] for t in tools}:
        raise RequestError(f"tool_choice names {name!r}, which is not in tools",
                           param="tool_choice")


def structured_schema(response_format: Any) -> dict[str, Any] | None:
    """The JSON schema a ``response_format`` asks for (``None`` for plain text or JSON mode).

    Raises:
        RequestError: not ``{"type": "text" | "json_object" | "json_schema", ...}`` or a
            ``json_schema`` without a ``schema`` object.
    """
    if not isinstance(response_format, dict):
        raise RequestError("response_format must be an object", param="response_format")
    kind = response_format.get("type")
    if kind in ("text", "json_object"):
        return None
    if kind != "json_schema":
        raise RequestError("response_format.type must be text, json_object or json_schema",
                           param="response_format.type")
    spec = response_format.get("json_schema")
    if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
        raise RequestError("response_format.json_schema.schema must be a JSON schema object",
                           param="response_format.json_schema")
    schema = dict(spec["schema"])
    schema.setdefault("title", spec.get("name") or "response")
    if spec.get("description"):
        schema.setdefault("description", spec["description"])
    return schema


def finish_reason(message: BaseMessage) -> str:
    """OpenAI's ``finish_reason`` from either tier's stop reason."""
    if getattr(message, "tool_calls", None):
        return "tool_calls"
    meta = message.response_metadata or {}
    raw = str(meta.get("done_reason") or meta.get("stopReason") or meta.get("stop_reason") or "")
    if raw in ("length", "max_tokens"):
        return "length"
    if raw in ("content_filtered", "guardrail_intervened"):
        return "content_filter"
    return "stop"


def openai_tool_calls(message: BaseMessage) -> list[dict[str, Any]]:
    """``message.tool_calls`` in OpenAI's shape (arguments as a JSON string)."""
    return [
        {
            "id": call.get("id") or f"call_{uuid.uuid4().hex[:12]}",
            "type": "function",
            "function": {"name": call["name"], "arguments": json.dumps(call.get("args") or {})},
        }
        for call in getattr(message, "tool_calls", None) or []
    ]


def openai_usage(message: BaseMessage) -> dict[str, int]:
    """``usage`` from the answer's token counts (0 when the provider reported none)."""
    usage = getattr(message, "usage_metadata", None) or {}
    prompt = int(usage.get("input_tokens") or 0)
    completion = int(usage.get("output_tokens") or 0)
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": int(usage.get("total_tokens") or prompt + completion)}


def new_completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def openai_response(
    message: BaseMessage, routing: Mapping[str, Any] | None, *, model: str,
    content: str | None = None,
) -> dict[str, Any]:
    """A ``chat.completion`` object with the ``routing`` record attached."""
    tool_calls = openai_tool_calls(message)
    text = message.text if content is None else content
    reply: dict[str, Any] = {"role": "assistant", "content": text if (text or not tool_calls) else None}
    if tool_calls:
        reply["tool_calls"] = tool_calls
    return {
        "id": new_completion_id(),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": reply, "logprobs": None,
                     "finish_reason": finish_reason(message)}],
        "usage": openai_usage(message),
        "routing": jsonable(dict(routing or {})),
    }


def openai_chunk(
    completion_id: str, created: int, model: str, *, delta: dict[str, Any] | None = None,
    finish: str | None = None, usage: dict[str, int] | None = None,
    routing: Mapping[str, Any] | None = None, with_choice: bool = True,
) -> dict[str, Any]:
    """One ``chat.completion.chunk``; the finishing chunk carries ``routing``."""
    chunk: dict[str, Any] = {
        "id": completion_id, "object": "chat.completion.chunk", "created": created,
        "model": model,
        "choices": [{"index": 0, "delta": delta or {}, "logprobs": None, "finish_reason": finish}]
        if with_choice else [],
    }
    if usage is not None:
        chunk["usage"] = usage
    if routing is not None:
        chunk["routing"] = jsonable(dict(routing))
    return chunk


def chunk_delta(chunk: AIMessageChunk, first: bool) -> dict[str, Any] | None:
    """The OpenAI ``delta`` of one LangChain chunk (``None`` when it carries nothing)."""
    delta: dict[str, Any] = {}
    if first:
        delta["role"] = "assistant"
    text = chunk.text
    if text:
        delta["content"] = text
    calls = []
    for call in chunk.tool_call_chunks or []:
        entry: dict[str, Any] = {"index": call.get("index") or 0}
        if call.get("id"):
            entry["id"] = call["id"]
            entry["type"] = "function"
        fn: dict[str, Any] = {}
        if call.get("name"):
            fn["name"] = call["name"]
        if call.get("args"):
            fn["arguments"] = call["args"]
        entry["function"] = fn
        calls.append(entry)
    if calls:
        delta["tool_calls"] = calls
    if not delta or delta == {"role": "assistant"} and not first:
        return None
    return delta


# ---------------------------------------------------------------------------------------------
# Ollama
# ---------------------------------------------------------------------------------------------


def ollama_messages(request: ChatRequest) -> list[BaseMessage]:
    """LangChain messages from a parsed ``/api/chat`` request.

    Ollama's tool results name the tool, not the call: each is matched to the latest
    assistant tool call of that name.

    Raises:
        RequestError: an unknown role, or content that is not a string.
    """
    messages: list[BaseMessage] = []
    call_ids: dict[str, str] = {}
    for i, raw in enumerate(request.messages):
        role = raw.get("role")
        content = raw.get("content") or ""
        if not isinstance(content, str):
            raise RequestError(f"messages[{i}].content must be a string")
        images = raw.get("images") or []
        if images and role != "user":
            raise RequestError(f"messages[{i}].images: only user messages can carry images")
        if role == "system":
            messages.append(SystemMessage(content=content))
        elif role == "user" and images:
            # Both tiers take LangChain's standard image blocks (Ollama: "images"; Bedrock:
            # an image content block), so the picture is never silently dropped.
            blocks: list[str | dict[str, Any]] = [{"type": "text", "text": content}] if content else []
            blocks += [_image_block(image, f"messages[{i}].images[{j}]")
                       for j, image in enumerate(images)]
            messages.append(HumanMessage(content=blocks))
        elif role == "user":
            messages.append(HumanMessage(content=content))
        elif role == "assistant":
            calls = []
            for call in raw.get("tool_calls") or []:
                fn = call.get("function") if isinstance(call, dict) else None
                if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                    raise RequestError(f"messages[{i}].tool_calls need function.name")
                call_id = f"call_{uuid.uuid4().hex[:12]}"
                call_ids[fn["name"]] = call_id
                calls.append({"id": call_id, "name": fn["name"],
                              "args": _parse_arguments(fn.get("arguments"), "arguments")})
            messages.append(AIMessage(content=content, tool_calls=calls))
        elif role == "tool":
            name = raw.get("tool_name") or raw.get("name") or ""
            messages.append(ToolMessage(content=content,
                                        tool_call_id=call_ids.get(name, name or "tool")))
        else:
            raise RequestError(f"messages[{i}].role must be system, user, assistant or tool, "
                               f"got {role!r}")
    if not messages:
        raise RequestError("messages must not be empty")
    return messages


#: Leading bytes of the image formats both tiers accept (Bedrock: png, jpeg, gif, webp).
_IMAGE_SIGNATURES = ((b"\x89PNG\r\n\x1a\n", "image/png"), (b"\xff\xd8\xff", "image/jpeg"),
                     (b"GIF87a", "image/gif"), (b"GIF89a", "image/gif"))


def _image_block(data: str, where: str) -> dict[str, Any]:
    """A LangChain image block from an Ollama ``images`` entry (base64, format sniffed)."""
    try:
        head = base64.b64decode(data[:64], validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(f"{where} is not base64") from None
    mime = next((m for sig, m in _IMAGE_SIGNATURES if head.startswith(sig)), None)
    if mime is None and head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        mime = "image/webp"
    if mime is None:
        raise RequestError(f"{where} is not a PNG, JPEG, GIF or WebP image")
    return {"type": "image", "base64": data, "mime_type": mime}


def ollama_tool_calls(message: BaseMessage) -> list[dict[str, Any]]:
    """``message.tool_calls`` in Ollama's shape (arguments as an object)."""
    return [{"function": {"name": c["name"], "arguments": c.get("args") or {}}}
            for c in getattr(message, "tool_calls", None) or []]


def ollama_final_fields(message: BaseMessage, started_ns: int) -> dict[str, Any]:
    """The fields Ollama puts on its last reply object."""
    usage = getattr(message, "usage_metadata", None) or {}
    total = time.perf_counter_ns() - started_ns
    return {
        "done_reason": "length" if finish_reason(message) == "length" else "stop",
        "total_duration": total, "load_duration": 0, "prompt_eval_duration": 0,
        "eval_duration": total,
        "prompt_eval_count": int(usage.get("input_tokens") or 0),
        "eval_count": int(usage.get("output_tokens") or 0),
    }


def ollama_schema(request: ChatRequest) -> dict[str, Any] | None:
    """The JSON schema of ``format`` when it is one (``"json"`` is plain JSON mode)."""
    fmt = request.format
    if fmt in (None, "", "json"):
        return None
    if not isinstance(fmt, dict):
        raise RequestError("format must be \"json\" or a JSON schema object")
    return {"title": "response", **fmt}


def tool_specs(tools: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """OpenAI/Ollama tool definitions (the same shape) as plain dicts for ``bind_tools``."""
    return [{"type": "function", "function": dict(t["function"])} for t in tools]
