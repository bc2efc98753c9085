"""Routing state shared by many processes on one Redis: budget, stats and calibration.

Drop-in replacements, behind the same interfaces, for the in-process
:class:`~confidence_router.budget.CloudBudget`, :class:`~confidence_router.stats.RoutingStats`
and :class:`~confidence_router.calibration.RollingQuantileThreshold`, for a deployment that
runs several workers (``confidence-router proxy --workers 4``, several app servers). Needs the
``redis`` extra (``pip install "confidence-router[redis]"``) and a Redis >= 6.2 server.

>>> from confidence_router.redis_state import (RedisCloudBudget, RedisRoutingStats,
...     RedisRollingQuantileThreshold, redis_client)          # doctest: +SKIP
>>> client = redis_client("redis://127.0.0.1:6379/0")         # doctest: +SKIP
>>> router = ConfidenceRoutedLLM(local=..., cloud=...,
...     budget=RedisCloudBudget(client, max_usd=5.0, window_s=3600, prefix="prod"),
...     stats=RedisRoutingStats(client, prefix="prod", target_rate=0.3),
...     calibrator=RedisRollingQuantileThreshold(client, target_rate=0.3, prefix="prod"),
... )                                                          # doctest: +SKIP

**Exact caps across processes.** Every budget operation is one Lua script, which Redis runs
atomically: a reservation checks ``spent + reserved + amount <= max`` and records itself in
the same step, so no two workers can both take the last dollar. Amounts are kept as integer
nano-dollars (estimates rounded up, the cap rounded down), so float round-off never lets an
extra escalation through. Time is the Redis server's clock (``TIME``), so workers on machines
with skewed clocks still agree on the window.

**Crashed workers.** A reservation is a lease (default 15 minutes, longer than any cloud
call). If the worker holding it dies before settling, its cloud call may still have been
billed, so when the lease runs out the reserved amount is charged as spend (from the lease's
expiry, for ``window_s``), never simply freed. A settlement that arrives after its lease ran
out replaces that charge with the real amount (a release refunds it).

**Redis unreachable.** The budget fails closed: :meth:`RedisCloudBudget.reserve` grants
nothing (``None``: the router serves the local answer flagged, or raises
``BudgetExceededError``, as ``on_budget_exceeded`` says) and ``remaining`` reads 0. A
reservation whose settlement cannot reach Redis stays held until its lease runs out and is
then charged as above, so the caller still gets the answer it paid for and the cap holds.
The calibrator routes with its ``initial_threshold`` and drops observations meanwhile, and
the stats drop the records of the calls made meanwhile, so a call still gets an answer. All of it
is logged as warnings on the ``confidence_router`` logger. A :func:`redis_client` that found
Redis unreachable fails its commands at once until Redis answers a background ping again, so
a hung Redis stalls a worker's event loop for one socket timeout, not one per command.

**Redis restarts.** The spend lives in Redis only: a Redis that restarts without its data
(no persistence, the default of a bare ``redis-server``) starts the window again at zero, and
the cap allows a full window's spend again. For a cap that must hold across Redis restarts,
run it with the append-only file on and synced on every write (``appendonly yes``,
``appendfsync always``): killed and restarted, it keeps the spend and the open reservations
(tested with SIGKILL mid-run in ``tests/proxy/test_chaos_proxy.py``).

**Key prefix.** Every key starts with ``prefix`` (one per deployment) and the component's
``name``, e.g. ``prod:budget:default:state``; two deployments on one Redis never mix.

**Costs.** One round trip per operation (about 0.1-0.3 ms on loopback); the router calls the
budget once per escalation, the stats sink once per request and the calibrator twice per
request. The client is the synchronous ``redis`` client, whose connection pool is safe to
share between threads.
"""

from __future__ import annotations

import logging
import math
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Mapping
from fractions import Fraction
from typing import TYPE_CHECKING, Any

from confidence_router.budget import ReservationBase, ReservationStateError, exact_usd
from confidence_router.errors import (
    BudgetExceededError,
    InvalidArgumentError,
    InvalidTypeError,
    RoutingConfigError,
)
from confidence_router.stats import RoutingStats, nearest_rank

if TYPE_CHECKING:
    import redis

    from confidence_router.costs import PriceTable

__all__ = [
    "DEFAULT_PREFIX",
    "RedisCloudBudget",
    "RedisReservation",
    "RedisRollingQuantileThreshold",
    "RedisRoutingStats",
    "redis_client",
]

DEFAULT_PREFIX = "confidence-router"
logger = logging.getLogger("confidence_router")
_NANO = 10**9
_EPS = 1e-9


