"""How the Ollama-compatible server reads request JSON (as Ollama's Go decoder does), checked
with the ScriptedBackend, so it runs without the embedded model too."""

from __future__ import annotations

import json

import httpx
import ollama
import pytest

from confidence_router.serving.ollama_server import OllamaCompatibleServer
from confidence_router.testing import ScriptedBackend

MODEL = "scripted-local"


def _post(server: OllamaCompatibleServer, path: str, data: bytes) -> httpx.Response:
    return httpx.post(server.url + path, content=data,
                      headers={"Content-Type": "application/json"}, timeout=30)


@pytest.mark.parametrize("constant", ["Infinity", "-Infinity", "NaN"])
def test_non_json_number_constants_are_refused(
    ollama_backend: ScriptedBackend, ollama_server: OllamaCompatibleServer, constant: str
) -> None:
    data = (b'{"model": "scripted-local", "messages": [{"role": "user", "content": "hi"}],'
            b' "options": {"num_predict": %s}}' % constant.encode())
    response = _post(ollama_server, "/api/chat", data)
    assert response.status_code == 400
    assert response.json() == {"error": f"invalid JSON body: {constant} is not valid JSON"}
    assert ollama_backend.requests == []  # the backend never saw it


def test_lone_surrogate_escapes_read_as_replacement_characters(
    ollama_backend: ScriptedBackend, ollama_server: OllamaCompatibleServer
) -> None:
    ollama_backend.add_answer("France", " Paris")
    body = {"model": MODEL, "stream": False,
            "messages": [{"role": "user", "content": "France \ud800 \udc00\ud83d\ude00 end"}]}
    data = json.dumps(body).encode()  # ensure_ascii: every surrogate is a \\u escape
    assert b"\\ud800" in data
    response = _post(ollama_server, "/api/chat", data)
    assert response.status_code == 200, response.text
    assert response.json()["message"]["content"] == " Paris"
    (request,) = ollama_backend.requests
    assert request.messages[0]["content"] == "France \ufffd \ufffd\U0001F600 end"
    # In the model name (echoed in the reply): an answer, not a dropped connection.
    response = _post(ollama_server, "/api/chat",
                     json.dumps({**body, "model": "x\udc80"}).encode())
    assert response.status_code == 200
    assert response.json()["model"] == "x\ufffd"


def test_raw_generate_is_a_request_field(
    ollama_backend: ScriptedBackend, ollama_server: OllamaCompatibleServer
) -> None:
    ollama_backend.add_answer("sky", " blue")
    client = ollama.Client(host=ollama_server.url)
    reply = client.generate(model=MODEL, prompt="The sky is", raw=True)
    assert reply.response == " blue"
    (request,) = ollama_backend.requests
    assert request.raw is True
    assert [m["role"] for m in request.messages] == ["user"]
    # raw with a system prompt: Ollama refuses the combination (it was dropped silently).
    with pytest.raises(ollama.ResponseError, match="raw mode does not support") as caught:
        client.generate(model=MODEL, prompt="The sky is", system="Be brief.", raw=True)
    assert caught.value.status_code == 400
    assert len(ollama_backend.requests) == 1
    response = _post(ollama_server, "/api/generate",
                     b'{"model": "scripted-local", "prompt": "x", "raw": "yes"}')
    assert response.status_code == 400
    assert "raw" in response.json()["error"]


def test_embed_dimensions_must_be_a_non_negative_integer(
    ollama_backend: ScriptedBackend, ollama_server: OllamaCompatibleServer
) -> None:
    for dimensions in ("true", '"8"', "-1", "2.5"):
        data = b'{"model": "scripted-local", "input": "a", "dimensions": %s}' % dimensions.encode()
        response = _post(ollama_server, "/api/embed", data)
        assert response.status_code == 400, dimensions
        assert "dimensions" in response.json()["error"]
    client = ollama.Client(host=ollama_server.url)
    (vector,) = client.embed(model=MODEL, input="a", dimensions=3).embeddings
    assert len(vector) == 3
