"""Latency overhead of the router over a direct ChatOllama call (local answer accepted).

Both run against the same scripted Ollama-compatible server on 127.0.0.1, interleaved so
machine noise hits both alike. Prints the median latency of each and their ratio
(target: router / direct <= 1.10), and whether importing the package pulls in heavy stacks.

    python benchmarks/overhead.py [--n 300]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

from langchain_ollama import ChatOllama

from confidence_router import ConfidenceRoutedLLM
from confidence_router.testing import OllamaCompatibleServer, ScriptedBackend

HEAVY = ("boto3", "botocore", "langchain_aws", "llama_index", "chromadb", "llama_cpp")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=300, help="calls per variant")
    args = parser.parse_args()

    backend = ScriptedBackend(default_answer="Paris is the capital of France.", default_logprob=-0.05)
    with OllamaCompatibleServer(backend) as server:
        direct = ChatOllama(model="scripted-local", base_url=server.url, logprobs=True)
        router = ConfidenceRoutedLLM(local=direct)
        question = "What is the capital of France?"
        for _ in range(20):  # warm up connections and caches
            direct.invoke(question)
            router.invoke(question)
        direct_s, router_s = [], []
        for _ in range(args.n):
            t = time.perf_counter()
            direct.invoke(question)
            direct_s.append(time.perf_counter() - t)
            t = time.perf_counter()
            message = router.invoke(question)
            router_s.append(time.perf_counter() - t)
            assert message.response_metadata["routing"]["decision"] == "local"
    d, r = statistics.median(direct_s), statistics.median(router_s)
    print(f"direct ChatOllama.invoke  median {d * 1e3:7.2f} ms  (n={args.n})")
    print(f"router.invoke (local)     median {r * 1e3:7.2f} ms  (n={args.n})")
    print(f"ratio router/direct       {r / d:7.3f}   target <= 1.10  "
          f"{'OK' if r / d <= 1.10 else 'ABOVE TARGET'}")

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
