"""A fake ``bedrock-runtime`` endpoint (Converse and InvokeModel APIs) for offline tests.

Stdlib only. Point the unchanged ``ChatBedrockConverse`` or ``ChatBedrock`` (or a plain boto3
``bedrock-runtime`` client) at it with ``endpoint_url``; the real serializer, SigV4 signer,
HTTP stack and event-stream parser all run, only the model is scripted. Both clients need a
region and credentials, which may be dummies: ``region_name="us-east-1",
aws_access_key_id="test", aws_secret_access_key="test"``.

Usage::

    from confidence_router.testing import FakeBedrockServer
    from langchain_aws import ChatBedrockConverse

    with FakeBedrockServer() as bedrock:
        bedrock.add_answer("capital of France", "Paris.", input_tokens=12, output_tokens=2)
        bedrock.fail("overloaded", "ThrottlingException", times=1)
        llm = ChatBedrockConverse(
            model="anthropic.claude-3-haiku-20240307-v1:0", region_name="us-east-1",
            endpoint_url=bedrock.url,
            aws_access_key_id="test", aws_secret_access_key="test",
        )
        reply = llm.invoke("What is the capital of France?")
        assert reply.content == "Paris."
        assert reply.usage_metadata["input_tokens"] == 12
        assert bedrock.requests[-1]["model_id"] == "anthropic.claude-3-haiku-20240307-v1:0"

The same scripted answer serves ``ChatBedrock`` (InvokeModel with Anthropic's messages body)::

        chat = ChatBedrock(
            model_id="anthropic.claude-3-haiku-20240307-v1:0", region_name="us-east-1",
            endpoint_url=bedrock.url,
            aws_access_key_id="test", aws_secret_access_key="test",
        )
        chat.invoke("What is the capital of France?").content        # "Paris."
        bedrock.requests[-1]["operation"]                             # "invoke"

Endpoints:

* ``POST /model/{modelId}/converse`` (JSON) and ``POST /model/{modelId}/converse-stream``
  (binary ``application/vnd.amazon.eventstream`` frames: ``messageStart``,
  ``contentBlockStart`` for tool use, ``contentBlockDelta`` per piece, ``contentBlockStop``,
  ``messageStop``, ``metadata``).
* ``POST /model/{modelId}/invoke``: an Anthropic messages request body
  (``anthropic_version``, ``max_tokens``, ``messages``, optional ``system`` and ``tools``);
  the reply is an Anthropic message (``content`` text and ``tool_use`` blocks,
  ``stop_reason``, ``usage``) with the ``x-amzn-bedrock-input-token-count`` /
  ``-output-token-count`` headers ChatBedrock reads its usage from.
* ``POST /model/{modelId}/invoke-with-response-stream``: event-stream ``chunk`` frames whose
  ``bytes`` carry Anthropic streaming events (``message_start``, ``content_block_start``,
  ``content_block_delta`` with ``text_delta`` / ``input_json_delta``, ``content_block_stop``,
  ``message_delta`` with ``stop_reason`` and output usage, ``message_stop`` with
  ``amazon-bedrock-invocationMetrics``).

Stop reasons are scripted in Converse terms and translated for InvokeModel:
``content_filtered`` becomes Anthropic's ``refusal``; ``guardrail_intervened`` becomes
``end_turn`` with ``"amazon-bedrock-guardrailAction": "INTERVENED"`` in the body (on
InvokeModel a guardrail reports itself in the body, not in the stop reason); others
(``end_turn``, ``tool_use``, ``max_tokens``, ``stop_sequence``, ``refusal``) pass unchanged.

Tools are checked as Bedrock checks them (a ``ValidationException``, the request still
recorded): a tool name that is not 1-64 of ``[a-zA-Z0-9_-]``, a tool choice naming a tool the
request does not define (or, on InvokeModel, of an unknown type), and a tool result whose id
answers no tool use of the previous assistant turn.

Errors carry ``x-amzn-ErrorType`` and ``{"message": ...}``, so botocore raises the modelled
exception (``client.exceptions.ThrottlingException``, ...), on every operation.

Connection faults: :meth:`FakeBedrockServer.drop` closes the connection before any response,
or mid-stream after some pieces (no exception event, no final frame). ``in_flight`` counts the
requests still being answered (0 once the server is idle, e.g. after clients gave up).

Rule matching works like :class:`~confidence_router.testing.ScriptedBackend`: a ``str``
matches as a substring of the last user text, a regex with ``search``, a callable receives
the :class:`RecordedBedrockRequest`, ``None`` matches all; failures before answers, first
non-exhausted match wins.

Note that botocore retries throttling and 5xx errors (with backoff: seconds per test) unless
retries are off: ``ChatBedrockConverse(..., max_retries=0)`` or, for boto3 clients,
``Config(retries={"total_max_attempts": 1})``. Beware: botocore's ``retries={"max_attempts": 1}``
means one *retry* (two attempts). Each attempt is a separate request here and counts against a
rule's ``times``.
"""

from __future__ import annotations

