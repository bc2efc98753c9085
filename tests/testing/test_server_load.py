"""The Ollama-compatible server under a burst of concurrent clients: every request is answered
(queued, or a 503 that says why), none is dropped."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import ollama
import pytest

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


def test_a_hung_up_client_stops_the_servers_work():
    """Scripted latency is the model 'thinking': when the client gives up (a router timeout),
    the server stops at once instead of working for nobody, and generates nothing."""
    import time

    import httpx

    backend = ScriptedBackend()
    backend.set_default("late answer", latency=5.0)
    with OllamaCompatibleServer(backend) as server:
        client = ollama.Client(host=server.url, timeout=httpx.Timeout(0.3))
        started = time.perf_counter()
        for _ in range(4):
            with pytest.raises(httpx.TimeoutException):
                client.chat(model="scripted-local", messages=[{"role": "user", "content": "q"}])
        deadline = time.time() + 2.0
        while _handlers(server.port) and time.time() < deadline:
            time.sleep(0.05)
        assert _handlers(server.port) == 0  # every handler returned well before the 5 s latency
        assert time.perf_counter() - started < 4.0
        assert backend.generated_tokens == 0
        assert len(server.requests_to("/api/chat")) == 4


def _handlers(port: int) -> int:
    """Live request-handler threads of the server on ``port``."""
    import threading

    count = 0
    for thread in threading.enumerate():
        if getattr(getattr(thread, "_target", None), "__name__", "") != "process_request_thread":
            continue
        sock = (getattr(thread, "_args", None) or (None,))[0]
        try:
            if sock is not None and sock.getsockname()[1] == port:
                count += 1
        except OSError:
            continue  # closed meanwhile
    return count
