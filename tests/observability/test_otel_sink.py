"""OpenTelemetrySink against the real OpenTelemetry SDK (in-memory span exporter and metric
reader), fed by a real router on the test bed (ChatOllama -> scripted Ollama server,
ChatBedrockConverse -> fake Bedrock)."""

from __future__ import annotations

import asyncio
import logging

import pytest
from opentelemetry.trace import StatusCode

from confidence_router import (
    CloudEscalationError,
    ConfidenceRoutedLLM,
    MultiSink,
    RetryPolicy,
    RoutingConfigError,
    RoutingStats,
)

SONNET = "us.anthropic.claude-sonnet-4-5-20250929-v1:0"
FRANCE = "What is the capital of France?"
KENYA = "Who was the second president of Kenya?"


@pytest.fixture
def scripted(ollama_backend, bedrock_server):
    ollama_backend.add_answer("capital of France", "Paris", logprobs=[-0.05])
    ollama_backend.add_answer("Kenya", "Jomo Kenyatta was", logprobs=[-2.0, -3.1, -2.6])
    bedrock_server.add_answer("Kenya", "Daniel arap Moi", input_tokens=11, output_tokens=4)


@pytest.fixture
def router(ollama_chat, bedrock_chat, telemetry):
    sink = telemetry.sink(local_model="scripted-local", cloud_model=SONNET)
    return ConfidenceRoutedLLM(local=ollama_chat(), cloud=bedrock_chat(), stats=sink)


def test_one_span_per_routed_call_with_the_decision(router, telemetry, scripted, bedrock_server):
    kept = router.invoke(FRANCE).response_metadata["routing"]
    escalated = router.invoke(KENYA).response_metadata["routing"]
    spans = telemetry.finished()
    assert len(spans) == 2
    local, cloud = spans
    assert local.attributes["confidence_router.decision"] == "local"
    assert local.attributes["confidence_router.reason"] == kept["reason"]
    assert local.attributes["confidence_router.confidence"] == pytest.approx(kept["confidence"])
    assert local.attributes["confidence_router.escalated"] is False
    assert local.attributes["gen_ai.system"] == "ollama"
    assert local.attributes["gen_ai.request.model"] == "scripted-local"
    assert local.attributes["gen_ai.operation.name"] == "chat"
    assert local.attributes["gen_ai.usage.output_tokens"] == kept["usage"]["local"]["output_tokens"]
    assert "confidence_router.latency.cloud_s" not in local.attributes

    assert cloud.attributes["confidence_router.decision"] == "cloud"
    assert cloud.attributes["confidence_router.reason"] == "low_confidence"
    assert cloud.attributes["confidence_router.escalated"] is True
    assert cloud.attributes["gen_ai.system"] == "aws.bedrock"
    assert cloud.attributes["gen_ai.request.model"] == SONNET
    assert cloud.attributes["gen_ai.usage.input_tokens"] == 11
    assert cloud.attributes["gen_ai.usage.output_tokens"] == 4
    assert cloud.attributes["confidence_router.local.model"] == "scripted-local"
    assert cloud.attributes["confidence_router.cloud_cost_usd"] == pytest.approx(
        escalated["cloud_cost_usd"]
    )
    assert cloud.attributes["confidence_router.cloud_cost_usd"] > 0
    for stage in ("local", "cloud", "total"):
        assert cloud.attributes[f"confidence_router.latency.{stage}_s"] == pytest.approx(
            escalated["latency_s"][stage]
        )
    assert cloud.status.status_code is StatusCode.UNSET
    assert len(bedrock_server.requests) == 1
    # No prompt or answer text is ever put on a span.
    values = " ".join(str(v) for span in spans for v in span.attributes.values())
    assert "Kenya" not in values and "Paris" not in values and "Moi" not in values


def test_span_is_timed_from_the_records_latency(router, telemetry, scripted):
    routing = router.invoke(KENYA).response_metadata["routing"]
    (span,) = telemetry.finished()
    assert span.end_time - span.start_time == int(routing["latency_s"]["total"] * 1e9)


