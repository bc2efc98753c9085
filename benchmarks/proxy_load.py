"""Proxy load benchmark: 1 vs 4 uvicorn workers sharing one Redis, with a budget cap and faults.

Starts a real ``redis-server``, the test bed (scripted Ollama-compatible server with a local
latency, fake bedrock-runtime), and ``confidence-router proxy --workers N`` as a subprocess
whose router is built from settings (environment variables) like ``from_settings()``. Sends
``--requests`` chat completions at ``--concurrency`` over HTTP, for N = 1 and N = 4, and prints:

* requests completed (an HTTP answer for each; 0 lost) and the status / reason breakdown,
* escalations answered by the fake cloud == K, the number the budget cap admits across all
  workers (the cap binds: far more queries want the cloud),
* the shared stats (read from one worker) against what the clients saw,
* p50 / p95 latency and throughput, and the ratio 4 workers vs 1.

Request mix (fixed per request index): 60% confident (kept local), 25% unsure (escalate),
10% local faults (HTTP 500 from the local model: escalate), 5% cloud faults (unsure, then the
cloud answers ValidationException: the flagged local answer is served, ``on_cloud_error=local``).

    python benchmarks/proxy_load.py [--requests 1000] [--concurrency 32] [--latency 0.05] [--k 50]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

from confidence_router.budget import estimate_tokens
from confidence_router.testing import FakeBedrockServer, OllamaCompatibleServer, ScriptedBackend
from confidence_router.testing.processes import RedisServerProcess, free_port

SONNET = "us.anthropic.claude-sonnet-4-5-20250929-v1:0"
# Sonnet's price per token (the built-in price table): 3 USD / 15 USD per million.
IN_PRICE, OUT_PRICE = 3e-6, 15e-6
KINDS = ("confident", "unsure", "localfail", "cloudfail")  # every name is 9 characters


def kind_of(i: int) -> str:
    slot = i % 20
    if slot < 12:
        return "confident"
    if slot < 17:
        return "unsure"
    if slot < 19:
        return "localfail"
    return "cloudfail"


def question(i: int) -> str:
    # Same length for every request, so every escalation reserves the same estimate.
    return f"{kind_of(i):>9} question number {i:05d}?"


def script(backend: ScriptedBackend, bedrock: FakeBedrockServer, latency: float,
           usage: tuple[int, int]) -> dict[str, object]:
    backend.fail("localfail", status=500, message="local model crashed")
    backend.add_answer("confident", " a confident local answer", logprobs=-0.05, latency=latency)
    backend.add_answer("unsure", " an unsure local answer", logprobs=-3.0, latency=latency)
    backend.add_answer("cloudfail", " an unsure local answer", logprobs=-3.0, latency=latency)
    bedrock.fail("cloudfail", "ValidationException")
    # Usage equal to the reservation: each escalation spends exactly what it reserved, so the
    # cap admits exactly K whatever the interleaving across workers.
    answer = bedrock.add_answer(None, "the cloud answer", latency=latency,
                                input_tokens=usage[0], output_tokens=usage[1])
    return {"cloud_answers": answer}


def settings_env(ollama_url: str, bedrock_url: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update({
        "CONFIDENCE_ROUTER_LOCAL_MODEL": "scripted-local",
        "OLLAMA_HOST": ollama_url,
        "CONFIDENCE_ROUTER_CLOUD_MODEL": SONNET,
        "CONFIDENCE_ROUTER_CLOUD_MAX_TOKENS": "256",
        "CONFIDENCE_ROUTER_BEDROCK_ENDPOINT": bedrock_url,
        "CONFIDENCE_ROUTER_ON_CLOUD_ERROR": "local",
        "AWS_REGION": "us-east-1", "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_CONFIG_FILE": "/nonexistent", "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent",
        "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost",
        "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src"),
    })
    return env


def measure_estimate(env: dict[str, str]) -> float:
    """What one escalation of a benchmark question reserves, read from a real routed call."""
    from confidence_router import ConfidenceRoutedLLM
    from confidence_router.budget import CloudBudget

    router = ConfidenceRoutedLLM.from_settings(environ=env, budget=CloudBudget(max_usd=100.0))
    message = router.invoke(question(12))  # an "unsure" question: escalated
    return float(message.response_metadata["routing"]["budget_reserved_usd"])


class Proxy:
    """``confidence-router proxy --workers N`` as a subprocess."""

    def __init__(self, workers: int, env: dict[str, str]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "confidence_router.cli", "proxy", "--port", str(self.port),
             "--workers", str(workers)],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        self.workers = workers

    def wait_ready(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        ready = 0
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"proxy exited: {self.process.stderr.read().decode()[-2000:]}")
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    ready += 1
                    if ready >= 3 * self.workers:  # give every worker time to come up
                        return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError("proxy not ready in time")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


async def load(url: str, n: int, concurrency: int) -> tuple[list[dict], float]:
    semaphore = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    results: list[dict] = []
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:

        async def one(i: int) -> None:
            async with semaphore:
                started = time.perf_counter()
                body = {"model": "m", "messages": [{"role": "user", "content": question(i)}]}
                try:
                    reply = await client.post("/v1/chat/completions", json=body)
                    status = reply.status_code
                    data = reply.json()
                except httpx.HTTPError as error:
                    status, data = f"transport:{type(error).__name__}", {}
                results.append({"i": i, "kind": kind_of(i), "status": status, "data": data,
                                "latency": time.perf_counter() - started})

        started = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(n)))
        return results, time.perf_counter() - started


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p * len(ordered)) - 1)]


def run(workers: int, args: argparse.Namespace, redis: RedisServerProcess,
        backend: ScriptedBackend, bedrock: FakeBedrockServer, base_env: dict[str, str],
        estimate: float, usage: tuple[int, int]) -> dict[str, float]:
    import redis as redis_lib

    redis_lib.Redis.from_url(redis.url).flushall()
    backend.reset()
    bedrock.reset()
    rules = script(backend, bedrock, args.latency, usage)
    cap = (args.k + 0.5) * estimate
    env = {**base_env, "CONFIDENCE_ROUTER_REDIS_URL": redis.url,
           "CONFIDENCE_ROUTER_REDIS_PREFIX": f"bench{workers}",
           "CONFIDENCE_ROUTER_BUDGET_USD": repr(cap)}
    proxy = Proxy(workers, env)
    try:
        proxy.wait_ready()
        results, wall = asyncio.run(load(proxy.url, args.requests, args.concurrency))
        shared = httpx.get(proxy.url + "/v1/routing/stats", timeout=10).json()
    finally:
        proxy.stop()

    statuses = collections.Counter(str(r["status"]) for r in results)
    reasons = collections.Counter(
        (r["data"].get("routing") or {}).get("reason") for r in results if r["status"] == 200
    )
    # An answer that belongs to no one (mixing) or a missing answer counts as lost.
    lost = args.requests - len(results) + sum(
        1 for r in results
        if r["status"] == 200 and not r["data"].get("choices", [{}])[0].get("message", {})
        .get("content")
    )
    cloud_answers = rules["cloud_answers"].calls
    cloud_requests = len(bedrock.requests)
    stats, budget = shared["stats"], shared["budget"]
    latencies = [r["latency"] for r in results]
    client_cloud = sum(1 for r in results if r["status"] == 200
                       and r["data"]["routing"]["decision"] == "cloud")
    print(f"\n== {workers} worker(s): {args.requests} requests at concurrency {args.concurrency}, "
          f"local latency {args.latency * 1000:.0f} ms ==")
    print(f"completed {len(results)}/{args.requests}, lost {lost}; statuses {dict(statuses)}")
    errors = collections.Counter(
        f"{r['kind']}:{(r['data'].get('error') or {}).get('code')}"
        for r in results if r["status"] != 200
    )
    print(f"reasons seen by clients: {dict(reasons)}; error answers by request kind: "
          f"{dict(errors)}")
    print(f"budget cap ${cap:.6f} = {args.k}.5 x ${estimate:.6f} per escalation -> K = {args.k}")
    print(f"escalations answered by the fake cloud: {cloud_answers} (== K: "
          f"{cloud_answers == args.k}); cloud requests incl. injected faults: {cloud_requests}")
    print(f"budget (shared): granted {budget['granted']}, denied {budget['denied']}, "
          f"spent ${budget['spent_usd']:.6f} <= cap: {budget['spent_usd'] <= cap + 1e-9}, "
          f"pending {budget['pending']}")
    consistent = (stats["calls"] == sum(reasons.values())
                  and stats["by_reason"] == {k: v for k, v in reasons.items()}
                  and stats["cloud"] == client_cloud)
    print(f"shared stats: calls {stats['calls']}, cloud {stats['cloud']}, escalated "
          f"{stats['escalated']}, by_reason {stats['by_reason']} -> consistent with the "
          f"clients' answers: {consistent}")
    print(f"latency p50 {percentile(latencies, 0.5) * 1000:.0f} ms, "
          f"p95 {percentile(latencies, 0.95) * 1000:.0f} ms; "
          f"throughput {args.requests / wall:.1f} req/s ({wall:.1f} s)")
    return {"throughput": args.requests / wall, "lost": lost, "k_ok": cloud_answers == args.k,
            "consistent": consistent}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--latency", type=float, default=0.05, help="scripted local latency (s)")
    parser.add_argument("--k", type=int, default=50, help="escalations the budget admits")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 4])
    args = parser.parse_args()

    backend = ScriptedBackend()
    with RedisServerProcess() as redis, OllamaCompatibleServer(backend) as ollama, \
            FakeBedrockServer() as bedrock:
        base_env = settings_env(ollama.url, bedrock.url)
        os.environ.update({k: v for k, v in base_env.items() if k.startswith(("AWS", "NO_"))})
        script(backend, bedrock, 0.0, (1, 1))
        estimate = measure_estimate(base_env)
        # The reservation is (estimated input tokens, reserved output tokens) at Sonnet's
        # prices; report exactly that usage from the fake cloud.
        input_tokens = estimate_tokens([question(12)])
        usage = (input_tokens, round((estimate - input_tokens * IN_PRICE) / OUT_PRICE))
        results = {w: run(w, args, redis, backend, bedrock, base_env, estimate, usage)
                   for w in args.workers}
    print()
    if 1 in results and 4 in results:
        print(f"throughput 4 workers vs 1: {results[4]['throughput'] / results[1]['throughput']:.2f}x"
              f" (2 shared CPU cores: the fake servers and the client run on the same cores)")
    ok = all(r["lost"] == 0 and r["k_ok"] and r["consistent"] for r in results.values())
    print("all checks passed" if ok else "SOME CHECKS FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
