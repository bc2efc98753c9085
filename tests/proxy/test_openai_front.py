"""The proxy's OpenAI front, driven by the real ``openai`` client and LangChain's ``ChatOpenAI``.

The router behind it is built from settings (``from_settings``) and talks to the test bed:
the scripted Ollama server (local) and the fake Bedrock server (cloud), over real HTTP.
"""

from __future__ import annotations

import asyncio
import json
import logging

import httpx
import openai
import pytest

from confidence_router.proxy.config import ProxyConfig

CONFIDENT = -0.05  # confidence sigmoid(2 * -0.05 + 3) ~ 0.95: kept local
UNSURE = -2.5  # confidence ~ 0.12: escalated


def client_for(proxy, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=proxy.url + "/v1", api_key=key, max_retries=0, timeout=30)


def test_local_answer_has_routing_field_and_headers(make_proxy, ollama_backend, bedrock_server):
    ollama_backend.add_answer("capital of France", " Paris", logprobs=CONFIDENT)
    proxy = make_proxy()
    raw = client_for(proxy).chat.completions.with_raw_response.create(
        model="anything", messages=[{"role": "user", "content": "What is the capital of France?"}]
    )
    completion = raw.parse()
    assert completion.choices[0].message.content == " Paris"
    assert completion.choices[0].finish_reason == "stop"
    routing = completion.model_extra["routing"]
    assert routing["decision"] == "local" and routing["reason"] == "confident"
    assert routing["confidence"] == pytest.approx(0.9478, abs=1e-3)
    assert raw.headers["x-confidence-router-decision"] == "local"
    assert raw.headers["x-confidence-router-reason"] == "confident"
    assert float(raw.headers["x-confidence-router-confidence"]) == pytest.approx(
        routing["confidence"], rel=1e-5
    )
    assert raw.headers["x-confidence-router-tier"] == "scripted-local"
    assert completion.usage.completion_tokens == 1 and completion.usage.prompt_tokens > 0
    assert bedrock_server.requests == []  # the cloud never saw it


def test_unsure_answer_is_escalated_to_the_cloud(make_proxy, ollama_backend, bedrock_server):
    ollama_backend.add_answer("capital of Australia", " Sydney maybe", logprobs=UNSURE)
    bedrock_server.add_answer("capital of Australia", "Canberra.", input_tokens=12,
                              output_tokens=3)
    proxy = make_proxy()
    raw = client_for(proxy).chat.completions.with_raw_response.create(
        model="gpt-4o", messages=[{"role": "user", "content": "What is the capital of Australia?"}]
    )
    completion = raw.parse()
    assert completion.choices[0].message.content == "Canberra."
    routing = completion.model_extra["routing"]
    assert routing["decision"] == "cloud" and routing["reason"] == "low_confidence"
    assert routing["escalated"] is True
    assert raw.headers["x-confidence-router-decision"] == "cloud"
    assert raw.headers["x-confidence-router-tier"] == "us.anthropic.claude-sonnet-4-5-20250929-v1:0"
    assert completion.usage.prompt_tokens == 12 and completion.usage.completion_tokens == 3
    assert len(bedrock_server.requests) == 1


def test_streaming_local_and_escalated(make_proxy, ollama_backend, bedrock_server):
    ollama_backend.add_answer("France", " Paris is the capital", logprobs=CONFIDENT)
    ollama_backend.add_answer("Australia", " Sydney", logprobs=UNSURE)
    bedrock_server.add_answer("Australia", "The capital is Canberra.")
    proxy = make_proxy()
    client = client_for(proxy)
    for question, text, decision in (
        ("Capital of France?", " Paris is the capital", "local"),
        ("Capital of Australia?", "The capital is Canberra.", "cloud"),
    ):
        raw = client.chat.completions.with_raw_response.create(
            model="m", messages=[{"role": "user", "content": question}], stream=True,
            stream_options={"include_usage": True},
        )
        assert raw.headers["x-confidence-router-decision"] == decision
        assert raw.headers["content-type"].startswith("text/event-stream")
        chunks = list(raw.parse())
        content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert content == text
        assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) > 1  # streamed
        finishing = [c for c in chunks if c.choices and c.choices[0].finish_reason]
        assert len(finishing) == 1 and finishing[0].choices[0].finish_reason == "stop"
        assert finishing[0].model_extra["routing"]["decision"] == decision
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0
    assert len(bedrock_server.requests) == 1


