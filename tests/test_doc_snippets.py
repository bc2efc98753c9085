"""Every code block a newcomer copies from README.md and docs/*.md works as documented.

Python blocks (```python) are extracted from the markdown, each with an id ``FILE:L<fence
line>``, and run on the test bed (the scripted Ollama-compatible server and the fake Bedrock
server of ``confidence_router.testing``, through the fixtures of tests/conftest.py). Each block
has a *scenario* below, found by an anchor (a line of the block that identifies it, so that
editing the README above a block does not lose it): the answers it scripts for the questions
the block asks, the earlier blocks it continues, a prelude defining what the block leaves to
the reader (``local``, ``cloud``, ``docs``, ...), and the assertions on the block's documented
outcome (its ``# ->`` comments, printed values, escalation claims counted on the fake servers).
A block that cannot run at all is listed in ``NOT_RUNNABLE`` with the reason; every block is
either run or listed (``test_every_python_block_is_run_or_listed``).

How the blocks reach the test bed (the only changes; each substitution must match the text):

* Environment, not text, wherever the documented code takes the default endpoint:
  ``OLLAMA_HOST`` = the scripted Ollama server (``ChatOllama``/``OllamaEmbeddings`` without
  ``base_url`` read it) and ``AWS_ENDPOINT_URL_BEDROCK_RUNTIME`` = the fake Bedrock (boto3's
  standard per-service endpoint variable; the credentials and region are tests/conftest.py's
  dummies). ``HOME`` is a temporary directory (the knowledge store's default path) and the
  working directory is the test's tmp_path (files such as ``calibration.json``).
* Text substitutions only for fixed ports of servers the doc tells you to start:
  ``http://127.0.0.1:8080`` -> the proxy served on a free port, ``port=8000`` -> a
  ``chroma run`` server on a free port.
* Expression statements are recorded (``ctx.value(line)``) so that a bare expression with a
  documented value (``routing["decision"], ...   # ('cloud', 'low_confidence', 0.41)``) can be
  compared with its comment; top-level ``await`` runs in an event loop.

Shell blocks (```bash / ```sh): every ``confidence-router ...`` command parses with the CLI's
own parser (options and values, nothing run) and every ``python examples/X.py`` /
``python benchmarks/X.py`` exists; inline ``confidence-router ...`` commands in the prose name a
real sub-command and real options.
"""

from __future__ import annotations

import ast
import asyncio
import contextlib
import inspect
import io
import json
import math
import re
import shlex
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
SONNET = "us.anthropic.claude-sonnet-4-5-20250929-v1:0"


# ---- extracting the blocks -----------------------------------------------------------------


@dataclass(frozen=True)
class Block:
    """One fenced code block: ``line`` is the 1-based line of its opening fence."""

    file: str
    line: int
    lang: str
    code: str

    @property
    def id(self) -> str:
        return f"{self.file}:L{self.line}"

    def comment(self, line: int) -> str:
        """The ``# ...`` comment on file line ``line`` of this block ('' if none)."""
        text = self.code.splitlines()[line - self.line - 1]
        return text.partition("#")[2].strip()


_FENCE = re.compile(r"^(?P<indent> {0,3})(?P<fence>`{3,}|~{3,})\s*(?P<info>[^`]*)$")


def extract_blocks(path: Path) -> list[Block]:
    """The fenced code blocks of a markdown file (CommonMark fences, unclosed runs to the end)."""
    blocks: list[Block] = []
    lines = path.read_text(encoding="utf-8").splitlines()
    rel = str(path.relative_to(ROOT))
    i = 0
    while i < len(lines):
        opening = _FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        fence = opening["fence"]
        lang = opening["info"].split()[0].lower() if opening["info"].strip() else ""
        body: list[str] = []
        j = i + 1
        while j < len(lines):
            closing = _FENCE.match(lines[j])
            if (closing and closing["fence"][0] == fence[0] and len(closing["fence"]) >= len(fence)
                    and not closing["info"].strip()):
                break
            body.append(lines[j])
            j += 1
        blocks.append(Block(rel, i + 1, lang, "\n".join(body) + "\n"))
        i = j + 1
    return blocks


ALL_BLOCKS = [block for path in DOC_FILES for block in extract_blocks(path)]
PY_BLOCKS = [b for b in ALL_BLOCKS if b.lang in ("python", "py", "python3", "pycon")]
SHELL_BLOCKS = [b for b in ALL_BLOCKS if b.lang in ("bash", "sh", "shell", "console", "zsh")]


def test_extraction_sees_the_blocks():
    # The parser must find the blocks this file knows about (a broken parser finds none).
    assert len(PY_BLOCKS) >= 10
    assert any(b.file == "README.md" and "ConfidenceRoutedLLM(" in b.code for b in PY_BLOCKS)
    assert any(b.file.startswith("docs/") for b in PY_BLOCKS)
    assert all(b.code.strip() for b in PY_BLOCKS)
    assert SHELL_BLOCKS


# ---- running a block -----------------------------------------------------------------------


class _RecordExpressions(ast.NodeTransformer):
    """``expr`` statements become ``__doc_value__(line, expr)`` (value kept, then discarded)."""

    def visit_Expr(self, node: ast.Expr) -> ast.AST:
        self.generic_visit(node)
        call = ast.Call(
            func=ast.Name("__doc_value__", ast.Load()),
            args=[ast.Constant(node.lineno), node.value],
            keywords=[],
        )
        return ast.copy_location(ast.Expr(call), node)

    # Function and class bodies keep their docstrings (the agent's tool needs its own).
    def _keep_docstring(self, node: Any) -> Any:
        doc = node.body[0] if node.body and isinstance(node.body[0], ast.Expr) and isinstance(
            node.body[0].value, ast.Constant) and isinstance(node.body[0].value.value, str) else None
        self.generic_visit(node)
        if doc is not None:
            node.body[0] = doc
        return node

    visit_FunctionDef = visit_AsyncFunctionDef = visit_ClassDef = _keep_docstring


