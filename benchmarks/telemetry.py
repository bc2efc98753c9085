"""What observability costs per routed call, in one run: each stats sink's ``record()`` time on
real routing records, and the ratio to a routed call on the test bed.

Sinks: ``RoutingStats`` (in-process counters), ``OpenTelemetrySink`` with the real SDK (a
batch span processor into an in-memory exporter, and a metric reader), both behind a
``MultiSink``, and ``routing_run_metadata`` + ``routing_run_tags`` (what the router adds to
its LangSmith run). The records come from real routed calls (one kept, one escalated) through
ChatOllama / ChatBedrockConverse on the scripted test bed.

    python benchmarks/telemetry.py [--records 20000]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

from langchain_aws import ChatBedrockConverse
from langchain_ollama import ChatOllama
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from confidence_router import ConfidenceRoutedLLM, MultiSink, RoutingStats
from confidence_router.otel import OpenTelemetrySink
from confidence_router.telemetry import routing_run_metadata, routing_run_tags
from confidence_router.testing import FakeBedrockServer, OllamaCompatibleServer, ScriptedBackend

SONNET = "us.anthropic.claude-sonnet-4-5-20250929-v1:0"


def routed_records(n_calls: int) -> tuple[list[dict], float]:
    """Two real records (kept, escalated) and the median routed-call latency on the test bed."""
    for name, value in (
        ("AWS_ACCESS_KEY_ID", "test"),
        ("AWS_SECRET_ACCESS_KEY", "test"),
        ("AWS_EC2_METADATA_DISABLED", "true"),
        ("NO_PROXY", "127.0.0.1"),
    ):
        os.environ.setdefault(name, value)
    backend = ScriptedBackend()
    backend.add_answer("France", "Paris", logprobs=-0.05)
    backend.add_answer("Kenya", "Jomo Kenyatta", logprobs=-2.5)
    with OllamaCompatibleServer(backend) as ollama, FakeBedrockServer() as bedrock:
        bedrock.add_answer("Kenya", "Daniel arap Moi", input_tokens=11, output_tokens=4)
        router = ConfidenceRoutedLLM(
            local=ChatOllama(model="scripted-local", base_url=ollama.url),
            cloud=ChatBedrockConverse(
                model=SONNET, region_name="us-east-1", endpoint_url=bedrock.url, max_retries=0
            ),
        )
        records = [
            router.invoke(q).response_metadata["routing"]
            for q in ("Capital of France?", "President of Kenya?")
        ]
        timings = []
        for _ in range(n_calls):
            started = time.perf_counter()
            router.invoke("Capital of France?")
            timings.append(time.perf_counter() - started)
    return records, statistics.median(timings)


def per_record(record_fn, records: list[dict], n: int) -> float:
    started = time.perf_counter()
    for i in range(n):
        record_fn(records[i % len(records)])
    return (time.perf_counter() - started) / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=20000)
    parser.add_argument("--calls", type=int, default=50)
    args = parser.parse_args()

    records, call_s = routed_records(args.calls)
    exporter = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(BatchSpanProcessor(exporter))
    meter_provider = MeterProvider(metric_readers=[InMemoryMetricReader()])
    otel = OpenTelemetrySink(tracer_provider=tracer_provider, meter_provider=meter_provider)
    stats = RoutingStats()
    sinks = {
        "RoutingStats.record": stats.record,
        "OpenTelemetrySink.record": otel.record,
        "MultiSink(stats, otel).record": MultiSink(RoutingStats(), otel).record,
        "routing_run_metadata + tags": lambda r: (routing_run_metadata(r), routing_run_tags(r)),
    }
    print(f"routed call on the test bed (median of {args.calls}): {call_s * 1e3:.3f} ms")
    baseline = None
    for name, fn in sinks.items():
        seconds = per_record(fn, records, args.records)
        baseline = baseline or seconds
        print(
            f"{name:32s} {seconds * 1e6:8.1f} us/record   "
            f"x{seconds / baseline:5.1f} RoutingStats   "
            f"{seconds / call_s * 100:6.2f}% of a routed call"
        )
    tracer_provider.shutdown()
    meter_provider.shutdown()


if __name__ == "__main__":
    main()