def test_tool_calls_round_trip(make_proxy, ollama_backend, bedrock_server):
    ollama_backend.add_answer(
        "weather", "<call>", logprobs=CONFIDENT, times=1,
        tool_calls=[{"name": "get_weather", "arguments": {"city": "Paris"}}],
    )
    ollama_backend.add_answer("weather", " Sunny in Paris.", logprobs=CONFIDENT)
    proxy = make_proxy()
    tools = [{"type": "function", "function": {
        "name": "get_weather", "description": "Weather of a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                       "required": ["city"]},
    }}]
    client = client_for(proxy)
    first = client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "What is the weather in Paris?"}],
        tools=tools,
    )
    call = first.choices[0].message.tool_calls[0]
    assert first.choices[0].finish_reason == "tool_calls"
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    # The tool definitions reached the local model in Ollama's format.
    assert ollama_backend.requests[-1].tools[0]["function"]["name"] == "get_weather"
    second = client.chat.completions.create(
        model="m", tools=tools,
        messages=[
            {"role": "user", "content": "What is the weather in Paris?"},
            first.choices[0].message.model_dump(exclude_none=True),
            {"role": "tool", "tool_call_id": call.id, "content": "It is sunny"},
        ],
    )
    assert second.choices[0].message.content == " Sunny in Paris."
    sent = ollama_backend.requests[-1].messages
    assert [m["role"] for m in sent] == ["user", "assistant", "tool"]
    assert sent[1]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"}
    assert bedrock_server.requests == []


def test_streamed_tool_call_and_tool_choice_none(make_proxy, ollama_backend):
    ollama_backend.add_answer(
        "weather", "<call>", logprobs=CONFIDENT,
        tool_calls=[{"name": "get_weather", "arguments": {"city": "Oslo"}}],
    )
    proxy = make_proxy()
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}}}}]
    chunks = list(client_for(proxy).chat.completions.create(
        model="m", stream=True, tools=tools,
        messages=[{"role": "user", "content": "weather in Oslo?"}]))
    calls = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert calls and calls[0].function.name == "get_weather"
    assert json.loads("".join(tc.function.arguments or "" for tc in calls)) == {"city": "Oslo"}
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"
    client_for(proxy).chat.completions.create(
        model="m", tools=tools, tool_choice="none",
        messages=[{"role": "user", "content": "weather in Oslo?"}])
    assert not ollama_backend.requests[-1].tools  # "none": the tools are not offered


def test_response_format_json_schema(make_proxy, ollama_backend):
    ollama_backend.add_answer(
        "capital", "<call>", logprobs=CONFIDENT,
        tool_calls=[{"name": "capital", "arguments": {"city": "Paris", "country": "France"}}],
    )
    proxy = make_proxy()
    completion = client_for(proxy).chat.completions.create(
        model="m", messages=[{"role": "user", "content": "The capital of France?"}],
        response_format={"type": "json_schema", "json_schema": {"name": "capital", "schema": {
            "type": "object", "properties": {"city": {"type": "string"},
                                             "country": {"type": "string"}},
            "required": ["city", "country"]}}},
    )
    assert json.loads(completion.choices[0].message.content) == {"city": "Paris",
                                                                 "country": "France"}
    assert completion.choices[0].message.tool_calls is None
    assert completion.model_extra["routing"]["decision"] == "local"
    # stream=True: the structured answer is produced whole and sent as one content chunk.
    chunks = list(client_for(proxy).chat.completions.create(
        model="m", stream=True, messages=[{"role": "user", "content": "The capital of France?"}],
        response_format={"type": "json_schema", "json_schema": {"name": "capital", "schema": {
            "type": "object", "properties": {"city": {"type": "string"}}}}},
    ))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert json.loads(text)["city"] == "Paris"
    assert chunks[-1].model_extra["routing"]["decision"] == "local"
    # The schema was offered to the model as a tool.
    assert ollama_backend.requests[-1].tools[0]["function"]["name"] == "capital"


