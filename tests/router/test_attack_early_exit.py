"""Early exit attacked through the real ChatOllama / ChatBedrockConverse clients on every entry
point: randomised answers for every signal and every way of setting the knob (the decision
must be the one of running to the end), the routing record on every path, the local server
really stopping (also when the caller abandons the router's stream), local faults mid-answer
(a dropped connection, a stall, malformed / missing / NaN / positive logprobs, tool-call
deltas, thinking chunks, empty and blank answers) and 24 concurrent calls. Every test counts
what the fake servers received.

Faults the project's scripted server cannot produce (a malformed line, a logprob that is not
a number, a thinking chunk, a connection cut mid-answer) come from :class:`RawOllama`, a
minimal Ollama ``/api/chat`` that streams exactly the lines a test scripts.
"""

from __future__ import annotations

import asyncio
import json
import random
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from langchain_core.runnables import ConfigurableField
from langchain_ollama import ChatOllama

from confidence_router import CloudBudget, ConfidenceRoutedLLM, Reason
from confidence_router.early_exit import early_exit_index
from confidence_router.errors import (
    CloudEscalationError,
    ConfidenceRouterError,
    LocalModelError,
)
from confidence_router.policy import RoutingPolicy, decide_after_generation
from confidence_router.retry import RetryPolicy
from confidence_router.signals import compute_signals, sigmoid
from confidence_router.testing import InFlightBackend

PATHS = ("invoke", "stream", "ainvoke", "astream", "batch", "abatch")
SIGNALS = ("min_logprob", "mean_logprob", "mean_min", "sum_logprob", "sum_min")
CLOUD_TEXT = "cloud answer"
NO_RETRY = RetryPolicy(max_attempts=1)


def _merged(chunks: list[Any]) -> Any:
    total = chunks[0]
    for chunk in chunks[1:]:
        total = total + chunk
    return total


def _routing(message: Any) -> dict[str, Any]:
    return message.response_metadata["routing"]


def _words(n: int) -> list[str]:
    return [f" w{i}" for i in range(n)]


def _call(runnable: Any, path: str, questions: list[str], **kwargs: Any) -> list[Any]:
    """``questions`` through one entry point (one call each; the batches take them at once)."""
    if path == "batch":
        return runnable.batch(questions, **kwargs)
    if path == "invoke":
        return [runnable.invoke(q, **kwargs) for q in questions]
    if path == "stream":
        return [_merged(list(runnable.stream(q, **kwargs))) for q in questions]

    async def run() -> list[Any]:
        if path == "abatch":
            return await runnable.abatch(questions, **kwargs)
        if path == "ainvoke":
            return [await runnable.ainvoke(q, **kwargs) for q in questions]
        out = []
        for question in questions:
            out.append(_merged([c async for c in runnable.astream(question, **kwargs)]))
        return out

    return asyncio.run(run())


def _in_turn(runnable: Any, path: str, calls: list[tuple[str, dict[str, Any]]],
             counts: Any) -> list[tuple[Any, Any, Any]]:
    """Each ``(question, kwargs)`` in turn through one entry point (the async ones in one event
    loop), as ``(message, counts() before, counts() after)``."""
    out: list[tuple[Any, Any, Any]] = []
    if path in ("invoke", "stream", "batch"):
        for question, kwargs in calls:
            before = counts()
            (message,) = _call(runnable, path, [question], **kwargs)
            out.append((message, before, counts()))
        return out

    async def run() -> None:
        for question, kwargs in calls:
            before = counts()
            if path == "ainvoke":
                message = await runnable.ainvoke(question, **kwargs)
            elif path == "astream":
                message = _merged([c async for c in runnable.astream(question, **kwargs)])
            else:
                (message,) = await runnable.abatch([question], **kwargs)
            out.append((message, before, counts()))

    asyncio.run(run())
    return out


