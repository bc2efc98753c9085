"""Failure semantics: classify errors, retry the retryable ones with backoff, spot refusals.

Pure stdlib: botocore, httpx and ollama errors are recognised by duck typing (the
``response["Error"]["Code"]`` of a botocore ``ClientError``, a ``status_code``, class names),
so importing this module loads none of them.

>>> class FakeClientError(Exception):
...     def __init__(self, code):
...         super().__init__(code)
...         self.response = {"Error": {"Code": code}}
>>> classify_error(FakeClientError("ThrottlingException"))
<ErrorKind.THROTTLED: 'throttled'>
>>> classify_error(FakeClientError("ValidationException")).retryable
False
>>> RetryPolicy(max_attempts=4, base_delay=0.5, jitter=False).delays()
[0.5, 1.0, 2.0]

What is retried follows the paper's Bedrock client (docs/how-it-works.md §3): throttling
(``ThrottlingException``, ``TooManyRequestsException``), transient service errors
(``ServiceUnavailableException``, ``ModelErrorException``, ``InternalServerException``),
connection errors and timeouts. Never retried: ``AccessDeniedException``,
``UnauthorizedException``, ``ValidationException`` and other client errors. Beyond the paper:
HTTP 5xx and 429 from Ollama (``ResponseError.status_code``) are retried too; the paper
suggested it.

A connection lost *after* the request was sent (reset, closed before the response, a
truncated read) is its own kind, :attr:`ErrorKind.DISCONNECTED`: like a read timeout, the
request may have run and been billed, so the router's default retry policy (throttled and
transient only) does not send it again; one that could not be made at all (refused, DNS,
no route) is ``TRANSIENT``.

A **refusal** is not an error: the call succeeded and the model (or a guardrail) declined.
:func:`is_refusal` reads it from the response metadata so the router can tell the two apart.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, TypeVar

from confidence_router.errors import InvalidArgumentError, InvalidTypeError

__all__ = [
    "PAPER_BEDROCK_RETRY",
    "REFUSAL_STOP_REASONS",
    "RETRYABLE_KINDS",
    "ErrorKind",
    "RetryEvent",
    "RetryPolicy",
    "classify_error",
    "error_code",
    "is_refusal",
    "may_have_been_billed",
    "refusal_reason",
]

T = TypeVar("T")


class ErrorKind(str, Enum):
    """What kind of failure an exception is (a ``str``, so it serialises as its value)."""

    THROTTLED = "throttled"
    """Rate limited (Bedrock throttling, HTTP 429): retry after backing off."""
    TRANSIENT = "transient"
    """The service answered with a server-side error (HTTP 5xx), or no connection could be
    made (refused, unreachable endpoint): nothing ran, retry."""
    TIMEOUT = "timeout"
    """Connect/read timeout: retry (a read timeout may have been billed)."""
    DISCONNECTED = "disconnected"
    """The connection was lost after the request was sent (reset, closed before a complete
    response): it may have run and been billed. Retried by :class:`RetryPolicy`'s default,
    not by the router's default cloud retries."""
    PERMANENT = "permanent"
    """Will fail again (bad request, access denied, unknown model, no credentials)."""
    UNKNOWN = "unknown"
    """Not recognised (often a bug in the caller): not retried."""

    @property
    def retryable(self) -> bool:
        """Whether the default policy retries this kind."""
        return self in RETRYABLE_KINDS


RETRYABLE_KINDS: frozenset[ErrorKind] = frozenset(
    {ErrorKind.THROTTLED, ErrorKind.TRANSIENT, ErrorKind.TIMEOUT, ErrorKind.DISCONNECTED}
)

# botocore ClientError codes (response["Error"]["Code"]).
_CODE_KINDS: Mapping[str, ErrorKind] = {
    **dict.fromkeys(
        (
            "ThrottlingException", "TooManyRequestsException", "Throttling",
            "ThrottledException", "RequestThrottledException", "RequestThrottled",
            "RequestLimitExceeded", "ProvisionedThroughputExceededException", "SlowDown",
            "BandwidthLimitExceeded",
        ),
        ErrorKind.THROTTLED,
    ),
    **dict.fromkeys(
        (
            "ServiceUnavailableException", "ServiceUnavailable", "ModelErrorException",
            "InternalServerException", "InternalServerError", "InternalFailure",
            "InternalError", "ModelNotReadyException", "ModelStreamErrorException",
        ),
        ErrorKind.TRANSIENT,
    ),
    **dict.fromkeys(
        ("ModelTimeoutException", "RequestTimeout", "RequestTimeoutException"),
        ErrorKind.TIMEOUT,
    ),
    **dict.fromkeys(
        (
            "AccessDeniedException", "UnauthorizedException", "ValidationException",
            "ResourceNotFoundException", "UnrecognizedClientException",
            "InvalidSignatureException", "ExpiredTokenException", "IncompleteSignature",
            "MissingAuthenticationToken", "NotAuthorized", "ConflictException",
            # A quota (e.g. tokens per day) does not recover within a retry schedule.
            "ServiceQuotaExceededException",
        ),
        ErrorKind.PERMANENT,
    ),
}  # fmt: skip

