"""Proxy configuration, knob parsing, lazy imports and the CLI's multi-worker path."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import httpx
import pytest

from confidence_router.errors import RoutingConfigError
from confidence_router.proxy.config import ProxyConfig
from confidence_router.proxy.knobs import KnobError, parse_knobs
from confidence_router.testing.processes import free_port


def test_config_from_env():
    config = ProxyConfig.from_env({
        "CONFIDENCE_ROUTER_PROXY_API_KEYS": " k1 , k2 ",
        "CONFIDENCE_ROUTER_PROXY_MAX_BODY_BYTES": "4096",
        "CONFIDENCE_ROUTER_PROXY_TIMEOUT_S": "2.5",
        "CONFIDENCE_ROUTER_REDIS_URL": "redis://127.0.0.1:6379/1",
        "CONFIDENCE_ROUTER_REDIS_PREFIX": "prod",
        "CONFIDENCE_ROUTER_BUDGET_USD": "5",
        "CONFIDENCE_ROUTER_TARGET_RATE": "0.3",
    })
    assert config.api_keys == ("k1", "k2") and config.max_body_bytes == 4096
    assert config.timeout_s == 2.5 and config.redis_prefix == "prod"
    assert config.budget_usd == 5.0 and config.target_rate == 0.3
    assert ProxyConfig.from_env({}) == ProxyConfig()


@pytest.mark.parametrize(
    ("env", "needle"),
    [
        ({"CONFIDENCE_ROUTER_PROXY_MAX_BODY_BYTES": "big"}, "PROXY_MAX_BODY_BYTES"),
        ({"CONFIDENCE_ROUTER_PROXY_MAX_BODY_BYTES": "0"}, "max_body_bytes"),
        ({"CONFIDENCE_ROUTER_PROXY_TIMEOUT_S": "-1"}, "timeout_s"),
        ({"CONFIDENCE_ROUTER_REDIS_URL": "http://x"}, "redis_url"),
        ({"CONFIDENCE_ROUTER_TARGET_RATE": "1"}, "target_rate"),
        ({"CONFIDENCE_ROUTER_BUDGET_USD": "nan"}, "budget_usd"),
        ({"CONFIDENCE_ROUTER_CHROMA_URL": "http://127.0.0.1:8000"}, "embedding_model"),
    ],
)
def test_config_errors_name_the_setting(env, needle):
    with pytest.raises(RoutingConfigError, match=needle):
        ProxyConfig.from_env(env)


def test_knobs_parse_and_validate():
    assert parse_knobs({"threshold": 0.8, "temperature": 3}, {"x-other": "1"}) == {
        "threshold": 0.8}
    assert parse_knobs({}, {"x-confidence-router-signal": "min_logprob",
                            "x-confidence-router-precheck-threshold": "0.25"}) == {
        "signal": "min_logprob", "precheck_threshold": 0.25}
    with pytest.raises(KnobError) as caught:
        parse_knobs({"confidence_router": ["threshold"]}, {})
    assert caught.value.param == "confidence_router"
    with pytest.raises(KnobError):
        parse_knobs({"threshold": float("inf")}, {})
    with pytest.raises(KnobError):
        parse_knobs({"signal": ["mean_logprob"]}, {})


@pytest.mark.parametrize(
    "statement",
    ["import confidence_router.proxy", "import confidence_router.redis_state",
     "from confidence_router import ProxyConfig, RedisCloudBudget", "import confidence_router.cli"],
)
def test_proxy_and_redis_modules_import_lazily(statement):
    code = f"{statement}\nimport sys, json\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = {name.split(".")[0] for name in json.loads(out.stdout)}
    assert loaded.isdisjoint({"starlette", "uvicorn", "redis", "langchain_core", "chromadb"})


def test_cli_proxy_with_two_workers_shares_redis_state(
    redis_url, ollama_backend, bedrock_server, testbed_settings_env
):
    """``confidence-router proxy --workers 2``: both workers route, and their budget and
    stats are one (read back through either worker and from Redis itself)."""
    from confidence_router.redis_state import RedisRoutingStats, redis_client

    ollama_backend.add_answer("local", " yes", logprobs=-0.05, latency=0.02)
    ollama_backend.add_answer("cloud", " unsure", logprobs=-3.0, latency=0.02)
    bedrock_server.add_answer("cloud", "from the cloud")
    port = free_port()
    env = {**os.environ, **testbed_settings_env,
           "CONFIDENCE_ROUTER_REDIS_URL": redis_url,
           "CONFIDENCE_ROUTER_REDIS_PREFIX": "clitest",
           "CONFIDENCE_ROUTER_BUDGET_USD": "1000",
           "CONFIDENCE_ROUTER_PROXY_API_KEYS": "sk-cli",
           "PYTHONPATH": os.pathsep.join(sys.path)}
    process = subprocess.Popen(
        [sys.executable, "-m", "confidence_router.cli", "proxy", "--port", str(port),
         "--workers", "2"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert process.poll() is None, process.stderr.read().decode()[-2000:]
            try:
                if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "proxy did not become ready"
            time.sleep(0.2)
        headers = {"Authorization": "Bearer sk-cli"}
        with httpx.Client(base_url=url, headers=headers, timeout=30) as client:
            decisions = []
            for i in range(12):
                kind = "local" if i % 3 else "cloud"
                reply = client.post("/v1/chat/completions", json={
                    "model": "m", "messages": [{"role": "user", "content": f"{kind} {i}"}]})
                assert reply.status_code == 200
                decisions.append(reply.headers["x-confidence-router-decision"])
            assert decisions.count("cloud") == 4
            shared = client.get("/v1/routing/stats").json()
        assert shared["stats"]["calls"] == 12 and shared["stats"]["cloud"] == 4
        assert shared["budget"]["granted"] == 4
        assert RedisRoutingStats(redis_client(redis_url), prefix="clitest").snapshot()[
            "calls"] == 12
        assert len(bedrock_server.requests) == 4
    finally:
        process.terminate()
        process.wait(timeout=30)
    assert process.returncode is not None


def test_cli_rejects_bad_configuration(monkeypatch, capsys):
    from confidence_router.cli import main

    monkeypatch.setenv("CONFIDENCE_ROUTER_PROXY_TIMEOUT_S", "soon")
    assert main(["proxy", "--port", "0"]) == 2
    assert "PROXY_TIMEOUT_S" in capsys.readouterr().err
    monkeypatch.delenv("CONFIDENCE_ROUTER_PROXY_TIMEOUT_S")
    assert main(["proxy", "--workers", "0"]) == 2



def test_redis_down_is_not_ready_and_escalations_fail_closed(make_proxy, ollama_backend,
                                                            bedrock_server):
    """A dead Redis: /readyz says 503; confident local answers still flow (stats failures are
    logged by the router); an escalation needing the shared budget is refused — the local
    answer is served, flagged, as when the budget is used up — never sent to the cloud
    without a cap."""
    import openai

    ollama_backend.add_answer("France", " Paris", logprobs=-0.05)
    ollama_backend.add_answer("Australia", " Sydney", logprobs=-3.0)
    dead = f"redis://127.0.0.1:{free_port()}/0"
    proxy = make_proxy(config=ProxyConfig(redis_url=dead, budget_usd=10.0))
    ready = httpx.get(proxy.url + "/readyz", timeout=10)
    assert ready.status_code == 503 and ready.json()["checks"]["redis"].startswith("unavailable")
    client = openai.OpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
    local = client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "Capital of France?"}])
    assert local.choices[0].message.content == " Paris"
    refused = client.chat.completions.with_raw_response.create(
        model="m", messages=[{"role": "user", "content": "Capital of Australia?"}])
    assert refused.parse().choices[0].message.content == " Sydney"
    assert refused.headers["x-confidence-router-decision"] == "local"
    assert refused.headers["x-confidence-router-reason"] == "budget_exceeded"
    assert bedrock_server.requests == []


def test_proxy_budget_lease_follows_the_time_limit(redis_url):
    """A call cut off by the time limit cannot hold its reservation longer than the limit
    plus a margin: another worker reclaims it."""
    from confidence_router.proxy.app import SharedState

    shared = SharedState(ProxyConfig(redis_url=redis_url, budget_usd=1.0, timeout_s=12.0))
    assert shared.budget.lease_s == pytest.approx(42.0)
    assert shared.calibrator is None and shared.stats is not None