def _eventually(condition: Any, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return bool(condition())


def _settled(read: Any, timeout: float = 5.0) -> int:
    """``read()`` once it stopped changing (a server that was told to stop has stopped)."""
    deadline = time.monotonic() + timeout
    last = read()
    while time.monotonic() < deadline:
        time.sleep(0.15)
        now = read()
        if now == last:
            return int(now)
        last = now
    return int(read())


@pytest.fixture
def cloud(bedrock_chat, bedrock_server):
    bedrock_server.set_default(CLOUD_TEXT)
    return bedrock_chat(max_tokens=50)


# =============================================================================================
# 1. every signal, every knob form, every entry point: the decision of running to the end
# =============================================================================================


def _random_logprob(rng: random.Random) -> float:
    kind = rng.random()
    if kind < 0.55:
        return -rng.uniform(0.0, 0.6)  # confident
    if kind < 0.9:
        return -rng.uniform(0.0, 8.0)
    return rng.choice([0.0, -1.0, -1.5, -3.0])


def _random_answer(rng: random.Random, signal: str) -> tuple[list[float], float]:
    values = [_random_logprob(rng) for _ in range(rng.randint(1, 9))]
    if signal == "min_logprob" and rng.random() < 0.25:
        # A threshold exactly at one token's score: the float margin must not flip it.
        threshold = min(max(sigmoid(2 * rng.choice(values) + 3), 0.0), 1.0)
    else:
        threshold = rng.uniform(0.05, 0.95)
    return values, threshold


#: The knob form per entry point; an LCEL-configured knob rebuilds the router on every call
#: (about a second each here), so it takes one entry point of the first case only.
FORMS = ("call", "bind", "field", "config", "settings", "call")


@pytest.mark.parametrize("signal", SIGNALS)
def test_every_signal_exits_as_the_full_run_decides_on_every_path_and_knob_form(
    ollama_chat, cloud, ollama_backend, ollama_server, bedrock_server, signal
):
    rng = random.Random(f"early-exit-{signal}")
    # mean_logprob exits only with the answer's true cap (the scripted answers stay below it).
    cap = 12 if signal == "mean_logprob" else None
    local = ollama_chat(num_predict=cap) if cap else ollama_chat()
    router = ConfidenceRoutedLLM(local=local, cloud=cloud, signal=signal, cloud_retry=NO_RETRY)
    # The knob set every way there is (the threshold goes per call: it varies per answer).
    forms: dict[str, tuple[Any, dict[str, Any]]] = {
        "call": (router, {"early_exit": True}),
        "bind": (router.bind(early_exit=True), {}),
        "field": (ConfidenceRoutedLLM(local=local, cloud=cloud, signal=signal, early_exit=True,
                                      cloud_retry=NO_RETRY), {}),
        "config": (router.configurable_fields(early_exit=ConfigurableField(id="early_exit"))
                   .with_config(configurable={"early_exit": True}), {}),
    }
    settings_router = ConfidenceRoutedLLM.from_settings(environ={
        "OLLAMA_HOST": ollama_server.url, "CONFIDENCE_ROUTER_LOCAL_MODEL": "scripted-local",
        "CONFIDENCE_ROUTER_BEDROCK_ENDPOINT": bedrock_server.url, "AWS_REGION": "us-east-1",
        "CONFIDENCE_ROUTER_CLOUD_MAX_TOKENS": "50", "CONFIDENCE_ROUTER_EARLY_EXIT": "true",
        "CONFIDENCE_ROUTER_SIGNAL": signal,
    }, cloud_retry=NO_RETRY)
    forms["settings"] = (settings_router, {})
    checked_exits = checked_kept = 0
    for case in range(2):
        for path, form in zip(PATHS, FORMS):
            form = "call" if form == "config" and case else form
            values, threshold = _random_answer(rng, signal)
            form_cap = None if form == "settings" else cap  # settings: a ChatOllama of its own
            questions = [f"q {signal} {case} {path} {i} end" for i in range(2)]
            for question in questions:
                ollama_backend.add_answer(question, _words(len(values)), logprobs=values)
            full = [_routing(router.invoke(q, threshold=threshold)) for q in questions]
            expected_exit = early_exit_index(signal, threshold, values, max_tokens=form_cap)
            policy = RoutingPolicy(threshold=threshold, signal=signal)
            escalates = decide_after_generation(policy, compute_signals(values)).escalate
            local_before = len(ollama_server.requests_to("/api/chat"))
            cloud_before = len(bedrock_server.requests)
            runnable, kwargs = forms[form]
            messages = _call(runnable, path, questions, threshold=threshold, **kwargs)
            assert len(messages) == len(questions)
            escalated = 0
            for message, reference in zip(messages, full):
                routing = _routing(message)
                where = (path, form, values, threshold, form_cap)
                assert "early_exit" not in reference  # off: no entry
                assert routing["policy"]["early_exit"] is True, where
                assert routing["threshold"] == threshold, where
                assert routing["decision"] == reference["decision"], where
                assert routing["decision"] == ("cloud" if escalates else "local"), where
                if expected_exit is None:
                    assert routing["early_exit"] == {"exited": False, "tokens": len(values)}
                    assert routing["reason"] == reference["reason"], where
                    assert routing["confidence"] == reference["confidence"], where
                else:
                    assert escalates, where  # an exit only where the full answer escalates
                    assert routing["early_exit"] == {"exited": True, "tokens": expected_exit}
                    assert routing["reason"] == Reason.EARLY_EXIT, where
                    checked_exits += 1
                if routing["decision"] == "local":
                    assert message.text == "".join(_words(len(values))), where  # never cut
                    checked_kept += 1
                else:
                    assert message.text == CLOUD_TEXT, where
                    escalated += 1
            # One local request per call, one cloud request per escalation (none retried).
            assert len(ollama_server.requests_to("/api/chat")) - local_before == len(questions)
            assert len(bedrock_server.requests) - cloud_before == escalated
    assert checked_exits and checked_kept  # the seeds reach both outcomes


# =============================================================================================
# 2. the local server really stops
# =============================================================================================

N_LONG = 60


@pytest.fixture
def in_flight(ollama_server) -> InFlightBackend:
    backend = InFlightBackend()
    ollama_server.backend = backend
    return backend


def _long_low_answer(backend: InFlightBackend, question: str, at: int = 4) -> None:
    values = [-0.05] * N_LONG
    values[at] = -6.0  # min_logprob decides after at + 1 tokens
    backend.add_answer(question, _words(N_LONG), logprobs=values, token_delay=0.02)


@pytest.mark.parametrize("path", ["abatch", "batch"])
def test_no_local_handler_is_busy_after_an_exit_and_the_budget_is_settled(
    ollama_chat, cloud, in_flight, bedrock_server, path
):
    _long_low_answer(in_flight, "long")
    budget = CloudBudget(max_usd=5.0)
    router = ConfidenceRoutedLLM(local=ollama_chat(), cloud=cloud, signal="min_logprob",
                                 budget=budget, cloud_retry=NO_RETRY)
    messages = _call(router, path, ["long", "long"], early_exit=True)
    for message in messages:
        assert _routing(message)["early_exit"] == {"exited": True, "tokens": 5}
        assert _routing(message)["budget_settlement"] == "committed"
        assert message.text == CLOUD_TEXT
    assert _eventually(lambda: in_flight.in_flight == 0)  # every generation ended
    assert in_flight.started == 2
    produced = _settled(lambda: in_flight.generated_tokens)
    assert 10 <= produced <= 16, produced  # 5 each, never the 60 scripted
    assert len(bedrock_server.requests) == 2
    assert budget.reserved == 0 and budget.spent > 0


async def test_abandoning_astream_while_the_local_model_generates_stops_it(
    ollama_chat, cloud, in_flight, bedrock_server
):
    # A confident answer: no exit would come; the caller goes away mid-generation.
    in_flight.add_answer("patient", _words(N_LONG), logprobs=-0.05, token_delay=0.03)
    budget = CloudBudget(max_usd=5.0)
    router = ConfidenceRoutedLLM(local=ollama_chat(), cloud=cloud, signal="min_logprob",
                                 budget=budget, early_exit=True)
    stream = router.astream("patient")
    first = asyncio.ensure_future(anext(stream))
    deadline = time.monotonic() + 15
    while in_flight.generated_tokens < 5 and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    assert in_flight.generated_tokens >= 5 and not first.done()
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    await stream.aclose()
    deadline = time.monotonic() + 15
    while in_flight.in_flight and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    assert in_flight.in_flight == 0
    assert in_flight.generated_tokens < N_LONG, "the abandoned generation ran to its end"
    assert bedrock_server.requests == []
    assert budget.reserved == 0 and budget.spent == 0


@pytest.mark.parametrize("entry", ["stream", "astream"])
def test_abandoning_the_cloud_stream_after_an_exit_counts_the_cloud_once_and_settles(
    ollama_chat, cloud, in_flight, bedrock_server, entry
):
    _long_low_answer(in_flight, "long")
    bedrock_server.add_answer("long", " ".join(f"c{i}" for i in range(80)), piece_delay=0.02)
    budget = CloudBudget(max_usd=5.0)
    router = ConfidenceRoutedLLM(local=ollama_chat(), cloud=cloud, signal="min_logprob",
                                 budget=budget, early_exit=True, cloud_retry=NO_RETRY)
    if entry == "stream":
        chunks = router.stream("long")
        first = next(c for c in chunks if c.text)
        chunks.close()
    else:
        async def one() -> Any:
            stream = router.astream("long")
            try:
                async for chunk in stream:
                    if chunk.text:
                        return chunk
            finally:
                await stream.aclose()

        first = asyncio.run(one())
    assert first.text.startswith("c0")  # the cloud's, never the stopped local answer's
    assert _eventually(lambda: in_flight.in_flight == 0)
    assert _settled(lambda: in_flight.generated_tokens) <= 8
    assert len(bedrock_server.requests) == 1
    # A stream the caller stopped reading may have been billed: it stays spent, settled.
    assert _eventually(lambda: budget.reserved == 0)
    assert budget.spent > 0


# =============================================================================================
# 3. local faults mid-answer (a raw Ollama /api/chat streaming scripted lines)
# =============================================================================================

RAW_MODEL = "raw-local"


def _line(text: str = "", logprobs: Any = None, *, done: bool = False,
          thinking: str | None = None, tool_calls: Any = None) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": text}
    if thinking is not None:
        message["thinking"] = thinking
    if tool_calls is not None:
        message["tool_calls"] = tool_calls
    line: dict[str, Any] = {"model": RAW_MODEL, "created_at": "2026-01-01T00:00:00Z",
                            "message": message, "done": done}
    if logprobs is not None:
        line["logprobs"] = logprobs
    if done:
        line.update(done_reason="stop", prompt_eval_count=3, eval_count=1, total_duration=1)
    return line


def _tok(text: str, logprob: Any) -> dict[str, Any]:
    return _line(text, [{"token": text, "logprob": logprob, "bytes": list(text.encode())}])


DONE = _line(done=True)


class RawOllama:
    """An Ollama ``/api/chat`` streaming exactly the scripted lines of the first plan whose key
    is in the last user message: a dict (sent as JSON), bytes (sent as they are),
    ``("stall", seconds)``, or ``"drop"`` (the connection is cut mid-answer). Counts requests,
    lines sent and handlers still running."""

    def __init__(self) -> None:
        self.plans: dict[str, list[Any]] = {}
        self.requests: list[dict[str, Any]] = []
        self.ports: list[int] = []
        """The client port of each request: a client kept alive reuses its connection."""
        self.sent = 0
        self.busy = 0
        self._lock = threading.Lock()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", 0))
                body = json.loads(self.rfile.read(length) or b"{}")
                with owner._lock:
                    owner.requests.append(body)
                    owner.ports.append(self.client_address[1])
                    owner.busy += 1
                try:
                    owner._serve(self, body)
                finally:
                    with owner._lock:
                        owner.busy -= 1

            def log_message(self, *args: Any) -> None:
                pass

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request: Any, client_address: Any) -> None:
                pass  # a client that hung up is what these tests are about

        self.server = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def _serve(self, handler: BaseHTTPRequestHandler, body: dict[str, Any]) -> None:
        asked = body["messages"][-1]["content"]
        plan = next(lines for key, lines in self.plans.items() if key in asked)
        handler.send_response(200)
        handler.send_header("Content-Type", "application/x-ndjson")
        handler.send_header("Transfer-Encoding", "chunked")
        handler.end_headers()
        try:
            for item in plan:
                if item == "drop":
                    handler.connection.shutdown(socket.SHUT_RDWR)
                    handler.close_connection = True
                    return
                if isinstance(item, tuple):
                    time.sleep(item[1])
                    continue
                data = (item if isinstance(item, bytes) else json.dumps(item).encode()) + b"\n"
                handler.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                handler.wfile.flush()
                with self._lock:
                    self.sent += 1
            handler.wfile.write(b"0\r\n\r\n")
            handler.wfile.flush()
        except OSError:
            handler.close_connection = True

    def start(self) -> None:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def _raw_session() -> Iterator[RawOllama]:
    server = RawOllama()
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def raw(_raw_session: RawOllama) -> RawOllama:
    _raw_session.plans.clear()
    _raw_session.requests.clear()
    _raw_session.ports.clear()
    _raw_session.sent = 0
    return _raw_session