@dataclass
class Ctx:
    """What a scenario works with: the test bed, the namespace the blocks share, the values of
    their expression statements (by file line) and what they printed."""

    ollama: Any  # the ScriptedBackend
    ollama_server: Any
    bedrock: Any
    tmp_path: Path
    ns: dict[str, Any] = field(default_factory=dict)
    values: dict[tuple[str, int], list[Any]] = field(default_factory=dict)
    stdout: io.StringIO = field(default_factory=io.StringIO)

    def value(self, block: Block, line: int) -> Any:
        """The (last) value of the expression statement on file line ``line`` of ``block``."""
        found = self.values.get((block.file, line))
        assert found, f"{block.file}:L{line} was not evaluated (is the scenario's line right?)"
        return found[-1]

    def printed(self) -> list[str]:
        return self.stdout.getvalue().splitlines()

    def run(self, block: Block, substitutions: tuple[tuple[str, str], ...] = ()) -> None:
        """Run ``block`` in the shared namespace (after ``substitutions``, each must match)."""
        code = block.code
        for old, new in substitutions:
            assert old in code, f"{block.id}: substitution target {old!r} is not in the block"
            assert "\n" not in old + new  # line numbers stay the doc's
            code = code.replace(old, new)
        tree = ast.parse(code, filename=block.file)
        ast.increment_lineno(tree, block.line)  # line 1 of the body is fence line + 1
        tree = ast.fix_missing_locations(_RecordExpressions().visit(tree))
        compiled = compile(tree, block.file, "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)

        def record(line: int, value: Any) -> Any:
            self.values.setdefault((block.file, line), []).append(value)
            return value

        self.ns["__doc_value__"] = record
        self.ns.setdefault("__name__", "__doc_snippet__")
        with contextlib.redirect_stdout(self.stdout):
            if compiled.co_flags & inspect.CO_COROUTINE:
                asyncio.run(eval(compiled, self.ns))  # the documented snippet
            else:
                exec(compiled, self.ns)  # noqa: S102 - the documented snippet

    def prelude(self, code: str) -> None:
        """Define what the doc leaves to the reader (explicit, shown in the scenario)."""
        exec(compile(code, "<prelude>", "exec"), self.ns)  # noqa: S102


def find_block(file: str, anchor: str) -> Block:
    matches = [b for b in PY_BLOCKS if b.file == file and anchor in b.code]
    assert len(matches) == 1, f"{len(matches)} python blocks of {file} contain {anchor!r}"
    return matches[0]


def line_of(block: Block, text: str) -> int:
    """The file line of the (single) line of ``block`` containing ``text``."""
    hits = [block.line + 1 + i for i, line in enumerate(block.code.splitlines()) if text in line]
    assert len(hits) == 1, f"{block.id}: {len(hits)} lines contain {text!r}"
    return hits[0]


def lp_for(confidence: float) -> float:
    """The per-token logprob whose score is ``confidence`` (``sigmoid(2*lp + 3)``; with equal
    tokens mean_min, mean_logprob and min_logprob all give it)."""
    return (math.log(confidence / (1 - confidence)) - 3) / 2


def bedrock_ops(ctx: Ctx) -> list[str]:
    return [r["operation"] for r in ctx.bedrock.requests]


#: What the tiers are in blocks that leave ``local`` / ``cloud`` to the reader: the README's
#: own LCEL models, on the test bed through OLLAMA_HOST / AWS_ENDPOINT_URL_BEDROCK_RUNTIME.
#: ``max_tokens``: a ``CloudBudget`` requires it (README "Budgets").
PRELUDE_TIERS = f"""
from langchain_aws import ChatBedrockConverse
from langchain_ollama import ChatOllama
from confidence_router import ConfidenceRoutedLLM
local = ChatOllama(model="qwen2.5:7b", temperature=0)
cloud = ChatBedrockConverse(model="{SONNET}", max_tokens=512)
"""


# ---- scenarios: one per python block -------------------------------------------------------

LCEL = ("README.md", 'chain = ChatPromptTemplate.from_template("Answer briefly: {question}")')
DECISION = ("README.md", 'msg = router.invoke("Who was the second president of Kenya?")')
STRUCTURED = ("README.md", 'structured = router.with_structured_output(Capital, method="json_schema"')
LLAMAINDEX = ("README.md", "llm = ConfidenceRoutedLlamaIndexLLM(router=router)")
AGENT = ("README.md", "agent = FunctionAgent(tools=[get_weather], llm=llm)")
GSA = ("README.md", "precheck=SelfAssessmentProbe(model=local, store=store)")
PRODUCTION = ("README.md", "calibrator=RollingQuantileThreshold(target_rate=0.3)")
OPENAI = ("README.md", "client = OpenAI(")
CHROMA = ("README.md", "client=chromadb.HttpClient(")
OTEL = ("README.md", "stats=MultiSink(stats, OpenTelemetrySink())")
TESTBED = ("README.md", "with OllamaCompatibleServer(backend) as ollama, FakeBedrockServer() as bedrock:")
SIGNALS = ("docs/signals.md", "tokens = message_token_logprobs(message)")
CALIBRATION = ("docs/signals.md", 'calibration = ConfidenceCalibration.load("calibration.json")')

#: Python blocks that cannot run on the test bed at all, with the reason (anchor -> reason).
#: Keep it short: a block listed here is not checked.
NOT_RUNNABLE: dict[tuple[str, str], str] = {}

#: Blocks whose documented outcome is wrong (anchor -> reason): their test is a strict xfail
#: until the doc (README.md, lead-owned) or the library is fixed.
KNOWN_WRONG: dict[tuple[str, str], str] = {}


def run_lcel(ctx: Ctx) -> Block:
    block = find_block(*LCEL)
    ctx.ollama.add_answer("capital of Australia", "Canberra", logprobs=-0.05)
    ctx.run(block)
    return block


def scenario_lcel(ctx: Ctx) -> None:
    run_lcel(ctx)
    assert ctx.printed() == ["Canberra"]
    assert ctx.bedrock.requests == []  # confident: answered locally, nothing sent to the cloud
    (request,) = ctx.ollama.requests
    assert request.model == "qwen2.5:7b"
    assert "Answer briefly: What is the capital of Australia?" in request.messages[-1]["content"]
    assert request.logprobs  # "The router switches logprobs=True on for you"


def scenario_decision(ctx: Ctx) -> None:
    run_lcel(ctx)
    block = find_block(*DECISION)
    line = line_of(block, 'routing["decision"], routing["reason"], routing["confidence"]')
    documented = ast.literal_eval(block.comment(line))  # ('cloud', 'low_confidence', 0.41)
    # 0.41 is the doc's example value: the local answer is scripted to score it, and the
    # rest of the tuple must follow from it (below the 0.7 threshold: cloud, low_confidence).
    ctx.ollama.add_answer("president of Kenya", "Jomo Kenyatta", logprobs=lp_for(documented[2]))
    ctx.bedrock.add_answer("president of Kenya", "Daniel arap Moi")
    ctx.run(block)
    decision, reason, confidence = ctx.value(block, line)
    assert (decision, reason, round(confidence, 2)) == documented
    assert bedrock_ops(ctx) == ["converse"]  # escalated: exactly one cloud request
    assert ctx.ns["msg"].content == "Daniel arap Moi"
    local_answer, latency, usage = ctx.value(block, line + 1)  # "kept for escalations"
    assert local_answer == "Jomo Kenyatta"
    assert {"local", "cloud", "total"} <= set(latency)
    assert set(usage) == {"local", "cloud"}


def scenario_structured(ctx: Ctx) -> None:
    run_lcel(ctx)
    block = find_block(*STRUCTURED)
    ctx.ollama.add_answer("Capital of Kenya", '{"country": "Kenya", "capital": "Nairobi"}',
                          logprobs=-0.05)
    ctx.run(block)
    parsed, decision = ctx.value(block, line_of(block, 'out["parsed"], out["raw"]'))
    assert type(parsed).__name__ == "Capital"
    assert (parsed.country, parsed.capital) == ("Kenya", "Nairobi")
    assert decision == "local"
    assert ctx.bedrock.requests == []
    # README's table: json_schema -> ChatOllama's format=<JSON schema>.
    schema = ctx.ollama.requests[-1].format
    assert isinstance(schema, dict) and set(schema["properties"]) == {"country", "capital"}


@contextlib.contextmanager
def llamaindex_settings() -> Iterator[None]:
    """LlamaIndex's global Settings, restored after the block set them."""
    from llama_index.core import Settings

    saved = dict(vars(Settings))
    try:
        yield
    finally:
        vars(Settings).clear()
        vars(Settings).update(saved)


#: What the LlamaIndex block leaves to the reader: ``docs`` and ``Settings.embed_model`` (its
#: comment: "needs Settings.embed_model"), the latter as README suggests two paragraphs below.
PRELUDE_LLAMAINDEX = """
from langchain_ollama import OllamaEmbeddings
from llama_index.core import Document, Settings
from confidence_router.llamaindex import LangChainEmbeddingAdapter
docs = [Document(text="The Q3 report: revenue grew 12 percent in the third quarter.")]
Settings.embed_model = LangChainEmbeddingAdapter(
    embeddings=OllamaEmbeddings(model="nomic-embed-text"))
"""


def run_llamaindex(ctx: Ctx) -> Block:
    run_lcel(ctx)
    block = find_block(*LLAMAINDEX)
    # Between the default threshold (0.7) and the call's 0.8: only the call's kwarg escalates.
    ctx.ollama.add_answer("Capital of Kenya", "Nairobi", logprobs=lp_for(0.75))
    ctx.bedrock.add_answer("Capital of Kenya", "Nairobi.")
    ctx.ollama.add_answer("about Q3", "Revenue grew 12 percent.", logprobs=-0.05)
    ctx.prelude(PRELUDE_LLAMAINDEX)
    ctx.run(block)
    return block


def scenario_llamaindex(ctx: Ctx) -> None:
    with llamaindex_settings():
        block = run_llamaindex(ctx)
    decision = ctx.value(block, line_of(block, 'reply.additional_kwargs["routing"]["decision"]'))
    assert decision == "cloud"  # threshold=0.8 per call: 0.75 escalates
    reply = ctx.ns["reply"]
    assert reply.raw["routing"] == reply.additional_kwargs["routing"]
    assert reply.additional_kwargs["routing"]["threshold"] == 0.8
    assert bedrock_ops(ctx) == ["converse"]
    assert ctx.printed()[-1] == "Revenue grew 12 percent."
    # The query engine retrieved the document (embedded on the scripted Ollama) for the prompt.
    assert any(model == "nomic-embed-text" for model, _ in ctx.ollama.embed_requests)
    q3 = [r for r in ctx.ollama.requests if "about Q3" in json.dumps(r.messages)]
    assert q3 and "revenue grew 12 percent" in json.dumps(q3[-1].messages)


def scenario_llamaindex_from_settings(ctx: Ctx, monkeypatch: pytest.MonkeyPatch) -> None:
    """The block's alternative, ``# or .from_settings()``, with the settings README lists."""
    monkeypatch.setenv("CONFIDENCE_ROUTER_CLOUD_MODEL", SONNET)
    block = find_block(*LLAMAINDEX)
    ctx.ns["router"] = None  # from_settings() must not need the LCEL block's router
    ctx.ollama.add_answer("Capital of Kenya", "Nairobi", logprobs=lp_for(0.75))
    ctx.bedrock.add_answer("Capital of Kenya", "Nairobi.")
    ctx.ollama.add_answer("about Q3", "Revenue grew 12 percent.", logprobs=-0.05)
    ctx.prelude(PRELUDE_LLAMAINDEX)
    with llamaindex_settings():
        ctx.run(block, (("ConfidenceRoutedLlamaIndexLLM(router=router)",
                         "ConfidenceRoutedLlamaIndexLLM.from_settings()"),))
    decision = ctx.value(block, line_of(block, 'reply.additional_kwargs["routing"]["decision"]'))
    assert decision == "cloud"
    assert bedrock_ops(ctx) == ["converse"]
    assert ctx.printed()[-1] == "Revenue grew 12 percent."
    assert {r.model for r in ctx.ollama.requests} == {"qwen2.5:7b"}  # the documented default


def scenario_agent(ctx: Ctx) -> None:
    def has_tool_result(request: Any) -> bool:
        return any(m.get("role") == "tool" for m in request.messages)

    def bedrock_has_tool_result(record: Any) -> bool:
        return any("toolResult" in b for m in record["body"]["messages"] for b in m["content"])

    # Step 1: the local model only calls the tool (no text: unknown confidence, README says it
    # escalates); the cloud calls it. Step 2: after the tool result the local answer is sure.
    ctx.ollama.add_answer(has_tool_result, "It is sunny in Paris.", logprobs=-0.05)
    ctx.ollama.add_answer("weather in Paris", "", tool_calls=[
        {"name": "get_weather", "arguments": {"city": "Paris"}}])
    ctx.bedrock.add_answer(bedrock_has_tool_result, "Cloud: sunny in Paris.")
    ctx.bedrock.add_answer("weather in Paris", "", tool_use=[
        {"name": "get_weather", "input": {"city": "Paris"}, "toolUseId": "tooluse_paris"}])
    with llamaindex_settings():
        run_llamaindex(ctx)
        n_before = len(ctx.bedrock.requests)
        n_printed = len(ctx.printed())
        block = find_block(*AGENT)
        ctx.run(block)
    assert ctx.printed()[n_printed:] == ["cloud", "local"]  # per LLM step
    assert len(ctx.bedrock.requests) - n_before == 1  # only the tool-call step escalated
    assert "sunny in Paris" in str(ctx.ns["result"])
    assert "Sunny in Paris" in json.dumps(ctx.ollama.requests[-1].messages)  # the tool ran


def scenario_gsa(ctx: Ctx) -> None:
    block = find_block(*GSA)
    ctx.prelude(PRELUDE_TIERS)
    ctx.run(block)
    # "~/.cache/confidence-router/knowledge": the default path, under HOME.
    assert (ctx.tmp_path / "home" / ".cache" / "confidence-router" / "knowledge").is_dir()
    # A NO probe (P(YES) < 0.5) goes straight to the cloud, and the answer becomes knowledge.
    ctx.ollama.add_probe("Are you confident", {"NO": -0.05, "YES": -3.0})
    ctx.bedrock.add_answer("president of Kenya", "Daniel arap Moi")
    reply = ctx.ns["router"].invoke("Who was the second president of Kenya?")
    routing = reply.response_metadata["routing"]
    assert (routing["decision"], routing["reason"]) == ("cloud", "precheck")
    assert bedrock_ops(ctx) == ["converse"]
    # One-token probe, no local generation.
    assert len(ctx.ollama.requests) == 1
    assert "Are you confident" in ctx.ollama.requests[0].messages[-1]["content"]
    assert ctx.ollama.requests[0].options.get("num_predict") == 1
    assert ctx.ns["store"].count() == 1  # learn_from_escalations


def scenario_production(ctx: Ctx) -> None:
    block = find_block(*PRODUCTION)
    ctx.prelude(PRELUDE_TIERS)
    ctx.ollama.add_answer("capital of France", "Paris", logprobs=-0.05)
    ctx.ollama.add_answer("president of Kenya", "Jomo Kenyatta", logprobs=-2.5)
    ctx.run(block)
    snapshot = ctx.value(block, line_of(block, "stats.snapshot()"))
    # The keys its comment names.
    assert {"calls", "escalation_rate", "drift", "cost_usd", "savings_usd"} <= set(snapshot)
    assert {"p50", "p95"} <= set(snapshot["latency_s"]["all"])
    router = ctx.ns["router"]
    router.invoke("What is the capital of France?")
    assert ctx.ns["stats"].snapshot()["latency_s"]["all"]["p50"] is not None
    # "personal data never leaves": a low-confidence answer with an email stays local.
    reply = router.invoke("Email jane.doe@example.com: who was the second president of Kenya?")
    routing = reply.response_metadata["routing"]
    assert routing["decision"] == "local" and routing["flagged"]
    assert routing["escalation_skipped"].startswith("escalation guard")
    assert ctx.bedrock.requests == []
    assert ctx.ns["stats"].snapshot()["calls"] == 2
    # cloud_retry=RetryPolicy(max_attempts=3): "throttling/5xx/timeouts only".
    for error_type, status, retried in (("ThrottlingException", None, True),
                                        ("ServiceUnavailableException", None, True),
                                        ("ModelTimeoutException", 408, True),
                                        ("ValidationException", None, False)):
        ctx.bedrock.reset()
        ctx.bedrock.fail("president of Kenya", error_type, status=status, times=1)
        ctx.bedrock.add_answer("president of Kenya", "Daniel arap Moi")
        try:
            reply = router.invoke("Who was the second president of Kenya?")
        except Exception as error:  # noqa: BLE001 - a non-retried error surfaces
            assert not retried, (error_type, error)
            assert type(error).__name__ == "CloudEscalationError"
        else:
            assert retried and reply.content == "Daniel arap Moi", error_type
            assert reply.response_metadata["routing"]["cloud_attempts"] == 2
        assert len(ctx.bedrock.requests) == (2 if retried else 1), error_type
    # calibrator=RollingQuantileThreshold(target_rate=0.3): "label-free: ~30% go to the cloud"
    # (after its warm-up of min_samples known scores, 0.7 until then).
    ctx.bedrock.reset()
    confidences = [0.05 + 0.9 * ((i * 37) % 150) / 150 for i in range(150)]
    for i, confidence in enumerate(confidences):
        ctx.ollama.add_answer(f"question number {i} ", "an answer", logprobs=lp_for(confidence))
    decisions = [router.invoke(f"Tell me about question number {i} please").response_metadata[
        "routing"]["decision"] for i in range(150)]
    calibrated = decisions[60:]
    assert 0.2 <= calibrated.count("cloud") / len(calibrated) <= 0.35, calibrated.count("cloud")
    assert len(ctx.bedrock.requests) == decisions.count("cloud")


class RunningProxy:
    """The proxy app served by uvicorn on a background thread (port 0: a free one)."""

    def __init__(self, app: Any) -> None:
        import uvicorn

        config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning",
                                lifespan="off")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the proxy did not start")
            time.sleep(0.01)
        self.url = f"http://127.0.0.1:{self.server.servers[0].sockets[0].getsockname()[1]}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def run_curl_block(proxy_url: str) -> dict[str, Any]:
    """Run README's ``curl .../v1/chat/completions`` block against ``proxy_url``; its JSON."""
    import shutil
    import subprocess

    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    (block,) = [b for b in SHELL_BLOCKS if b.file == "README.md" and b.code.startswith("curl ")]
    (argv,) = _commands(block.code.replace("http://127.0.0.1:8080", proxy_url))
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=True)
    return json.loads(done.stdout)


