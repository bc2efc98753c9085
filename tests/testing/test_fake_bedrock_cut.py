"""FakeBedrockServer.cut: the connection closes mid-answer with no error (a network cut),
seen through the real ChatBedrockConverse client."""

from __future__ import annotations

import pytest

from confidence_router.errors import InvalidArgumentError


def test_cut_stream_sends_the_first_pieces_then_closes(bedrock_server, bedrock_chat):
    bedrock_server.add_answer("q", "one two three four", input_tokens=3, output_tokens=4)
    rule = bedrock_server.cut("q", after_pieces=2, times=2)
    seen = []
    with pytest.raises(Exception) as raised:  # botocore's error for a body that ended early
        for chunk in bedrock_chat().stream("q"):
            seen.append(chunk.content)
    assert "".join(c[0]["text"] for c in seen if c and isinstance(c, list)) == "one two"
    print("RAISED", type(raised.value).__mro__, raised.value)
    from botocore.exceptions import ConnectionClosedError

    with pytest.raises(ConnectionClosedError, match="Connection was closed"):
        bedrock_chat().invoke("q")  # not streamed: closed before any response
    assert rule.calls == 2 and len(bedrock_server.requests) == 2
    assert bedrock_chat().invoke("q").content == "one two three four"  # times=2 used up


@pytest.mark.parametrize("bad", [-1, True, 1.5])
def test_cut_refuses_a_bad_piece_count(bedrock_server, bad):
    with pytest.raises(InvalidArgumentError, match="after_pieces"):
        bedrock_server.cut("q", after_pieces=bad)
