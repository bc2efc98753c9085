"""A cap on cloud spend per rolling time window, exact under concurrency.

Escalations reserve their estimated cost **before** calling the cloud and settle it after:

>>> from confidence_router.costs import Price
>>> budget = CloudBudget(max_usd=0.01, window_s=3600)
>>> est = estimate_escalation_cost("What is the capital of Australia?" * 10, 256,
...                                Price(3.0, 15.0))
>>> round(est, 6)                      # ceil(330 chars / 4) = 83 tokens in, 256 out
0.004089
>>> r = budget.reserve(est)            # None when it would exceed the cap
>>> r is not None
True
>>> r.commit(0.0031)                   # the actual cost, from the response's usage
>>> round(budget.spent, 6), round(budget.remaining, 6)
(0.0031, 0.0069)
>>> budget.reserve(0.007) is None      # 0.0031 + 0.007 > 0.01
True

**Why reservations.** Checking "spent + cost <= max" and then calling the cloud lets 32
concurrent requests all pass the check before any of them is recorded. A reservation counts
against the cap from the moment it is granted, under one lock, so the sum of granted
reservations and committed spend never exceeds ``max_usd``. The guarantee on what is actually
*spent* holds when each commit is at most its reservation: estimate with the maximum output
tokens (an upper bound) and a conservative chars-per-token. A larger commit is still recorded
in full (the money is spent) and counted in ``overruns``; later reservations are refused until
it leaves the window.

**Rolling, not fixed, window.** Spend counts for ``window_s`` seconds after its commit. A fixed
window (e.g. per clock hour) would allow up to twice the cap across a boundary; the rolling
window never allows more than ``max_usd`` in any ``window_s`` span.

**Concurrency.** One ``threading.Lock`` held for O(1) amortised work (plus dropping expired
entries); no I/O and no waiting, so it is safe from threads and from asyncio code. Exact
arithmetic: amounts are stored as :class:`fractions.Fraction` of their decimal representation
(``0.1`` is exactly 1/10), so ten reservations of 0.1 fit in a budget of 1.0 and no float
round-off can let an eleventh through.

Pure stdlib.
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from fractions import Fraction
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from confidence_router.calibration import InvalidStateError, read_json_state, write_json_atomic
from confidence_router.costs import Price
from confidence_router.errors import (
    BudgetExceededError,
    InvalidArgumentError,
    InvalidInputError,
    InvalidTypeError,
    ReservationStateError,
)

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = [
    "CHARS_PER_TOKEN",
    "IMAGE_BLOCK_TOKENS",
    "TOOL_USE_PROMPT_TOKENS",
    "BudgetLike",
    "CloudBudget",
    "Reservation",
    "ReservationBase",
    "ReservationLike",
    "ReservationStateError",
    "estimate_escalation_cost",
    "estimate_tokens",
    "exact_usd",
    "upper_bound_input_tokens",
    "upper_bound_request_cost",
]

CHARS_PER_TOKEN = 4.0
"""Rule of thumb for English prose with current BPE tokenizers (about 4 characters per token).
It under-counts code, numbers and non-Latin scripts (often 1-3 characters per token): pass a
smaller ``chars_per_token`` to estimate conservatively."""

_KIND = "confidence_router.CloudBudget"
_VERSION = 1


@runtime_checkable
class ReservationLike(Protocol):
    """What the router needs from a reservation (a shared store can provide its own)."""

    def commit(self, actual_usd: float | None = None) -> None:
        """Record the actual spend (default: the reserved amount) and free the reservation."""
        ...

    def release(self) -> None:
        """Free the reservation without spending (the cloud was not called, or failed)."""
        ...


@runtime_checkable
class BudgetLike(Protocol):
    """The spend-limiting interface the router uses; :class:`CloudBudget` is the in-process
    implementation, a shared store (several workers) can replace it."""

    def reserve(self, estimated_usd: float) -> ReservationLike | None:
        """Reserve ``estimated_usd``; ``None`` when that would exceed the budget."""
        ...


def exact_usd(value: Any, name: str) -> Fraction:
    """A non-negative finite amount as an exact Fraction of its decimal form."""
    if isinstance(value, bool) or not isinstance(value, (int, float, Fraction)):
        raise InvalidTypeError(f"{name} must be a number of USD, got {value!r}")
    if isinstance(value, float):
        if not math.isfinite(value):
            raise InvalidArgumentError(f"{name} must be finite, got {value!r}")
        # repr() is the shortest decimal that round-trips: 0.1 -> "0.1" -> exactly 1/10.
        amount = Fraction(repr(value))
    else:
        amount = Fraction(value)
    if amount < 0:
        raise InvalidArgumentError(f"{name} must be >= 0, got {value!r}")
    return amount


class ReservationBase:
    """What every reservation shares: its amount, its state, and the context-manager contract
    (leaving the block unsettled commits the reserved amount on a normal exit — the money may
    have been spent — and releases it when an exception escapes). Subclasses settle."""

    __slots__ = ("_amount", "_state")

    def __init__(self, amount: Fraction) -> None:
        self._amount = amount
        self._state = "pending"

    @property
    def amount_usd(self) -> float:
        """The reserved (estimated) amount."""
        return float(self._amount)

    @property
    def state(self) -> str:
        """``"pending"``, ``"committed"`` or ``"released"``."""
        return self._state

    def commit(self, actual_usd: float | None = None) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def release(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._state != "pending":
            return
        if exc_type is None:
            self.commit()
        else:
            self.release()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(amount_usd={float(self._amount)!r}, state={self._state!r})"


class Reservation(ReservationBase):
    """A granted reservation: settle it exactly once with :meth:`commit` or :meth:`release`.

    Also a context manager (see :class:`ReservationBase`).

    Example::

        >>> budget = CloudBudget(max_usd=1.0)
        >>> with budget.hold(0.25) as r:       # hold() raises BudgetExceededError instead
        ...     r.commit(0.2)                  # of returning None
        >>> budget.spent
        0.2
    """

    __slots__ = ("_budget",)

    def __init__(self, budget: CloudBudget, amount: Fraction) -> None:
        super().__init__(amount)
        self._budget = budget

    def commit(self, actual_usd: float | None = None) -> None:
        """Record the actual cost (default: the reserved amount) and free the reservation.

        Raises:
            ReservationStateError: already committed or released.
            TypeError, ValueError: ``actual_usd`` is not a finite amount >= 0.
        """
        actual = self._amount if actual_usd is None else exact_usd(actual_usd, "actual_usd")
        self._budget._settle(self, actual)

    def release(self) -> None:
        """Free the reservation without spending anything.

        Raises:
            ReservationStateError: already committed or released.
        """
        self._budget._settle(self, None)


class CloudBudget:
    """At most ``max_usd`` of cloud spend in any rolling ``window_s``-second span.

    Args:
        max_usd: the cap per window (0 refuses every non-free escalation).
        window_s: the window length in seconds (default one hour).
        clock: a monotonic clock in seconds (inject a fake one in tests).

    Usage in the router (sketch)::

        reservation = budget.reserve(estimate)
        if reservation is None:
            ...  # policy: serve the local answer flagged, or raise BudgetExceededError
        try:
            message = cloud.invoke(messages)
        except Exception:
            reservation.release()
            raise
        reservation.commit(prices.cost_of(message.usage_metadata, cloud_model))
    """

    def __init__(
        self,
        max_usd: float,
        window_s: float = 3600.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._max = exact_usd(max_usd, "max_usd")
        if isinstance(window_s, bool) or not isinstance(window_s, (int, float)):
            raise InvalidTypeError(f"window_s must be a number of seconds, got {window_s!r}")
        if not math.isfinite(window_s) or window_s <= 0:
            raise InvalidArgumentError(f"window_s must be finite and > 0, got {window_s!r}")
        self._window_s = float(window_s)
        self._clock = clock
        self._lock = threading.Lock()
        # Committed spend, oldest first: (commit time, amount). Times are read under the lock,
        # so they are non-decreasing and expiry only ever pops from the left.
        self._entries: deque[tuple[float, Fraction]] = deque()
        self._spent = Fraction(0)
        self._reserved = Fraction(0)
        self._pending = 0
        self._granted = 0
        self._denied = 0
        self._overruns = 0
        self._overrun = Fraction(0)

    # -- configuration -----------------------------------------------------------------------

    @property
    def max_usd(self) -> float:
        """The cap per window."""
        return float(self._max)

    @property
    def window_s(self) -> float:
        """The window length in seconds."""
        return self._window_s

    # -- the protocol ------------------------------------------------------------------------

    def _expire(self, now: float) -> None:
        horizon = now - self._window_s
        entries = self._entries
        while entries and entries[0][0] <= horizon:
            self._spent -= entries.popleft()[1]

    def reserve(self, estimated_usd: float) -> Reservation | None:
        """Reserve ``estimated_usd`` if committed spend + outstanding reservations + it stays
        within ``max_usd``; otherwise ``None`` (and nothing changes).

        Raises:
            TypeError, ValueError: ``estimated_usd`` is not a finite amount >= 0.
        """
        amount = exact_usd(estimated_usd, "estimated_usd")
        with self._lock:
            self._expire(self._clock())
            if self._spent + self._reserved + amount > self._max:
                self._denied += 1
                return None
            self._reserved += amount
            self._pending += 1
            self._granted += 1
            return Reservation(self, amount)

    def hold(self, estimated_usd: float) -> Reservation:
        """Like :meth:`reserve`, but raise instead of returning ``None``.

        Raises:
            BudgetExceededError: the reservation would exceed the budget.
        """
        reservation = self.reserve(estimated_usd)
        if reservation is None:
            remaining = self.remaining
            raise BudgetExceededError(
                f"cloud budget exceeded: an escalation estimated at ${estimated_usd:.6g} does "
                f"not fit in the ${remaining:.6g} left of ${self.max_usd:.6g} per "
                f"{self._window_s:g} s",
                requested_usd=float(estimated_usd),
                remaining_usd=remaining,
                max_usd=self.max_usd,
                window_s=self._window_s,
            )
        return reservation

    def record_spend(self, actual_usd: float) -> None:
        """Record spend that had no reservation (e.g. a call made outside the router). It
        counts against the cap like committed spend, even if that exceeds it."""
        amount = exact_usd(actual_usd, "actual_usd")
        with self._lock:
            self._add_spend(amount)

    def _add_spend(self, amount: Fraction) -> None:
        now = self._clock()
        self._expire(now)
        if amount:
            self._entries.append((now, amount))
            self._spent += amount

    def _settle(self, reservation: Reservation, actual: Fraction | None) -> None:
        with self._lock:
            if reservation._state != "pending":
                raise ReservationStateError(f"reservation already {reservation._state}")
            reservation._state = "released" if actual is None else "committed"
            self._reserved -= reservation._amount
            self._pending -= 1
            if actual is None:
                return
            if actual > reservation._amount:
                self._overruns += 1
                self._overrun += actual - reservation._amount
            self._add_spend(actual)

    # -- readings ----------------------------------------------------------------------------

    @property
    def spent(self) -> float:
        """Committed spend within the current window."""
        with self._lock:
            self._expire(self._clock())
            return float(self._spent)

    @property
    def reserved(self) -> float:
        """Sum of the outstanding (unsettled) reservations."""
        with self._lock:
            return float(self._reserved)

    @property
    def remaining(self) -> float:
        """What a new reservation may still take: ``max - spent - reserved`` (never < 0)."""
        with self._lock:
            self._expire(self._clock())
            return float(max(Fraction(0), self._max - self._spent - self._reserved))

    def snapshot(self) -> dict[str, Any]:
        """Counters for monitoring: spend, reservations, grants, denials and overruns."""
        with self._lock:
            self._expire(self._clock())
            return {
                "max_usd": float(self._max),
                "window_s": self._window_s,
                "spent_usd": float(self._spent),
                "reserved_usd": float(self._reserved),
                "remaining_usd": float(max(Fraction(0), self._max - self._spent - self._reserved)),
                "pending": self._pending,
                "granted": self._granted,
                "denied": self._denied,
                "overruns": self._overruns,
                "overrun_usd": float(self._overrun),
            }

    # -- persistence -------------------------------------------------------------------------

    def state(self, *, wall_clock: Callable[[], float] = time.time) -> dict[str, Any]:
        """JSON-serialisable state: the configuration and the spend still inside the window.

        Entries are stored by age (the monotonic clock means nothing in another process) with
        the wall-clock save time, so a later :meth:`from_state` ages them by the time passed.
        Outstanding reservations are saved as spent now (conservative: their calls may have
        been billed). Amounts are exact fractions (``"41/10000"``).
        """
        with self._lock:
            now = self._clock()
            self._expire(now)
            entries = [[now - t, str(amount)] for t, amount in self._entries]
            if self._reserved:
                entries.append([0.0, str(self._reserved)])
            return {
                "kind": _KIND,
                "version": _VERSION,
                "max_usd": str(self._max),
                "window_s": self._window_s,
                "saved_at_unix": wall_clock(),
                "entries": entries,
            }

    @classmethod
    def from_state(
        cls,
        state: Mapping[str, Any],
        *,
        max_usd: float | None = None,
        window_s: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> CloudBudget:
        """Rebuild from :meth:`state`, dropping spend that has left the window since the save.

        ``max_usd`` / ``window_s`` override the saved configuration (e.g. the settings changed
        between restarts; the saved spend still counts).

        Raises:
            InvalidStateError: (a ``ValueError``) the state is corrupt, of another kind or of
                an unsupported version.
        """
        try:
            return cls._from_state(state, max_usd, window_s, clock, wall_clock)
        except InvalidStateError:
            raise
        except (TypeError, ValueError, ZeroDivisionError) as error:
            raise InvalidStateError(f"invalid CloudBudget state: {error}") from None

    @classmethod
    def _from_state(
        cls,
        state: Mapping[str, Any],
        max_usd: float | None,
        window_s: float | None,
        clock: Callable[[], float],
        wall_clock: Callable[[], float],
    ) -> CloudBudget:
        if not isinstance(state, Mapping):
            raise InvalidTypeError(f"state must be a mapping, got {type(state).__name__}")
        if state.get("kind") != _KIND:
            raise InvalidStateError(f"not a CloudBudget state: kind={state.get('kind')!r}")
        if state.get("version") != _VERSION:
            raise InvalidStateError(
                f"unsupported CloudBudget state version {state.get('version')!r} (this library "
                f"reads version {_VERSION})"
            )
        missing = [k for k in ("max_usd", "window_s", "saved_at_unix", "entries") if k not in state]
        if missing:
            raise InvalidArgumentError(f"missing keys {missing}")
        saved_max = state["max_usd"]
        if not isinstance(saved_max, str):
            raise InvalidTypeError(f"'max_usd' must be a fraction string, got {saved_max!r}")
        saved = Fraction(saved_max)
        budget = cls(
            float(saved) if max_usd is None else max_usd,
            state["window_s"] if window_s is None else window_s,
            clock,
        )
        if max_usd is None:
            budget._max = exact_usd(saved, "'max_usd'")  # keep the saved cap exact
        saved_at = state["saved_at_unix"]
        if isinstance(saved_at, bool) or not isinstance(saved_at, (int, float)):
            raise InvalidTypeError(f"'saved_at_unix' must be a number, got {saved_at!r}")
        entries = state["entries"]
        if not isinstance(entries, list):
            raise InvalidTypeError(f"'entries' must be a list, got {type(entries).__name__}")
        elapsed = max(0.0, wall_clock() - saved_at)
        now = clock()
        parsed: list[tuple[float, Fraction]] = []
        for entry in entries:
            if not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[1], str)):
                raise InvalidArgumentError(f"an entry must be [age_s, 'fraction'], got {entry!r}")
            age = entry[0]
            if isinstance(age, bool) or not isinstance(age, (int, float)) or not age >= 0:
                raise InvalidArgumentError(f"an entry age must be a number >= 0, got {age!r}")
            amount = Fraction(entry[1])
            if amount < 0:
                raise InvalidArgumentError(f"an entry amount must be >= 0, got {entry[1]!r}")
            age_now = age + elapsed
            if age_now < budget._window_s:
                parsed.append((now - age_now, amount))
        parsed.sort(key=lambda e: e[0])  # oldest first, as _expire expects
        budget._entries = deque(parsed)
        budget._spent = sum((a for _, a in parsed), Fraction(0))
        return budget

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write :meth:`state` to ``path`` atomically (temp file + ``os.replace``)."""
        write_json_atomic(path, self.state())

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        *,
        max_usd: float | None = None,
        window_s: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> CloudBudget:
        """Read a file written by :meth:`save` (see :meth:`from_state` for the overrides).

        Raises:
            FileNotFoundError: no such file.
            InvalidStateError: the file is corrupt or not a valid state; the message names it.
        """
        data = read_json_state(path)
        try:
            return cls.from_state(data, max_usd=max_usd, window_s=window_s, clock=clock)
        except InvalidStateError as error:
            raise InvalidStateError(f"{os.fspath(path)}: {error}") from None

    def __repr__(self) -> str:
        s = self.snapshot()
        return (
            f"CloudBudget(max_usd={s['max_usd']!r}, window_s={s['window_s']!r}, "
            f"spent_usd={s['spent_usd']!r}, reserved_usd={s['reserved_usd']!r})"
        )


