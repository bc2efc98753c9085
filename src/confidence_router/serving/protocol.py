"""The contract between the Ollama-compatible server and a generation backend.

Pure Python: no HTTP, no framework imports. Also the wire format both Ollama fronts share (the
test-bed server in :mod:`~confidence_router.serving.ollama_server` and the routing proxy):
:func:`parse_generation_request` validates a request body, :func:`ollama_chunk` builds one
reply object, :func:`model_card` one ``/api/tags`` entry. A backend turns a :class:`ChatRequest` into a
:class:`ChatReply` whose ``tokens`` may be produced lazily (the server streams each token as
soon as the iterator yields it).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Protocol, runtime_checkable

from confidence_router.errors import ConfidenceRouterError, InvalidArgumentError

#: The version ``/api/version`` reports (new enough for logprobs, which need >= 0.12.11).
OLLAMA_VERSION = "0.13.0"
#: Ollama accepts ``top_logprobs`` in 0..20.
MAX_TOP_LOGPROBS = 20


@dataclass(frozen=True)
class GeneratedToken:
    """One generated token with its natural-log probability and the top alternatives.

    ``top_logprobs`` is a sequence of ``(token, logprob)`` pairs, highest first.

    ``text`` is what the token adds to the reply (streamed as it is). A token whose own bytes
    are not a whole UTF-8 text (a byte-fallback token carrying part of a character) adds
    ``""`` and the token completing the character adds all of it; such a backend sets
    ``piece`` to the token's own bytes (and ``top_pieces`` to each alternative's, in order),
    so its ``logprobs`` entry shows the token as the alternatives show it: the bytes in
    ``bytes``, their text with U+FFFD for the incomplete sequence in ``token`` (as Ollama).
    Without them, the entries are made from ``text`` and the alternatives' texts.
    """

    text: str
    logprob: float
    top_logprobs: Sequence[tuple[str, float]] = ()
    piece: bytes | None = None
    top_pieces: Sequence[bytes] = ()


@dataclass(frozen=True)
class ChatRequest:
    """A parsed ``/api/chat`` request.

    ``options`` is Ollama's ``options`` dict (``temperature``, ``num_predict``, ``stop``, ...).
    ``logprobs`` / ``top_logprobs`` are the top-level request fields.
    """

    model: str
    messages: Sequence[dict[str, Any]]
    options: dict[str, Any] = field(default_factory=dict)
    logprobs: bool = False
    top_logprobs: int = 0
    stream: bool = True
    tools: Sequence[dict[str, Any]] = ()
    format: Any = None
    think: bool | str | None = None
    """Ollama's ``think`` (``true`` / ``false`` or a level such as ``"high"``); a backend
    whose model cannot think refuses a truthy value (400), as Ollama does."""
    raw: bool = False
    """``/api/generate``'s ``raw``: the prompt is sent to the model unchanged (no template)."""
    template: str | None = None
    """``/api/generate``'s ``template``: an Ollama (Go ``text/template``) prompt template that
    replaces the model's; a backend that cannot render it refuses the request (400)."""
    suffix: str | None = None
    """``/api/generate``'s ``suffix`` (the text after the answer, fill-in-the-middle); the
    server sends it only to a model whose capabilities list ``"insert"``."""
    client_gone: Callable[[], bool] | None = field(default=None, compare=False, repr=False)
    """Set by the server: returns True once the client has hung up, so a backend that waits
    (injected latency, a queue for the model) or generates can stop instead of working for
    nobody."""


@dataclass
class ChatReply:
    """What a backend returns for one chat request.

    ``tokens`` is consumed once, in order; the reply text is the concatenation of the token
    texts. ``tool_calls`` are Ollama-style ``{"function": {"name": ..., "arguments": {...}}}``.
    """

    tokens: Iterable[GeneratedToken]
    prompt_tokens: int = 0
    done_reason: str = "stop"
    tool_calls: Sequence[dict[str, Any]] = ()


