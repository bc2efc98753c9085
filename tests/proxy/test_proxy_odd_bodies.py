"""The proxy attacked with odd bodies: every malformed request is a 4xx JSON error in the
front's shape naming the problem (never a 500, never a 502 for the client's own mistake) and
reaches neither tier; odd but valid shapes are answered. Counts what the fake servers got."""

from __future__ import annotations

import base64
import socket
import time

import httpx
import pytest

from confidence_router.errors import RoutingConfigError
from confidence_router.proxy.config import ProxyConfig

# A 1x1 PNG.
PNG = ("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5E"
       "rkJggg==")
USER = [{"role": "user", "content": "hi"}]
TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}


@pytest.fixture
def proxy(make_proxy, ollama_backend, bedrock_server):
    ollama_backend.set_default("Paris", logprobs=-0.05)
    bedrock_server.set_default("cloud answer")
    return make_proxy()


def _openai(proxy, body, **kwargs):
    return httpx.post(proxy.url + "/v1/chat/completions", json=body, timeout=10, **kwargs)


def _ollama(proxy, body):
    return httpx.post(proxy.url + "/api/chat", json={"stream": False, **body}, timeout=10)


def _nothing_sent(ollama_server, bedrock_server):
    assert ollama_server.requests_to("/api/chat") == []
    assert bedrock_server.requests == []


