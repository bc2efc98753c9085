"""The production modules are pure: importing them loads no framework, client or numpy."""

import json
import subprocess
import sys

MODULES = ["calibration", "costs", "stats", "budget", "retry"]
FORBIDDEN = {
    "langchain_core", "langchain_aws", "langchain_ollama", "boto3", "botocore", "httpx",
    "ollama", "numpy", "pydantic", "chromadb", "llama_index",
}  # fmt: skip


def test_no_heavy_imports():
    imports = "; ".join(f"import confidence_router.{m}" for m in MODULES)
    code = f"{imports}\nimport sys, json\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = {name.split(".")[0] for name in json.loads(out.stdout)}
    assert loaded.isdisjoint(FORBIDDEN), sorted(loaded & FORBIDDEN)


def test_budget_error_is_a_router_error():
    from confidence_router.errors import BudgetExceededError, ConfidenceRouterError

    error = BudgetExceededError("over", requested_usd=0.2, remaining_usd=0.1, routing={"a": 1})
    assert isinstance(error, ConfidenceRouterError)
    assert (error.requested_usd, error.remaining_usd, error.routing) == (0.2, 0.1, {"a": 1})
    assert error.max_usd is None and error.local_message is None
