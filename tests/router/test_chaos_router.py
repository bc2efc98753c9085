"""Chaos round on the router core: one router with every feature on (GSA probe, budget cap,
early exit, local and cloud timeouts, a retry policy, the PII guard), driven by a seeded random
schedule of calls from several threads (invoke / stream / batch) and an asyncio loop
(ainvoke / astream / abatch, some tasks cancelled mid-way, some streams abandoned after one
chunk), while the fake servers inject a fault per request: a local model that hangs past
``local_timeout``, answers 500, fails mid-answer, or drops the connection mid-answer; a cloud
that throttles (once or always), answers 500, hangs past ``cloud_timeout``, or fails mid-stream.

The schedule is fixed by the seed; the interleaving is not, so nothing here depends on which
call wins a race. Every call is checked against invariants that hold whatever the timing:

* it ends (bounded by a generous deadline: a call that does not is a hang) with an answer or
  a typed :mod:`confidence_router.errors` exception; never a bare builtin, an empty answer or
  a partial local answer served as if whole;
* its routing record agrees with what the fake servers received: ``cloud_attempts`` equals the
  Bedrock requests carrying the call's tag, a kept-local answer is the whole scripted local
  answer, a cloud answer is the scripted cloud answer of that very call;
* the budget never admits more cloud spend than its cap, counted from the requests the fake
  Bedrock received (and what each of them was billed), and nothing stays reserved;
* a query with personal data never reaches the Bedrock server (the bodies are searched);
* afterwards no router thread or asyncio task is left and both servers are idle.
"""

from __future__ import annotations

import asyncio
import json
import random
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from langchain_core.messages import AIMessage, BaseMessage
from langchain_ollama import OllamaEmbeddings

from confidence_router import CloudBudget, ConfidenceRoutedLLM, Reason, RoutingStats
from confidence_router.errors import (
    BudgetExceededError,
    CloudEscalationError,
    ConfidenceRouterError,
    LocalModelError,
)
from confidence_router.guards import PIIGuard
from confidence_router.knowledge import KnowledgeStore
from confidence_router.probe import SelfAssessmentProbe
from confidence_router.retry import RetryPolicy
from confidence_router.serving.protocol import ChatReply, ChatRequest, GeneratedToken
from confidence_router.testing import FakeBedrockServer, InFlightBackend, last_user_text

SONNET = "us.anthropic.claude-sonnet-4-5-20250929-v1:0"
LOCAL_TIMEOUT = 0.5
CLOUD_TIMEOUT = 0.5
LOCAL_HANG = 2.0  # the fake Ollama stops at once when the client hangs up
CLOUD_HANG = 1.0  # the fake Bedrock sleeps it out: keep it short
MAX_TOKENS = 20
TOKEN_DELAY = 0.01  # a local answer is still being generated when a stream is abandoned
INPUT_TOKENS = 5  # what the fake Bedrock bills as input (below any reservation's bound)
BUDGET_USD = 0.006  # a handful of escalations: the cap binds during every run
DEADLINE = 90.0  # per worker; far above a normal run (a few seconds): only a hang reaches it
#: (seed, cloud API): ChatBedrockConverse and ChatBedrock (InvokeModel) take turns.
SEEDS = ((11, "converse"), (23, "invoke"), (37, "converse"), (41, "invoke"), (59, "converse"))

LOCAL_FAULTS = ("ok", "ok", "unsure", "unsure", "hang", "500", "error_mid", "cut")
CLOUD_FAULTS = ("ok", "ok", "ok", "throttle_once", "throttle", "500", "hang", "cut_mid",
                "drop", "drop_mid")
PROBE_FAULTS = ("yes", "yes", "yes", "yes", "no", "no", "500", "hang")
SYNC_PATHS = ("invoke", "stream", "batch")
ASYNC_PATHS = ("ainvoke", "astream", "abatch")


# =============================================================================================
# the scripted local model: an InFlightBackend that can also drop the connection mid-answer
# =============================================================================================