def redis_client(url: str, *, recheck_s: float | None = 1.0, **kwargs: Any) -> redis.Redis:
    """A ``redis.Redis`` client for ``url`` (``redis://host:port/db``, ``rediss://``,
    ``unix://``) with string replies and 2-second socket timeouts (override with kwargs).

    The router calls the budget, stats and calibrator synchronously, on an async server's
    event loop too: while a hung Redis makes each command wait out its socket timeout, every
    request of that worker waits. So once a command finds Redis unreachable (timed out,
    refused, connection lost), every command of this client fails at once
    (``redis.ConnectionError``: the budget fails closed, stats and calibrator carry on without
    Redis) until a background ping, every ``recheck_s`` seconds, is answered again: a hung
    Redis costs one socket timeout, not one per command. ``recheck_s=None``: every command
    waits out its own timeouts.

    Raises:
        ImportError: the ``redis`` extra is not installed.
        InvalidArgumentError: ``recheck_s`` is not a positive number of seconds.
    """
    from confidence_router._extras import require_extra

    require_extra("redis", "shared state on Redis")
    import redis as redis_lib

    if recheck_s is not None and (
        isinstance(recheck_s, bool) or not isinstance(recheck_s, (int, float))
        or not math.isfinite(recheck_s) or recheck_s <= 0
    ):
        raise InvalidArgumentError(f"recheck_s must be a positive number of seconds or None, "
                                   f"got {recheck_s!r}")
    options: dict[str, Any] = {
        "decode_responses": True,
        # The router calls the budget and calibrator synchronously on the request path: a
        # hung Redis must fail a call quickly rather than stall a worker's event loop.
        "socket_timeout": 2.0,
        "socket_connect_timeout": 2.0,
        "health_check_interval": 30,
    }
    options.update(kwargs)
    client = redis_lib.Redis.from_url(url, **options)
    if recheck_s is not None:
        # The ping goes through a pool of its own, which never fails fast.
        probe = redis_lib.Redis.from_url(url, **options)
        breaker = _FailFast(weakref.ref(client), probe.ping, float(recheck_s))
        pool = client.connection_pool
        pool.connection_class = _fail_fast_connection(pool.connection_class, breaker)
    return client


class _FailFast:
    """Shared by one client's connections: open (failing every command at once) from the
    first sign that Redis is unreachable until a background ping is answered."""

    def __init__(self, client: weakref.ref[Any], ping: Callable[[], Any], recheck_s: float) -> None:
        self._client = client
        self._ping = ping
        self._recheck_s = recheck_s
        self._lock = threading.Lock()
        self._reason: str | None = None

    def check(self) -> None:
        reason = self._reason
        if reason is not None:
            import redis

            raise redis.ConnectionError(
                f"Redis unreachable ({reason}); failing fast until it answers a ping again")

    def trip(self, error: BaseException) -> None:
        with self._lock:
            if self._reason is not None:
                return
            self._reason = f"{type(error).__name__}: {error}"
        logger.warning("confidence_router: Redis unreachable (%s: %s); its commands fail at "
                       "once until it answers again", type(error).__name__, error)
        threading.Thread(target=self._recheck, name="confidence-router-redis-recheck",
                         daemon=True).start()

    def _recheck(self) -> None:
        while self._client() is not None:  # nobody uses the client any more: stop
            time.sleep(self._recheck_s)
            try:
                self._ping()
            except Exception:  # noqa: BLE001, S112 - still unreachable: try again later
                continue
            with self._lock:
                self._reason = None
            logger.warning("confidence_router: Redis answers again")
            return


def _fail_fast_connection(base: type, breaker: _FailFast) -> type:
    """``base`` (the pool's connection class), failing fast while ``breaker`` is open."""
    import redis

    unreachable = (redis.ConnectionError, redis.TimeoutError)

    class FailFastConnection(base):  # type: ignore[misc, valid-type]
        def connect(self, *args: Any, **kwargs: Any) -> Any:
            breaker.check()
            try:
                return super().connect(*args, **kwargs)
            except unreachable as error:
                breaker.trip(error)
                raise

        def send_packed_command(self, *args: Any, **kwargs: Any) -> Any:
            breaker.check()
            try:
                return super().send_packed_command(*args, **kwargs)
            except unreachable as error:
                breaker.trip(error)
                raise

        def read_response(self, *args: Any, **kwargs: Any) -> Any:
            try:
                return super().read_response(*args, **kwargs)
            except unreachable as error:
                breaker.trip(error)
                raise

    FailFastConnection.__name__ = FailFastConnection.__qualname__ = f"FailFast{base.__name__}"
    return FailFastConnection


def _check_prefix(prefix: str, name: str) -> None:
    for label, value in (("prefix", prefix), ("name", name)):
        if not isinstance(value, str) or not value or any(c.isspace() for c in value):
            raise RoutingConfigError(f"{label} must be a non-empty string without spaces, "
                                     f"got {value!r}")


def _nano_up(amount: Fraction) -> int:
    return math.ceil(amount * _NANO)


def _redis_unreachable(error: BaseException) -> bool:
    """Whether ``error`` says Redis cannot be reached (connection refused or lost, timed out).
    Other Redis errors (a script error, a wrong type) are bugs and propagate. The ``redis``
    package is imported only once a client exists."""
    import redis

    return isinstance(error, (redis.ConnectionError, redis.TimeoutError))


# ---------------------------------------------------------------------------------------------
# Budget
# ---------------------------------------------------------------------------------------------

