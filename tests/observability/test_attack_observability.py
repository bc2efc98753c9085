"""Attacker's round on the observability modules: RoutingStats, OpenTelemetrySink and the run
annotation helpers, fed odd records, bad arguments, many threads, and real routed calls on the
test bed (scripted Ollama server, fake Bedrock) that end in local and cloud errors."""

from __future__ import annotations

import asyncio
import math
import threading

import pytest
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.tracers.base import BaseTracer

from confidence_router import ConfidenceRoutedLLM, RetryPolicy
from confidence_router.calibration import RollingQuantileThreshold
from confidence_router.costs import PriceTable
from confidence_router.errors import (
    CloudEscalationError,
    InvalidArgumentError,
    InvalidTypeError,
    LocalModelError,
)
from confidence_router.probe import SelfAssessmentProbe
from confidence_router.stats import MultiSink, RoutingStats
from confidence_router.telemetry import annotate_run, routing_run_metadata

SONNET = "us.anthropic.claude-sonnet-4-5-20250929-v1:0"
FRANCE = "What is the capital of France?"
KENYA = "Who was the second president of Kenya?"
BROKEN = "Tell me about the broken question"
HUGE = 10**400  # an int no float can hold: math.isfinite / float() raise OverflowError on it
FAST_RETRY = RetryPolicy(max_attempts=2, base_delay=0.01, max_delay=0.02, jitter=False)


@pytest.mark.parametrize("field", ["cost_usd", "all_cloud_cost_usd", "local_cost_usd"])
def test_stats_counts_a_record_with_an_int_too_large_for_a_float(field):
    # Before: math.isfinite(10**400) raised OverflowError before the lock, so the call was
    # never counted (the router logs a failing sink and moves on: the call silently vanished).
    stats = RoutingStats()
    stats.record({"decision": "local", "reason": "confident", field: HUGE,
                  "latency_s": {"total": HUGE}})  # fmt: skip
    s = stats.snapshot()
    assert (s["calls"], s["local"], s["by_reason"]) == (1, 1, {"confident": 1})
    assert s["latency_s"]["all"]["n"] == 0  # no latency is invented
    if field == "cost_usd":
        assert s["cost_unknown_calls"] == 1 and s["cost_usd"] == 0.0
    if field == "all_cloud_cost_usd":
        assert s["all_cloud_cost_usd"] is None and s["savings_calls"] == 0


def test_stats_odd_records_are_counted_once_with_nothing_invented():
    stats = RoutingStats(target_rate=0.5, window=4)
    odd = [
        {},
        {"decision": None, "reason": None, "escalated": None, "latency_s": None, "usage": None},
        {"decision": "moon", "reason": "made_up", "cost_usd": math.nan, "all_cloud_cost_usd":
         math.inf, "latency_s": {"total": -math.inf}, "usage": {"local": {"input_tokens": True}}},
        {"decision": ["cloud"], "reason": 7, "escalated": True, "confidence": math.nan,
         "cost_usd": 0.002, "local_error": "ResponseError: boom", "cloud_error_kind": "transient",
         "precheck": {"error": ""}},
    ]  # fmt: skip
    for record in odd:
        stats.record(record)
    s = stats.snapshot()
    assert (s["calls"], s["local"], s["cloud"], s["escalated"]) == (4, 0, 0, 1)
    assert s["by_reason"] == {"None": 2, "made_up": 1, "7": 1}
    assert s["errors"] == {"local:ResponseError": 1, "cloud:transient": 1}
    assert s["cost_usd"] == pytest.approx(0.002) and s["cost_unknown_calls"] == 3
    assert s["all_cloud_cost_usd"] is None and s["savings_usd"] is None
    assert s["tokens"]["local"] == {"input": 0, "output": 0}
    assert s["latency_s"]["all"]["n"] == 0
    assert s["realised_rate"] == 0.25 and s["drift"] == -0.25


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"prices": {"model": (3.0, 15.0)}, "cloud_model": SONNET}, InvalidTypeError, "prices"),
        ({"prices": "PriceTable()", "cloud_model": SONNET}, InvalidTypeError, "prices"),
        ({"prices": PriceTable(), "cloud_model": 42}, InvalidTypeError, "cloud_model"),
        ({"target_rate": math.nan}, InvalidArgumentError, "target_rate"),
        ({"target_rate": "0.3"}, InvalidTypeError, "target_rate"),
        ({"window": -1}, InvalidArgumentError, "window"),
        ({"latency_window": 2.5}, InvalidTypeError, "latency_window"),
    ],
)
def test_stats_bad_constructor_arguments_are_typed_errors(kwargs, error, match):
    # Before: a wrong `prices` was accepted and every record() then raised AttributeError
    # ('dict' object has no attribute 'estimate'), inside the router's sink guard.
    with pytest.raises(error, match=match):
        RoutingStats(**kwargs)


