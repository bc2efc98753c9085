"""Load and fault benchmark: many concurrent requests through the router on the test bed.

Both tiers run on the project's test bed (scripted Ollama-compatible server, fake
bedrock-runtime) with injected backend latency and faults on both tiers: local 5xx errors, a
local model that *hangs* (far beyond ``local_timeout``), cloud throttling (retried), cloud
requests that time out, cloud 5xx and cloud outages, under a cloud budget cap. Prints
completed requests, errors by kind, lost requests (must be 0), what is still running after the
run (our threads and asyncio tasks: must be 0; the server's handlers of hung requests), the
budget (spent must stay <= the cap), the time to fall back after a local hang relative to
``local_timeout`` (target <= 1.10), p50/p95 latency, and the concurrency speed-up over
sequential calls on the same request mix (target: >= 6x at concurrency 8, 50 ms latency).

    python benchmarks/load.py [--requests 500] [--concurrency 8] [--latency 0.05]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import statistics
import threading
import time

from langchain_aws import ChatBedrockConverse
from langchain_ollama import ChatOllama

from confidence_router import CloudBudget, ConfidenceRoutedLLM, RetryPolicy, RoutingStats
from confidence_router.errors import CloudEscalationError, LocalModelError
from confidence_router.retry import classify_error
from confidence_router.testing import FakeBedrockServer, OllamaCompatibleServer, ScriptedBackend


def script(n: int, latency: float, ollama: ScriptedBackend, bedrock: FakeBedrockServer) -> None:
    """Give every request its own answer (to detect mixing) and its own fault, if any."""
    for i in range(n):
        q = f"q{i:04d}"
        kind = i % 20
        if kind == 0:  # local 5xx -> escalated
            ollama.fail(q, status=503, message="local overloaded")
        elif kind == 1:  # local model hangs -> cancelled at local_timeout -> escalated
            ollama.add_answer(q, f"late answer {q}", logprobs=-0.1, latency=HANG_S)
        elif kind in (2, 3, 4, 5, 6, 7, 8):  # unsure -> escalated
            ollama.add_answer(q, f"unsure answer {q}", logprobs=-3.0, latency=latency)
        else:  # confident -> kept local
            ollama.add_answer(q, f"local answer {q}", logprobs=-0.05, latency=latency)
        if kind in (2, 9):  # throttled twice, then served (retries with backoff)
            bedrock.fail(q, "ThrottlingException", times=2)
        if kind == 3:  # cloud 5xx every time -> falls back to the local answer, flagged
            bedrock.fail(q, "ServiceUnavailableException")
        if kind == 0 and i % 40 == 0:  # local AND cloud down -> an error the caller sees
            bedrock.fail(q, "InternalServerException")
        if kind == 4:  # the cloud hangs past cloud_timeout (may be billed: counts as spent)
            bedrock.add_answer(q, f"late cloud answer {q}", latency=CLOUD_TIMEOUT_S * 4)
        bedrock.add_answer(q, f"cloud answer {q}", latency=latency)


HANG_S = 30.0
LOCAL_TIMEOUT_S = 0.5
CLOUD_TIMEOUT_S = 0.5
BUDGET_USD = 0.2  # binds: about half of what the escalations would cost


def build(ollama_url: str, bedrock_url: str) -> ConfidenceRoutedLLM:
    local = ChatOllama(model="scripted-local", base_url=ollama_url)
    cloud = ChatBedrockConverse(
        model="us.anthropic.claude-sonnet-4-5-20250929-v1:0", region_name="us-east-1",
        endpoint_url=bedrock_url, aws_access_key_id="bench", aws_secret_access_key="bench",
        max_tokens=256,
    )
    return ConfidenceRoutedLLM(
        local=local, cloud=cloud, on_cloud_error="local", local_timeout=LOCAL_TIMEOUT_S,
        cloud_timeout=CLOUD_TIMEOUT_S, budget=CloudBudget(max_usd=BUDGET_USD),
        cloud_retry=RetryPolicy(max_attempts=3, base_delay=0.02, max_delay=0.05, jitter=False),
        stats=RoutingStats(),
    )


def our_threads() -> set[str]:
    """Live threads, not counting the test servers' request handlers."""
    return {t.name for t in threading.enumerate() if not _is_server_handler(t)}


def server_handlers(port: int | None = None) -> int:
    """Request handlers (of the server on ``port``, or of all servers) that are *working*:
    a handler idle on a kept-alive connection, waiting for the next request line, is not."""
    import sys
    import traceback

    frames = sys._current_frames()
    count = 0
    for thread in threading.enumerate():
        if not _is_server_handler(thread):
            continue
        frame = frames.get(thread.ident)
        names = [f.name for f in traceback.extract_stack(frame)[-2:]] if frame else []
        if names == ["handle_one_request", "readinto"]:
            continue  # idle keep-alive connection
        sock = (getattr(thread, "_args", None) or (None,))[0]
        try:
            if port is None or (sock is not None and sock.getsockname()[1] == port):
                count += 1
        except OSError:
            continue
    return count


def _is_server_handler(thread: threading.Thread) -> bool:
    return getattr(getattr(thread, "_target", None), "__name__", "") == "process_request_thread"


def outcome(question: str, result: object) -> str:
    if isinstance(result, BaseException):
        if isinstance(result, (CloudEscalationError, LocalModelError)):
            cause = result.__cause__ or result
            return f"error:{type(result).__name__}:{classify_error(cause).value}"
        return f"error:{type(result).__name__}"
    text = getattr(result, "text", None)
    if not isinstance(text, str) or question not in text:
        return "lost"  # no answer, or somebody else's answer
    return "ok:" + result.response_metadata["routing"]["reason"]