def scenario_openai(ctx: Ctx) -> None:
    from confidence_router.proxy.app import build_router, create_app
    from confidence_router.proxy.config import ProxyConfig

    block = find_block(*OPENAI)
    # `confidence-router proxy` as README starts it: a router from settings (environment).
    config = ProxyConfig()
    router, shared = build_router(config, environ={
        "OLLAMA_HOST": ctx.ollama_server.url, "CONFIDENCE_ROUTER_LOCAL_MODEL": "qwen2.5:7b",
        "CONFIDENCE_ROUTER_CLOUD_MODEL": SONNET, "CONFIDENCE_ROUTER_CLOUD_MAX_TOKENS": "256",
        "CONFIDENCE_ROUTER_BEDROCK_ENDPOINT": ctx.bedrock.url, "AWS_REGION": "us-east-1",
    })
    proxy = RunningProxy(create_app(router, config=config, shared=shared))
    try:
        # Kept at the default 0.7, escalated at the request's threshold 0.8.
        ctx.ollama.add_answer("Capital of Australia", "Sydney", logprobs=lp_for(0.75))
        ctx.bedrock.add_answer("Capital of Australia", "Canberra")
        ctx.run(block, (("http://127.0.0.1:8080", proxy.url),))
        curl = run_curl_block(proxy.url)
    finally:
        proxy.stop()
    # The curl block above it: the same question at the default threshold stays local.
    assert curl["choices"][0]["message"]["content"] == "Sydney"
    assert (curl["routing"]["decision"], curl["routing"]["reason"]) == ("local", "confident")
    content, reason = ctx.value(block, line_of(block, "reply.choices[0].message.content"))
    assert (content, reason) == ("Canberra", "low_confidence")
    assert ctx.value(block, line_of(block, 'raw.headers["x-confidence-router-decision"]')) == (
        "cloud")
    assert bedrock_ops(ctx) == ["converse"]
    headers = ctx.ns["raw"].headers
    assert headers["x-confidence-router-reason"] == "low_confidence"  # "also -reason, ..."
    assert float(headers["x-confidence-router-confidence"]) == pytest.approx(0.75, abs=1e-4)
    assert headers["x-confidence-router-tier"] == SONNET


