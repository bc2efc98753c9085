"""A scripted :class:`~confidence_router.serving.protocol.ChatBackend` for offline tests.

:class:`ScriptedBackend` answers chat requests from rules that a test adds, with chosen
per-token logprobs, so that confidence scoring and routing can be tested deterministically
through the real ``ChatOllama`` client (serve it with
:class:`~confidence_router.serving.ollama_server.OllamaCompatibleServer`).

Usage::

    from confidence_router.testing import OllamaCompatibleServer, ScriptedBackend
    from langchain_ollama import ChatOllama

    backend = ScriptedBackend(models=["qwen2.5:7b"])
    backend.add_answer("capital of France", " Paris", logprobs=-0.05)        # confident
    backend.add_answer("capital of Australia", " Sydney maybe",
                       logprobs=[-1.9, -2.7])                                   # unsure
    backend.add_probe("Is the answer correct", {"YES": -0.1, "NO": -2.4})     # YES/NO probe
    slow = backend.add_answer("slow question", "ok", latency=1.0)              # timeouts
    backend.fail("boom", status=503, message="model overloaded", times=1)      # errors

    with OllamaCompatibleServer(backend) as server:
        llm = ChatOllama(base_url=server.url, model="qwen2.5:7b",
                         logprobs=True, top_logprobs=3)
        msg = llm.invoke("What is the capital of France?")
        assert msg.content == " Paris"
        assert msg.response_metadata["logprobs"][0]["logprob"] == -0.05
    assert slow.calls == 0

Rules are matched against the text of the **last user message**: a ``str`` matches as a
case-sensitive substring, a compiled regex with ``search``, a callable receives the whole
:class:`ChatRequest`, and ``None`` matches every request. Failure rules are checked first,
then answer rules, each in the order added; the first non-exhausted match wins (a rule with
``times=n`` stops matching after ``n`` uses, which scripts multi-turn conversations).
Requests that match no answer rule get the default answer (see :meth:`ScriptedBackend.set_default`).
"""

from __future__ import annotations

import dataclasses
import math
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, Literal, TypeVar, Union

from confidence_router.errors import InvalidArgumentError, InvalidTypeError
from confidence_router.serving.protocol import (
    BackendError,
    ChatReply,
    ChatRequest,
    GeneratedToken,
)
from confidence_router.testing.embeddings import hashing_embedding

__all__ = [
    "DEFAULT_LOGPROB",
    "MAX_TOP_LOGPROBS",
    "InFlightBackend",
    "Matcher",
    "ScriptedBackend",
    "ScriptedRule",
    "last_user_text",
    "split_words",
]

#: Logprob given to every token of an answer when none is specified (p ≈ 0.905).
DEFAULT_LOGPROB = -0.1
#: Ollama accepts ``top_logprobs`` in 0..20; generated alternatives fill up to this many entries.
MAX_TOP_LOGPROBS = 20
# A floor for generated alternatives: exp(-50) is "practically impossible" and, unlike -inf,
# survives JSON encoding.
_MIN_LOGPROB = -50.0

_T = TypeVar("_T")

#: What a rule matches: substring of the last user text, a compiled regex, a predicate on the
#: request, or ``None`` for "every request".
Matcher = Union[str, "re.Pattern[str]", Callable[[ChatRequest], bool], None]

_WORDISH_RE = re.compile(r"\s*\S+")


def split_words(text: str) -> list[str]:
    """Split ``text`` into word-ish tokens (``\\s*\\S+``), each keeping its leading whitespace.

    The tokens always concatenate back to ``text``: trailing whitespace is appended to the
    last token, and whitespace-only text is one token.

    >>> split_words(" Paris is nice.")
    [' Paris', ' is', ' nice.']
    >>> split_words("")
    []
    """
    tokens = _WORDISH_RE.findall(text)
    rest = text[sum(len(t) for t in tokens) :]
    if rest:
        if tokens:
            tokens[-1] += rest
        else:
            tokens = [rest]
    return tokens