# --------------------------------------------------------------------------------------------
# Estimating an escalation's cost before making it
# --------------------------------------------------------------------------------------------


def estimate_tokens(
    text: str | int | Sequence[str], chars_per_token: float = CHARS_PER_TOKEN
) -> int:
    """Token estimate from a character count: ``ceil(chars / chars_per_token)``.

    ``text`` is a string, a sequence of strings (e.g. every message's text), or a character
    count. See :data:`CHARS_PER_TOKEN` for the heuristic's limits.

    Example::

        >>> estimate_tokens("abcdefghi"), estimate_tokens(["abcd", "ef"]), estimate_tokens(8, 2.0)
        (3, 2, 4)
    """
    if isinstance(chars_per_token, bool) or not isinstance(chars_per_token, (int, float)):
        raise InvalidTypeError(f"chars_per_token must be a number, got {chars_per_token!r}")
    if not math.isfinite(chars_per_token) or chars_per_token <= 0:
        raise InvalidArgumentError(f"chars_per_token must be finite and > 0, got {chars_per_token!r}")
    if isinstance(text, bool):
        raise InvalidTypeError("text must be a string, strings or a character count, not a bool")
    if isinstance(text, int):
        if text < 0:
            raise InvalidArgumentError(f"a character count must be >= 0, got {text!r}")
        chars = text
    elif isinstance(text, str):
        chars = len(text)
    elif isinstance(text, Sequence) and all(isinstance(t, str) for t in text):
        chars = sum(len(t) for t in text)
    else:
        raise InvalidTypeError(f"text must be a string, strings or a character count, got {text!r}")
    return math.ceil(chars / chars_per_token)


