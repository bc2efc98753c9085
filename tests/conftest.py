"""Shared pytest fixtures. Each block is owned by one area; add new fixtures in a new block."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck
from hypothesis import settings as hypothesis_settings

# Property tests: the "quick" profile (used unless HYPOTHESIS_PROFILE says otherwise) keeps the
# suite quick; HYPOTHESIS_PROFILE=thorough searches 20x harder (run it before a release, or
# after touching a pure function). Neither has a per-example deadline or a too-slow check:
# they are timing assertions, and this suite runs on shared, noisy machines.
_NO_TIMING = {"deadline": None, "suppress_health_check": [HealthCheck.too_slow]}
hypothesis_settings.register_profile("quick", **_NO_TIMING)
hypothesis_settings.register_profile("thorough", max_examples=2000, **_NO_TIMING)
hypothesis_settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "quick"))

from confidence_router.testing import FakeBedrockServer, OllamaCompatibleServer, ScriptedBackend

# =============================================================================================
# BEGIN test-bed fixtures (confidence_router.testing): fake Ollama and Bedrock servers.
#
#   ollama_backend  - a fresh ScriptedBackend per test, already being served by ...
#   ollama_server   - the session-wide OllamaCompatibleServer (request log cleared per test)
#   bedrock_server  - the session-wide FakeBedrockServer (rules and request log reset per test)
#   _offline_client_env (autouse) - dummy AWS credentials, no instance metadata, no proxies
#
# The servers start once per session (ephemeral ports on 127.0.0.1); per-test isolation comes
# from swapping in a fresh backend / resetting the fake, not from restarting sockets.
# =============================================================================================


@pytest.fixture(autouse=True)
def _offline_client_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make AWS and HTTP clients hermetic: dummy credentials, no IMDS, no profile, no proxy."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    # Otherwise botocore may spend seconds probing the EC2 metadata endpoint for credentials.
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    # Never read the developer's real ~/.aws files or profiles.
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent/confidence-router-tests/config")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/confidence-router-tests/creds")
    for name in (
        "AWS_PROFILE",
        "AWS_SESSION_TOKEN",
        "AWS_SECURITY_TOKEN",
        "AWS_BEARER_TOKEN_BEDROCK",
    ):
        monkeypatch.delenv(name, raising=False)
    # httpx and botocore honour proxy variables; the fake servers are on loopback.
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.setenv(name, "127.0.0.1,localhost")


@pytest.fixture(scope="session")
def _ollama_server_session() -> Iterator[OllamaCompatibleServer]:
    with OllamaCompatibleServer(ScriptedBackend()) as server:
        yield server


@pytest.fixture
def ollama_backend(_ollama_server_session: OllamaCompatibleServer) -> ScriptedBackend:
    """A fresh :class:`ScriptedBackend` (model ``"scripted-local"``) behind ``ollama_server``.

    Script it, then point ``ChatOllama(base_url=ollama_server.url, ...)`` at the server::

        def test_x(ollama_backend, ollama_server):
            ollama_backend.add_answer("France", " Paris", logprobs=-0.05)
    """
    backend = ScriptedBackend()
    _ollama_server_session.backend = backend
    _ollama_server_session.clear_requests()
    return backend


@pytest.fixture
def ollama_server(
    _ollama_server_session: OllamaCompatibleServer, ollama_backend: ScriptedBackend
) -> OllamaCompatibleServer:
    """The running Ollama-compatible server (``.url``, ``.requests``), serving ``ollama_backend``.

    Assign ``ollama_server.backend = other_backend`` to serve something else for one test;
    the next test gets a fresh ``ScriptedBackend`` again.
    """
    return _ollama_server_session


@pytest.fixture(scope="session")
def _bedrock_server_session() -> Iterator[FakeBedrockServer]:
    with FakeBedrockServer() as server:
        yield server


@pytest.fixture
def bedrock_server(_bedrock_server_session: FakeBedrockServer) -> FakeBedrockServer:
    """The running :class:`FakeBedrockServer`, with rules and request log reset for this test.

    Build clients with ``endpoint_url=bedrock_server.url, region_name="us-east-1",
    aws_access_key_id="test", aws_secret_access_key="test"`` and, to avoid botocore's retry
    backoff on scripted errors, ``max_retries=0`` (boto3: ``Config(retries={"total_max_attempts":
    1})``; note ``{"max_attempts": 1}`` still allows one retry).
    """
    _bedrock_server_session.reset()
    return _bedrock_server_session


# =============================================================================================
# END test-bed fixtures
# =============================================================================================


# =============================================================================================
# BEGIN client fixtures: the unchanged LangChain clients pointed at the test bed.
# =============================================================================================

SONNET = "us.anthropic.claude-sonnet-4-5-20250929-v1:0"


@pytest.fixture
def bedrock_chat(bedrock_server: FakeBedrockServer):
    """Factory: ``bedrock_chat(**overrides)`` -> a ChatBedrockConverse on the fake Bedrock.

    No botocore retries (``max_retries=0``), so scripted errors reach the router at once; an
    Anthropic model id, so ChatBedrockConverse really streams.
    """
    from langchain_aws import ChatBedrockConverse

    def build(**overrides):
        kwargs = {
            "model": SONNET,
            "region_name": "us-east-1",
            "endpoint_url": bedrock_server.url,
            "aws_access_key_id": "test",
            "aws_secret_access_key": "test",
            "max_retries": 0,
            **overrides,
        }
        return ChatBedrockConverse(**kwargs)

    return build


@pytest.fixture
def bedrock_invoke_chat(bedrock_server: FakeBedrockServer):
    """Factory: ``bedrock_invoke_chat(**overrides)`` -> a ChatBedrock on the fake Bedrock.

    The InvokeModel twin of ``bedrock_chat`` (Anthropic messages body; the same scripted rules
    answer both), so cloud-tier tests can run over both classes. No botocore retries, an
    Anthropic model id (ChatBedrock then streams with InvokeModelWithResponseStream).
    """
    from langchain_aws import ChatBedrock

    def build(**overrides):
        kwargs = {
            "model_id": SONNET,
            "region_name": "us-east-1",
            "endpoint_url": bedrock_server.url,
            "aws_access_key_id": "test",
            "aws_secret_access_key": "test",
            "max_retries": 0,
            **overrides,
        }
        return ChatBedrock(**kwargs)

    return build


@pytest.fixture(params=["converse", "invoke"])
def api(request: pytest.FixtureRequest) -> str:
    """The Bedrock API a cloud-tier test runs over: ``"converse"`` (ChatBedrockConverse) or
    ``"invoke"`` (ChatBedrock); a test asking for it (or ``cloud_factory``) runs over both."""
    return str(request.param)


@pytest.fixture
def cloud_factory(api: str, bedrock_chat, bedrock_invoke_chat):
    """Factory of the cloud model for ``api``: ``bedrock_chat`` or ``bedrock_invoke_chat``."""
    return bedrock_chat if api == "converse" else bedrock_invoke_chat


@pytest.fixture
def ollama_chat(ollama_server: OllamaCompatibleServer):
    """Factory: ``ollama_chat(**overrides)`` -> a ChatOllama on the scripted Ollama server."""
    from langchain_ollama import ChatOllama

    def build(**overrides):
        return ChatOllama(**{"model": "scripted-local", "base_url": ollama_server.url,
                             **overrides})

    return build


# =============================================================================================
# END client fixtures
# =============================================================================================


@pytest.fixture
def busy_cores() -> Iterator[int]:
    """Busy loops in other processes on every core this process may use, for the test's
    duration (yields how many); skipped where ``/proc/stat`` cannot show them (not Linux)."""
    import subprocess
    import sys
    import time

    if not os.path.exists("/proc/stat") or not hasattr(os, "sched_getaffinity"):
        pytest.skip("needs Linux /proc/stat")
    cores = len(os.sched_getaffinity(0))
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(cores)]
    try:
        time.sleep(0.5)  # running before the test takes its readings
        yield cores
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()
