"""FakeBedrockServer.drop: rule counting and argument checks (the connection faults themselves
are exercised through the real clients in tests/router/test_chaos_router.py)."""

from __future__ import annotations

import pytest

from confidence_router.errors import InvalidArgumentError


def test_drop_counts_like_fail_and_ends_after_times(bedrock_server, bedrock_chat):
    from botocore.exceptions import ConnectionClosedError

    bedrock_server.add_answer("q", "one two three four", input_tokens=3, output_tokens=4)
    rule = bedrock_server.drop("q", after_pieces=2, times=2)
    chat = bedrock_chat()
    with pytest.raises(ConnectionClosedError, match="Connection was closed"):
        chat.invoke("q")  # not streamed: closed before any response, whatever after_pieces
    with pytest.raises(ConnectionClosedError):
        chat.invoke("q")
    assert rule.calls == 2 and len(bedrock_server.requests) == 2
    assert chat.invoke("q").content == "one two three four"  # times=2 used up
    assert len(bedrock_server.requests) == 3


@pytest.mark.parametrize("bad", [-1, True, 1.5, "2"])
def test_drop_refuses_a_bad_piece_count(bedrock_server, bad):
    with pytest.raises(InvalidArgumentError, match="after_pieces"):
        bedrock_server.drop("q", after_pieces=bad)
