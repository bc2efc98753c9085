"""Chaos round: two proxies sharing one real redis-server, many concurrent clients, faults.

Two proxies (each its own router and shared-state clients, as two uvicorn workers would have)
share one real ``redis-server`` (append-only file, fsync always: the way a budget that must
survive a restart is deployed) and sit in front of the project's fake Ollama and fake
Bedrock servers. A seeded random mix of clients (OpenAI chat completions streamed or not,
Ollama ``/api/chat`` streamed or not, content arrays with images, tool calls and tool results,
whitespace-only content, clients that hang up mid-stream or before any byte) runs while the
fakes hang, fail with 500s, throttle and cut streams, and Redis is paused (SIGSTOP/SIGCONT)
and then killed (SIGKILL) and restarted on the same port, mid-run.

Invariants checked (the fake servers count what they received):

* every request gets a well-formed HTTP answer in bounded time: a 200 whose body / stream is
  complete (``[DONE]`` / ``done: true``), or one that ends on an error event naming the
  problem, or an error status with a JSON error body naming it; never a hang, a cut-off
  stream or a 500;
* the shared budget cap holds against what the fake Bedrock server actually received (and
  would have billed);
* once Redis is back, the shared stats count exactly the requests the proxies served;
* a client that hangs up stops the upstream generation (local and cloud);
* afterwards both proxies are healthy, ready and serve a normal request.

The mix is seeded (``CONFIDENCE_ROUTER_CHAOS_SEED``, default below): the same requests, in
the same order, on every run; only the interleaving varies, and no invariant depends on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import random
import signal
import tempfile
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from langchain_core.callbacks import AsyncCallbackHandler

from confidence_router.proxy.config import ProxyConfig
from confidence_router.testing import InFlightBackend, last_user_text
from confidence_router.testing.processes import RedisServerProcess, start_or_skip

SEED = int(os.environ.get("CONFIDENCE_ROUTER_CHAOS_SEED", "20261204"))
N_CHAOS = 96  # requests while faults are injected
N_CALM = 24  # requests after Redis is back, to check the shared stats exactly
CONCURRENCY = 12
CLIENT_TIMEOUT = 45.0  # far above any legitimate answer: hitting it is a hang
SONNET = "us.anthropic.claude-sonnet-4-5-20250929-v1:0"

CONFIDENT = -0.05  # kept local
UNSURE = -2.5  # escalated
CLOUD_IN, CLOUD_OUT = 20, 200  # the usage the fake Bedrock reports for every answer
LONG_PIECES = 300
CLOUD_TIMEOUT = 3.0  # generous: a busy 2-core machine must not time out a normal answer
LOCAL_TIMEOUT = 6.0  # a long local answer (15 s) outlives it: a hang-up must stop it first
PNG = ("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5E"
       "rkJggg==")
TOOL = {"type": "function", "function": {"name": "get_weather", "description": "weather",
                                         "parameters": {"type": "object", "properties": {
                                             "city": {"type": "string"}}}}}

# What each kind of request makes the fakes do (matched on the last user text).
KINDS: dict[str, int] = {
    "lok": 14,      # confident local answer
    "cok": 12,      # unsure: escalated, the cloud answers
    "lstory": 5,    # a long local answer; the client hangs up before any byte
    "cstory": 6,    # a long cloud stream; the client hangs up after the first piece
    "lhang": 5,     # the local model hangs: the local time limit escalates
    "l500": 5,      # the local model answers 500
    "lcut": 5,      # the local stream is cut (connection closed, no final line)
    "lerr": 4,      # the local stream ends on an error line
    "cthr": 4,      # the cloud throttles every attempt
    "c500": 4,      # the cloud answers 500 every attempt
    "chang": 4,     # the cloud hangs past its time limit
    "ccut": 5,      # the cloud stream fails after two pieces (in-stream exception)
    "cnet": 4,      # the cloud connection is cut after two pieces (no error, no end)
    "img": 5,       # a content array with text and an image
    "tools": 5,     # tools offered, the local model calls one
    "toolres": 5,   # a tool call and its result in the history
    "blank": 4,     # whitespace-only content: nothing to answer
}
UNBILLED = ("cthr", "c500")  # refused by the cloud before any answer: never billed


# ---------------------------------------------------------------------------------------------
# The test bed
# ---------------------------------------------------------------------------------------------


class PersistentRedis(RedisServerProcess):
    """A redis-server with an append-only file (fsync always) in a directory that outlives the
    process: killed with SIGKILL and started again on the same port, it keeps its data."""

    def __init__(self, data_dir: Path, port: int | None = None) -> None:
        super().__init__(port=port)
        self.data_dir = data_dir

    def _command(self, data_dir: Path) -> list[str]:
        command = super()._command(data_dir)
        exe = command[0]
        return [exe, "--port", str(self.port), "--bind", self.host, "--save", "",
                "--appendonly", "yes", "--appendfsync", "always", "--dir", str(self.data_dir),
                "--protected-mode", "no"]


class ChaosBackend(InFlightBackend):
    """The scripted local model, plus a stream cut (the connection closed mid-answer, no final
    line: what a crashed or restarted Ollama leaves) and an event per prompt set when its
    first token is generated."""

    def __init__(self) -> None:
        super().__init__()
        self.first_token: defaultdict[str, threading.Event] = defaultdict(threading.Event)
        self.tokens_for: Counter[str] = Counter()
        self.cut_streams = 0

    def chat(self, request: Any) -> Any:
        reply = super().chat(request)
        text = last_user_text(request.messages)
        return dataclasses.replace(reply, tokens=self._watched(reply.tokens, text,
                                                               cut="lcut" in text))

    def _watched(self, tokens: Any, text: str, *, cut: bool) -> Iterator[Any]:
        for i, token in enumerate(tokens):
            if cut and i == 2:
                with self._count_lock:
                    self.cut_streams += 1
                # The fake server treats this as the connection going away: it stops
                # writing and closes the socket without the chunked terminator.
                raise ConnectionResetError("scripted cut of the local stream")
            with self._count_lock:
                self.tokens_for[text] += 1
            self.first_token[text].set()
            yield token


def _script(backend: ChaosBackend, bedrock: Any) -> None:
    words = [f" w{i}" for i in range(LONG_PIECES)]
    usage = {"input_tokens": CLOUD_IN, "output_tokens": CLOUD_OUT}
    backend.add_answer("lok", " kept locally", logprobs=CONFIDENT)
    backend.add_answer("img", " a small picture", logprobs=CONFIDENT)
    backend.add_answer("toolres", " it is sunny", logprobs=CONFIDENT)
    backend.add_answer("tools", " calling", logprobs=CONFIDENT,
                       tool_calls=[{"name": "get_weather", "arguments": {"city": "Paris"}}])
    backend.add_answer("lstory", words, logprobs=CONFIDENT, token_delay=0.05)  # 15 s in all
    backend.add_answer("lhang", " never sent", logprobs=CONFIDENT, latency=60)
    backend.fail("l500", status=500, message="scripted local 500")
    backend.fail("lerr", status=500, message="scripted local error line", after_tokens=2)
    backend.add_answer("lcut", " one two three four", logprobs=CONFIDENT)
    backend.set_default(" dunno maybe", logprobs=UNSURE)  # cok, cstory, cthr, c500, ...

    bedrock.fail("cthr", "ThrottlingException")
    bedrock.fail("c500", "InternalServerException")
    bedrock.fail("ccut", "ServiceUnavailableException", after_pieces=2)
    bedrock.add_answer("ccut", "the cloud starts and then fails", **usage)
    bedrock.drop("cnet", after_pieces=2)
    bedrock.add_answer("cnet", "the cloud starts and then vanishes", **usage)
    bedrock.add_answer("chang", "too late", latency=CLOUD_TIMEOUT + 5, **usage)
    bedrock.add_answer("cstory", words, piece_delay=0.02, **usage)  # 6 s in all
    bedrock.set_default("from the cloud", input_tokens=CLOUD_IN, output_tokens=CLOUD_OUT)


@dataclasses.dataclass
class Plan:
    index: int
    kind: str
    front: str  # "openai" or "ollama"
    stream: bool
    phase: str  # "chaos" or "calm"

    @property
    def text(self) -> str:
        return f"{self.kind} request {self.phase} {self.index}"

    @property
    def path(self) -> str:
        return "/v1/chat/completions" if self.front == "openai" else "/api/chat"

    @property
    def hangs_up(self) -> str | None:
        return {"lstory": "before_any_byte", "cstory": "after_first_piece"}.get(self.kind)

    def body(self) -> dict[str, Any]:
        text = self.text
        messages: list[dict[str, Any]]
        body: dict[str, Any] = {"model": "m", "stream": self.stream}
        if self.kind == "blank":
            messages = [{"role": "user", "content": " \n\t "}]
        elif self.kind == "img":
            if self.front == "openai":
                messages = [{"role": "user", "content": [
                    {"type": "text", "text": text},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64," + PNG}}]}]
            else:
                messages = [{"role": "user", "content": text, "images": [PNG]}]
        elif self.kind == "tools":
            messages = [{"role": "user", "content": text}]
            body["tools"] = [TOOL]
        elif self.kind == "toolres":
            arguments = {"city": "Paris"}
            if self.front == "openai":
                messages = [
                    {"role": "user", "content": text},
                    {"role": "assistant", "content": None, "tool_calls": [
                        {"id": f"call{self.index}", "type": "function", "function": {
                            "name": "get_weather", "arguments": json.dumps(arguments)}}]},
                    {"role": "tool", "tool_call_id": f"call{self.index}", "content": "sunny"},
                ]
            else:
                messages = [
                    {"role": "user", "content": text},
                    {"role": "assistant", "content": "", "tool_calls": [
                        {"function": {"name": "get_weather", "arguments": arguments}}]},
                    {"role": "tool", "content": "sunny", "tool_name": "get_weather"},
                ]
            body["tools"] = [TOOL]
        else:
            messages = [{"role": "user", "content": text}]
        body["messages"] = messages
        return body


def _plans(rng: random.Random, n: int, phase: str, kinds: dict[str, int]) -> list[Plan]:
    names = sorted(kinds)
    weights = [kinds[k] for k in names]
    # Every kind once first (before the Redis faults and the cap: each path is exercised),
    # then a weighted random mix.
    first = rng.sample(names, len(names))
    plans = []
    for i in range(n):
        kind = first[i] if i < len(first) else rng.choices(names, weights)[0]
        front = rng.choice(["openai", "ollama"])
        stream = True if kind in ("lstory", "cstory") else rng.random() < 0.5
        plans.append(Plan(i, kind, front, stream, phase))
    return plans


# ---------------------------------------------------------------------------------------------
# Reading and judging an answer
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Outcome:
    plan: Plan
    status: int | None = None
    result: str = ""  # "answer", "stream_error", "http_error", "hung_up", or "VIOLATION: ..."
    decision: str | None = None
    reason: str | None = None
    error: str | None = None
    elapsed: float = 0.0
    raw: bytes = b""

    @property
    def ok(self) -> bool:
        return not self.result.startswith("VIOLATION")


def _judge_error(plan: Plan, status: int, raw: bytes, outcome: Outcome) -> None:
    outcome.status = status
    if status == 500 or status < 400:
        outcome.result = f"VIOLATION: status {status}: {raw[:300]!r}"
        return
    try:
        data = json.loads(raw)
    except ValueError:
        outcome.result = f"VIOLATION: {status} without a JSON body: {raw[:300]!r}"
        return
    if plan.front == "openai":
        error = data.get("error") if isinstance(data, dict) else None
        good = (isinstance(error, dict) and isinstance(error.get("message"), str)
                and error["message"] and isinstance(error.get("code"), str))
        outcome.error = error.get("code") if good else None  # type: ignore[union-attr]
    else:
        good = isinstance(data, dict) and isinstance(data.get("error"), str) and data["error"]
        outcome.error = data.get("error") if good else None
    outcome.result = "http_error" if good else f"VIOLATION: {status} error body {data!r}"


def _judge_openai_json(raw: bytes, outcome: Outcome) -> None:
    try:
        data = json.loads(raw)
        message = data["choices"][0]["message"]
        routing = data["routing"]
        assert data["choices"][0]["finish_reason"] in ("stop", "length", "tool_calls")
        assert isinstance(message.get("content"), (str, type(None)))
    except (ValueError, KeyError, IndexError, TypeError, AssertionError) as error:
        outcome.result = f"VIOLATION: bad OpenAI reply ({error!r}): {raw[:300]!r}"
        return
    outcome.decision, outcome.reason = routing.get("decision"), routing.get("reason")
    outcome.result = "answer"


def _judge_openai_stream(raw: bytes, outcome: Outcome) -> None:
    text = raw.decode("utf-8")
    if not text.endswith("\n\n"):
        outcome.result = f"VIOLATION: SSE stream cut off: {text[-200:]!r}"
        return
    events = [line[6:] for line in text.split("\n\n") if line.startswith("data: ")]
    if not events:
        outcome.result = f"VIOLATION: empty SSE stream: {text[:200]!r}"
        return
    if events[-1] == "[DONE]":
        chunks = [json.loads(e) for e in events[:-1]]
        finals = [c for c in chunks if c.get("choices") and c["choices"][0].get("finish_reason")]
        if len(finals) != 1 or any("error" in c for c in chunks) or "[DONE]" in events[:-1]:
            outcome.result = f"VIOLATION: malformed SSE stream: {text[-400:]!r}"
            return
        routing = finals[0].get("routing") or {}
        outcome.decision, outcome.reason = routing.get("decision"), routing.get("reason")
        outcome.result = "answer"
        return
    last = json.loads(events[-1])
    error = last.get("error")
    if isinstance(error, dict) and error.get("message") and error.get("code"):
        outcome.error = error["code"]
        outcome.result = "stream_error"
        return
    outcome.result = f"VIOLATION: SSE stream ends without [DONE] or an error: {text[-300:]!r}"


def _judge_ollama(raw: bytes, outcome: Outcome, stream: bool) -> None:
    text = raw.decode("utf-8")
    if stream and not text.endswith("\n"):
        outcome.result = f"VIOLATION: NDJSON stream cut off: {text[-200:]!r}"
        return
    try:
        lines = [json.loads(line) for line in text.splitlines() if line.strip()]
    except ValueError:
        outcome.result = f"VIOLATION: bad NDJSON: {text[-300:]!r}"
        return
    if not lines:
        outcome.result = "VIOLATION: empty Ollama reply"
        return
    last = lines[-1]
    if isinstance(last.get("error"), str) and last["error"]:
        outcome.error = last["error"]
        outcome.result = "stream_error" if stream else "VIOLATION: error in a 200 reply"
        return
    if last.get("done") is True and isinstance(last.get("routing"), dict) and all(
        line.get("done") is False for line in lines[:-1]
    ):
        outcome.decision = last["routing"].get("decision")
        outcome.reason = last["routing"].get("reason")
        outcome.result = "answer"
        return
    outcome.result = f"VIOLATION: Ollama reply without a final done line: {text[-300:]!r}"


def _first_piece(front: str, line: str) -> bool:
    if front == "openai":
        return line.startswith("data: {") and '"content": " w' in line
    return '"content": " w' in line


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------


class Chaos:
    """Sends the plans to the proxies, CONCURRENCY at a time, while ``faults`` runs."""

    def __init__(self, urls: list[str], backend: ChaosBackend) -> None:
        self.urls = urls
        self.backend = backend
        self.completed = 0
        self._changed: asyncio.Condition | None = None

    async def completed_at_least(self, n: int) -> None:
        assert self._changed is not None
        async with self._changed:
            await self._changed.wait_for(lambda: self.completed >= n)

    async def _one(self, client: httpx.AsyncClient, plan: Plan) -> Outcome:
        outcome = Outcome(plan)
        url = self.urls[plan.index % len(self.urls)] + plan.path
        started = time.monotonic()
        try:
            if plan.hangs_up == "before_any_byte":
                await self._hang_up_before_any_byte(client, url, plan, outcome)
            else:
                await self._send(client, url, plan, outcome)
        except httpx.TimeoutException as error:
            outcome.result = f"VIOLATION: no answer within {CLIENT_TIMEOUT} s ({error!r})"
        except httpx.HTTPError as error:
            outcome.result = f"VIOLATION: transport error {error!r}"
        outcome.elapsed = time.monotonic() - started
        assert self._changed is not None
        async with self._changed:
            self.completed += 1
            self._changed.notify_all()
        return outcome

    async def _send(self, client: httpx.AsyncClient, url: str, plan: Plan,
                    outcome: Outcome) -> None:
        async with client.stream("POST", url, json=plan.body()) as reply:
            outcome.status = reply.status_code
            outcome.raw = str(reply.headers).encode()
            if reply.status_code != 200:
                raw = await reply.aread()
                outcome.raw += raw
                _judge_error(plan, reply.status_code, raw, outcome)
                return
            if plan.hangs_up == "after_first_piece":
                collected = []
                async for line in reply.aiter_lines():
                    collected.append(line)
                    if _first_piece(plan.front, line):
                        outcome.result = "hung_up"
                        return  # leaving the block closes the connection mid-stream
                raw = ("\n".join(collected) + "\n").encode()
                if plan.front == "openai":
                    raw = ("\n\n".join(c for c in collected if c) + "\n\n").encode()
            else:
                raw = await reply.aread()
        outcome.raw += raw
        if plan.front == "openai":
            if plan.stream:
                _judge_openai_stream(raw, outcome)
            else:
                _judge_openai_json(raw, outcome)
        else:
            _judge_ollama(raw, outcome, plan.stream)

    async def _hang_up_before_any_byte(self, client: httpx.AsyncClient, url: str, plan: Plan,
                                       outcome: Outcome) -> None:
        """Send the request, wait until the local model is generating for it, hang up."""
        event = self.backend.first_token[plan.text]
        request = asyncio.ensure_future(self._send(client, url, plan, Outcome(plan)))
        waited = asyncio.ensure_future(asyncio.to_thread(event.wait, 20.0))
        await asyncio.wait([request, waited], return_when=asyncio.FIRST_COMPLETED)
        if request.done():  # answered before the local model started: no hang-up to test
            waited.cancel()
            await request
            outcome.result = "answer"
            return
        request.cancel()  # closes the connection
        with contextlib.suppress(asyncio.CancelledError):
            await request
        await waited
        outcome.result = "hung_up"

    async def run(self, plans: list[Plan], faults: Any = None) -> list[Outcome]:
        self._changed = asyncio.Condition()
        self.completed = 0
        limit = asyncio.Semaphore(CONCURRENCY)
        limits = httpx.Limits(max_connections=CONCURRENCY * 4)
        timeout = httpx.Timeout(CLIENT_TIMEOUT, connect=10.0)
        async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
            async def gated(plan: Plan) -> Outcome:
                async with limit:
                    return await self._one(client, plan)

            tasks = [asyncio.ensure_future(gated(plan)) for plan in plans]
            fault_task = asyncio.ensure_future(faults(self)) if faults is not None else None
            outcomes = list(await asyncio.gather(*tasks))
            if fault_task is not None:
                await fault_task
        return outcomes


def _wait_for(predicate: Any, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return bool(predicate())


def _get(url: str) -> httpx.Response | None:
    try:
        return httpx.get(url, timeout=10)
    except httpx.HTTPError:
        return None


def _ready(url: str) -> bool:
    reply = _get(url + "/readyz")
    return reply is not None and reply.status_code == 200


def _stats(url: str) -> dict[str, Any]:
    reply = httpx.get(url + "/v1/routing/stats", timeout=10)
    assert reply.status_code == 200, reply.text
    return dict(reply.json())


# ---------------------------------------------------------------------------------------------
# The test
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def persistent_redis() -> Iterator[list[PersistentRedis]]:
    """A persistent redis-server; the list holds the current process (replaced on restart)."""
    with tempfile.TemporaryDirectory(prefix="confidence-router-chaos-redis-") as data:
        current = [start_or_skip(PersistentRedis(Path(data)))]
        yield current
        for server in current:
            if server.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(server.pid, signal.SIGCONT)
            server.stop()


def test_chaos_two_proxies_sharing_redis_under_faults(
    make_proxy, ollama_server, bedrock_server, persistent_redis
):
    from confidence_router.costs import PriceTable
    from confidence_router.redis_state import RedisCloudBudget, RedisRoutingStats, redis_client

    backend = ChaosBackend()
    ollama_server.backend = backend
    _script(backend, bedrock_server)
    redis_url = persistent_redis[0].url
    billed_each = PriceTable().cost_of({"input_tokens": CLOUD_IN, "output_tokens": CLOUD_OUT},
                                       SONNET)
    assert billed_each
    cap = 16 * billed_each  # fewer than the escalations asked for: the cap bites
    config = ProxyConfig(budget_usd=cap, redis_url=redis_url, redis_prefix="chaos",
                         target_rate=0.4, timeout_s=20.0)
    env = {"CONFIDENCE_ROUTER_LOCAL_TIMEOUT": str(LOCAL_TIMEOUT), "CONFIDENCE_ROUTER_CLOUD_TIMEOUT": str(CLOUD_TIMEOUT)}
    proxies = [make_proxy(config=config, **env), make_proxy(config=config, **env)]
    urls = [p.url for p in proxies]
    chaos = Chaos(urls, backend)
    rng = random.Random(SEED)
    plans = _plans(rng, N_CHAOS, "chaos", KINDS)
    injected: list[str] = []

    async def faults(run: Chaos) -> None:
        server = persistent_redis[0]
        await run.completed_at_least(N_CHAOS // 5)
        os.kill(server.pid, signal.SIGSTOP)
        injected.append(f"SIGSTOP at {run.completed}")
        await run.completed_at_least(N_CHAOS // 5 + 8)
        os.kill(server.pid, signal.SIGCONT)
        injected.append(f"SIGCONT at {run.completed}")
        await run.completed_at_least(N_CHAOS // 2)
        os.kill(server.pid, signal.SIGKILL)
        await asyncio.to_thread(server.stop)  # reaps it; the data directory stays
        injected.append(f"SIGKILL at {run.completed}")
        await run.completed_at_least(N_CHAOS // 2 + 8)
        restarted = PersistentRedis(server.data_dir, port=server.port)
        persistent_redis[0] = restarted
        await asyncio.to_thread(restarted.start)
        injected.append(f"restarted at {run.completed}")

    started = time.monotonic()
    outcomes = asyncio.run(chaos.run(plans, faults))
    chaos_s = time.monotonic() - started
    assert len(injected) == 4, injected

    # 1. Every request got a well-formed answer in bounded time.
    violations = [(o.plan, o.status, o.result) for o in outcomes if not o.ok]
    assert violations == [], violations
    assert max(o.elapsed for o in outcomes) < CLIENT_TIMEOUT
    # No answer tells the client where the models or Redis live (error messages and routing
    # records used to quote botocore's "endpoint URL: http://..." and redis's host:port).
    internal = [ollama_server.url.split("//")[1], bedrock_server.url.split("//")[1],
                f"{persistent_redis[0].host}:{persistent_redis[0].port}"]
    leaks = [(o.plan, address) for o in outcomes for address in internal
             if address.encode() in o.raw]
    assert leaks == [], leaks[:5]
    by_kind: dict[str, Counter[str]] = defaultdict(Counter)
    for o in outcomes:
        by_kind[o.plan.kind][f"{o.status}:{o.result}:{o.decision}:{o.reason or str(o.error)[:60]}"] += 1
    for o in outcomes:
        if o.plan.kind == "blank":
            assert o.status == 400 and o.result == "http_error", o
        if o.plan.kind in ("lok", "img", "tools", "toolres"):  # no fault on their path
            assert (o.status, o.result) == (200, "answer"), o
    assert backend.cut_streams > 0
    reached_cloud = {k for k in KINDS for r in bedrock_server.requests
                     if f"{k} request" in r["last_user_text"]}
    assert {"cok", "cstory", "cthr", "c500", "chang", "ccut", "cnet"} <= reached_cloud, (
        reached_cloud)

    # 2. Redis is back: both proxies are ready again.
    assert _wait_for(lambda: all(_ready(u) for u in urls), timeout=20), [
        _get(u + "/readyz") for u in urls]

    # 3. A client that hung up stopped the upstream generation.
    assert _wait_for(lambda: backend.in_flight == 0, timeout=10), (
        backend.in_flight, backend.generated_tokens)
    hung_up_local = [o.plan.text for o in outcomes
                     if o.plan.kind == "lstory" and o.result == "hung_up"]
    assert hung_up_local
    # Left running, each would make ~LOCAL_TIMEOUT / 0.05 tokens before the router's limit.
    assert {t: backend.tokens_for[t] for t in hung_up_local
            if backend.tokens_for[t] >= LONG_PIECES // 4} == {}, backend.tokens_for
    hung_up_cloud = sum(1 for o in outcomes if o.plan.kind == "cstory" and o.result == "hung_up")
    assert hung_up_cloud > 0
    full_cloud_streams = sum(1 for r in bedrock_server.requests if "cstory" in r["last_user_text"])
    assert _wait_for(lambda: _steady(lambda: bedrock_server.sent_pieces), timeout=10)
    short = sum(1 for r in bedrock_server.requests if "cstory" not in r["last_user_text"]) * 8
    story_pieces = bedrock_server.sent_pieces - short
    assert story_pieces < max(1, full_cloud_streams) * LONG_PIECES // 2, (
        story_pieces, full_cloud_streams, hung_up_cloud)

    # 4. The shared budget cap held against what the cloud received and would have billed.
    received = bedrock_server.requests
    billed = [r for r in received if not any(k in r["last_user_text"] for k in UNBILLED)]
    assert len(billed) * billed_each <= cap + 1e-12, (len(billed), cap / billed_each)
    client = redis_client(persistent_redis[0].url)
    budget = RedisCloudBudget(client, cap, prefix="chaos").snapshot()
    assert budget["spent_usd"] + budget["reserved_usd"] <= cap + 1e-12, budget
    assert budget["denied"] > 0, "the cap was never reached: the check above proves nothing"
    stats_after_chaos = RedisRoutingStats(client, prefix="chaos").snapshot()
    routed = [o for o in outcomes if o.plan.kind != "blank"]
    assert stats_after_chaos["calls"] <= len(routed), stats_after_chaos

    # 5. With Redis back, the shared stats count exactly what the proxies serve.
    calm_kinds = {k: KINDS[k] for k in ("lok", "cok", "img", "tools", "toolres")}
    calm = _plans(random.Random(SEED + 1), N_CALM, "calm", calm_kinds)
    before = RedisRoutingStats(client, prefix="chaos").snapshot()
    calm_outcomes = asyncio.run(Chaos(urls, backend).run(calm))
    assert [(o.plan, o.result) for o in calm_outcomes if o.result != "answer"] == []
    after = _wait_until_counted(client, before["calls"] + N_CALM)
    decisions = Counter(o.decision for o in calm_outcomes)
    reasons = Counter(o.reason for o in calm_outcomes)
    assert after["calls"] - before["calls"] == N_CALM
    assert after["local"] - before["local"] == decisions["local"]
    assert after["cloud"] - before["cloud"] == decisions["cloud"]
    for reason, n in reasons.items():
        assert after["by_reason"].get(reason, 0) - before["by_reason"].get(reason, 0) == n, (
            reason, before["by_reason"], after["by_reason"])
    for url in urls:  # each proxy reports the shared numbers
        assert _stats(url)["stats"]["calls"] == after["calls"]

    # 6. Both proxies are healthy and serve a normal request.
    for i, url in enumerate(urls):
        assert httpx.get(url + "/healthz", timeout=10).status_code == 200
        reply = httpx.post(url + "/v1/chat/completions", timeout=30, json={
            "model": "m", "messages": [{"role": "user", "content": f"lok final {i}"}]})
        assert reply.status_code == 200, reply.text
        assert reply.json()["choices"][0]["message"]["content"] == " kept locally"
    print(f"\nchaos seed={SEED} run={chaos_s:.1f}s faults={injected} "
          f"cloud_requests={len(received)} billed={len(billed)} budget={budget}")
    for kind in sorted(by_kind):
        print(f"  {kind:8} {dict(by_kind[kind])}")


def _steady(read: Any, pause: float = 0.3) -> bool:
    first = read()
    time.sleep(pause)
    return bool(read() == first)


def _wait_until_counted(client: Any, calls: int) -> dict[str, Any]:
    from confidence_router.redis_state import RedisRoutingStats

    stats = RedisRoutingStats(client, prefix="chaos")
    _wait_for(lambda: stats.snapshot()["calls"] >= calls, timeout=10)
    return stats.snapshot()





# ---------------------------------------------------------------------------------------------
# Regression tests for what the chaos run found
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("front", "stream"), [("openai", False), ("openai", True),
                                               ("ollama", False), ("ollama", True)])
def test_client_hanging_up_before_any_byte_stops_the_local_generation(
    make_proxy, ollama_server, front, stream
):
    """A client that gives up while the local model is still writing its (buffered) answer:
    the proxy used to keep the routed call running, so the local model generated the whole
    answer (or until the local time limit) for nobody. Found by the chaos run (lstory)."""
    backend = ChaosBackend()
    ollama_server.backend = backend
    backend.add_answer("lstory", [f" w{i}" for i in range(LONG_PIECES)], logprobs=CONFIDENT,
                       token_delay=0.05)
    proxy = make_proxy(CONFIDENCE_ROUTER_LOCAL_TIMEOUT=str(LOCAL_TIMEOUT))
    plan = Plan(0, "lstory", front, stream, "regression")

    async def run() -> Outcome:
        async with httpx.AsyncClient(timeout=CLIENT_TIMEOUT) as client:
            chaos = Chaos([proxy.url], backend)
            outcome = Outcome(plan)
            await chaos._hang_up_before_any_byte(client, proxy.url + plan.path, plan, outcome)
            return outcome

    assert asyncio.run(run()).result == "hung_up"
    assert _wait_for(lambda: backend.in_flight == 0, timeout=LOCAL_TIMEOUT * 3)
    # Left running, the answer goes on until the local time limit: ~LOCAL_TIMEOUT / 0.05
    # tokens (120); stopped at the hang-up, a handful.
    assert backend.tokens_for[plan.text] < LONG_PIECES // 4, backend.tokens_for
    assert len(ollama_server.requests_to("/api/chat")) == 1


class _CancelAtToken(AsyncCallbackHandler):
    """Cancels ``task`` from inside the local model's stream, as its ``at``-th token arrives:
    the moment the router's wait for that chunk is about to finish (deterministically)."""

    run_inline = True

    def __init__(self, at: int) -> None:
        self.at = at
        self.seen = 0
        self.task: asyncio.Future[Any] | None = None

    async def on_llm_new_token(self, token: str, **kwargs: Any) -> None:
        self.seen += 1
        if self.seen == self.at and self.task is not None:
            self.task.cancel()


