"""Every example in examples/ runs against the test bed (so none of them rots)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

# What each example must print when run against the scripted test bed below.
EXPECTED = {
    "lcel_chain.py": ["-> Paris", "-> Daniel arap Moi"],
    "per_call_threshold.py": ["invoke threshold=0.5: local", "invoke threshold=0.99: cloud",
                              "bound 0.95: cloud"],
    "routing_decision.py": ["decision:  local (confident)", "decision:  cloud (low_confidence)",
                            "local answer was: 'Jomo Kenyatta'"],
    "rag_chain.py": ["Neris and Nemunas"],
    "llamaindex_query_engine.py": ["query: Neris and Nemunas", "stream: Neris and Nemunas",
                                   "[routing: local (confident)]"],
    "llamaindex_chat_engine.py": ["chat: Neris and Nemunas",
                                  "direct: Daniel arap Moi [routing: cloud (low_confidence)]"],
}

EXAMPLES = sorted((Path(__file__).parent.parent / "examples").glob("*.py"))


@pytest.fixture
def testbed_env(ollama_server, ollama_backend, bedrock_server, tmp_path):
    ollama_backend.add_answer("France", "Paris", logprobs=-0.05)
    ollama_backend.add_answer("Kenya", "Jomo Kenyatta", logprobs=-2.5)
    ollama_backend.add_answer("Kaunas", "Neris and Nemunas", logprobs=-0.1)
    bedrock_server.add_answer("Kenya", "Daniel arap Moi")
    env = {
        **os.environ,
        "OLLAMA_HOST": ollama_server.url,
        "CONFIDENCE_ROUTER_LOCAL_MODEL": "scripted-local",
        "CONFIDENCE_ROUTER_EMBED_MODEL": "scripted-embed",
        "CONFIDENCE_ROUTER_CLOUD_MODEL": "us.anthropic.claude-sonnet-4-5-20250929-v1:0",
        "CONFIDENCE_ROUTER_BEDROCK_ENDPOINT": bedrock_server.url,
        "AWS_REGION": "us-east-1",
        "HOME": str(tmp_path),
        "CONFIDENCE_ROUTER_KNOWLEDGE_PATH": str(tmp_path / "kb"),
    }
    return env


def test_every_example_has_expectations():
    assert {p.name for p in EXAMPLES} == set(EXPECTED)


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_example_runs(example, testbed_env, bedrock_server):
    result = subprocess.run(
        [sys.executable, str(example)], check=False, env=testbed_env, capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip(), "an example must print what it did"
    assert "Traceback" not in result.stderr
    for expected in EXPECTED.get(example.name, []):
        assert expected in result.stdout, (expected, result.stdout)