# KEYS: 1 state hash, 2 spend zset (member "<id>:<nano>", score = commit time in us),
#       3 lease zset (member reservation id, score = lease expiry in us), 4 reservations hash
#       (field reservation id -> nano held; field "charged:<id>" -> nano charged when the
#       lease of <id> ran out, kept while that charge is inside the window).
# Shared prologue: the server time, the charge of leases that ran out (their calls may have
# been billed) and the expiry of old spend.
_BUDGET_PROLOGUE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local horizon = now - tonumber(ARGV[1])
local dead = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now, 'WITHSCORES')
for i = 1, #dead, 2 do
  local id = dead[i]
  local held = redis.call('HGET', KEYS[4], id)
  if held then
    redis.call('HINCRBY', KEYS[1], 'reserved', -tonumber(held))
    redis.call('HINCRBY', KEYS[1], 'pending', -1)
    redis.call('HINCRBY', KEYS[1], 'expired', 1)
    redis.call('HDEL', KEYS[4], id)
    if tonumber(held) > 0 then
      redis.call('ZADD', KEYS[2], dead[i + 1], id .. ':' .. held)
      redis.call('HINCRBY', KEYS[1], 'spent', tonumber(held))
      redis.call('HSET', KEYS[4], 'charged:' .. id, held)
    end
  end
end
if #dead > 0 then redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now) end
local old = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', horizon)
for _, member in ipairs(old) do
  redis.call('HINCRBY', KEYS[1], 'spent', -tonumber(string.match(member, ':(%d+)$')))
  redis.call('HDEL', KEYS[4], 'charged:' .. string.match(member, '^([^:]+):'))
end
if #old > 0 then redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', horizon) end
"""

# ARGV: 1 window_us, 2 amount, 3 max, 4 lease_us, 5 reservation id. Returns 1 granted, 0 not.
_RESERVE = _BUDGET_PROLOGUE + """
local spent = tonumber(redis.call('HGET', KEYS[1], 'spent') or '0')
local reserved = tonumber(redis.call('HGET', KEYS[1], 'reserved') or '0')
local amount = tonumber(ARGV[2])
if spent + reserved + amount > tonumber(ARGV[3]) then
  redis.call('HINCRBY', KEYS[1], 'denied', 1)
  return 0
end
redis.call('HINCRBY', KEYS[1], 'reserved', amount)
redis.call('HINCRBY', KEYS[1], 'pending', 1)
redis.call('HINCRBY', KEYS[1], 'granted', 1)
redis.call('HSET', KEYS[4], ARGV[5], amount)
redis.call('ZADD', KEYS[3], now + tonumber(ARGV[4]), ARGV[5])
return 1
"""

# ARGV: 1 window_us, 2 reservation id, 3 actual (-1: release). Returns 1 settled, 0 lease had
# run out (its charge, if still in the window, is replaced: a commit records the actual spend,
# a release refunds it).
_SETTLE = _BUDGET_PROLOGUE + """
local actual = tonumber(ARGV[3])
local held = redis.call('HGET', KEYS[4], ARGV[2])
local result = 0
if held then
  held = tonumber(held)
  redis.call('HDEL', KEYS[4], ARGV[2])
  redis.call('ZREM', KEYS[3], ARGV[2])
  redis.call('HINCRBY', KEYS[1], 'reserved', -held)
  redis.call('HINCRBY', KEYS[1], 'pending', -1)
  result = 1
else
  held = redis.call('HGET', KEYS[4], 'charged:' .. ARGV[2])
  if held then
    redis.call('HDEL', KEYS[4], 'charged:' .. ARGV[2])
    redis.call('ZREM', KEYS[2], ARGV[2] .. ':' .. held)
    held = tonumber(held)
    redis.call('HINCRBY', KEYS[1], 'spent', -held)
  end
end
if held and actual > held then
  redis.call('HINCRBY', KEYS[1], 'overruns', 1)
  redis.call('HINCRBY', KEYS[1], 'overrun', actual - held)
end
if actual > 0 then
  redis.call('ZADD', KEYS[2], now, ARGV[2] .. ':' .. ARGV[3])
  redis.call('HINCRBY', KEYS[1], 'spent', actual)
