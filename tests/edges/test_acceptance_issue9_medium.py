"""Acceptance audit of issue 9 ("Router core v2"), its medium/low items and its structure items,
written from the issue text and the README as an outside test writer would: other inputs than
the project's own tests, every entry point, and the requests the fake servers received counted.

Sections: unknown knobs (kwargs, fields, environment), timeouts, ``on_unknown="local"``, blank
answers, statistics on failed calls, the privacy guard's variants, event loops, empty input,
the Ollama-compatible server under load, passwords in URLs, the error tree, and structure
(references, import graph, private imports, the knobs declared once).
"""

from __future__ import annotations

import ast
import asyncio
import importlib
import inspect
import json
import logging
import math
import pkgutil
import re
import socket
import sqlite3
from concurrent.futures import ThreadPoolExecutor
from dataclasses import fields as dataclass_fields
from pathlib import Path

import pytest
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompt_values import ChatPromptValue, StringPromptValue
from pydantic import BaseModel

import confidence_router
from confidence_router import ConfidenceRoutedLLM
from confidence_router.budget import CloudBudget
from confidence_router.errors import (
    BudgetExceededError,
    CloudEscalationError,
    ConfidenceRouterError,
    InvalidInputError,
    LocalModelError,
    RoutingConfigError,
)
from confidence_router.guards import PIIGuard
from confidence_router.policy import DEFAULT_POLICY, RoutingPolicy
from confidence_router.record import Reason
from confidence_router.retry import RetryPolicy
from confidence_router.settings import RouterSettings, redact_url
from confidence_router.stats import RoutingStats
from confidence_router.testing import OllamaCompatibleServer, ScriptedBackend

REPO = Path(__file__).resolve().parents[2]
SRC = REPO / "src" / "confidence_router"
NO_RETRY = RetryPolicy(max_attempts=1)
SONNET = "us.anthropic.claude-sonnet-4-5-20250929-v1:0"


@pytest.fixture
def router(ollama_chat, bedrock_chat, ollama_backend, bedrock_server):
    ollama_backend.set_default("Paris", logprobs=-0.05)  # confident: kept at 0.7
    bedrock_server.set_default("cloud answer")
    return ConfidenceRoutedLLM(local=ollama_chat(), cloud=bedrock_chat(max_tokens=40),
                               cloud_retry=NO_RETRY)


def _chat_requests(ollama_server) -> int:
    return len(ollama_server.requests_to("/api/chat"))


def _nothing_sent(ollama_server, bedrock_server) -> None:
    assert ollama_server.requests == [], ollama_server.requests
    assert bedrock_server.requests == [], bedrock_server.requests


# =============================================================================================
# 1. unknown knobs: call kwargs on every entry point, constructor fields, environment
# =============================================================================================

MISSPELT = {
    "allow_escalaton": False,   # the example
    "Threshold": 0.99,          # wrong case
    "on-unknown": "local",      # a dash
    "early_exit_": True,        # trailing underscore
    "temprature": 0.0,          # a tier kwarg, misspelt
}


def _lookup(city: str) -> str:
    """Look a city up."""
    return city


class _Capital(BaseModel):
    country: str
    capital: str


async def test_misspelt_kwargs_on_every_entry_point_send_nothing(router, ollama_server,
                                                                 bedrock_server):
    chain = router | StrOutputParser()
    for name, value in MISSPELT.items():
        kw = {name: value}
        sync_calls = {
            "invoke": lambda kw=kw: router.invoke("capital of France?", **kw),
            "stream": lambda kw=kw: list(router.stream("capital of France?", **kw)),
            "batch": lambda kw=kw: router.batch(["a?", "b?"], **kw),
            "batch_as_completed": lambda kw=kw: list(router.batch_as_completed(["a?"], **kw)),
            "bind": lambda kw=kw: router.bind(**kw).invoke("capital of France?"),
            "bind then bind": lambda kw=kw: router.bind(threshold=0.5).bind(**kw).invoke("x?"),
            "chain kwargs": lambda kw=kw: chain.invoke("capital of France?", **kw),
            "with_config then kwargs": lambda kw=kw: router.with_config(tags=["t"]).invoke("x?", **kw),
            "with_retry": lambda kw=kw: router.with_retry(stop_after_attempt=2).invoke("x?", **kw),
            "bind_tools kwargs": lambda kw=kw: router.bind_tools([_lookup], **kw).invoke("x?"),
            "bind_tools then call": lambda kw=kw: router.bind_tools([_lookup]).invoke("x?", **kw),
            "structured output": lambda kw=kw: router.with_structured_output(
                _Capital, method="json_schema").invoke("x?", **kw),
        }
        for entry, call in sync_calls.items():
            with pytest.raises(RoutingConfigError):
                call()
                pytest.fail(f"{entry} accepted {name}")
        with pytest.raises(RoutingConfigError):
            await router.ainvoke("capital of France?", **kw)
        with pytest.raises(RoutingConfigError):
            [c async for c in router.astream("capital of France?", **kw)]
        with pytest.raises(RoutingConfigError):
            await router.abatch(["a?", "b?"], **kw)
        with pytest.raises(RoutingConfigError):
            await chain.ainvoke("capital of France?", **kw)
    _nothing_sent(ollama_server, bedrock_server)


def test_batch_with_return_exceptions_still_refuses_a_misspelt_knob(router, ollama_server,
                                                                    bedrock_server):
    out = router.batch(["a?", "b?"], return_exceptions=True, allow_escalaton=False)
    assert all(isinstance(item, RoutingConfigError) for item in out), out
    _nothing_sent(ollama_server, bedrock_server)


@pytest.mark.parametrize(
    ("field", "closest"),
    [("allow_escalaton", "allow_escalation"), ("treshold", "threshold"),
     ("local_timout", "local_timeout"), ("escalation_gaurd", "escalation_guard"),
     ("cloud_retires", "cloud_retry"), ("on_budget_exceded", "on_budget_exceeded"),
     ("Signal", "signal")],
)
def test_misspelt_constructor_field_names_the_closest_field(ollama_chat, ollama_server, field,
                                                            closest):
    with pytest.raises(RoutingConfigError, match=re.escape(repr(closest))):
        ConfidenceRoutedLLM(local=ollama_chat(), **{field: True})
    assert ollama_server.requests == []


def test_unrelated_unknown_constructor_field_is_refused(ollama_chat):
    with pytest.raises(RoutingConfigError, match="banana"):
        ConfidenceRoutedLLM(local=ollama_chat(), banana=1)


@pytest.mark.parametrize(
    "variable",
    ["CONFIDENCE_ROUTER_ALLOW_ESCALATON", "CONFIDENCE_ROUTER_LOCAL_TIMOUT",
     "CONFIDENCE_ROUTER_ONUNKNOWN", "CONFIDENCE_ROUTER_FOO", "CONFIDENCE_ROUTER_THRESHOLD_"],
)
def test_unknown_environment_variable_in_the_real_environment(monkeypatch, variable,
                                                              ollama_server, bedrock_server):
    monkeypatch.setenv(variable, "0")
    with pytest.raises(RoutingConfigError, match=re.escape(variable)):
        ConfidenceRoutedLLM.from_settings()
    with pytest.raises(RoutingConfigError, match=re.escape(variable)):
        RouterSettings.load()
    _nothing_sent(ollama_server, bedrock_server)


def test_unknown_environment_variable_beats_a_valid_settings_file(tmp_path):
    path = tmp_path / "router.toml"
    path.write_text("threshold = 0.8\n")
    with pytest.raises(RoutingConfigError, match="CONFIDENCE_ROUTER_THRESHLD"):
        RouterSettings.load(path, environ={"CONFIDENCE_ROUTER_THRESHLD": "0.9"})