class ChaosBackend(InFlightBackend):
    """Drops the connection after ``n`` tokens for the requests ``cuts`` selects: the token
    iterator raises a disconnect error, on which the Ollama-compatible server closes the
    connection without the final chunk (a crashed server, a proxy cut)."""

    def __init__(self) -> None:
        super().__init__()
        self.cuts: list[tuple[Callable[[ChatRequest], bool], int]] = []

    def chat(self, request: ChatRequest) -> ChatReply:
        reply = super().chat(request)
        for match, after in self.cuts:
            if match(request):
                return ChatReply(tokens=_cut(reply.tokens, after), prompt_tokens=reply.prompt_tokens,
                                 done_reason=reply.done_reason, tool_calls=reply.tool_calls)
        return reply


def _cut(tokens: Any, after: int) -> Iterator[GeneratedToken]:
    iterator = iter(tokens)
    try:
        for _ in range(after):
            token = next(iterator, None)
            if token is None:
                break
            yield token
        raise ConnectionResetError("scripted: connection dropped mid-answer")
    finally:
        close = getattr(iterator, "close", None)
        if close is not None:
            close()


# =============================================================================================
# the schedule
# =============================================================================================


@dataclass
class Spec:
    """One scripted query and how it is called."""

    tag: str
    local: str
    cloud: str
    pii: bool
    probe: str  # "yes", "no", "500", "hang"
    knobs: dict[str, Any]
    path: str
    abandon: str | None = None  # one_chunk, cancel_probe, cancel_local, cancel_cloud, batch_twin
    question: str = ""
    local_text: str = ""
    cloud_text: str = ""
    outcome: Any = None  # an AIMessage, an exception, "cancelled", "abandoned"
    done: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.question = f"Chaos question {self.tag}: where is it?"
        if self.pii:
            self.question += f" Write to {self.tag.lower()}.owner@example.com please."
        self.local_text = f" Local answer {self.tag} is here"
        self.cloud_text = f"Cloud answer {self.tag} is here."


def _schedule(seed: int) -> tuple[list[list[Spec]], list[Spec]]:
    """Three sync workers' call lists and the async tasks, all fixed by ``seed``."""
    rng = random.Random(seed)
    counter = iter(range(1000))

    def spec(path: str) -> Spec:
        local, cloud = rng.choice(LOCAL_FAULTS), rng.choice(CLOUD_FAULTS)
        abandon = None
        roll = rng.random()
        if path in ("stream", "astream") and roll < 0.25:
            abandon = "one_chunk"
            local = rng.choice(("ok", "unsure"))  # a first chunk to abandon after
        elif path in ("ainvoke", "astream") and roll > 0.65:
            abandon = rng.choice(("cancel_probe", "cancel_local", "cancel_cloud"))
            if abandon == "cancel_local":
                local = "hang"
            elif abandon == "cancel_cloud":
                local, cloud = "unsure", "hang"
        knobs = {
            "early_exit": rng.random() < 0.5,
            "on_cloud_error": rng.choice(("raise", "local")),
            "on_budget_exceeded": rng.choice(("local", "local", "raise")),
        }
        return Spec(
            tag=f"T{next(counter):03d}Q",
            local=local,
            cloud=cloud,
            pii=rng.random() < 0.2,
            probe="hang" if abandon == "cancel_probe" else rng.choice(PROBE_FAULTS),
            knobs=knobs,
            path=path,
            abandon=abandon,
        )

    sync = [[spec(rng.choice(SYNC_PATHS)) for _ in range(6)] for _ in range(3)]
    asynchronous = [spec(rng.choice(ASYNC_PATHS)) for _ in range(14)]
    # A batch carries a second query of its own (same path, its own faults).
    for worker in sync:
        for i, item in enumerate(list(worker)):
            if item.path == "batch":
                worker.insert(worker.index(item) + 1, _batch_twin(spec("batch"), item))
    for item in list(asynchronous):
        if item.path == "abatch":
            asynchronous.insert(asynchronous.index(item) + 1, _batch_twin(spec("abatch"), item))
    return sync, asynchronous


