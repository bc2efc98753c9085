"""The routing flow of one call, written once for invoke, stream, sync and async.

:func:`route` is a generator that never does I/O itself: it *yields* what it needs done (an
effect: probe, generate on a tier, sleep before a retry, announce the decision, learn) and is
sent the result, or has the effect's exception thrown into it. The router's two small drivers
(sync and async, in ``router.py``) execute the effects; they are the only place where
``await`` differs. So the decision logic cannot drift between the four entry points.

Private to the router.
"""

from __future__ import annotations

from collections.abc import Generator, Sequence
from dataclasses import dataclass, field
from typing import Any

from langchain_core.messages import AIMessageChunk, BaseMessage

from confidence_router._record import RoutingTrace
from confidence_router.errors import EscalationBlockedError, InvalidTypeError


@dataclass
class Answer:
    """A tier's answer: the aggregated message and, when it was streamed, its chunks."""

    message: BaseMessage
    chunks: list[AIMessageChunk] = field(default_factory=list)
    emitted: bool = False
    """The chunks already went to the caller (a streamed cloud answer)."""
    early_exit: dict[str, Any] | None = None
    """Set on a local answer when early exit was on: ``{"exited": bool, "tokens": n}``."""


# -- effects (what the flow asks the driver to do) ---------------------------------------------


@dataclass(frozen=True)
class Probe:
    """Run the pre-check probe on ``query``; send back its score."""

    query: str


@dataclass(frozen=True)
class Generate:
    """Ask ``tier`` for an answer; send back an :class:`Answer`.

    ``emit``: stream the chunks to the caller as they arrive (the cloud tier in a stream).
    With ``early_exit`` on, the driver asks the trace after each local chunk whether the
    answer can still be kept; when it cannot, it closes the stream (the server stops
    generating) and sends back what it has, marked in ``Answer.early_exit``.
    """

    tier: str
    emit: bool = False
    complete: bool = False
    """Never stop early: the answer will be served as it is (e.g. after a refused escalation)."""


@dataclass(frozen=True)
class Sleep:
    """Back off before the next cloud attempt."""

    seconds: float


@dataclass(frozen=True)
class Announce:
    """Emit the ``routing_decision`` custom event to the callbacks."""


@dataclass(frozen=True)
class Learn:
    """Store the cloud's answer as knowledge (opt-in)."""

    message: BaseMessage


class PartialStreamError(Exception):
    """Raised into the flow by a driver when a streamed cloud answer failed after some chunks
    already reached the caller."""

    def __init__(self, error: BaseException, n_chunks: int) -> None:
        super().__init__(str(error))
        self.error = error
        self.n_chunks = n_chunks


Effect = Probe | Generate | Sleep | Announce | Learn


def route(
    trace: RoutingTrace, *, precheck_query: str | None, stream: bool, learn: bool
) -> Generator[Effect, Any, Answer]:
    """The flow of one routed call; returns the answer to serve (its record in ``trace``)."""
    local: Answer | None = None
    skip_local = False
    if precheck_query is not None:
        try:
            score = yield Probe(precheck_query)
        except Exception as error:  # noqa: BLE001 - a failed probe never blocks the query
            trace.precheck_failed(error)
        else:
            try:
                skip_local = trace.precheck_done(score)
            except InvalidTypeError as error:  # an unreadable score is a failed probe too
                trace.precheck_failed(error)
    if not skip_local:
        try:
            local = yield Generate("local")
        except Exception as error:  # noqa: BLE001 - any local failure escalates
            trace.local_failed(error)
        if not trace.after_local(local.message if local else None, early_exit=_stopped(local)):
            yield Announce()
            return _require(local, trace)

    trace.escalating(local.message if local else None)
    if not trace.reserve_budget(_whole(local)):
        if trace.needs_local_after_refusal(_complete(local)):
            local = yield from _retake(trace)
        yield Announce()
        return _require(local, trace)

    yield Announce()
    attempt = 0
    while True:
        attempt += 1
        trace.cloud_attempt_started()
        try:
            cloud = yield Generate("cloud", emit=stream)
        except EscalationBlockedError as error:
            # The guard stopped the request on the wire: nothing left the process.
            trace.blocked_on_the_wire(error)
            if trace.needs_local_after_refusal(_complete(local)):
                local = yield from _retake(trace)
            return _require(local, trace)
        except PartialStreamError as partial:
            raise trace.partial_cloud_failure(
                partial.error, partial.n_chunks, _whole(local)
            ) from partial.error
        except Exception as error:  # noqa: BLE001 - retry, then on_cloud_error decides
            trace.cloud_attempt_failed(error)
            delay = trace.retry_delay(error, attempt)
            if delay is not None:
                yield Sleep(delay)
                continue
            if trace.needs_local_after_cloud_failure(_complete(local), local is not None):
                local = yield from _retake(trace, cloud_error=error)
            trace.cloud_fallback(error, _whole(local))  # raises or returns
            return _require(local, trace)
        trace.cloud_done(cloud.message)
        if learn:
            yield Learn(cloud.message)
        return cloud


def _retake(
    trace: RoutingTrace, cloud_error: BaseException | None = None
) -> Generator[Effect, Any, Answer]:
    """The whole local answer, generated (again) to be served after a refused or failed
    escalation. If that fails there is nothing left to serve: a typed error with the record
    (after a cloud failure, :class:`~confidence_router.errors.CloudEscalationError` naming
    both failures; else :class:`~confidence_router.errors.LocalModelError`)."""
    try:
        local = yield Generate("local", complete=True)
    except Exception as error:
        trace.retake_failed(error)
        if cloud_error is not None:
            trace.cloud_fallback(cloud_error, None)  # raises: no local answer to fall back on
        raise trace.no_answer_error() from error
    trace.local_regenerated(local.message)
    return local


def _complete(answer: Answer | None) -> bool:
    """A local answer that can be served as it is (not stopped early)."""
    return answer is not None and not (answer.early_exit or {}).get("exited")


def _whole(answer: Answer | None) -> BaseMessage | None:
    """The local message an error may hand back as "the local answer": never the prefix of
    one stopped early (serving it would serve a partial answer, which the router never does)."""
    return answer.message if answer is not None and _complete(answer) else None


def _stopped(answer: Answer | None) -> dict[str, Any] | None:
    return answer.early_exit if answer is not None else None


def _require(answer: Answer | None, trace: RoutingTrace) -> Answer:
    """The local answer to serve; fails (typed, with the record) when there is none."""
    if answer is None:
        raise trace.no_answer_error()
    return answer


def messages_of(chunks: Sequence[AIMessageChunk]) -> AIMessageChunk:
    """The chunks of a streamed answer merged into one message."""
    if not chunks:
        return AIMessageChunk(content="")
    total = chunks[0]
    for chunk in chunks[1:]:
        total = total + chunk
    return total