def estimate_escalation_cost(
    prompt: str | int | Sequence[str],
    max_output_tokens: int,
    price: Price,
    *,
    chars_per_token: float = CHARS_PER_TOKEN,
) -> float:
    """Upper-bound-ish cost of sending ``prompt`` to the cloud: input tokens estimated from
    the characters (:func:`estimate_tokens`) plus ``max_output_tokens`` output tokens (the
    most the model may generate; output is usually the larger share of the price).

    Reserve this amount with :meth:`CloudBudget.reserve`, then commit the actual cost.

    Example::

        >>> estimate_escalation_cost("x" * 4000, 512, Price(3.0, 15.0))  # 1000 in, 512 out
        0.01068
    """
    if isinstance(max_output_tokens, bool) or not isinstance(max_output_tokens, int):
        raise InvalidTypeError(f"max_output_tokens must be an int, got {max_output_tokens!r}")
    if max_output_tokens < 0:
        raise InvalidArgumentError(f"max_output_tokens must be >= 0, got {max_output_tokens!r}")
    if not isinstance(price, Price):
        raise InvalidTypeError(f"price must be a Price, got {price!r} (unknown model? see PriceTable)")
    return price.cost(estimate_tokens(prompt, chars_per_token), max_output_tokens)


#: Tokens allowed per message for the chat template (role markers, separators) and for the
#: request's fixed framing, on top of the content's bytes.
TEMPLATE_TOKENS_PER_MESSAGE = 16
TEMPLATE_TOKENS_PER_REQUEST = 64