def _batch_twin(twin: Spec, first: Spec) -> Spec:
    twin.abandon = "batch_twin"
    twin.knobs = dict(first.knobs)  # one batch, one set of per-call knobs
    return twin


# =============================================================================================
# scripting the servers
# =============================================================================================


def _probe_prompt_of(question: str) -> str:
    """How every GSA probe prompt for ``question`` starts (v2, or v3 with recalled knowledge:
    other calls' learned questions and answers follow the question, so a tag alone would
    match their probes too)."""
    return f"The user has asked the following question:\n{question}\n"


def _script(spec: Spec, backend: ChaosBackend, bedrock: FakeBedrockServer) -> None:
    tag, question = spec.tag, spec.question
    probe_prompt = _probe_prompt_of(question)

    def answer(request: ChatRequest) -> bool:
        return last_user_text(request.messages) == question

    def probe(request: ChatRequest) -> bool:
        return last_user_text(request.messages).startswith(probe_prompt)

    if spec.probe == "500":
        backend.fail(probe, status=500, message="scripted probe 500")
    elif spec.probe == "hang":
        backend.add_probe(probe, {"YES": -0.05, "NO": -3.5}, latency=LOCAL_HANG)
    else:
        backend.add_probe(probe, {"YES": -0.05, "NO": -3.5} if spec.probe == "yes"
                          else {"NO": -0.05, "YES": -3.5})
    words = [" Local", " answer", f" {tag}", " is", " here"]
    if spec.local == "unsure":
        backend.add_answer(answer, words, logprobs=[-0.05, -6.0, -0.05, -0.05, -0.05],
                           token_delay=TOKEN_DELAY)
    elif spec.local == "hang":
        backend.add_answer(answer, words, logprobs=-0.05, latency=LOCAL_HANG)
    elif spec.local == "500":
        backend.fail(answer, status=500, message="scripted local 500")
        backend.add_answer(answer, words, logprobs=-0.05)
    elif spec.local == "error_mid":
        backend.fail(answer, status=500, message="scripted local error mid-answer",
                     after_tokens=2)
        backend.add_answer(answer, words, logprobs=-0.05)
    else:  # ok, cut
        backend.add_answer(answer, words, logprobs=-0.05, token_delay=TOKEN_DELAY)
        if spec.local == "cut":
            backend.cuts.append((answer, 2))

    bedrock.add_answer(tag, spec.cloud_text, input_tokens=INPUT_TOKENS,
                       output_tokens=MAX_TOKENS)
    if spec.cloud == "throttle_once":
        bedrock.fail(tag, "ThrottlingException", times=1)
    elif spec.cloud == "throttle":
        bedrock.fail(tag, "ThrottlingException")
    elif spec.cloud == "500":
        bedrock.fail(tag, "InternalServerException")
    elif spec.cloud == "hang":
        bedrock.delay(tag, CLOUD_HANG)
    elif spec.cloud == "cut_mid":
        bedrock.fail(tag, "InternalServerException", after_pieces=1)
    elif spec.cloud == "drop":  # the connection closes before any response
        bedrock.drop(tag)
    elif spec.cloud == "drop_mid":  # streams: one piece, then the connection closes
        bedrock.drop(tag, after_pieces=1)


def _billed(spec: Spec, requests: list[dict[str, Any]]) -> int:
    """How many of ``spec``'s Bedrock requests produced output (billed): a throttled, 500 or
    dropped request did not; a hung one did (the fake answers after its delay); one failed or
    cut mid-stream did when it streamed (non-streaming requests fail before any output)."""
    if spec.cloud in ("throttle", "500", "drop"):
        return 0
    if spec.cloud == "throttle_once":
        return max(0, len(requests) - 1)
    if spec.cloud in ("cut_mid", "drop_mid"):
        return sum(r["operation"] in ("converse-stream", "invoke-with-response-stream")
                   for r in requests)
    return len(requests)