import base64
import json
import re
import struct
import threading
import time
import uuid
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, TypedDict, Union
from urllib.parse import unquote

from confidence_router.errors import InvalidArgumentError, InvalidTypeError
from confidence_router.serving.http import (
    DISCONNECT_ERRORS,
    BackgroundServer,
    JSONRequestHandler,
    QuietThreadingHTTPServer,
)
from confidence_router.testing.scripted import (
    RuleBook,
    ScriptedRule,
    check_seconds,
    check_times,
    compile_matcher,
    content_text,
    last_user_text,
    split_words,
)

__all__ = [
    "BEDROCK_ERROR_STATUS",
    "BedrockMatcher",
    "FakeBedrockServer",
    "RecordedBedrockRequest",
    "encode_event_frame",
]

#: HTTP status per Bedrock error type (from the bedrock-runtime service model).
BEDROCK_ERROR_STATUS: dict[str, int] = {
    "ValidationException": 400,
    "AccessDeniedException": 403,
    "ResourceNotFoundException": 404,
    "ModelTimeoutException": 408,
    "ModelErrorException": 424,
    "ThrottlingException": 429,
    "ModelNotReadyException": 429,
    "InternalServerException": 500,
    "ServiceUnavailableException": 503,
}
# Error types the ConverseStream and InvokeModelWithResponseStream output unions can carry
# as in-stream exception events.
_STREAM_EXCEPTIONS = {
    "InternalServerException": "internalServerException",
    "ModelStreamErrorException": "modelStreamErrorException",
    "ValidationException": "validationException",
    "ThrottlingException": "throttlingException",
    "ServiceUnavailableException": "serviceUnavailableException",
}
_PATH_RE = re.compile(
    r"^/model/(?P<model>.+)/"
    r"(?P<operation>converse|converse-stream|invoke|invoke-with-response-stream)$"
)
#: Operations that answer with an event stream.
_STREAMING_OPERATIONS = frozenset({"converse-stream", "invoke-with-response-stream"})
# Converse stop reasons that InvokeModel's Anthropic body spells differently.
_ANTHROPIC_STOP_REASONS = {"content_filtered": "refusal", "guardrail_intervened": "end_turn"}


class RecordedBedrockRequest(TypedDict):
    """One entry of :attr:`FakeBedrockServer.requests` (also what callable matchers get)."""

    model_id: str
    """The URL-decoded model id (``"anthropic.claude-3-haiku-20240307-v1:0"``)."""
    operation: str
    """``"converse"``, ``"converse-stream"``, ``"invoke"`` or ``"invoke-with-response-stream"``."""
    body: Any
    """The parsed JSON request body: Converse (``messages``, ``system``, ``inferenceConfig``,
    ...) or, for the invoke operations, Anthropic's (``anthropic_version``, ``max_tokens``,
    ``messages``, ``system``, ``tools``, ...)."""
    last_user_text: str
    """Concatenated text blocks of the last user message that has text."""


BedrockMatcher = Union[str, "re.Pattern[str]", Callable[[RecordedBedrockRequest], bool], None]


def encode_event_frame(headers: Mapping[str, str], payload: bytes) -> bytes:
    """Encode one AWS event-stream message (all header values are strings, type 7).

    Layout, big-endian: total length (4), headers length (4), CRC32 of those 8 bytes (4),
    headers, payload, CRC32 of everything before it (4). Each header is name length (1),
    name, value type 7 (1), value length (2), value.
    """
    header_bytes = b""
    for name, value in headers.items():
        name_b, value_b = name.encode("utf-8"), value.encode("utf-8")
        header_bytes += (
            struct.pack(">B", len(name_b)) + name_b + b"\x07" + struct.pack(">H", len(value_b))
        ) + value_b
    total_length = 12 + len(header_bytes) + len(payload) + 4
    prelude = struct.pack(">II", total_length, len(header_bytes))
    message = prelude + struct.pack(">I", zlib.crc32(prelude)) + header_bytes + payload
    return message + struct.pack(">I", zlib.crc32(message))


def _event(event_type: str, payload: Mapping[str, Any]) -> bytes:
    return encode_event_frame(
        {
            ":event-type": event_type,
            ":content-type": "application/json",
            ":message-type": "event",
        },
        json.dumps(payload, separators=(",", ":")).encode("utf-8"),
    )


def _exception_event(exception_type: str, message: str) -> bytes:
    return encode_event_frame(
        {
            ":exception-type": exception_type,
            ":content-type": "application/json",
            ":message-type": "exception",
        },
        json.dumps({"message": message}).encode("utf-8"),
    )


@dataclass(frozen=True)
class _BedrockAnswer:
    pieces: tuple[str, ...]
    tool_use: tuple[dict[str, Any], ...]
    input_tokens: int | None
    output_tokens: int | None
    stop_reason: str
    latency: float
    piece_delay: float
    tool_input_chunk: int | None = None


def _input_pieces(tool_input: Any, chunk: int | None) -> list[str]:
    """A tool's input JSON as streamed: one piece, or pieces of ``chunk`` characters."""
    text = json.dumps(tool_input)
    if not chunk:
        return [text]
    return [text[i:i + chunk] for i in range(0, len(text), chunk)] or [text]


