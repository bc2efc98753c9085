"""Shared fixtures of the observability tests."""

from __future__ import annotations

import pytest


class Telemetry:
    """An SDK tracer provider and meter provider that keep everything in memory."""

    def __init__(self) -> None:
        # The OpenTelemetry SDK (a dev dependency) is imported only by tests that use it.
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import InMemoryMetricReader
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

        self.spans = InMemorySpanExporter()
        self.tracer_provider = TracerProvider()
        self.tracer_provider.add_span_processor(SimpleSpanProcessor(self.spans))
        self.reader = InMemoryMetricReader()
        self.meter_provider = MeterProvider(metric_readers=[self.reader])

    def sink(self, **kwargs):
        from confidence_router.otel import OpenTelemetrySink

        return OpenTelemetrySink(
            tracer_provider=self.tracer_provider, meter_provider=self.meter_provider, **kwargs
        )

    def finished(self):
        from confidence_router.otel import SPAN_NAME

        return [s for s in self.spans.get_finished_spans() if s.name == SPAN_NAME]

    def points(self, name: str) -> list:
        data = self.reader.get_metrics_data()
        found = []
        for resource in data.resource_metrics if data else ():
            for scope in resource.scope_metrics:
                for metric in scope.metrics:
                    if metric.name == name:
                        found.extend(metric.data.data_points)
        return found

    def total(self, name: str, **attributes) -> float:
        return sum(
            p.value
            for p in self.points(name)
            if all(p.attributes.get(k) == v for k, v in attributes.items())
        )


@pytest.fixture
def telemetry():
    return Telemetry()