#: Input tokens one image is billed at most: Claude models scale an image down to about 1.15
#: megapixels before reading it, and bill ``width * height / 750`` tokens, so about 1,600.
#: Pass a larger ``image_tokens`` for a model that bills images differently.
IMAGE_BLOCK_TOKENS = 1600

#: Input tokens allowed for the system prompt a provider adds when tools are sent (Anthropic
#: documents 346 for Claude 4 models; rounded up), on top of the tool definitions' bytes.
TOOL_USE_PROMPT_TOKENS = 400

#: Names (from :func:`confidence_router.guards.outgoing_texts`) of the content blocks counted
#: as one image each.
_IMAGE_BLOCKS = frozenset({"image block", "image_url block", "input_image block"})
#: Content billed by pages or duration, which no byte count bounds.
_UNBOUNDED_BLOCKS = frozenset(
    {"document block", "file block", "audio block", "input_audio block", "video block",
     "binary data", "bytes block"}
)


def upper_bound_input_tokens(
    messages: Sequence[Any], *, tools: Sequence[Any] = (), image_tokens: int = IMAGE_BLOCK_TOKENS
) -> int:
    """An upper bound on the input tokens a request for ``messages`` is billed.

    Every string a client can send for them (text, tool calls and arguments, reasoning, ...:
    :func:`confidence_router.guards.outgoing_texts`) counted at one token per UTF-8 byte —
    byte-level tokenizers never produce more tokens than bytes — plus ``image_tokens`` per
    image and a fixed allowance per message and per request for the chat template. ``tools``
    (the tool definitions or output schemas sent with the request, in any JSON-serialisable
    form) count at the bytes of their JSON plus :data:`TOOL_USE_PROMPT_TOKENS`.

    Raises:
        InvalidInputError: the messages hold content whose billed tokens have no known bound
            (documents, audio, video, raw bytes): a capped budget cannot admit them.

    Example::

        >>> upper_bound_input_tokens(["héllo"])   # 6 bytes + 16 + 64
        86
    """
    from confidence_router.guards import outgoing_texts

    if isinstance(image_tokens, bool) or not isinstance(image_tokens, int) or image_tokens < 0:
        raise InvalidArgumentError(f"image_tokens must be an int >= 0, got {image_tokens!r}")
    strings, unreadable = outgoing_texts(messages)
    unbounded = sorted(set(unreadable) & _UNBOUNDED_BLOCKS)
    if unbounded:
        raise InvalidInputError(
            f"the cost of sending {', '.join(unbounded)} has no known upper bound (billed by "
            "pages or duration, not by bytes), so a capped cloud budget cannot admit it"
        )
    content = sum(len(s.encode("utf-8")) for s in strings)
    content += sum(map(_structure_bytes, messages))
    images = sum(1 for name in unreadable if name in _IMAGE_BLOCKS)
    media = image_tokens * images
    if images < len(unreadable):
        # Opaque text (e.g. encrypted reasoning sent back): at most one token per byte of
        # everything the messages hold.
        media += sum(_serialised_bytes(message) for message in messages)
    tool_tokens = 0
    if tools:
        definitions = json.dumps(list(tools), ensure_ascii=False, default=str)
        tool_tokens = len(definitions.encode("utf-8")) + TOOL_USE_PROMPT_TOKENS
    return (content + media + tool_tokens + TEMPLATE_TOKENS_PER_MESSAGE * len(messages)
            + TEMPLATE_TOKENS_PER_REQUEST)


