"""Soak test: does a long-running process using the router leak?

Runs many calls of a mixed workload through the real clients (ChatOllama on the scripted
Ollama-compatible server, ChatBedrockConverse on the fake bedrock-runtime; both servers run in
a child process, as real servers do, so their threads, sockets and request logs are not
counted here): kept-local and escalated invoke, streams read to the end and abandoned after
the first chunk, ainvoke / astream (same), batch, per-call kwargs (``threshold=``,
``early_exit=True``), ``.bind(...)`` / ``.with_config(...)``, ``with_structured_output``,
local 5xx errors, cloud errors, local timeouts, and (unless ``--no-probe``) the GSA probe
with a ``KnowledgeStore`` on a chromadb PersistentClient in a temp dir that learns from
escalations (a fixed pool of questions: the store must stop growing once each is stored).

After a warm-up it measures, every ``--interval`` calls: RSS (VmRSS), tracemalloc's current
size, ``threading.active_count()``, open file descriptors, live asyncio tasks of the
long-lived event loop the async calls share, and live objects of the project's own classes
(``gc``). Prints a table per interval, the growth per 1000 calls (least-squares slope over
the measured intervals), the allocation sites that grew most, the object types that grew
most, and flags growth beyond noise:

* threads, fds, tasks: the end count (after in-flight work settles) above the warm-up count;
* our objects: more than ``--objects-noise`` per 1000 calls;
* tracemalloc: more than ``--heap-noise-kb`` KiB per 1000 calls;
* RSS: more than ``--rss-noise-kb`` KiB per 1000 calls (informational: the allocator keeps
  freed arenas, so RSS can creep while the Python heap stays flat).

    python benchmarks/soak.py [--calls 3000] [--interval 500] [--warmup 300] [--frames 1]
                              [--no-probe] [--no-tracemalloc]

``--frames 10`` groups the growing allocation sites by traceback (slower), to find a leak.

``--store-searches N`` then runs N ``KnowledgeStore.search`` calls on the probe's store alone
(a search is three Chroma operations: two counts and a query) and prints the RSS growth per
1000 searches and the store's worker threads. Each Chroma operation once ran in a thread of
its own (a soak attributed ~1.9 MB of RSS growth per 1000 calls to the thread churn); the store
now reuses a few worker threads. Measured here, 30000 searches, one run each: before
+103.8 KiB RSS per 1000 searches (0 threads between calls, 133.5 s), after +64.4 KiB (one
worker thread, the same one throughout, 94.8 s); both within this section's noise.
``--calls 0`` skips the mixed workload.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import gc
import multiprocessing
import os
import tempfile
import threading
import time
import tracemalloc
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel

# -- the servers (child process) ------------------------------------------------------------

#: Markers in the question text select the scripted behaviour on both fake servers.
LOCAL_OK, UNSURE, LOCAL_500, SLOW_LOCAL, CLOUD_FAIL, STRUCT, PROBED = (
    "LOCALOK", "UNSURE", "LOCALFAIL", "SLOWLOCAL", "CLOUDFAIL", "STRUCTQ", "PROBEDQ",
)
LOCAL_TIMEOUT_S = 0.2
SLOW_LOCAL_S = 0.6  # > LOCAL_TIMEOUT_S: the local tier times out, the call escalates


def _serve(urls: Any, stop: Any) -> None:
    from confidence_router.testing import FakeBedrockServer, OllamaCompatibleServer, ScriptedBackend

    backend = ScriptedBackend(default_answer="Paris is the capital of France.",
                              default_logprob=-0.05)
    # The GSA probe's YES/NO question (its prompt quotes the user's question) comes first.
    backend.add_probe("Are you confident you can answer", {"YES": -0.05, "NO": -3.5})
    backend.add_answer(LOCAL_OK, "Paris is the capital of France.", logprobs=-0.05)
    backend.add_answer(UNSURE, "Maybe Lyon, or perhaps somewhere else.", logprobs=-3.0)
    backend.add_answer(CLOUD_FAIL, "Maybe Lyon, or perhaps somewhere else.", logprobs=-3.0)
    backend.add_answer(PROBED, "Possibly Marseille, not sure.", logprobs=-2.5)
    backend.fail(LOCAL_500, status=500, message="scripted local failure")
    backend.add_answer(SLOW_LOCAL, "too late", logprobs=-0.05, latency=SLOW_LOCAL_S)
    backend.add_answer(STRUCT, "ok", logprobs=-0.01, tool_calls=[
        {"name": "Capital", "arguments": {"country": "France", "capital": "Paris"}}])
    with OllamaCompatibleServer(backend) as ollama, FakeBedrockServer() as bedrock:
        bedrock.fail(CLOUD_FAIL, "ValidationException")
        bedrock.set_default("Canberra is the capital of Australia.")
        urls.put((ollama.url, bedrock.url))
        while not stop.wait(1.0):  # the request logs would grow for ever otherwise
            ollama.clear_requests()
            bedrock.clear_requests()


# -- the workload ---------------------------------------------------------------------------


class Capital(BaseModel):
    """A country's capital (the structured-output schema)."""

    country: str
    capital: str