def test_metrics_count_calls_escalations_cost_and_latency(router, telemetry, scripted):
    for question in (FRANCE, FRANCE, KENYA):
        router.invoke(question)
    assert telemetry.total("confidence_router.calls") == 3
    assert (
        telemetry.total("confidence_router.calls", **{"confidence_router.decision": "local"}) == 2
    )
    assert telemetry.total("confidence_router.escalations") == 1
    assert telemetry.total("confidence_router.cost", **{"confidence_router.tier": "cloud"}) > 0
    latency = {
        p.attributes["confidence_router.stage"]: p.count
        for p in telemetry.points("confidence_router.latency")
        if p.attributes["confidence_router.decision"] == "local"
    }
    assert latency == {"total": 2}
    durations = {
        (p.attributes["gen_ai.system"], p.attributes.get("gen_ai.request.model")): p.count
        for p in telemetry.points("gen_ai.client.operation.duration")
    }
    assert durations == {("ollama", "scripted-local"): 3, ("aws.bedrock", SONNET): 1}
    cloud_tokens = {
        p.attributes["gen_ai.token.type"]: p.sum
        for p in telemetry.points("gen_ai.client.token.usage")
        if p.attributes["gen_ai.system"] == "aws.bedrock"
    }
    assert cloud_tokens == {"input": 11, "output": 4}
    confidences = telemetry.points("confidence_router.confidence")
    assert sum(p.count for p in confidences) == 3


def test_retries_become_span_events_and_a_failed_call_an_error_span(
    ollama_chat, bedrock_chat, telemetry, scripted, bedrock_server
):
    bedrock_server.fail("Kenya", "ThrottlingException")
    router = ConfidenceRoutedLLM(
        local=ollama_chat(),
        cloud=bedrock_chat(),
        stats=telemetry.sink(),
        cloud_retry=RetryPolicy(max_attempts=3, base_delay=0.001, max_delay=0.002),
    )
    with pytest.raises(CloudEscalationError):
        router.invoke(KENYA)
    assert len(bedrock_server.requests) == 3
    (span,) = telemetry.finished()
    assert span.status.status_code is StatusCode.ERROR
    assert span.attributes["error.type"] == "throttled"
    assert span.attributes["confidence_router.cloud.attempts"] == 3
    retries = [e for e in span.events if e.name == "confidence_router.retry"]
    assert [e.attributes["confidence_router.retry.attempt"] for e in retries] == [1, 2]
    assert telemetry.total("confidence_router.cloud.retries") == 2


def test_cloud_error_served_locally_is_not_an_error_span(
    ollama_chat, bedrock_chat, telemetry, scripted, bedrock_server
):
    bedrock_server.fail("Kenya", "AccessDeniedException")
    router = ConfidenceRoutedLLM(
        local=ollama_chat(), cloud=bedrock_chat(), stats=telemetry.sink(), on_cloud_error="local"
    )
    assert router.invoke(KENYA).response_metadata["routing"]["reason"] == "cloud_error"
    (span,) = telemetry.finished()
    assert span.status.status_code is StatusCode.UNSET
    assert span.attributes["confidence_router.cloud.error_kind"] == "permanent"
    assert span.attributes["gen_ai.system"] == "ollama"


def test_streamed_and_concurrent_calls_each_get_one_span(router, telemetry, scripted):
    chunks = list(router.stream(KENYA))
    assert "".join(c.text for c in chunks) == "Daniel arap Moi"

    async def many():
        return await router.abatch([FRANCE] * 8 + [KENYA] * 4)

    results = asyncio.run(many())
    assert len(results) == 12
    spans = telemetry.finished()
    assert len(spans) == 13
    decisions = [s.attributes["confidence_router.decision"] for s in spans]
    assert decisions.count("cloud") == 5
    assert telemetry.total("confidence_router.calls") == 13


def test_span_is_a_child_of_the_callers_active_span(router, telemetry, scripted):
    tracer = telemetry.tracer_provider.get_tracer("app")
    with tracer.start_as_current_span("handle-request") as outer:
        router.invoke(FRANCE)
    (span,) = telemetry.finished()
    assert span.parent is not None
    assert span.parent.span_id == outer.get_span_context().span_id
    assert span.context.trace_id == outer.get_span_context().trace_id


def test_multisink_feeds_stats_and_otel_and_survives_a_broken_sink(
    ollama_chat, bedrock_chat, telemetry, scripted, caplog
):
    class Broken:
        def record(self, routing):
            raise RuntimeError("exporter down")

    stats = RoutingStats()
    router = ConfidenceRoutedLLM(
        local=ollama_chat(),
        cloud=bedrock_chat(),
        stats=MultiSink(Broken(), stats, telemetry.sink()),
    )
    with caplog.at_level(logging.ERROR, logger="confidence_router"):
        router.invoke(FRANCE)
        router.invoke(KENYA)
    assert stats.snapshot()["calls"] == 2
    assert stats.snapshot()["escalated"] == 1
    assert len(telemetry.finished()) == 2
    assert sum("stats sink Broken failed" in r.getMessage() for r in caplog.records) == 2