def _structure_bytes(message: Any) -> int:
    """The JSON a request carries around a message's structured data — tool-call arguments,
    JSON and other non-text blocks, ``additional_kwargs`` — whose strings and numbers
    :func:`~confidence_router.guards.outgoing_texts` counts but not the quotes, brackets,
    separators and ``true``/``false``/``null`` around them (a list of 600 digits is 1,800
    bytes on the wire, not 600). Plain text content has none."""
    if isinstance(message, str):
        return 0
    if isinstance(message, Mapping):
        content = message.get("content")
        calls = message.get("tool_calls")
        extra = message.get("additional_kwargs")
    else:
        content = getattr(message, "content", None)
        calls = getattr(message, "tool_calls", None)
        extra = getattr(message, "additional_kwargs", None)
    total = 0
    if isinstance(content, list):
        total += sum(_punctuation_bytes(b) for b in content if not _is_text_block(b))
    for call in calls or ():
        if isinstance(call, Mapping):
            total += _punctuation_bytes(call.get("args"))
    if extra:
        total += _punctuation_bytes(extra)
    return total


def _is_text_block(block: Any) -> bool:
    if isinstance(block, str):
        return True
    return (isinstance(block, Mapping) and block.get("type", "text") == "text"
            and isinstance(block.get("text"), str) and len(block) <= 2)


