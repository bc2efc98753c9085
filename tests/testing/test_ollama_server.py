"""ScriptedBackend + OllamaCompatibleServer against the real ChatOllama and ollama clients."""

from __future__ import annotations

import json
import math
import re
import socket
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

import httpx
import ollama
import pytest
from hypothesis import given
from hypothesis import strategies as st
from langchain_core.messages import AIMessageChunk, HumanMessage, ToolMessage
from langchain_ollama import ChatOllama
from pydantic import BaseModel, Field

from confidence_router.serving.ollama_server import OllamaCompatibleServer
from confidence_router.serving.protocol import (
    BackendError,
    ChatBackend,
    ChatReply,
    ChatRequest,
    GeneratedToken,
)
from confidence_router.testing import ScriptedBackend, split_words

MODEL = "scripted-local"


def _chat(server: OllamaCompatibleServer, **kwargs: object) -> ChatOllama:
    params: dict[str, object] = {"base_url": server.url, "model": MODEL}
    params.update(kwargs)
    return ChatOllama(**params)  # type: ignore[arg-type]


def _request(text: str, **kwargs: object) -> ChatRequest:
    return ChatRequest(model=MODEL, messages=[{"role": "user", "content": text}], **kwargs)  # type: ignore[arg-type]


class GetWeather(BaseModel):
    """Get the current weather for a city."""

    city: str = Field(description="City name")


# =============================================================================================
# ChatOllama: invoke / stream / async / batch with logprobs
# =============================================================================================


def test_invoke_returns_logprobs_usage_and_done_metadata(
    ollama_backend: ScriptedBackend, ollama_server: OllamaCompatibleServer
) -> None:
    ollama_backend.add_answer(
        "capital of France", " Paris is the capital.", logprobs=[-0.1, -0.2, -0.3, -0.4]
    )
    reply = _chat(ollama_server, logprobs=True, top_logprobs=3).invoke(
        "What is the capital of France?"
    )

    assert reply.content == " Paris is the capital."
    logprobs = reply.response_metadata["logprobs"]
    assert [lp["token"] for lp in logprobs] == [" Paris", " is", " the", " capital."]
    assert [lp["logprob"] for lp in logprobs] == [-0.1, -0.2, -0.3, -0.4]
    for lp in logprobs:
        tops = lp["top_logprobs"]
        assert len(tops) == 3
        assert tops[0]["token"] == lp["token"] and tops[0]["logprob"] == lp["logprob"]
        assert all(alt["logprob"] < lp["logprob"] for alt in tops[1:])
    assert reply.usage_metadata == {"input_tokens": 6, "output_tokens": 4, "total_tokens": 10}
    assert reply.response_metadata["done_reason"] == "stop"
    assert reply.response_metadata["model_name"] == MODEL
    assert reply.response_metadata["total_duration"] >= reply.response_metadata["eval_duration"]

    (request,) = ollama_server.requests_to("/api/chat")
    assert request["body"]["logprobs"] is True
    assert request["body"]["top_logprobs"] == 3
    assert request["body"]["stream"] is True  # ChatOllama streams even for invoke()


def test_invoke_non_streaming_gets_all_logprobs_in_one_object(
    ollama_backend: ScriptedBackend, ollama_server: OllamaCompatibleServer
) -> None:
    ollama_backend.add_answer("France", " Paris", logprobs=-0.05)
    reply = _chat(ollama_server, logprobs=True, top_logprobs=1).invoke("France?", stream=False)
    assert reply.content == " Paris"
    assert [(lp["token"], lp["logprob"]) for lp in reply.response_metadata["logprobs"]] == [
        (" Paris", -0.05)
    ]
    assert len(reply.response_metadata["logprobs"][0]["top_logprobs"]) == 1
    assert reply.usage_metadata is not None and reply.usage_metadata["output_tokens"] == 1
    assert ollama_server.requests_to("/api/chat")[-1]["body"]["stream"] is False