end
return result
"""

# ARGV: 1 window_us. Returns the state hash as a flat list.
_READ = _BUDGET_PROLOGUE + """
return redis.call('HGETALL', KEYS[1])
"""


class RedisReservation(ReservationBase):
    """A granted reservation on a :class:`RedisCloudBudget`; settle it exactly once.

    Same contract as :class:`confidence_router.budget.Reservation`, including the context
    manager (commit on a normal exit, release when an exception escapes).
    """

    __slots__ = ("_budget", "_id", "_nano")

    def __init__(self, budget: RedisCloudBudget, reservation_id: str, amount: Fraction,
                 nano: int) -> None:
        super().__init__(amount)
        self._budget = budget
        self._id = reservation_id
        self._nano = nano

    def commit(self, actual_usd: float | None = None) -> None:
        """Record the actual cost (default: the reserved amount) and free the reservation.

        Raises:
            ReservationStateError: already committed or released.
            TypeError, ValueError: ``actual_usd`` is not a finite amount >= 0.
        """
        nano = self._nano if actual_usd is None else _nano_up(exact_usd(actual_usd, "actual_usd"))
        self._settle("committed", nano)

    def release(self) -> None:
        """Free the reservation without spending anything.

        Raises:
            ReservationStateError: already committed or released.
        """
        self._settle("released", -1)

    def _settle(self, state: str, nano: int) -> None:
        if self._state != "pending":
            raise ReservationStateError(f"reservation already {self._state}")
        self._state = state
        try:
            self._budget._run(self._budget._settle, self._id, nano)
        except Exception as error:
            if not _redis_unreachable(error):
                raise
            # Fails closed: the lease stays held in Redis and is charged as spend when it runs
            # out, so the cap holds; the caller keeps the answer it already paid for.
            logger.warning(
                "confidence_router: could not settle a cloud budget reservation (%s: %s); "
                "it stays held and is charged as spent when its %g s lease runs out",
                type(error).__name__, error, self._budget.lease_s,
            )


class RedisCloudBudget:
    """At most ``max_usd`` of cloud spend in any rolling ``window_s`` span, across every
    process that uses the same Redis, ``prefix`` and ``name``.

    Same interface as :class:`confidence_router.budget.CloudBudget` (``reserve``, ``hold``,
    ``record_spend``, ``spent``, ``reserved``, ``remaining``, ``snapshot``).

    Args:
        client: a ``redis.Redis`` client (see :func:`redis_client`).
        max_usd: the cap per window; all processes must use the same value.
        window_s: the rolling window in seconds.
        prefix: the deployment's key prefix.
        name: tells several budgets of one deployment apart.
        lease_s: how long a reservation may stay unsettled before it is reclaimed.

    Example::

        budget = RedisCloudBudget(redis_client("redis://127.0.0.1:6379"), 5.0, prefix="prod")
        r = budget.reserve(0.01)        # None when the cap would be exceeded
        ...
        r.commit(0.008)
    """

    def __init__(
        self,
        client: redis.Redis,
        max_usd: float,
        window_s: float = 3600.0,
        *,
        prefix: str = DEFAULT_PREFIX,
        name: str = "default",
        lease_s: float = 900.0,
    ) -> None:
        _check_prefix(prefix, name)
        self._max = exact_usd(max_usd, "max_usd")
        self._max_nano = math.floor(self._max * _NANO)
        for label, value in (("window_s", window_s), ("lease_s", lease_s)):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise InvalidTypeError(f"{label} must be a number of seconds, got {value!r}")
            if not math.isfinite(value) or value <= 0:
                raise InvalidArgumentError(f"{label} must be finite and > 0, got {value!r}")
        self._window_s = float(window_s)
        self._window_us = round(self._window_s * 1e6)
        self._lease_us = round(float(lease_s) * 1e6)
        base = f"{prefix}:budget:{name}"
        self._keys = [f"{base}:state", f"{base}:spend", f"{base}:leases", f"{base}:reservations"]
        self._client = client
        self._reserve = client.register_script(_RESERVE)
        self._settle = client.register_script(_SETTLE)
        self._read = client.register_script(_READ)
        self._unavailable: str | None = None

    @property
    def unavailable(self) -> str | None:
        """Why the last :meth:`reserve` could not check the cap (Redis unreachable), else
        ``None``; the router's record says it instead of "cloud budget exhausted"."""
        return self._unavailable

    def _run(self, script: Any, *args: Any) -> Any:
        return script(keys=self._keys, args=[self._window_us, *args])

    @property
    def max_usd(self) -> float:
        """The cap per window."""
        return float(self._max)

    @property
    def window_s(self) -> float:
        """The window length in seconds."""
        return self._window_s

    @property
    def lease_s(self) -> float:
        """How long a reservation may stay unsettled before another process reclaims it."""
        return self._lease_us / 1e6

    def reserve(self, estimated_usd: float) -> RedisReservation | None:
        """Reserve ``estimated_usd`` (rounded up to a nano-dollar) if committed spend plus
        outstanding reservations plus it stays within ``max_usd``; otherwise ``None``.

        Returns ``None`` as well when Redis cannot be reached (fails closed, logged).

        Raises:
            TypeError, ValueError: ``estimated_usd`` is not a finite amount >= 0.
        """
        amount = exact_usd(estimated_usd, "estimated_usd")
        nano = _nano_up(amount)
        reservation_id = uuid.uuid4().hex
        try:
            granted = self._run(self._reserve, nano, self._max_nano, self._lease_us,
                                reservation_id)
        except Exception as error:
            if not _redis_unreachable(error):
                raise
            # Fails closed: without Redis no spend can be checked against the cap, so no
            # escalation is allowed (the router then applies on_budget_exceeded).
            self._unavailable = f"Redis unreachable ({type(error).__name__}: {error})"
            logger.warning(
                "confidence_router: cloud budget unavailable (%s: %s); escalation refused",
                type(error).__name__, error,
            )
            return None
        self._unavailable = None
        if not int(granted):
            return None
        return RedisReservation(self, reservation_id, amount, nano)

    def hold(self, estimated_usd: float) -> RedisReservation:
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
                requested_usd=float(estimated_usd), remaining_usd=remaining,
                max_usd=self.max_usd, window_s=self._window_s,
            )
        return reservation

    def record_spend(self, actual_usd: float) -> None:
        """Record spend that had no reservation; it counts against the cap like any other."""
        nano = _nano_up(exact_usd(actual_usd, "actual_usd"))
        self._run(self._settle, uuid.uuid4().hex, nano)

    def _state(self) -> dict[str, int]:
        flat = self._run(self._read)
        return {flat[i]: int(flat[i + 1]) for i in range(0, len(flat), 2)}

    @property
    def spent(self) -> float:
        """Committed spend within the current window (all processes)."""
        return self._state().get("spent", 0) / _NANO

    @property
    def reserved(self) -> float:
        """Sum of the outstanding reservations (all processes)."""
        return self._state().get("reserved", 0) / _NANO

    @property
    def remaining(self) -> float:
        """What a new reservation may still take (never < 0; 0 while Redis cannot be reached,
        as :meth:`reserve` then grants nothing)."""
        try:
            state = self._state()
        except Exception as error:
            if not _redis_unreachable(error):
                raise
            return 0.0
        free = self._max_nano - state.get("spent", 0) - state.get("reserved", 0)
        return max(0, free) / _NANO

    def snapshot(self) -> dict[str, Any]:
        """The same counters as ``CloudBudget.snapshot()``, over all processes, plus
        ``expired`` (reservations whose lease ran out unsettled, e.g. of crashed workers,
        and were charged as spent)."""
        s = self._state()
        spent, reserved = s.get("spent", 0), s.get("reserved", 0)
        return {
            "max_usd": float(self._max),
            "window_s": self._window_s,
            "spent_usd": spent / _NANO,
            "reserved_usd": reserved / _NANO,
            "remaining_usd": max(0, self._max_nano - spent - reserved) / _NANO,
            "pending": s.get("pending", 0),
            "granted": s.get("granted", 0),
            "denied": s.get("denied", 0),
            "overruns": s.get("overruns", 0),
            "overrun_usd": s.get("overrun", 0) / _NANO,
            "expired": s.get("expired", 0),
        }

    def reset(self) -> None:
        """Forget all spend, reservations and counters of this budget (every process)."""
        self._client.delete(*self._keys)

    def __repr__(self) -> str:
        return f"RedisCloudBudget(max_usd={float(self._max)}, window_s={self._window_s}, key={self._keys[0]!r})"