def last_user_text(messages: Sequence[Mapping[str, Any]]) -> str:
    """Text of the last ``role == "user"`` message that has text ("" if none).

    ``content`` may be a string or a list of parts (Ollama strings, Converse ``{"text": ...}``
    blocks, ``{"type": "text", "text": ...}`` parts); text parts are concatenated. User
    messages without text (e.g. Converse ``toolResult`` turns) are skipped, so after a tool
    round-trip rules still see the human's question.
    """
    if not isinstance(messages, Sequence) or isinstance(messages, str):
        return ""
    for message in reversed(messages):
        if isinstance(message, Mapping) and message.get("role") == "user":
            text = content_text(message.get("content"))
            if text:
                return text
    return ""


def content_text(content: Any) -> str:
    """The text of a message's content: a string, or the text parts of a list of blocks
    (shared with the fake Bedrock server)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence):
        parts: list[str] = []
        for part in content:
            if isinstance(part, str):
                parts.append(part)
            elif isinstance(part, Mapping) and isinstance(part.get("text"), str):
                parts.append(part["text"])
        return "".join(parts)
    return str(content)


def compile_matcher(
    match: Any, text_of: Callable[[_T], str], what: str = "match"
) -> tuple[Callable[[_T], bool], str]:
    """Turn a :data:`Matcher`-like value into ``(predicate, description)``."""
    if match is None:
        return (lambda _request: True), "<any>"
    if isinstance(match, str):
        needle = match
        return (lambda request: needle in text_of(request)), repr(needle)
    if isinstance(match, re.Pattern):
        pattern = match
        return (lambda request: pattern.search(text_of(request)) is not None), (
            f"re.compile({pattern.pattern!r})"
        )
    if callable(match):
        return match, getattr(match, "__name__", repr(match))
    raise InvalidTypeError(
        f"{what} must be a str (substring of the last user message), a compiled regex, a "
        f"callable predicate or None (any request), got {type(match).__name__}"
    )


def check_times(times: int | None) -> None:
    """Refuse a rule's ``times`` that is not a positive int or ``None``."""
    if times is not None and (isinstance(times, bool) or not isinstance(times, int) or times < 1):
        raise InvalidArgumentError(f"times must be a positive integer or None (unlimited), got {times!r}")


def _wait(seconds: float, request: ChatRequest) -> bool:
    """Sleep ``seconds`` like a model working, but stop early (returning False) when the
    server says the client has hung up, as a real server stops work for a gone client."""
    gone = request.client_gone
    if gone is None:
        time.sleep(seconds)
        return True
    deadline = time.monotonic() + seconds
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return True
        if gone():
            return False
        time.sleep(min(left, 0.05))


