"""Routing statistics: counters over the router's routing records.

The router hands every finished routing record (``response_metadata["routing"]``) to a
:class:`StatsSink`; :class:`RoutingStats` is the in-process one. A shared store (Redis, a
database) can replace it later by implementing the one-method protocol.

>>> stats = RoutingStats(target_rate=0.5)
>>> stats.record({"decision": "local", "reason": "confident", "escalated": False,
...               "confidence": 0.9, "latency_s": {"total": 0.2},
...               "cost_usd": 0.0, "all_cloud_cost_usd": 0.004})
>>> stats.record({"decision": "cloud", "reason": "low_confidence", "escalated": True,
...               "confidence": 0.3, "latency_s": {"total": 1.5},
...               "cost_usd": 0.005, "cloud_cost_usd": 0.005, "all_cloud_cost_usd": 0.005})
>>> s = stats.snapshot()
>>> s["calls"], s["escalation_rate"], s["by_reason"]
(2, 0.5, {'confident': 1, 'low_confidence': 1})
>>> round(s["savings_usd"], 6), round(s["savings_rate"], 4)   # 0.009 all-cloud vs 0.005 paid
(0.004, 0.4444)

Pure stdlib; every method is synchronous, O(1) except :meth:`RoutingStats.snapshot` (which
sorts the bounded latency windows), and holds one ``threading.Lock`` for microseconds, so it
is safe from threads and from asyncio code.
"""

from __future__ import annotations

import logging
import math
import threading
from collections import Counter, deque
from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

from confidence_router.costs import PriceTable, routing_costs
from confidence_router.errors import InvalidArgumentError, InvalidTypeError, RoutingConfigError

logger = logging.getLogger("confidence_router")

__all__ = ["MultiSink", "RoutingStats", "StatsSink", "as_sink", "finite_float", "nearest_rank"]

_DECISIONS = ("local", "cloud")


@runtime_checkable
class StatsSink(Protocol):
    """Anything that consumes routing records. Must be cheap and must not raise on a record
    with missing fields (records differ by path: pre-check, local failure, cloud failure).

    A class with a ``record(routing)`` method is one; pass it as the router's ``stats``::

        class Decisions:
            def __init__(self) -> None:
                self.seen: list[str] = []

            def record(self, routing) -> None:
                self.seen.append(routing.get("decision", "?"))

        router = ConfidenceRoutedLLM(local=local, cloud=cloud, stats=Decisions())
    """

    def record(self, routing: Mapping[str, Any]) -> None:
        """Consume one finished routing record."""
        ...


class MultiSink:
    """Feed every routing record to several sinks, in order (a :class:`StatsSink` itself).

    A sink that raises is logged (logger ``confidence_router``) and skipped; the others still
    get the record, so a broken exporter never blinds the in-process counters.

    Example::

        >>> from confidence_router.stats import MultiSink, RoutingStats
        >>> counts, other = RoutingStats(), RoutingStats()
        >>> sink = MultiSink(counts, other)   # e.g. RoutingStats() and OpenTelemetrySink()
        >>> sink.record({"decision": "local", "reason": "confident"})
        >>> counts.snapshot()["calls"], other.snapshot()["calls"]
        (1, 1)

    Raises:
        RoutingConfigError: no sinks, or a sink without a callable ``record`` method.
    """

    def __init__(self, *sinks: StatsSink) -> None:
        if not sinks:
            raise RoutingConfigError("MultiSink needs at least one sink")
        for i, sink in enumerate(sinks):
            if not callable(getattr(sink, "record", None)):
                raise RoutingConfigError(
                    f"sink {i} ({type(sink).__name__}) has no record(routing) method"
                )
        self.sinks: tuple[StatsSink, ...] = tuple(sinks)

    def record(self, routing: Mapping[str, Any]) -> None:
        """Hand ``routing`` to each sink; a failing sink is logged, the rest still run."""
        for sink in self.sinks:
            try:
                sink.record(routing)
            except Exception:
                logger.exception("confidence_router: stats sink %s failed", type(sink).__name__)

    def __repr__(self) -> str:
        return f"MultiSink({', '.join(type(s).__name__ for s in self.sinks)})"