# ---------------------------------------------------------------------------------------------
# Stats
# ---------------------------------------------------------------------------------------------

_FLOAT_FIELDS = ("cost_usd", "local_cost_usd", "cloud_cost_usd", "all_cloud_cost_usd",
                 "paired_cost_usd", "paired_all_cloud_usd")
_INT_FIELDS = ("calls", "local", "cloud", "escalated", "would_escalate", "flagged",
               "unknown_confidence", "cost_unknown_calls", "all_cloud_known",
               "all_cloud_estimated_calls", "savings_calls",
               "tokens:local:input", "tokens:local:output",
               "tokens:cloud:input", "tokens:cloud:output")


class RedisRoutingStats:
    """:class:`~confidence_router.stats.RoutingStats` counters summed over every process.

    Each record is counted exactly as ``RoutingStats`` counts it (the same code reads the
    record), then added to Redis in one ``MULTI`` transaction, so a snapshot never sees half a
    record. ``snapshot()`` has the same keys as ``RoutingStats.snapshot()``; the realised-rate
    and latency windows are the last ``window`` / ``latency_window`` calls of all processes.

    Args:
        client: a ``redis.Redis`` client with ``decode_responses=True`` (:func:`redis_client`).
        prefix, name: the keys' namespace (one per deployment / per stats object).
        target_rate, window, latency_window, prices, cloud_model: as for ``RoutingStats``.
    """

    def __init__(
        self,
        client: redis.Redis,
        *,
        prefix: str = DEFAULT_PREFIX,
        name: str = "default",
        target_rate: float | None = None,
        window: int = 500,
        latency_window: int = 1000,
        prices: PriceTable | None = None,
        cloud_model: str | None = None,
    ) -> None:
        _check_prefix(prefix, name)
        # Validates the arguments exactly like the in-process class.
        RoutingStats(target_rate=target_rate, window=window, latency_window=latency_window)
        self._client = client
        self._target = None if target_rate is None else float(target_rate)
        self._window = window
        self._latency_window = latency_window
        self._prices = prices
        self._cloud_model = cloud_model
        base = f"{prefix}:stats:{name}"
        self._counts = f"{base}:counts"
        self._reasons = f"{base}:reasons"
        self._errors = f"{base}:errors"
        self._recent = f"{base}:recent"
        self._latency = {k: f"{base}:latency:{k}" for k in ("local", "cloud", "all")}

    @property
    def target_rate(self) -> float | None:
        """The configured target escalation rate."""
        return self._target

    def record(self, routing: Mapping[str, Any]) -> None:
        """Count one finished routing record (one transaction). Dropped, with a warning,
        while Redis cannot be reached (the counts then miss the calls made meanwhile).

        Raises:
            TypeError: ``routing`` is not a mapping.
            redis.RedisError: any other Redis error (a bug: the router logs it).
        """
        one = RoutingStats(prices=self._prices, cloud_model=self._cloud_model)
        one.record(routing)
        s = one.snapshot()
        ints = {
            "calls": 1, "local": s["local"], "cloud": s["cloud"], "escalated": s["escalated"],
            "would_escalate": s["would_escalate"], "flagged": s["flagged"],
            "unknown_confidence": s["unknown_confidence"],
            "cost_unknown_calls": s["cost_unknown_calls"],
            "all_cloud_known": int(s["all_cloud_cost_usd"] is not None),
            "all_cloud_estimated_calls": s["all_cloud_estimated_calls"],
            "savings_calls": s["savings_calls"],
        }
        for tier in ("local", "cloud"):
            for kind in ("input", "output"):
                ints[f"tokens:{tier}:{kind}"] = s["tokens"][tier][kind]
        all_cloud = s["all_cloud_cost_usd"] or 0.0
        floats = {
            "cost_usd": s["cost_usd"], "local_cost_usd": s["local_cost_usd"],
            "cloud_cost_usd": s["cloud_cost_usd"], "all_cloud_cost_usd": all_cloud,
            "paired_all_cloud_usd": all_cloud if s["savings_calls"] else 0.0,
            "paired_cost_usd": (all_cloud - s["savings_usd"]) if s["savings_calls"] else 0.0,
        }
        pipe = self._client.pipeline(transaction=True)
        for key, value in ints.items():
            if value:
                pipe.hincrby(self._counts, key, int(value))
        for key, value in floats.items():
            if value:
                pipe.hincrbyfloat(self._counts, key, float(value))
        for reason, n in s["by_reason"].items():
            pipe.hincrby(self._reasons, reason, n)
        for error, n in s["errors"].items():
            pipe.hincrby(self._errors, error, n)
        pipe.lpush(self._recent, int(bool(s["escalated"])))
        pipe.ltrim(self._recent, 0, self._window - 1)
        for key, latency in s["latency_s"].items():
            if latency["n"]:
                pipe.lpush(self._latency[key], repr(float(latency["p50"])))
                pipe.ltrim(self._latency[key], 0, self._latency_window - 1)
        try:
            pipe.execute()
        except Exception as error:
            if not _redis_unreachable(error):
                raise
            # Expected while Redis is down: a warning, not the router's error traceback for
            # every request.
            logger.warning("confidence_router: routing stats not counted, Redis unreachable "
                           "(%s: %s)", type(error).__name__, error)

    def snapshot(self) -> dict[str, Any]:
        """The same keys as ``RoutingStats.snapshot()``, over all processes (one transaction)."""
        pipe = self._client.pipeline(transaction=True)
        pipe.hgetall(self._counts)
        pipe.hgetall(self._reasons)
        pipe.hgetall(self._errors)
        pipe.lrange(self._recent, 0, -1)
        for key in ("local", "cloud", "all"):
            pipe.lrange(self._latency[key], 0, -1)
        counts, reasons, errors, recent, *latencies = pipe.execute()

        def i(key: str) -> int:
            return int(counts.get(key, 0))

        def f(key: str) -> float:
            return float(counts.get(key, 0.0))

        calls = i("calls")
        paired, paired_all, paired_cost = i("savings_calls"), f("paired_all_cloud_usd"), f("paired_cost_usd")
        snap: dict[str, Any] = {
            "calls": calls,
            "local": i("local"),
            "cloud": i("cloud"),
            "escalated": i("escalated"),
            "escalation_rate": i("escalated") / calls if calls else None,
            "would_escalate": i("would_escalate"),
            "flagged": i("flagged"),
            "unknown_confidence": i("unknown_confidence"),
            "by_reason": {k: int(v) for k, v in reasons.items()},
            "errors": {k: int(v) for k, v in errors.items()},
            "tokens": {tier: {kind: i(f"tokens:{tier}:{kind}") for kind in ("input", "output")}
                       for tier in ("local", "cloud")},
            "cost_usd": f("cost_usd"),
            "local_cost_usd": f("local_cost_usd"),
            "cloud_cost_usd": f("cloud_cost_usd"),
            "cost_unknown_calls": i("cost_unknown_calls"),
            "all_cloud_cost_usd": f("all_cloud_cost_usd") if i("all_cloud_known") else None,
            "all_cloud_estimated_calls": i("all_cloud_estimated_calls"),
            "savings_usd": paired_all - paired_cost if paired else None,
            "savings_rate": (paired_all - paired_cost) / paired_all
            if paired and paired_all > 0 else None,
            "savings_calls": paired,
        }
        realised = sum(int(x) for x in recent) / len(recent) if recent else None
        snap["target_rate"] = self._target
        snap["window"] = self._window
        snap["realised_rate"] = realised
        snap["drift"] = (realised - self._target
                         if self._target is not None and realised is not None else None)
        snap["latency_s"] = {}
        for key, values in zip(("local", "cloud", "all"), latencies):
            ordered = sorted(float(v) for v in values)
            snap["latency_s"][key] = {"n": len(ordered), "p50": nearest_rank(ordered, 0.50),
                                      "p95": nearest_rank(ordered, 0.95)}
        snap["latency_s"] = {k: snap["latency_s"][k] for k in ("local", "cloud", "all")}
        return snap

    def reset(self) -> None:
        """Zero every counter (of every process)."""
        self._client.delete(self._counts, self._reasons, self._errors, self._recent,
                            *self._latency.values())

    def __repr__(self) -> str:
        return f"RedisRoutingStats(key={self._counts!r}, target_rate={self._target})"