def test_documented_variables_are_not_taken_for_misspelt_settings():
    """Every ``CONFIDENCE_ROUTER_*`` name the README and docs document is accepted (a
    variable meant for the proxy, the data directory, ... is not an 'unknown setting')."""
    texts = [REPO / "README.md", *(REPO / "docs").glob("*.md")]
    documented = set()
    for text in texts:
        documented |= set(re.findall(r"CONFIDENCE_ROUTER_[A-Z0-9_]*[A-Z0-9]", text.read_text()))
    documented -= {"CONFIDENCE_ROUTER_TRESHOLD"}  # the README's own example of a misspelling
    assert len(documented) > 10
    from confidence_router.settings import check_environment

    check_environment({name: "x" for name in documented})  # no RoutingConfigError


def test_llamaindex_from_settings_refuses_an_unknown_variable():
    pytest.importorskip("llama_index.core")
    from confidence_router.llamaindex import ConfidenceRoutedLlamaIndexLLM

    with pytest.raises(RoutingConfigError, match="CONFIDENCE_ROUTER_ALLOW_ESCALATON"):
        ConfidenceRoutedLlamaIndexLLM.from_settings(
            environ={"CONFIDENCE_ROUTER_ALLOW_ESCALATON": "false"})


# =============================================================================================
# 2. timeouts: only finite numbers of seconds > 0 (or None)
# =============================================================================================

BAD_TIMEOUTS = [math.inf, -math.inf, math.nan, 0, 0.0, -0.0, -1, -1e-9, "5", "inf", True,
                False, b"5", [5], {"seconds": 5}]


@pytest.mark.parametrize("field", ["local_timeout", "cloud_timeout"])
@pytest.mark.parametrize("value", BAD_TIMEOUTS, ids=repr)
def test_bad_timeouts_are_typed_errors_naming_the_field(ollama_chat, cloud_factory, field, value):
    with pytest.raises(RoutingConfigError, match=field):
        ConfidenceRoutedLLM(local=ollama_chat(), cloud=cloud_factory(), **{field: value})


@pytest.mark.parametrize("field", ["local_timeout", "cloud_timeout"])
@pytest.mark.parametrize("value", [math.inf, math.nan, 0, -2, True], ids=repr)
def test_bad_timeouts_in_settings_are_typed_errors(tmp_path, field, value):
    with pytest.raises(RoutingConfigError, match=field):
        RouterSettings(**{field: value})
    env_value = {True: "true"}.get(value, str(value)) if not isinstance(value, bool) else "true"
    with pytest.raises(RoutingConfigError, match=field):
        RouterSettings.from_env({"CONFIDENCE_ROUTER_" + field.upper(): env_value})


@pytest.mark.parametrize("field", ["local_timeout", "cloud_timeout"])
def test_good_timeouts_are_kept(ollama_chat, cloud_factory, field):
    for value in (0.001, 1, 2.5, None):
        router = ConfidenceRoutedLLM(local=ollama_chat(), cloud=cloud_factory(), **{field: value})
        assert getattr(router, field) == value


@pytest.mark.parametrize("field", ["local_timeout", "cloud_timeout"])
@pytest.mark.parametrize("value", [math.inf, math.nan, 0, -1, True], ids=repr)
def test_bad_timeout_assigned_after_construction_is_refused(ollama_chat, cloud_factory, field,
                                                            value):
    router = ConfidenceRoutedLLM(local=ollama_chat(), cloud=cloud_factory(), local_timeout=5,
                                 cloud_timeout=5)
    with pytest.raises(RoutingConfigError, match=field):
        setattr(router, field, value)
    assert getattr(router, field) == 5  # left as it was


# =============================================================================================
# 3. on_unknown="local": the answer is kept AND flagged, on every entry point
# =============================================================================================


@pytest.fixture
def no_logprobs_router(bedrock_chat, bedrock_server, ollama_chat):
    """A local tier that returns no logprobs (a Bedrock model standing in for an old Ollama)."""
    bedrock_server.add_answer(None, "an answer without logprobs", model="local-model")
    bedrock_server.set_default("cloud answer")
    cloud = bedrock_chat(max_tokens=40)
    local = cloud.model_copy(update={"model_id": "local-model"})
    stats = RoutingStats()
    return ConfidenceRoutedLLM(local=local, cloud=cloud, stats=stats, cloud_retry=NO_RETRY), stats


def _cloud_calls(bedrock_server, model: str) -> int:
    return sum(model in json.dumps(r) for r in bedrock_server.requests)


async def test_on_unknown_local_keeps_and_flags_on_every_entry_point(no_logprobs_router,
                                                                      bedrock_server):
    router, stats = no_logprobs_router
    messages = []
    messages.append(router.invoke("q", on_unknown="local"))
    messages.append(await router.ainvoke("q", on_unknown="local"))
    messages.append(_joined(list(router.stream("q", on_unknown="local"))))
    messages.append(_joined([c async for c in router.astream("q", on_unknown="local")]))
    messages.append(router.bind(on_unknown="local").invoke("q"))
    messages.extend(router.batch(["q", "q"], on_unknown="local"))
    for message in messages:
        routing = message.response_metadata["routing"]
        assert message.text == "an answer without logprobs"
        assert routing["decision"] == "local" and routing["reason"] == Reason.CONFIDENCE_UNKNOWN
        assert routing["flagged"] is True and routing["confidence"] is None
        assert routing["escalated"] is False
    assert _cloud_calls(bedrock_server, SONNET.split(":")[0]) == 0  # nothing escalated
    snap = stats.snapshot()
    assert snap["flagged"] == len(messages) and snap["calls"] == len(messages)


def test_on_unknown_local_without_a_cloud_is_flagged_too(bedrock_chat, bedrock_server):
    bedrock_server.set_default("no logprobs")
    router = ConfidenceRoutedLLM(local=bedrock_chat(), on_unknown="local")
    routing = router.invoke("q").response_metadata["routing"]
    assert routing["decision"] == "local" and routing["flagged"] is True
    assert routing["reason"] == Reason.CONFIDENCE_UNKNOWN


def test_on_unknown_escalate_is_the_default_and_escalates(no_logprobs_router, bedrock_server):
    message = no_logprobs_router[0].invoke("q")
    assert message.text == "cloud answer"
    assert message.response_metadata["routing"]["reason"] == Reason.CONFIDENCE_UNKNOWN
    assert len(bedrock_server.requests) == 2  # the local stand-in, then the cloud


def _joined(chunks):
    out = chunks[0]
    for chunk in chunks[1:]:
        out = out + chunk
    return out


# =============================================================================================
# 4. blank answers with logprobs are empty, never confident
# =============================================================================================

BLANK_ANSWERS = {
    "newlines": ["\n", "\n\n"],
    "tabs": ["\t", "\t"],
    "carriage returns": ["\r\n", " "],
    "no-break spaces": ["\u00a0", "\u202f"],
    "ideographic space": ["\u3000"],
    "zero-width space": ["\u200b", "\u200b"],
    "byte order mark": ["\ufeff"],
    "word joiner and zero-width joiner": ["\u2060", "\u200d"],
    "zero-width mixed with spaces": [" ", "\u200b", "\n", "\u200c"],
}


@pytest.mark.parametrize("case", BLANK_ANSWERS)
def test_blank_answer_with_high_logprobs_escalates_as_unknown(router, ollama_backend,
                                                              ollama_server, bedrock_server,
                                                              case):
    ollama_backend.add_answer("blank", BLANK_ANSWERS[case], logprobs=-0.001)
    message = router.invoke("blank please")
    routing = message.response_metadata["routing"]
    assert message.text == "cloud answer", routing
    assert routing["reason"] == Reason.CONFIDENCE_UNKNOWN and routing["confidence"] is None
    assert routing["signals"]["unknown_reason"] == "empty_answer"
    assert _chat_requests(ollama_server) == 1 and len(bedrock_server.requests) == 1