NAN_LINE = (b'{"model":"raw-local","created_at":"x","message":{"role":"assistant",'
            b'"content":" b"},"done":false,"logprobs":[{"token":" b","logprob":NaN}]}')
TOOL_CALL = [{"function": {"name": "lookup", "arguments": {"city": "Paris"}}}]

#: name -> (plan, what the answer must be: "local" kept, "cloud" escalated)
FAULTS: dict[str, tuple[list[Any], str]] = {
    # failures after some tokens: the local model failed, the query escalates
    "dropped": ([_tok(" a", -0.1), _tok(" b", -0.1), "drop"], "cloud"),
    "error_line": ([_tok(" a", -0.1), b'{"error":"model crashed"}'], "cloud"),
    "not_json": ([_tok(" a", -0.1), b"{not json", DONE], "cloud"),
    "string_logprob": ([_tok(" a", -0.1), _tok(" b", "high"), DONE], "cloud"),
    "null_logprob": ([_tok(" a", -0.1), _tok(" b", None), DONE], "cloud"),
    # odd logprobs: the confidence is unknown (on_unknown decides) or scored without them
    "nan_logprob": ([_tok(" a", -0.1), NAN_LINE, _tok(" c", -5.0), DONE], "unknown"),
    "positive_logprob": ([_tok(" a", -0.1), _tok(" b", 0.7), _tok(" c", -5.0), DONE], "unknown"),
    "missing_logprobs": ([_tok(" a", -0.1), _line(" b"), _tok(" c", -5.0), DONE], "cloud"),
    "entry_without_logprob": ([_tok(" a", -0.1), _line(" b", [{"token": " b"}]),
                               _tok(" c", -5.0), DONE], "cloud"),
    # shapes of answers
    "tool_call_after_blank": ([_tok(" ", -5.0), _line("", tool_calls=TOOL_CALL), DONE], "cloud"),
    "confident_tool_call": ([_tok(" ", -0.01), _line("", tool_calls=TOOL_CALL), DONE], "local"),
    "unsure_thinking": ([_line("", [{"token": "t", "logprob": -5.0}], thinking="hmm"),
                         _tok(" Paris", -0.05), DONE], "cloud"),
    "only_thinking": ([_line("", [{"token": "t", "logprob": -5.0}], thinking="hmm"), DONE],
                      "unknown"),
    "empty": ([DONE], "unknown"),
    "whitespace": ([_tok(" ", -0.1), _tok("\n", -5.0), _tok(" ", -0.1), DONE], "unknown"),
}


