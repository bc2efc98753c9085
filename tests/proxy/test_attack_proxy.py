"""The routing proxy attacked on the router's promises, counted on the fake servers.

Each test drives the proxy over real HTTP (uvicorn on loopback) with the router built from
settings and pointed at the test bed, and counts what the scripted Ollama server and the fake
Bedrock server actually received: a hung local model, clients that hang up mid-stream,
personal data in every corner of a request, a budget cap under concurrent clients (one
process, and two workers sharing Redis), a throttled cloud, and many concurrent clients.
"""

from __future__ import annotations

import asyncio
import base64
import json
import sys
import threading
import time
from typing import Any

import httpx
import pytest

from confidence_router.proxy.config import ProxyConfig

CONFIDENT = -0.05  # confidence ~ 0.95: kept local
UNSURE = -2.5  # confidence ~ 0.12: escalated
LOCAL_TIMEOUT = 0.5

# Personal data (valid checksums, so the guard's validators accept them as real).
EMAIL = "jane.doe@example.com"
IBAN = "DE89 3704 0044 0532 0130 00"
CARD = "4111 1111 1111 1111"
CARD_DIGITS = "4111111111111111"
PII_NEEDLES = ("jane.doe", "example.com", "DE89", "3704 0044", "370400440532013000", "4111")


def _post(proxy: Any, path: str, body: dict[str, Any], timeout: float = 30) -> httpx.Response:
    return httpx.post(proxy.url + path, json=body, timeout=timeout)