def test_sink_tolerates_sparse_records_and_rejects_non_mappings(telemetry):
    sink = telemetry.sink()
    sink.record({})
    sink.record(
        {"decision": "cloud", "latency_s": "n/a", "usage": None, "confidence": float("nan")}
    )
    first, second = telemetry.finished()
    assert first.attributes["confidence_router.decision"] == "unknown"
    assert "confidence_router.confidence" not in second.attributes
    assert "gen_ai.request.model" not in second.attributes
    with pytest.raises(TypeError):
        sink.record(["decision", "local"])  # type: ignore[arg-type]


@pytest.mark.parametrize("kwargs", [{"local_system": ""}, {"cloud_system": 3}, {"local_model": 7}])
def test_bad_sink_configuration(telemetry, kwargs):
    with pytest.raises(RoutingConfigError):
        telemetry.sink(**kwargs)


def test_multisink_rejects_non_sinks():
    with pytest.raises(RoutingConfigError, match="at least one"):
        MultiSink()
    with pytest.raises(RoutingConfigError, match="no record"):
        MultiSink(RoutingStats(), object())  # type: ignore[arg-type]


def test_recorded_retries_become_one_event_each(telemetry):
    # The record's ``cloud_retries`` list (one entry per retried attempt) is what the sink
    # reads first; without it, ``cloud_attempts`` of a failed call gives the count.
    telemetry.sink().record({
        "decision": "cloud", "escalated": True, "reason": "low_confidence",
        "cloud_retries": [{"attempt": 1, "kind": "throttled", "delay_s": 0.5},
                          {"attempt": 2, "kind": "transient", "delay_s": 1.0}],
    })  # fmt: skip
    (span,) = telemetry.finished()
    events = [dict(e.attributes) for e in span.events]
    assert events == [
        {"confidence_router.retry.attempt": 1, "error.type": "throttled",
         "confidence_router.retry.delay_s": 0.5},
        {"confidence_router.retry.attempt": 2, "error.type": "transient",
         "confidence_router.retry.delay_s": 1.0},
    ]  # fmt: skip
    assert span.status.status_code is StatusCode.UNSET
    assert telemetry.total("confidence_router.cloud.retries") == 2


# -- needs two record fields from the router (see the report): ``cloud_retries`` and ``models`` --


def test_a_retry_that_then_succeeds_is_logged(
    ollama_chat, bedrock_chat, telemetry, scripted, bedrock_server
):
    bedrock_server.fail("Kenya", "ThrottlingException", times=1)
    router = ConfidenceRoutedLLM(
        local=ollama_chat(),
        cloud=bedrock_chat(),
        stats=telemetry.sink(),
        cloud_retry=RetryPolicy(max_attempts=3, base_delay=0.001, max_delay=0.002),
    )
    assert router.invoke(KENYA).text == "Daniel arap Moi"
    assert len(bedrock_server.requests) == 2
    (span,) = telemetry.finished()
    retries = [e for e in span.events if e.name == "confidence_router.retry"]
    assert [
        (e.attributes["confidence_router.retry.attempt"], e.attributes["error.type"])
        for e in retries
    ] == [(1, "throttled")]
    assert telemetry.total("confidence_router.cloud.retries") == 1


def test_models_come_from_the_router_without_configuration(
    ollama_chat, bedrock_chat, telemetry, scripted
):
    router = ConfidenceRoutedLLM(local=ollama_chat(), cloud=bedrock_chat(), stats=telemetry.sink())
    router.invoke(FRANCE)
    router.invoke(KENYA)
    local, cloud = telemetry.finished()
    assert local.attributes["gen_ai.request.model"] == "scripted-local"
    assert cloud.attributes["gen_ai.request.model"] == SONNET
    assert cloud.attributes["confidence_router.local.model"] == "scripted-local"


def test_missing_opentelemetry_names_the_extra():
    import subprocess
    import sys

    code = (
        "import sys\n"
        "sys.modules['opentelemetry'] = None  # as if the otel extra were not installed\n"
        "try:\n"
        "    from confidence_router import OpenTelemetrySink\n"
        "except ImportError as error:\n"
        "    print(type(error).__name__, error)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.startswith("MissingExtraError")
    assert 'pip install "confidence-router[otel]"' in out.stdout