class HashingEmbeddings:
    """A LangChain ``Embeddings`` over :func:`confidence_router.testing.hashing_embedding`."""

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        from confidence_router.testing import hashing_embeddings

        return hashing_embeddings(texts)

    def embed_query(self, text: str) -> list[float]:
        from confidence_router.testing import hashing_embedding

        return hashing_embedding(text)


class Workload:
    """The routers and one call per step, cycling through every kind of call."""

    def __init__(self, ollama_url: str, bedrock_url: str, store_dir: str | None,
                 budget_window_s: float) -> None:
        from langchain_aws import ChatBedrockConverse
        from langchain_core.embeddings import Embeddings
        from langchain_ollama import ChatOllama

        from confidence_router import (
            CloudBudget,
            ConfidenceRoutedLLM,
            KnowledgeStore,
            RoutingStats,
            SelfAssessmentProbe,
        )

        local = ChatOllama(model="scripted-local", base_url=ollama_url)
        cloud = ChatBedrockConverse(
            model="us.anthropic.claude-sonnet-4-5-20250929-v1:0", region_name="us-east-1",
            endpoint_url=bedrock_url, aws_access_key_id="soak", aws_secret_access_key="soak",
            max_tokens=256, max_retries=0,
        )
        self.router = ConfidenceRoutedLLM(
            local=local, cloud=cloud, local_timeout=LOCAL_TIMEOUT_S, stats=RoutingStats(),
            budget=CloudBudget(max_usd=1_000_000.0, window_s=budget_window_s),
        )
        self.fallback = self.router.with_config(tags=["soak"])  # on_cloud_error="raise"
        self.bound = self.router.bind(threshold=0.5)
        self.structured = self.router.with_structured_output(Capital)
        self.store = None
        self.probed = None
        if store_dir is not None:
            import chromadb

            embedder = type("SoakEmbeddings", (HashingEmbeddings, Embeddings), {})()
            client = chromadb.PersistentClient(path=store_dir)
            self.store = KnowledgeStore(embedder, client=client)
            self.probed = ConfidenceRoutedLLM(
                local=local, cloud=cloud, local_timeout=LOCAL_TIMEOUT_S,
                precheck=SelfAssessmentProbe(model=local, store=self.store),
                knowledge_store=self.store, learn_from_escalations=True,
            )
        self.loop = asyncio.new_event_loop()  # one long-lived loop, as in a server
        self.errors: collections.Counter[str] = collections.Counter()
        self.steps: list[tuple[str, Callable[[int], int]]] = [
            ("invoke-local", lambda i: self._call(self.router.invoke, LOCAL_OK, i)),
            ("invoke-escalated", lambda i: self._call(self.router.invoke, UNSURE, i)),
            ("stream-full", lambda i: self._stream(UNSURE, i, abandon=False)),
            ("stream-abandoned", lambda i: self._stream(LOCAL_OK, i, abandon=True)),
            ("ainvoke", lambda i: self._run(self._ainvoke(UNSURE, i))),
            ("astream-full", lambda i: self._run(self._astream(LOCAL_OK, i, abandon=False))),
            ("astream-abandoned", lambda i: self._run(self._astream(UNSURE, i, abandon=True))),
            ("batch", self._batch),
            ("kwarg-threshold", lambda i: self._call(self.router.invoke, LOCAL_OK, i,
                                                     threshold=0.99)),
            ("kwarg-early-exit", lambda i: self._call(self.router.invoke, UNSURE, i,
                                                      early_exit=True)),
            ("bind", lambda i: self._call(self.bound.invoke, UNSURE, i)),
            ("with-config", lambda i: self._call(self.fallback.invoke, LOCAL_OK, i)),
            ("structured", lambda i: self._call(self.structured.invoke, STRUCT, i)),
            ("local-500", lambda i: self._call(self.router.invoke, LOCAL_500, i)),
            ("cloud-error", lambda i: self._call(self.router.invoke, CLOUD_FAIL, i)),
            ("local-timeout", lambda i: self._call(self.router.invoke, SLOW_LOCAL, i)),
            ("ainvoke-local-500", lambda i: self._run(self._ainvoke(LOCAL_500, i))),
            ("ainvoke-cloud-error", lambda i: self._run(self._ainvoke(CLOUD_FAIL, i))),
            # Bound per request, as the proxy and the LlamaIndex wrapper do with tools.
            ("astructured-per-call", lambda i: self._run(self._astructured(i))),
            ("abind-tools-per-call", lambda i: self._run(self._abind_tools(i))),
        ]
        if self.probed is not None:
            self.steps.append(("probe", lambda i: self._call(self.probed.invoke, PROBED,
                                                             i % 40)))
            self.steps.append(("aprobe", lambda i: self._run(self._aprobe(i % 40))))

    def step(self, i: int) -> int:
        """Run call kind ``i % len(steps)``; returns how many calls it made."""
        name, run = self.steps[i % len(self.steps)]
        try:
            return run(i)
        except Exception as error:  # noqa: BLE001 - counted; errors are part of the mix
            self.errors[f"{name}:{type(error).__name__}"] += 1
            return 1

    @staticmethod
    def _q(marker: str, i: int) -> str:
        return f"Question {i} ({marker}): what is the capital of France?"

    def _call(self, fn: Callable[..., Any], marker: str, i: int, **kwargs: Any) -> int:
        fn(self._q(marker, i), **kwargs)
        return 1

    def _stream(self, marker: str, i: int, *, abandon: bool) -> int:
        stream = self.router.stream(self._q(marker, i))
        for _chunk in stream:
            if abandon:
                break
        stream.close()
        return 1

    def _batch(self, i: int) -> int:
        self.router.batch([self._q(LOCAL_OK, i), self._q(UNSURE, i), self._q(LOCAL_500, i)],
                          return_exceptions=True)
        return 3

    def _run(self, coroutine: Any) -> int:
        return self.loop.run_until_complete(coroutine)

    async def _ainvoke(self, marker: str, i: int) -> int:
        await self.router.ainvoke(self._q(marker, i))
        return 1

    async def _astructured(self, i: int) -> int:
        await self.router.with_structured_output(Capital).ainvoke(self._q(STRUCT, i))
        return 1

    async def _abind_tools(self, i: int) -> int:
        await self.router.bind_tools([Capital]).ainvoke(self._q(STRUCT, i))
        return 1

    async def _aprobe(self, i: int) -> int:
        assert self.probed is not None
        await self.probed.ainvoke(self._q(PROBED, i))
        return 1

    async def _astream(self, marker: str, i: int, *, abandon: bool) -> int:
        stream = self.router.astream(self._q(marker, i))
        async for _chunk in stream:
            if abandon:
                break
        await stream.aclose()
        return 1

    def tasks(self) -> int:
        """Live asyncio tasks of the shared loop."""
        return len(asyncio.all_tasks(self.loop))

    def settle(self) -> None:
        """Let in-flight work end: abandoned local calls past their timeout, loop callbacks."""
        deadline = time.monotonic() + SLOW_LOCAL_S * 4
        while time.monotonic() < deadline:
            self.loop.run_until_complete(asyncio.sleep(0.05))
            # The knowledge store's workers stay between calls (reused, bounded per store):
            # not in-flight work. The threads column shows them if they ever grow.
            if not [t for t in threading.enumerate() if t.name.startswith("confidence-router")
                    and t.name != "confidence-router-chroma"]:
                break
        gc.collect()


