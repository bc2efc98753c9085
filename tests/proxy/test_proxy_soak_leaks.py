"""The proxy, a long-running server, must not accumulate clients or sockets per request.

Found by ``benchmarks/soak.py --proxy``: requests with ``tools`` or a JSON-schema
``response_format`` bind tools on the router per request, and each one left a rebuilt
ChatOllama (two new httpx clients, a kept-alive socket) on the server's event loop.
Counts, not timings: live ChatOllama / httpx clients and open file descriptors before and
after, and what the scripted local server received.
"""

from __future__ import annotations

import gc
import os

import httpx

from confidence_router import ConfidenceRoutedLLM

CONFIDENT = -0.01
CAPITAL = {"type": "function", "function": {
    "name": "Capital", "description": "A country's capital.",
    "parameters": {"type": "object", "properties": {"country": {"type": "string"},
                                                     "capital": {"type": "string"}},
                   "required": ["country", "capital"]}}}
SLACK = 6


def _live(*names: str) -> int:
    gc.collect()
    return sum(type(o).__name__ in names for o in gc.get_objects())


def _body(i: int) -> dict:
    body = {"model": "m", "messages": [{"role": "user", "content": f"Capital of France? ({i})"}]}
    if i % 2:
        body["tools"] = [CAPITAL]
    else:
        body["response_format"] = {"type": "json_schema", "json_schema": {
            "name": "Capital", "schema": CAPITAL["function"]["parameters"]}}
    return body


def test_requests_with_tools_or_a_schema_do_not_pile_up_clients(
    ollama_chat, ollama_backend, ollama_server, serve_proxy
):
    from confidence_router.proxy.app import create_app
    from confidence_router.proxy.config import ProxyConfig

    ollama_backend.add_answer("France", "ok", logprobs=CONFIDENT, tool_calls=[
        {"name": "Capital", "arguments": {"country": "France", "capital": "Paris"}}])
    proxy = serve_proxy(create_app(ConfidenceRoutedLLM(local=ollama_chat()),
                                   config=ProxyConfig()))
    with httpx.Client(base_url=proxy.url, timeout=30) as client:
        for i in range(4):  # warm-up
            client.post("/v1/chat/completions", json=_body(i)).raise_for_status()
        models, clients = _live("ChatOllama"), _live("Client", "AsyncClient")
        fds = len(os.listdir("/proc/self/fd"))
        replies = [client.post("/v1/chat/completions", json=_body(i)) for i in range(60)]
    assert [r.status_code for r in replies] == [200] * 60
    assert len(ollama_server.requests_to("/api/chat")) == 64
    assert _live("ChatOllama") <= models + 2
    assert _live("Client", "AsyncClient") <= clients + 2
    assert len(os.listdir("/proc/self/fd")) <= fds + SLACK