def test_stream_yields_one_chunk_per_token_with_its_own_logprobs(
    ollama_backend: ScriptedBackend, ollama_server: OllamaCompatibleServer
) -> None:
    ollama_backend.add_answer("count", " one two three", logprobs=[-0.1, -0.2, -0.3])
    chunks = list(_chat(ollama_server, logprobs=True, top_logprobs=2).stream("count to three"))

    content_chunks = [c for c in chunks if c.content]
    assert [c.content for c in content_chunks] == [" one", " two", " three"]
    for chunk, expected in zip(content_chunks, [-0.1, -0.2, -0.3]):
        (lp,) = chunk.response_metadata["logprobs"]
        assert lp["logprob"] == expected
        assert len(lp["top_logprobs"]) == 2
    done = [c for c in chunks if c.response_metadata.get("done")]
    assert len(done) == 1 and done[0].response_metadata["eval_count"] == 3

    total = chunks[0]
    for chunk in chunks[1:]:
        total += chunk
    assert isinstance(total, AIMessageChunk)
    assert total.content == " one two three"
    assert [lp["logprob"] for lp in total.response_metadata["logprobs"]] == [-0.1, -0.2, -0.3]
    assert total.usage_metadata is not None and total.usage_metadata["output_tokens"] == 3


def test_without_logprobs_request_no_logprobs_are_sent(
    ollama_backend: ScriptedBackend, ollama_server: OllamaCompatibleServer
) -> None:
    ollama_backend.add_answer(None, " hello there")
    reply = _chat(ollama_server).invoke("hi")
    assert reply.content == " hello there"
    assert not reply.response_metadata.get("logprobs")


def test_logprobs_without_top_logprobs_omit_alternatives(
    ollama_backend: ScriptedBackend, ollama_server: OllamaCompatibleServer
) -> None:
    ollama_backend.add_answer(None, " hi", logprobs=-0.5)
    reply = _chat(ollama_server, logprobs=True).invoke("hi")
    (lp,) = reply.response_metadata["logprobs"]
    assert lp["logprob"] == -0.5
    # Ollama omits the field when top_logprobs is 0; the client's Logprob object then raises
    # KeyError on lp["top_logprobs"], so consumers must use .get().
    assert lp.get("top_logprobs") is None
    with pytest.raises(KeyError):
        lp["top_logprobs"]


async def test_ainvoke_and_astream(
    ollama_backend: ScriptedBackend, ollama_server: OllamaCompatibleServer
) -> None:
    ollama_backend.add_answer("France", " Paris", logprobs=-0.2)
    llm = _chat(ollama_server, logprobs=True, top_logprobs=2)

    reply = await llm.ainvoke("France?")
    assert reply.content == " Paris"
    assert reply.response_metadata["logprobs"][0]["logprob"] == -0.2

    chunks = [chunk async for chunk in llm.astream("France?")]
    content = [c for c in chunks if c.content]
    assert [c.content for c in content] == [" Paris"]
    assert content[0].response_metadata["logprobs"][0]["top_logprobs"][0]["token"] == " Paris"


def test_batch_answers_each_prompt_concurrently(
    ollama_backend: ScriptedBackend, ollama_server: OllamaCompatibleServer
) -> None:
    countries = {"France": " Paris", "Japan": " Tokyo", "Italy": " Rome", "Peru": " Lima"}
    rules = {c: ollama_backend.add_answer(c, city, logprobs=-0.1) for c, city in countries.items()}
    # A small latency makes the requests overlap on the server's handler threads.
    ollama_backend.delay(None, 0.05)

    prompts: list[Any] = [f"Capital of {c}?" for c in countries] * 2
    replies = _chat(ollama_server, logprobs=True).batch(prompts, config={"max_concurrency": 8})

    assert [r.content for r in replies] == list(countries.values()) * 2
    assert all(rule.calls == 2 for rule in rules.values())
    assert len(ollama_backend.requests) == 8


