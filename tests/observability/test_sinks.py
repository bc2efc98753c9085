"""MultiSink and as_sink: fan a routing record out to several stats sinks."""

from __future__ import annotations

import logging

import pytest

from confidence_router import MultiSink, RoutingConfigError, RoutingStats
from confidence_router.stats import as_sink


def test_multisink_feeds_every_sink_in_order():
    seen: list[str] = []

    class Named:
        def __init__(self, name: str) -> None:
            self.name = name

        def record(self, routing):
            seen.append(f"{self.name}:{routing['decision']}")

    sink = MultiSink(Named("a"), Named("b"))
    sink.record({"decision": "cloud"})
    assert seen == ["a:cloud", "b:cloud"]
    assert repr(sink) == "MultiSink(Named, Named)"


def test_a_failing_sink_is_logged_and_skipped(caplog):
    class Broken:
        def record(self, routing):
            raise ValueError("boom")

    stats = RoutingStats()
    with caplog.at_level(logging.ERROR, logger="confidence_router"):
        MultiSink(Broken(), stats).record({"decision": "local", "reason": "confident"})
    assert stats.snapshot()["calls"] == 1
    (record,) = [r for r in caplog.records if "Broken" in r.getMessage()]
    assert record.exc_info[0] is ValueError


def test_as_sink_accepts_none_one_sink_or_a_list():
    stats, other = RoutingStats(), RoutingStats()
    assert as_sink(None) is None
    assert as_sink(stats) is stats
    assert as_sink([stats]) is stats
    fanned = as_sink([stats, other])
    assert isinstance(fanned, MultiSink) and fanned.sinks == (stats, other)
    fanned.record({"decision": "local"})
    assert stats.snapshot()["calls"] == other.snapshot()["calls"] == 1


@pytest.mark.parametrize("value", ["stats", 3, [RoutingStats(), "x"], []])
def test_as_sink_rejects_non_sinks(value):
    with pytest.raises(RoutingConfigError):
        as_sink(value)


# -- needs the router to normalise ``stats=`` with as_sink (see the report) -------------------


def test_router_accepts_a_list_of_sinks(ollama_chat, ollama_backend):
    from confidence_router import ConfidenceRoutedLLM

    ollama_backend.add_answer("France", "Paris", logprobs=-0.05)
    first, second = RoutingStats(), RoutingStats()
    router = ConfidenceRoutedLLM(local=ollama_chat(), stats=[first, second])
    router.invoke("Capital of France?")
    assert first.snapshot()["calls"] == second.snapshot()["calls"] == 1
    # Construction errors surface as ValueError (RoutingConfigError, or pydantic's wrapper).
    with pytest.raises(ValueError, match="stats"):
        ConfidenceRoutedLLM(local=ollama_chat(), stats="not a sink")