async def test_blank_answer_streams_escalate_too(router, ollama_backend, bedrock_server):
    ollama_backend.add_answer("blank", ["\n", "\t", "\u200b"], logprobs=-0.001)
    streamed = "".join(c.text for c in router.stream("blank please"))
    astreamed = "".join([c.text async for c in router.astream("blank please")])
    assert streamed == astreamed == "cloud answer"
    assert len(bedrock_server.requests) == 2


def test_answer_with_visible_text_between_blanks_is_scored(router, ollama_backend,
                                                           bedrock_server):
    ollama_backend.add_answer("padded", ["\n", "Paris", "\u200b"], logprobs=-0.001)
    routing = router.invoke("padded please").response_metadata["routing"]
    assert routing["reason"] == Reason.CONFIDENT and routing["decision"] == "local"
    assert bedrock_server.requests == []


# =============================================================================================
# 5. statistics count calls that end in an error
# =============================================================================================


async def test_stats_count_every_call_that_ends_in_an_error(ollama_chat, cloud_factory,
                                                            ollama_backend, bedrock_server):
    ollama_backend.fail("local fails", status=500, message="down")
    ollama_backend.set_default("unsure", logprobs=-3.0)
    bedrock_server.fail(None, "ValidationException", message="refused")
    stats = RoutingStats()
    # No cloud: a failing local model is a LocalModelError (all four entry points).
    alone = ConfidenceRoutedLLM(local=ollama_chat(), stats=stats)
    failures = 0
    for call in (lambda: alone.invoke("local fails"),
                 lambda: list(alone.stream("local fails")),
                 lambda: alone.batch(["local fails"])):
        with pytest.raises(LocalModelError):
            call()
        failures += 1
    with pytest.raises(LocalModelError):
        await alone.ainvoke("local fails")
    with pytest.raises(LocalModelError):
        [c async for c in alone.astream("local fails")]
    failures += 2
    # Escalation not allowed: LocalModelError as well.
    with pytest.raises(LocalModelError):
        alone.invoke("local fails", allow_escalation=False)
    failures += 1
    snap = stats.snapshot()
    assert snap["calls"] == failures
    assert snap["by_reason"] == {Reason.LOCAL_ERROR: failures}
    assert sum(snap["errors"].values()) >= failures

    # The cloud fails on an escalation: CloudEscalationError, counted.
    cloud_stats = RoutingStats()
    routed = ConfidenceRoutedLLM(local=ollama_chat(), cloud=cloud_factory(), stats=cloud_stats,
                                 cloud_retry=NO_RETRY)
    with pytest.raises(CloudEscalationError):
        routed.invoke("unsure question")
    with pytest.raises(CloudEscalationError):
        await routed.ainvoke("unsure question")
    with pytest.raises(CloudEscalationError):
        list(routed.stream("unsure question"))
    snap = cloud_stats.snapshot()
    assert snap["calls"] == 3 and len(bedrock_server.requests) == 3
    assert any(kind.startswith("cloud") for kind in snap["errors"]), snap["errors"]


def test_stats_count_budget_refusals_that_raise(ollama_chat, cloud_factory, ollama_backend,
                                                bedrock_server):
    ollama_backend.set_default("unsure", logprobs=-3.0)
    stats = RoutingStats()
    router = ConfidenceRoutedLLM(local=ollama_chat(), cloud=cloud_factory(max_tokens=40),
                                 stats=stats, budget=CloudBudget(max_usd=1e-12),
                                 on_budget_exceeded="raise")
    for call in (lambda: router.invoke("q"), lambda: list(router.stream("q"))):
        with pytest.raises(BudgetExceededError):
            call()
    assert stats.snapshot()["calls"] == 2
    assert stats.snapshot()["by_reason"] == {Reason.BUDGET_EXCEEDED: 2}
    assert bedrock_server.requests == []


def test_stats_count_a_local_timeout_without_a_cloud(ollama_chat, ollama_backend):
    ollama_backend.delay("hang", 2.0)
    ollama_backend.set_default("x", logprobs=-0.1)
    stats = RoutingStats()
    router = ConfidenceRoutedLLM(local=ollama_chat(), stats=stats, local_timeout=0.2)
    with pytest.raises(LocalModelError) as raised:
        router.invoke("hang")
    assert raised.value.routing["local_error_kind"] == "timeout"
    snap = stats.snapshot()
    assert snap["calls"] == 1 and snap["errors"] == {"local:timeout": 1}


# =============================================================================================
# 6. the privacy guard's variants: internationalised emails, IBANs, card numbers
# =============================================================================================

PII_VARIANTS = {
    "Cyrillic email": ("пишите на почта@пример.рф", "email address"),
    "Greek email": ("χρήστης@παράδειγμα.ελ", "email address"),
    "Arabic email": ("راسلني بريد@مثال.مصر", "email address"),
    "Thai email": ("ไปรษณีย์@ตัวอย่าง.ไทย", "email address"),
    "Japanese email, ideographic full stop": ("連絡先: ユーザー@例え。テスト", "email address"),
    "Chinese email, ideographic full stop": ("邮箱 用户@例子。公司 谢谢", "email address"),
    "accented local part, ASCII domain": ("mail zoë.o'brien@example.ie today", "email address"),
    "lower-case compact IBAN (FR)": ("fr1420041010050500013m02606", "IBAN"),
    "lower-case spaced IBAN (GB)": ("my iban is gb29 nwbk 6016 1331 9268 19.", "IBAN"),
    "lower-case spaced IBAN (NO, short)": ("no93 8601 1117 947", "IBAN"),
    "lower-case spaced IBAN (MT, long)": ("mt84 malt 0110 0001 2345 mtlc ast0 01s", "IBAN"),
    "mixed-case IBAN": ("De89 3704 0044 0532 0130 00", "IBAN"),
    "IBAN with double spaces": ("de89  3704  0044  0532  0130  00", "IBAN"),
    "IBAN with no-break spaces": ("de89\u00a03704\u00a00044\u00a00532\u00a00130\u00a000",
                                  "IBAN"),
    "card with dots": ("pay with 5555.5555.5555.4444 please", "credit card number"),
    "card with double spaces": ("5555  5555  5555  4444", "credit card number"),
    "card with double dots": ("4012..8888..8888..1881", "credit card number"),
    "card with dot-space": ("4012. 8888. 8888. 1881", "credit card number"),
    "card mixing separators": ("4012 8888.8888-1881", "credit card number"),
    "Amex with dots": ("3782.822463.10005", "credit card number"),
    "card right after 'no.'": ("Card no.4111 1111 1111 1111", "credit card number"),
    "card at a sentence end": ("It is 4111.1111.1111.1111.", "credit card number"),
}


@pytest.mark.parametrize("case", PII_VARIANTS)
def test_pii_guard_variants(case):
    text, kind = PII_VARIANTS[case]
    assert PIIGuard().find(text) == kind


@pytest.mark.parametrize(
    "text",
    ["version 4.1111.1111.1111", "IP 10.0.0.1 and 192.168.1.1", "the years 1914 1918 1939 1945",
     "ratio 1.5 to 2.5", "meet at 10.30", "ISBN 978-3-16-148410-0", "call it a day",
     "café。コーヒー", "see section 4. Then 1111 more"],
)
def test_pii_guard_variants_do_not_flag_ordinary_text(text):
    assert PIIGuard().find(text) is None