@dataclass(frozen=True)
class _BedrockFailure:
    error_type: str
    status: int
    message: str
    after_pieces: int | None
    drop: bool = False
    """Close the connection instead of answering with an error (see ``FakeBedrockServer.drop``)."""


def _normalise_tool_use(tool_use: Sequence[Mapping[str, Any]] | None) -> tuple[dict, ...]:
    if not tool_use:
        return ()
    if isinstance(tool_use, Mapping):
        raise InvalidTypeError("tool_use must be a list of {'name': ..., 'input': {...}} mappings")
    result = []
    for i, block in enumerate(tool_use):
        if not isinstance(block, Mapping) or not isinstance(block.get("name"), str):
            raise InvalidTypeError(f"tool_use[{i}] must look like {{'name': str, 'input': dict}}")
        tool_input = block.get("input", {})
        if not isinstance(tool_input, Mapping):
            raise InvalidTypeError(f"tool_use[{i}]['input'] must be a dict, got {tool_input!r}")
        entry = {"name": block["name"], "input": dict(tool_input)}
        if block.get("toolUseId") is not None:
            entry["toolUseId"] = str(block["toolUseId"])
        result.append(entry)
    return tuple(result)


def _words(text: str) -> int:
    return len(text.split())


def _content_words(content: Any) -> int:
    # A plain string (Anthropic's short form) or a list of blocks with "text" (both APIs).
    if isinstance(content, str):
        return _words(content)
    words = 0
    for block in content or ():
        if isinstance(block, Mapping):
            words += _words(content_text(block.get("text")))
    return words


def _count_input_tokens(body: Mapping[str, Any]) -> int:
    # Word counts stand in for a tokenizer: deterministic and growing with the prompt.
    words = _content_words(body.get("system"))
    for message in body.get("messages") or ():
        if isinstance(message, Mapping):
            words += _content_words(message.get("content"))
    return max(1, words)


def _invoke_body_error(body: Mapping[str, Any]) -> str | None:
    """What real Bedrock rejects in an Anthropic messages body (``None``: acceptable)."""
    if not isinstance(body.get("anthropic_version"), str):
        return "Malformed input request: #: required key [anthropic_version] not found"
    max_tokens = body.get("max_tokens")
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        return "Malformed input request: #/max_tokens: expected a positive integer"
    for i, message in enumerate(body["messages"]):
        if not isinstance(message, Mapping) or message.get("role") not in ("user", "assistant"):
            return f"Malformed input request: #/messages/{i}: role must be user or assistant"
    tools = body.get("tools") or []
    names = [tool.get("name") for tool in tools if isinstance(tool, Mapping)]
    choice = body.get("tool_choice")
    return _tool_names_error(names, "tools.{i}.name") or _tool_results_error(
        body["messages"], "tool_use", "tool_result", "id", "tool_use_id"
    ) or (_invoke_tool_choice_error(choice, names) if choice is not None else None)


#: A tool name Bedrock accepts (Converse ``toolSpec.name``; Anthropic's ``tools[].name``).
_TOOL_NAME_RE = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")


def _tool_names_error(names: Sequence[Any], where: str) -> str | None:
    for i, name in enumerate(names):
        if not isinstance(name, str) or not _TOOL_NAME_RE.match(name):
            return (f"{where.format(i=i)}: {name!r} must match the pattern "
                    "^[a-zA-Z0-9_-]{1,64}$")
    return None


def _invoke_tool_choice_error(choice: Any, names: Sequence[Any]) -> str | None:
    kind = choice.get("type") if isinstance(choice, Mapping) else None
    if kind not in ("auto", "any", "tool", "none"):
        return f"tool_choice: unknown type in {choice!r} (expected auto, any, tool or none)"
    if kind == "tool" and choice.get("name") not in names:
        return f"tool_choice: the tool {choice.get('name')!r} is not defined in tools"
    return None


def _converse_body_error(body: Mapping[str, Any]) -> str | None:
    """What real Bedrock rejects in a Converse body's tools (``None``: acceptable)."""
    config = body.get("toolConfig") or {}
    specs = [tool.get("toolSpec") for tool in config.get("tools") or [] if "toolSpec" in tool]
    names = [spec.get("name") for spec in specs if isinstance(spec, Mapping)]
    problem = _tool_names_error(names, "toolConfig.tools.{i}.toolSpec.name")
    if problem:
        return problem
    forced = (config.get("toolChoice") or {}).get("tool")
    if isinstance(forced, Mapping) and forced.get("name") not in names:
        return (f"toolConfig.toolChoice: the tool {forced.get('name')!r} is not defined in "
                "toolConfig.tools")
    return _tool_results_error(body["messages"], "toolUse", "toolResult", "toolUseId",
                               "toolUseId")