# -- measuring ------------------------------------------------------------------------------


def rss_kb() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def fd_targets() -> collections.Counter[str]:
    """Open file descriptors by kind (``socket``, ``pipe``, ``anon_inode:[eventpoll]``, files)."""
    counts: collections.Counter[str] = collections.Counter()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        counts[target.split(":[")[0] if target.startswith(("socket:", "pipe:")) else target] += 1
    return counts


def thread_names() -> collections.Counter[str]:
    return collections.Counter(t.name.split(" (")[0] for t in threading.enumerate())


def our_objects() -> collections.Counter[str]:
    """Live objects of the project's own classes, by class name."""
    counts: collections.Counter[str] = collections.Counter()
    for obj in gc.get_objects():
        cls = type(obj)
        module = cls.__dict__.get("__module__", "")
        if isinstance(module, str) and module.startswith("confidence_router"):
            counts[cls.__qualname__] += 1
    return counts


def all_types() -> collections.Counter[str]:
    counts: collections.Counter[str] = collections.Counter()
    for obj in gc.get_objects():
        cls = type(obj)
        counts[f"{getattr(cls, '__module__', '?')}.{cls.__qualname__}"] += 1
    return counts


def sample(work: Workload, calls: int) -> dict[str, float]:
    work.settle()
    return {
        "calls": calls,
        "rss_kb": rss_kb(),
        "heap_kb": tracemalloc.get_traced_memory()[0] / 1024 if tracemalloc.is_tracing() else 0,
        "threads": threading.active_count(),
        "fds": open_fds(),
        "tasks": work.tasks(),
        "ours": sum(our_objects().values()),
        "clients": sum(type(o).__name__ in ("Client", "AsyncClient") and
                       type(o).__module__.startswith("httpx") for o in gc.get_objects()),
        "gc_objects": len(gc.get_objects()),
        "store": work.store.count() if work.store is not None else 0,
    }