# =============================================================================================
# Scripting features through the wire
# =============================================================================================


def test_yes_no_probe_with_explicit_top_logprobs(
    ollama_backend: ScriptedBackend, ollama_server: OllamaCompatibleServer
) -> None:
    ollama_backend.add_probe("Is the proposed answer correct", {"NO": -2.4, "YES": -0.1})
    probe = _chat(ollama_server, logprobs=True, top_logprobs=5, num_predict=1, temperature=0)
    reply = probe.invoke("Is the proposed answer correct? Answer YES or NO.")

    assert reply.content == "YES"
    (lp,) = reply.response_metadata["logprobs"]
    assert [(t["token"], t["logprob"]) for t in lp["top_logprobs"]] == [
        ("YES", -0.1),
        ("NO", -2.4),
    ]
    assert ollama_server.requests_to("/api/chat")[-1]["body"]["options"]["num_predict"] == 1

    # The server trims alternatives to the requested k.
    trimmed = _chat(ollama_server, logprobs=True, top_logprobs=1).invoke(
        "Is the proposed answer correct?"
    )
    assert [t["token"] for t in trimmed.response_metadata["logprobs"][0]["top_logprobs"]] == ["YES"]


def test_default_answer_and_strict_mode(
    ollama_backend: ScriptedBackend, ollama_server: OllamaCompatibleServer
) -> None:
    llm = _chat(ollama_server)
    assert llm.invoke("anything at all").content == "I don't know."
    assert ollama_backend.default_calls == 1

    ollama_backend.set_default(None)
    with pytest.raises(ollama.ResponseError) as excinfo:
        llm.invoke("typo in the question")
    assert excinfo.value.status_code == 404
    assert "typo in the question" in excinfo.value.error


def test_backend_error_maps_to_response_error_with_status(
    ollama_backend: ScriptedBackend, ollama_server: OllamaCompatibleServer
) -> None:
    rule = ollama_backend.fail("overload", status=503, message="model overloaded", times=1)
    ollama_backend.add_answer("overload", " fine now")
    llm = _chat(ollama_server)

    with pytest.raises(ollama.ResponseError) as excinfo:
        llm.invoke("overload me")
    assert excinfo.value.status_code == 503
    assert excinfo.value.error == "model overloaded"
    # ``times=1``: the next request goes through to the answer rule.
    assert llm.invoke("overload me").content == " fine now"
    assert rule.calls == 1 and rule.exhausted

    with pytest.raises(ollama.ResponseError) as non_stream:
        ollama_backend.fail("again", status=500)
        llm.invoke("again", stream=False)
    assert non_stream.value.status_code == 500


def test_failure_mid_stream_sends_an_error_line(
    ollama_backend: ScriptedBackend, ollama_server: OllamaCompatibleServer
) -> None:
    ollama_backend.add_answer("story", " once upon a time")
    ollama_backend.fail("story", message="CUDA out of memory", after_tokens=2)

    received: list[str] = []
    with pytest.raises(ollama.ResponseError) as excinfo:
        for chunk in _chat(ollama_server).stream("tell a story"):
            received.append(chunk.text)
    assert "".join(received) == " once upon"
    assert excinfo.value.error == "CUDA out of memory"
    assert excinfo.value.status_code == -1  # the HTTP status was already 200


def test_latency_makes_a_short_client_timeout_fire(
    ollama_backend: ScriptedBackend,
    ollama_server: OllamaCompatibleServer,
    capfd: pytest.CaptureFixture[str],
) -> None:
    finished = threading.Event()
    slow = ScriptedBackend()
    slow.add_answer("slow", " eventually", latency=1.0)
    # Signal when the server is done with the abandoned request, to check it stayed quiet.
    ollama_server.backend = _NotifyingBackend(slow, finished)

    llm = _chat(ollama_server, client_kwargs={"timeout": 0.2})
    started = time.perf_counter()
    with pytest.raises(httpx.TimeoutException):
        llm.invoke("a slow question")
    assert time.perf_counter() - started < 0.9  # the client gave up before the answer

    assert finished.wait(5), "server never finished the abandoned request"
    ollama_server.backend = ollama_backend
    assert _chat(ollama_server).invoke("quick").content == "I don't know."
    assert "Traceback" not in capfd.readouterr().err