# =============================================================================================
# running the schedule
# =============================================================================================


def _merged(chunks: list[BaseMessage]) -> BaseMessage:
    total = chunks[0]
    for chunk in chunks[1:]:
        total = total + chunk  # type: ignore[operator]
    return total


def _run_sync(router: ConfidenceRoutedLLM, specs: list[Spec]) -> None:
    i = 0
    while i < len(specs):
        spec = specs[i]
        try:
            if spec.path == "invoke":
                spec.outcome = router.invoke(spec.question, **spec.knobs)
            elif spec.path == "stream" and spec.abandon == "one_chunk":
                stream = router.stream(spec.question, **spec.knobs)
                try:
                    next(stream)
                finally:
                    stream.close()
                spec.outcome = "abandoned"
            elif spec.path == "stream":
                spec.outcome = _merged(list(router.stream(spec.question, **spec.knobs)))
            else:  # batch: this spec and its twin
                twin = specs[i + 1]
                outs = router.batch([spec.question, twin.question], return_exceptions=True,
                                    **spec.knobs)
                spec.outcome, twin.outcome = outs
                twin.done.set()
                i += 1
        except BaseException as error:  # noqa: BLE001 - every outcome is judged afterwards
            spec.outcome = error
            if spec.path == "batch":  # the whole batch failed: its twin's outcome too
                specs[i + 1].outcome = error
                specs[i + 1].done.set()
                i += 1
        spec.done.set()
        i += 1


async def _until(condition: Callable[[], bool], seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.005)
    return True


async def _one_async(router: ConfidenceRoutedLLM, spec: Spec, twin: Spec | None,
                     ollama: Any, bedrock: FakeBedrockServer) -> None:
    async def call() -> Any:
        if spec.path == "ainvoke":
            return await router.ainvoke(spec.question, **spec.knobs)
        if spec.path == "abatch":
            assert twin is not None
            return await router.abatch([spec.question, twin.question], return_exceptions=True,
                                       **spec.knobs)
        stream = router.astream(spec.question, **spec.knobs)
        try:
            if spec.abandon == "one_chunk":
                await stream.__anext__()
                return "abandoned"
            return _merged([chunk async for chunk in stream])
        finally:
            await stream.aclose()

    task = asyncio.ensure_future(call())
    if spec.abandon in ("cancel_probe", "cancel_local", "cancel_cloud"):
        def reached() -> bool:
            if task.done():
                return True
            if spec.abandon == "cancel_probe":
                return any(_last_text(r).startswith(_probe_prompt_of(spec.question))
                           for r in ollama.requests_to("/api/chat"))
            if spec.abandon == "cancel_local":
                return any(_last_text(r) == spec.question for r in ollama.requests_to("/api/chat"))
            return any(spec.tag in r["last_user_text"] for r in bedrock.requests)

        await _until(reached, DEADLINE)
        task.cancel()
    try:
        result = await task
    except asyncio.CancelledError:
        spec.outcome = "cancelled"
    except BaseException as error:  # noqa: BLE001 - judged afterwards
        spec.outcome = error
        if twin is not None:  # the whole batch failed: its twin's outcome too
            twin.outcome = error
            twin.done.set()
    else:
        if spec.path == "abatch":
            assert twin is not None
            spec.outcome, twin.outcome = result
            twin.done.set()
        else:
            spec.outcome = result
    spec.done.set()


async def _run_async(router: ConfidenceRoutedLLM, specs: list[Spec], ollama: Any,
                     bedrock: FakeBedrockServer, leftover: list[asyncio.Task[Any]]) -> None:
    jobs = []
    for i, spec in enumerate(specs):
        if spec.abandon == "batch_twin":
            continue
        twin = specs[i + 1] if spec.path == "abatch" else None
        jobs.append(_one_async(router, spec, twin, ollama, bedrock))
    await asyncio.wait_for(asyncio.gather(*jobs), DEADLINE)
    # Tasks the library left running on this loop (a tier call it forgot to cancel).
    me = asyncio.current_task()
    await _until(lambda: not [t for t in asyncio.all_tasks() if t is not me], 10.0)
    leftover.extend(t for t in asyncio.all_tasks() if t is not me)


