"""The proxy's Ollama front, driven by the unchanged ``ollama`` client and ``ChatOllama``."""

from __future__ import annotations

import json

import httpx
import ollama
import pytest

from confidence_router.proxy.config import ProxyConfig
from confidence_router.serving.protocol import OLLAMA_VERSION

CONFIDENT = -0.05
UNSURE = -2.5


def test_ollama_client_gets_local_and_escalated_answers(make_proxy, ollama_backend, bedrock_server):
    ollama_backend.add_answer("France", " Paris", logprobs=CONFIDENT)
    ollama_backend.add_answer("Australia", " Sydney", logprobs=UNSURE)
    bedrock_server.add_answer("Australia", "Canberra.")
    proxy = make_proxy()
    client = ollama.Client(host=proxy.url)
    local = client.chat(model="qwen2.5:7b",
                        messages=[{"role": "user", "content": "Capital of France?"}])
    assert local.message.content == " Paris"
    assert local.done and local.done_reason == "stop"
    cloud = client.chat(model="qwen2.5:7b",
                        messages=[{"role": "user", "content": "Capital of Australia?"}])
    assert cloud.message.content == "Canberra."
    assert len(bedrock_server.requests) == 1
    # The ollama client's response type drops unknown fields; the routing field is on the wire.
    raw = httpx.post(proxy.url + "/api/chat", timeout=10, json={
        "model": "m", "stream": False,
        "messages": [{"role": "user", "content": "Capital of Australia?"}]})
    assert raw.json()["routing"]["decision"] == "cloud"
    assert raw.json()["routing"]["reason"] == "low_confidence"
    assert raw.headers["x-confidence-router-decision"] == "cloud"


def test_ollama_client_streams(make_proxy, ollama_backend, bedrock_server):
    ollama_backend.add_answer("France", " Paris is the capital", logprobs=CONFIDENT)
    ollama_backend.add_answer("Australia", " Sydney", logprobs=UNSURE)
    bedrock_server.add_answer("Australia", "It is Canberra.")
    proxy = make_proxy()
    client = ollama.Client(host=proxy.url)
    for question, text, decision in (("Capital of France?", " Paris is the capital", "local"),
                                     ("Capital of Australia?", "It is Canberra.", "cloud")):
        parts = list(client.chat(model="m", stream=True,
                                 messages=[{"role": "user", "content": question}]))
        assert "".join(p.message.content for p in parts) == text
        assert len(parts) > 2 and parts[-1].done
        with httpx.stream("POST", proxy.url + "/api/chat", timeout=10, json={
            "model": "m", "messages": [{"role": "user", "content": question}]}) as raw:
            assert raw.headers["x-confidence-router-decision"] == decision
            lines = [json.loads(line) for line in raw.iter_lines() if line]
        assert "".join(line["message"]["content"] for line in lines) == text
        assert lines[-1]["done"] and lines[-1]["routing"]["decision"] == decision


def test_ollama_front_headers_tags_version_and_tools(make_proxy, ollama_backend):
    ollama_backend.add_answer("weather", "<call>", logprobs=CONFIDENT,
                              tool_calls=[{"name": "get_weather", "arguments": {"city": "Oslo"}}])
    proxy = make_proxy(config=ProxyConfig(model_id="router"))
    client = ollama.Client(host=proxy.url)
    assert [m.model for m in client.list().models] == ["router"]
    assert httpx.get(proxy.url + "/api/version", timeout=10).json() == {"version": OLLAMA_VERSION}
    tool = {"type": "function", "function": {"name": "get_weather", "description": "weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}
    reply = client.chat(model="m", tools=[tool],
                        messages=[{"role": "user", "content": "weather in Oslo?"}])
    assert reply.message.tool_calls[0].function.name == "get_weather"
    assert reply.message.tool_calls[0].function.arguments == {"city": "Oslo"}
    raw = httpx.post(proxy.url + "/api/chat", timeout=10, json={
        "model": "m", "stream": False, "tools": [tool],
        "messages": [{"role": "user", "content": "weather in Oslo?"}]})
    assert raw.headers["x-confidence-router-decision"] == "local"
    assert raw.headers["x-confidence-router-tier"] == "scripted-local"


def test_chat_ollama_through_the_proxy_with_header_knobs(make_proxy, ollama_backend,
                                                        bedrock_server):
    from langchain_ollama import ChatOllama

    ollama_backend.add_answer("Australia", " Sydney", logprobs=UNSURE)
    proxy = make_proxy()
    llm = ChatOllama(model="m", base_url=proxy.url,
                     client_kwargs={"headers": {"x-confidence-router-allow-escalation": "no"}})
    assert llm.invoke("Capital of Australia?").content == " Sydney"
    assert bedrock_server.requests == []


@pytest.mark.parametrize(
    ("body", "headers", "needle"),
    [
        ({"model": "m", "messages": "hi"}, {}, "messages must be a list"),
        ({"messages": [{"role": "user", "content": "hi"}]}, {}, "model is required"),
        ({"model": "m", "messages": [{"role": "user", "content": "hi"}], "threshold": 2},
         {}, "threshold"),
        ({"model": "m", "messages": [{"role": "user", "content": "hi"}]},
         {"x-confidence-router-signal": "nope"}, "x-confidence-router-signal"),
        ({"model": "m", "messages": [{"role": "alien", "content": "hi"}]}, {}, "role"),
    ],
)
def test_ollama_front_bad_requests(make_proxy, ollama_server, body, headers, needle):
    proxy = make_proxy()
    reply = httpx.post(proxy.url + "/api/chat", json=body, headers=headers, timeout=10)
    assert reply.status_code == 400
    assert needle in reply.json()["error"]
    assert ollama_server.requests_to("/api/chat") == []


def test_ollama_front_errors_for_the_ollama_client(make_proxy, ollama_server):
    proxy = make_proxy(config=ProxyConfig(api_keys=("k",), max_body_bytes=100))
    with pytest.raises(ollama.ResponseError) as caught:
        ollama.Client(host=proxy.url).chat(model="m", messages=[{"role": "user", "content": "x"}])
    assert caught.value.status_code == 401
    authed = ollama.Client(host=proxy.url, headers={"Authorization": "Bearer k"})
    with pytest.raises(ollama.ResponseError) as caught:
        authed.chat(model="m", messages=[{"role": "user", "content": "x" * 500}])
    assert caught.value.status_code == 413
    bad = httpx.post(proxy.url + "/api/chat", content=b"{nope",
                     headers={"Authorization": "Bearer k"}, timeout=10)
    assert bad.status_code == 400 and "invalid JSON" in json.loads(bad.content)["error"]
    assert ollama_server.requests_to("/api/chat") == []


def test_ollama_format_schema_gives_json_content(make_proxy, ollama_backend):
    ollama_backend.add_answer("Oslo", "<call>", logprobs=CONFIDENT,
                              tool_calls=[{"name": "response", "arguments": {"city": "Oslo"}}])
    proxy = make_proxy()
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    reply = ollama.Client(host=proxy.url).chat(
        model="m", format=schema, messages=[{"role": "user", "content": "Capital: Oslo?"}])
    assert json.loads(reply.message.content) == {"city": "Oslo"}
    assert ollama_backend.requests[-1].tools[0]["function"]["parameters"]["required"] == ["city"]