def test_abrupt_client_disconnect_is_quiet(
    ollama_backend: ScriptedBackend,
    ollama_server: OllamaCompatibleServer,
    capfd: pytest.CaptureFixture[str],
) -> None:
    finished = threading.Event()
    slow = ScriptedBackend()
    slow.add_answer(None, " a b c d e f", token_delay=0.02)
    ollama_server.backend = _NotifyingBackend(slow, finished)

    body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "x"}]})
    with socket.create_connection(("127.0.0.1", ollama_server.port)) as sock:
        sock.sendall(
            b"POST /api/chat HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n{body}".encode()
        )
        assert sock.recv(64).startswith(b"HTTP/1.1 200")
    # Socket closed mid-stream; the server must notice and stop without a traceback.
    assert finished.wait(5)
    assert "Traceback" not in capfd.readouterr().err


def test_token_delay_streams_incrementally_over_chunked_ndjson(
    ollama_backend: ScriptedBackend, ollama_server: OllamaCompatibleServer
) -> None:
    ollama_backend.add_answer(None, " a b c", token_delay=0.15)
    payload = {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "logprobs": True}
    started = time.perf_counter()
    with httpx.stream("POST", f"{ollama_server.url}/api/chat", json=payload) as response:
        assert response.headers["transfer-encoding"] == "chunked"
        assert response.headers["content-type"] == "application/x-ndjson"
        arrivals = []
        lines = []
        for line in response.iter_lines():
            arrivals.append(time.perf_counter() - started)
            lines.append(json.loads(line))
    assert [line["done"] for line in lines] == [False, False, False, True]
    assert [line["message"]["content"] for line in lines] == [" a", " b", " c", ""]
    assert lines[0]["logprobs"][0]["bytes"] == list(b" a")
    assert "logprobs" not in lines[-1]
    # Lines arrive as they are produced (not buffered until the end): the first and third
    # token lines are two token delays apart.
    assert arrivals[2] - arrivals[0] >= 0.25


def test_tool_calls_round_trip_with_bind_tools(
    ollama_backend: ScriptedBackend, ollama_server: OllamaCompatibleServer
) -> None:
    weather = ollama_backend.add_answer(
        "weather", tool_calls=[{"name": "GetWeather", "arguments": {"city": "Paris"}}], times=1
    )
    ollama_backend.add_answer(
        lambda req: req.messages[-1]["role"] == "tool", " It is sunny in Paris."
    )
    llm = _chat(ollama_server).bind_tools([GetWeather])

    question = HumanMessage("What is the weather in Paris?")
    call = llm.invoke([question])
    assert [(tc["name"], tc["args"]) for tc in call.tool_calls] == [
        ("GetWeather", {"city": "Paris"})
    ]
    sent_tools = ollama_server.requests_to("/api/chat")[-1]["body"]["tools"]
    assert sent_tools[0]["function"]["name"] == "GetWeather"
    assert ollama_backend.requests[-1].tools[0]["function"]["name"] == "GetWeather"

    result = ToolMessage("sunny, 24C", tool_call_id=call.tool_calls[0]["id"])
    final = llm.invoke([question, call, result])
    assert final.content == " It is sunny in Paris."
    roles = [m["role"] for m in ollama_backend.requests[-1].messages]
    assert roles == ["user", "assistant", "tool"]
    assert weather.calls == 1