def _last_text(recorded: Any) -> str:
    """The last user text of a request the fake Ollama recorded ("" for a body that never
    arrived whole: a client cancelled while sending it)."""
    body = recorded["body"]
    return last_user_text(body.get("messages") or []) if isinstance(body, dict) else ""


def _router_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("confidence-router")]


def _eventually(condition: Callable[[], bool], seconds: float = 15.0) -> bool:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


# =============================================================================================
# the invariants
# =============================================================================================


def _check(spec: Spec, cloud_requests: list[dict[str, Any]]) -> None:
    """One finished call against what the servers received for it."""
    outcome = spec.outcome
    where = (f"{spec.tag} path={spec.path} local={spec.local} cloud={spec.cloud} pii={spec.pii}"
             f" probe={spec.probe} knobs={spec.knobs} abandon={spec.abandon}"
             f" cloud_requests={[r['operation'] for r in cloud_requests]}")
    assert spec.done.is_set(), f"never ended: {where}"
    assert outcome is not None, f"no outcome: {where}"
    if spec.pii:
        assert cloud_requests == [], f"personal data reached the cloud: {where}"
    if outcome in ("cancelled", "abandoned"):
        return
    if isinstance(outcome, BaseException):
        assert isinstance(outcome, ConfidenceRouterError), (
            f"untyped error {type(outcome).__mro__}: {outcome!r} for {where}")
        routing = getattr(outcome, "routing", None)
        if isinstance(outcome, (LocalModelError, CloudEscalationError, BudgetExceededError)):
            assert routing is not None, f"{outcome!r} {where}"
        if routing is not None:
            assert routing["cloud_attempts"] == len(cloud_requests), f"{routing} {where}"
            assert routing["decision"] in ("local", "cloud"), f"{routing} {where}"
        if isinstance(outcome, BudgetExceededError):
            assert spec.knobs["on_budget_exceeded"] == "raise", f"{routing} {where}"
            assert not cloud_requests, f"{routing} {where}"
        if isinstance(outcome, CloudEscalationError):
            assert cloud_requests, f"{routing} {where}"
        if isinstance(outcome, LocalModelError):
            assert not cloud_requests, f"{routing} {where}"
        # A local answer handed back with the error is the whole answer, never a prefix.
        local_message = getattr(outcome, "local_message", None)
        if local_message is not None:
            assert local_message.text == spec.local_text, f"{local_message!r} {routing} {where}"
        return
    assert isinstance(outcome, AIMessage) or type(outcome).__name__ == "AIMessageChunk", where
    routing = outcome.response_metadata["routing"]
    text = outcome.text
    assert text.strip(), f"empty answer: {routing} {where}"
    assert routing["cloud_attempts"] == len(cloud_requests), f"{routing} {where}"
    if routing["decision"] == "cloud":
        assert routing["escalated"] is True, f"{routing} {where}"
        assert text == spec.cloud_text, f"{text!r} {routing} {where}"
        assert cloud_requests, f"{routing} {where}"
        assert spec.cloud in ("ok", "throttle_once"), f"{routing} {where}"
        assert not spec.pii, f"{routing} {where}"
        return
    assert routing["decision"] == "local", f"{routing} {where}"
    # ``escalated`` stays true when the cloud was tried and failed (reason cloud_error; see
    # test_a_cloud_error_fallback_is_not_reported_as_answered_by_the_cloud).
    assert routing["escalated"] is (routing["reason"] == Reason.CLOUD_ERROR), (
        f"{routing} {where}")
    # A kept-local answer is the whole local answer of this call: never a prefix of an
    # answer cut off, stopped early or failed mid-way.
    assert text == spec.local_text, f"{text!r} {routing} {where}"
    assert spec.local in ("ok", "unsure"), f"{routing} {where}"
    if routing["reason"] == Reason.CONFIDENT:
        assert spec.local == "ok", f"{routing} {where}"
        assert not cloud_requests, f"{routing} {where}"
        # Flagged only when the probe asked for the cloud and the escalation was refused.
        assert routing["flagged"] == ("escalation_skipped" in routing), f"{routing} {where}"
        assert routing["flagged"] == routing["would_escalate"], f"{routing} {where}"
    elif routing["reason"] == Reason.CLOUD_ERROR:
        assert spec.knobs["on_cloud_error"] == "local", f"{routing} {where}"
        assert routing["flagged"], f"{routing} {where}"
    else:
        # Kept although the decision said escalate: the guard, or the budget refused.
        assert routing["would_escalate"] and routing["flagged"], f"{routing} {where}"
        assert routing["reason"] in (Reason.BUDGET_EXCEEDED, Reason.LOW_CONFIDENCE,
                                     Reason.PRECHECK, Reason.EARLY_EXIT), f"{routing} {where}"
        skipped = routing["escalation_skipped"]
        if spec.pii:
            assert skipped.startswith("escalation guard"), f"{routing} {where}"
        else:
            assert skipped == "cloud budget exhausted", f"{routing} {where}"
            assert not cloud_requests, f"{routing} {where}"