def _raw_router(raw: RawOllama, cloud: Any, budget: CloudBudget, **fields: Any) -> Any:
    local = ChatOllama(model=RAW_MODEL, base_url=raw.url, reasoning=True)
    return ConfidenceRoutedLLM(local=local, cloud=cloud, signal="min_logprob", budget=budget,
                               local_timeout=1.0, cloud_retry=NO_RETRY, **fields)


@pytest.mark.parametrize("path", ["invoke", "stream", "ainvoke", "astream"])
def test_local_faults_mid_answer_give_an_answer_and_count_the_cloud_once(
    raw, cloud, bedrock_server, path
):
    for name, (plan, _) in FAULTS.items():
        raw.plans[f"fault {name} end"] = plan
    budget = CloudBudget(max_usd=5.0)
    router = _raw_router(raw, cloud, budget)
    calls = [(f"fault {name} end", {"early_exit": early_exit, "on_unknown": on_unknown})
             for on_unknown in ("escalate", "local")
             for name in FAULTS for early_exit in (False, True)]
    results = iter(_in_turn(router, path, calls,
                            lambda: (len(raw.requests), len(bedrock_server.requests))))
    for on_unknown, name in ((u, n) for u in ("escalate", "local") for n in FAULTS):
        outcome = FAULTS[name][1]
        decisions = {}
        for early_exit in (False, True):
            message, (local_before, cloud_before), (local_after, cloud_after) = next(results)
            routing = _routing(message)
            where = (name, path, on_unknown, early_exit)
            expected = outcome if outcome != "unknown" else (
                "cloud" if on_unknown == "escalate" else "local")
            assert routing["decision"] == expected, (where, routing)
            assert local_after - local_before == 1, where  # never retried locally
            if expected == "cloud":
                assert message.text == CLOUD_TEXT, where
                assert cloud_after - cloud_before == 1, where
                assert routing["cloud_attempts"] == 1
                assert routing["budget_settlement"] == "committed", where
            else:
                assert cloud_after == cloud_before, where
            if outcome == "cloud" and name in ("dropped", "error_line", "not_json",
                                               "string_logprob", "null_logprob"):
                assert routing["reason"] == Reason.LOCAL_ERROR, where
                assert routing["local_error"], where
            if early_exit:
                assert set(routing["early_exit"]) == {"exited", "tokens"}, where
            else:
                assert "early_exit" not in routing, where
            decisions[early_exit] = routing["decision"]
        assert decisions[True] == decisions[False], name
    assert budget.reserved == 0
    assert raw.busy == 0 or _eventually(lambda: raw.busy == 0)


