"""Fixtures for the proxy and shared-state tests: a real redis-server, the proxy served by
uvicorn on a free loopback port, and a router built from settings pointed at the test bed."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from confidence_router.testing import FakeBedrockServer, OllamaCompatibleServer
from confidence_router.testing.processes import RedisServerProcess, start_or_skip

SONNET = "us.anthropic.claude-sonnet-4-5-20250929-v1:0"


@pytest.fixture(scope="session")
def redis_process() -> Iterator[RedisServerProcess]:
    """A real redis-server for the session (skipped, not faked, where it is not installed;
    CI installs it, and there a missing server fails)."""
    server = start_or_skip(RedisServerProcess())
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_process: RedisServerProcess) -> Iterator[str]:
    """The Redis URL, flushed before each test."""
    import redis

    client = redis.Redis.from_url(redis_process.url)
    client.flushall()
    client.close()
    yield redis_process.url


def settings_env(ollama_url: str, bedrock_url: str, **extra: str) -> dict[str, str]:
    """Router settings (environment variables) pointing at the test bed."""
    env = {
        "CONFIDENCE_ROUTER_LOCAL_MODEL": "scripted-local",
        "OLLAMA_HOST": ollama_url,
        "CONFIDENCE_ROUTER_CLOUD_MODEL": SONNET,
        "CONFIDENCE_ROUTER_CLOUD_MAX_TOKENS": "256",
        "CONFIDENCE_ROUTER_BEDROCK_ENDPOINT": bedrock_url,
        "AWS_REGION": "us-east-1",
    }
    env.update(extra)
    return env


@pytest.fixture
def testbed_settings_env(
    ollama_server: OllamaCompatibleServer, bedrock_server: FakeBedrockServer
) -> dict[str, str]:
    """Router settings (environment variables) pointing at the test bed."""
    return settings_env(ollama_server.url, bedrock_server.url)


class RunningProxy:
    """The proxy app served by uvicorn on a background thread."""

    def __init__(self, app: Any) -> None:
        import uvicorn

        self.app = app
        config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning",
                                lifespan="off")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def start(self) -> RunningProxy:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the proxy did not start")
            time.sleep(0.01)
        sock = self.server.servers[0].sockets[0]
        self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture
def serve_proxy() -> Iterator[Callable[..., RunningProxy]]:
    """Factory: ``serve_proxy(app)`` -> a running proxy (stopped after the test)."""
    running: list[RunningProxy] = []

    def start(app: Any) -> RunningProxy:
        proxy = RunningProxy(app).start()
        running.append(proxy)
        return proxy

    yield start
    for proxy in running:
        proxy.stop()


@pytest.fixture
def make_proxy(
    ollama_server: OllamaCompatibleServer,
    bedrock_server: FakeBedrockServer,
    serve_proxy: Callable[..., RunningProxy],
) -> Callable[..., RunningProxy]:
    """Factory: ``make_proxy(config=ProxyConfig(...), **settings_env)`` -> a running proxy
    whose router is built from settings (``from_settings``) pointed at the test bed."""
    from confidence_router.proxy.app import build_router, create_app
    from confidence_router.proxy.config import ProxyConfig

    def make(config: ProxyConfig | None = None, **env: str) -> RunningProxy:
        config = config or ProxyConfig()
        router, shared = build_router(
            config, environ=settings_env(ollama_server.url, bedrock_server.url, **env)
        )
        return serve_proxy(create_app(router, config=config, shared=shared))

    return make