def test_stats_exact_under_many_threads_with_concurrent_snapshots():
    stats = RoutingStats(target_rate=0.5, window=64, latency_window=32)
    n_threads, per_thread = 16, 400
    errors: list[BaseException] = []
    start = threading.Barrier(n_threads + 1)

    def feed(worker: int) -> None:
        start.wait()
        try:
            for i in range(per_thread):
                escalated = (worker + i) % 4 == 0
                stats.record({
                    "decision": "cloud" if escalated else "local",
                    "reason": "low_confidence" if escalated else "confident",
                    "escalated": escalated, "cost_usd": 0.001 if escalated else 0.0,
                    "all_cloud_cost_usd": 0.001, "latency_s": {"total": 0.1 + i / 1000},
                    "usage": {"local": {"input_tokens": 2, "output_tokens": 1}},
                    **({"cloud_error": "ThrottlingException: slow"} if i % 50 == 0 else {}),
                })  # fmt: skip
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)

    def watch() -> None:
        start.wait()
        for _ in range(200):
            snap = stats.snapshot()
            # Each snapshot is taken under one lock: its counters agree with each other.
            if snap["local"] + snap["cloud"] != snap["calls"] or sum(
                snap["by_reason"].values()
            ) != snap["calls"]:
                errors.append(AssertionError(f"inconsistent snapshot {snap}"))

    threads = [threading.Thread(target=feed, args=(w,)) for w in range(n_threads)]
    watcher = threading.Thread(target=watch)
    for thread in (*threads, watcher):
        thread.start()
    for thread in (*threads, watcher):
        thread.join()
    assert errors == []
    total = n_threads * per_thread
    s = stats.snapshot()
    assert s["calls"] == total and s["escalated"] == total // 4 and s["cloud"] == total // 4
    assert s["by_reason"] == {"low_confidence": total // 4, "confident": total - total // 4}
    assert s["errors"] == {"cloud:ThrottlingException": n_threads * (per_thread // 50)}
    assert s["tokens"]["local"] == {"input": 2 * total, "output": total}
    assert s["cost_usd"] == pytest.approx(0.001 * (total // 4))
    assert s["savings_calls"] == total and s["latency_s"]["all"]["n"] == 32


# -- OpenTelemetrySink: odd records --------------------------------------------------------------


@pytest.mark.parametrize("total", [1e300, HUGE, math.inf], ids=["1e300", "10**400", "inf"])
def test_otel_span_is_emitted_for_an_absurd_total_latency(total, telemetry):
    # Before: int(1e300 * 1e9) raised OverflowError (and 10**400 did already in _number): no
    # span, no metrics, and in a MultiSink the call was missing from this exporter.
    sink = telemetry.sink()
    sink.record({"decision": "local", "reason": "confident", "latency_s": {"total": total}})
    (span,) = telemetry.finished()
    assert 0 <= span.start_time <= span.end_time
    assert telemetry.total("confidence_router.calls") == 1


def test_otel_negative_total_latency_never_starts_the_span_after_it_ends(telemetry):
    telemetry.sink().record({"decision": "local", "latency_s": {"total": -5.0}})
    (span,) = telemetry.finished()
    # Before: start = end - int(-5e9), five seconds after the end.
    assert span.start_time == span.end_time
    assert span.attributes["confidence_router.latency.total_s"] == -5.0


@pytest.mark.parametrize(
    ("extra", "retries"),
    [({"cloud_attempts": 10**12}, 10**12 - 1),
     ({"cloud_retries": [{"kind": "throttled"}] * 300}, 300)],
    ids=["attempt-count", "retry-list"],
)  # fmt: skip
def test_otel_absurd_retry_counts_are_counted_without_building_every_event(extra, retries, telemetry):
    # Before: one event dict per retry was built (twice: for the span and for the metric), so
    # cloud_attempts=10**12 never returned (memory); the SDK keeps 128 events anyway (the
    # latest ones: a 300-entry list showed attempts 173..300, not the first retries).
    telemetry.sink().record({"decision": "cloud", "escalated": True, **extra})
    (span,) = telemetry.finished()
    assert len(span.events) == 128
    assert span.events[0].attributes["confidence_router.retry.attempt"] == 1
    assert telemetry.total("confidence_router.cloud.retries") == retries


# -- run annotation --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value", [math.nan, math.inf, -math.inf, HUGE, "1.5", True],
    ids=["nan", "inf", "-inf", "10**400", "str", "bool"],
)
def test_run_metadata_keeps_only_finite_latencies(value):
    # Documented: "Only scalar (str, bool, int, finite float) facts are kept". Before: a NaN or
    # infinite latency was kept (LangSmith's JSON has no NaN) and 10**400 raised OverflowError.
    meta = routing_run_metadata({"decision": "local", "latency_s": {"local": 0.25,
                                                                   "total": value}})
    assert meta == {"routing_decision": "local", "routing_local_latency_s": 0.25}


class _Collect(BaseTracer):
    def __init__(self) -> None:
        super().__init__()
        self.runs: list = []

    def _persist_run(self, run) -> None:
        self.runs.append(run)


class _AnnotateOddRecord(BaseCallbackHandler):
    """On the router's end, annotate its run with a distorted copy of the real record."""

    def __init__(self, tracer: _Collect, distort) -> None:
        self.tracer, self.distort, self.annotated = tracer, distort, []

    def on_llm_end(self, response, *, run_id, **kwargs):
        record = self.distort(dict(response.llm_output["routing"]))
        self.annotated.append(annotate_run([self.tracer], run_id, record))


@pytest.mark.parametrize(
    "distort",
    [
        lambda r: {**r, "models": ["scripted-local"]},
        lambda r: {**r, "models": "scripted-local"},
        lambda r: {**r, "decision": ["local"]},
    ],
    ids=["models-list", "models-str", "decision-unhashable"],
)
def test_annotate_run_tolerates_odd_models_and_decision(ollama_chat, ollama_backend, distort):
    # Before: (record["models"] or {}).get(...) raised AttributeError on a list or a string,
    # and a list decision raised TypeError (unhashable) - after the run was half-annotated.
    ollama_backend.add_answer("capital of France", "Paris", logprobs=[-0.05])
    tracer = _Collect()
    annotator = _AnnotateOddRecord(tracer, distort)
    ConfidenceRoutedLLM(local=ollama_chat()).invoke(
        FRANCE, config={"callbacks": [annotator, tracer]}
    )
    (run,) = tracer.runs
    assert annotator.annotated == [1]
    assert run.extra["metadata"]["routing_reason"] == "confident"
    assert "routing:reason=confident" in run.tags
    assert len(ollama_backend.requests) == 1


# -- end to end: every call counted once, whatever its outcome ----------------------------------


def test_every_routed_call_is_counted_once_including_failures(
    ollama_chat, bedrock_chat, ollama_backend, bedrock_server, telemetry):
    ollama_backend.add_answer("capital of France", "Paris", logprobs=[-0.05])
    ollama_backend.add_answer("Kenya", "Jomo Kenyatta was", logprobs=[-2.0, -3.1, -2.6])
    ollama_backend.fail(BROKEN, status=500)
    bedrock_server.fail("Kenya", "ServiceUnavailableException", times=2)
    bedrock_server.add_answer("Kenya", "Daniel arap Moi", input_tokens=11, output_tokens=4)
    bedrock_server.add_answer("broken", "a cloud answer", input_tokens=9, output_tokens=3)

    stats = RoutingStats()
    calibrator = RollingQuantileThreshold(target_rate=0.5, window=10, min_samples=10)
    sink = MultiSink(stats, telemetry.sink())
    local_only = ConfidenceRoutedLLM(local=ollama_chat(), stats=sink, calibrator=calibrator)
    routed = ConfidenceRoutedLLM(
        local=ollama_chat(), cloud=bedrock_chat(), stats=sink, calibrator=calibrator,
        cloud_retry=FAST_RETRY,
    )  # fmt: skip

    assert local_only.invoke(FRANCE).content == "Paris"
    with pytest.raises(LocalModelError) as local_failure:
        local_only.invoke(BROKEN)
    with pytest.raises(CloudEscalationError):  # two transient failures use both attempts
        routed.invoke(KENYA)
    assert routed.invoke(KENYA).content == "Daniel arap Moi"  # the failure rule is used up
    assert routed.invoke(BROKEN).content == "a cloud answer"  # the local failure escalates

    s = stats.snapshot()
    assert s["calls"] == 5 and len(telemetry.finished()) == 5
    assert telemetry.total("confidence_router.calls") == 5
    # A failed call counts under the tier that failed last (the record's decision).
    assert (s["local"], s["cloud"], s["escalated"]) == (2, 3, 3)
    # Both calls that raised are error spans; the served ones are not.
    spans = telemetry.finished()
    failed = [span.attributes.get("error.type") for span in spans]
    kind = local_failure.value.routing["local_error_kind"]
    assert failed == [None, kind, "transient", None, None]
    assert [span.status.status_code.name for span in spans] == [
        "UNSET", "ERROR", "ERROR", "UNSET", "UNSET"
    ]
    assert s["errors"]["local:" + local_failure.value.routing["local_error_kind"]] == 2
    assert s["errors"]["cloud:transient"] == 1
    assert sum(s["by_reason"].values()) == 5
    # Only the three calls with a local score reached the calibrator; failures did not.
    assert calibrator.n_known == 3 and calibrator.n_unknown == 0
    # What the fake servers received: every local call once, every cloud attempt once.
    assert len(ollama_backend.requests) == 5
    assert len(bedrock_server.requests) == 4  # 2 failed attempts, 1 answer, 1 escalation


def test_a_failed_precheck_is_counted_by_its_classified_kind_like_the_tiers(
    ollama_chat, ollama_backend
):
    # Before: "precheck:ResponseError" (the class name) next to "local:transient" for the very
    # same failure, because the pre-check's recorded error_kind was ignored.
    def probe_request(request) -> bool:
        return "Respond with exactly one token" in request.messages[-1]["content"]

    ollama_backend.fail(probe_request, status=500, message="probe exploded")
    ollama_backend.add_answer("capital of France", "Paris", logprobs=[-0.05])
    ollama_backend.fail(BROKEN, status=500)
    stats = RoutingStats()
    local = ollama_chat()
    router = ConfidenceRoutedLLM(
        local=local, precheck=SelfAssessmentProbe(model=local), precheck_threshold=0.5,
        stats=stats,
    )  # fmt: skip
    routing = router.invoke(FRANCE).response_metadata["routing"]
    with pytest.raises(LocalModelError) as failure:
        router.invoke(BROKEN)
    kind = routing["precheck"]["error_kind"]
    assert failure.value.routing["precheck"]["error_kind"] == kind
    assert stats.snapshot()["errors"] == {
        f"precheck:{kind}": 2,
        f"local:{failure.value.routing['local_error_kind']}": 1,
    }
    assert stats.snapshot()["calls"] == 2
    assert len(ollama_backend.requests) == 4  # two probes, two answers


def test_concurrent_async_and_threaded_calls_are_each_counted_once(
    ollama_chat, bedrock_chat, ollama_backend, bedrock_server, telemetry):
    ollama_backend.add_answer("capital of France", "Paris", logprobs=[-0.05])
    ollama_backend.add_answer("Kenya", "Jomo Kenyatta was", logprobs=[-2.0, -3.1, -2.6])
    ollama_backend.fail(BROKEN, status=500)
    bedrock_server.add_answer("Kenya", "Daniel arap Moi", input_tokens=11, output_tokens=4)
    bedrock_server.add_answer("broken", "a cloud answer", input_tokens=9, output_tokens=3)
    stats = RoutingStats()
    calibrator = RollingQuantileThreshold(target_rate=0.5, window=1000, min_samples=1000)
    router = ConfidenceRoutedLLM(
        local=ollama_chat(), cloud=bedrock_chat(), stats=[stats, telemetry.sink()],
        calibrator=calibrator,
    )  # fmt: skip
    questions = [FRANCE, KENYA, BROKEN] * 8
    asyncio.run(router.abatch(questions, config={"max_concurrency": 8}))
    router.batch(questions, config={"max_concurrency": 6})

    s = stats.snapshot()
    assert s["calls"] == 48 and len(telemetry.finished()) == 48
    assert telemetry.total("confidence_router.calls") == 48
    assert (s["local"], s["cloud"], s["escalated"]) == (16, 32, 32)
    assert s["by_reason"] == {"confident": 16, "low_confidence": 16, "local_error": 16}
    assert sum(s["errors"].values()) == 16 and all(k.startswith("local:") for k in s["errors"])
    # Calls with a local score (FRANCE, KENYA) reached the calibrator; local failures did not.
    assert calibrator.n_known == 32 and calibrator.realised_rate == 0.5
    assert len(ollama_backend.requests) == 48 and len(bedrock_server.requests) == 32