def test_tool_calls_in_stream_and_non_stream(
    ollama_backend: ScriptedBackend, ollama_server: OllamaCompatibleServer
) -> None:
    ollama_backend.add_answer(
        None, tool_calls=[{"function": {"name": "GetWeather", "arguments": {"city": "Oslo"}}}]
    )
    llm = _chat(ollama_server).bind_tools([GetWeather])
    total: Any = None
    for chunk in llm.stream("weather in Oslo"):
        total = chunk if total is None else total + chunk
    assert total is not None
    assert [tc["args"] for tc in total.tool_calls] == [{"city": "Oslo"}]
    assert [tc["args"] for tc in llm.invoke("weather", stream=False).tool_calls] == [
        {"city": "Oslo"}
    ]


# =============================================================================================
# Raw ollama client: /api/generate and metadata endpoints
# =============================================================================================


def test_generate_wraps_prompt_as_a_user_message(
    ollama_backend: ScriptedBackend, ollama_server: OllamaCompatibleServer
) -> None:
    ollama_backend.add_answer("Q: capital of Italy", " Rome", logprobs=-0.3)
    client = ollama.Client(host=ollama_server.url)

    result = client.generate(
        model=MODEL,
        prompt="Q: capital of Italy\nA:",
        system="Be brief.",
        logprobs=True,
        top_logprobs=2,
        stream=False,
    )
    assert result.response == " Rome"
    assert result.done and result.eval_count == 1
    assert result.logprobs is not None and result.logprobs[0].logprob == -0.3
    assert len(result.logprobs[0].top_logprobs or []) == 2
    assert ollama_backend.requests[-1].messages == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Q: capital of Italy\nA:"},
    ]

    parts = list(client.generate(model=MODEL, prompt="Q: capital of Italy", stream=True))
    assert "".join(p.response or "" for p in parts) == " Rome"
    assert parts[-1].done and parts[-1].done_reason == "stop"


def test_empty_prompt_is_a_load_request(
    ollama_backend: ScriptedBackend, ollama_server: OllamaCompatibleServer
) -> None:
    result = ollama.Client(host=ollama_server.url).generate(model=MODEL, prompt="")
    assert result.done_reason == "load"
    assert ollama_backend.requests == []


def test_tags_version_show_and_model_validation(
    ollama_backend: ScriptedBackend, ollama_server: OllamaCompatibleServer
) -> None:
    ollama_backend.set_models(["qwen2.5:7b", "scripted-local"])
    client = ollama.Client(host=ollama_server.url)
    assert [m.model for m in client.list().models] == ["qwen2.5:7b", "scripted-local"]
    assert httpx.get(f"{ollama_server.url}/api/version").json() == {"version": "0.13.0"}
    assert "completion" in (client.show("scripted-local").capabilities or [])
    with pytest.raises(ollama.ResponseError) as excinfo:
        client.show("missing-model")
    assert excinfo.value.status_code == 404

    # ChatOllama's validate_model_on_init uses /api/tags ("qwen2.5" matches "qwen2.5:7b").
    ChatOllama(base_url=ollama_server.url, model="qwen2.5", validate_model_on_init=True)
    with pytest.raises(ValueError, match="not found"):
        ChatOllama(base_url=ollama_server.url, model="llama3", validate_model_on_init=True)


def test_strict_models_reject_unknown_models() -> None:
    backend = ScriptedBackend(models=["known"], strict_models=True)
    with OllamaCompatibleServer(backend) as server:
        assert ChatOllama(base_url=server.url, model="known").invoke("x").content
        with pytest.raises(ollama.ResponseError) as excinfo:
            ChatOllama(base_url=server.url, model="unknown").invoke("x")
    assert excinfo.value.status_code == 404
    assert excinfo.value.error == "model 'unknown' not found"


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "message"),
    [
        ("POST", "/api/chat", {"messages": []}, 400, "model is required"),
        ("POST", "/api/chat", {"model": "m", "top_logprobs": 21}, 400, "between 0 and 20"),
        ("POST", "/api/chat", {"model": "m", "messages": "hi"}, 400, "messages must be a list"),
        ("POST", "/api/nope", {}, 404, "404 page not found"),
        ("GET", "/api/chat", None, 405, "not allowed"),
    ],
)
def test_malformed_requests_get_json_errors(
    ollama_server: OllamaCompatibleServer,
    method: str,
    path: str,
    body: object,
    status: int,
    message: str,
) -> None:
    reply = httpx.request(method, f"{ollama_server.url}{path}", json=body)
    assert reply.status_code == status
    assert message in reply.json()["error"]