async def run_concurrent(router: ConfidenceRoutedLLM, questions: list[str], concurrency: int):
    semaphore = asyncio.Semaphore(concurrency)
    latencies: list[float] = []

    async def one(q: str):
        async with semaphore:
            t = time.perf_counter()
            try:
                return await router.ainvoke(q)
            except Exception as error:  # noqa: BLE001 - counted by kind below
                return error
            finally:
                latencies.append(time.perf_counter() - t)

    t0 = time.perf_counter()
    tasks_before = len(asyncio.all_tasks())
    results = await asyncio.gather(*(one(q) for q in questions))
    await asyncio.sleep(0)
    leftover_tasks = len(asyncio.all_tasks()) - tasks_before
    return results, time.perf_counter() - t0, latencies, leftover_tasks


async def run_sequential(router: ConfidenceRoutedLLM, questions: list[str]):
    t0 = time.perf_counter()
    for q in questions:
        try:
            await router.ainvoke(q)
        except Exception:  # noqa: BLE001, S110 - sequential pass measures time only
            pass
    return time.perf_counter() - t0


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, int(-(-p * len(ordered) // 1)) - 1)]  # nearest rank


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--latency", type=float, default=0.05, help="backend latency, seconds")
    parser.add_argument("--sequential", type=int, default=80, help="requests in the serial pass")
    args = parser.parse_args()
    os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")

    ollama = ScriptedBackend(default_answer=None)
    with OllamaCompatibleServer(ollama) as o_server, FakeBedrockServer() as bedrock:
        threads_before = our_threads()
        questions = [f"Question q{i:04d}?" for i in range(args.requests)]
        script(args.requests, args.latency, ollama, bedrock)
        router = build(o_server.url, bedrock.url)
        # The serial pass uses the same mix (a prefix of the same questions, rescripted).
        serial_s = asyncio.run(run_sequential(router, questions[: args.sequential]))
        ollama.reset()
        bedrock.reset()
        script(args.requests, args.latency, ollama, bedrock)
        router = build(o_server.url, bedrock.url)
        results, wall_s, latencies, leftover_tasks = asyncio.run(
            run_concurrent(router, questions, args.concurrency)
        )
        snapshot = router.stats.snapshot()
        leftover_threads = sorted(our_threads() - threads_before)
        cloud_requests = len(bedrock.requests)
        # Time to fall back after a local hang: how long the local stage took on hung queries.
        hung_local_s = [
            r.response_metadata["routing"]["latency_s"]["local"]
            for q, r in zip(questions, results)
            if int(q.split()[1][1:-1]) % 20 == 1 and not isinstance(r, BaseException)
        ]
        budget = router.budget
        # Server-side work left: close the router's kept-alive connections (idle handlers
        # waiting for a next request are not work), then count handlers still busy.
        del router
        import gc

        gc.collect()
        time.sleep(1.0)
        # A synchronous cloud call (Bedrock) timed out by the router runs on in its thread
        # until botocore's own timeout ends it: count the threads again now.
        threads_later = sorted(our_threads() - threads_before)
        handlers_left = server_handlers(o_server.port)
        cloud_handlers_left = server_handlers(bedrock.port)

    outcomes = collections.Counter(outcome(q.split()[1][:-1], r) for q, r in zip(questions, results))
    completed = sum(n for k, n in outcomes.items() if k.startswith("ok:"))
    errors = {k: n for k, n in outcomes.items() if k.startswith("error:")}
    lost = outcomes.get("lost", 0) + (args.requests - len(results))
    serial_rate = args.sequential / serial_s
    concurrent_rate = args.requests / wall_s
    print(f"requests {args.requests}, concurrency {args.concurrency}, "
          f"backend latency {args.latency * 1e3:.0f} ms")
    print(f"completed {completed}  ({', '.join(f'{k[3:]}={n}' for k, n in sorted(outcomes.items()) if k.startswith('ok:'))})")
    print(f"errors    {sum(errors.values())}  {errors or ''}")
    print(f"lost      {lost}  (must be 0)")
    print(f"latency   p50 {statistics.median(latencies) * 1e3:.0f} ms, "
          f"p95 {pct(latencies, 0.95) * 1e3:.0f} ms")
    print(f"throughput sequential {serial_rate:.1f} req/s, concurrent {concurrent_rate:.1f} req/s"
          f" -> speed-up {concurrent_rate / serial_rate:.2f}x (target >= 6x)")
    print(f"stats     calls {snapshot['calls']}, escalation rate {snapshot['escalation_rate']:.3f},"
          f" errors {snapshot['errors']}")
    print(f"after run our threads {len(leftover_threads)} {leftover_threads}, 1 s later "
          f"{len(threads_later)} (must be 0), asyncio tasks {leftover_tasks} (must be 0);"
          f" server-side work 1 s after the run: local handlers busy {handlers_left}, fake-cloud"
          f" handlers busy {cloud_handlers_left} (idle kept-alive connections not counted)")
    print(f"budget    spent ${budget.spent:.4f} of ${budget.max_usd:.2f} cap "
          f"({'OK' if budget.spent <= budget.max_usd + 1e-12 else 'EXCEEDED'}), reserved "
          f"${budget.reserved:.4f}; cloud requests sent {cloud_requests}")
    if hung_local_s:
        ratio = statistics.median(hung_local_s) / LOCAL_TIMEOUT_S
        print(f"fall-back after a local hang: median {statistics.median(hung_local_s):.3f} s, "
              f"max {max(hung_local_s):.3f} s vs local_timeout {LOCAL_TIMEOUT_S} s -> ratio "
              f"{ratio:.3f} (target <= 1.10; hang {HANG_S:.0f} s)")


if __name__ == "__main__":
    main()