OPENAI_BAD = [
        # Was a 502 "routing_error": the client's whitespace is not an upstream failure.
        ({"messages": [{"role": "user", "content": "  \n"}]}, None, "nothing to answer"),
        ({"messages": [{"role": "user", "content": "  "}], "stream": True}, None,
         "nothing to answer"),
        # Was a 500 (pydantic ValidationError building the message).
        ({"messages": [{"role": "user", "content": [1, 2]}]}, "messages[0].content[0]",
         "type one of"),
        # Was a 502 after both tiers refused the part client-side.
        ({"messages": [{"role": "user", "content": [
            {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}]}]},
         "messages[0].content[0]", "input_audio"),
        ({"messages": [{"role": "user", "content": [{"text": "no type"}]}]},
         "messages[0].content[0]", "type one of"),
        ({"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]},
         "messages[0].content[0]", "text must be a string"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
         "messages[0].content[0]", "image_url.url"),
        # Was a 502 after both tiers refused to fetch it (nothing was sent).
        ({"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "https://example.invalid/a.png"}}]}]},
         "messages[0].content[0]", "not fetched"),
        # Was a 500 TypeError.
        ({"messages": [{"role": "assistant", "content": "x", "tool_calls": 5}, *USER]},
         "messages[0].tool_calls", "must be a list"),
        # Was a 500 AttributeError.
        ({"messages": USER, "tools": [TOOL], "tool_choice": {"function": "get_weather"}},
         "tool_choice", "tool_choice must be"),
        ({"messages": USER, "tools": [TOOL], "tool_choice": 7}, "tool_choice", "tool_choice"),
        # Was answered without any tool.
        ({"messages": USER, "tool_choice": "required"}, "tool_choice", "needs tools"),
        ({"messages": USER, "tools": [TOOL],
          "tool_choice": {"type": "function", "function": {"name": "other"}}},
         "tool_choice", "not in tools"),
        # Was answered by the cloud after the local tier refused the tool spec.
        ({"messages": USER, "tools": [{"type": "function",
                                       "function": {"name": "f", "parameters": "x"}}]},
         "tools", "parameters"),
        ({"messages": USER, "n": True}, "n", "n=1"),
        ({"messages": USER, "n": 10**12}, "n", "n=1"),
        # A misspelt knob used to be ignored: the request was routed with the default.
        ({"messages": USER, "threshhold": 0.99}, "threshhold", "did you mean"),
        ({"messages": USER, "allow_escalaton": False}, "allow_escalaton", "allow_escalation"),
]


def test_openai_bad_bodies_are_400_before_any_model(proxy, ollama_server, bedrock_server):
    # One test over all bodies: starting a proxy dominates a test's time.
    for body, param, needle in OPENAI_BAD:
        reply = _openai(proxy, {"model": "m", **body})
        assert reply.status_code == 400, (body, reply.text)
        error = reply.json()["error"]
        assert needle in error["message"], body
        assert error["param"] == param, body
        assert error["type"] == "invalid_request_error"
    _nothing_sent(ollama_server, bedrock_server)


OLLAMA_BAD = [
        ({"messages": [{"role": "user", "content": " "}]}, "nothing to answer"),
        ({"messages": [{"role": "user", "content": " "}], "stream": True}, "nothing to answer"),
        ({"messages": USER, "stream": "no"}, "stream must be true or false"),  # was streamed
        ({"messages": [{"role": "assistant", "content": "x", "tool_calls": 5}, *USER]},
         "tool_calls"),                                                         # was a 500
        ({"messages": USER, "tools": [5]}, "tools[0]"),                          # was a 500
        ({"messages": USER, "tools": {"a": 1}}, "tools must be a list"),         # was a 500
        ({"messages": [{"role": 5, "content": "hi"}]}, "role must be a string"),
        ({"messages": [{"role": "user", "content": "hi", "images": "x"}]}, "images"),
        ({"messages": [{"role": "user", "content": "hi", "images": ["!!notbase64"]}]},
         "not base64"),
        ({"messages": [{"role": "user", "content": "hi",
                        "images": [base64.b64encode(b"plain text, no image").decode()]}]},
         "not a PNG, JPEG, GIF or WebP"),
        ({"messages": [{"role": "assistant", "content": "hi", "images": [PNG]}, *USER]},
         "only user messages"),
        ({"messages": USER, "options": {"stop": 5}}, "options.stop"),
        ({"messages": USER, "threshhold": 0.9}, "did you mean"),
]


def test_ollama_bad_bodies_are_400_before_any_model(proxy, ollama_server, bedrock_server):
    for body, needle in OLLAMA_BAD:
        reply = _ollama(proxy, {"model": "m", **body})
        assert reply.status_code == 400, (body, reply.text)
        assert needle in reply.json()["error"], body
    _nothing_sent(ollama_server, bedrock_server)


def test_ollama_images_reach_both_tiers(proxy, ollama_server, bedrock_server):
    """The Ollama front used to drop ``images``: the model answered without the picture."""
    body = {"model": "m", "messages": [{"role": "user", "content": "what is this?",
                                        "images": [PNG]}]}
    kept = _ollama(proxy, body)
    assert kept.status_code == 200 and kept.json()["routing"]["decision"] == "local"
    sent = ollama_server.requests_to("/api/chat")[-1]["body"]["messages"][-1]
    assert sent["images"] == [PNG] and sent["content"].strip() == "what is this?"

    escalated = _ollama(proxy, {**body, "threshold": 1.0})
    assert escalated.json()["message"]["content"] == "cloud answer"
    blocks = bedrock_server.requests[-1]["body"]["messages"][-1]["content"]
    images = [b["image"] for b in blocks if "image" in b]
    assert len(images) == 1 and images[0]["format"] == "png"


def test_openai_image_part_reaches_both_tiers(proxy, ollama_server, bedrock_server):
    content = [{"type": "text", "text": "what is this?"},
               {"type": "image_url", "image_url": {"url": "data:image/png;base64," + PNG}}]
    body = {"model": "m", "messages": [{"role": "user", "content": content}], "threshold": 1.0}
    reply = _openai(proxy, body)
    assert reply.status_code == 200
    assert reply.json()["choices"][0]["message"]["content"] == "cloud answer"
    assert ollama_server.requests_to("/api/chat")[-1]["body"]["messages"][-1]["images"] == [PNG]
    blocks = bedrock_server.requests[-1]["body"]["messages"][-1]["content"]
    assert any("image" in b for b in blocks)


def test_odd_but_valid_openai_shapes_are_answered(proxy, ollama_server):
    shapes = [
        [{"role": "system", "content": "be brief"}],                               # system only
        [{"role": "system", "content": "a"}, {"role": "developer", "content": "b"}, *USER],
        [{"role": "user", "content": "cap?"}, {"role": "assistant", "content": "It is"}],  # prefill
        [{"role": "user", "content": None}, {"role": "assistant", "content": ""}, *USER],
        [{"role": "user", "content": "w?"},
         {"role": "assistant", "content": None, "tool_calls": [
             {"id": "c1", "type": "function",
              "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
         {"role": "tool", "tool_call_id": "c1", "content": "sunny"}],
        [{"role": "assistant", "content": [{"type": "refusal", "refusal": "no"}]}, *USER],
    ]
    for messages in shapes:
        reply = _openai(proxy, {"model": "m", "messages": messages, "temperature": 0.3,
                                "user": "u1", "seed": 1})
        assert reply.status_code == 200, (messages, reply.text)
        assert reply.json()["choices"][0]["message"]["content"] == "Paris"
    assert len(ollama_server.requests_to("/api/chat")) == len(shapes)


def test_ollama_stop_as_a_string_is_honoured(proxy, ollama_server):
    reply = _ollama(proxy, {"model": "m", "messages": USER, "options": {"stop": "\n"}})
    assert reply.status_code == 200
    assert ollama_server.requests_to("/api/chat")[-1]["body"]["options"]["stop"] == ["\n"]


def test_half_a_body_then_silence_is_a_408_and_blocks_nobody(make_proxy, ollama_backend,
                                                             ollama_server):
    ollama_backend.set_default("Paris", logprobs=-0.05)
    proxy = make_proxy(config=ProxyConfig(timeout_s=1.0))
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as stalled:
        stalled.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                        b"Content-Type: application/json\r\nContent-Length: 500\r\n\r\n{\"mo")
        started = time.monotonic()
        reply = _openai(proxy, {"model": "m", "messages": USER})
        assert reply.status_code == 200 and time.monotonic() - started < 0.9
        # The stalled request used to wait forever; it now ends with the proxy's time limit.
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
            piece = stalled.recv(65536)
            if not piece:
                break
            answer += piece
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408")
    assert b"request_timeout" in body
    assert len(ollama_server.requests_to("/api/chat")) == 1


@pytest.mark.parametrize("keys", [",", " , ,"])
def test_api_keys_variable_without_a_key_is_an_error_not_an_open_proxy(keys):
    with pytest.raises(RoutingConfigError, match="holds no key"):
        ProxyConfig.from_env({"CONFIDENCE_ROUTER_PROXY_API_KEYS": keys})
    assert ProxyConfig.from_env({"CONFIDENCE_ROUTER_PROXY_API_KEYS": "k1, "}).api_keys == ("k1",)
    assert ProxyConfig.from_env({"CONFIDENCE_ROUTER_PROXY_API_KEYS": ""}).api_keys == ()


def test_json_nested_too_deeply_is_a_400_on_both_fronts(proxy, ollama_server, bedrock_server):
    # RecursionError from json.loads used to be a 500.
    for path in ("/v1/chat/completions", "/api/chat"):
        reply = httpx.post(proxy.url + path, content=b"[" * 100_000, timeout=10)
        assert reply.status_code == 400, reply.text
        assert "nested too deeply" in reply.text
    _nothing_sent(ollama_server, bedrock_server)


@pytest.mark.parametrize("constant", [b"NaN", b"Infinity", b"-Infinity"])
def test_non_json_number_constants_are_a_400_on_both_fronts(
    proxy, ollama_server, bedrock_server, constant
):
    # Python's json reads them; JSON does not: a NaN temperature reached the tiers.
    for path in ("/v1/chat/completions", "/api/chat"):
        body = (b'{"model": "m", "stream": false, "temperature": ' + constant
                + b', "options": {"temperature": ' + constant + b'}, '
                b'"messages": [{"role": "user", "content": "hi"}]}')
        reply = httpx.post(proxy.url + path, content=body, timeout=10)
        assert reply.status_code == 400, reply.text
        assert "invalid JSON" in reply.text
    _nothing_sent(ollama_server, bedrock_server)


def test_a_lone_surrogate_escape_reads_as_a_replacement_character(proxy, ollama_server):
    body = (b'{"model": "m", "stream": false, '
            b'"messages": [{"role": "user", "content": "caf\\ud800 ok"}]}')
    for path in ("/v1/chat/completions", "/api/chat"):
        reply = httpx.post(proxy.url + path, content=body, timeout=10)
        assert reply.status_code == 200, reply.text
    sent = [r["body"]["messages"][-1]["content"] for r in ollama_server.requests_to("/api/chat")]
    assert sent == ["caf\ufffd ok"] * 2