def as_sink(value: Any) -> StatsSink | None:
    """Normalise a router's ``stats=`` value: ``None``, one sink, or a list/tuple of sinks
    (wrapped in a :class:`MultiSink`).

    Example: ``as_sink([RoutingStats(), OpenTelemetrySink()])`` -> ``MultiSink(...)``

    Raises:
        RoutingConfigError: something that is not a sink (no callable ``record``).
    """
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        return value[0] if len(value) == 1 and _is_sink(value[0]) else MultiSink(*value)
    if not _is_sink(value):
        raise RoutingConfigError(
            f"stats must be a sink with a record(routing) method or a list of sinks, "
            f"got {type(value).__name__}"
        )
    return value


def _is_sink(value: Any) -> bool:
    return callable(getattr(value, "record", None))


def nearest_rank(sorted_values: list[float], p: float) -> float | None:
    """Nearest-rank percentile (docs/how-it-works.md §5.2): the value at rank ``ceil(p * n)``.

    Example::

        >>> nearest_rank([1.0, 2.0, 3.0, 4.0], 0.5), nearest_rank([1.0, 2.0, 3.0, 4.0], 0.95)
        (2.0, 4.0)
    """
    if not sorted_values:
        return None
    rank = max(1, math.ceil(p * len(sorted_values) - 1e-9))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def _error_kind(routing: Mapping[str, Any], stage: str) -> str | None:
    """``"<stage>:<kind>"`` for a failed stage, else ``None``.

    The kind is ``<stage>_error_kind`` (``precheck["error_kind"]`` for the pre-check) when the
    router recorded one (e.g. from :func:`confidence_router.retry.classify_error`), else the
    exception class name at the start of ``"<Type>: message"``.
    """
    if stage == "precheck":
        precheck = routing.get("precheck")
        text = precheck.get("error") if isinstance(precheck, Mapping) else None
        # The router records the probe's classified kind next to the message, as for the tiers.
        kind = precheck.get("error_kind") if isinstance(precheck, Mapping) else None
    else:
        text = routing.get(f"{stage}_error")
        kind = routing.get(f"{stage}_error_kind")
    if not text and not kind:
        return None
    if not kind:
        kind = str(text).split(":", 1)[0].strip() or "unknown"
    return f"{stage}:{kind}"