def test_chat_openai_in_an_lcel_chain(make_proxy, ollama_backend, bedrock_server):
    from langchain_core.output_parsers import StrOutputParser
    from langchain_core.prompts import ChatPromptTemplate
    from langchain_openai import ChatOpenAI

    ollama_backend.add_answer("France", " Paris", logprobs=CONFIDENT)
    ollama_backend.add_answer("Australia", " Sydney", logprobs=UNSURE)
    bedrock_server.add_answer("Australia", "Canberra")
    proxy = make_proxy(config=ProxyConfig(api_keys=("sk-test",)))
    llm = ChatOpenAI(base_url=proxy.url + "/v1", api_key="sk-test", model="confidence-router",
                     max_retries=0)
    chain = ChatPromptTemplate.from_template("Answer briefly: {question}") | llm | StrOutputParser()
    assert chain.invoke({"question": "Capital of France?"}) == " Paris"
    assert chain.invoke({"question": "Capital of Australia?"}) == "Canberra"
    assert "".join(chain.stream({"question": "Capital of Australia?"})) == "Canberra"
    assert len(bedrock_server.requests) == 2
    # The routing field survives into LangChain's message metadata via extra_body knobs too.
    message = llm.invoke("Capital of Australia?", extra_body={"allow_escalation": False})
    assert message.content == " Sydney"


def test_knobs_from_body_and_headers(make_proxy, ollama_backend, bedrock_server):
    ollama_backend.add_answer("France", " Paris", logprobs=CONFIDENT)
    ollama_backend.add_answer("Australia", " Sydney", logprobs=UNSURE)
    bedrock_server.add_answer("France", "Paris (cloud)")
    proxy = make_proxy()
    client = client_for(proxy)
    messages = [{"role": "user", "content": "Capital of France?"}]
    strict = client.chat.completions.create(model="m", messages=messages,
                                            extra_body={"threshold": 0.99})
    assert strict.model_extra["routing"]["decision"] == "cloud"
    assert strict.model_extra["routing"]["threshold"] == 0.99
    nested = client.chat.completions.create(
        model="m", messages=messages, extra_body={"confidence_router": {"threshold": 0.99}})
    assert nested.model_extra["routing"]["threshold"] == 0.99
    kept = client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "Capital of Australia?"}],
        extra_headers={"x-confidence-router-allow-escalation": "false"},
    )
    assert kept.choices[0].message.content == " Sydney"
    assert kept.model_extra["routing"]["decision"] == "local"
    assert kept.model_extra["routing"]["flagged"] is True
    assert len(bedrock_server.requests) == 2


@pytest.mark.parametrize(
    ("extra_body", "extra_headers", "param"),
    [
        ({"threshold": 1.5}, {}, "threshold"),
        ({"threshold": "high"}, {}, "threshold"),
        ({"signal": "vibes"}, {}, "signal"),
        ({"allow_escalation": "yes"}, {}, "allow_escalation"),
        ({"confidence_router": {"treshold": 0.5}}, {}, "confidence_router.treshold"),
        ({}, {"x-confidence-router-threshold": "abc"}, "x-confidence-router-threshold"),
        ({}, {"x-confidence-router-thresold": "0.5"}, "x-confidence-router-thresold"),
        ({}, {"x-confidence-router-on-unknown": "panic"}, "x-confidence-router-on-unknown"),
    ],
)
def test_bad_knob_is_a_400_naming_it_before_any_model_call(
    make_proxy, ollama_server, bedrock_server, extra_body, extra_headers, param
):
    proxy = make_proxy()
    with pytest.raises(openai.BadRequestError) as caught:
        client_for(proxy).chat.completions.create(
            model="m", messages=[{"role": "user", "content": "hi"}],
            extra_body=extra_body, extra_headers=extra_headers,
        )
    assert caught.value.status_code == 400
    error = caught.value.body
    assert error["param"] == param and error["code"] == "invalid_routing_knob"
    assert param.split(".")[-1] in error["message"]
    assert ollama_server.requests_to("/api/chat") == []
    assert bedrock_server.requests == []