def test_guarded_variants_never_reach_the_cloud(ollama_chat, cloud_factory, ollama_backend,
                                                bedrock_server):
    ollama_backend.set_default("unsure", logprobs=-3.0)
    bedrock_server.set_default("cloud answer")
    router = ConfidenceRoutedLLM(local=ollama_chat(), cloud=cloud_factory(max_tokens=40),
                                 escalation_guard=PIIGuard(), cloud_retry=NO_RETRY)
    for case in ("Cyrillic email", "lower-case spaced IBAN (GB)", "card with double spaces",
                 "card with dots", "lower-case compact IBAN (FR)"):
        routing = router.invoke(PII_VARIANTS[case][0]).response_metadata["routing"]
        assert routing["decision"] == "local" and routing["flagged"] is True, case
        assert routing["escalation_skipped"].startswith("escalation guard:"), case
    assert bedrock_server.requests == []
    assert router.invoke("an obscure question").text == "cloud answer"  # not blanket
    assert len(bedrock_server.requests) == 1


# =============================================================================================
# 7. ainvoke / astream from several event loops
# =============================================================================================


def test_ainvoke_astream_and_abatch_across_fresh_event_loops(router, ollama_server,
                                                             bedrock_server):
    async def one_of_each():
        first = await router.ainvoke("capital of France?")
        chunks = [c async for c in router.astream("capital of France?")]
        many = await router.abatch(["capital of France?"] * 3)
        return [first, _joined(chunks), *many]

    for _ in range(3):
        for message in asyncio.run(one_of_each()):
            routing = message.response_metadata["routing"]
            assert message.text == "Paris"
            assert routing["decision"] == "local" and routing["reason"] == Reason.CONFIDENT
    assert _chat_requests(ollama_server) == 3 * 5
    assert bedrock_server.requests == []


def test_ainvoke_from_threads_each_with_its_own_loop(router, ollama_server, bedrock_server):
    def worker(_):
        return [asyncio.run(router.ainvoke("capital of France?")) for _ in range(2)]

    with ThreadPoolExecutor(max_workers=4) as pool:
        results = [m for batch in pool.map(worker, range(4)) for m in batch]
    assert [m.response_metadata["routing"]["decision"] for m in results] == ["local"] * 8
    assert _chat_requests(ollama_server) == 8 and bedrock_server.requests == []


@pytest.mark.parametrize("cloud_class", ["converse", "invoke"])
def test_escalation_works_from_a_later_loop_after_a_sync_call(ollama_chat, bedrock_chat,
                                                              bedrock_invoke_chat,
                                                              ollama_backend, bedrock_server,
                                                              cloud_class):
    ollama_backend.set_default("Paris", logprobs=-0.05)
    bedrock_server.set_default("cloud answer")
    cloud = (bedrock_chat if cloud_class == "converse" else bedrock_invoke_chat)(max_tokens=40)
    router = ConfidenceRoutedLLM(local=ollama_chat(), cloud=cloud, cloud_retry=NO_RETRY)
    ollama_backend.add_answer("Kenya", "Jomo", logprobs=-3.0)
    assert router.invoke("capital of France?").text == "Paris"
    assert asyncio.run(router.ainvoke("capital of France?")).text == "Paris"
    assert asyncio.run(router.ainvoke("second president of Kenya?")).text == "cloud answer"
    assert asyncio.run(router.ainvoke("second president of Kenya?")).text == "cloud answer"
    chunks = asyncio.run(_collect(router.astream("second president of Kenya?")))
    assert "".join(c.text for c in chunks) == "cloud answer"
    assert len(bedrock_server.requests) == 3


async def _collect(stream):
    return [chunk async for chunk in stream]


# =============================================================================================
# 8. empty or invalid input: a typed error before any request
# =============================================================================================

EMPTY_OR_INVALID = {
    "None": None,
    "an int": 7,
    "a float": 1.5,
    "bytes": b"capital of France?",
    "a dict without content": {"role": "user"},
    "a set": {"hi"},
    "only a blank system message": [SystemMessage("  \n")],
    "blank AI and human turns": [AIMessage("\t"), HumanMessage("\n")],
    "blank tuple": [("human", "   ")],
    "empty chat prompt value": ChatPromptValue(messages=[]),
    "blank string prompt value": StringPromptValue(text=" \t "),
    "a list of None": [None, None],
    "blank text blocks": [HumanMessage(content=[{"type": "text", "text": " "},
                                                {"type": "text", "text": "\n"}])],
}


async def test_empty_or_invalid_input_is_typed_before_any_request(router, ollama_server,
                                                                  bedrock_server):
    for case, bad in EMPTY_OR_INVALID.items():
        for call in (lambda b=bad: router.invoke(b), lambda b=bad: list(router.stream(b)),
                     lambda b=bad: router.batch([b])):
            with pytest.raises(ConfidenceRouterError):
                call()
                pytest.fail(case)
        with pytest.raises(ConfidenceRouterError):
            await router.ainvoke(bad)
        with pytest.raises(ConfidenceRouterError):
            [c async for c in router.astream(bad)]
    _nothing_sent(ollama_server, bedrock_server)


def test_blank_input_is_invalid_input_not_just_any_error(router, ollama_server, bedrock_server):
    for bad in ("", " ", "\n\t", [SystemMessage(" ")], ChatPromptValue(messages=[])):
        with pytest.raises(InvalidInputError):
            router.invoke(bad)
    _nothing_sent(ollama_server, bedrock_server)


@pytest.mark.parametrize("bad", ["\u200b", "\u200b \ufeff\n", "\u2060\u200d"], ids=repr)
def test_invisible_only_input_is_invalid_input(router, ollama_server, bedrock_server, bad):
    with pytest.raises(InvalidInputError):
        router.invoke(bad)
    _nothing_sent(ollama_server, bedrock_server)


def test_system_message_with_text_is_something_to_answer(router, ollama_server, bedrock_server):
    assert router.invoke([SystemMessage("Greet the user.")]).text == "Paris"
    assert _chat_requests(ollama_server) == 1 and bedrock_server.requests == []


def test_llamaindex_blank_input_is_typed_before_any_request(router, ollama_server,
                                                            bedrock_server):
    pytest.importorskip("llama_index.core")
    from llama_index.core.llms import ChatMessage

    from confidence_router.llamaindex import ConfidenceRoutedLlamaIndexLLM

    llm = ConfidenceRoutedLlamaIndexLLM(router=router)
    for call in (lambda: llm.chat([]), lambda: llm.chat([ChatMessage(role="user", content=" ")]),
                 lambda: llm.complete("\n\t"), lambda: llm.stream_complete("  "),
                 lambda: llm.complete(None)):
        with pytest.raises(ConfidenceRouterError):
            call()
    _nothing_sent(ollama_server, bedrock_server)


# =============================================================================================
# 9. the Ollama-compatible server never drops a connection
# =============================================================================================


def test_raw_connection_burst_is_answered_not_dropped():
    """300 sockets connect at once, then each sends a request: every one gets an HTTP status
    line (200, or 503 past capacity), none is reset or left without an answer."""
    backend = ScriptedBackend()
    backend.set_default("ok", logprobs=-0.1, latency=0.02)
    body = json.dumps({"model": "scripted-local", "stream": False,
                       "messages": [{"role": "user", "content": "q"}]}).encode()
    request = (b"POST /api/chat HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
               b"Connection: close\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n"
               + body)
    with OllamaCompatibleServer(backend) as server:
        sockets = [socket.create_connection(("127.0.0.1", server.port), timeout=30)
                   for _ in range(300)]
        try:
            for sock in sockets:
                sock.sendall(request)
            statuses = []
            for sock in sockets:
                data = b""
                while b"\r\n" not in data:
                    part = sock.recv(4096)
                    if not part:
                        break
                    data += part
                statuses.append(data.split(b" ", 2)[1] if data.startswith(b"HTTP/") else data)
        finally:
            for sock in sockets:
                sock.close()
    assert len(statuses) == 300
    assert set(statuses) <= {b"200", b"503"}, set(statuses)
    assert statuses.count(b"200") == len(server.requests_to("/api/chat"))