def test_invalid_json_body(ollama_server: OllamaCompatibleServer) -> None:
    reply = httpx.post(f"{ollama_server.url}/api/chat", content=b"{not json")
    assert reply.status_code == 400
    assert reply.json()["error"].startswith("invalid JSON body")
    assert ollama_server.requests[-1] == {"method": "POST", "path": "/api/chat", "body": None}


def test_backend_bug_is_reported_as_500_not_a_hang(ollama_server: OllamaCompatibleServer) -> None:
    class Broken(ScriptedBackend):
        def chat(self, request: ChatRequest) -> ChatReply:
            raise RuntimeError("bug in backend")

    ollama_server.backend = Broken()
    with pytest.raises(ollama.ResponseError) as excinfo:
        _chat(ollama_server).invoke("x")
    assert excinfo.value.status_code == 500
    assert "RuntimeError: bug in backend" in excinfo.value.error


def test_root_endpoint_and_request_log(ollama_server: OllamaCompatibleServer) -> None:
    assert httpx.get(ollama_server.url + "/").text == "Ollama is running"
    assert ollama_server.requests == [{"method": "GET", "path": "/", "body": None}]
    ollama_server.clear_requests()
    assert ollama_server.requests == []


# =============================================================================================
# Server lifecycle
# =============================================================================================


def test_lifecycle_start_stop_and_context_manager() -> None:
    server = OllamaCompatibleServer(ScriptedBackend())
    with pytest.raises(RuntimeError, match="not running"):
        _ = server.url
    assert server.start() is server and server.start() is server  # idempotent
    url = server.url
    assert re.fullmatch(r"http://127\.0\.0\.1:\d+", url)
    assert httpx.get(url + "/api/version").status_code == 200
    server.stop()
    server.stop()
    assert not server.running
    with pytest.raises(httpx.ConnectError):
        httpx.get(url + "/api/version")

    with OllamaCompatibleServer(ScriptedBackend()) as managed:
        assert managed.running
    assert not managed.running


def test_stop_with_idle_keep_alive_connection_is_fast() -> None:
    with OllamaCompatibleServer(ScriptedBackend()) as server, httpx.Client() as client:
        client.get(server.url + "/api/version")  # leaves a pooled keep-alive connection
        started = time.perf_counter()
        server.stop()
        assert time.perf_counter() - started < 1.0


def test_backend_must_implement_the_protocol() -> None:
    with pytest.raises(TypeError, match="ChatBackend"):
        OllamaCompatibleServer(object())  # type: ignore[arg-type]
    assert isinstance(ScriptedBackend(), ChatBackend)


# =============================================================================================
# ScriptedBackend on its own (no HTTP)
# =============================================================================================


@given(st.text(max_size=80))
def test_split_words_round_trips(text: str) -> None:
    tokens = split_words(text)
    assert "".join(tokens) == text
    assert all(tokens)


def test_split_words_keeps_leading_whitespace() -> None:
    assert split_words(" Paris is nice. ") == [" Paris", " is", " nice. "]
    assert split_words("Paris") == ["Paris"]


def test_generated_top_logprobs_form_a_valid_distribution() -> None:
    backend = ScriptedBackend()
    backend.add_answer(None, " a b c", logprobs=[-0.01, -1.5, -6.0])
    for token in backend.chat(_request("x")).tokens:
        tops = list(token.top_logprobs)
        assert tops[0] == (token.text, token.logprob)
        assert len(tops) == 20
        assert len({t for t, _ in tops}) == 20  # no duplicate alternatives
        assert [lp for _, lp in tops] == sorted((lp for _, lp in tops), reverse=True)
        assert all(lp < token.logprob for _, lp in tops[1:])
        assert sum(math.exp(lp) for _, lp in tops) <= 1.0 + 1e-9