def _user(text: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": text}]


def _router_threads() -> list[threading.Thread]:
    """The router's threads that run a call (a tier, a knowledge-store operation)."""
    return [t for t in threading.enumerate() if t.name.startswith("confidence-router")
            and t.name != "confidence-router-redis-recheck"]


def _running(filename_part: str) -> list[str]:
    """Names of the threads whose stack is inside a file whose path contains ``filename_part``
    (e.g. the scripted backend: a thread still producing the hung local answer)."""
    names = {t.ident: t.name for t in threading.enumerate()}
    found = []
    for ident, frame in sys._current_frames().items():
        walk = frame
        while walk is not None:
            if filename_part in walk.f_code.co_filename:
                found.append(f"{names.get(ident, ident)} in {walk.f_code.co_name}")
                break
            walk = walk.f_back
    return found


def _wait_for(predicate: Any, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return bool(predicate())


def _settle_count(read: Any, timeout: float = 5.0) -> int:
    """Wait until a server-side counter stops changing (the stream finished or was closed)."""
    deadline = time.monotonic() + timeout
    last = -1
    while time.monotonic() < deadline:
        count = read()
        if count == last:
            return int(count)
        last = count
        time.sleep(0.25)
    return int(read())


def _budget(proxy: Any) -> dict[str, Any]:
    snapshot = httpx.get(proxy.url + "/v1/routing/stats", timeout=10).json()["budget"]
    assert snapshot is not None, "the proxy has no budget configured"
    return dict(snapshot)


# -- 1. a hung local model -------------------------------------------------------------------


@pytest.mark.parametrize(("front", "hang"), [("openai", "before the first token"),
                                            ("ollama", "before the first token"),
                                            ("openai", "after the first token")])
def test_hung_local_model_escalates_in_bounded_time_and_leaves_no_thread(
    make_proxy, ollama_backend, ollama_server, bedrock_server, front, hang
):
    ollama_backend.add_answer("warm up", " fine", logprobs=CONFIDENT)
    if hang == "before the first token":
        ollama_backend.add_answer("hung", " never sent", logprobs=CONFIDENT, latency=60)
    else:  # one token, then the model stalls
        ollama_backend.add_answer("hung", [" first", " stalled"], logprobs=CONFIDENT,
                                  token_delay=60)
    bedrock_server.add_answer("hung", "The cloud answered.")
    proxy = make_proxy(CONFIDENCE_ROUTER_LOCAL_TIMEOUT=str(LOCAL_TIMEOUT))
    path = "/v1/chat/completions" if front == "openai" else "/api/chat"

    def ask(text: str, stream: bool) -> tuple[str, dict[str, Any], float]:
        started = time.monotonic()
        body = {"model": "m", "messages": _user(text), "stream": stream}
        reply = _post(proxy, path, body)
        elapsed = time.monotonic() - started
        assert reply.status_code == 200, reply.text
        if not stream:
            data = reply.json()
            text_out = (data["choices"][0]["message"]["content"] if front == "openai"
                        else data["message"]["content"])
            return text_out, data["routing"], elapsed
        if front == "openai":
            events = [json.loads(line[6:]) for line in reply.text.splitlines()
                      if line.startswith("data: {")]
            assert not any("error" in e for e in events), events
            text_out = "".join(e["choices"][0]["delta"].get("content") or ""
                               for e in events if e.get("choices"))
            routing = [e["routing"] for e in events if e.get("routing")][-1]
            return text_out, routing, elapsed
        lines = [json.loads(line) for line in reply.text.splitlines() if line]
        assert not any("error" in line for line in lines), lines
        return "".join(line["message"]["content"] for line in lines), lines[-1]["routing"], elapsed

    assert ask("warm up", False)[0] == " fine"
    baseline = threading.active_count()
    n = 0
    for stream in (False, True, False):
        text, routing, elapsed = ask(f"hung question {n}", stream)
        n += 1
        assert text == "The cloud answered."
        assert routing["decision"] == "cloud" and routing["reason"] == "local_error"
        assert routing["local_error_kind"] == "timeout"
        assert elapsed < 10 * LOCAL_TIMEOUT + 5, elapsed  # not hung (generous bound)
    # Exactly one cloud request per client request: the hung call was not retried there.
    assert len(bedrock_server.requests) == n
    assert len(ollama_server.requests_to("/api/chat")) == n + 1  # no local retry either
    # No thread is left running the hung call: the router's tier threads are gone and the
    # scripted server's handler noticed the hang-up (its 60 s "thinking" ended early).
    assert _wait_for(lambda: not _router_threads()), [t.name for t in _router_threads()]
    assert _wait_for(lambda: not _running("testing/scripted.py"), timeout=5), _running(
        "testing/scripted.py")
    assert _wait_for(lambda: threading.active_count() <= baseline + 1), (
        baseline, [t.name for t in threading.enumerate()])
    # The warm-up's token, and the stalled answers' first tokens: nothing after the stall.
    assert ollama_backend.generated_tokens == 1 + (n if hang == "after the first token" else 0)


# -- 2. a client that hangs up mid-stream ----------------------------------------------------

N_PIECES = 200
PIECE_DELAY = 0.01  # the whole answer would take ~2 s


@pytest.mark.parametrize("front", ["openai", "ollama"])
def test_client_hang_up_mid_stream_stops_the_cloud_stream_and_settles_the_budget(
    make_proxy, ollama_backend, bedrock_server, front
):
    ollama_backend.add_answer("story", " dunno", logprobs=UNSURE)
    bedrock_server.add_answer("story", [f" w{i}" for i in range(N_PIECES)],
                              piece_delay=PIECE_DELAY, input_tokens=20, output_tokens=N_PIECES)
    proxy = make_proxy(config=ProxyConfig(budget_usd=10.0),
                       CONFIDENCE_ROUTER_CLOUD_MAX_TOKENS="1024")
    path = "/v1/chat/completions" if front == "openai" else "/api/chat"
    body = {"model": "m", "messages": _user("Tell a long story"), "stream": True}
    with httpx.Client(timeout=30) as client, client.stream("POST", proxy.url + path,
                                                           json=body) as reply:
        assert reply.status_code == 200
        assert reply.headers["x-confidence-router-decision"] == "cloud"
        for line in reply.iter_lines():
            if ("w0" in line) if front == "ollama" else (line.startswith("data: {")
                                                         and "w0" in line):
                break
        else:
            pytest.fail("no first chunk")
        at_hang_up = bedrock_server.sent_pieces
    # Leaving the block closed the connection mid-answer.
    sent = _settle_count(lambda: bedrock_server.sent_pieces)
    assert len(bedrock_server.requests) == 1
    assert sent < N_PIECES // 2, (at_hang_up, sent)  # the cloud stream was closed early
    # The reservation made for the escalation is settled: nothing stays reserved.
    assert _wait_for(lambda: _budget(proxy)["pending"] == 0), _budget(proxy)
    budget = _budget(proxy)
    assert budget["reserved_usd"] == 0 and budget["granted"] == 1
    # A request that reached the cloud may have been billed: its reservation is spent.
    assert budget["spent_usd"] > 0


def test_many_clients_hanging_up_mid_stream_on_two_workers_leave_no_reservation(
    make_proxy, ollama_backend, bedrock_server, redis_url
):
    from confidence_router.redis_state import RedisCloudBudget, redis_client

    n_clients = 8
    ollama_backend.add_answer("story", " dunno", logprobs=UNSURE)
    bedrock_server.add_answer("story", [f" w{i}" for i in range(N_PIECES)],
                              piece_delay=PIECE_DELAY, input_tokens=20, output_tokens=N_PIECES)
    config = ProxyConfig(budget_usd=10.0, redis_url=redis_url, redis_prefix="hangups")
    workers = [make_proxy(config=config, CONFIDENCE_ROUTER_CLOUD_MAX_TOKENS="1024")
               for _ in range(2)]

    async def run() -> list[str]:
        async def hang_up_after_first_chunk(i: int) -> str:
            path = "/v1/chat/completions" if i % 2 else "/api/chat"
            body = {"model": "m", "messages": _user(f"Tell a long story {i}"), "stream": True}
            async with httpx.AsyncClient(timeout=30) as client, client.stream(
                "POST", workers[i % 2].url + path, json=body
            ) as reply:
                async for line in reply.aiter_lines():
                    if "w0" in line:
                        return reply.headers["x-confidence-router-decision"]
            return "no first chunk"

        return list(await asyncio.gather(*(hang_up_after_first_chunk(i)
                                           for i in range(n_clients))))

    assert asyncio.run(run()) == ["cloud"] * n_clients
    sent = _settle_count(lambda: bedrock_server.sent_pieces)
    assert len(bedrock_server.requests) == n_clients
    assert sent < n_clients * N_PIECES // 2, sent  # every cloud stream was closed early
    shared = RedisCloudBudget(redis_client(redis_url), 10.0, prefix="hangups")
    assert _wait_for(lambda: shared.snapshot()["pending"] == 0), shared.snapshot()
    snapshot = shared.snapshot()
    assert snapshot["reserved_usd"] == 0 and snapshot["granted"] == n_clients
    assert snapshot["spent_usd"] > 0


def _send_and_hang_up(proxy: Any, path: str, body: dict[str, Any], until: Any) -> None:
    """Send a request on a raw socket and close the connection once ``until()`` is true,
    before reading anything (a client that gave up while the proxy was still deciding)."""
    import socket

    payload = json.dumps(body).encode()
    head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(payload)}\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
        sock.sendall(head + payload)
        assert _wait_for(until)


@pytest.mark.parametrize("stream", [True, False])
def test_client_hang_up_before_the_answer_settles_the_budget(
    make_proxy, ollama_backend, bedrock_server, stream
):
    ollama_backend.add_answer("story", " dunno", logprobs=UNSURE)
    bedrock_server.add_answer("story", [f" w{i}" for i in range(N_PIECES)], latency=0.8,
                              piece_delay=PIECE_DELAY, input_tokens=20, output_tokens=N_PIECES)
    proxy = make_proxy(config=ProxyConfig(budget_usd=10.0),
                       CONFIDENCE_ROUTER_CLOUD_MAX_TOKENS="1024")
    _send_and_hang_up(proxy, "/v1/chat/completions",
                      {"model": "m", "messages": _user("Tell a long story"), "stream": stream},
                      until=lambda: len(bedrock_server.requests) == 1)  # the cloud is working
    sent = _settle_count(lambda: bedrock_server.sent_pieces)
    if stream:
        assert sent < N_PIECES // 2, sent  # the cloud stream was closed early
    assert _wait_for(lambda: _budget(proxy)["pending"] == 0), _budget(proxy)
    budget = _budget(proxy)
    assert budget["reserved_usd"] == 0 and budget["granted"] == 1
    assert len(bedrock_server.requests) == 1


def test_cloud_failure_mid_stream_is_not_retried_after_output_was_sent(
    make_proxy, ollama_backend, bedrock_server
):
    ollama_backend.add_answer("Australia", " Sydney", logprobs=UNSURE)
    bedrock_server.add_answer("Australia", "The capital is Canberra, not Sydney.")
    bedrock_server.fail("Australia", "ServiceUnavailableException", after_pieces=2)
    proxy = make_proxy(config=ProxyConfig(budget_usd=1.0))
    for front in ("openai", "ollama"):
        path = "/v1/chat/completions" if front == "openai" else "/api/chat"
        reply = _post(proxy, path, {"model": "m", "stream": True,
                                    "messages": _user("Capital of Australia?")})
        assert reply.status_code == 200
        if front == "openai":
            events = [json.loads(line[6:]) for line in reply.text.splitlines()
                      if line.startswith("data: {")]
            text = "".join(e["choices"][0]["delta"].get("content") or ""
                           for e in events if e.get("choices"))
            assert "error" in events[-1]
        else:
            lines = [json.loads(line) for line in reply.text.splitlines() if line]
            text = "".join(line["message"]["content"] for line in lines if "message" in line)
            assert "error" in lines[-1]
        # A retry would resend the answer's start: the client would read it twice.
        assert text == "The capital", (front, text)
    assert len(bedrock_server.requests) == 2  # one per client request
    budget = _budget(proxy)
    assert budget["reserved_usd"] == 0 and budget["pending"] == 0 and budget["granted"] == 2


@pytest.mark.parametrize("stream", [False, True])
def test_proxy_time_limit_during_an_escalation_settles_the_budget_and_frees_threads(
    make_proxy, ollama_backend, bedrock_server, stream
):
    """The proxy's own time limit cuts an escalation short (504, or an error event once the
    stream has started): the reservation is settled and no tier thread is left behind."""
    ollama_backend.add_answer("story", " dunno", logprobs=UNSURE)
    if stream:  # the limit falls in the middle of the cloud's stream
        bedrock_server.add_answer("story", [f" w{i}" for i in range(N_PIECES)],
                                  piece_delay=PIECE_DELAY * 2, output_tokens=N_PIECES)
    else:  # the limit falls while the cloud is still thinking
        bedrock_server.add_answer("story", "late", latency=2.0)
    proxy = make_proxy(config=ProxyConfig(budget_usd=10.0, timeout_s=1.0),
                       CONFIDENCE_ROUTER_CLOUD_MAX_TOKENS="1024")
    reply = _post(proxy, "/v1/chat/completions",
                  {"model": "m", "messages": _user("Tell a long story"), "stream": stream})
    if stream:
        assert reply.status_code == 200
        last = json.loads([line for line in reply.text.splitlines()
                           if line.startswith("data: {")][-1][6:])
        assert last["error"]["code"] == "timeout", last
        assert _settle_count(lambda: bedrock_server.sent_pieces) < N_PIECES
    else:
        assert reply.status_code == 504 and reply.json()["error"]["code"] == "timeout"
    assert len(bedrock_server.requests) == 1
    assert _wait_for(lambda: _budget(proxy)["pending"] == 0), _budget(proxy)
    budget = _budget(proxy)
    assert budget["reserved_usd"] == 0 and budget["granted"] == 1
    assert budget["spent_usd"] > 0  # the request reached the cloud: it may have been billed
    assert _wait_for(lambda: not _router_threads()), [t.name for t in _router_threads()]


# -- 3. personal data never reaches the cloud ------------------------------------------------

_PNG = base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\x00" * 32).decode()

OPENAI_LEAKS = {
    "tool-call arguments": [
        {"role": "user", "content": "Send the report"},
        {"role": "assistant", "content": None, "tool_calls": [{
            "id": "call_1", "type": "function",
            "function": {"name": "send_mail", "arguments": json.dumps({"to": EMAIL})}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "done"},
        {"role": "user", "content": "What next?"},
    ],
    "card as a JSON number in arguments": [
        {"role": "user", "content": "Pay it"},
        {"role": "assistant", "content": "", "tool_calls": [{
            "id": "call_2", "type": "function",
            "function": {"name": "pay", "arguments": '{"card": ' + CARD_DIGITS + '}'}}]},
        {"role": "tool", "tool_call_id": "call_2", "content": "ok"},
        {"role": "user", "content": "What next?"},
    ],
    "tool result": [
        {"role": "user", "content": "Look up the account"},
        {"role": "assistant", "content": "", "tool_calls": [{
            "id": "call_3", "type": "function",
            "function": {"name": "lookup", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "call_3", "content": f"account {IBAN}"},
        {"role": "user", "content": "What next?"},
    ],
    "tool result as parts": [
        {"role": "user", "content": "Look up the account"},
        {"role": "assistant", "content": "", "tool_calls": [{
            "id": "call_4", "type": "function",
            "function": {"name": "lookup", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "call_4",
         "content": [{"type": "text", "text": "card "}, {"type": "text", "text": CARD}]},
        {"role": "user", "content": "What next?"},
    ],
    "user text part": [
        {"role": "user", "content": [{"type": "text", "text": "My card is"},
                                     {"type": "text", "text": f" {CARD}. What next?"}]},
    ],
    "email split across parts": [
        {"role": "user", "content": [{"type": "text", "text": "write to jane.doe@"},
                                     {"type": "text", "text": "example.com What next?"}]},
    ],
    "image part": [
        {"role": "user", "content": [
            {"type": "text", "text": "What next?"},
            {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{_PNG}"}}]},
    ],
    "assistant refusal part": [
        {"role": "user", "content": "Who?"},
        {"role": "assistant", "content": [{"type": "refusal", "refusal": f"not {EMAIL}"}]},
        {"role": "user", "content": "What next?"},
    ],
    "system message": [
        {"role": "system", "content": f"The user is {EMAIL}."},
        {"role": "user", "content": "What next?"},
    ],
    "developer message parts": [
        {"role": "developer", "content": [{"type": "text", "text": f"IBAN {IBAN}"}]},
        {"role": "user", "content": "What next?"},
    ],
}

_TOOL = {"type": "function", "function": {
    "name": "lookup", "description": "Look an account up",
    "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}}}

# Personal data outside the messages: request fields the cloud client would send too.
OPENAI_BODY_LEAKS: dict[str, dict[str, Any]] = {
    "stop sequence": {"stop": [EMAIL]},
    "tool definition": {"tools": [{"type": "function", "function": {
        "name": "lookup", "description": f"Default account {IBAN}",
        "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}}}]},
    "tool parameter default": {"tools": [{"type": "function", "function": {
        "name": "pay", "parameters": {"type": "object", "properties": {
            "card": {"type": "string", "default": CARD}}}}}]},
    "tool call id": {"tools": [_TOOL], "messages": [
        {"role": "user", "content": "Look it up"},
        {"role": "assistant", "content": "", "tool_calls": [{
            "id": CARD_DIGITS, "type": "function",
            "function": {"name": "lookup", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": CARD_DIGITS, "content": "nothing"},
        {"role": "user", "content": "What next?"}]},
}

OLLAMA_BODY_LEAKS: dict[str, dict[str, Any]] = {
    "options.stop": {"options": {"stop": [EMAIL]}},
    "tool definition": {"tools": [{"type": "function", "function": {
        "name": "lookup", "description": f"Default account {IBAN}",
        "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}}}]},
}

OLLAMA_LEAKS = {
    "tool call": [
        {"role": "user", "content": "Send it"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"function": {"name": "send_mail", "arguments": {"to": EMAIL}}}]},
        {"role": "tool", "tool_name": "send_mail", "content": "done"},
        {"role": "user", "content": "What next?"},
    ],
    "tool call with a numeric card": [
        {"role": "user", "content": "Pay"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"function": {"name": "pay", "arguments": {"card": int(CARD_DIGITS)}}}]},
        {"role": "tool", "tool_name": "pay", "content": "ok"},
        {"role": "user", "content": "What next?"},
    ],
    "tool result": [
        {"role": "user", "content": "Look up"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"function": {"name": "lookup", "arguments": {}}}]},
        {"role": "tool", "tool_name": "lookup", "content": f"IBAN {IBAN}"},
        {"role": "user", "content": "What next?"},
    ],
    "image": [{"role": "user", "content": "What next?", "images": [_PNG]}],
    "system": [{"role": "system", "content": f"Card {CARD}"},
               {"role": "user", "content": "What next?"}],
}


@pytest.fixture
def guarded_proxy(testbed_settings_env, serve_proxy):
    """The proxy serving a router built from the test bed's settings with a PIIGuard (the
    proxy's own configuration has no guard setting: an application embedding the app passes
    its router to ``create_app``)."""
    from confidence_router.guards import PIIGuard
    from confidence_router.proxy.app import create_app
    from confidence_router.router import ConfidenceRoutedLLM

    router = ConfidenceRoutedLLM.from_settings(
        environ=testbed_settings_env, escalation_guard=PIIGuard(),
    )
    return serve_proxy(create_app(router, config=ProxyConfig()))


def _carries_pii(request: dict[str, Any]) -> bool:
    text = json.dumps(request["body"])
    return any(needle in text for needle in PII_NEEDLES)


@pytest.mark.parametrize("stream", [False, True])
def test_personal_data_anywhere_in_a_request_never_reaches_the_cloud(
    guarded_proxy, ollama_backend, bedrock_server, stream
):
    ollama_backend.add_answer(None, " local guess", logprobs=UNSURE)
    bedrock_server.add_answer(None, "cloud answer")
    # A clean, unsure question does escalate through this proxy (the guard is not a no-op).
    control = _post(guarded_proxy, "/v1/chat/completions",
                    {"model": "m", "messages": _user("What next?")})
    assert control.json()["routing"]["decision"] == "cloud"
    assert len(bedrock_server.requests) == 1
    outcomes = {}
    openai_bodies = [(name, {"messages": messages}) for name, messages in OPENAI_LEAKS.items()]
    openai_bodies += [(name, {"messages": _user("What next?"), **extra})
                      for name, extra in OPENAI_BODY_LEAKS.items()]
    for name, extra in openai_bodies:
        reply = _post(guarded_proxy, "/v1/chat/completions",
                      {"model": "m", "stream": stream, **extra})
        assert reply.status_code == 200, (name, reply.text)
        if stream:
            events = [json.loads(line[6:]) for line in reply.text.splitlines()
                      if line.startswith("data: {")]
            text = "".join(e["choices"][0]["delta"].get("content") or ""
                           for e in events if e.get("choices"))
            routing = [e["routing"] for e in events if e.get("routing")][-1]
        else:
            text = reply.json()["choices"][0]["message"]["content"]
            routing = reply.json()["routing"]
        outcomes[f"openai {name}"] = (text, routing["decision"],
                                      routing.get("escalation_skipped", ""))
    ollama_bodies = [(name, {"messages": messages}) for name, messages in OLLAMA_LEAKS.items()]
    ollama_bodies += [(name, {"messages": _user("What next?"), **extra})
                      for name, extra in OLLAMA_BODY_LEAKS.items()]
    for name, extra in ollama_bodies:
        reply = _post(guarded_proxy, "/api/chat", {"model": "m", "stream": stream, **extra})
        assert reply.status_code == 200, (name, reply.text)
        lines = [json.loads(line) for line in reply.text.splitlines() if line]
        text = "".join(line["message"]["content"] for line in lines)
        routing = lines[-1]["routing"]
        outcomes[f"ollama {name}"] = (text, routing["decision"],
                                      routing.get("escalation_skipped", ""))
    # A schema for structured output goes to the cloud too (as a tool): the local answer is
    # not JSON, the escalation is refused, so the documented outcome is a 502.
    schema = {"type": "object", "description": f"owner {EMAIL}",
              "properties": {"city": {"type": "string"}}}
    for path, extra in (
        ("/v1/chat/completions",
         {"response_format": {"type": "json_schema", "json_schema": {"name": "x",
                                                                     "schema": schema}}}),
        ("/api/chat", {"format": schema}),
    ):
        reply = _post(guarded_proxy, path, {"model": "m", "stream": stream,
                                            "messages": _user("What next?"), **extra})
        assert reply.status_code == 502, (path, reply.text)
        assert "structured output" in reply.text
    leaked = [r for r in bedrock_server.requests if _carries_pii(r)]
    assert leaked == []
    assert len(bedrock_server.requests) == 1  # only the control question
    # Documented outcome: the local answer, flagged with the guard's reason.
    wrong = {name: o for name, o in outcomes.items()
             if o[0] != " local guess" or o[1] != "local"
             or not o[2].startswith("escalation guard")}
    assert wrong == {}


# -- 4. the budget cap under concurrent clients ----------------------------------------------

N_CLIENTS = 10


def _measure_escalation(proxy: Any) -> tuple[float, float]:
    """(reserved estimate, actual cost) of one escalation of a ``question NN`` prompt."""
    reply = _post(proxy, "/v1/chat/completions",
                  {"model": "m", "messages": _user("question 99")})
    routing = reply.json()["routing"]
    assert routing["decision"] == "cloud"
    return routing["budget_reserved_usd"], routing["cloud_cost_usd"]


async def _concurrent_questions(urls: list[str]) -> list[httpx.Response]:
    async with httpx.AsyncClient(timeout=60) as client:
        async def ask(i: int) -> httpx.Response:
            body: dict[str, Any] = {"model": "m", "messages": _user(f"question {i:02d}"),
                                    "stream": i % 3 == 0}
            if i % 2:
                body["on_budget_exceeded"] = "raise"
            return await client.post(urls[i % len(urls)] + "/v1/chat/completions", json=body)

        return list(await asyncio.gather(*(ask(i) for i in range(N_CLIENTS))))


def _openai_result(reply: httpx.Response) -> tuple[str, dict[str, Any]]:
    """(text, routing) of a 200 OpenAI-front reply, streamed or not."""
    assert reply.status_code == 200, (reply.status_code, reply.text[:300])
    if reply.headers["content-type"].startswith("text/event-stream"):
        events = [json.loads(line[6:]) for line in reply.text.splitlines()
                  if line.startswith("data: {")]
        assert not any("error" in e for e in events), events
        text = "".join(e["choices"][0]["delta"].get("content") or ""
                       for e in events if e.get("choices"))
        return text, [e["routing"] for e in events if e.get("routing")][-1]
    data = reply.json()
    return data["choices"][0]["message"]["content"], data["routing"]


def _check_budget_outcomes(replies: list[httpx.Response], bedrock_server: Any,
                           budget: dict[str, Any], cap: float, most: int) -> None:
    results = [_openai_result(r) for r in replies if r.status_code == 200]
    served = [routing for _, routing in results if routing["decision"] == "cloud"]
    refused_local = [(text, routing) for text, routing in results
                     if routing["reason"] == "budget_exceeded"]
    refused_429 = [r for r in replies if r.status_code == 429]
    assert len(served) + len(refused_local) + len(refused_429) == N_CLIENTS, [
        (r.status_code, r.text[:200]) for r in replies]
    assert all(r.json()["error"]["code"] == "budget_exceeded" for r in refused_429)
    assert all(text == " unsure" and routing["decision"] == "local"
               for text, routing in refused_local)
    # The cap admits at most `most` escalations; each one that was served reached Bedrock once.
    assert 1 <= len(served) <= most
    assert len(bedrock_server.requests) == len(served)
    assert budget["granted"] == len(served) and budget["pending"] == 0
    assert budget["reserved_usd"] == 0
    spent = sum(routing["cloud_cost_usd"] for routing in served)
    assert budget["spent_usd"] == pytest.approx(spent, rel=1e-9, abs=1e-12)
    assert budget["spent_usd"] <= cap + 1e-12


def _budget_testbed(ollama_backend: Any, bedrock_server: Any) -> None:
    ollama_backend.add_answer("question", " unsure", logprobs=-3.0, latency=0.05)
    bedrock_server.add_answer("question", "cloud", input_tokens=10, output_tokens=10,
                              latency=0.3)


def test_budget_cap_holds_under_concurrent_clients(make_proxy, ollama_backend, bedrock_server):
    _budget_testbed(ollama_backend, bedrock_server)
    estimate, actual = _measure_escalation(make_proxy(config=ProxyConfig(budget_usd=1.0)))
    assert 0 < actual < estimate
    bedrock_server.clear_requests()
    # Sequentially the k-th escalation fits iff (k - 1) * actual + estimate <= cap: k <= 3.
    cap = estimate + 2.5 * actual
    proxy = make_proxy(config=ProxyConfig(budget_usd=cap))
    replies = asyncio.run(_concurrent_questions([proxy.url]))
    _check_budget_outcomes(replies, bedrock_server, _budget(proxy), cap, most=3)


def test_shared_budget_cap_holds_across_two_workers(
    make_proxy, ollama_backend, bedrock_server, redis_url
):
    from confidence_router.redis_state import RedisCloudBudget, redis_client

    _budget_testbed(ollama_backend, bedrock_server)
    estimate, actual = _measure_escalation(make_proxy(config=ProxyConfig(budget_usd=1.0)))
    bedrock_server.clear_requests()
    cap = estimate + 2.5 * actual
    config = ProxyConfig(budget_usd=cap, redis_url=redis_url, redis_prefix="attack")
    workers = [make_proxy(config=config), make_proxy(config=config)]  # one router each
    replies = asyncio.run(_concurrent_questions([w.url for w in workers]))
    shared = RedisCloudBudget(redis_client(redis_url), cap, prefix="attack").snapshot()
    _check_budget_outcomes(replies, bedrock_server, shared, cap, most=3)
    assert _budget(workers[0])["spent_usd"] == pytest.approx(shared["spent_usd"])


def test_hung_redis_costs_one_socket_timeout_not_one_per_command(
    make_proxy, ollama_backend, bedrock_server
):
    """Redis stops answering (SIGSTOP): the budget fails closed, stats and calibrator are
    dropped, and the proxy keeps serving. The router calls the shared state synchronously on
    the event loop, so each command that waits out the 2 s socket timeout stalls every client
    of the worker: after the first timeout, commands must fail at once (until Redis answers
    again), or N clients wait ~N x 2 x 2 s (measured: 16 escalations, /healthz ~60 s)."""
    import os
    import signal

    from confidence_router.testing.processes import RedisServerProcess, start_or_skip

    ollama_backend.add_answer("escalate", " unsure", logprobs=UNSURE)
    bedrock_server.add_answer("escalate", "cloud")
    server = start_or_skip(RedisServerProcess())
    try:
        proxy = make_proxy(config=ProxyConfig(budget_usd=1.0, redis_url=server.url,
                                              redis_prefix="hung"))
        first = _post(proxy, "/v1/chat/completions",
                      {"model": "m", "messages": _user("escalate 0")})
        assert _openai_result(first)[1]["decision"] == "cloud"
        os.kill(server.pid, signal.SIGSTOP)
        try:
            async def run() -> tuple[list[httpx.Response], float]:
                async with httpx.AsyncClient(timeout=120) as client:
                    async def health() -> float:
                        await asyncio.sleep(0.5)  # while the escalations are in flight
                        started = time.monotonic()
                        assert (await client.get(proxy.url + "/healthz")).status_code == 200
                        return time.monotonic() - started

                    asks = [client.post(proxy.url + "/v1/chat/completions", json={
                        "model": "m", "messages": _user(f"escalate {i}")})
                        for i in range(1, 17)]
                    *replies, waited = await asyncio.gather(*asks, health())
                    return replies, waited

            started = time.monotonic()
            replies, healthz_s = asyncio.run(run())
            elapsed = time.monotonic() - started
        finally:
            os.kill(server.pid, signal.SIGCONT)
        for reply in replies:
            text, routing = _openai_result(reply)
            assert text == " unsure" and routing["reason"] == "budget_exceeded"
        assert len(bedrock_server.requests) == 1  # no spend without a cap
        # Generous: 10 socket timeouts in all; each command waiting its own is ~60 s.
        assert elapsed < 20.0 and healthz_s < 10.0, (elapsed, healthz_s)
        # Redis answers again: escalations resume (the fail-fast state does not stick).
        assert _wait_for(lambda: _openai_result(_post(proxy, "/v1/chat/completions", {
            "model": "m", "messages": _user("escalate 99")}))[1]["decision"] == "cloud",
            timeout=15)
    finally:
        server.stop()


def test_redis_client_fails_fast_while_redis_hangs_and_recovers():
    import os
    import signal

    import redis

    from confidence_router.errors import InvalidArgumentError
    from confidence_router.redis_state import redis_client
    from confidence_router.testing.processes import RedisServerProcess, start_or_skip

    for bad in (0, -1.0, float("nan"), True, "1"):
        with pytest.raises(InvalidArgumentError):
            redis_client("redis://127.0.0.1:1", recheck_s=bad)
    server = start_or_skip(RedisServerProcess())
    try:
        client = redis_client(server.url, socket_timeout=0.5, socket_connect_timeout=0.5,
                              recheck_s=0.2)
        waits = redis_client(server.url, socket_timeout=0.5, socket_connect_timeout=0.5,
                             recheck_s=None)
        assert client.ping() and waits.ping()
        os.kill(server.pid, signal.SIGSTOP)
        try:
            with pytest.raises(redis.TimeoutError):
                client.ping()  # the first command waits out its timeout ...
            started = time.monotonic()
            for _ in range(20):  # ... the next ones fail at once (20 timeouts would be 10 s)
                with pytest.raises(redis.ConnectionError, match="failing fast"):
                    client.set("k", "v")
            assert time.monotonic() - started < 5.0
            with pytest.raises(redis.TimeoutError):
                waits.ping()  # recheck_s=None: every command waits
            with pytest.raises(redis.TimeoutError):
                waits.ping()
        finally:
            os.kill(server.pid, signal.SIGCONT)
        assert _wait_for(lambda: _answers(client), timeout=10)
        assert client.get("k") is None  # nothing was written while failing fast
    finally:
        server.stop()


def _answers(client: Any) -> bool:
    try:
        return bool(client.ping())
    except Exception:  # noqa: BLE001 - still failing fast
        return False


# -- 5. a throttled cloud --------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
def test_throttled_cloud_is_tried_exactly_the_documented_number_of_times(
    make_proxy, ollama_backend, bedrock_server, stream
):
    from confidence_router.router import ConfidenceRoutedLLM

    attempts = ConfidenceRoutedLLM.model_fields["cloud_retry"].default_factory().max_attempts
    ollama_backend.add_answer("throttle", " local", logprobs=UNSURE)
    bedrock_server.fail("throttle", "ThrottlingException")
    proxy = make_proxy(config=ProxyConfig(budget_usd=1.0))
    body = {"model": "m", "messages": _user("throttle me"), "stream": stream,
            "on_cloud_error": "local"}
    reply = _post(proxy, "/v1/chat/completions", body)
    assert reply.status_code == 200, reply.text
    if stream:
        events = [json.loads(line[6:]) for line in reply.text.splitlines()
                  if line.startswith("data: {")]
        routing = [e["routing"] for e in events if e.get("routing")][-1]
    else:
        routing = reply.json()["routing"]
    assert routing["reason"] == "cloud_error" and routing["cloud_error_kind"] == "throttled"
    # No retries stacked under the router's: one HTTP request per counted attempt.
    assert len(bedrock_server.requests) == attempts == routing["cloud_attempts"]
    # Refused requests are not billed: every reservation was released.
    budget = _budget(proxy)
    assert budget["spent_usd"] == 0 and budget["reserved_usd"] == 0
    assert budget["granted"] == attempts and budget["pending"] == 0
    # The default policy (raise): a 502 after the same number of attempts.
    bedrock_server.clear_requests()
    failed = _post(proxy, "/v1/chat/completions",
                   {"model": "m", "messages": _user("throttle me"), "stream": stream})
    if stream:
        assert '"cloud_error"' in failed.text or failed.status_code == 502, failed.text
    else:
        assert failed.status_code == 502 and failed.json()["error"]["code"] == "cloud_error"
    assert len(bedrock_server.requests) == attempts


def test_timed_out_cloud_attempt_is_sent_once_and_kept_as_spent(
    make_proxy, ollama_backend, bedrock_server
):
    """A read timeout is the retry botocore would add on its own: the router's clients send
    the request once (a timed-out request may have been billed: not retried by default)."""
    ollama_backend.add_answer("slow", " local", logprobs=UNSURE)
    bedrock_server.add_answer("slow", "too late", latency=3.0)
    proxy = make_proxy(config=ProxyConfig(budget_usd=1.0), CONFIDENCE_ROUTER_CLOUD_TIMEOUT="0.5")
    started = time.monotonic()
    reply = _post(proxy, "/v1/chat/completions", {"model": "m", "messages": _user("slow one"),
                                                  "on_cloud_error": "local"})
    assert time.monotonic() - started < 10 * 0.5 + 5  # not hung (generous bound)
    routing = _openai_result(reply)[1]
    assert routing["reason"] == "cloud_error" and routing["cloud_error_kind"] == "timeout"
    assert routing["cloud_attempts"] == 1
    assert _wait_for(lambda: len(bedrock_server.requests) >= 1)
    time.sleep(0.5)  # a stacked client retry would arrive right after the timeout
    assert len(bedrock_server.requests) == 1
    budget = _budget(proxy)
    assert budget["reserved_usd"] == 0 and budget["pending"] == 0
    assert budget["spent_usd"] == pytest.approx(routing["budget_reserved_usd"])


def test_redis_down_refuses_escalations_without_spending(
    make_proxy, ollama_backend, bedrock_server
):
    """With the shared budget on Redis, a Redis that is gone means no cap: the budget fails
    closed (documented: the escalation is refused and ``on_budget_exceeded`` applies), so
    nothing is spent, and local answers are still served."""
    from confidence_router.testing.processes import RedisServerProcess, start_or_skip

    ollama_backend.add_answer("kept", " local", logprobs=CONFIDENT)
    ollama_backend.add_answer("escalate", " unsure", logprobs=UNSURE)
    bedrock_server.add_answer("escalate", "cloud")
    server = start_or_skip(RedisServerProcess())
    try:
        proxy = make_proxy(config=ProxyConfig(budget_usd=1.0, redis_url=server.url,
                                              redis_prefix="down"))
        first = _post(proxy, "/v1/chat/completions",
                      {"model": "m", "messages": _user("escalate 1")})
        assert _openai_result(first)[1]["decision"] == "cloud"
    finally:
        server.stop()
    for stream in (False, True):
        served = _post(proxy, "/v1/chat/completions",
                       {"model": "m", "messages": _user("escalate 2"), "stream": stream})
        text, routing = _openai_result(served)
        assert text == " unsure" and routing["reason"] == "budget_exceeded"
        refused = _post(proxy, "/v1/chat/completions",
                        {"model": "m", "messages": _user("escalate 3"), "stream": stream,
                         "on_budget_exceeded": "raise"})
        assert refused.status_code == 429, refused.text
        assert refused.json()["error"]["code"] == "budget_exceeded"
    assert len(bedrock_server.requests) == 1
    kept = _post(proxy, "/v1/chat/completions", {"model": "m", "messages": _user("kept 3")})
    assert kept.status_code == 200 and _openai_result(kept)[0] == " local"
    assert httpx.get(proxy.url + "/readyz", timeout=10).status_code == 503


# -- 6. many concurrent clients --------------------------------------------------------------

N_CONCURRENT = 48


def test_48_concurrent_clients_all_get_an_answer(make_proxy, ollama_backend, bedrock_server):
    ollama_backend.add_answer("local", " kept", logprobs=CONFIDENT, latency=0.05)
    ollama_backend.add_answer("cloud", " unsure", logprobs=UNSURE, latency=0.05)
    bedrock_server.add_answer("cloud", "from the cloud", latency=0.05)
    proxy = make_proxy()

    async def run() -> list[tuple[int, str, str]]:
        limits = httpx.Limits(max_connections=N_CONCURRENT * 2)

        async def ask(client: httpx.AsyncClient, i: int) -> tuple[int, str, str]:
            kind = "cloud" if i % 3 == 0 else "local"
            stream = i % 2 == 0
            path = "/v1/chat/completions" if i % 4 < 2 else "/api/chat"
            body = {"model": "m", "stream": stream,
                    "messages": _user(f"{kind} question {i}")}
            reply = await client.post(proxy.url + path, json=body)
            text = reply.text
            if path == "/api/chat":
                lines = [json.loads(line) for line in text.splitlines() if line]
                content = "".join(line["message"]["content"] for line in lines)
            elif stream:
                content = "".join(
                    json.loads(line[6:])["choices"][0]["delta"].get("content") or ""
                    for line in text.splitlines()
                    if line.startswith("data: {") and '"choices": [{' in line)
            else:
                content = reply.json()["choices"][0]["message"]["content"]
            return reply.status_code, kind, content

        async with httpx.AsyncClient(timeout=60, limits=limits) as client:
            return list(await asyncio.gather(*(ask(client, i) for i in range(N_CONCURRENT)),
                                             return_exceptions=False))

    results = asyncio.run(run())
    assert len(results) == N_CONCURRENT
    assert [r for r in results if r[0] != 200] == []
    expected = {"cloud": "from the cloud", "local": " kept"}
    assert [r for r in results if r[2] != expected[r[1]]] == []
    n_cloud = sum(1 for r in results if r[1] == "cloud")
    assert len(bedrock_server.requests) == n_cloud


def test_48_concurrent_clients_behind_a_hung_local_model(
    make_proxy, ollama_backend, bedrock_server
):
    """Every client of a proxy whose local model hangs gets the cloud's answer, each costs one
    cloud request, and no thread is left behind (the router's nor the hung server's)."""
    ollama_backend.add_answer("hung", " never sent", logprobs=CONFIDENT, latency=60)
    bedrock_server.add_answer("hung", "The cloud answered.", latency=0.05)
    proxy = make_proxy(CONFIDENCE_ROUTER_LOCAL_TIMEOUT=str(LOCAL_TIMEOUT))

    async def run() -> list[tuple[int, str]]:
        async def ask(client: httpx.AsyncClient, i: int) -> tuple[int, str]:
            body = {"model": "m", "stream": i % 2 == 0, "messages": _user(f"hung {i}")}
            reply = await client.post(proxy.url + "/v1/chat/completions", json=body)
            if reply.status_code != 200:
                return reply.status_code, reply.text[:200]
            return 200, _openai_result(reply)[0]

        limits = httpx.Limits(max_connections=N_CONCURRENT * 2)
        async with httpx.AsyncClient(timeout=60, limits=limits) as client:
            return list(await asyncio.gather(*(ask(client, i) for i in range(N_CONCURRENT))))

    started = time.monotonic()
    results = asyncio.run(run())
    elapsed = time.monotonic() - started
    assert [r for r in results if r != (200, "The cloud answered.")] == []
    assert elapsed < 10 * LOCAL_TIMEOUT + 20, elapsed  # not hung (generous bound)
    assert len(bedrock_server.requests) == N_CONCURRENT
    assert _wait_for(lambda: not _router_threads()), [t.name for t in _router_threads()]
    assert _wait_for(lambda: not _running("testing/scripted.py"), timeout=5), _running(
        "testing/scripted.py")