def _punctuation_bytes(value: Any) -> int:
    """Bytes of ``value``'s JSON other than its strings' and numbers' own characters: quotes,
    brackets, ``", "`` and ``": "`` separators (counted with their space), and the literals
    ``null``, ``true`` and ``false``."""
    if value is None:
        return 4
    if isinstance(value, bool):
        return 5
    if isinstance(value, (int, float)):
        return 0
    if isinstance(value, str):
        return 2
    if isinstance(value, Mapping):
        separators = 2 * max(len(value) - 1, 0)
        # Each key: its quotes and ": " (its text is counted with the strings).
        return 2 + separators + sum(4 + _punctuation_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple, set, frozenset)):
        return 2 + 2 * max(len(value) - 1, 0) + sum(map(_punctuation_bytes, value))
    return 0


def _serialised_bytes(message: Any) -> int:
    content = message if isinstance(message, (str, dict)) else getattr(message, "content", message)
    return len(json.dumps(content, ensure_ascii=False, default=str).encode("utf-8"))


def upper_bound_request_cost(
    messages: Sequence[Any], *, max_output_tokens: int, price: Price,
    tools: Sequence[Any] = (), image_tokens: int = IMAGE_BLOCK_TOKENS,
) -> float:
    """The most one cloud request for ``messages`` can cost: :func:`upper_bound_input_tokens`
    at the input price plus ``max_output_tokens`` (the cloud model's ``max_tokens``) at the
    output price. This is what the router reserves per attempt, so a budget's cap holds even
    when every answer is as long as allowed.

    Raises:
        InvalidInputError: content without a known bound (see :func:`upper_bound_input_tokens`).
    """
    tokens = upper_bound_input_tokens(messages, tools=tools, image_tokens=image_tokens)
    return price.cost(tokens, max_output_tokens)