@pytest.fixture
def chroma_server() -> Iterator[Any]:
    from confidence_router.testing.processes import ChromaServerProcess, start_or_skip

    server = start_or_skip(ChromaServerProcess())
    yield server
    server.stop()


def scenario_chroma(ctx: Ctx, chroma: Any) -> None:
    import chromadb

    block = find_block(*CHROMA)
    ctx.prelude(PRELUDE_TIERS + """
from langchain_ollama import OllamaEmbeddings
embeddings = OllamaEmbeddings(model="nomic-embed-text")
""")
    ctx.ollama.add_answer("president of Kenya", "Jomo Kenyatta", logprobs=-2.5)
    ctx.bedrock.add_answer("president of Kenya", "Daniel arap Moi")
    ctx.run(block, (("port=8000", f"port={chroma.port}"),))
    reply = ctx.ns["router"].invoke("Who was the second president of Kenya?")
    assert reply.content == "Daniel arap Moi"
    assert bedrock_ops(ctx) == ["converse"]
    # "every worker learns from all": another client of the same server sees the entry.
    from confidence_router import KnowledgeStore

    other = KnowledgeStore(ctx.ns["embeddings"],
                           client=chromadb.HttpClient(host="127.0.0.1", port=chroma.port))
    assert other.count() == 1