def check_seconds(name: str, value: float) -> float:
    """``value`` as float seconds; refuses a negative, NaN or non-numeric value."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise InvalidArgumentError(f"{name} must be a non-negative number of seconds, got {value!r}")
    return float(value)


@dataclass(eq=False)
class ScriptedRule(Generic[_T]):
    """One scripted rule, returned by ``add_answer`` / ``add_probe`` / ``fail`` / ``delay``.

    Keep the handle to assert how often the rule fired::

        rule = backend.add_answer("France", " Paris")
        ...
        assert rule.calls == 1
    """

    kind: Literal["answer", "fail", "delay"]
    description: str
    times: int | None = None
    """How many times the rule may fire (``None``: unlimited)."""
    calls: int = 0
    """How many requests this rule has handled so far."""
    model: str | None = None
    predicate: Callable[[_T], bool] = field(default=lambda _request: True, repr=False)
    payload: Any = field(default=None, repr=False)

    @property
    def exhausted(self) -> bool:
        """True once the rule has fired ``times`` times."""
        return self.times is not None and self.calls >= self.times

    def _matches(self, request: _T, model: str) -> bool:
        if self.exhausted or (self.model is not None and self.model != model):
            return False
        return bool(self.predicate(request))


class RuleBook(Generic[_T]):
    """Ordered rules with first-match semantics and call counting (caller holds the lock)."""

    def __init__(self) -> None:
        self.rules: list[ScriptedRule[_T]] = []

    def first(self, kind: str, request: _T, model: str) -> ScriptedRule[_T] | None:
        for rule in self.rules:
            if rule.kind == kind and rule._matches(request, model):
                rule.calls += 1
                return rule
        return None


# --------------------------------------------------------------------------------------------
# Answer construction (validated when the rule is added, so mistakes fail in the test body).
# --------------------------------------------------------------------------------------------

#: Per-token alternatives: one ``{token: logprob}`` mapping or ``(token, logprob)`` list per
#: token, or (for a one-token answer) a single such mapping / list.
TopLogprobsSpec = (
    Mapping[str, float]
    | Sequence[tuple[str, float]]
    | Sequence[Mapping[str, float] | Sequence[tuple[str, float]]]
)


def _check_logprob(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidTypeError(f"{where} must be a float, got {value!r}")
    value = float(value)
    if not math.isfinite(value) or value > 0.0:
        raise InvalidArgumentError(f"{where} must be a finite natural-log probability <= 0, got {value!r}")
    return value


def _is_pair(item: Any) -> bool:
    return (
        isinstance(item, (tuple, list))
        and len(item) == 2
        and isinstance(item[0], str)
        and isinstance(item[1], (int, float))
        and not isinstance(item[1], bool)
    )


def _normalise_alternatives(spec: Any, where: str) -> list[tuple[str, float]]:
    if isinstance(spec, Mapping):
        items = list(spec.items())
    elif isinstance(spec, Sequence) and not isinstance(spec, str):
        items = list(spec)
    else:
        raise InvalidTypeError(f"{where} must be a mapping or a list of (token, logprob) pairs")
    pairs: list[tuple[str, float]] = []
    for item in items:
        if not _is_pair(item):
            raise InvalidArgumentError(f"{where}: expected (token, logprob) pairs, got {item!r}")
        pairs.append((item[0], _check_logprob(item[1], f"{where}[{item[0]!r}]")))
    if len(pairs) > MAX_TOP_LOGPROBS:
        raise InvalidArgumentError(f"{where} has {len(pairs)} entries; Ollama allows at most 20")
    # Highest first, as the protocol promises; sorted() is stable for ties.
    return sorted(pairs, key=lambda pair: -pair[1])


def _per_token_top(spec: Any, n_tokens: int) -> list[list[tuple[str, float]]]:
    """Normalise ``top_logprobs`` to one list of pairs per token."""
    single = isinstance(spec, Mapping) or (
        isinstance(spec, Sequence)
        and not isinstance(spec, str)
        and len(spec) > 0
        and _is_pair(spec[0])
    )
    if single:
        # The probe convenience: one mapping / pair list for a one-token answer.
        if n_tokens != 1:
            raise InvalidArgumentError(
                "a single top_logprobs mapping/pair list is only allowed for a one-token "
                f"answer, but the answer has {n_tokens} tokens; pass one list per token"
            )
        return [_normalise_alternatives(spec, "top_logprobs")]
    if not isinstance(spec, Sequence) or isinstance(spec, str):
        raise InvalidTypeError(f"top_logprobs must be a mapping or a list, got {type(spec).__name__}")
    if len(spec) != n_tokens:
        raise InvalidArgumentError(
            f"top_logprobs has {len(spec)} per-token entries but the answer has {n_tokens} tokens"
        )
    return [_normalise_alternatives(s, f"top_logprobs[{i}]") for i, s in enumerate(spec)]


def _generated_alternatives(token: str, logprob: float) -> list[tuple[str, float]]:
    """Chosen token first, then alternatives that are each less likely than the chosen one.

    Alternative ``i`` gets probability ``min(p, 1 - p) / 2**i``: every alternative is below
    ``p`` (so the chosen token is the argmax, as with greedy decoding) and together they never
    exceed the remaining mass ``1 - p`` (so the distribution stays valid).
    """
    p = math.exp(logprob)
    base = min(p, 1.0 - p)
    leading = token[: len(token) - len(token.lstrip())]
    pairs = [(token, logprob)]
    for i in range(1, MAX_TOP_LOGPROBS):
        prob = base / (2.0**i)
        alt = math.log(prob) if prob > 0.0 else _MIN_LOGPROB
        pairs.append((f"{leading}<alt{i}>", max(alt, _MIN_LOGPROB)))
    return pairs


def _build_tokens(
    answer: str | Sequence[str] | Sequence[GeneratedToken],
    logprobs: float | Sequence[float] | None,
    top_logprobs: Any,
) -> tuple[GeneratedToken, ...]:
    if isinstance(answer, str):
        texts = split_words(answer)
    elif isinstance(answer, Sequence) and all(isinstance(t, GeneratedToken) for t in answer):
        if logprobs is not None or top_logprobs is not None:
            raise InvalidArgumentError(
                "answer is a list of GeneratedToken (which carry their own logprobs); "
                "do not also pass logprobs or top_logprobs"
            )
        return tuple(answer)  # type: ignore[arg-type]
    elif isinstance(answer, Sequence) and all(isinstance(t, str) for t in answer):
        texts = list(answer)  # type: ignore[arg-type]
    else:
        raise InvalidTypeError(
            "answer must be a str, a list of token strings or a list of GeneratedToken, "
            f"got {type(answer).__name__}"
        )
    n = len(texts)
    tops = _per_token_top(top_logprobs, n) if top_logprobs is not None else None

    values: list[float | None]
    if logprobs is None:
        values = [None] * n
    elif isinstance(logprobs, (int, float)) and not isinstance(logprobs, bool):
        values = [_check_logprob(logprobs, "logprobs")] * n
    elif isinstance(logprobs, Sequence) and not isinstance(logprobs, str):
        if len(logprobs) != n:
            raise InvalidArgumentError(
                f"logprobs has {len(logprobs)} values but the answer has {n} tokens: {texts!r}"
            )
        values = [_check_logprob(v, f"logprobs[{i}]") for i, v in enumerate(logprobs)]
    else:
        raise InvalidArgumentError(f"logprobs must be a float or a list of floats, got {logprobs!r}")

    tokens: list[GeneratedToken] = []
    for i, text in enumerate(texts):
        value = values[i]
        if tops is not None:
            listed = dict(tops[i])
            if text in listed:
                if value is None:
                    value = listed[text]
                elif not math.isclose(value, listed[text], abs_tol=1e-9):
                    raise InvalidArgumentError(
                        f"token {i} ({text!r}) has logprob {value} but its top_logprobs "
                        f"entry says {listed[text]}"
                    )
            if value is None:
                value = DEFAULT_LOGPROB
            tokens.append(GeneratedToken(text, value, tuple(tops[i])))
        else:
            value = DEFAULT_LOGPROB if value is None else value
            tokens.append(GeneratedToken(text, value, tuple(_generated_alternatives(text, value))))
    return tuple(tokens)


def _normalise_tool_calls(tool_calls: Sequence[Mapping[str, Any]] | None) -> tuple[dict, ...]:
    """Accept ``{"name", "arguments"}`` or Ollama's ``{"function": {...}}``; return the latter."""
    if not tool_calls:
        return ()
    if isinstance(tool_calls, Mapping):
        raise InvalidTypeError("tool_calls must be a list of tool calls, not a single mapping")
    result = []
    for i, call in enumerate(tool_calls):
        function = call.get("function", call) if isinstance(call, Mapping) else None
        if not isinstance(function, Mapping) or not isinstance(function.get("name"), str):
            raise InvalidTypeError(
                f"tool_calls[{i}] must look like {{'name': str, 'arguments': dict}}, got {call!r}"
            )
        arguments = function.get("arguments", {})
        if not isinstance(arguments, Mapping):
            raise InvalidTypeError(f"tool_calls[{i}]['arguments'] must be a dict, got {arguments!r}")
        result.append({"function": {"name": function["name"], "arguments": dict(arguments)}})
    return tuple(result)


