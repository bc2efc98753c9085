from langchain_core.messages import AIMessage, AIMessageChunk
from ollama._types import Logprob
from ollama._types import TokenLogprob as OllamaTop

from confidence_router.extraction import message_token_logprobs, token_logprobs


def test_ollama_dict_layout():
    meta = {"logprobs": [
        {"token": "Ro", "logprob": -0.5, "top_logprobs": [{"token": "Ro", "logprob": -0.5},
                                                          {"token": "Pa", "logprob": -1.2}]},
        {"token": "me", "logprob": -0.1, "top_logprobs": []},
    ]}
    tokens = token_logprobs(meta)
    assert [(t.token, t.logprob) for t in tokens] == [("Ro", -0.5), ("me", -0.1)]
    assert tokens[0].top_logprobs == (("Ro", -0.5), ("Pa", -1.2))


def test_ollama_pydantic_objects():
    items = [Logprob(token="Rome", logprob=-0.25,
                     top_logprobs=[OllamaTop(token="Rome", logprob=-0.25)])]
    tokens = message_token_logprobs(AIMessage("Rome", response_metadata={"logprobs": items}))
    assert [(t.token, t.logprob, t.top_logprobs) for t in tokens] == [
        ("Rome", -0.25, (("Rome", -0.25),))
    ]


def test_openai_layout():
    meta = {"logprobs": {"content": [
        {"token": "Paris", "logprob": -0.01, "bytes": [80], "top_logprobs": [
            {"token": "Paris", "logprob": -0.01, "bytes": None}]},
        {"token": ".", "logprob": -0.3, "top_logprobs": []},
    ], "refusal": None}}
    assert [t.logprob for t in token_logprobs(meta)] == [-0.01, -0.3]


def test_openai_refusal_without_content_is_missing():
    assert token_logprobs({"logprobs": {"content": None, "refusal": []}}) is None


def test_stream_chunks_concatenate():
    a = AIMessageChunk(content="Ro", response_metadata={"logprobs": [{"token": "Ro", "logprob": -0.5}]})
    b = AIMessageChunk(content="me", response_metadata={"logprobs": [{"token": "me", "logprob": -0.1}]})
    final = AIMessageChunk(content="", response_metadata={"logprobs": None, "done_reason": "stop"})
    total = a + b + final
    assert [t.logprob for t in message_token_logprobs(total)] == [-0.5, -0.1]


def test_missing_metadata():
    assert token_logprobs(None) is None
    assert token_logprobs({}) is None
    assert token_logprobs({"logprobs": None}) is None
    assert message_token_logprobs(AIMessage("x")) is None


def test_present_but_empty():
    assert token_logprobs({"logprobs": []}) == []