def test_certain_token_gets_negligible_alternatives() -> None:
    backend = ScriptedBackend()
    backend.add_answer(None, "sure", logprobs=0.0)
    (token,) = backend.chat(_request("x")).tokens
    assert token.top_logprobs[0] == ("sure", 0.0)
    assert all(lp == -50.0 for _, lp in token.top_logprobs[1:])


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        (
            {"logprobs": [-0.1, -0.2]},
            ValueError,
            "logprobs has 2 values but the answer has 3 tokens",
        ),
        ({"logprobs": 0.5}, ValueError, "<= 0"),
        ({"logprobs": float("nan")}, ValueError, "finite"),
        ({"logprobs": "high"}, ValueError, "float or a list of floats"),
        ({"top_logprobs": {"A": -0.1}}, ValueError, "only allowed for a one-token answer"),
        ({"top_logprobs": [[("a", -0.1)]]}, ValueError, "1 per-token entries but the answer has 3"),
        ({"top_logprobs": [["a"], [], []]}, ValueError, "expected (token, logprob) pairs"),
        ({"tool_calls": [{"arguments": {}}]}, TypeError, "must look like"),
        ({"latency": -1}, ValueError, "latency must be a non-negative"),
        ({"times": 0}, ValueError, "times must be a positive integer"),
    ],
)
def test_add_answer_validates_eagerly(
    kwargs: dict[str, object], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=re.escape(message)):
        ScriptedBackend().add_answer("x", " a b c", **kwargs)  # type: ignore[arg-type]


def test_explicit_top_logprobs_must_agree_with_logprobs() -> None:
    backend = ScriptedBackend()
    with pytest.raises(ValueError, match=r"token 0 \('YES'\) has logprob -0.5"):
        backend.add_answer("x", "YES", logprobs=-0.5, top_logprobs={"YES": -0.1, "NO": -2.0})
    # Without explicit logprobs, the chosen token's logprob comes from its top entry.
    per_token: list[Any] = [{"Y": -0.3}, [("ES", -0.01), ("S", -5.0)]]
    backend.add_answer("x", ["Y", "ES"], top_logprobs=per_token)
    tokens = list(backend.chat(_request("x")).tokens)
    assert [(t.text, t.logprob) for t in tokens] == [("Y", -0.3), ("ES", -0.01)]
    assert tokens[1].top_logprobs == (("ES", -0.01), ("S", -5.0))


def test_generated_token_answers_are_used_verbatim() -> None:
    backend = ScriptedBackend()
    token = GeneratedToken("ok", -0.7, (("ok", -0.7), ("no", -1.0)))
    backend.add_answer(None, [token])
    assert list(backend.chat(_request("x")).tokens) == [token]
    with pytest.raises(ValueError, match="carry their own logprobs"):
        backend.add_answer(None, [token], logprobs=-0.1)


def test_matching_rules_first_match_regex_callable_model_and_times() -> None:
    backend = ScriptedBackend()
    first = backend.add_answer("capital", "A", times=1)
    regex = backend.add_answer(re.compile(r"capital of \w+"), "B")
    by_model = backend.add_answer(None, "C", model="other-model")
    by_callable = backend.add_answer(lambda r: r.options.get("temperature") == 0, "D")

    def answer(request: ChatRequest) -> str:
        return "".join(t.text for t in backend.chat(request).tokens)

    assert answer(_request("the capital of Peru")) == "A"
    assert answer(_request("the capital of Peru")) == "B"  # first rule exhausted
    assert (
        answer(ChatRequest(model="other-model", messages=[{"role": "user", "content": "?"}])) == "C"
    )
    assert answer(_request("?", options={"temperature": 0})) == "D"
    assert answer(_request("?")) == "I don't know."
    assert (first.calls, regex.calls, by_model.calls, by_callable.calls) == (1, 1, 1, 1)
    assert backend.default_calls == 1