def test_keep_alive_clients_and_streams_under_concurrency_all_answered():
    import ollama

    backend = ScriptedBackend()
    backend.add_answer(None, ["a", "b", "c"], logprobs=-0.1, token_delay=0.005)
    with OllamaCompatibleServer(backend) as server:
        clients = [ollama.Client(host=server.url, timeout=60) for _ in range(16)]

        def one(i: int) -> str:
            client = clients[i % len(clients)]
            if i % 2:
                parts = client.chat(model="scripted-local", stream=True,
                                    messages=[{"role": "user", "content": f"q{i}"}])
                return "".join(p.message.content for p in parts)
            return client.chat(model="scripted-local",
                               messages=[{"role": "user", "content": f"q{i}"}]).message.content

        with ThreadPoolExecutor(max_workers=48) as pool:
            answers = list(pool.map(one, range(192)))
    assert answers == ["abc"] * 192
    assert len(server.requests_to("/api/chat")) == 192


# =============================================================================================
# 10. a password in the Ollama URL is never saved, stored or logged
# =============================================================================================

SECRET = "s3cr3t-Pa55"


@pytest.mark.parametrize(
    "url",
    [f"http://admin:{SECRET}@gpu-box:11434", f"https://admin:{SECRET}@gpu-box",
     f"http://admin:{SECRET}@[::1]:11434", f"http://admin:{SECRET}@10.0.0.5:11434/ollama",
     f"http://:{SECRET}@gpu-box:11434", f"http://admin:{SECRET}@gpu-box:notaport",
     f"http://admin:{SECRET}@[::1", f"http://admin%40corp:{SECRET}@gpu-box:11434"],
)
def test_redacted_url_never_holds_the_password(url):
    redacted = redact_url(url)
    assert SECRET not in redacted
    assert "***" in redacted


def test_redaction_keeps_a_usable_url_for_ipv6_hosts():
    assert redact_url(f"http://admin:{SECRET}@[::1]:11434") == "http://admin:***@[::1]:11434"
    assert redact_url("http://gpu-box:11434") == "http://gpu-box:11434"
    assert redact_url("http://admin@gpu-box:11434") == "http://admin@gpu-box:11434"


@pytest.mark.parametrize(
    "host",
    [f"http://admin:{SECRET}@gpu-box:11434", f"http://admin:{SECRET}@[::1]:11434",
     f"http://admin:{SECRET}@gpu-box:notaport", f"http://admin:{SECRET}@[fe80::1"],
)
def test_saved_settings_never_hold_the_password(tmp_path, host):
    path = tmp_path / "router.json"
    RouterSettings(ollama_host=host).save(path)
    assert SECRET not in path.read_text()
    assert SECRET not in json.dumps(RouterSettings(ollama_host=host).to_dict())


def test_router_to_settings_round_trip_never_holds_the_password(tmp_path, ollama_server,
                                                                bedrock_chat):
    from langchain_ollama import ChatOllama

    url = ollama_server.url.replace("http://", f"http://admin:{SECRET}@")
    router = ConfidenceRoutedLLM(local=ChatOllama(model="scripted-local", base_url=url),
                                 cloud=bedrock_chat(max_tokens=40))
    path = tmp_path / "router.json"
    router.to_settings().save(path)
    assert SECRET not in path.read_text()


def test_routing_records_and_logs_never_hold_the_password(ollama_backend, ollama_server,
                                                          bedrock_chat, bedrock_server, caplog):
    from langchain_ollama import ChatOllama

    ollama_backend.add_answer("France", "Paris", logprobs=-0.01)
    ollama_backend.set_default("unsure", logprobs=-3.0)
    bedrock_server.set_default("cloud")
    url = ollama_server.url.replace("http://", f"http://admin:{SECRET}@")
    stats = RoutingStats()
    router = ConfidenceRoutedLLM(local=ChatOllama(model="scripted-local", base_url=url),
                                 cloud=bedrock_chat(max_tokens=40), stats=stats)
    with caplog.at_level(logging.DEBUG, logger="confidence_router"):
        records = [router.invoke("capital of France?").response_metadata["routing"],
                   router.invoke("obscure?").response_metadata["routing"]]
    assert _chat_requests(ollama_server) == 2  # the password URL worked
    assert SECRET not in json.dumps(records, default=str)
    assert SECRET not in json.dumps(stats.snapshot(), default=str)
    assert SECRET not in caplog.text


def test_evaluation_database_never_holds_the_password(ollama_backend, ollama_server, tmp_path):
    from langchain_ollama import ChatOllama

    from confidence_router.evaluation.datasets import QAItem
    from confidence_router.evaluation.runner import EvalRunner

    ollama_backend.add_answer("France", " Paris", logprobs=-0.2)
    ollama_backend.fail("explodes", status=500, message="crashed")
    url = ollama_server.url.replace("http://", f"http://admin:{SECRET}@")
    db = tmp_path / "runs.sqlite"
    runner = EvalRunner(ChatOllama(base_url=url, model="scripted-local"), db_path=db,
                        dataset="toy", prompts="few-shot", progress=False)
    runner.run([QAItem("t:1", "What is the capital of France?", ("Paris",), "question"),
                QAItem("t:2", "Which question explodes?", ("x",), "question")])
    assert _chat_requests(ollama_server) == 2
    connection = sqlite3.connect(db)
    dump = "\n".join(connection.iterdump())
    connection.close()
    assert "admin:***@" in dump  # the URL is stored, redacted
    assert SECRET not in dump
    for suffix in ("-wal", "-journal"):
        side = Path(str(db) + suffix)
        if side.exists():
            assert SECRET.encode() not in side.read_bytes()


def test_eval_cli_failure_message_never_prints_the_password(tmp_path, capsys):
    pytest.importorskip("sklearn")
    from confidence_router.cli import main as eval_main

    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()  # nothing listens there: every answer fails
    dataset = tmp_path / "qa.jsonl"
    dataset.write_text(json.dumps({"question": "Capital of France?", "answers": ["Paris"]}) + "\n")
    code = eval_main(["eval", "--dataset", str(dataset), "--ollama-url",
                      f"http://admin:{SECRET}@127.0.0.1:{port}", "--model", "m",
                      "--db", str(tmp_path / "runs.sqlite"), "--no-progress"])
    captured = capsys.readouterr()
    assert code == 1
    assert SECRET not in captured.out + captured.err
    assert "admin:***@" in captured.err


# =============================================================================================
# 11. every error under ConfidenceRouterError; the tree in errors.py matches the classes
# =============================================================================================


def _all_modules():
    modules = []
    for info in pkgutil.walk_packages(confidence_router.__path__, "confidence_router."):
        try:
            modules.append(importlib.import_module(info.name))
        except ImportError as error:  # an optional extra that is not installed
            if "confidence_router" in str(getattr(error, "name", "")):
                raise
    return modules


def _public_exception_classes():
    found = {}
    for module in _all_modules():
        if any(part.startswith("_") for part in module.__name__.split(".")):
            continue  # private modules: internal control flow, never raised to callers
        for name, obj in vars(module).items():
            if (inspect.isclass(obj) and issubclass(obj, BaseException)
                    and not issubclass(obj, Warning) and obj.__module__ == module.__name__
                    and not name.startswith("_")):
                found[name] = obj
    return found


