"""The Ollama-compatible server under a burst of concurrent clients: every request is answered
(queued, or a 503 that says why), none is dropped."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import ollama

from confidence_router.testing import OllamaCompatibleServer, ScriptedBackend


def test_burst_of_new_connections_is_queued_not_dropped():
    backend = ScriptedBackend()
    backend.set_default("ok", logprobs=-0.1, latency=0.05)
    with OllamaCompatibleServer(backend) as server:

        def one(i: int) -> str:
            # A new client (and TCP connection) per request, as separate processes would.
            client = ollama.Client(host=server.url, timeout=30)
            reply = client.chat(model="scripted-local",
                                messages=[{"role": "user", "content": f"q{i}"}])
            return reply.message.content

        with ThreadPoolExecutor(max_workers=48) as pool:
            answers = list(pool.map(one, range(144)))
        assert answers == ["ok"] * 144
        assert len(server.requests_to("/api/chat")) == 144


def test_over_capacity_gets_503_not_a_reset(monkeypatch):
    backend = ScriptedBackend()
    backend.set_default("ok", latency=0.5)
    with OllamaCompatibleServer(backend) as server:
        monkeypatch.setattr(server._httpd, "max_active", 2)
        statuses: list[int] = []

        def one(i: int) -> None:
            client = ollama.Client(host=server.url, timeout=30)
            try:
                client.chat(model="scripted-local", messages=[{"role": "user", "content": "q"}])
                statuses.append(200)
            except ollama.ResponseError as error:
                statuses.append(error.status_code)

        with ThreadPoolExecutor(max_workers=8) as pool:
            list(pool.map(one, range(8)))
        assert len(statuses) == 8  # every client got an answer
        assert set(statuses) <= {200, 503} and 503 in statuses and 200 in statuses