# ---------------------------------------------------------------------------------------------
# Rolling quantile threshold
# ---------------------------------------------------------------------------------------------

# KEYS: 1 scores zset (member "<seq>:<0|1>", score = confidence), 2 arrival list of those
# members, 3 recent list of unknown flags, 4 meta hash.
# ARGV (all scripts): 1 target, 2 window, 3 min_samples, 4 initial threshold.
_QUANTILE = """
-- The threshold as the exact string Redis stores (Lua's tostring would round to 14 digits).
local function threshold()
  local n = redis.call('ZCARD', KEYS[1])
  if n < tonumber(ARGV[3]) then return ARGV[4] end
  local k = math.floor(tonumber(ARGV[1]) * n + 1e-9)
  if k > n - 1 then k = n - 1 end
  local r = redis.call('ZRANGE', KEYS[1], k, k, 'WITHSCORES')
  return r[2]
end
"""

# ARGV 5: score ('' = unknown), 6: escalated ('1', '0' or '' = decide with the threshold).
_OBSERVE = _QUANTILE + """
local window = tonumber(ARGV[2])
local unknown = ARGV[5] == ''
redis.call('RPUSH', KEYS[3], unknown and '1' or '0')
if unknown then redis.call('HINCRBY', KEYS[4], 'n_recent_unknown', 1) end
if redis.call('LLEN', KEYS[3]) > window then
  if redis.call('LPOP', KEYS[3]) == '1' then
    redis.call('HINCRBY', KEYS[4], 'n_recent_unknown', -1)
  end
end
if unknown then
  redis.call('HINCRBY', KEYS[4], 'n_unknown_total', 1)
  return 0
end
local score = tonumber(ARGV[5])
local escalated = ARGV[6]
if escalated == '' then
  if score < tonumber(threshold()) then escalated = '1' else escalated = '0' end
end
local seq = redis.call('HINCRBY', KEYS[4], 'seq', 1)
local member = seq .. ':' .. escalated
redis.call('ZADD', KEYS[1], ARGV[5], member)
redis.call('RPUSH', KEYS[2], member)
redis.call('HINCRBY', KEYS[4], 'n_known_total', 1)
if escalated == '1' then redis.call('HINCRBY', KEYS[4], 'n_escalated', 1) end
if redis.call('LLEN', KEYS[2]) > window then
  local old = redis.call('LPOP', KEYS[2])
  redis.call('ZREM', KEYS[1], old)
  if string.sub(old, -1) == '1' then redis.call('HINCRBY', KEYS[4], 'n_escalated', -1) end
end
return 1
"""

