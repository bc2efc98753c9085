"""The core install, in a fresh virtual environment, as a user gets it from ``pip install``.

Slow (a venv and a pip install, about a minute with pip's cache): marked ``slow``. It needs
pip to reach the package index; when pip reports it cannot, the test is *skipped with pip's
own message* (visible in the summary thanks to ``-ra``). Any other pip failure fails the test.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tarfile
import textwrap
import venv
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
MAX_CORE_PACKAGES = 50
# What pip prints when the index cannot be reached (then the test cannot say anything).
_NETWORK_ERRORS = re.compile(
    r"Failed to establish a new connection|Temporary failure in name resolution|"
    r"Network is unreachable|Connection refused|ConnectTimeoutError|ReadTimeoutError|"
    r"No matching distribution found|Could not find a version that satisfies",
)


def _declared_version() -> str:
    match = re.search(r'^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.MULTILINE)
    assert match is not None
    return match.group(1)


def _run_pip(args: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(args, check=False, capture_output=True, text=True,  # type: ignore[call-overload]
                            timeout=900, **kwargs)
    if result.returncode != 0:
        output = result.stdout + result.stderr
        if _NETWORK_ERRORS.search(output):
            pytest.skip(f"pip cannot reach the package index: {output.strip()[-400:]}")
        pytest.fail(f"pip failed ({result.returncode}):\n{output[-3000:]}")
    return result


@pytest.fixture(scope="module")
def core_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with ``pip install <this checkout>`` (no extras); returns its python."""
    env_dir = tmp_path_factory.mktemp("core") / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    python = env_dir / "bin" / "python"
    _run_pip([str(python), "-m", "pip", "install", "--disable-pip-version-check", str(ROOT)])
    return python