def scenario_otel(ctx: Ctx) -> None:
    pytest.importorskip("opentelemetry", reason="needs the otel extra")
    block = find_block(*OTEL)
    ctx.prelude(PRELUDE_TIERS)
    ctx.ollama.add_answer("capital of France", "Paris", logprobs=-0.05)
    ctx.run(block)
    ctx.ns["router"].invoke("What is the capital of France?")
    assert ctx.ns["stats"].snapshot()["calls"] == 1  # MultiSink reached the RoutingStats


def scenario_testbed(ctx: Ctx, cloud_class: str) -> None:
    block = find_block(*TESTBED)
    substitutions: tuple[tuple[str, str], ...] = ()
    if cloud_class == "ChatBedrock":  # the commented alternative
        substitutions = (("cloud = ChatBedrockConverse(", "_unused = ChatBedrockConverse("),
                         ("# or: cloud = ChatBedrock(", "cloud = ChatBedrock("))
    ctx.run(block, substitutions)
    content_line = line_of(block, 'router.invoke("Who was the second president of Kenya?")')
    assert ctx.value(block, content_line) == ast.literal_eval(block.comment(content_line))
    op_line = line_of(block, 'bedrock.requests[-1]["operation"]')
    expected = "converse" if cloud_class == "ChatBedrockConverse" else "invoke"
    assert ctx.value(block, op_line) == expected
    assert f'"{expected}"' in block.comment(op_line)


