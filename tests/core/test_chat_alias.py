"""``ChatConfidenceRouter``: the LangChain-style (``Chat*``) name of ``ConfidenceRoutedLLM``."""

import json
import subprocess
import sys

import confidence_router
from confidence_router import ChatConfidenceRouter, ConfidenceRoutedLLM


def test_alias_is_the_same_class():
    assert ChatConfidenceRouter is ConfidenceRoutedLLM
    assert "ChatConfidenceRouter" in confidence_router.__all__


def test_alias_routes_on_the_test_bed(ollama_chat, bedrock_chat, ollama_backend, bedrock_server):
    ollama_backend.add_answer("France", "Paris", logprobs=-0.05)
    ollama_backend.add_answer("Kenya", "Jomo", logprobs=-3.0)
    bedrock_server.add_answer("Kenya", "Daniel arap Moi")
    router = ChatConfidenceRouter(local=ollama_chat(), cloud=bedrock_chat())
    assert isinstance(router, ConfidenceRoutedLLM)
    kept = router.invoke("Capital of France?")
    escalated = router.invoke("Second president of Kenya?")
    assert (kept.text, kept.response_metadata["routing"]["decision"]) == ("Paris", "local")
    assert escalated.text == "Daniel arap Moi"
    assert escalated.response_metadata["routing"]["decision"] == "cloud"
    assert len(bedrock_server.requests) == 1


def test_alias_import_stays_lazy():
    code = (
        "import confidence_router, sys, json\n"
        "print(json.dumps(sorted(m.split('.')[0] for m in sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = set(json.loads(out.stdout))
    assert "langchain_core" not in loaded and "opentelemetry" not in loaded


def test_observability_modules_load_no_framework():
    # stats (MultiSink) and telemetry (metadata helpers) are pure: no OpenTelemetry, no LangChain.
    code = (
        "import confidence_router.stats, confidence_router.telemetry, sys, json\n"
        "print(json.dumps(sorted(m.split('.')[0] for m in sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = set(json.loads(out.stdout))
    assert loaded.isdisjoint({"opentelemetry", "langchain_core", "pydantic"}), loaded