def finite_float(value: Any) -> float | None:
    """A routing-record number as a finite float, else ``None`` (missing, not a number, a bool,
    NaN, an infinity, or an int too large for a float).

    >>> finite_float(3), finite_float(float("nan")), finite_float(10**400), finite_float(True)
    (3.0, None, None, None)
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


def _tokens(usage: Any) -> tuple[int, int]:
    if not isinstance(usage, Mapping):
        return 0, 0
    counts = []
    for key in ("input_tokens", "output_tokens"):
        value = usage.get(key)
        counts.append(value if isinstance(value, int) and not isinstance(value, bool) else 0)
    return counts[0], counts[1]


class RoutingStats:
    """In-process counters over routing records (a :class:`StatsSink`).

    What is counted, per :meth:`record`:

    * ``calls``; ``local`` / ``cloud``: the record's ``decision``, the tier whose answer was
      returned (for a call that raised, the tier that failed last: a ``LocalModelError`` counts
      under ``local``, a ``CloudEscalationError`` under ``cloud``, with its ``errors`` entry);
      ``escalated``: the cloud was called (also when it then failed and the local answer was
      returned); ``escalation_rate = escalated / calls``; ``would_escalate``; ``flagged``.
    * ``by_reason``: ``reason`` counts; ``errors``: ``"<stage>:<kind>"`` counts for the
      ``local``, ``cloud`` and ``precheck`` stages.
    * ``unknown_confidence``: the local answer was scored but its confidence is unknown
      (``confidence`` is ``None`` while ``signals`` is set; pre-check escalations and local
      failures have no local answer and are not counted).
    * Costs, from the record's ``cost_usd`` / ``cloud_cost_usd`` / ``all_cloud_cost_usd``
      fields (see :func:`confidence_router.costs.routing_costs`). When the record lacks them
      and ``prices`` and ``cloud_model`` were given, they are computed here. ``cost_usd`` sums
      the known costs and ``cost_unknown_calls`` counts the rest (never added as 0);
      ``savings_usd = all_cloud - cost`` and ``savings_rate = savings / all_cloud`` use only
      the calls where both are known.
    * With ``target_rate``: ``realised_rate`` (escalated share of the last ``window`` calls)
      and ``drift = realised_rate - target_rate``.
    * Latency ``p50`` / ``p95`` (nearest rank) of ``latency_s["total"]`` per decision and over
      all calls, over the last ``latency_window`` calls of each.

    Args:
        target_rate: the escalation rate aimed for (e.g. by a
            :class:`~confidence_router.calibration.RollingQuantileThreshold`); optional.
        window: calls in the rolling realised-rate window.
        latency_window: latencies kept per decision (and overall) for the percentiles.
        prices: price table for records without cost fields.
        cloud_model: the cloud model id, with ``prices``.

    Example::

        >>> stats = RoutingStats()
        >>> stats.record({"decision": "local", "reason": "confident", "flagged": True})
        >>> stats.snapshot()["flagged"]
        1
    """

    def __init__(
        self,
        *,
        target_rate: float | None = None,
        window: int = 500,
        latency_window: int = 1000,
        prices: PriceTable | None = None,
        cloud_model: str | None = None,
    ) -> None:
        if target_rate is not None:
            if isinstance(target_rate, bool) or not isinstance(target_rate, (int, float)):
                raise InvalidTypeError(f"target_rate must be a number or None, got {target_rate!r}")
            if not 0.0 <= target_rate <= 1.0:
                raise InvalidArgumentError(f"target_rate must be in [0, 1], got {target_rate!r}")
        for name, value in (("window", window), ("latency_window", latency_window)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise InvalidTypeError(f"{name} must be an int >= 1, got {value!r}")
            if value < 1:
                raise InvalidArgumentError(f"{name} must be an int >= 1, got {value!r}")
        if prices is not None and not isinstance(prices, PriceTable):
            raise InvalidTypeError(
                f"prices must be a confidence_router.costs.PriceTable or None, got "
                f"{type(prices).__name__}"
            )
        if cloud_model is not None and not isinstance(cloud_model, str):
            raise InvalidTypeError(f"cloud_model must be a string or None, got {cloud_model!r}")
        self._target = None if target_rate is None else float(target_rate)
        self._window = window
        self._latency_window = latency_window
        self._prices = prices
        self._cloud_model = cloud_model
        self._lock = threading.Lock()
        self._clear()

    def _clear(self) -> None:
        self._calls = 0
        self._decisions: Counter[str] = Counter()
        self._escalated = 0
        self._would_escalate = 0
        self._flagged = 0
        self._unknown_confidence = 0
        self._reasons: Counter[str] = Counter()
        self._errors: Counter[str] = Counter()
        self._tokens = {"local": [0, 0], "cloud": [0, 0]}
        self._cost = 0.0
        self._local_cost = 0.0
        self._cloud_cost = 0.0
        self._cost_unknown = 0
        self._all_cloud = 0.0
        self._all_cloud_known = 0
        self._all_cloud_estimated = 0
        self._paired_cost = 0.0
        self._paired_all_cloud = 0.0
        self._paired = 0
        self._recent: deque[bool] = deque(maxlen=self._window)
        self._recent_escalated = 0
        self._latency: dict[str, deque[float]] = {
            key: deque(maxlen=self._latency_window) for key in (*_DECISIONS, "all")
        }

    @property
    def target_rate(self) -> float | None:
        """The configured target escalation rate."""
        return self._target

    def record(self, routing: Mapping[str, Any]) -> None:
        """Count one finished routing record (tolerates missing fields; O(1)).

        Raises:
            TypeError: ``routing`` is not a mapping.
        """
        if not isinstance(routing, Mapping):
            raise InvalidTypeError(f"routing must be a mapping, got {type(routing).__name__}")
        if (
            self._prices is not None
            and self._cloud_model is not None
            and ("cost_usd" not in routing or "all_cloud_cost_usd" not in routing)
        ):
            # Pricing does string work: do it before taking the lock.
            routing = {**routing, **routing_costs(routing, self._prices, self._cloud_model)}
        decision = routing.get("decision")
        escalated = bool(routing.get("escalated"))
        reason = routing.get("reason")
        errors = [k for k in (_error_kind(routing, s) for s in ("precheck", "local", "cloud")) if k]
        unknown = routing.get("confidence") is None and routing.get("signals") is not None
        raw_usage = routing.get("usage")
        usage: Mapping[str, Any] = raw_usage if isinstance(raw_usage, Mapping) else {}
        local_tokens = _tokens(usage.get("local"))
        cloud_tokens = _tokens(usage.get("cloud"))
        cost = finite_float(routing.get("cost_usd"))
        local_cost = finite_float(routing.get("local_cost_usd"))
        cloud_cost = finite_float(routing.get("cloud_cost_usd"))
        all_cloud = finite_float(routing.get("all_cloud_cost_usd"))
        latencies = routing.get("latency_s")
        total_latency = finite_float(latencies.get("total")) if isinstance(latencies, Mapping) else None

        with self._lock:
            self._calls += 1
            if decision in _DECISIONS:
                self._decisions[decision] += 1
            self._escalated += escalated
            self._would_escalate += bool(routing.get("would_escalate"))
            self._flagged += bool(routing.get("flagged"))
            self._unknown_confidence += unknown
            self._reasons[str(reason)] += 1
            for key in errors:
                self._errors[key] += 1
            for tier, (n_in, n_out) in (("local", local_tokens), ("cloud", cloud_tokens)):
                self._tokens[tier][0] += n_in
                self._tokens[tier][1] += n_out
            if cost is None:
                self._cost_unknown += 1
            else:
                self._cost += cost
            self._local_cost += local_cost or 0.0
            self._cloud_cost += cloud_cost or 0.0
            if all_cloud is not None:
                self._all_cloud += all_cloud
                self._all_cloud_known += 1
                self._all_cloud_estimated += bool(routing.get("all_cloud_estimated"))
                if cost is not None:
                    self._paired_cost += cost
                    self._paired_all_cloud += all_cloud
                    self._paired += 1
            if len(self._recent) == self._window:
                self._recent_escalated -= self._recent[0]
            self._recent.append(escalated)
            self._recent_escalated += escalated
            if total_latency is not None:
                self._latency["all"].append(total_latency)
                if decision in _DECISIONS:
                    self._latency[decision].append(total_latency)

    def snapshot(self) -> dict[str, Any]:
        """A consistent copy of every counter and the derived rates (see the class docstring).

        Rates are ``None`` when undefined (no calls, no known cost); nothing is reported as 0
        for lack of data.
        """
        with self._lock:
            calls = self._calls
            latency = {key: sorted(values) for key, values in self._latency.items()}
            recent_n, recent_escalated = len(self._recent), self._recent_escalated
            snap: dict[str, Any] = {
                "calls": calls,
                "local": self._decisions["local"],
                "cloud": self._decisions["cloud"],
                "escalated": self._escalated,
                "escalation_rate": self._escalated / calls if calls else None,
                "would_escalate": self._would_escalate,
                "flagged": self._flagged,
                "unknown_confidence": self._unknown_confidence,
                "by_reason": dict(self._reasons),
                "errors": dict(self._errors),
                "tokens": {
                    tier: {"input": n_in, "output": n_out}
                    for tier, (n_in, n_out) in self._tokens.items()
                },
                "cost_usd": self._cost,
                "local_cost_usd": self._local_cost,
                "cloud_cost_usd": self._cloud_cost,
                "cost_unknown_calls": self._cost_unknown,
                "all_cloud_cost_usd": self._all_cloud if self._all_cloud_known else None,
                "all_cloud_estimated_calls": self._all_cloud_estimated,
                "savings_usd": (
                    self._paired_all_cloud - self._paired_cost if self._paired else None
                ),
                "savings_rate": (
                    (self._paired_all_cloud - self._paired_cost) / self._paired_all_cloud
                    if self._paired and self._paired_all_cloud > 0
                    else None
                ),
                "savings_calls": self._paired,
            }
        realised = recent_escalated / recent_n if recent_n else None
        snap["target_rate"] = self._target
        snap["window"] = self._window
        snap["realised_rate"] = realised
        snap["drift"] = (
            realised - self._target if self._target is not None and realised is not None else None
        )
        snap["latency_s"] = {
            key: {
                "n": len(values),
                "p50": nearest_rank(values, 0.50),
                "p95": nearest_rank(values, 0.95),
            }
            for key, values in latency.items()
        }
        return snap

    def reset(self) -> None:
        """Zero every counter (configuration is kept)."""
        with self._lock:
            self._clear()

    def __repr__(self) -> str:
        with self._lock:
            return (
                f"RoutingStats(calls={self._calls}, escalated={self._escalated}, "
                f"target_rate={self._target})"
            )