def scenario_signals(ctx: Ctx) -> None:
    block = find_block(*SIGNALS)
    # `message`: a local answer with logprobs, two tokens at -0.1 and -0.4 (the comment's
    # own example floats).
    ctx.ollama.add_answer("capital of France", [" Par", "is"], logprobs=[-0.1, -0.4])
    ctx.prelude("""
from langchain_ollama import ChatOllama
message = ChatOllama(model="qwen2.5:7b", logprobs=True).invoke("What is the capital of France?")
""")
    ctx.run(block)
    from confidence_router import compute_signals, score_for

    tokens = ctx.ns["tokens"]
    assert [(t.token, t.logprob) for t in tokens] == [(" Par", -0.1), ("is", -0.4)]
    assert all(hasattr(t, "top_logprobs") for t in tokens)  # TokenLogprob(token, logprob, top)
    assert score_for(compute_signals([]), "sum_logprob") is None  # "or None when unknown"
    line = line_of(block, 'score_for(signals, "sum_logprob")')
    score = ctx.value(block, line)
    documented = block.comment(line).split("...")[0]  # "0.6065"
    assert f"{score:.{len(documented) - 2}f}" == documented
    assert score == pytest.approx(math.exp(-0.5))
    assert score_for(compute_signals([-0.1, -0.4]), "sum_logprob") == pytest.approx(score)
    as_dict = ctx.value(block, line_of(block, "signals.as_dict()"))
    assert json.loads(json.dumps(as_dict)) == as_dict  # JSON-serialisable


def scenario_calibration(ctx: Ctx) -> None:
    block = find_block(*CALIBRATION)
    # calibration.json (what `confidence-router calibrate --fit ... --out calibration.json`
    # writes) and the labelled rows the last line fits.
    ctx.prelude("""
from confidence_router import ConfidenceCalibration
scores = [i / 100 for i in range(100)]
labels = [int(i % 10 < i // 10) for i in range(100)]   # P(correct) grows with the score
ConfidenceCalibration.fit(scores, labels, signal="sum_logprob").save("calibration.json")
""")
    ctx.run(block)
    assert ctx.value(block, line_of(block, "calibration.signal")) == "sum_logprob"
    p = ctx.value(block, line_of(block, "calibration.p_correct(0.42)"))
    assert 0.0 <= p <= 1.0
    assert ctx.ns["calibration"].p_correct(None) is None  # "None stays None"
    threshold = ctx.ns["threshold"]
    assert 0.0 <= threshold <= 1.0
    assert ctx.ns["calibration"].p_correct(threshold) >= 0.8
    assert (ctx.tmp_path / "c.json").is_file()


SCENARIOS: dict[tuple[str, str], Callable[..., None]] = {
    LCEL: scenario_lcel,
    DECISION: scenario_decision,
    STRUCTURED: scenario_structured,
    LLAMAINDEX: scenario_llamaindex,
    AGENT: scenario_agent,
    GSA: scenario_gsa,
    PRODUCTION: scenario_production,
    OPENAI: scenario_openai,
    CHROMA: scenario_chroma,
    OTEL: scenario_otel,
    TESTBED: scenario_testbed,
    SIGNALS: scenario_signals,
    CALIBRATION: scenario_calibration,
}


def _anchor_of(block: Block) -> tuple[str, str] | None:
    keys = [k for k in (*SCENARIOS, *NOT_RUNNABLE) if k[0] == block.file and k[1] in block.code]
    return keys[0] if len(keys) == 1 else None


def test_every_python_block_is_run_or_listed():
    unclaimed = [b.id for b in PY_BLOCKS if _anchor_of(b) is None]
    assert not unclaimed, f"python blocks with no scenario and not in NOT_RUNNABLE: {unclaimed}"
    assert not set(SCENARIOS) & set(NOT_RUNNABLE)
    claimed = [_anchor_of(b) for b in PY_BLOCKS]
    stale = [k for k in (*SCENARIOS, *NOT_RUNNABLE) if claimed.count(k) != 1]
    assert not stale, f"anchors matching no block (or several): {stale}"
    assert set(KNOWN_WRONG) <= set(SCENARIOS)