def test_every_public_error_class_is_a_confidence_router_error():
    classes = _public_exception_classes()
    private = [(name, obj) for module in _all_modules()
               if not any(part.startswith("_") for part in module.__name__.split("."))
               for name, obj in vars(module).items()
               if name.startswith("_") and inspect.isclass(obj)
               and issubclass(obj, Exception) and not issubclass(obj, Warning)
               and obj.__module__ == module.__name__]
    assert [n for n, c in private if not issubclass(c, ConfidenceRouterError)] == []
    assert len(classes) > 20
    outside = sorted(f"{c.__module__}.{n}" for n, c in classes.items()
                     if not issubclass(c, ConfidenceRouterError))
    assert outside == []


#: Builtin exceptions still raised on purpose, by (file, builtin): a module's ``__getattr__``
#: (AttributeError is its protocol), abstract methods, the script's exit, missing files,
#: a missing optional package, and state errors of the servers and the llama.cpp bindings.
_BUILTIN_RAISES_ALLOWED = {
    ("__init__.py", "AttributeError"), ("budget.py", "NotImplementedError"),
    ("testing/processes.py", "NotImplementedError"), ("cli.py", "SystemExit"),
    ("calibration.py", "FileNotFoundError"), ("evaluation/datasets.py", "FileNotFoundError"),
    ("evaluation/runner.py", "FileNotFoundError"), ("serving/llamacpp.py", "FileNotFoundError"),
    ("evaluation/datasets.py", "ImportError"), ("evaluation/grading.py", "ImportError"),
    ("evaluation/runner.py", "KeyError"), ("serving/http.py", "RuntimeError"),
    ("serving/llamacpp.py", "RuntimeError"),
    # Not an error: the CLI's SIGTERM handler turns the signal into what Ctrl-C raises, so a
    # server stops the same way for both.
    ("cli.py", "KeyboardInterrupt"),
}


def test_library_raises_typed_errors_not_bare_builtins():
    """errors.py: "Every error this library raises derives from ConfidenceRouterError". A
    ``raise ValueError(...)`` or ``raise TypeError(...)`` anywhere in the package breaks that
    (InvalidArgumentError / InvalidTypeError are those builtins too)."""
    import builtins

    found = []
    for path in sorted(SRC.rglob("*.py")):
        where = path.relative_to(SRC).as_posix()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.Raise) or node.exc is None:
                continue
            exc = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
            builtin = getattr(builtins, getattr(exc, "id", ""), None)
            if (isinstance(builtin, type) and issubclass(builtin, BaseException)
                    and (where, exc.id) not in _BUILTIN_RAISES_ALLOWED):
                found.append(f"{where}:{node.lineno}: raise {exc.id}")
    assert found == []


def _docstring_tree():
    """``{class name: parent name}`` as drawn at the top of errors.py (the depth is the
    column of the name), and what each line names in parentheses after it."""
    from confidence_router import errors

    parents, named, stack = {}, {}, []
    for line in errors.__doc__.splitlines():
        match = re.match(r"^[\s│]*(?:[├└]── )?([A-Z]\w*Error)\b,?(?: \(([\w, ]+)\))?",
                         line)
        if not match:
            continue
        depth = match.start(1) // 4
        name = match.group(1)
        while stack and stack[-1][0] >= depth:
            stack.pop()
        parents[name] = stack[-1][1] if stack else None
        named[name] = {b.strip() for b in (match.group(2) or "").split(",") if b.strip()}
        stack.append((depth, name))
    return parents, named


def test_error_tree_in_the_docstring_matches_the_real_classes():
    parents, builtins = _docstring_tree()
    assert parents.get("ConfidenceRouterError", "missing") is None
    real = {n: c for n, c in _public_exception_classes().items()
            if issubclass(c, ConfidenceRouterError)}
    assert sorted(parents) == sorted(real), "classes drawn vs defined"
    for name, cls in real.items():
        if parents[name] is None:
            continue
        drawn_parent = real[parents[name]]
        assert issubclass(cls, drawn_parent), f"{name} is not a {parents[name]}"
        for other in builtins[name]:
            named_class = real.get(other) or getattr(__import__("builtins"), other, None)
            assert named_class is not None and issubclass(cls, named_class), (name, other)
        # Every direct library base of the class is drawn (as parent or named in the line).
        for base in cls.__bases__:
            if issubclass(base, ConfidenceRouterError):
                assert issubclass(drawn_parent, base) or base.__name__ in builtins[name] or (
                    base is drawn_parent), (name, base.__name__)
            else:
                assert base.__name__ in builtins[name] or issubclass(drawn_parent, base), (
                    f"{name} derives from {base.__name__}, which the tree does not say")


# =============================================================================================
# 12. structure: references, import graph, private imports, knobs declared once
# =============================================================================================

_OUTSIDE_REFERENCES = ("method" + ".md", "integration" + " notes", ".." + "/shared",
                       "integration" + "-notes")


def test_no_reference_to_documents_outside_the_repo():
    roots = [SRC, REPO / "docs", REPO / "examples", REPO / "benchmarks", REPO / "README.md",
             REPO / "CHANGELOG.md", REPO / "tests"]
    offenders = []
    for root in roots:
        files = [root] if root.is_file() else [p for p in root.rglob("*")
                                               if p.suffix in {".py", ".md", ".toml", ".txt"}]
        for path in files:
            text = path.read_text(encoding="utf-8", errors="replace").lower()
            for needle in _OUTSIDE_REFERENCES:
                if needle in text:
                    offenders.append(f"{path.relative_to(REPO)}: {needle}")
    assert offenders == []


def test_markdown_files_named_in_the_code_exist():
    missing = []
    for path in SRC.rglob("*.py"):
        for name in re.findall(r"[\w./-]+\.md\b", path.read_text(encoding="utf-8")):
            if "<" in name or name.startswith(("my-", "docs/results/my-")) or "{" in name:
                continue
            candidates = [REPO / name, SRC / name, path.parent / name, REPO / "docs" / name,
                          SRC.parent / name]
            if not any(c.exists() for c in candidates) and not name.endswith(".notes.md"):
                missing.append(f"{path.relative_to(REPO)}: {name}")
    assert missing == []


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(top_level_only: bool) -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in SRC.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets: set[str] = set()
        tree = ast.parse(path.read_text(encoding="utf-8"))
        _collect_imports(tree.body, name, path.name == "__init__.py", set(modules), targets,
                         top=True, top_level_only=top_level_only)
        # A module importing its own package (its __init__) is not a circle of modules.
        graph[name] = {t for t in targets if not name.startswith(t + ".")}
    return graph