def test_a_stall_after_some_tokens_is_a_typed_local_timeout_that_escalates(
    raw, cloud, bedrock_server
):
    raw.plans["stall end"] = [_tok(" a", -0.1), ("stall", 2.5), _tok(" b", -0.1), DONE]
    router = _raw_router(raw, cloud, CloudBudget(max_usd=5.0), early_exit=True)
    routing = _routing(router.invoke("stall end"))
    assert routing["reason"] == Reason.LOCAL_ERROR
    assert routing["local_error_kind"] == "timeout"
    assert routing["latency_s"]["local"] < 2.4  # the stall was cut at local_timeout (1 s)
    assert len(bedrock_server.requests) == 1


def test_a_local_fault_with_the_cloud_down_is_a_typed_error_naming_both(
    raw, cloud, bedrock_server
):
    raw.plans["both end"] = [_tok(" a", -0.1), "drop"]
    bedrock_server.fail("both", "ServiceUnavailableException")
    budget = CloudBudget(max_usd=5.0)
    router = _raw_router(raw, cloud, budget, early_exit=True, on_cloud_error="local")
    for path in ("invoke", "astream"):
        with pytest.raises(CloudEscalationError, match="local model failed") as raised:
            _call(router, path, ["both end"])
        assert raised.value.routing["reason"] == Reason.LOCAL_ERROR
        assert raised.value.routing["cloud_attempts"] == 1
    assert len(bedrock_server.requests) == 2
    assert budget.reserved == 0
    # No cloud at all: the local failure itself, typed.
    alone = ConfidenceRoutedLLM(local=ChatOllama(model=RAW_MODEL, base_url=raw.url),
                                early_exit=True, local_timeout=1.0)
    with pytest.raises(LocalModelError, match="no cloud configured"):
        alone.invoke("both end")


