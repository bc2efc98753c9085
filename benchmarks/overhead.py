"""Latency overhead of the router over a direct ChatOllama call (local answer accepted).

Both run against the same scripted Ollama-compatible server on 127.0.0.1, interleaved so
machine noise hits both alike. The server runs in its own process, as a real Ollama does: in
the client's process its threads would compete with the client for the GIL and inflate every
client-side microsecond (``--in-process`` measures that set-up too). For each scripted answer latency (default: 0 ms, i.e. pure
client + HTTP overhead, and 20 ms, faster than any real local model), prints the median latency
of each, the absolute overhead and the ratios to the direct call — of the router and of a bare
pass-through ``BaseChatModel`` (LangChain's own floor for any wrapper). Target: the router's
ratio within 5% of the bare wrapper's, judged on the median over rounds of the ratio within a
round (in each round the three variants take turns call by call, in rotating order, so a slow
stretch of this shared machine hits all three alike and cancels in the ratio).
Then whether importing the package pulls in heavy stacks.

    python benchmarks/overhead.py [--n 300] [--latencies 0,0.02] [--in-process]
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

from langchain_core.language_models import BaseChatModel
from langchain_core.outputs import ChatGeneration, ChatResult
from langchain_ollama import ChatOllama

from confidence_router import ConfidenceRoutedLLM
from confidence_router.testing import OllamaCompatibleServer, ScriptedBackend

HEAVY = ("boto3", "botocore", "langchain_aws", "llama_index", "chromadb", "llama_cpp")


class PassThrough(BaseChatModel):
    """The floor: a LangChain chat model that only delegates (no routing logic at all)."""

    inner: Any

    @property
    def _llm_type(self) -> str:
        return "pass-through"

    def _generate(self, messages, stop=None, run_manager=None, **kwargs):  # type: ignore[no-untyped-def]
        return ChatResult(generations=[ChatGeneration(message=self.inner.invoke(messages))])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=300, help="calls per variant")
    parser.add_argument("--latencies", default="0,0.02",
                        help="scripted answer latencies in seconds, comma-separated")
    parser.add_argument("--in-process", action="store_true",
                        help="serve from a thread of this process instead of a child process")
    args = parser.parse_args()
    for latency in (float(x) for x in args.latencies.split(",")):
        measure(args.n, latency, in_process=args.in_process)
    report_imports()


def _scripted_server(latency: float) -> OllamaCompatibleServer:
    backend = ScriptedBackend(default_answer="Paris is the capital of France.",
                              default_logprob=-0.05)
    backend.delay(None, latency)
    return OllamaCompatibleServer(backend)


def _serve(latency: float, urls: Any, stop: Any) -> None:
    with _scripted_server(latency) as server:
        urls.put(server.url)
        stop.wait()


@contextlib.contextmanager
def scripted_server_url(latency: float, *, in_process: bool) -> Iterator[str]:
    """URL of a scripted Ollama-compatible server, in a child process unless ``in_process``."""
    if in_process:
        with _scripted_server(latency) as server:
            yield server.url
        return
    context = multiprocessing.get_context("spawn")
    urls, stop = context.Queue(), context.Event()
    process = context.Process(target=_serve, args=(latency, urls, stop), daemon=True)
    process.start()
    try:
        yield urls.get(timeout=60)
    finally:
        stop.set()
        process.join(10)


def measure(n: int, latency: float, *, in_process: bool = False, batch: int = 10) -> None:
    """Time ``n`` calls of each variant, in interleaved batches of ``batch`` calls."""
    with scripted_server_url(latency, in_process=in_process) as url:
        direct = ChatOllama(model="scripted-local", base_url=url, logprobs=True)
        router = ConfidenceRoutedLLM(local=direct)
        floor = PassThrough(inner=direct)
        question = "What is the capital of France?"
        for _ in range(20):  # warm up connections and caches
            direct.invoke(question)
            floor.invoke(question)
            router.invoke(question)
        # Mean per-call time of each variant per round. Within a round the variants take turns
        # call by call (in an order rotated every step), so a burst of load from other
        # processes on this shared machine hits all three alike rather than one variant's batch.
        times: dict[str, list[float]] = {"direct": [], "floor": [], "router": []}
        variants = [("direct", direct), ("floor", floor), ("router", router)]
        clock = time.perf_counter
        for round_ in range(max(1, n // batch)):
            spent = dict.fromkeys(times, 0.0)
            for step in range(batch):
                # Rotate the order: no variant always runs right after another.
                shift = (round_ + step) % len(variants)
                for name, model in variants[shift:] + variants[:shift]:
                    t = clock()
                    message = model.invoke(question)
                    spent[name] += clock() - t
                    if model is router:
                        assert message.response_metadata["routing"]["decision"] == "local"
            for name, total in spent.items():
                times[name].append(total / batch)
    where = "in-process server" if in_process else "server in a child process"
    rounds = len(times["router"])
    print(f"scripted latency {latency * 1e3:.0f} ms, {where}, {rounds} rounds of {batch} calls "
          "per variant:")
    d, f, r = (statistics.median(times[k]) for k in ("direct", "floor", "router"))
    print(f"  median per call: direct ChatOllama.invoke {d * 1e3:.2f} ms, bare pass-through "
          f"wrapper {f * 1e3:.2f} ms, router {r * 1e3:.2f} ms (router overhead beyond the "
          f"wrapper {(r - f) * 1e3:+.2f} ms)")
    # Paired per round: a slow stretch of the shared machine hits a round's three batches
    # alike, so the ratio within a round cancels it; the median over rounds, with its
    # interquartile range, is the figure (a ratio of overall medians mixes different rounds).
    for label, num, den in (("wrapper / direct", "floor", "direct"),
                            ("router / direct", "router", "direct"),
                            ("router / wrapper", "router", "floor")):
        ratios = sorted(a / b for a, b in zip(times[num], times[den]))
        q1, med, q3 = (ratios[int(p * (len(ratios) - 1))] for p in (0.25, 0.5, 0.75))
        target = ""
        if num == "router" and den == "floor":
            target = f" (target <= 1.05: {'OK' if med <= 1.05 else 'ABOVE TARGET'})"
        print(f"  {label}: median of paired ratios {med:.3f} [IQR {q1:.3f}-{q3:.3f}]{target}")


def report_imports() -> None:
    out = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "import confidence_router"],
        capture_output=True, text=True, check=True,
    ).stderr
    loaded = sorted({line.split("|")[-1].strip().split(".")[0] for line in out.splitlines()
                     if "|" in line} & set(HEAVY))
    total_us = max(int(line.split("|")[1]) for line in out.splitlines()
                   if "|" in line and line.split("|")[1].strip().isdigit())
    print(f"import confidence_router: {total_us / 1e3:.1f} ms cumulative; heavy modules "
          f"imported: {loaded or 'none'}")


if __name__ == "__main__":
    main()