def slope_per_1000(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of ``ys`` over ``xs``, per 1000 ``xs``."""
    n = len(xs)
    if n < 2:
        return 0.0
    mx, my = sum(xs) / n, sum(ys) / n
    var = sum((x - mx) ** 2 for x in xs)
    return 1000 * sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var if var else 0.0


COLUMNS = ("calls", "rss_kb", "heap_kb", "threads", "fds", "tasks", "ours", "clients",
           "gc_objects", "store")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=3000, help="measured calls after warm-up")
    parser.add_argument("--warmup", type=int, default=300)
    parser.add_argument("--interval", type=int, default=500)
    parser.add_argument("--frames", type=int, default=1, help="tracemalloc traceback depth")
    parser.add_argument("--no-tracemalloc", action="store_true")
    parser.add_argument("--no-probe", action="store_true")
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--proxy", type=int, default=0, metavar="N",
                        help="also send N requests through the proxy (uvicorn on loopback)")
    parser.add_argument("--budget-window", type=float, default=60.0,
                        help="the CloudBudget's window_s: it keeps one entry per escalation "
                        "for that long (shorter than the run, so its plateau shows)")
    parser.add_argument("--store-searches", type=int, default=0, metavar="N",
                        help="also run N KnowledgeStore.search calls on the probe's store")
    parser.add_argument("--rss-noise-kb", type=float, default=1024.0)
    parser.add_argument("--heap-noise-kb", type=float, default=100.0)
    parser.add_argument("--objects-noise", type=float, default=5.0)
    args = parser.parse_args()
    for name, value in (("AWS_EC2_METADATA_DISABLED", "true"), ("NO_PROXY", "127.0.0.1"),
                        ("ANONYMIZED_TELEMETRY", "False")):
        os.environ.setdefault(name, value)

    context = multiprocessing.get_context("spawn")
    urls, stop = context.Queue(), context.Event()
    server = context.Process(target=_serve, args=(urls, stop), daemon=True)
    server.start()
    tmp = tempfile.TemporaryDirectory(prefix="soak-")
    try:
        ollama_url, bedrock_url = urls.get(timeout=60)
        work = Workload(ollama_url, bedrock_url,
                        None if args.no_probe else os.path.join(tmp.name, "kb"),
                        args.budget_window)
        if args.calls > 0:
            run(work, args)
        if args.store_searches:
            run_store(work, args)
        if args.proxy:
            run_proxy(work, args)
    finally:
        stop.set()
        server.join(10)
        tmp.cleanup()


def run(work: Workload, args: argparse.Namespace) -> None:
    print(f"{len(work.steps)} kinds of call: {', '.join(name for name, _ in work.steps)}")
    i = calls = 0
    while calls < args.warmup:
        calls += work.step(i)
        i += 1
    if not args.no_tracemalloc:
        tracemalloc.start(args.frames)
    base_calls = calls
    samples = [sample(work, 0)]
    types_before = all_types()
    ours_before = our_objects()
    fds_before, threads_before = fd_targets(), thread_names()
    snap_before = tracemalloc.take_snapshot() if tracemalloc.is_tracing() else None
    print(f"warm-up: {base_calls} calls; then measuring {args.calls} calls")
    print("  ".join(f"{c:>10}" for c in COLUMNS))
    print("  ".join(f"{samples[0][c]:>10.0f}" for c in COLUMNS))
    next_mark = args.interval
    t0 = time.perf_counter()
    while calls - base_calls < args.calls:
        calls += work.step(i)
        i += 1
        if calls - base_calls >= next_mark:
            samples.append(sample(work, calls - base_calls))
            print("  ".join(f"{samples[-1][c]:>10.0f}" for c in COLUMNS), flush=True)
            next_mark += args.interval
    wall = time.perf_counter() - t0
    if samples[-1]["calls"] != calls - base_calls:
        samples.append(sample(work, calls - base_calls))
    snap_after = tracemalloc.take_snapshot() if tracemalloc.is_tracing() else None
    types_after, ours_after = all_types(), our_objects()
    fds_after, threads_after = fd_targets(), thread_names()
    print(f"\n{calls - base_calls} calls in {wall:.1f} s; errors by kind: {dict(work.errors)}")

    xs = [s["calls"] for s in samples]
    slopes = {c: slope_per_1000(xs, [s[c] for s in samples]) for c in COLUMNS[1:]}
    print("growth per 1000 calls: " + ", ".join(f"{c} {v:+.1f}" for c, v in slopes.items()))
    first, last = samples[0], samples[-1]
    flags = []
    for c in ("threads", "fds", "tasks", "clients"):
        if last[c] > first[c]:
            flags.append(f"{c}: {first[c]:.0f} after warm-up, {last[c]:.0f} at the end")
    if slopes["ours"] > args.objects_noise:
        flags.append(f"our objects: {slopes['ours']:+.1f} per 1000 calls")
    if tracemalloc.is_tracing() and slopes["heap_kb"] > args.heap_noise_kb:
        flags.append(f"tracemalloc: {slopes['heap_kb']:+.1f} KiB per 1000 calls")
    if slopes["rss_kb"] > args.rss_noise_kb:
        flags.append(f"RSS: {slopes['rss_kb']:+.1f} KiB per 1000 calls")

    for what, before, after in (("fds", fds_before, fds_after),
                                ("threads", threads_before, threads_after)):
        changed = {k: after[k] - before[k] for k in after | before if after[k] != before[k]}
        print(f"{what} that changed: {changed or 'none'}")
    grown = [(k, ours_after[k] - ours_before[k]) for k in ours_after | ours_before
             if ours_after[k] != ours_before[k]]
    print("\nour objects that changed (after - before warm-up end): "
          + (", ".join(f"{k} {d:+d}" for k, d in sorted(grown, key=lambda kv: -abs(kv[1])))
             or "none"))
    top_types = sorted(((types_after[k] - types_before[k], k) for k in types_after),
                       reverse=True)[: args.top]
    print("types that grew most: " + ", ".join(f"{k} {d:+d}" for d, k in top_types if d > 0))
    if snap_before is not None and snap_after is not None:
        key = "traceback" if args.frames > 1 else "lineno"
        filters = [tracemalloc.Filter(False, tracemalloc.__file__),
                   tracemalloc.Filter(False, "<frozen importlib._bootstrap*>")]
        diff = snap_after.filter_traces(filters).compare_to(snap_before.filter_traces(filters),
                                                             key)
        print(f"\nallocation sites that grew most ({key}):")
        for stat in diff[: args.top]:
            if stat.size_diff <= 0:
                continue
            print(f"  {stat.size_diff / 1024:+8.1f} KiB {stat.count_diff:+6d} blocks  "
                  f"{stat.traceback.format()[-1].strip() if key == 'lineno' else ''}")
            if key == "traceback":
                for line in stat.traceback.format(limit=args.frames):
                    print("      " + line)
    print("\nFLAGGED: " + ("; ".join(flags) if flags else "nothing beyond noise"))


# -- the knowledge store alone ------------------------------------------------------------


def _store_threads() -> int:
    return sum(t.name.startswith("confidence-router-chroma") for t in threading.enumerate())


def run_store(work: Workload, args: argparse.Namespace) -> None:
    """``args.store_searches`` searches on the probe's store (PersistentClient, default
    timeout, so every Chroma operation goes through the store's worker threads)."""
    store = work.store
    if store is None:
        print("\nstore: skipped (--no-probe)")
        return
    for i in range(40):  # the probe's pool of questions, if the mixed run did not add them
        store.add(Workload._q(PROBED, i), f"Answer {i}.")
    for i in range(200):  # warm-up: Chroma's caches, the allocator's arenas
        store.search(Workload._q(PROBED, i % 40), k=3)
    gc.collect()
    interval = max(1, args.store_searches // 5)
    print(f"\nstore: {args.store_searches} KnowledgeStore.search calls (3 Chroma operations "
          "each)")
    columns = ("searches", "rss_kb", "threads", "store_threads")
    print("  ".join(f"{c:>13}" for c in columns))
    rows: list[dict[str, float]] = []
    thread_ids: set[int] = set()
    t0 = time.perf_counter()
    for n in range(args.store_searches + 1):
        if n % interval == 0:
            gc.collect()
            row = {"searches": n, "rss_kb": rss_kb(), "threads": threading.active_count(),
                   "store_threads": _store_threads()}
            rows.append(row)
            thread_ids.update(t.ident or 0 for t in threading.enumerate()
                              if t.name.startswith("confidence-router-chroma"))
            print("  ".join(f"{row[c]:>13.0f}" for c in columns), flush=True)
        if n < args.store_searches:
            store.search(Workload._q(PROBED, n % 40), k=3)
    wall = time.perf_counter() - t0
    xs = [r["searches"] for r in rows]
    print(f"{args.store_searches} searches in {wall:.1f} s; distinct store worker threads "
          f"seen at the samples: {len(thread_ids)}")
    print("store growth per 1000 searches: " + ", ".join(
        f"{c} {slope_per_1000(xs, [r[c] for r in rows]):+.1f}" for c in columns[1:]))


# -- the proxy ------------------------------------------------------------------------------

CAPITAL_TOOL = {"type": "function", "function": {
    "name": "Capital", "description": "A country's capital.",
    "parameters": {"type": "object", "properties": {"country": {"type": "string"},
                                                     "capital": {"type": "string"}},
                   "required": ["country", "capital"]}}}


def _proxy_request(client: Any, i: int) -> None:
    """One request of the proxy's mix: plain, tools, JSON schema, streamed, Ollama front."""
    kind = i % 6
    marker = (LOCAL_OK, UNSURE, STRUCT, STRUCT, LOCAL_OK, UNSURE)[kind]
    messages = [{"role": "user", "content": Workload._q(marker, i)}]
    body: dict[str, Any] = {"model": "confidence-router", "messages": messages}
    if kind == 2:
        body["tools"] = [CAPITAL_TOOL]
    elif kind == 3:
        body["response_format"] = {"type": "json_schema", "json_schema": {
            "name": "Capital", "schema": CAPITAL_TOOL["function"]["parameters"]}}
    if kind == 5:
        response = client.post("/api/chat", json={**body, "stream": False})
    elif kind == 4:
        with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
            for _line in r.iter_lines():
                pass
        return
    else:
        response = client.post("/v1/chat/completions", json=body)
    response.raise_for_status()


def run_proxy(work: Workload, args: argparse.Namespace) -> None:
    """``args.proxy`` requests through the proxy app served by uvicorn in a thread of this
    process (one long-lived event loop, as in production)."""
    import httpx
    import uvicorn

    from confidence_router.proxy import create_app
    from confidence_router.proxy.config import ProxyConfig

    app = create_app(work.router, config=ProxyConfig())
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning",
                                           lifespan="off"))
    thread = threading.Thread(target=server.run, name="soak-uvicorn", daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    interval = max(1, args.proxy // 5)
    print(f"\nproxy: {args.proxy} requests (plain, tools, json_schema, streamed, Ollama front)")
    columns = ("requests", "rss_kb", "threads", "fds", "ours", "clients", "gc_objects")
    print("  ".join(f"{c:>10}" for c in columns))
    errors: collections.Counter[str] = collections.Counter()
    rows = []
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
        for i in range(args.proxy + 30):
            try:
                _proxy_request(client, i)
            except Exception as error:  # noqa: BLE001 - counted
                errors[type(error).__name__] += 1
            n = i + 1 - 30  # the first 30 are the warm-up
            if n >= 0 and n % interval == 0:
                row = sample(work, n)
                row["requests"] = n
                rows.append(row)
                print("  ".join(f"{row[c]:>10.0f}" for c in columns), flush=True)
    server.should_exit = True
    thread.join(10)
    xs = [r["requests"] for r in rows]
    print(f"proxy errors: {dict(errors)}")
    print("proxy growth per 1000 requests: " + ", ".join(
        f"{c} {slope_per_1000(xs, [r[c] for r in rows]):+.1f}" for c in columns[1:]))


if __name__ == "__main__":
    main()