@pytest.fixture
def doc_env(monkeypatch, tmp_path, ollama_server, bedrock_server):
    """The reader's machine, on the test bed (see the module docstring)."""
    monkeypatch.setenv("OLLAMA_HOST", ollama_server.url)
    monkeypatch.setenv("AWS_ENDPOINT_URL_BEDROCK_RUNTIME", bedrock_server.url)
    (tmp_path / "home").mkdir()
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for name in ("XDG_CACHE_HOME", "CONFIDENCE_ROUTER_KNOWLEDGE_PATH", "CONFIDENCE_ROUTER_CONFIG"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize(
    "block", [b for b in PY_BLOCKS if _anchor_of(b) in SCENARIOS or _anchor_of(b) is None],
    ids=lambda b: b.id)
def test_python_block(block, request, doc_env, ollama_backend, ollama_server, bedrock_server):
    anchor = _anchor_of(block)
    assert anchor is not None, f"{block.id}: no scenario (add one or list it in NOT_RUNNABLE)"
    if anchor in KNOWN_WRONG:
        request.applymarker(pytest.mark.xfail(strict=True, reason=KNOWN_WRONG[anchor]))
    ctx = Ctx(ollama_backend, ollama_server, bedrock_server, doc_env)
    scenario = SCENARIOS[anchor]
    if scenario is scenario_chroma:
        scenario(ctx, request.getfixturevalue("chroma_server"))
    elif scenario is scenario_llamaindex:
        scenario(ctx)
        ollama_backend.reset()
        bedrock_server.reset()
        scenario_llamaindex_from_settings(Ctx(ollama_backend, ollama_server, bedrock_server,
                                              doc_env), request.getfixturevalue("monkeypatch"))
    elif scenario is scenario_testbed:
        for cloud_class in ("ChatBedrockConverse", "ChatBedrock"):
            scenario(Ctx(ollama_backend, ollama_server, bedrock_server, doc_env), cloud_class)
    else:
        scenario(ctx)


def test_listed_blocks_still_compile():
    # Not run (see NOT_RUNNABLE), but at least valid Python.
    for block in PY_BLOCKS:
        if _anchor_of(block) in NOT_RUNNABLE:
            ast.parse(block.code, filename=block.id)


def test_readme_production_retry_comment_says_what_is_retried():
    from botocore.exceptions import ConnectionClosedError

    from confidence_router.retry import ErrorKind, RetryPolicy, classify_error

    block = find_block(*PRODUCTION)
    line = block.code.splitlines()[line_of(block, "cloud_retry=RetryPolicy(") - block.line - 1]
    policy = eval(line.split("=", 1)[1].split("#")[0].strip().rstrip(","),
                  {"RetryPolicy": RetryPolicy, "ErrorKind": ErrorKind})
    comment = block.comment(line_of(block, "cloud_retry=RetryPolicy("))
    named = {ErrorKind.THROTTLED: "throttling", ErrorKind.TRANSIENT: "5xx",
             ErrorKind.TIMEOUT: "timeout", ErrorKind.DISCONNECTED: "connection"}
    # A connection dropped after the request went out (botocore's ConnectionClosedError) is
    # its own kind, DISCONNECTED: not a timeout, not a 5xx.
    assert classify_error(ConnectionClosedError(endpoint_url="http://x")) is (
        ErrorKind.DISCONNECTED)
    retried = {kind for kind in ErrorKind if policy.should_retry(kind)}
    assert retried <= set(named), retried
    # Every kind the snippet's policy retries is named by its comment.
    assert all(named[kind] in comment for kind in retried), (comment, sorted(retried))


def test_install_md_missing_extra_message(monkeypatch):
    # docs/install.md shows the message of a feature whose extra is missing (chromadb here).
    import sys

    from langchain_core.embeddings import DeterministicFakeEmbedding

    from confidence_router import ConfidenceRouterError, KnowledgeStore, MissingExtraError

    (block,) = [b for b in ALL_BLOCKS if b.file == "docs/install.md" and "needs the" in b.code]
    monkeypatch.setitem(sys.modules, "chromadb", None)  # as if not installed
    with pytest.raises(MissingExtraError) as raised:
        KnowledgeStore(DeterministicFakeEmbedding(size=8))
    assert isinstance(raised.value, ImportError) and isinstance(raised.value,
                                                                ConfidenceRouterError)
    assert " ".join(str(raised.value).split()) == " ".join(block.code.split())


def _pyproject() -> dict[str, Any]:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _extras() -> dict[str, set[str]]:
    """pyproject's extras, each with the extras it pulls in (``all``: every one it names)."""
    extras = _pyproject()["project"]["optional-dependencies"]
    return {name: {x for dep in deps
                   for group in re.findall(r"^confidence-router\[([\w,-]+)\]", dep)
                   for x in group.split(",")}
            for name, deps in extras.items()}


def test_pip_install_commands_name_real_extras():
    text = "\n".join(p.read_text() for p in DOC_FILES)
    named = re.findall(r'pip install (?:-e )?"?(?:confidence-router|\.)\[([\w,-]+)\]', text)
    assert named
    unknown = {x for group in named for x in group.split(",")} - set(_extras())
    assert not unknown


@pytest.mark.parametrize("doc", [
    "README.md",
    "docs/install.md",
])
def test_install_table_lists_every_extra(doc):
    text = (ROOT / doc).read_text()
    header = re.search(r"^\| extra \|.*\n\|[-|]+\|\n((?:\|.*\n)+)", text, re.MULTILINE)
    assert header, f"{doc}: no extras table"
    rows = {}
    for row in header[1].splitlines():
        cells = [c.strip() for c in row.strip("|").split("|")]
        names = re.findall(r"`\[?([\w-]+)\]?`", cells[0])
        for name in names:
            rows[name] = cells
    extras = _extras()
    assert set(extras) - {"dev"} <= set(rows), sorted(set(extras) - set(rows))
    # "all of the above": the rows above it, aliases and dev aside, are what [all] installs.
    order = list(rows)
    above = {n for n in order[:order.index("all")] if not extras.get(n)}
    assert above == extras["all"]
    eval_needed_for = rows["eval"][2]
    assert "calibrate" not in eval_needed_for  # the core runs it


def test_calibrate_runs_without_the_eval_extra(monkeypatch, tmp_path, capsys):
    # README's calibrate command on an evaluation run, with the [eval] packages unimportable.
    import sqlite3
    import sys

    from confidence_router.cli import main
    from confidence_router.extraction import TokenLogprob, encode_tokens

    for module in ("sklearn", "matplotlib", "tqdm"):
        monkeypatch.setitem(sys.modules, module, None)
    db = tmp_path / "runs.sqlite"
    with contextlib.closing(sqlite3.connect(db)) as conn:
        conn.execute("CREATE TABLE results (item_id TEXT, position INTEGER, correct INTEGER, "
                     "confidence REAL, min_confidence REAL, error TEXT, extras TEXT NOT NULL "
                     "DEFAULT '{}', cloud_correct INTEGER, cloud_error TEXT, tokens BLOB)")
        conn.executemany(
            "INSERT INTO results (item_id, position, correct, tokens) VALUES (?, ?, ?, ?)",
            [(str(i), i, int(i % 3 == 0), encode_tokens([TokenLogprob("x", -i / 10, ())]))
             for i in range(20)])
        conn.commit()
    (argv,) = [cmd for _, cmd in CLI_COMMANDS if cmd[1] == "calibrate" and "--fit" not in cmd]
    assert main([arg.replace("runs.sqlite", str(db)) for arg in argv[1:]]) == 0
    assert "threshold" in capsys.readouterr().out


def _table(doc: str, header: str) -> list[list[str]]:
    """The body rows (cells, stripped) of the markdown table of ``doc`` whose header row
    starts with ``header``."""
    text = (ROOT / doc).read_text()
    found = re.search(rf"^{re.escape(header)}.*\n\|[-| :]+\|\n((?:\|.*\n)+)", text, re.MULTILINE)
    assert found, f"{doc}: no table starting {header!r}"
    return [[c.strip() for c in row.strip().strip("|").split("|")]
            for row in found[1].splitlines()]


def test_knob_table_defaults_are_the_routers():
    from confidence_router import ConfidenceRoutedLLM
    from confidence_router.policy import DEFAULT_POLICY, RoutingPolicy

    rows = _table("README.md", "| knob | default |")
    documented = {row[0].strip("`"): ast.literal_eval(row[1].strip("`")) for row in rows}
    # knob_names, not vars(DEFAULT_POLICY): the policy caches its as_dict() in its __dict__.
    assert set(documented) == set(RoutingPolicy.knob_names()), sorted(documented)
    for knob, default in documented.items():
        assert getattr(DEFAULT_POLICY, knob) == default, knob
        assert ConfidenceRoutedLLM.model_fields[knob].default == default, knob


def test_routing_record_table_names_every_reason():
    from confidence_router import Reason

    (row,) = [r for r in _table("README.md", "| key | meaning |") if r[0] == "`reason`"]
    listed = re.findall(r"`(\w+)`", row[1].split(":", 1)[1])
    assert listed == list(Reason.ALL)


def test_signals_table_names_every_router_signal():
    from confidence_router.signals import SIGNAL_SCORERS

    rows = _table("docs/signals.md", "| name | score | needs |")
    assert {row[0].strip("`") for row in rows} == set(SIGNAL_SCORERS)


#: Dotted names in the docs that start with ``confidence_router.`` but are not Python objects
#: (OpenTelemetry span and metric names, a proxy error's ``param``).
NOT_PYTHON_NAMES = {"confidence_router.route", "confidence_router.calls",
                    "confidence_router.threshold"}


def test_documented_python_names_exist():
    import importlib

    def resolve(dotted: str) -> Any:
        parts = dotted.split(".")
        for i in range(len(parts), 0, -1):
            try:
                obj = importlib.import_module(".".join(parts[:i]))
            except ModuleNotFoundError:
                continue
            for part in parts[i:]:
                obj = getattr(obj, part)
            return obj
        raise ModuleNotFoundError(dotted)

    names = {m for p in DOC_FILES
             for m in re.findall(r"confidence_router(?:\.[A-Za-z_]\w*)+", p.read_text())}
    assert len(names) > 10
    missing = []
    for name in sorted(names - NOT_PYTHON_NAMES):
        try:
            resolve(name)
        except (ImportError, AttributeError) as error:
            missing.append(f"{name}: {error}")
    assert not missing
    assert NOT_PYTHON_NAMES <= names  # the list does not go stale


# ---- shell blocks: the CLI commands and script paths they show -----------------------------


def _commands(text: str) -> list[list[str]]:
    """Simple commands of a shell text: ``\\``-continuations joined, comments dropped, split on
    ``&&``, ``||``, ``;`` and ``|``, leading ``VAR=value`` assignments and ``export`` removed."""
    text = text.replace("\\\n", " ")
    found: list[list[str]] = []
    for line in text.splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        current: list[str] = []
        for token in [*lexer, ";"]:
            if token in ("&&", "||", ";", "|", "&"):
                while current and (re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", current[0])
                                   or current[0] in ("export", "do", "then", "else")):
                    current.pop(0)
                if current:
                    found.append(current)
                current = []
            else:
                current.append(token)
    return found


def test_shell_parser_splits_commands():
    got = _commands('A="x y" pip install -e ".[a]" && confidence-router demo  # hi\n'
                    'for e in examples/*.py; do python "$e"; done\n'
                    "confidence-router eval --db r.sqlite \\\n    --gsa\n")
    assert got == [["pip", "install", "-e", ".[a]"], ["confidence-router", "demo"],
                   ["for", "e", "in", "examples/*.py"], ["python", "$e"], ["done"],
                   ["confidence-router", "eval", "--db", "r.sqlite", "--gsa"]]


SHELL_COMMANDS = [(b, cmd) for b in SHELL_BLOCKS for cmd in _commands(b.code)]
CLI_COMMANDS = [(b, cmd) for b, cmd in SHELL_COMMANDS if cmd[0] == "confidence-router"]


def test_the_console_script_is_the_cli():
    scripts = _pyproject()["project"]["scripts"]
    assert scripts["confidence-router"] == "confidence_router.cli:main"
    assert CLI_COMMANDS  # the docs do show some


@pytest.mark.parametrize(("block", "argv"), CLI_COMMANDS,
                         ids=[f"{b.id}:{' '.join(c[1:3])}" for b, c in CLI_COMMANDS])
def test_cli_command_parses(block, argv):
    from confidence_router.cli import build_parser

    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        try:
            args = build_parser().parse_args(argv[1:])
        except SystemExit as exit_:
            pytest.fail(f"{block.id}: {shlex.join(argv)} does not parse ({exit_.code}): "
                        f"{stderr.getvalue().strip()}")
    assert args.command == argv[1]


SCRIPT_PATHS = [(b, token) for b, cmd in SHELL_COMMANDS
                if cmd[0] in ("python", "python3") for token in cmd[1:2]
                if token.startswith(("examples/", "benchmarks/"))]


def test_documented_script_paths_exist():
    inline = re.findall(r"`python3? ((?:examples|benchmarks)/[\w./-]+\.py)[^`]*`",
                        "\n".join(p.read_text() for p in DOC_FILES))
    paths = [token for _, token in SCRIPT_PATHS] + inline
    assert paths  # the docs do name some
    missing = sorted({p for p in paths if not (ROOT / p).is_file()})
    assert not missing
    globs = [t for _, cmd in SHELL_COMMANDS for t in cmd
             if "*" in t and t.startswith(("examples/", "benchmarks/"))]
    assert all(list(ROOT.glob(g)) for g in globs), globs


def _subparsers() -> dict[str, Any]:
    import argparse

    from confidence_router.cli import build_parser

    parser = build_parser()
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


def test_inline_cli_commands_name_real_options():
    # `confidence-router CMD --opt ...` in the prose (not in a block): the sub-command and every
    # option it shows exist (values are often placeholders, so they are not parsed).
    subparsers = _subparsers()
    text = "\n".join(p.read_text() for p in DOC_FILES)
    spans = [" ".join(s.split()) for s in re.findall(r"`(confidence-router [^`]+)`", text)]
    assert spans
    problems = []
    for span in spans:
        words = span.replace("[", " ").replace("]", " ").split()
        if words[1] not in subparsers:
            problems.append(f"{span}: no sub-command {words[1]!r}")
            continue
        options = subparsers[words[1]]._option_string_actions
        problems += [f"{span}: {word} is not an option of {words[1]}"
                     for word in words[2:] if word.startswith("-") and word.split("=")[0]
                     not in options and not word.startswith("-" * 3)]
    assert not problems
