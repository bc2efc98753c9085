from types import SimpleNamespace

from hypothesis import given
from hypothesis import strategies as st
from langchain_core.messages import AIMessage, AIMessageChunk
from ollama._types import Logprob
from ollama._types import TokenLogprob as OllamaTop

from confidence_router.extraction import chosen_logprobs, message_token_logprobs, token_logprobs


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


_item = st.one_of(
    st.none(),
    st.fixed_dictionaries(
        {"token": st.text(max_size=3)},
        optional={
            "logprob": st.one_of(st.none(), st.floats(min_value=-20, max_value=0)),
            "top_logprobs": st.one_of(
                st.none(), st.just([]),
                st.lists(st.fixed_dictionaries({"token": st.text(max_size=2),
                                                "logprob": st.floats(-20, 0)}),
                         min_size=1, max_size=2),
            ),
        },
    ),
)


@given(st.lists(_item, max_size=8), st.booleans(), st.booleans())
def test_chosen_logprobs_agrees_with_token_logprobs(items, as_objects, openai_layout):
    if as_objects:  # attribute access, as ollama's pydantic objects
        items = [None if i is None else SimpleNamespace(**i) for i in items]
    meta = {"logprobs": {"content": items} if openai_layout else items}
    tokens = token_logprobs(meta)
    values = chosen_logprobs(meta)
    if any(t.top_logprobs for t in tokens):
        assert values is None  # alternatives: only token_logprobs keeps them
    else:
        assert values == [t.logprob for t in tokens]


def test_chosen_logprobs_without_logprobs_is_none():
    assert chosen_logprobs(None) is None
    assert chosen_logprobs({"model": "m"}) is None
    assert chosen_logprobs({"logprobs": []}) == []
