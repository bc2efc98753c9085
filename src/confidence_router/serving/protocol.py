"""The contract between the Ollama-compatible server and a generation backend.

Pure Python: no HTTP, no framework imports. A backend turns a :class:`ChatRequest` into a
:class:`ChatReply` whose ``tokens`` may be produced lazily (the server streams each token as
soon as the iterator yields it).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable


@dataclass(frozen=True)
class GeneratedToken:
    """One generated token with its natural-log probability and the top alternatives.

    ``top_logprobs`` is a sequence of ``(token, logprob)`` pairs, highest first.
    """

    text: str
    logprob: float
    top_logprobs: Sequence[tuple[str, float]] = ()


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


class BackendError(Exception):
    """A backend failure that the server reports as an HTTP error with ``{"error": message}``."""

    def __init__(self, message: str, status: int = 500) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


@runtime_checkable
class ChatBackend(Protocol):
    """A generation backend for the Ollama-compatible server."""

    def chat(self, request: ChatRequest) -> ChatReply:
        """Answer one chat request (may raise :class:`BackendError`)."""
        ...

    def embed(self, model: str, inputs: Sequence[str]) -> list[list[float]]:
        """Embed each input string (may raise :class:`BackendError`)."""
        ...

    def models(self) -> list[str]:
        """Model names listed by ``/api/tags``."""
        ...
