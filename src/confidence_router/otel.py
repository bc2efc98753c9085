"""``OpenTelemetrySink``: every routed call as an OpenTelemetry span and metrics.

A stats sink (``ConfidenceRoutedLLM(stats=OpenTelemetrySink())``) that turns each finished
routing record into

* **one span** per routed call, ``confidence_router.route``, timed from the record's total
  latency (it ends when the record is finished, and starts ``latency_s["total"]`` earlier). Its
  attributes follow the OpenTelemetry GenAI semantic conventions where they apply, for the tier
  whose answer was returned (``gen_ai.operation.name``, ``gen_ai.system``,
  ``gen_ai.request.model``, ``gen_ai.usage.input_tokens`` / ``output_tokens``,
  ``error.type``), and carry the decision under ``confidence_router.*``: decision, reason,
  confidence, threshold, escalated, flagged, per-stage latencies, per-tier models, tokens and
  costs. Each cloud retry is a span event ``confidence_router.retry``.
* **metrics** through the OpenTelemetry metrics API, so any exporter works (Prometheus, OTLP):
  ``confidence_router.calls`` and ``confidence_router.escalations`` (counters; the escalation
  rate is their ratio), ``confidence_router.cost`` (USD, counter), ``confidence_router.cloud
  .retries`` (counter), ``confidence_router.latency`` (seconds, histogram of the whole call
  and of the pre-check),
  ``confidence_router.confidence`` (histogram), and the GenAI client metrics
  ``gen_ai.client.operation.duration`` and ``gen_ai.client.token.usage`` per tier call.

Needs the ``otel`` extra (``pip install "confidence-router[otel]"``: ``opentelemetry-api``);
configure an SDK (``opentelemetry-sdk``) or any OpenTelemetry distribution to export.

Example::

    from opentelemetry import metrics, trace
    from confidence_router import ConfidenceRoutedLLM, MultiSink, RoutingStats
    from confidence_router.otel import OpenTelemetrySink

    stats = RoutingStats()
    router = ConfidenceRoutedLLM(
        local=local, cloud=cloud,
        stats=MultiSink(stats, OpenTelemetrySink()),   # global tracer/meter providers
    )

Prompts, answers and error messages are never put on spans (error kinds are).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

from confidence_router._extras import require_extra

require_extra("otel", "OpenTelemetrySink")

from opentelemetry import metrics as otel_metrics
from opentelemetry import trace as otel_trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from confidence_router.errors import InvalidTypeError, RoutingConfigError
from confidence_router.stats import finite_float

__all__ = ["SPAN_NAME", "OpenTelemetrySink"]

logger = logging.getLogger("confidence_router")

#: Name of the span emitted per routed call.
SPAN_NAME = "confidence_router.route"
_SCOPE = "confidence_router"
_STAGES = ("precheck", "local", "cloud", "total")
# Stages of the router-level latency histogram; each tier call's own duration is recorded once,
# in gen_ai.client.operation.duration (every measurement costs the SDK ~10 us).
_ROUTER_STAGES = ("precheck", "total")
# Histogram buckets for latencies in seconds (the GenAI semconv advice for operation duration).
_DURATION_BUCKETS = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48,
                     40.96, 81.92)  # fmt: skip
_TOKEN_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576)
# Retry events put on a span (OpenTelemetry's default span event limit).
_MAX_RETRY_EVENTS = 128
_CONFIDENCE_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("confidence-router")
    except Exception:  # noqa: BLE001 - not installed as a distribution (source checkout)
        return "0"


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


class OpenTelemetrySink:
    """A stats sink that emits an OpenTelemetry span and metrics per routed call.

    Args:
        tracer_provider: where spans go (default: the global one, ``trace.set_tracer_provider``).
        meter_provider: where metrics go (default: the global one).
        local_model / cloud_model: model names for ``gen_ai.request.model`` when the record
            does not carry them (``record["models"]``).
        local_system / cloud_system: ``gen_ai.system`` of each tier (default ``"ollama"`` and
            ``"aws.bedrock"``, the GenAI conventions' value for Bedrock).

    Example::

        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.metrics import MeterProvider

        sink = OpenTelemetrySink(tracer_provider=TracerProvider(),
                                 meter_provider=MeterProvider(metric_readers=[reader]))
        router = ConfidenceRoutedLLM(local=local, cloud=cloud, stats=sink)

    Raises:
        RoutingConfigError: a ``*_system`` that is not a non-empty string.
    """

    def __init__(
        self,
        *,
        tracer_provider: Any = None,
        meter_provider: Any = None,
        local_model: str | None = None,
        cloud_model: str | None = None,
        local_system: str = "ollama",
        cloud_system: str = "aws.bedrock",
    ) -> None:
        for name, system in (("local_system", local_system), ("cloud_system", cloud_system)):
            if not isinstance(system, str) or not system:
                raise RoutingConfigError(f"{name} must be a non-empty string, got {system!r}")
        for name, model in (("local_model", local_model), ("cloud_model", cloud_model)):
            if model is not None and not isinstance(model, str):
                raise RoutingConfigError(f"{name} must be a string or None, got {model!r}")
        version = _version()
        self._tracer = otel_trace.get_tracer(_SCOPE, version, tracer_provider)
        meter = otel_metrics.get_meter(_SCOPE, version, meter_provider)
        self._models = {"local": local_model, "cloud": cloud_model}
        self._systems = {"local": local_system, "cloud": cloud_system}
        self._calls = meter.create_counter(
            "confidence_router.calls", unit="{call}", description="Routed calls."
        )
        self._escalations = meter.create_counter(
            "confidence_router.escalations",
            unit="{call}",
            description="Calls escalated to the cloud tier (rate = escalations / calls).",
        )
        self._cost = meter.create_counter(
            "confidence_router.cost", unit="USD", description="Cost of routed calls, per tier."
        )
        self._retries = meter.create_counter(
            "confidence_router.cloud.retries", unit="{retry}", description="Cloud call retries."
        )
        self._latency = meter.create_histogram(
            "confidence_router.latency",
            unit="s",
            description="Latency of the routed call (total) and of its pre-check probe.",
            explicit_bucket_boundaries_advisory=_DURATION_BUCKETS,
        )
        self._confidence = meter.create_histogram(
            "confidence_router.confidence",
            unit="1",
            description="Confidence of the local answer (calls where it is known).",
            explicit_bucket_boundaries_advisory=_CONFIDENCE_BUCKETS,
        )
        self._duration = meter.create_histogram(
            "gen_ai.client.operation.duration",
            unit="s",
            description="GenAI operation duration (one per tier call).",
            explicit_bucket_boundaries_advisory=_DURATION_BUCKETS,
        )
        self._tokens = meter.create_histogram(
            "gen_ai.client.token.usage",
            unit="{token}",
            description="Tokens used per tier call, by gen_ai.token.type.",
            explicit_bucket_boundaries_advisory=_TOKEN_BUCKETS,
        )

    # -- the StatsSink protocol -------------------------------------------------------------

    def record(self, routing: Mapping[str, Any]) -> None:
        """Emit the span and the metrics of one finished routing record.

        Tolerates missing fields (records differ by path: pre-check, local failure, cloud
        failure); only known values become attributes (nothing is reported as 0 for lack of
        data).

        Raises:
            TypeError: ``routing`` is not a mapping.
        """
        if not isinstance(routing, Mapping):
            raise InvalidTypeError(f"routing must be a mapping, got {type(routing).__name__}")
        end_ns = time.time_ns()
        latencies = routing.get("latency_s")
        latencies = latencies if isinstance(latencies, Mapping) else {}
        total = finite_float(latencies.get("total"))
        start_ns = end_ns
        if total is not None and total > 0:
            # A latency longer than the epoch (a corrupt record) starts the span at 0.
            start_ns = end_ns - min(end_ns, int(min(total * 1e9, float(end_ns))))
        decision = str(routing.get("decision") or "unknown")
        models = self._models_of(routing)
        raw_usage = routing.get("usage")
        usage: Mapping[str, Any] = raw_usage if isinstance(raw_usage, Mapping) else {}
        attributes = self._span_attributes(routing, decision, models, latencies, usage)
        span = self._tracer.start_span(
            SPAN_NAME, kind=SpanKind.INTERNAL, start_time=start_ns, attributes=attributes
        )
        try:
            for event in self._retry_events(routing):
                span.add_event("confidence_router.retry", attributes=event, timestamp=end_ns)
            error_type = self._error_type(routing, decision)
            if error_type is not None:
                span.set_attribute("error.type", error_type)
                span.set_status(Status(StatusCode.ERROR, f"{decision} tier failed: {error_type}"))
        finally:
            span.end(end_time=end_ns)
        self._record_metrics(routing, decision, models, latencies, usage)

    # -- helpers ----------------------------------------------------------------------------

    def _models_of(self, routing: Mapping[str, Any]) -> dict[str, str | None]:
        given = routing.get("models")
        given = given if isinstance(given, Mapping) else {}
        return {
            tier: (given.get(tier) if isinstance(given.get(tier), str) else None)
            or self._models[tier]
            for tier in ("local", "cloud")
        }

    def _span_attributes(
        self,
        routing: Mapping[str, Any],
        decision: str,
        models: Mapping[str, str | None],
        latencies: Mapping[str, Any],
        usage: Mapping[str, Any],
    ) -> dict[str, Any]:
        attributes: dict[str, Any] = {
            "gen_ai.operation.name": "chat",
            "confidence_router.decision": decision,
            "confidence_router.escalated": bool(routing.get("escalated")),
            "confidence_router.would_escalate": bool(routing.get("would_escalate")),
            "confidence_router.flagged": bool(routing.get("flagged")),
        }
        if decision in self._systems:
            attributes["gen_ai.system"] = self._systems[decision]
            if models[decision]:
                attributes["gen_ai.request.model"] = models[decision]
            served = usage.get(decision)
            if isinstance(served, Mapping):
                for key in ("input_tokens", "output_tokens"):
                    if _int(served.get(key)) is not None:
                        attributes[f"gen_ai.usage.{key}"] = served[key]
        for key in ("reason", "signal", "escalation_skipped", "refusal"):
            if isinstance(routing.get(key), str):
                attributes[f"confidence_router.{key}"] = routing[key]
        for key in ("confidence", "threshold"):
            if finite_float(routing.get(key)) is not None:
                attributes[f"confidence_router.{key}"] = float(routing[key])
        for stage in _STAGES:
            if finite_float(latencies.get(stage)) is not None:
                attributes[f"confidence_router.latency.{stage}_s"] = float(latencies[stage])
        for key in ("cost_usd", "local_cost_usd", "cloud_cost_usd", "all_cloud_cost_usd"):
            if finite_float(routing.get(key)) is not None:
                attributes[f"confidence_router.{key}"] = float(routing[key])
        for tier in ("local", "cloud"):
            if models[tier]:
                attributes[f"confidence_router.{tier}.model"] = models[tier]
            tier_usage = usage.get(tier)
            if isinstance(tier_usage, Mapping):
                for key in ("input_tokens", "output_tokens"):
                    if _int(tier_usage.get(key)) is not None:
                        attributes[f"confidence_router.{tier}.{key}"] = tier_usage[key]
            kind = routing.get(f"{tier}_error_kind")
            if isinstance(kind, str):
                attributes[f"confidence_router.{tier}.error_kind"] = kind
        attempts = _int(routing.get("cloud_attempts"))
        if attempts is not None:
            attributes["confidence_router.cloud.attempts"] = attempts
        precheck = routing.get("precheck")
        if isinstance(precheck, Mapping) and finite_float(precheck.get("p_yes")) is not None:
            attributes["confidence_router.precheck.p_yes"] = float(precheck["p_yes"])
        return attributes

    @staticmethod
    def _retry_count(routing: Mapping[str, Any]) -> int:
        """Cloud retries of the call: ``len(cloud_retries)``, else ``cloud_attempts - 1``."""
        retries = routing.get("cloud_retries")
        if isinstance(retries, (list, tuple)):
            return len(retries)
        return max(0, (_int(routing.get("cloud_attempts")) or 1) - 1)

    @staticmethod
    def _retry_events(routing: Mapping[str, Any]) -> list[dict[str, Any]]:
        """One event per cloud retry: from ``cloud_retries`` (one entry per retried attempt)
        when the record has it, else ``cloud_attempts - 1`` events from the attempt count.

        The first :data:`_MAX_RETRY_EVENTS` (the SDK's default span event limit; beyond it the
        SDK would keep only the latest ones), so an absurd attempt count cannot make the sink
        build millions of events."""
        retries = routing.get("cloud_retries")
        if isinstance(retries, (list, tuple)):
            events = []
            for i, entry in enumerate(retries[:_MAX_RETRY_EVENTS], start=1):
                entry = entry if isinstance(entry, Mapping) else {}
                event: dict[str, Any] = {
                    "confidence_router.retry.attempt": _int(entry.get("attempt")) or i
                }
                if isinstance(entry.get("kind"), str):
                    event["error.type"] = entry["kind"]
                if finite_float(entry.get("delay_s")) is not None:
                    event["confidence_router.retry.delay_s"] = float(entry["delay_s"])
                events.append(event)
            return events
        attempts = _int(routing.get("cloud_attempts")) or 1
        kind = routing.get("cloud_error_kind")
        return [
            {"confidence_router.retry.attempt": attempt,
             **({"error.type": kind} if isinstance(kind, str) else {})}
            for attempt in range(1, min(attempts, _MAX_RETRY_EVENTS + 1))
        ]  # fmt: skip

    @staticmethod
    def _error_type(routing: Mapping[str, Any], decision: str) -> str | None:
        """The failed tier's error kind when the call ended on that failure (a cloud error
        that fell back to the local answer is a handled outcome, not a failed call)."""
        if decision == "cloud" and routing.get("cloud_error"):
            return str(routing.get("cloud_error_kind") or "cloud_error")
        if decision == "local" and routing.get("local_error"):
            # The local tier failed and nothing was escalated (LocalModelError): there is no
            # local answer to have served, so the call failed.
            return str(routing.get("local_error_kind") or "local_error")
        return None

    def _record_metrics(
        self,
        routing: Mapping[str, Any],
        decision: str,
        models: Mapping[str, str | None],
        latencies: Mapping[str, Any],
        usage: Mapping[str, Any],
    ) -> None:
        reason = str(routing.get("reason") or "unknown")
        common = {"confidence_router.decision": decision, "confidence_router.reason": reason}
        self._calls.add(1, common)
        if routing.get("escalated"):
            self._escalations.add(1, {"confidence_router.reason": reason})
        for tier in ("local", "cloud"):
            cost = finite_float(routing.get(f"{tier}_cost_usd"))
            if cost:
                self._cost.add(cost, {"confidence_router.tier": tier})
        retries = self._retry_count(routing)
        if retries:
            self._retries.add(retries)
        for stage in _ROUTER_STAGES:
            seconds = finite_float(latencies.get(stage))
            if seconds is not None:
                self._latency.record(
                    seconds,
                    {"confidence_router.stage": stage, "confidence_router.decision": decision},
                )
        confidence = finite_float(routing.get("confidence"))
        if confidence is not None:
            self._confidence.record(confidence, {"confidence_router.decision": decision})
        for tier in ("local", "cloud"):
            seconds = finite_float(latencies.get(tier))
            if seconds is None:
                continue
            tier_attributes: dict[str, Any] = {
                "gen_ai.operation.name": "chat",
                "gen_ai.system": self._systems[tier],
            }
            if models[tier]:
                tier_attributes["gen_ai.request.model"] = models[tier]
            error = routing.get(f"{tier}_error_kind")
            if isinstance(error, str):
                tier_attributes["error.type"] = error
            self._duration.record(seconds, tier_attributes)
            tier_usage = usage.get(tier)
            if isinstance(tier_usage, Mapping):
                for key, token_type in (("input_tokens", "input"), ("output_tokens", "output")):
                    count = _int(tier_usage.get(key))
                    if count is not None:
                        self._tokens.record(
                            count, {**tier_attributes, "gen_ai.token.type": token_type}
                        )

    def __repr__(self) -> str:
        return f"OpenTelemetrySink(local={self._systems['local']}, cloud={self._systems['cloud']})"