def test_router_astream_cancelled_as_a_chunk_arrives_stops(ollama_server, ollama_chat,
                                                            bedrock_chat):
    """Found by the chaos run: a proxy client's hang-up sometimes did not stop the local
    model. A ``router.astream`` caller that cancelled its task once lost the cancellation
    when it landed as a chunk arrived (``asyncio.wait_for`` before Python 3.12, gh-86296)
    and the call ran on to the end of the answer."""
    from confidence_router import ConfidenceRoutedLLM

    backend = ChaosBackend()
    ollama_server.backend = backend
    backend.add_answer("lstory", [f" w{i}" for i in range(60)], logprobs=CONFIDENT,
                       token_delay=0.02)
    router = ConfidenceRoutedLLM(local=ollama_chat(logprobs=True, top_logprobs=3),
                                 cloud=bedrock_chat())
    handler = _CancelAtToken(3)

    async def run() -> str:
        async def call() -> list[Any]:
            return [c async for c in router.astream("lstory x", config={"callbacks": [handler]})]

        task = asyncio.ensure_future(call())
        handler.task = task
        try:
            await task
        except asyncio.CancelledError:
            return "cancelled"
        return "ran to the end"

    assert asyncio.run(run()) == "cancelled"
    assert backend.tokens_for["lstory x"] < 60, backend.tokens_for