class BackendError(ConfidenceRouterError):
    """A backend failure that the server reports as an HTTP error with ``{"error": message}``."""

    def __init__(self, message: str, status: int = 500) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


@runtime_checkable
class ChatBackend(Protocol):
    """A generation backend for the Ollama-compatible server.

    Optional extensions the server uses when a backend has them:

    * ``capabilities(model) -> list[str]``: what ``/api/show`` reports for ``model``, in
      Ollama's words (``"completion"``, ``"tools"``, ``"insert"``, ``"vision"``,
      ``"thinking"``, ``"embedding"``); without it, ``["completion"]``. An ``/api/generate``
      request with a ``suffix`` is refused (400 "does not support insert") unless the model
      lists ``"insert"``, as Ollama does.
    * keyword arguments of ``embed``: ``truncate`` (``/api/embed``'s field: ``False`` asks
      for an error instead of truncating an input longer than the model's context) and
      ``client_gone`` (as :attr:`ChatRequest.client_gone`: a long batch stops between inputs
      once the client has hung up). The server passes only those ``embed`` accepts.
    """

    def chat(self, request: ChatRequest) -> ChatReply:
        """Answer one chat request (may raise :class:`BackendError`)."""
        ...

    def embed(self, model: str, inputs: Sequence[str]) -> list[list[float]]:
        """Embed each input string (may raise :class:`BackendError`)."""
        ...

    def models(self) -> list[str]:
        """Model names listed by ``/api/tags``."""
        ...


#: What ``/api/show`` reports for a backend without ``capabilities(model)``.
DEFAULT_CAPABILITIES = ("completion",)


def backend_capabilities(backend: ChatBackend, model: str) -> list[str]:
    """The capabilities ``backend`` reports for ``model`` (see :class:`ChatBackend`).

    >>> class Plain:
    ...     pass
    >>> backend_capabilities(Plain(), "m")  # type: ignore[arg-type]
    ['completion']
    """
    report = getattr(backend, "capabilities", None)
    if not callable(report):
        return list(DEFAULT_CAPABILITIES)
    return [str(capability) for capability in report(model)]


class ProtocolError(InvalidArgumentError):
    """A malformed Ollama request body: the server answers 400 with this message."""


def parse_generation_request(
    body: Mapping[str, Any], messages: Sequence[dict[str, Any]]
) -> ChatRequest:
    """Validate the fields shared by ``/api/chat`` and ``/api/generate`` into a ChatRequest.

    Raises:
        ProtocolError: missing ``model``, ``top_logprobs`` out of 0..20, ``options`` not an
            object, ``stream`` / ``logprobs`` not booleans, ``tools`` not a list of
            ``{"type": "function", "function": {"name": ...}}`` objects, ``think`` not a
            boolean or a string (as Ollama, which rejects a body whose fields have the wrong
            JSON type).
    """
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ProtocolError("model is required")
    for flag in ("stream", "logprobs"):
        if body.get(flag) is not None and not isinstance(body[flag], bool):
            raise ProtocolError(f"{flag} must be true or false, got {body[flag]!r}")
    top_logprobs = body.get("top_logprobs") or 0
    if (
        isinstance(top_logprobs, bool)
        or not isinstance(top_logprobs, int)
        or not 0 <= top_logprobs <= MAX_TOP_LOGPROBS
    ):
        raise ProtocolError(f"top_logprobs must be between 0 and 20, got {top_logprobs!r}")
    options = body.get("options") or {}
    if not isinstance(options, dict):
        raise ProtocolError("options must be an object")
    tools = body.get("tools") or ()
    if not isinstance(tools, (list, tuple)):
        raise ProtocolError("tools must be a list")
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise ProtocolError(f"tools[{i}] must be {{\"type\": \"function\", \"function\": "
                                "{\"name\": ..., \"parameters\": {...}}}")
        if function.get("parameters") is not None and not isinstance(function["parameters"], dict):
            raise ProtocolError(f"tools[{i}].function.parameters must be an object")
    fmt = body.get("format")
    if fmt is not None and not isinstance(fmt, (str, dict)):
        raise ProtocolError(f"format must be \"json\" or a JSON schema object, got {fmt!r}")
    think = body.get("think")
    if think is not None and not isinstance(think, (bool, str)):
        raise ProtocolError(f"think must be true, false or a level such as \"high\", got {think!r}")
    stream = body.get("stream")
    return ChatRequest(
        model=model,
        messages=list(messages),
        options=dict(options),
        logprobs=bool(body.get("logprobs")),
        top_logprobs=top_logprobs,
        stream=True if stream is None else bool(stream),
        tools=list(tools),
        format=body.get("format"),
        think=think,
    )