@pytest.mark.parametrize("path", ["astream"])
def test_record_counts_the_tokens_seen_before_a_local_failure(raw, cloud, path):
    raw.plans["seen end"] = [_tok(" a", -0.1), _tok(" b", -0.1), _tok(" c", -0.1), "drop"]
    router = _raw_router(raw, cloud, CloudBudget(max_usd=5.0), early_exit=True)
    (message,) = _call(router, path, ["seen end"])
    routing = _routing(message)
    assert routing["reason"] == Reason.LOCAL_ERROR
    assert routing["early_exit"] == {"exited": False, "tokens": 3}


def test_a_knob_set_through_lcel_config_reuses_the_router_and_its_clients(raw, cloud):
    raw.plans["reuse end"] = [_tok(" Paris", -0.01), DONE]
    router = _raw_router(raw, cloud, CloudBudget(max_usd=5.0))
    for _ in range(3):
        assert _routing(router.invoke("reuse end", early_exit=True))["early_exit"]
    assert len(set(raw.ports)) == 1  # one kept-alive connection: the measure works
    configured = router.configurable_fields(
        early_exit=ConfigurableField(id="early_exit")).with_config(
            configurable={"early_exit": True})
    raw.ports.clear()
    for _ in range(3):
        routing = _routing(configured.invoke("reuse end"))
        assert routing["early_exit"] == {"exited": False, "tokens": 1}
    assert len(raw.ports) == 3
    assert len(set(raw.ports)) == 1  # the same client, not one per call