def test_matching_uses_the_last_user_message_with_text() -> None:
    backend = ScriptedBackend()
    backend.add_answer("second", "2")
    backend.add_answer("first", "1")
    request = ChatRequest(
        model=MODEL,
        messages=[
            {"role": "system", "content": "You mention second things."},
            {"role": "user", "content": "first question"},
            {"role": "assistant", "content": "second"},
        ],
    )
    assert "".join(t.text for t in backend.chat(request).tokens) == "1"


def test_immediate_failure_does_not_consume_the_answer_budget() -> None:
    backend = ScriptedBackend()
    answer = backend.add_answer("q", "ok", times=1)
    backend.fail("q", status=429, message="busy", times=1)
    with pytest.raises(BackendError) as excinfo:
        backend.chat(_request("q"))
    assert (excinfo.value.status, excinfo.value.message) == (429, "busy")
    assert "".join(t.text for t in backend.chat(_request("q")).tokens) == "ok"
    assert answer.calls == 1


def test_delay_rule_applies_before_first_token() -> None:
    backend = ScriptedBackend()
    backend.add_answer(None, "x")
    rule = backend.delay("slow", 0.3, times=1)
    started = time.perf_counter()
    reply = backend.chat(_request("slow"))
    assert time.perf_counter() - started < 0.2  # chat() returns at once; tokens are lazy
    assert [t.text for t in reply.tokens] == ["x"]
    assert time.perf_counter() - started >= 0.3
    assert rule.exhausted


def test_reset_restores_a_clean_backend() -> None:
    backend = ScriptedBackend(default_answer="fallback")
    backend.add_answer(None, "scripted")
    backend.chat(_request("x"))
    backend.set_default("changed")
    backend.reset()
    assert backend.rules == [] and backend.requests == []
    assert "".join(t.text for t in backend.chat(_request("x")).tokens) == "fallback"


def test_thread_safe_counting_under_concurrency() -> None:
    backend = ScriptedBackend()
    rule = backend.add_answer("q", "a")

    def worker() -> None:
        for _ in range(200):
            list(backend.chat(_request("q")).tokens)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert rule.calls == 1600
    assert len(backend.requests) == 1600


class _NotifyingBackend:
    """Wraps a backend; sets ``finished`` when the server stops consuming a reply's tokens."""

    def __init__(self, inner: ScriptedBackend, finished: threading.Event) -> None:
        self._inner = inner
        self._finished = finished

    def chat(self, request: ChatRequest) -> ChatReply:
        reply = self._inner.chat(request)
        inner_tokens = reply.tokens

        def tokens() -> Iterator[GeneratedToken]:
            try:
                yield from inner_tokens
            finally:
                self._finished.set()

        reply.tokens = tokens()
        return reply

    def embed(self, model: str, inputs: Sequence[str]) -> list[list[float]]:
        return self._inner.embed(model, inputs)

    def models(self) -> list[str]:
        return self._inner.models()


def test_latency_holds_when_the_process_has_more_than_1024_descriptors(
    ollama_backend: ScriptedBackend, ollama_server: OllamaCompatibleServer
) -> None:
    """The server checks whether a waiting client hung up; select.select() cannot watch a
    descriptor >= 1024, so in a busy process (the full test suite reached that) every wait
    read as "client gone" and scripted answers came back empty at once."""
    import os

    held = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
    try:
        ollama_backend.add_answer("slow", " eventually", logprobs=-0.1, latency=0.3)
        reply = _chat(ollama_server, logprobs=True).invoke("slow one")
        assert reply.content == " eventually"
        with pytest.raises(httpx.TimeoutException):
            _chat(ollama_server, client_kwargs={"timeout": 0.1}).invoke("slow one")
    finally:
        for fd in held:
            os.close(fd)