@pytest.mark.parametrize("front", ["openai", "ollama"])
def test_upstream_errors_do_not_tell_clients_the_internal_addresses(
    make_proxy, ollama_backend, bedrock_server, front
):
    """botocore's ConnectionClosedError quotes the endpoint URL, redis's errors the server's
    host:port: the proxy sent them to clients in 502 bodies, in-stream error events and the
    routing record's ``cloud_error``. Found by the chaos run (cnet, Redis paused)."""
    ollama_backend.set_default(" dunno", logprobs=UNSURE)
    bedrock_server.drop(None)  # every cloud request: the connection closes, no response
    proxy = make_proxy()
    address = bedrock_server.url.split("//")[1]
    path = "/v1/chat/completions" if front == "openai" else "/api/chat"
    replies = []
    for stream in (False, True):
        for policy in ("raise", "local"):
            body = {"model": "m", "stream": stream, "on_cloud_error": policy,
                    "messages": [{"role": "user", "content": "q"}]}
            reply = httpx.post(proxy.url + path, json=body, timeout=30)
            replies.append((stream, policy, reply.status_code, reply.text))
    assert [r for r in replies if "cloud" not in r[3]] == []  # each one is about the cloud
    assert [r for r in replies if address in r[3]] == []
    # Not streamed: botocore's "Connection was closed ... from endpoint URL: <address>".
    assert [r for r in replies if not r[0] and "<address>" not in r[3]] == []
    assert len(bedrock_server.requests) == 4


def test_stats_on_an_unreachable_redis_warn_instead_of_logging_an_error_per_call(
    ollama_backend, ollama_chat, bedrock_chat, caplog
):
    """While Redis was paused or down in the chaos run, every request logged the router's
    'stats sink failed' ERROR with a full traceback (the calibrator and the budget only
    warn). The stats now drop the record with a warning, as the calibrator does."""
    import logging

    from confidence_router import ConfidenceRoutedLLM
    from confidence_router.redis_state import RedisRoutingStats, redis_client
    from confidence_router.testing.processes import free_port

    ollama_backend.add_answer("q", " kept", logprobs=CONFIDENT)
    client = redis_client(f"redis://127.0.0.1:{free_port()}/0", socket_connect_timeout=0.5)
    router = ConfidenceRoutedLLM(local=ollama_chat(logprobs=True, top_logprobs=3),
                                 cloud=bedrock_chat(), stats=RedisRoutingStats(client))
    with caplog.at_level(logging.WARNING, logger="confidence_router"):
        for _ in range(3):
            assert router.invoke("q").content == " kept"
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [], [r.getMessage() for r in errors]
    assert len([r for r in caplog.records if "routing stats not counted" in r.getMessage()]) == 3