def _tool_results_error(
    messages: Sequence[Any], use: str, result: str, use_id: str, result_id: str
) -> str | None:
    """A tool result whose id answers no tool use of the previous assistant message."""
    previous: set[Any] = set()
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            continue
        blocks = [b for b in message.get("content") or [] if isinstance(b, Mapping)]
        if message.get("role") == "assistant":
            previous = {_block(b, use).get(use_id) for b in blocks if _block(b, use)}
            continue
        for block in blocks:
            answered = _block(block, result)
            if answered and answered.get(result_id) not in previous:
                return (f"messages.{i}.content: the {result} id {answered.get(result_id)!r} "
                        f"answers no {use} block of the previous assistant message")
        previous = set()
    return None


def _block(block: Mapping[str, Any], kind: str) -> Mapping[str, Any]:
    """The ``kind`` part of a content block, in Converse (``{kind: {...}}``) or Anthropic
    (``{"type": kind, ...}``) form; empty when it is another kind."""
    if block.get("type") == kind:
        return block
    inner = block.get(kind)
    return inner if isinstance(inner, Mapping) else {}


def _chunk_event(event: Mapping[str, Any]) -> bytes:
    """An InvokeModelWithResponseStream ``chunk`` frame carrying one Anthropic event."""
    data = json.dumps(event, separators=(",", ":")).encode("utf-8")
    return _event("chunk", {"bytes": base64.b64encode(data).decode("ascii")})