def _in_venv(python: Path, code: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update({
        "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_EC2_METADATA_DISABLED": "true", "NO_PROXY": "127.0.0.1,localhost",
    })
    # Run from a neutral directory so the checkout's src/ cannot shadow the installed package.
    return subprocess.run([str(python), "-c", textwrap.dedent(code)], check=False,
                          capture_output=True,
                          text=True, timeout=300, env=env, cwd=python.parent)


def test_core_install_is_slim(core_venv: Path) -> None:
    listed = subprocess.run(
        [str(core_venv), "-m", "pip", "list", "--format=json", "--disable-pip-version-check"],
        capture_output=True, text=True, check=True,
    )
    names = {p["name"].lower() for p in json.loads(listed.stdout)} - {"pip", "setuptools"}
    assert "confidence-router" in names
    assert len(names) <= MAX_CORE_PACKAGES, sorted(names)
    for heavy in ("chromadb", "llama-index-core", "llama-cpp-python", "onnxruntime",
                  "kubernetes", "scikit-learn", "matplotlib"):
        assert heavy not in names


def test_core_routes_a_langchain_query_on_the_test_bed(core_venv: Path) -> None:
    result = _in_venv(core_venv, """
        import json
        import confidence_router
        from langchain_aws import ChatBedrockConverse
        from langchain_ollama import ChatOllama
        from confidence_router import ConfidenceRoutedLLM
        from confidence_router.testing import (
            FakeBedrockServer, OllamaCompatibleServer, ScriptedBackend)

        backend = ScriptedBackend(models=["local"])
        backend.add_answer("France", "Paris", logprobs=-0.05)
        backend.add_answer("Kenya", "Jomo Kenyatta", logprobs=-2.5)
        with OllamaCompatibleServer(backend) as ollama, FakeBedrockServer() as bedrock:
            bedrock.add_answer("Kenya", "Daniel arap Moi")
            router = ConfidenceRoutedLLM(
                local=ChatOllama(model="local", base_url=ollama.url),
                cloud=ChatBedrockConverse(
                    model="anthropic.claude-3-haiku-20240307-v1:0", region_name="us-east-1",
                    endpoint_url=bedrock.url, aws_access_key_id="test",
                    aws_secret_access_key="test", max_retries=0),
                threshold=0.7)
            easy = router.invoke("Capital of France?")
            hard = router.invoke("Second president of Kenya?")
            print(json.dumps({
                "version": confidence_router.__version__,
                "easy": [easy.text, easy.response_metadata["routing"]["decision"]],
                "hard": [hard.text, hard.response_metadata["routing"]["decision"]],
                "cloud_requests": len(bedrock.requests),
            }))
    """)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    declared = _declared_version()
    assert report == {
        "version": declared,
        "easy": ["Paris", "local"],
        "hard": ["Daniel arap Moi", "cloud"],
        "cloud_requests": 1,
    }


def test_features_without_their_extra_raise_one_clear_error(core_venv: Path) -> None:
    result = _in_venv(core_venv, """
        import json
        from confidence_router import ConfidenceRouterError
        from confidence_router.testing import hashing_embeddings

        def attempt(action):
            try:
                action()
            except ImportError as error:
                return {"type": type(error).__name__, "extra": getattr(error, "extra", None),
                        "router_error": isinstance(error, ConfidenceRouterError),
                        "message": str(error)}
            return None

        def knowledge_store():
            from langchain_core.embeddings import DeterministicFakeEmbedding
            from confidence_router import KnowledgeStore
            KnowledgeStore(DeterministicFakeEmbedding(size=8), path="kb")

        def llamaindex_llm():
            from confidence_router import ConfidenceRoutedLlamaIndexLLM  # noqa: F401

        def llamaindex_module():
            import confidence_router.llamaindex  # noqa: F401

        def embedded_model():
            from confidence_router.embedded import start_embedded_server
            start_embedded_server()

        print(json.dumps({name: attempt(action) for name, action in [
            ("gsa", knowledge_store), ("llamaindex", llamaindex_llm),
            ("llamaindex_module", llamaindex_module), ("embedded", embedded_model)]}))
    """)
    assert result.returncode == 0, result.stderr[-3000:]
    errors = json.loads(result.stdout.strip().splitlines()[-1])
    for name, extra in [("gsa", "gsa"), ("llamaindex", "llamaindex"),
                        ("llamaindex_module", "llamaindex"), ("embedded", "embedded")]:
        error = errors[name]
        assert error is not None, f"{name}: no error raised"
        assert (error["type"], error["extra"], error["router_error"]) == (
            "MissingExtraError", extra, True), error
        assert f'pip install "confidence-router[{extra}]"' in error["message"]


def test_core_cli_runs_and_names_missing_extras(core_venv: Path) -> None:
    cli = core_venv.parent / "confidence-router"
    version = subprocess.run([str(cli), "--version"], check=False, capture_output=True,
                             text=True,
                             timeout=60)
    declared = _declared_version()
    assert (version.returncode, version.stdout.strip()) == (0, f"confidence-router {declared}")
    evaluation = subprocess.run([str(cli), "eval", "--dataset", "triviaqa"],
                                check=False, capture_output=True, text=True, timeout=60)
    assert evaluation.returncode == 2
    assert evaluation.stdout == ""
    (line,) = evaluation.stderr.strip().splitlines()  # one line, no traceback
    assert "needs the 'eval' extra" in line and 'confidence-router[eval]' in line


def test_wheel_and_sdist_contents(tmp_path: Path) -> None:
    pytest.importorskip("build", reason="the 'build' package is in the dev extra")
    _run_pip([sys.executable, "-m", "build", "--outdir", str(tmp_path), str(ROOT)])
    (wheel,) = tmp_path.glob("*.whl")
    (sdist,) = tmp_path.glob("*.tar.gz")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        metadata_name = next(n for n in names if n.endswith(".dist-info/METADATA"))
        metadata = archive.read(metadata_name).decode()
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert "confidence_router/py.typed" in names
    assert not [n for n in names if n.startswith(("tests/", "benchmarks/", "examples/"))]
    assert not [n for n in names if re.search(r"(^|/)(test_[^/]*|conftest)\.py$", n)]
    assert "License-Expression: MIT" in metadata
    assert "# confidence-router" in metadata      # the README is the long description ...
    assert "# Changelog" in metadata              # ... followed by the changelog
    assert "Classifier: Typing :: Typed" in metadata
    assert re.search(r"Requires-Dist: chromadb.*extra == \"gsa\"", metadata)
    with tarfile.open(sdist) as archive:
        members = [m.split("/", 1)[1] for m in archive.getnames() if "/" in m]
    for required in ("LICENSE", "README.md", "CHANGELOG.md", "pyproject.toml",
                     "src/confidence_router/__init__.py", "examples/lcel_chain.py"):
        assert required in members
    assert not [m for m in members if m.startswith(("tests/", "benchmarks/", "docs/results/"))]
    assert not [m for m in members if re.search(r"(^|/)(test_[^/]*|conftest)\.py$", m)]