# Exception class names anywhere in the MRO (httpx, botocore, urllib3, requests, openai, ...).
_TIMEOUT_NAMES = frozenset(
    {
        "TimeoutError", "TimeoutException", "Timeout", "ReadTimeout", "WriteTimeout",
        "ConnectTimeout", "PoolTimeout", "ReadTimeoutError", "ConnectTimeoutError",
        "APITimeoutError",
    }
)  # fmt: skip
_CONNECTION_NAMES = frozenset(
    {
        "ConnectionError", "ConnectError", "NetworkError", "RemoteProtocolError", "ReadError",
        "WriteError", "EndpointConnectionError", "ConnectionClosedError", "APIConnectionError",
        "IncompleteRead", "ServerDisconnectedError", "ClientConnectionError",
    }
)  # fmt: skip
_THROTTLED_NAMES = frozenset({"RateLimitError"})
_PERMANENT_NAMES = frozenset(
    {
        "NoCredentialsError", "PartialCredentialsError", "ParamValidationError",
        "NoRegionError", "UnknownServiceError", "AuthenticationError", "PermissionDeniedError",
        "SSLCertVerificationError",
    }
)  # fmt: skip


def _chain(exc: BaseException, limit: int = 16) -> Iterator[BaseException]:
    """``exc``, then its causes/contexts, outermost first (each once, at most ``limit``).

    A context suppressed with ``raise ... from None`` is skipped: the raiser said it is not
    the cause.
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen and len(seen) < limit:
        seen.add(id(current))
        yield current
        if current.__cause__ is not None:
            current = current.__cause__
        elif not current.__suppress_context__:
            current = current.__context__
        else:
            current = None


def _client_error_code(exc: BaseException) -> tuple[str | None, int | None]:
    """``(Error.Code, HTTPStatusCode)`` of a botocore-shaped error, else ``(None, None)``."""
    response = getattr(exc, "response", None)
    if not isinstance(response, Mapping):
        return None, None
    error = response.get("Error")
    code = error.get("Code") if isinstance(error, Mapping) else None
    meta = response.get("ResponseMetadata")
    status = meta.get("HTTPStatusCode") if isinstance(meta, Mapping) else None
    return (
        code if isinstance(code, str) and code else None,
        status if isinstance(status, int) and not isinstance(status, bool) else None,
    )


def _status_code(exc: BaseException) -> int | None:
    """An HTTP status from ``exc.status_code`` (ollama, openai) or ``exc.response.status_code``
    (httpx.HTTPStatusError, requests)."""
    for holder in (exc, getattr(exc, "response", None)):
        status = getattr(holder, "status_code", None)
        if isinstance(status, int) and not isinstance(status, bool):
            return status
    return None


def _kind_of_status(status: int | None) -> ErrorKind:
    if status is None:
        return ErrorKind.UNKNOWN
    if status == 429:
        return ErrorKind.THROTTLED
    if status == 408:
        return ErrorKind.TIMEOUT
    if status == 501:  # Not Implemented: retrying cannot help
        return ErrorKind.PERMANENT
    if 500 <= status <= 599:
        return ErrorKind.TRANSIENT
    if 400 <= status <= 499:
        return ErrorKind.PERMANENT
    return ErrorKind.UNKNOWN  # e.g. ollama's ResponseError default status_code=-1


def _classify_one(exc: BaseException) -> ErrorKind:
    code, status = _client_error_code(exc)
    if code is not None:
        # Errors inside an event stream are named in lowerCamelCase ("throttlingException").
        kind = _CODE_KINDS.get(code) or _CODE_KINDS.get(code[:1].upper() + code[1:])
        if kind is not None:
            return kind
    if code is not None or status is not None:
        return _kind_of_status(status if status is not None else _status_code(exc))
    names = {cls.__name__ for cls in type(exc).__mro__}
    # Timeouts first: TimeoutError is an OSError, and botocore's timeouts subclass its
    # ConnectionError; both are retryable, but the kind should say "timeout".
    if isinstance(exc, TimeoutError) or names & _TIMEOUT_NAMES:
        return ErrorKind.TIMEOUT
    if names & _THROTTLED_NAMES:
        return ErrorKind.THROTTLED
    if names & _PERMANENT_NAMES:
        return ErrorKind.PERMANENT
    status = _status_code(exc)
    if status is not None:
        return _kind_of_status(status)
    if isinstance(exc, ConnectionError) or names & _CONNECTION_NAMES:
        if names & _NOT_SENT_NAMES:
            return ErrorKind.TRANSIENT  # never connected: nothing ran
        return ErrorKind.DISCONNECTED  # lost after sending: it may have run
    return ErrorKind.UNKNOWN


def classify_error(exc: BaseException) -> ErrorKind:
    """The :class:`ErrorKind` of ``exc``, looking through ``__cause__`` / ``__context__``.

    Recognised, outermost exception first (the first recognised one wins):

    * botocore ``ClientError`` (anything with ``response["Error"]["Code"]``): by code, see
      the module docstring; an unlisted code falls back to
      ``response["ResponseMetadata"]["HTTPStatusCode"]``.
    * an HTTP status (``exc.status_code`` as on ``ollama.ResponseError``, or
      ``exc.response.status_code`` as on ``httpx.HTTPStatusError``): 429 throttled, 408
      timeout, 5xx transient (501 permanent), other 4xx permanent.
    * builtin ``TimeoutError`` / ``ConnectionError`` and, by class name, httpx
      (``TimeoutException``, ``ConnectError``, ``RemoteProtocolError``, ...), botocore
      (``ReadTimeoutError``, ``EndpointConnectionError``, ``NoCredentialsError``, ...) and
      OpenAI-style (``RateLimitError``, ``APITimeoutError``) errors. A connection error is
      ``TRANSIENT`` when no connection was made (refused, unreachable endpoint) and
      ``DISCONNECTED`` when it was lost after the request went out.

    Example::

        >>> classify_error(TimeoutError()), classify_error(ConnectionRefusedError())
        (<ErrorKind.TIMEOUT: 'timeout'>, <ErrorKind.TRANSIENT: 'transient'>)
        >>> classify_error(ConnectionResetError())
        <ErrorKind.DISCONNECTED: 'disconnected'>
        >>> classify_error(KeyError("x"))
        <ErrorKind.UNKNOWN: 'unknown'>
    """
    for link in _chain(exc):
        kind = _classify_one(link)
        if kind is not ErrorKind.UNKNOWN:
            return kind
    return ErrorKind.UNKNOWN


def error_code(exc: BaseException) -> str:
    """A short label for stats and logs: the botocore error code, ``"HTTP <status>"``, or the
    class name (first recognisable link of the chain, else the outermost class name).

    Example::

        >>> error_code(TimeoutError("slow"))
        'TimeoutError'
    """
    for link in _chain(exc):
        code, status = _client_error_code(link)
        if code:
            return code
        status = status if status is not None else _status_code(link)
        if status is not None and status >= 0:
            return f"HTTP {status}"
        if _classify_one(link) is not ErrorKind.UNKNOWN:
            return type(link).__name__
    return type(exc).__name__


# Never connected: the request cannot have reached the service.
_NOT_SENT_NAMES = frozenset(
    {
        "ConnectError", "ConnectTimeout", "ConnectTimeoutError", "EndpointConnectionError",
        "ConnectionRefusedError", "NoCredentialsError", "PartialCredentialsError",
        "ParamValidationError", "NoRegionError", "EscalationBlockedError",
    }
)  # fmt: skip


def may_have_been_billed(exc: BaseException) -> bool:
    """Whether a failed cloud request may still have been processed (and billed).

    ``False`` only when the request provably did not run: the service answered with an error
    (throttling, 4xx, 5xx: Bedrock does not bill those) or the connection was never made.
    A read timeout, a connection dropped after sending, a cancellation or anything
    unrecognised may have been billed: budgets must count it as spent.

    Example::

        >>> class FakeClientError(Exception):
        ...     response = {"Error": {"Code": "ThrottlingException"}}
        >>> may_have_been_billed(FakeClientError()), may_have_been_billed(TimeoutError())
        (False, True)
        >>> may_have_been_billed(ConnectionRefusedError())
        False
    """
    for link in _chain(exc):
        code, status = _client_error_code(link)
        if code is not None or status is not None:
            return False  # the service answered: an error response is not billed
        status = _status_code(link)
        if status is not None and status >= 400:
            return False
        names = {cls.__name__ for cls in type(link).__mro__}
        if names & _NOT_SENT_NAMES:
            return False
    return True


# --------------------------------------------------------------------------------------------
# Retrying
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RetryEvent:
    """Passed to ``on_retry`` before each backoff sleep."""

    attempt: int
    """The attempt that just failed (1-based)."""
    kind: ErrorKind
    delay: float
    """Seconds about to be slept before the next attempt."""
    error: BaseException


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff for retryable errors.

    The delay before retry ``i`` (0-based) is ``min(max_delay, base_delay * 2**i)``; with
    ``jitter`` it is drawn uniformly from ``[d/2, d]`` ("equal jitter": concurrent clients
    de-synchronise, but a throttled client still waits at least half the nominal delay).
    ``seed`` makes the jitter reproducible (tests); leave it ``None`` in production, or every
    worker jitters identically.

    Args:
        max_attempts: total attempts including the first (1 = no retry).
        base_delay: first delay in seconds.
        max_delay: cap on any delay.
        jitter: randomise delays as above.
        seed: seed of the jitter.
        retry_on: the kinds retried (default throttled, transient, timeout, disconnected).

    Example::

        >>> PAPER_BEDROCK_RETRY.delays()            # the paper's: 6 attempts
        [1.0, 2.0, 4.0, 8.0, 16.0]
        >>> calls = []
        >>> def flaky():
        ...     calls.append(1)
        ...     if len(calls) < 3:
        ...         raise ConnectionResetError("reset")
        ...     return "ok"
        >>> slept = []
        >>> RetryPolicy(jitter=False).call(flaky, sleep=slept.append), slept
        ('ok', [0.5, 1.0])
    """

    max_attempts: int = 3
    base_delay: float = 0.5
    max_delay: float = 8.0
    jitter: bool = True
    seed: int | None = None
    retry_on: frozenset[ErrorKind] = field(default=RETRYABLE_KINDS)

    def __post_init__(self) -> None:
        if isinstance(self.max_attempts, bool) or not isinstance(self.max_attempts, int):
            raise InvalidTypeError(f"max_attempts must be an int >= 1, got {self.max_attempts!r}")
        if self.max_attempts < 1:
            raise InvalidArgumentError(f"max_attempts must be >= 1, got {self.max_attempts!r}")
        for name in ("base_delay", "max_delay"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise InvalidTypeError(f"{name} must be a number of seconds, got {value!r}")
            if not 0 <= value < float("inf"):
                raise InvalidArgumentError(f"{name} must be finite and >= 0, got {value!r}")
        object.__setattr__(self, "retry_on", frozenset(ErrorKind(k) for k in self.retry_on))

    def delays(self) -> list[float]:
        """The ``max_attempts - 1`` sleeps between attempts (a fresh jitter draw per call)."""
        rng = random.Random(self.seed)
        out = []
        for i in range(self.max_attempts - 1):
            # Cap the exponent too: 2**i overflows float for very long schedules.
            nominal = min(float(self.max_delay), self.base_delay * 2.0 ** min(i, 1023))
            out.append(rng.uniform(nominal / 2, nominal) if self.jitter else nominal)
        return out

    def should_retry(self, kind: ErrorKind) -> bool:
        """Whether errors of ``kind`` are retried by this policy."""
        return kind in self.retry_on

    def call(
        self,
        fn: Callable[[], T],
        *,
        sleep: Callable[[float], Any] = time.sleep,
        on_retry: Callable[[RetryEvent], Any] | None = None,
        classify: Callable[[BaseException], ErrorKind] = classify_error,
    ) -> T:
        """Call ``fn()`` until it succeeds, retrying retryable errors with backoff.

        A non-retryable error, or the last attempt's error, is re-raised unchanged (same
        object and traceback) after recording the attempts on it: attribute
        ``retry_attempts`` (int) and ``retry_kind`` (:class:`ErrorKind`), plus a note
        (``add_note``, Python 3.11+). Only ``Exception`` is caught: ``KeyboardInterrupt`` and
        cancellation propagate at once.

        Args:
            fn: a zero-argument callable (use ``functools.partial`` or a lambda for args).
            sleep: called with each delay (inject a fake in tests).
            on_retry: called before each sleep (logging, metrics).
            classify: the error classifier.
        """
        delays = self.delays()
        slept: list[float] = []
        attempt = 0
        while True:
            attempt += 1
            try:
                return fn()
            except Exception as exc:
                delay = self._next_delay(exc, attempt, delays, slept, classify, on_retry)
                if delay is None:
                    raise
            sleep(delay)
            slept.append(delay)

    async def acall(
        self,
        fn: Callable[[], Awaitable[T]],
        *,
        sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
        on_retry: Callable[[RetryEvent], Any] | None = None,
        classify: Callable[[BaseException], ErrorKind] = classify_error,
    ) -> T:
        """Async :meth:`call`: ``await fn()`` with ``await sleep(delay)`` between attempts."""
        delays = self.delays()
        slept: list[float] = []
        attempt = 0
        while True:
            attempt += 1
            try:
                return await fn()
            except Exception as exc:
                delay = self._next_delay(exc, attempt, delays, slept, classify, on_retry)
                if delay is None:
                    raise
            await sleep(delay)
            slept.append(delay)

    def _next_delay(
        self,
        exc: Exception,
        attempt: int,
        delays: list[float],
        slept: list[float],
        classify: Callable[[BaseException], ErrorKind],
        on_retry: Callable[[RetryEvent], Any] | None,
    ) -> float | None:
        """The delay before the next attempt, or ``None`` to give up (``exc`` annotated)."""
        kind = classify(exc)
        if not self.should_retry(kind):
            _annotate(exc, attempt, kind, f"not retried: {kind.value} error")
            return None
        if attempt >= self.max_attempts:
            waits = ", ".join(f"{d:.3g}" for d in slept)
            _annotate(
                exc,
                attempt,
                kind,
                f"gave up after {attempt} attempts ({kind.value}); slept [{waits}] s",
            )
            return None
        delay = delays[attempt - 1]
        if on_retry is not None:
            on_retry(RetryEvent(attempt, kind, delay, exc))
        return delay


def _annotate(exc: Exception, attempts: int, kind: ErrorKind, text: str) -> None:
    try:
        exc.retry_attempts = attempts  # type: ignore[attr-defined]
        exc.retry_kind = kind  # type: ignore[attr-defined]
    except (AttributeError, TypeError):  # __slots__ or a C type without __dict__
        pass
    add_note = getattr(exc, "add_note", None)  # Python 3.11+
    if add_note is not None:
        add_note(f"confidence-router retry: {text}")


PAPER_BEDROCK_RETRY = RetryPolicy(max_attempts=6, base_delay=1.0, max_delay=16.0, jitter=False)
"""The paper's Bedrock schedule (docs/how-it-works.md §3): 6 attempts, backoff 1, 2, 4, 8, 16 s."""


# --------------------------------------------------------------------------------------------
# Refusals
# --------------------------------------------------------------------------------------------

REFUSAL_STOP_REASONS = frozenset(
    {
        "content_filtered",  # Bedrock Converse: content filtering
        "guardrail_intervened",  # Bedrock Converse: a guardrail blocked the answer
        "refusal",  # Anthropic API: the model declined (Claude 4+)
        "content_filter",  # OpenAI-compatible finish_reason
    }
)
"""Stop reasons meaning the model (or a guardrail) declined to answer. Ollama has none."""

_STOP_KEYS = ("stopReason", "stop_reason", "finish_reason", "done_reason")


def refusal_reason(response_metadata: Mapping[str, Any] | None) -> str | None:
    """The refusal stop reason in ``response_metadata`` (e.g. ``"guardrail_intervened"``), or
    ``None`` when the response is not a refusal.

    Reads ``stopReason`` (Bedrock Converse, as LangChain's ``ChatBedrockConverse`` puts it),
    ``stop_reason`` (Anthropic), ``finish_reason`` (OpenAI) and ``done_reason`` (Ollama).

    Example::

        >>> refusal_reason({"stopReason": "guardrail_intervened"})
        'guardrail_intervened'
        >>> refusal_reason({"stopReason": "end_turn"}) is None
        True
    """
    if not isinstance(response_metadata, Mapping):
        return None
    for key in _STOP_KEYS:
        value = response_metadata.get(key)
        if isinstance(value, str) and value.strip().lower() in REFUSAL_STOP_REASONS:
            return value.strip().lower()
    return None


def is_refusal(response_metadata: Mapping[str, Any] | None) -> bool:
    """Whether a *successful* response is a refusal (see :func:`refusal_reason`).

    Example::

        >>> is_refusal({"stopReason": "content_filtered"}), is_refusal({"done_reason": "stop"})
        (True, False)
    """
    return refusal_reason(response_metadata) is not None