def test_bad_requests_get_clean_openai_errors(make_proxy, ollama_server):
    proxy = make_proxy(config=ProxyConfig(max_body_bytes=2048))
    url = proxy.url + "/v1/chat/completions"
    bad_json = httpx.post(url, content=b'{"model": "m", "messages": [', timeout=10)
    assert bad_json.status_code == 400
    assert bad_json.json()["error"]["type"] == "invalid_request_error"
    assert "invalid JSON" in bad_json.json()["error"]["message"]
    not_object = httpx.post(url, json=[1, 2], timeout=10)
    assert not_object.status_code == 400
    no_messages = httpx.post(url, json={"model": "m", "messages": []}, timeout=10)
    assert no_messages.status_code == 400 and no_messages.json()["error"]["param"] == "messages"
    bad_role = httpx.post(url, json={"model": "m", "messages": [{"role": "wizard"}]}, timeout=10)
    assert bad_role.status_code == 400
    assert bad_role.json()["error"]["param"] == "messages[0].role"
    huge = {"model": "m", "messages": [{"role": "user", "content": "x" * 5000}]}
    too_big = httpx.post(url, json=huge, timeout=10)
    assert too_big.status_code == 413
    assert too_big.json()["error"]["code"] == "request_too_large"

    # A chunked body (no Content-Length) is cut off at the limit too.
    def chunks():
        yield b'{"model": "m", "messages": [{"role": "user", "content": "'
        for _ in range(10):
            yield b"y" * 1000
        yield b'"}]}'

    streamed = httpx.post(url, content=chunks(), timeout=10)
    assert streamed.status_code == 413
    with pytest.raises(openai.BadRequestError):
        client_for(proxy).chat.completions.create(
            model="m", n=2, messages=[{"role": "user", "content": "hi"}])
    assert ollama_server.requests_to("/api/chat") == []


def test_api_keys(make_proxy, ollama_backend, ollama_server):
    ollama_backend.add_answer("France", " Paris", logprobs=CONFIDENT)
    proxy = make_proxy(config=ProxyConfig(api_keys=("sk-one", "sk-two")))
    messages = [{"role": "user", "content": "Capital of France?"}]
    for key in ("sk-wrong", "sk-one-but-longer", "sk-"):
        with pytest.raises(openai.AuthenticationError) as caught:
            client_for(proxy, key).chat.completions.create(model="m", messages=messages)
        assert caught.value.body["code"] == "invalid_api_key"
    missing = httpx.post(proxy.url + "/v1/chat/completions",
                         json={"model": "m", "messages": messages}, timeout=10)
    assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
    basic = httpx.get(proxy.url + "/v1/models", auth=("sk-one", ""), timeout=10)
    assert basic.status_code == 401
    assert ollama_server.requests_to("/api/chat") == []
    for key in ("sk-one", "sk-two"):
        reply = client_for(proxy, key).chat.completions.create(model="m", messages=messages)
        assert reply.choices[0].message.content == " Paris"
    # Health and readiness stay open for load balancers.
    assert httpx.get(proxy.url + "/healthz", timeout=10).status_code == 200
    assert httpx.get(proxy.url + "/readyz", timeout=10).status_code == 200


def test_models_lists_the_configured_id(make_proxy):
    proxy = make_proxy(config=ProxyConfig(model_id="my-router"))
    assert [m.id for m in client_for(proxy).models.list()] == ["my-router"]


def test_cloud_failure_is_a_502_and_local_failure_escalates(
    make_proxy, ollama_backend, bedrock_server
):
    ollama_backend.add_answer("Australia", " Sydney", logprobs=UNSURE)
    bedrock_server.fail("Australia", "ValidationException")
    ollama_backend.fail("Kenya", status=500, message="model crashed")
    bedrock_server.add_answer("Kenya", "Nairobi")
    proxy = make_proxy()
    client = client_for(proxy)
    with pytest.raises(openai.APIStatusError) as caught:
        client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "Capital of Australia?"}])
    assert caught.value.status_code == 502
    assert caught.value.body["code"] == "cloud_error"
    # on_cloud_error=local per request: the flagged local answer instead.
    fallback = client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "Capital of Australia?"}],
        extra_body={"on_cloud_error": "local"})
    assert fallback.choices[0].message.content == " Sydney"
    assert fallback.model_extra["routing"]["reason"] == "cloud_error"
    escalated = client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "Capital of Kenya?"}])
    assert escalated.choices[0].message.content == "Nairobi"
    assert escalated.model_extra["routing"]["reason"] == "local_error"