@dataclass(frozen=True)
class _Answer:
    tokens: tuple[GeneratedToken, ...]
    latency: float
    token_delay: float
    tool_calls: tuple[dict, ...]
    done_reason: str
    prompt_tokens: int | None


@dataclass(frozen=True)
class _Failure:
    status: int
    message: str
    after_tokens: int


def _count_prompt_tokens(messages: Sequence[Mapping[str, Any]]) -> int:
    # A word count stands in for a tokenizer: stable, and grows with the prompt.
    words = sum(len(content_text(m.get("content")).split()) for m in messages)
    return max(1, words)


class ScriptedBackend:
    """A thread-safe :class:`~confidence_router.serving.protocol.ChatBackend` with scripted answers.

    Args:
        models: names listed by ``/api/tags`` (and accepted when ``strict_models``).
        default_answer: text for requests no answer rule matches; ``None`` makes such requests
            fail with ``BackendError(404)`` naming the unmatched text (catches typos in tests).
        default_logprob: per-token logprob of the default answer.
        embedding_dim: dimension of :meth:`embed` vectors (see :func:`hashing_embedding`).
        strict_models: reject requests for models not in ``models`` with 404, like Ollama does.

    See the module docstring for a complete example.
    """

    def __init__(
        self,
        *,
        models: Sequence[str] = ("scripted-local",),
        default_answer: str | None = "I don't know.",
        default_logprob: float = DEFAULT_LOGPROB,
        embedding_dim: int = 64,
        strict_models: bool = False,
    ) -> None:
        if isinstance(models, str):
            raise InvalidTypeError("models must be a list of names, not a single str")
        if embedding_dim < 1:
            raise InvalidArgumentError(f"embedding_dim must be >= 1, got {embedding_dim}")
        self._lock = threading.RLock()
        self._models = list(models)
        self._initial_default = (default_answer, default_logprob)
        self.embedding_dim = embedding_dim
        self.strict_models = strict_models
        self._book: RuleBook[ChatRequest] = RuleBook()
        self._default: _Answer | None = None
        self._requests: list[ChatRequest] = []
        self._embed_requests: list[tuple[str, list[str]]] = []
        self.default_calls = 0
        """How many requests got the default answer."""
        self.generated_tokens = 0
        """How many answer tokens were actually produced (pulled from a reply's ``tokens``);
        a client that stops reading a stream early leaves the rest ungenerated."""
        self.set_default(default_answer, logprobs=default_logprob)

    # ---- scripting -------------------------------------------------------------------------

    def add_answer(
        self,
        match: Matcher,
        answer: str | Sequence[str] | Sequence[GeneratedToken] = "",
        *,
        logprobs: float | Sequence[float] | None = None,
        top_logprobs: TopLogprobsSpec | None = None,
        latency: float = 0.0,
        token_delay: float = 0.0,
        tool_calls: Sequence[Mapping[str, Any]] | None = None,
        done_reason: str = "stop",
        prompt_tokens: int | None = None,
        model: str | None = None,
        times: int | None = None,
    ) -> ScriptedRule[ChatRequest]:
        """Answer matching requests with ``answer``.

        Args:
            match: see :data:`Matcher` (substring of the last user message, regex, predicate,
                or ``None`` for any request).
            answer: the reply text (split into word-ish tokens by :func:`split_words`), an
                explicit list of token strings, or a list of :class:`GeneratedToken`.
            logprobs: one float for every token, or one per token. Default: taken from
                ``top_logprobs`` when the chosen token is listed there, else ``-0.1``.
            top_logprobs: alternatives per token, each a ``{token: logprob}`` mapping or a list
                of ``(token, logprob)`` pairs; a single mapping is accepted for a one-token
                answer. Default: the chosen token followed by 19 generated, less likely
                alternatives (``"<alt1>"``, ...). The server trims to the requested ``k``.
            latency: seconds to wait before the first token (client timeouts, TTFT).
            token_delay: seconds to wait before every further token (streaming order tests);
                like ``latency``, the wait ends early, and generation stops, when the client
                hangs up.
            tool_calls: ``[{"name": ..., "arguments": {...}}]`` (Ollama's ``{"function": ...}``
                form is accepted too); sent in ``message.tool_calls``.
            done_reason: the final chunk's ``done_reason`` (``"stop"``, ``"length"``, ...).
            prompt_tokens: ``prompt_eval_count`` to report (default: words in the prompt).
            model: only match requests for this model name.
            times: stop matching after this many uses (``None``: unlimited).

        Returns:
            The rule handle; ``rule.calls`` counts matched requests.

        Raises:
            ValueError: inconsistent logprobs / top_logprobs / tool_calls (e.g. 3 logprobs
                for a 4-token answer, a positive logprob).
        """
        predicate, description = compile_matcher(match, self._last_user_text)
        check_times(times)
        payload = _Answer(
            tokens=_build_tokens(answer, logprobs, top_logprobs),
            latency=check_seconds("latency", latency),
            token_delay=check_seconds("token_delay", token_delay),
            tool_calls=_normalise_tool_calls(tool_calls),
            done_reason=done_reason,
            prompt_tokens=prompt_tokens,
        )
        return self._add(ScriptedRule("answer", description, times, 0, model, predicate, payload))

    def add_probe(
        self,
        match: Matcher,
        distribution: Mapping[str, float],
        *,
        latency: float = 0.0,
        model: str | None = None,
        times: int | None = None,
    ) -> ScriptedRule[ChatRequest]:
        """Answer with ONE token, the most likely entry of ``distribution`` (token → logprob).

        Made for YES/NO self-verification probes::

            backend.add_probe("Is the proposed answer correct", {"YES": -0.05, "NO": -3.0})

        The reply is ``"YES"`` with logprob -0.05 and top_logprobs ``[("YES", -0.05),
        ("NO", -3.0)]`` (trimmed to the requested ``k``).
        """
        if not isinstance(distribution, Mapping) or not distribution:
            raise InvalidArgumentError("distribution must be a non-empty {token: logprob} mapping")
        pairs = _normalise_alternatives(distribution, "distribution")
        chosen, _ = pairs[0]
        return self.add_answer(
            match, [chosen], top_logprobs=[pairs], latency=latency, model=model, times=times
        )

    def fail(
        self,
        match: Matcher,
        *,
        status: int = 500,
        message: str = "scripted backend failure",
        times: int | None = None,
        after_tokens: int = 0,
        model: str | None = None,
    ) -> ScriptedRule[ChatRequest]:
        """Make matching requests fail with ``BackendError(message, status)``.

        With ``after_tokens=0`` the error happens before any output (the server replies with
        HTTP ``status`` and ``{"error": message}``). With ``after_tokens=n`` the answer that
        would otherwise be chosen streams ``n`` tokens and then fails (the server sends an
        ``{"error": ...}`` line mid-stream). ``times`` limits how often the rule fires, e.g.
        ``times=1`` for "fail once, then succeed" retry tests.
        """
        predicate, description = compile_matcher(match, self._last_user_text)
        check_times(times)
        if not isinstance(status, int) or not 400 <= status <= 599:
            raise InvalidArgumentError(f"status must be an HTTP error status (400-599), got {status!r}")
        if after_tokens < 0:
            raise InvalidArgumentError(f"after_tokens must be >= 0, got {after_tokens}")
        payload = _Failure(status, message, after_tokens)
        return self._add(ScriptedRule("fail", description, times, 0, model, predicate, payload))

    def delay(
        self,
        match: Matcher,
        seconds: float,
        *,
        times: int | None = None,
        model: str | None = None,
    ) -> ScriptedRule[ChatRequest]:
        """Add ``seconds`` of latency before the first token of matching requests.

        Composes with any answer (including the default) and with failures.
        """
        predicate, description = compile_matcher(match, self._last_user_text)
        check_times(times)
        payload = check_seconds("seconds", seconds)
        return self._add(ScriptedRule("delay", description, times, 0, model, predicate, payload))

    def set_default(
        self,
        answer: str | Sequence[str] | Sequence[GeneratedToken] | None,
        *,
        logprobs: float | Sequence[float] | None = None,
        top_logprobs: TopLogprobsSpec | None = None,
        latency: float = 0.0,
    ) -> None:
        """Set the answer for requests that match no answer rule (``None``: fail with 404)."""
        if answer is None:
            default = None
        else:
            default = _Answer(
                tokens=_build_tokens(answer, logprobs, top_logprobs),
                latency=check_seconds("latency", latency),
                token_delay=0.0,
                tool_calls=(),
                done_reason="stop",
                prompt_tokens=None,
            )
        with self._lock:
            self._default = default

    def set_models(self, models: Sequence[str]) -> None:
        """Replace the model names listed by ``/api/tags``."""
        if isinstance(models, str):
            raise InvalidTypeError("models must be a list of names, not a single str")
        with self._lock:
            self._models = list(models)

    def reset(self) -> None:
        """Drop all rules and recorded requests and restore the constructor's default answer."""
        with self._lock:
            self._book = RuleBook()
            self._requests.clear()
            self._embed_requests.clear()
            self.default_calls = 0
            self.generated_tokens = 0
        default_answer, default_logprob = self._initial_default
        self.set_default(default_answer, logprobs=default_logprob)

    # ---- inspection ------------------------------------------------------------------------

    @property
    def requests(self) -> list[ChatRequest]:
        """A snapshot of all chat requests received, oldest first."""
        with self._lock:
            return list(self._requests)

    @property
    def embed_requests(self) -> list[tuple[str, list[str]]]:
        """A snapshot of ``(model, inputs)`` for every :meth:`embed` call."""
        with self._lock:
            return [(model, list(inputs)) for model, inputs in self._embed_requests]

    @property
    def rules(self) -> list[ScriptedRule[ChatRequest]]:
        """All rules, in the order added."""
        with self._lock:
            return list(self._book.rules)

    @staticmethod
    def _last_user_text(request: ChatRequest) -> str:
        return last_user_text(request.messages)

    # ---- ChatBackend -----------------------------------------------------------------------

    def chat(self, request: ChatRequest) -> ChatReply:
        """Answer ``request`` from the rules (see the class docstring).

        Latency and per-token delays happen lazily while the reply's tokens are iterated, so
        the server can send the first token as soon as it exists. A ``template`` (``/api/generate``)
        is kept on the recorded request (:attr:`requests`); the answer is the scripted one. Failures without
        ``after_tokens`` raise :class:`BackendError` here (after any delay).
        """
        with self._lock:
            self._requests.append(request)
            if self.strict_models and not self._knows(request.model):
                raise BackendError(f"model '{request.model}' not found", status=404)
            delay_rule = self._book.first("delay", request, request.model)
            failure_rule = self._book.first("fail", request, request.model)
            failure: _Failure | None = failure_rule.payload if failure_rule else None
            answer: _Answer | None = None
            # An immediate failure must not use up an answer rule (``times`` budgets).
            if failure is None or failure.after_tokens > 0:
                answer_rule = self._book.first("answer", request, request.model)
                if answer_rule is not None:
                    answer = answer_rule.payload
                else:
                    answer = self._default
                    self.default_calls += 1
        extra_latency: float = delay_rule.payload if delay_rule is not None else 0.0

        if failure is not None and failure.after_tokens == 0:
            if extra_latency:
                _wait(extra_latency, request)
            raise BackendError(failure.message, status=failure.status)
        if answer is None:
            raise BackendError(
                "ScriptedBackend: no answer rule matches the last user message "
                f"{last_user_text(request.messages)!r} and there is no default answer",
                status=404,
            )
        prompt_tokens = (
            answer.prompt_tokens
            if answer.prompt_tokens is not None
            else _count_prompt_tokens(request.messages)
        )
        return ChatReply(
            tokens=self._emit(answer, extra_latency, failure, request),
            prompt_tokens=prompt_tokens,
            done_reason=answer.done_reason,
            tool_calls=list(answer.tool_calls),
        )

    def _emit(
        self,
        answer: _Answer,
        extra_latency: float,
        failure: _Failure | None,
        request: ChatRequest,
    ) -> Iterator[GeneratedToken]:
        latency = answer.latency + extra_latency
        if latency and not _wait(latency, request):
            return  # the client hung up while we "thought": generate nothing
        for i, token in enumerate(answer.tokens):
            if failure is not None and i >= failure.after_tokens:
                raise BackendError(failure.message, status=failure.status)
            if i and answer.token_delay and not _wait(answer.token_delay, request):
                return  # the client hung up while the model stalled: generate no more
            with self._lock:
                self.generated_tokens += 1
            yield token
        if failure is not None:
            # Fewer tokens than ``after_tokens``: still fail, the test asked for a failure.
            raise BackendError(failure.message, status=failure.status)

    def embed(self, model: str, inputs: Sequence[str]) -> list[list[float]]:
        """Embed each input with :func:`hashing_embedding` (``embedding_dim`` dimensions)."""
        with self._lock:
            self._embed_requests.append((model, list(inputs)))
            if self.strict_models and not self._knows(model):
                raise BackendError(f"model '{model}' not found", status=404)
        return [hashing_embedding(text, self.embedding_dim) for text in inputs]

    def models(self) -> list[str]:
        """The configured model names."""
        with self._lock:
            return list(self._models)

    def capabilities(self, model: str) -> list[str]:
        """What ``/api/show`` reports: ``["completion", "tools"]`` (requests with ``tools``
        are answered, with the scripted ``tool_calls``). Not ``"insert"``: the server refuses
        an ``/api/generate`` ``suffix`` (400), as Ollama does for such a model.

        Raises:
            BackendError: 404 for an unknown model when ``strict_models``.
        """
        with self._lock:
            if self.strict_models and not self._knows(model):
                raise BackendError(f"model '{model}' not found", status=404)
        return ["completion", "tools"]

    # ---- internals -------------------------------------------------------------------------

    def _knows(self, model: str) -> bool:
        # Ollama treats "name" and "name:latest" as the same model (caller holds the lock).
        def norm(name: str) -> str:
            return name if ":" in name else f"{name}:latest"

        return any(norm(model) == norm(known) for known in self._models)

    def _add(self, rule: ScriptedRule[ChatRequest]) -> ScriptedRule[ChatRequest]:
        with self._lock:
            self._book.rules.append(rule)
        return rule


class InFlightBackend(ScriptedBackend):
    """A :class:`ScriptedBackend` that counts the generations the server is still running.

    ``in_flight`` counts replies whose tokens are still being produced (a model "thinking"
    before its first token counts); ``started`` counts every reply begun. After a client gave
    up (a timeout, a closed stream), ``in_flight`` falling to 0 shows the server stopped work.

    >>> backend = InFlightBackend()
    >>> (backend.in_flight, backend.started)
    (0, 0)
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._count_lock = threading.Lock()
        self.in_flight = 0
        self.started = 0

    def chat(self, request: ChatRequest) -> ChatReply:
        reply = super().chat(request)
        return dataclasses.replace(reply, tokens=self._counted(reply.tokens))

    def _counted(self, tokens: Iterable[Any]) -> Iterator[Any]:
        with self._count_lock:
            self.in_flight += 1
            self.started += 1
        try:
            yield from tokens
        finally:
            with self._count_lock:
                self.in_flight -= 1