def _collect_imports(body, name, is_package, modules, targets, *, top, top_level_only):
    for node in body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)) and (top or not top_level_only):
            if isinstance(node, ast.Import):
                found = [alias.name for alias in node.names]
            else:
                base = node.module or ""
                if node.level:
                    anchor = name.split(".") if is_package else name.split(".")[:-1]
                    anchor = anchor[:len(anchor) - (node.level - 1)]
                    base = ".".join([*anchor, *([node.module] if node.module else [])])
                found = [base, *(f"{base}.{a.name}" for a in node.names)]
            targets.update(f for f in found if f in modules and f != name)
        nested = isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
        for field in ("body", "orelse", "finalbody", "handlers"):
            sub = getattr(node, field, None)
            if isinstance(sub, list):
                _collect_imports(sub, name, is_package, modules, targets,
                                 top=top and not nested, top_level_only=top_level_only)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def strong(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for vertex in sorted(graph):
        if vertex not in index:
            strong(vertex)
    return found


@pytest.mark.parametrize("top_level_only", [True, False], ids=["module level", "all imports"])
def test_no_import_circles_between_modules(top_level_only):
    graph = _imports(top_level_only)
    assert len(graph) > 40 and "confidence_router.router" in graph
    assert "confidence_router.policy" in graph["confidence_router.router"]  # the graph is real
    assert _cycles(graph) == []


def test_the_circle_finder_finds_a_circle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_private_names_imported_across_modules():
    modules = {_module_name(p) for p in SRC.rglob("*.py")}
    offenders = []
    for path in SRC.rglob("*.py"):
        here = _module_name(path)
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.ImportFrom) or node.level:
                continue
            if not (node.module or "").startswith("confidence_router"):
                continue
            for alias in node.names:
                private = alias.name.startswith("_") and not alias.name.startswith("__")
                if private and f"{node.module}.{alias.name}" not in modules:
                    offenders.append(f"{here} imports {node.module}.{alias.name}")
    assert offenders == []


def test_testing_never_reaches_into_private_names_of_serving():
    for path in (SRC / "testing").rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        tree = ast.parse(text)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(
                    "confidence_router.serving"):
                assert not [a.name for a in node.names if a.name.startswith("_")], path
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[-1].startswith(
                    "_") and "serving" in (node.module or ""):
                pytest.fail(f"{path} imports the private module {node.module}")


def test_knob_defaults_are_the_policys_everywhere(ollama_chat):
    knobs = RoutingPolicy.knob_names()
    assert len(knobs) >= 7 and len(set(knobs)) == len(knobs)
    router_fields = ConfidenceRoutedLLM.model_fields
    settings_fields = {f.name: f for f in dataclass_fields(RouterSettings)}
    router = ConfidenceRoutedLLM(local=ollama_chat())
    defaults = RouterSettings()
    for knob in knobs:
        expected = getattr(DEFAULT_POLICY, knob)
        assert router_fields[knob].default == expected, knob
        assert getattr(router, knob) == expected, knob
        assert settings_fields[knob].default == expected, knob
        assert getattr(defaults, knob) == expected, knob
    assert defaults.policy() == DEFAULT_POLICY
    assert set(defaults.router_fields()) >= set(knobs)


def test_every_knob_is_a_setting_from_the_environment_and_a_file(tmp_path):
    changed = {"threshold": 0.42, "signal": "min_logprob", "on_unknown": "local",
               "on_cloud_error": "local", "precheck_threshold": 0.3,
               "allow_escalation": False, "on_budget_exceeded": "raise", "early_exit": True}
    assert set(changed) == set(RoutingPolicy.knob_names()), "a knob this test does not know"
    env = {"CONFIDENCE_ROUTER_" + k.upper(): str(v).lower() if isinstance(v, bool) else str(v)
           for k, v in changed.items()}
    from_env = RouterSettings.from_env(env)
    path = tmp_path / "router.json"
    path.write_text(json.dumps(changed))
    from_file = RouterSettings.from_file(path)
    for settings in (from_env, from_file):
        assert settings.policy().as_dict() == changed
        assert {k: settings.router_fields()[k] for k in changed} == changed


def test_llamaindex_accepts_every_knob_with_the_same_defaults(router, ollama_backend,
                                                              bedrock_server):
    pytest.importorskip("llama_index.core")
    from llama_index.core.llms import ChatMessage

    from confidence_router.llamaindex import ConfidenceRoutedLlamaIndexLLM

    llm = ConfidenceRoutedLlamaIndexLLM(router=router)
    assert llm.to_payload()["routing_policy"] == DEFAULT_POLICY.as_dict()
    changed = {"threshold": 0.42, "signal": "min_logprob", "on_unknown": "local",
               "on_cloud_error": "local", "precheck_threshold": 0.3,
               "allow_escalation": False, "on_budget_exceeded": "raise", "early_exit": True}
    assert set(changed) == set(RoutingPolicy.knob_names())
    messages = [ChatMessage(role="user", content="capital of France?")]
    for knob, value in changed.items():
        reply = llm.chat(messages, **{knob: value})
        assert reply.additional_kwargs["routing"]["policy"][knob] == value, knob
        fixed = ConfidenceRoutedLlamaIndexLLM(router=router, router_kwargs={knob: value})
        assert fixed.to_payload()["routing_policy"][knob] == value
        reply = fixed.complete("capital of France?")
        assert reply.additional_kwargs["routing"]["policy"][knob] == value, knob
    with pytest.raises(RoutingConfigError, match="allow_escalation"):
        llm.chat(messages, allow_escalaton=False)
    with pytest.raises(RoutingConfigError):
        ConfidenceRoutedLlamaIndexLLM(router=router, threshold=0.9)
    assert bedrock_server.requests == []


def test_readme_knob_table_lists_every_knob_with_its_default():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    table = readme.split("## Configuration knobs", 1)[1].split("\n## ", 1)[0]
    for knob in RoutingPolicy.knob_names():
        default = getattr(DEFAULT_POLICY, knob)
        shown = json.dumps(default) if isinstance(default, str) else repr(default)
        row = next((line for line in table.splitlines() if line.startswith(f"| `{knob}`")), None)
        assert row is not None, knob
        assert f"`{shown}`" in row, (knob, row)


# =============================================================================================
# additions: more entry points of the same promises
# =============================================================================================


def test_demo_reports_the_ollama_host_without_its_password(ollama_server):
    import io

    from confidence_router.demo import available_backends, ollama_serves

    url = ollama_server.url.replace("http://", f"http://admin:{SECRET}@")
    assert ollama_serves(url, "scripted-local")  # credentials go in a header, not the address
    settings = RouterSettings(ollama_host=url, local_model="scripted-local", cloud_model=None)
    out = io.StringIO()
    with available_backends(settings, out=out) as backends:
        assert backends.embedded is False
    assert "admin:***@" in out.getvalue() and SECRET not in out.getvalue()
    tags = ollama_server.requests_to("/api/tags")
    assert tags and all(SECRET not in request["path"] for request in tags)


def test_precheck_probe_works_from_fresh_event_loops(ollama_chat, bedrock_chat, ollama_backend,
                                                     ollama_server, bedrock_server):
    from confidence_router.probe import SelfAssessmentProbe

    question = "What is the capital of France?"
    ollama_backend.add_probe(
        lambda r: question in r.messages[-1]["content"]
        and "Respond with exactly one token" in r.messages[-1]["content"],
        {"YES": -0.05, "NO": -3.0})
    ollama_backend.add_answer(lambda r: r.messages[-1]["content"] == question, "Paris",
                              logprobs=-0.01)
    local = ollama_chat()
    router = ConfidenceRoutedLLM(local=local, cloud=bedrock_chat(max_tokens=40),
                                 precheck=SelfAssessmentProbe(model=local))
    for _ in range(3):
        routing = asyncio.run(router.ainvoke(question)).response_metadata["routing"]
        assert routing["decision"] == "local" and routing["reason"] == Reason.CONFIDENT
        assert not (routing.get("precheck") or {}).get("error"), routing["precheck"]
    assert _chat_requests(ollama_server) == 6 and bedrock_server.requests == []