class _BedrockHandler(JSONRequestHandler):
    server: QuietThreadingHTTPServer

    @property
    def owner(self) -> FakeBedrockServer:
        return self.server.owner  # type: ignore[no-any-return]

    def do_POST(self) -> None:
        raw = self._read_body()
        match = _PATH_RE.match(self.path.split("?", 1)[0])
        if match is None:
            self._error("UnknownOperationException", 404, f"unknown operation {self.path}")
            return
        try:
            body = json.loads(raw) if raw else {}
        except ValueError as exc:
            self._error("SerializationException", 400, f"invalid JSON body: {exc}")
            return
        record = RecordedBedrockRequest(
            model_id=unquote(match.group("model")),
            operation=match.group("operation"),
            body=body,
            last_user_text=last_user_text(body.get("messages") or [])
            if isinstance(body, dict)
            else "",
        )
        self.owner._record(record)
        if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
            self._error("ValidationException", 400, "messages must be a list")
            return
        if record["operation"].startswith("invoke"):
            problem = _invoke_body_error(body)
        else:
            problem = _converse_body_error(body)
        if problem is not None:
            self._error("ValidationException", 400, problem)
            return
        self.owner._serving(+1)
        try:
            self._serve(record, body)
        except DISCONNECT_ERRORS:
            self.close_connection = True
        finally:
            self.owner._serving(-1)

    def do_GET(self) -> None:
        self._read_body()
        self._error("UnknownOperationException", 404, f"unknown operation GET {self.path}")

    def _error(self, error_type: str, status: int, message: str) -> None:
        self._send_json(
            status,
            {"message": message},
            {"x-amzn-ErrorType": error_type, "x-amzn-RequestId": str(uuid.uuid4())},
        )

    def _serve(self, record: RecordedBedrockRequest, body: dict[str, Any]) -> None:
        started = time.perf_counter()
        delay, failure, answer = self.owner._resolve(record)
        operation = record["operation"]
        streaming = operation in _STREAMING_OPERATIONS
        mid_stream = failure is not None and failure.after_pieces is not None and streaming
        if failure is not None and not mid_stream:
            if delay:
                time.sleep(delay)
            if failure.drop:  # no response at all: the connection just closes
                self.close_connection = True
                return
            self._error(failure.error_type, failure.status, failure.message)
            return
        assert answer is not None  # _resolve returns an answer unless it fails
        if answer.latency + delay:
            time.sleep(answer.latency + delay)

        text = "".join(answer.pieces)
        id_prefix = "toolu_" if operation.startswith("invoke") else "tooluse_"
        tools = [
            {
                "toolUseId": block.get("toolUseId") or self.owner._next_tool_use_id(id_prefix),
                "name": block["name"],
                "input": block["input"],
            }
            for block in answer.tool_use
        ]
        input_tokens = (
            answer.input_tokens if answer.input_tokens is not None else _count_input_tokens(body)
        )
        output_tokens = answer.output_tokens
        if output_tokens is None:
            tool_words = sum(_words(json.dumps(t["input"])) for t in tools)
            output_tokens = max(1, _words(text) + tool_words)
        usage = {
            "inputTokens": input_tokens,
            "outputTokens": output_tokens,
            "totalTokens": input_tokens + output_tokens,
        }
        headers = {"x-amzn-RequestId": str(uuid.uuid4())}
        if operation == "invoke":
            self._send_invoke(record, answer, text, tools, input_tokens, output_tokens, started)
            return
        if operation == "invoke-with-response-stream":
            self._send_invoke_stream(
                record, answer, tools, input_tokens, output_tokens, started,
                failure if mid_stream else None,
            )
            return

        if not streaming:
            content: list[dict[str, Any]] = [{"text": text}] if text or not tools else []
            content.extend({"toolUse": tool} for tool in tools)
            latency_ms = int((time.perf_counter() - started) * 1000)
            self._send_json(
                200,
                {
                    "output": {"message": {"role": "assistant", "content": content}},
                    "stopReason": answer.stop_reason,
                    "usage": usage,
                    "metrics": {"latencyMs": latency_ms},
                },
                headers,
            )
            return

        self._start_chunked("application/vnd.amazon.eventstream", headers)
        self._write_chunk(_event("messageStart", {"role": "assistant"}))
        index = 0
        if answer.pieces:
            for i, piece in enumerate(answer.pieces):
                if mid_stream and failure is not None and i >= (failure.after_pieces or 0):
                    self._fail_mid_stream(failure)
                    return
                if i and answer.piece_delay:
                    time.sleep(answer.piece_delay)
                self._write_chunk(
                    _event(
                        "contentBlockDelta", {"contentBlockIndex": index, "delta": {"text": piece}}
                    )
                )
                self.owner._count_piece()
            self._write_chunk(_event("contentBlockStop", {"contentBlockIndex": index}))
            index += 1
        if mid_stream and failure is not None:
            self._fail_mid_stream(failure)
            return
        for tool in tools:
            start = {"toolUseId": tool["toolUseId"], "name": tool["name"]}
            self._write_chunk(
                _event(
                    "contentBlockStart", {"contentBlockIndex": index, "start": {"toolUse": start}}
                )
            )
            for piece in _input_pieces(tool["input"], answer.tool_input_chunk):
                self._write_chunk(
                    _event(
                        "contentBlockDelta",
                        {"contentBlockIndex": index, "delta": {"toolUse": {"input": piece}}},
                    )
                )
            self._write_chunk(_event("contentBlockStop", {"contentBlockIndex": index}))
            index += 1
        self._write_chunk(_event("messageStop", {"stopReason": answer.stop_reason}))
        latency_ms = int((time.perf_counter() - started) * 1000)
        self._write_chunk(
            _event("metadata", {"usage": usage, "metrics": {"latencyMs": latency_ms}})
        )
        self._end_chunked()

    def _fail_mid_stream(self, failure: _BedrockFailure) -> None:
        if failure.drop:  # cut: no exception frame, no final chunk, the connection closes
            self.wfile.flush()
            self.close_connection = True
            return
        self._write_chunk(_exception_event(_STREAM_EXCEPTIONS[failure.error_type], failure.message))
        self._end_chunked()

    # ---- InvokeModel (Anthropic messages) ------------------------------------------------------

    def _send_invoke(
        self,
        record: RecordedBedrockRequest,
        answer: _BedrockAnswer,
        text: str,
        tools: list[dict[str, Any]],
        input_tokens: int,
        output_tokens: int,
        started: float,
    ) -> None:
        content: list[dict[str, Any]] = [{"type": "text", "text": text}] if text or not tools else []
        content.extend(
            {"type": "tool_use", "id": t["toolUseId"], "name": t["name"], "input": t["input"]}
            for t in tools
        )
        body: dict[str, Any] = {
            "id": f"msg_bdrk_{uuid.uuid4().hex[:24]}",
            "type": "message",
            "role": "assistant",
            "model": record["model_id"],
            "content": content,
            "stop_reason": _ANTHROPIC_STOP_REASONS.get(answer.stop_reason, answer.stop_reason),
            "stop_sequence": None,
            "usage": {"input_tokens": input_tokens, "output_tokens": output_tokens},
        }
        if answer.stop_reason == "guardrail_intervened":
            body["amazon-bedrock-guardrailAction"] = "INTERVENED"
        latency_ms = int((time.perf_counter() - started) * 1000)
        self._send_json(
            200,
            body,
            {
                "x-amzn-RequestId": str(uuid.uuid4()),
                # ChatBedrock reads the token usage of InvokeModel from these headers.
                "x-amzn-bedrock-input-token-count": str(input_tokens),
                "x-amzn-bedrock-output-token-count": str(output_tokens),
                "x-amzn-bedrock-invocation-latency": str(latency_ms),
            },
        )

    def _send_invoke_stream(
        self,
        record: RecordedBedrockRequest,
        answer: _BedrockAnswer,
        tools: list[dict[str, Any]],
        input_tokens: int,
        output_tokens: int,
        started: float,
        failure: _BedrockFailure | None,
    ) -> None:
        self._start_chunked(
            "application/vnd.amazon.eventstream",
            {"x-amzn-RequestId": str(uuid.uuid4()),
             "X-Amzn-Bedrock-Content-Type": "application/json"},
        )
        self._write_chunk(_chunk_event({
            "type": "message_start",
            "message": {
                "id": f"msg_bdrk_{uuid.uuid4().hex[:24]}",
                "type": "message",
                "role": "assistant",
                "model": record["model_id"],
                "content": [],
                "stop_reason": None,
                "stop_sequence": None,
                "usage": {"input_tokens": input_tokens, "output_tokens": 1},
            },
        }))
        index = 0
        first_byte_ms = int((time.perf_counter() - started) * 1000)
        if answer.pieces:
            self._write_chunk(_chunk_event({
                "type": "content_block_start", "index": index,
                "content_block": {"type": "text", "text": ""},
            }))
            for i, piece in enumerate(answer.pieces):
                if failure is not None and i >= (failure.after_pieces or 0):
                    self._fail_mid_stream(failure)
                    return
                if i and answer.piece_delay:
                    time.sleep(answer.piece_delay)
                self._write_chunk(_chunk_event({
                    "type": "content_block_delta", "index": index,
                    "delta": {"type": "text_delta", "text": piece},
                }))
                self.owner._count_piece()
            self._write_chunk(_chunk_event({"type": "content_block_stop", "index": index}))
            index += 1
        if failure is not None:
            self._fail_mid_stream(failure)
            return
        for tool in tools:
            self._write_chunk(_chunk_event({
                "type": "content_block_start", "index": index,
                "content_block": {"type": "tool_use", "id": tool["toolUseId"],
                                  "name": tool["name"], "input": {}},
            }))
            for piece in _input_pieces(tool["input"], answer.tool_input_chunk):
                self._write_chunk(_chunk_event({
                    "type": "content_block_delta", "index": index,
                    "delta": {"type": "input_json_delta", "partial_json": piece},
                }))
            self._write_chunk(_chunk_event({"type": "content_block_stop", "index": index}))
            index += 1
        delta_event: dict[str, Any] = {
            "type": "message_delta",
            "delta": {
                "stop_reason": _ANTHROPIC_STOP_REASONS.get(answer.stop_reason,
                                                           answer.stop_reason),
                "stop_sequence": None,
            },
            "usage": {"output_tokens": output_tokens},
        }
        if answer.stop_reason == "guardrail_intervened":
            delta_event["amazon-bedrock-guardrailAction"] = "INTERVENED"
        self._write_chunk(_chunk_event(delta_event))
        latency_ms = int((time.perf_counter() - started) * 1000)
        self._write_chunk(_chunk_event({
            "type": "message_stop",
            "amazon-bedrock-invocationMetrics": {
                "inputTokenCount": input_tokens,
                "outputTokenCount": output_tokens,
                "invocationLatency": latency_ms,
                "firstByteLatency": first_byte_ms,
            },
        }))
        self._end_chunked()