@pytest.mark.parametrize(("refusal", "path"), [("cloud_error", "invoke"), ("budget", "astream")])
def test_a_failed_retake_after_an_exit_is_a_typed_error_with_the_record(
    ollama_chat, cloud, ollama_backend, bedrock_server, refusal, path
):
    asked: dict[str, int] = {}

    def second_time(request: Any) -> bool:  # the first answer streams, the retake fails
        question = request.messages[-1]["content"]
        asked[question] = asked.get(question, 0) + 1
        return asked[question] >= 2

    ollama_backend.fail(second_time, status=500, message="local died on the retake")
    ollama_backend.add_answer("retake", _words(4), logprobs=[-0.05, -6.0, -0.05, -0.05])
    budget = CloudBudget(max_usd=1e-9 if refusal == "budget" else 5.0)
    if refusal == "cloud_error":
        bedrock_server.fail("retake", "ServiceUnavailableException")
    router = ConfidenceRoutedLLM(local=ollama_chat(), cloud=cloud, signal="min_logprob",
                                 early_exit=True, on_cloud_error="local", budget=budget,
                                 cloud_retry=NO_RETRY)
    with pytest.raises(ConfidenceRouterError) as raised:
        _call(router, path, ["retake end"])
    routing = raised.value.routing  # type: ignore[attr-defined]
    assert routing["early_exit"] == {"exited": True, "tokens": 2}
    assert "local died on the retake" in str(raised.value) + str(routing.get("local_error"))
    assert asked["retake end"] == 2
    assert len(bedrock_server.requests) == (1 if refusal == "cloud_error" else 0)
    assert budget.reserved == 0


# =============================================================================================
# 4. the token cap mean-type bounds rely on must be the one the request carries
# =============================================================================================


def _dead_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"  # nothing listens there now


@pytest.mark.parametrize(("signal", "how"), [("mean_logprob", "options_cap"),
                                             ("mean_min", "options_without_cap"),
                                             ("mean_logprob", "fallback")])
def test_a_cap_the_request_does_not_carry_never_changes_the_decision(
    ollama_chat, cloud, ollama_backend, ollama_server, bedrock_server, signal, how
):
    # Kept when run to the end: mean -6/12 = -0.5 scores 0.88 (mean_logprob); mean_min at a
    # lower threshold. With the field's cap of 4 the router thinks at most 3 more tokens come.
    values = [-6.0] + [0.0] * 11
    ollama_backend.add_answer("capped", _words(len(values)), logprobs=values)
    threshold = 0.7 if signal == "mean_logprob" else 0.4
    if how == "fallback":
        local = ollama_chat(num_predict=4, base_url=_dead_url()).with_fallbacks(
            [ollama_chat(num_predict=12)])
    else:
        options = {"num_predict": 12} if how == "options_cap" else {"temperature": 0.0}
        local = ollama_chat(num_predict=4).bind(options=options)
    router = ConfidenceRoutedLLM(local=local, cloud=cloud, signal=signal, threshold=threshold)
    full = _routing(router.invoke("capped"))
    assert full["decision"] == "local"
    sent = ollama_server.requests_to("/api/chat")[-1]["body"]["options"]
    assert sent.get("num_predict") != 4  # what the answering request really carried
    early = _routing(router.invoke("capped", early_exit=True))
    assert early["decision"] == "local"
    assert early["early_exit"] == {"exited": False, "tokens": len(values)}
    assert bedrock_server.requests == []


# =============================================================================================
# 5. concurrency: early exit and not, mixed
# =============================================================================================