def parse_chat_request(body: Mapping[str, Any]) -> ChatRequest:
    """Validate an ``/api/chat`` body.

    Example::

        >>> parse_chat_request({"model": "m", "messages": [{"role": "user", "content": "hi"}]}).stream
        True

    Raises:
        ProtocolError: ``messages`` is not a list of objects with a string ``role``, string
            (or null) ``content``, a list of base64 strings as ``images`` and a list of
            objects as ``tool_calls``; or see :func:`parse_generation_request`.
    """
    messages = body.get("messages") or []
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise ProtocolError("messages must be a list of objects")
    for i, message in enumerate(messages):
        check_message(message, f"messages[{i}]")
    return parse_generation_request(body, messages)


def check_message(message: Mapping[str, Any], where: str) -> None:
    """Validate the field types of one Ollama chat message (``where`` names it in errors).

    Raises:
        ProtocolError: a field of the wrong type.
    """
    if not isinstance(message.get("role"), str):
        raise ProtocolError(f"{where}.role must be a string, got {message.get('role')!r}")
    content = message.get("content")
    if content is not None and not isinstance(content, str):
        raise ProtocolError(f"{where}.content must be a string")
    images = message.get("images")
    if images is not None and (
        not isinstance(images, list) or not all(isinstance(x, str) for x in images)
    ):
        raise ProtocolError(f"{where}.images must be a list of base64 strings")
    calls = message.get("tool_calls")
    if calls is not None and (
        not isinstance(calls, list) or not all(isinstance(c, dict) for c in calls)
    ):
        raise ProtocolError(f"{where}.tool_calls must be a list of objects")


def now_iso() -> str:
    """The ``created_at`` timestamp format of Ollama replies."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def ollama_chunk(
    model: str,
    created_at: str,
    text: str,
    *,
    chat: bool = True,
    done: bool = False,
    tool_calls: Sequence[dict[str, Any]] = (),
    logprobs: Sequence[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """One Ollama reply object (a streamed line, or the whole non-streamed reply).

    ``tool_calls`` are Ollama-style ``{"function": {"name": ..., "arguments": {...}}}``; the
    caller adds the final fields (``done_reason``, durations, counts) to the last object.
    """
    obj: dict[str, Any] = {"model": model, "created_at": created_at}
    if chat:
        obj["message"] = {"role": "assistant", "content": text}
        if tool_calls:
            obj["message"]["tool_calls"] = list(tool_calls)
    else:
        obj["response"] = text
    obj["done"] = done
    if logprobs:
        obj["logprobs"] = list(logprobs)
    return obj


def model_card(name: str) -> dict[str, Any]:
    """One ``/api/tags`` entry for a model name."""
    return {
        "name": name,
        "model": name,
        "modified_at": "2026-01-01T00:00:00Z",
        "size": 0,
        "digest": hashlib.sha256(name.encode("utf-8")).hexdigest(),
        "details": {
            "parent_model": "",
            "format": "gguf",
            "family": "scripted",
            "families": ["scripted"],
            "parameter_size": "0B",
            "quantization_level": "Q4_K_M",
        },
    }