_THRESHOLD = _QUANTILE + """
return threshold()
"""

# ARGV 5: a threshold for in_window_rate ('' = the current one).
_SNAPSHOT = _QUANTILE + """
local current = threshold()
local tau = ARGV[5]
if tau == '' then tau = current end
local below = redis.call('ZCOUNT', KEYS[1], '-inf', '(' .. tau)
local meta = redis.call('HGETALL', KEYS[4])
return {current, redis.call('ZCARD', KEYS[1]), redis.call('LLEN', KEYS[3]), below, meta}
"""


class RedisRollingQuantileThreshold:
    """:class:`~confidence_router.calibration.RollingQuantileThreshold` over the confidences
    seen by every process: the threshold is the ``floor(target_rate * n)``-th smallest of the
    last ``window`` known scores of all workers (the same definition), so the deployment as a
    whole tracks ``target_rate`` instead of each worker calibrating alone.

    Each observation is one Lua script (atomic); reading the threshold is one round trip.

    Args:
        client: a ``redis.Redis`` client with ``decode_responses=True``.
        target_rate, window, min_samples, initial_threshold: as for the in-process class.
        prefix, name: the keys' namespace.
    """

    def __init__(
        self,
        client: redis.Redis,
        target_rate: float,
        window: int = 500,
        min_samples: int = 50,
        initial_threshold: float = 0.7,
        *,
        prefix: str = DEFAULT_PREFIX,
        name: str = "default",
    ) -> None:
        from confidence_router.calibration import RollingQuantileThreshold

        _check_prefix(prefix, name)
        # Validates the arguments exactly like the in-process class.
        RollingQuantileThreshold(target_rate, window, min_samples, initial_threshold)
        self._target = float(target_rate)
        self._window = int(window)
        self._min_samples = int(min_samples)
        self._initial = float(initial_threshold)
        base = f"{prefix}:calibrator:{name}"
        self._keys = [f"{base}:scores", f"{base}:order", f"{base}:recent", f"{base}:meta"]
        self._client = client
        self._observe = client.register_script(_OBSERVE)
        self._threshold = client.register_script(_THRESHOLD)
        self._snapshot = client.register_script(_SNAPSHOT)

    def _args(self, *extra: Any) -> list[Any]:
        return [repr(self._target), self._window, self._min_samples, repr(self._initial), *extra]

    @property
    def target_rate(self) -> float:
        return self._target

    @property
    def window(self) -> int:
        return self._window

    @property
    def min_samples(self) -> int:
        return self._min_samples

    @property
    def initial_threshold(self) -> float:
        return self._initial

    def observe(self, score: float | None, *, escalated: bool | None = None) -> None:
        """Record one query's confidence (``None`` = unknown); see the in-process class.
        Dropped (logged) while Redis cannot be reached.

        Raises:
            ValueError: ``score`` is NaN or infinite, or ``escalated`` is not a bool/None.
        """
        if score is not None:
            if isinstance(score, bool) or not isinstance(score, (int, float)):
                raise InvalidArgumentError(f"score must be a number or None, got {score!r}")
            if not math.isfinite(score):
                raise InvalidArgumentError(f"score must be finite, got {score!r}")
        if escalated is not None and not isinstance(escalated, bool):
            raise InvalidArgumentError(f"escalated must be a bool or None, got {escalated!r}")
        flag = "" if escalated is None else ("1" if escalated else "0")
        try:
            self._observe(keys=self._keys,
                          args=self._args("" if score is None else repr(float(score)), flag))
        except Exception as error:
            if not _redis_unreachable(error):
                raise
            # One lost observation barely moves a quantile; failing the routed call would.
            logger.warning("confidence_router: calibrator observation dropped, Redis "
                           "unreachable (%s: %s)", type(error).__name__, error)

    @property
    def threshold(self) -> float:
        """The threshold to route with now (from every process's observations); the
        ``initial_threshold`` while Redis cannot be reached (logged)."""
        try:
            return float(self._threshold(keys=self._keys, args=self._args()))
        except Exception as error:
            if not _redis_unreachable(error):
                raise
            logger.warning("confidence_router: calibrator unavailable, Redis unreachable "
                           "(%s: %s); routing with the initial threshold %g",
                           type(error).__name__, error, self._initial)
            return self._initial

    def _read(self, tau: float | None = None) -> dict[str, Any]:
        threshold, n, n_obs, below, meta = self._snapshot(
            keys=self._keys, args=self._args("" if tau is None else repr(float(tau)))
        )
        m = {meta[i]: int(meta[i + 1]) for i in range(0, len(meta), 2)}
        return {"threshold": float(threshold), "n": int(n), "n_obs": int(n_obs),
                "below": int(below), **m}

    @property
    def ready(self) -> bool:
        return self._read()["n"] >= self._min_samples

    @property
    def n_known(self) -> int:
        return self._read()["n"]

    @property
    def n_unknown(self) -> int:
        return self._read().get("n_unknown_total", 0)

    @property
    def unknown_rate(self) -> float | None:
        r = self._read()
        return r.get("n_recent_unknown", 0) / r["n_obs"] if r["n_obs"] else None

    @property
    def realised_rate(self) -> float | None:
        r = self._read()
        return r.get("n_escalated", 0) / r["n"] if r["n"] else None

    @property
    def drift(self) -> float | None:
        realised = self.realised_rate
        return None if realised is None else realised - self._target

    def in_window_rate(self, threshold: float | None = None) -> float | None:
        """Share of the window's known scores strictly below ``threshold`` (default: current)."""
        r = self._read(threshold)
        return r["below"] / r["n"] if r["n"] else None

    def snapshot(self) -> dict[str, Any]:
        """The same keys as ``RollingQuantileThreshold.snapshot()`` (one atomic read)."""
        r = self._read()
        n, n_obs = r["n"], r["n_obs"]
        realised = r.get("n_escalated", 0) / n if n else None
        return {
            "target_rate": self._target,
            "threshold": r["threshold"],
            "ready": n >= self._min_samples,
            "window": self._window,
            "n_known": n,
            "n_known_total": r.get("n_known_total", 0),
            "n_unknown_total": r.get("n_unknown_total", 0),
            "unknown_rate": r.get("n_recent_unknown", 0) / n_obs if n_obs else None,
            "realised_rate": realised,
            "drift": None if realised is None else realised - self._target,
        }

    def reset(self) -> None:
        """Forget every observation (of every process): back to warm-up."""
        self._client.delete(*self._keys)

    def __repr__(self) -> str:
        return f"RedisRollingQuantileThreshold(target_rate={self._target}, key={self._keys[0]!r})"