@pytest.fixture
def knowledge(tmp_path, monkeypatch, ollama_server) -> Iterator[KnowledgeStore]:
    """A Chroma knowledge store embedding through the fake Ollama (hashing embeddings)."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    embeddings = OllamaEmbeddings(base_url=ollama_server.url, model="scripted-embed")
    with KnowledgeStore(embeddings, path=tmp_path / "kb") as store:
        yield store


@pytest.mark.parametrize(("seed", "api"), SEEDS)
def test_a_seeded_chaos_schedule_keeps_every_invariant(
    seed, api, ollama_server, ollama_chat, bedrock_chat, bedrock_invoke_chat, bedrock_server,
    knowledge
):
    backend = ChaosBackend()
    ollama_server.backend = backend
    sync, asynchronous = _schedule(seed)
    everyone = [s for worker in sync for s in worker] + asynchronous
    for spec in everyone:
        _script(spec, backend, bedrock_server)
    threads_before = {t.ident for t in _router_threads()}

    local = ollama_chat()
    budget = CloudBudget(max_usd=BUDGET_USD)
    stats = RoutingStats()
    router = ConfidenceRoutedLLM(
        local=local,
        cloud=(bedrock_chat if api == "converse" else bedrock_invoke_chat)(max_tokens=MAX_TOKENS),
        signal="min_logprob",
        threshold=0.5,
        precheck=SelfAssessmentProbe(model=local, store=knowledge),
        precheck_threshold=0.5,
        knowledge_store=knowledge,
        learn_from_escalations=True,
        budget=budget,
        local_timeout=LOCAL_TIMEOUT,
        cloud_timeout=CLOUD_TIMEOUT,
        cloud_retry=RetryPolicy(max_attempts=2, base_delay=0.01, max_delay=0.02, seed=seed),
        escalation_guard=PIIGuard(),
        stats=stats,
    )

    leftover_tasks: list[asyncio.Task[Any]] = []
    workers = [threading.Thread(target=_run_sync, args=(router, specs), name=f"chaos-sync-{i}",
                                daemon=True) for i, specs in enumerate(sync)]
    workers.append(threading.Thread(
        target=lambda: asyncio.run(_run_async(router, asynchronous, ollama_server,
                                              bedrock_server, leftover_tasks)),
        name="chaos-async", daemon=True))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # extraction / retry warnings are not under test here
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(DEADLINE)
    hung = [w.name for w in workers if w.is_alive()]
    assert not hung, f"workers still running after {DEADLINE}s: {hung}; " + "; ".join(
        str(s) for s in everyone if not s.done.is_set())

    # What was learned: only served cloud answers, each under its own question.
    learned = {s.tag: knowledge.get_by_question(s.question) for s in everyone}
    knowledge.close()  # its idle workers end (they are router threads too)

    # Nothing left behind: router threads, loop tasks, work still running at either server.
    assert leftover_tasks == []
    assert _eventually(lambda: {t.ident for t in _router_threads()} <= threads_before), (
        _router_threads())
    assert _eventually(lambda: backend.in_flight == 0), backend.in_flight
    assert _eventually(lambda: bedrock_server.in_flight == 0), bedrock_server.in_flight

    # Each call asks the local model at most once to self-assess and at most twice to answer
    # (the second time only to serve the whole answer after an early exit was refused).
    local_texts = [_last_text(r) for r in ollama_server.requests_to("/api/chat")]
    for spec in everyone:
        assert sum(t.startswith(_probe_prompt_of(spec.question)) for t in local_texts) <= 1
        answers = sum(t == spec.question for t in local_texts)
        assert answers <= (2 if spec.knobs["early_exit"] else 1), spec.tag

    requests = bedrock_server.requests
    by_tag = {s.tag: [r for r in requests if s.tag in r["last_user_text"]] for s in everyone}
    assert sum(len(v) for v in by_tag.values()) == len(requests), "a cloud request of no call"
    operations = {r["operation"] for r in requests}
    assert operations <= ({"converse", "converse-stream"} if api == "converse"
                          else {"invoke", "invoke-with-response-stream"}), operations
    for spec in everyone:
        _check(spec, by_tag[spec.tag])

    for spec in everyone:
        entry = learned[spec.tag]
        outcome = spec.outcome
        routing = getattr(outcome, "response_metadata", {}).get("routing")
        if routing is not None and routing.get("learned"):
            assert entry is not None, f"{spec.tag}: routing says learned, the store has nothing"
        if entry is None:
            continue
        assert entry.content == spec.cloud_text, (spec.tag, entry)
        assert by_tag[spec.tag] and not spec.pii, spec.tag
        if routing is not None:
            assert routing["decision"] == "cloud" and routing.get("learned"), (spec.tag, routing)
        else:  # no answer reached the caller: cancelled or abandoned after the cloud answered
            assert outcome in ("cancelled", "abandoned"), (spec.tag, outcome)

    # The stats sink counted each finished call once (a call cancelled or abandoned may or
    # may not have finished its record first).
    records = [getattr(s.outcome, "routing", None) if isinstance(s.outcome, BaseException)
               else getattr(s.outcome, "response_metadata", {}).get("routing")
               for s in everyone]
    seen = [r for r in records if r is not None]
    unfinished = sum(s.outcome in ("cancelled", "abandoned") for s in everyone)
    counted = stats.snapshot()
    assert len(seen) <= counted["calls"] <= len(seen) + unfinished, (counted, len(seen))
    for key in ("escalated", "cloud", "flagged"):
        if key == "cloud":
            mine = sum(r["decision"] == "cloud" for r in seen)
        else:
            mine = sum(bool(r[key]) for r in seen)
        assert mine <= counted[key] <= mine + unfinished, (key, counted, mine)

    # Personal data never left: not in any body sent to Bedrock, whatever call sent it.
    bodies = json.dumps([r["body"] for r in requests])
    assert "@example.com" not in bodies

    # The cap held against what Bedrock actually billed, and nothing is still reserved.
    prices = router.price_table()
    one = prices.cost_of({"input_tokens": INPUT_TOKENS, "output_tokens": MAX_TOKENS,
                          "total_tokens": INPUT_TOKENS + MAX_TOKENS}, SONNET)
    assert one is not None and one > 0
    billed = sum(_billed(spec, by_tag[spec.tag]) for spec in everyone) * one
    assert billed <= BUDGET_USD + 1e-12, (billed, budget.snapshot())
    assert billed <= budget.spent + 1e-12, (billed, budget.snapshot())
    assert budget.spent <= BUDGET_USD + 1e-12, budget.snapshot()
    assert budget.reserved == 0, budget.snapshot()
    # The run exercised what it claims: escalations happened and the cap refused some.
    outcomes = [s.outcome for s in everyone]
    assert any(isinstance(o, BaseMessage) for o in outcomes)
    assert requests


def test_the_fake_bedrock_counts_requests_it_is_still_answering(bedrock_chat, bedrock_server):
    """``FakeBedrockServer.in_flight``: a request counts while the server is still on it."""
    release = threading.Event()

    def held(record: Any) -> bool:  # runs while the server resolves the request
        return "held" in record["last_user_text"] and release.wait(30.0)

    bedrock_server.delay(held, 0.0)
    answers: list[str] = []
    client = threading.Thread(
        target=lambda: answers.append(bedrock_chat(max_tokens=10).invoke("a held question").text))
    client.start()
    try:
        assert _eventually(lambda: bedrock_server.in_flight == 1, 30.0)
        assert bedrock_server.in_flight == 1
    finally:
        release.set()
        client.join(30.0)
    assert answers == ["This is the scripted Bedrock answer."]
    assert _eventually(lambda: bedrock_server.in_flight == 0, 30.0)
    assert bedrock_server.in_flight == 0


# =============================================================================================
# findings: focused regression tests for what the chaos run found
# =============================================================================================


@pytest.mark.parametrize("refusal", ["cloud_error", "budget", "cloud_stream_cut"])
def test_an_error_after_an_early_exit_never_hands_back_the_cut_local_answer(
    refusal, ollama_chat, bedrock_chat, ollama_backend, bedrock_server
):
    """``local_message`` is "the local answer": after an early exit the router itself never
    serves the prefix it stopped (it generates the whole answer to fall back on), so neither
    may the error it raises hand that prefix to the caller as the answer."""
    words = [" Local", " answer", " is", " whole"]
    ollama_backend.add_answer("exit", words, logprobs=[-0.05, -6.0, -0.05, -0.05])
    if refusal == "cloud_error":
        bedrock_server.fail("exit", "InternalServerException")
    elif refusal == "cloud_stream_cut":
        bedrock_server.fail("exit", "InternalServerException", after_pieces=1)
    router = ConfidenceRoutedLLM(
        local=ollama_chat(), cloud=bedrock_chat(max_tokens=MAX_TOKENS), signal="min_logprob",
        early_exit=True, budget=CloudBudget(max_usd=1e-9 if refusal == "budget" else 5.0),
        on_cloud_error="raise", on_budget_exceeded="raise", cloud_retry=None)
    with pytest.raises((CloudEscalationError, BudgetExceededError)) as raised:
        if refusal == "cloud_stream_cut":
            list(router.stream("exit now"))
        else:
            router.invoke("exit now")
    routing = raised.value.routing
    assert routing is not None and routing["early_exit"] == {"exited": True, "tokens": 2}
    assert len(bedrock_server.requests) == (0 if refusal == "budget" else 1)
    message = raised.value.local_message
    assert message is None or message.text == "".join(words), message


def test_the_fake_bedrock_drops_connections_before_or_during_an_answer(
    bedrock_chat, bedrock_server
):
    """``FakeBedrockServer.drop``: no response at all, or a stream cut after some pieces
    (no exception event, no final frame): the real client gets a connection error."""
    from botocore.exceptions import ConnectionClosedError
    from urllib3.exceptions import ProtocolError

    bedrock_server.drop("gone")
    bedrock_server.drop("cut", after_pieces=1)
    chat = bedrock_chat(max_tokens=10)
    with pytest.raises(ConnectionClosedError):
        chat.invoke("gone now")
    pieces: list[str] = []
    with pytest.raises(ProtocolError, match="ended prematurely"):
        for chunk in chat.stream("cut here"):
            pieces.append(chunk.text)
    assert "".join(pieces) == "This"  # the one piece sent before the cut
    assert [r["operation"] for r in bedrock_server.requests] == ["converse", "converse-stream"]
    assert _eventually(lambda: bedrock_server.in_flight == 0, 30.0)
