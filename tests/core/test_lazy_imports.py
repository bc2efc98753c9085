"""Importing the package (and its light modules) must not load the heavy stacks."""

import json
import subprocess
import sys

import pytest

HEAVY = ["boto3", "botocore", "langchain_aws", "llama_index", "chromadb", "llama_cpp"]


@pytest.mark.parametrize(
    "statement",
    [
        "import confidence_router",
        "from confidence_router import ConfidenceRoutedLLM, RouterSettings",
        "import confidence_router.knowledge, confidence_router.probe, confidence_router.gsa",
        "import confidence_router.testing",
        "import confidence_router.evaluation",
        "import confidence_router.cli",
    ],
)
def test_no_heavy_imports(statement):
    code = f"{statement}\nimport sys, json\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = {name.split(".")[0] for name in json.loads(out.stdout)}
    assert loaded.isdisjoint(HEAVY), sorted(loaded & set(HEAVY))


def test_public_names_resolve():
    import confidence_router

    for name in confidence_router.__all__:
        assert getattr(confidence_router, name) is not None
    with pytest.raises(AttributeError):
        confidence_router.NotAThing  # noqa: B018