class FakeBedrockServer(BackgroundServer):
    """A scripted, thread-safe fake of bedrock-runtime: Converse / ConverseStream (for
    ``ChatBedrockConverse``) and InvokeModel / InvokeModelWithResponseStream with Anthropic's
    messages format (for ``ChatBedrock``).

    Args:
        host: interface to bind (keep ``127.0.0.1``).
        port: TCP port; ``0`` picks a free one (see :attr:`url`).
        default_answer: reply for requests no answer rule matches; ``None`` makes them fail
            with ``ResourceNotFoundException`` naming the unmatched text.

    See the module docstring for an example. Build clients with explicit dummy credentials
    (``aws_access_key_id="test", aws_secret_access_key="test"``) and ``region_name``.
    """

    _handler_class = _BedrockHandler
    _thread_name = "fake-bedrock-server"

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        default_answer: str | None = "This is the scripted Bedrock answer.",
    ) -> None:
        super().__init__(host, port)
        self._lock = threading.RLock()
        self._initial_default = default_answer
        self._book: RuleBook[RecordedBedrockRequest] = RuleBook()
        self._default: _BedrockAnswer | None = None
        self._log: list[RecordedBedrockRequest] = []
        self._tool_use_counter = 0
        self.default_calls = 0
        """How many requests got the default answer."""
        self.sent_pieces = 0
        """How many streamed text pieces were written to a client (both streaming operations);
        a client that closes a stream early leaves the rest unsent (the write after the hang-up
        fails, so at most one piece more is counted)."""
        self.in_flight = 0
        """How many requests are being answered right now (a scripted latency or delay still
        running counts); 0 once the server is idle. Read it after clients gave up (a timeout,
        a closed stream) to see the server finished with them."""
        self.set_default(default_answer)

    # ---- scripting -------------------------------------------------------------------------

    def add_answer(
        self,
        match: BedrockMatcher,
        text: str | Sequence[str] = "",
        *,
        input_tokens: int | None = None,
        output_tokens: int | None = None,
        stop_reason: str | None = None,
        latency: float = 0.0,
        piece_delay: float = 0.0,
        tool_use: Sequence[Mapping[str, Any]] | None = None,
        model: str | None = None,
        times: int | None = None,
        tool_input_chunk: int | None = None,
    ) -> ScriptedRule[RecordedBedrockRequest]:
        """Answer matching requests.

        Args:
            match: substring of the last user text, regex, predicate on the
                :class:`RecordedBedrockRequest`, or ``None`` (any request).
            text: the reply text (streamed as word-ish pieces, see ``split_words``), or an
                explicit list of stream pieces.
            input_tokens / output_tokens: usage to report (default: word counts, at least 1).
            stop_reason: default ``"tool_use"`` when ``tool_use`` is given, else ``"end_turn"``.
            latency: seconds before the response starts (client read timeouts).
            piece_delay: seconds between streamed text pieces.
            tool_use: ``[{"name": ..., "input": {...}}]`` (optional ``"toolUseId"``), sent as
                ``toolUse`` content blocks (contentBlockStart/Delta/Stop events in streams).
            model: only match this (URL-decoded) model id.
            times: stop matching after this many uses.
            tool_input_chunk: in streams, send each tool's input JSON in pieces of this many
                characters (as Bedrock does), not in one delta.

        Returns:
            The rule handle (``rule.calls`` counts matched requests).
        """
        predicate, description = compile_matcher(match, _last_text)
        check_times(times)
        if tool_input_chunk is not None and (
            isinstance(tool_input_chunk, bool)
            or not isinstance(tool_input_chunk, int)
            or tool_input_chunk < 1
        ):
            raise InvalidArgumentError(
                f"tool_input_chunk must be a positive int or None, got {tool_input_chunk!r}"
            )
        payload = replace(
            self._make_answer(
                text, input_tokens, output_tokens, stop_reason, latency, piece_delay, tool_use
            ),
            tool_input_chunk=tool_input_chunk,
        )
        return self._add(ScriptedRule("answer", description, times, 0, model, predicate, payload))

    def fail(
        self,
        match: BedrockMatcher,
        error_type: str = "ThrottlingException",
        *,
        status: int | None = None,
        message: str | None = None,
        times: int | None = None,
        after_pieces: int | None = None,
        model: str | None = None,
    ) -> ScriptedRule[RecordedBedrockRequest]:
        """Make matching requests fail with ``error_type`` (botocore raises that exception).

        Args:
            error_type: e.g. ``"ThrottlingException"``, ``"ServiceUnavailableException"``,
                ``"ValidationException"``, ``"AccessDeniedException"``,
                ``"InternalServerException"``, ``"ModelErrorException"`` (see
                :data:`BEDROCK_ERROR_STATUS`); any other name needs an explicit ``status``.
            status: HTTP status (default from :data:`BEDROCK_ERROR_STATUS`).
            message: the error message (default names the error type).
            times: fire at most this many times (botocore retries count!).
            after_pieces: for the streaming operations (``converse-stream``,
                ``invoke-with-response-stream``) only: stream this many text pieces, then send
                an in-stream exception event (only the types those streams model:
                Throttling, ServiceUnavailable, Validation, InternalServer,
                ModelStreamErrorException); botocore raises ``EventStreamError``.
                Non-streaming requests fail normally.
        """
        predicate, description = compile_matcher(match, _last_text)
        check_times(times)
        if status is None:
            if error_type not in BEDROCK_ERROR_STATUS and error_type != "ModelStreamErrorException":
                raise InvalidArgumentError(
                    f"unknown error_type {error_type!r}: pass status= explicitly or use one of "
                    f"{sorted(BEDROCK_ERROR_STATUS)}"
                )
            status = BEDROCK_ERROR_STATUS.get(error_type, 424)
        if not isinstance(status, int) or not 400 <= status <= 599:
            raise InvalidArgumentError(f"status must be an HTTP error status (400-599), got {status!r}")
        if after_pieces is not None:
            if after_pieces < 0:
                raise InvalidArgumentError(f"after_pieces must be >= 0, got {after_pieces}")
            if error_type not in _STREAM_EXCEPTIONS:
                raise InvalidArgumentError(
                    f"{error_type} cannot be sent inside a ConverseStream; use one of "
                    f"{sorted(_STREAM_EXCEPTIONS)}"
                )
        payload = _BedrockFailure(
            error_type,
            status,
            message if message is not None else f"{error_type} (scripted by FakeBedrockServer)",
            after_pieces,
        )
        return self._add(ScriptedRule("fail", description, times, 0, model, predicate, payload))

    def drop(
        self,
        match: BedrockMatcher,
        *,
        after_pieces: int | None = None,
        times: int | None = None,
        model: str | None = None,
    ) -> ScriptedRule[RecordedBedrockRequest]:
        """Make matching requests end with a closed connection instead of an answer (a crashed
        service, a proxy or network cut).

        Without ``after_pieces`` (and on the non-streaming operations) the connection closes
        before any response (botocore: ``ConnectionClosedError``). With ``after_pieces=n`` the
        streaming operations stream ``n`` text pieces and then close the connection mid-stream,
        with neither an exception event nor the final chunk. Counts like :meth:`fail`.
        """
        predicate, description = compile_matcher(match, _last_text)
        check_times(times)
        if after_pieces is not None and (
            isinstance(after_pieces, bool) or not isinstance(after_pieces, int) or after_pieces < 0
        ):
            raise InvalidArgumentError(f"after_pieces must be an int >= 0 or None, got {after_pieces!r}")
        payload = _BedrockFailure("ConnectionDropped", 599, "connection dropped (scripted)",
                                  after_pieces, drop=True)
        return self._add(ScriptedRule("fail", description, times, 0, model, predicate, payload))

    def delay(
        self,
        match: BedrockMatcher,
        seconds: float,
        *,
        times: int | None = None,
        model: str | None = None,
    ) -> ScriptedRule[RecordedBedrockRequest]:
        """Add ``seconds`` before the response to matching requests (also before failures)."""
        predicate, description = compile_matcher(match, _last_text)
        check_times(times)
        payload = check_seconds("seconds", seconds)
        return self._add(ScriptedRule("delay", description, times, 0, model, predicate, payload))

    def set_default(
        self,
        text: str | Sequence[str] | None,
        *,
        input_tokens: int | None = None,
        output_tokens: int | None = None,
        latency: float = 0.0,
    ) -> None:
        """Set the reply for unmatched requests (``None``: fail with ResourceNotFoundException)."""
        default = (
            None
            if text is None
            else self._make_answer(text, input_tokens, output_tokens, None, latency, 0.0, None)
        )
        with self._lock:
            self._default = default

    def reset(self) -> None:
        """Drop all rules and recorded requests; restore the constructor's default answer."""
        with self._lock:
            self._book = RuleBook()
            self._log.clear()
            self.default_calls = 0
            self.sent_pieces = 0
        self.set_default(self._initial_default)

    # ---- inspection ------------------------------------------------------------------------

    @property
    def requests(self) -> list[RecordedBedrockRequest]:
        """Snapshot of every received request (all four operations), oldest first."""
        with self._lock:
            return list(self._log)

    def clear_requests(self) -> None:
        """Forget recorded requests (rules and their counters are kept)."""
        with self._lock:
            self._log.clear()

    @property
    def rules(self) -> list[ScriptedRule[RecordedBedrockRequest]]:
        """All rules, in the order added."""
        with self._lock:
            return list(self._book.rules)

    # ---- internals -------------------------------------------------------------------------

    @staticmethod
    def _make_answer(
        text: str | Sequence[str],
        input_tokens: int | None,
        output_tokens: int | None,
        stop_reason: str | None,
        latency: float,
        piece_delay: float,
        tool_use: Sequence[Mapping[str, Any]] | None,
    ) -> _BedrockAnswer:
        if isinstance(text, str):
            pieces = tuple(split_words(text))
        elif isinstance(text, Sequence) and all(isinstance(p, str) for p in text):
            pieces = tuple(text)
        else:
            raise InvalidTypeError(f"text must be a str or a list of str pieces, got {text!r}")
        for name, value in (("input_tokens", input_tokens), ("output_tokens", output_tokens)):
            if value is not None and (not isinstance(value, int) or value < 0):
                raise InvalidArgumentError(f"{name} must be a non-negative int or None, got {value!r}")
        tools = _normalise_tool_use(tool_use)
        return _BedrockAnswer(
            pieces=pieces,
            tool_use=tools,
            input_tokens=input_tokens,
            output_tokens=output_tokens,
            stop_reason=stop_reason or ("tool_use" if tools else "end_turn"),
            latency=check_seconds("latency", latency),
            piece_delay=check_seconds("piece_delay", piece_delay),
        )

    def _add(
        self, rule: ScriptedRule[RecordedBedrockRequest]
    ) -> ScriptedRule[RecordedBedrockRequest]:
        with self._lock:
            self._book.rules.append(rule)
        return rule

    def _serving(self, change: int) -> None:
        with self._lock:
            self.in_flight += change

    def _count_piece(self) -> None:
        with self._lock:
            self.sent_pieces += 1

    def _record(self, record: RecordedBedrockRequest) -> None:
        with self._lock:
            self._log.append(record)

    def _next_tool_use_id(self, prefix: str = "tooluse_") -> str:
        with self._lock:
            self._tool_use_counter += 1
            return f"{prefix}{self._tool_use_counter:04d}"

    def _resolve(
        self, record: RecordedBedrockRequest
    ) -> tuple[float, _BedrockFailure | None, _BedrockAnswer | None]:
        """Pick ``(extra delay, failure, answer)`` for a request, counting rule calls."""
        model_id = record["model_id"]
        with self._lock:
            delay_rule = self._book.first("delay", record, model_id)
            delay: float = delay_rule.payload if delay_rule is not None else 0.0
            failure_rule = self._book.first("fail", record, model_id)
            failure: _BedrockFailure | None = failure_rule.payload if failure_rule else None
            streaming = record["operation"] in _STREAMING_OPERATIONS
            if failure is not None and not (failure.after_pieces is not None and streaming):
                # An immediate failure must not use up an answer rule's ``times`` budget.
                return delay, failure, None
            answer_rule = self._book.first("answer", record, model_id)
            if answer_rule is not None:
                return delay, failure, answer_rule.payload
            self.default_calls += 1
            if self._default is None:
                missing = _BedrockFailure(
                    "ResourceNotFoundException",
                    404,
                    "FakeBedrockServer: no answer rule matches the last user text "
                    f"{record['last_user_text']!r} and there is no default answer",
                    None,
                )
                return delay, missing, None
            return delay, failure, self._default


def _last_text(record: RecordedBedrockRequest) -> str:
    return record["last_user_text"]