def test_cloud_failure_mid_stream_sends_an_error_event(make_proxy, ollama_backend, bedrock_server):
    ollama_backend.add_answer("Australia", " Sydney", logprobs=UNSURE)
    bedrock_server.add_answer("Australia", "The capital is Canberra, not Sydney.")
    bedrock_server.fail("Australia", "ServiceUnavailableException", after_pieces=2)
    proxy = make_proxy()
    stream = client_for(proxy).chat.completions.create(
        model="m", messages=[{"role": "user", "content": "Capital of Australia?"}], stream=True)
    received = []
    with pytest.raises(openai.APIError):
        for chunk in stream:
            received.append(chunk.choices[0].delta.content or "")
    assert "".join(received).startswith("The")


def test_time_limit_gives_504(make_proxy, ollama_backend):
    ollama_backend.add_answer("slow", " ok", logprobs=CONFIDENT, latency=3.0)
    proxy = make_proxy(config=ProxyConfig(timeout_s=0.5))
    with pytest.raises(openai.APIStatusError) as caught:
        client_for(proxy).chat.completions.create(
            model="m", messages=[{"role": "user", "content": "a slow question"}])
    assert caught.value.status_code == 504 and caught.value.body["code"] == "timeout"


async def test_concurrent_requests_all_complete(make_proxy, ollama_backend, bedrock_server):
    ollama_backend.add_answer("even", " yes", logprobs=CONFIDENT, latency=0.05)
    ollama_backend.add_answer("odd", " maybe", logprobs=UNSURE, latency=0.05)
    bedrock_server.add_answer("odd", "cloud answer")
    proxy = make_proxy()
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)

    async def ask(i: int) -> tuple[str, str]:
        kind = "even" if i % 2 == 0 else "odd"
        reply = await client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": f"question {i} is {kind}"}])
        routing = reply.model_extra["routing"]
        return kind, routing["decision"], routing["reason"], routing.get("local_error")

    results = await asyncio.gather(*(ask(i) for i in range(40)))
    assert sorted(r[:2] for r in results) == sorted(
        [("even", "local")] * 20 + [("odd", "cloud")] * 20
    )
    assert len(bedrock_server.requests) == 20
    async with httpx.AsyncClient(base_url=proxy.url, timeout=10) as http:
        stats = (await http.get("/v1/routing/stats")).json()["stats"]
    assert stats["calls"] == 40 and stats["escalated"] == 20


def test_logs_hold_no_prompt_answer_or_key(make_proxy, ollama_backend, bedrock_server, caplog):
    ollama_backend.add_answer("SECRET-QUESTION", " SECRET-ANSWER", logprobs=UNSURE)
    bedrock_server.add_answer("SECRET-QUESTION", "SECRET-CLOUD")
    proxy = make_proxy(config=ProxyConfig(api_keys=("sk-SECRET-KEY",)))
    caplog.set_level(logging.DEBUG)
    client = client_for(proxy, "sk-SECRET-KEY")
    client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "SECRET-QUESTION?"}])
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "SECRET-QUESTION?"}],
            extra_body={"threshold": 7})
    ours = [r for r in caplog.records if r.name.startswith(("confidence_router", "uvicorn"))]
    assert any("decision=cloud" in r.getMessage() for r in ours)
    for record in ours:
        assert "SECRET" not in record.getMessage()


def test_budget_raise_policy_is_a_429_and_bad_structured_output_a_502(
    make_proxy, ollama_backend, bedrock_server
):
    ollama_backend.add_answer("Australia", " Sydney", logprobs=UNSURE)
    ollama_backend.add_answer("France", " Paris, not JSON", logprobs=CONFIDENT)
    proxy = make_proxy(config=ProxyConfig(budget_usd=0.0))
    client = client_for(proxy)
    served = client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "Capital of Australia?"}])
    assert served.model_extra["routing"]["reason"] == "budget_exceeded"  # default: local, flagged
    with pytest.raises(openai.RateLimitError) as caught:
        client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "Capital of Australia?"}],
            extra_body={"on_budget_exceeded": "raise"})
    assert caught.value.body["code"] == "budget_exceeded"
    assert bedrock_server.requests == []
    with pytest.raises(openai.APIStatusError) as caught:
        client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "Capital of France?"}],
            response_format={"type": "json_schema", "json_schema": {
                "name": "capital", "schema": {"type": "object"}}})
    assert caught.value.status_code == 502
    assert caught.value.body["code"] == "structured_output_failed"