async def test_24_concurrent_calls_mixing_early_exit_are_each_counted_once(
    ollama_chat, cloud, ollama_backend, ollama_server, bedrock_server
):
    budget = CloudBudget(max_usd=50.0)
    router = ConfidenceRoutedLLM(local=ollama_chat(), cloud=cloud, signal="min_logprob",
                                 budget=budget, cloud_retry=NO_RETRY)
    cases = []
    for i in range(24):
        low = i % 3 != 0  # two in three escalate
        early = i % 2 == 0
        values = [-0.05] * 12
        if low:
            values[3] = -6.0
        question = f"concurrent {i} end"
        rule = ollama_backend.add_answer(lambda r, q=question: r.messages[-1]["content"] == q,
                                         _words(12), logprobs=values, token_delay=0.01)
        cases.append((question, low, early, rule))

    async def one(i: int, question: str, early: bool) -> Any:
        if i % 4 < 2:
            return await router.ainvoke(question, early_exit=early)
        return _merged([c async for c in router.astream(question, early_exit=early)])

    messages = await asyncio.gather(*(one(i, q, e) for i, (q, _, e, _) in enumerate(cases)))
    cloud_questions = [r["last_user_text"] for r in bedrock_server.requests]
    for (question, low, early, rule), message in zip(cases, messages):
        routing = _routing(message)
        assert rule.calls == 1, question  # one local request each
        assert cloud_questions.count(question) == (1 if low else 0), question
        assert routing["decision"] == ("cloud" if low else "local"), question
        if not early:
            assert "early_exit" not in routing
            assert routing["reason"] == (Reason.LOW_CONFIDENCE if low else Reason.CONFIDENT)
        elif low:
            assert routing["early_exit"] == {"exited": True, "tokens": 4}, question
            assert routing["reason"] == Reason.EARLY_EXIT
        else:
            assert routing["early_exit"] == {"exited": False, "tokens": 12}, question
        assert message.text == (CLOUD_TEXT if low else "".join(_words(12)))
    assert len(ollama_server.requests_to("/api/chat")) == 24
    assert len(bedrock_server.requests) == 16
    assert budget.reserved == 0


async def test_concurrent_exits_beyond_the_budget_serve_the_whole_local_answer(
    ollama_chat, cloud, ollama_backend, ollama_server, bedrock_server
):
    values = [-0.05] * 10
    values[3] = -6.0  # exits after 4 tokens
    rules = {}
    for i in range(13):
        question = f"budget q{i:02d} end"
        rules[question] = ollama_backend.add_answer(
            lambda r, q=question: r.messages[-1]["content"] == q, _words(10), logprobs=values,
            token_delay=0.01)
    bedrock_server.add_answer("budget", CLOUD_TEXT, latency=0.5)  # all reserve before a commit
    # One escalation's reservation, measured on a budget of its own.
    probe = ConfidenceRoutedLLM(local=ollama_chat(), cloud=cloud, signal="min_logprob",
                                budget=CloudBudget(max_usd=5.0), cloud_retry=NO_RETRY)
    bound = _routing(await probe.ainvoke("budget q12 end"))["budget_reserved_usd"]
    budget = CloudBudget(max_usd=bound * 5.5)
    router = ConfidenceRoutedLLM(local=ollama_chat(), cloud=cloud, signal="min_logprob",
                                 budget=budget, early_exit=True, cloud_retry=NO_RETRY)
    questions = [f"budget q{i:02d} end" for i in range(12)]
    cloud_before = len(bedrock_server.requests)

    async def one(i: int, question: str) -> Any:
        if i % 2:
            return await router.ainvoke(question)
        return _merged([c async for c in router.astream(question)])

    messages = await asyncio.gather(*(one(i, q) for i, q in enumerate(questions)))
    escalated = refused = 0
    for question, message in zip(questions, messages):
        routing = _routing(message)
        assert routing["early_exit"] == {"exited": True, "tokens": 4}, question
        if routing["decision"] == "cloud":
            escalated += 1
            assert message.text == CLOUD_TEXT
            assert rules[question].calls == 1, question  # stopped, never regenerated
        else:
            refused += 1
            assert routing["reason"] == Reason.BUDGET_EXCEEDED, question
            assert routing["flagged"] is True
            assert message.text == "".join(_words(10)), question  # the whole answer
            assert rules[question].calls == 2, question  # stopped, then generated in full
            assert routing["signals"]["token_count"] == 10
    assert escalated == 5 and refused == 7
    cloud_questions = [r["last_user_text"] for r in bedrock_server.requests[cloud_before:]]
    assert len(cloud_questions) == 5 and len(set(cloud_questions)) == 5
    assert budget.reserved == 0 and 0 < budget.spent <= budget.max_usd
