"""Offline test bed: scripted fake servers for the real Ollama and Bedrock clients.

Everything here is stdlib-only (no boto3 / LangChain imports), runs on 127.0.0.1 with
ephemeral ports, and is deterministic.

* :class:`ScriptedBackend` + :class:`OllamaCompatibleServer`: the local model. Scripted
  answers with chosen per-token logprobs and top-logprobs, YES/NO probes, latency, failures,
  tool calls and hashing embeddings, served over Ollama's native API to ``ChatOllama``,
  ``OllamaEmbeddings`` and ``ollama.Client``.
* :class:`FakeBedrockServer`: the cloud model. Converse / ConverseStream for
  ``ChatBedrockConverse`` with scripted text, usage, tool use and AWS errors.
* :func:`hashing_embedding`: deterministic unit-norm vectors (surface overlap, no semantics).

Usage::

    from langchain_aws import ChatBedrockConverse
    from langchain_ollama import ChatOllama

    from confidence_router.testing import (
        FakeBedrockServer, OllamaCompatibleServer, ScriptedBackend,
    )

    backend = ScriptedBackend(models=["qwen2.5:7b"])
    backend.add_answer("capital of France", " Paris", logprobs=-0.02)
    backend.add_answer("capital of Australia", " Sydney", logprobs=-1.6)

    with OllamaCompatibleServer(backend) as ollama, FakeBedrockServer() as bedrock:
        bedrock.add_answer("capital of Australia", "Canberra.")
        local = ChatOllama(base_url=ollama.url, model="qwen2.5:7b",
                           logprobs=True, top_logprobs=3)
        cloud = ChatBedrockConverse(
            model="anthropic.claude-3-haiku-20240307-v1:0", region_name="us-east-1",
            endpoint_url=bedrock.url, aws_access_key_id="test", aws_secret_access_key="test",
            max_retries=0,   # botocore would otherwise retry scripted errors with backoff
        )
        local.invoke("What is the capital of Australia?").response_metadata["logprobs"]
        cloud.invoke("What is the capital of Australia?").content   # "Canberra."

In pytest, prefer the shared fixtures ``ollama_backend``, ``ollama_server`` and
``bedrock_server`` from ``tests/conftest.py`` (servers live for the session; rules and
request logs are reset for every test).
"""

from confidence_router.serving.ollama_server import OllamaCompatibleServer, RecordedRequest
from confidence_router.testing.bedrock_server import (
    BEDROCK_ERROR_STATUS,
    FakeBedrockServer,
    RecordedBedrockRequest,
    encode_event_frame,
)
from confidence_router.testing.embeddings import (
    cosine_similarity,
    hashing_embedding,
    hashing_embeddings,
)
from confidence_router.testing.scripted import (
    DEFAULT_LOGPROB,
    InFlightBackend,
    ScriptedBackend,
    ScriptedRule,
    last_user_text,
    split_words,
)

__all__ = [
    "BEDROCK_ERROR_STATUS",
    "DEFAULT_LOGPROB",
    "FakeBedrockServer",
    "InFlightBackend",
    "OllamaCompatibleServer",
    "RecordedBedrockRequest",
    "RecordedRequest",
    "ScriptedBackend",
    "ScriptedRule",
    "cosine_similarity",
    "encode_event_frame",
    "hashing_embedding",
    "hashing_embeddings",
    "last_user_text",
    "split_words",
]