def test_bare_local_tool_call_kept_by_on_unknown_local_is_flagged(router, ollama_backend,
                                                                  bedrock_server):
    def get_weather(city: str) -> str:
        """Get the weather of a city."""
        return "sunny"

    ollama_backend.add_answer("weather", "", tool_calls=[
        {"name": "get_weather", "arguments": {"city": "Paris"}}])
    tooled = router.bind_tools([get_weather])
    messages = [tooled.invoke("weather in Paris?", on_unknown="local"),
                asyncio.run(tooled.ainvoke("weather in Paris?", on_unknown="local")),
                _joined(list(tooled.stream("weather in Paris?", on_unknown="local")))]
    for message in messages:
        routing = message.response_metadata["routing"]
        assert message.tool_calls and message.tool_calls[0]["args"] == {"city": "Paris"}
        assert routing["decision"] == "local" and routing["flagged"] is True
        assert routing["reason"] == Reason.CONFIDENCE_UNKNOWN
    assert bedrock_server.requests == []


def test_the_embedded_servers_class_queues_a_burst_too():
    """``confidence-router serve`` runs an EmbeddedOllamaServer: the same scaffolding, so a
    burst of new connections is answered there as well (a scripted backend stands in for the
    model)."""
    import ollama

    from confidence_router.embedded import EmbeddedOllamaServer

    backend = ScriptedBackend()
    backend.set_default("ok", logprobs=-0.1, latency=0.02)
    with EmbeddedOllamaServer(backend) as server:
        def one(i: int) -> str:
            client = ollama.Client(host=server.url, timeout=60)
            return client.chat(model="scripted-local",
                               messages=[{"role": "user", "content": f"q{i}"}]).message.content

        with ThreadPoolExecutor(max_workers=64) as pool:
            answers = list(pool.map(one, range(128)))
        assert answers == ["ok"] * 128
        assert len(server.requests_to("/api/chat")) == 128


@pytest.mark.parametrize("value", [True, False, math.inf, math.nan, 0, -1, "5"], ids=repr)
def test_eval_runner_timeout_is_a_finite_number_of_seconds(ollama_chat, tmp_path, value):
    from confidence_router.errors import InvalidArgumentError
    from confidence_router.evaluation.runner import EvalRunner

    with pytest.raises(InvalidArgumentError, match="timeout_s"):
        EvalRunner(ollama_chat(), db_path=tmp_path / "runs.sqlite", dataset="toy",
                   timeout_s=value, progress=False)


def test_router_repr_and_its_own_trace_run_never_hold_the_password(ollama_backend,
                                                                   ollama_server):
    from langchain_core.tracers.base import BaseTracer
    from langchain_ollama import ChatOllama

    class Runs(BaseTracer):
        def __init__(self):
            super().__init__()
            self.runs = []

        def _persist_run(self, run):
            self.runs.append(run)

    ollama_backend.set_default("Paris", logprobs=-0.01)
    url = ollama_server.url.replace("http://", f"http://admin:{SECRET}@")
    router = ConfidenceRoutedLLM(local=ChatOllama(model="scripted-local", base_url=url))
    runs = Runs()
    router.invoke("capital of France?", config={"callbacks": [runs]})
    assert _chat_requests(ollama_server) == 1
    own = [run for run in runs.runs if run.name == "ConfidenceRoutedLLM"]
    assert own and SECRET not in json.dumps(own[0].serialized, default=str)
    assert SECRET not in repr(router)


@pytest.mark.parametrize(
    "fields",
    [{"streaming": True}, {"early_exit": True, "signal": "min_logprob"},
     {"budget": "budget"}, {"escalation_guard": "guard", "stats": "stats"},
     {"cloud_retry": "retry", "cloud_timeout": 5, "local_timeout": 5}],
    ids=["streaming", "early_exit", "budget", "guard+stats", "retry+timeouts"],
)
def test_every_collaborator_survives_a_new_event_loop_per_call(ollama_chat, cloud_factory,
                                                               ollama_backend, ollama_server,
                                                               bedrock_server, fields):
    made = {"budget": lambda: CloudBudget(max_usd=1.0), "guard": PIIGuard,
            "stats": RoutingStats,
            "retry": lambda: RetryPolicy(max_attempts=3, base_delay=0.01, jitter=False)}
    fields = {k: made[v]() if isinstance(v, str) and v in made else v for k, v in fields.items()}
    ollama_backend.set_default("Paris", logprobs=-0.01)
    ollama_backend.add_answer("Kenya", "Jomo", logprobs=-3.0)
    bedrock_server.set_default("Moi")
    bedrock_server.fail("throttled", "ThrottlingException", times=1)
    router = ConfidenceRoutedLLM(local=ollama_chat(), cloud=cloud_factory(max_tokens=40),
                                 **fields)
    expected = {"France?": "Paris", "Kenya?": "Moi"}
    for question in ("France?", "Kenya?", "France?", "Kenya?"):
        assert asyncio.run(router.ainvoke(question)).text == expected[question], question
    assert len(bedrock_server.requests) == 2
    if "cloud_retry" in fields:  # a throttled attempt retried in a later loop
        assert asyncio.run(router.ainvoke("Kenya, throttled?")).text == "Moi"
        assert len(bedrock_server.requests) == 4


def test_misspelt_configurable_id_is_refused_before_any_request(router, ollama_backend,
                                                                ollama_server, bedrock_server):
    from langchain_core.runnables import ConfigurableField

    ollama_backend.set_default("unsure", logprobs=-3.0)
    private = router.configurable_fields(
        allow_escalation=ConfigurableField(id="allow_escalation"))
    with pytest.raises(RoutingConfigError, match="allow_escalation"):
        private.with_config(configurable={"allow_escalaton": False}).invoke("my secret?")
    _nothing_sent(ollama_server, bedrock_server)


@pytest.mark.parametrize("command", [["eval-early-exit", "--db", "runs.sqlite"],
                                     ["calibrate", "runs.sqlite", "--target-rate", "0.3"]])
def test_every_cli_command_refuses_a_misspelt_variable(monkeypatch, tmp_path, capsys, command):
    """``confidence-router eval`` reads ``CONFIDENCE_ROUTER_DATA_DIR``: with it misspelt it
    would silently use the shipped samples instead. Every command checks the environment."""
    from confidence_router.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CONFIDENCE_ROUTER_DATA_DRI", str(tmp_path))
    assert main(command) == 2
    err = capsys.readouterr().err
    assert "CONFIDENCE_ROUTER_DATA_DRI" in err
    assert "did you mean 'CONFIDENCE_ROUTER_DATA_DIR'" in err
    assert not (tmp_path / "runs.sqlite").exists()


def test_a_misspelt_variable_is_hinted_with_non_setting_variables_too():
    from confidence_router.settings import check_environment

    with pytest.raises(RoutingConfigError, match="did you mean 'CONFIDENCE_ROUTER_REDIS_URL'"):
        check_environment({"CONFIDENCE_ROUTER_REDIS_ULR": "redis://x"})
    check_environment({"CONFIDENCE_ROUTER_REDIS_URL": "redis://x", "OTHER": "1"})


def test_stats_count_a_cloud_stream_that_fails_after_chunks(ollama_chat, cloud_factory,
                                                                  ollama_backend,
                                                                  bedrock_server):
    ollama_backend.set_default("unsure", logprobs=-3.0)
    bedrock_server.fail(None, "ServiceUnavailableException", after_pieces=2)
    stats = RoutingStats()
    router = ConfidenceRoutedLLM(local=ollama_chat(), cloud=cloud_factory(), stats=stats,
                                 cloud_retry=NO_RETRY, on_cloud_error="local")
    for collect in (lambda: list(router.stream("question")),
                    lambda: asyncio.run(_collect(router.astream("question")))):
        with pytest.raises(CloudEscalationError):   # never a mix of the two models' text
            collect()
    snap = stats.snapshot()
    assert snap["calls"] == 2 and len(bedrock_server.requests) == 2
    assert sum(v for k, v in snap["errors"].items() if k.startswith("cloud")) == 2, snap
