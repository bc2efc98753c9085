"""The fast local path on the embedded model: prefix cache, cheap probe, early exit.

One run on the embedded Gemma 3 270M (through the unchanged ChatOllama and the project's
Ollama-compatible server), over the same questions (TriviaQA by default), interleaved so that
machine noise hits every variant alike. For each question it runs the two-stage router's local traffic (the
GSA YES/NO probe, sent raw with its YES/NO demonstrations, then the answer) in three variants
of the backend:

* ``before``: the previous behaviour (whole prompt in one batch, no cache) with the paper's
  probe order (``gsa-v2-confidence``);
* ``cache off``: prompts in line-aligned batches, no cache (the reference for identity), with
  the probe of ``--gsa-version`` (default the cache-friendly ``gsa-v2-question-last``);
* ``cache on``: the same batches and probe with the prompt-prefix cache (the default now);
* ``cache on, 1 batch thread``: the same with prompt batches on one thread (``n_threads_batch
  =1``; the default adds a thread per core other processes leave idle, and ``before`` ran on
  one), so the cache's and the threads' shares of the speed-up show separately;

plus, with the cache on, the paper-order probe (``cache on, paper order``), then a live
early-exit stream. Prints:

* probe / answer median time ratio per variant (target <= 0.5 with the cache), and how many
  prompts each evaluated on how many batch threads;
* the answer and probe speed-up of the cache over ``before`` and over ``cache off`` (median;
  target >= 1.3x), whether every answer and probe score was identical with the cache off and
  on, and how many answers equal the ``before`` ones;
* early exit on the recorded answers, per signal: how many answers escalate, the share of their
  local decode tokens and time that early exit saves, and how many decisions it changes;
* a live check: the wall time of answers streamed with early exit (``min_logprob``), the
  stream closed at the deciding token, against the full answers;
* concurrency (``--concurrency N``): two client threads sending probe + answer for N questions
  each at the same time, cache off vs on: wall time, cache hits, and whether every answer equals
  the one-client answer (the backend serialises requests with a lock; snapshots keep both
  prompt families cached while the clients interleave).

Needs the ``embedded`` and ``eval`` extras and the questions: ``--dataset`` names a known set
(default ``triviaqa``: the data directory of the evaluation harness, e.g.
``CONFIDENCE_ROUTER_DATA_DIR``, else the packaged sample) or a JSONL file of your own. Takes ~15-30 min for 200 questions
on 2 busy cores::

    CONFIDENCE_ROUTER_DATA_DIR=/path/to/data python benchmarks/fast_path.py --n 200
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

from langchain_ollama import ChatOllama

from confidence_router.early_exit import EXACT_SIGNALS, early_exit_index, should_exit_early
from confidence_router.embedded import DEFAULT_MODEL_NAME, start_embedded_server
from confidence_router.evaluation.datasets import load_dataset
from confidence_router.gsa import GSA_V2_QUESTION_LAST_VERSION, GSA_V2_VERSION, GSA_VERSIONS
from confidence_router.policy import RoutingPolicy, decide_after_generation
from confidence_router.probe import SelfAssessmentProbe
from confidence_router.serving.llamacpp import model_variant, yes_no_template
from confidence_router.signals import SIGNAL_SCORERS, compute_signals


@dataclass
class Answer:
    """One streamed answer: token logprobs, arrival times (s after the request) and total."""

    text: str = ""
    logprobs: list[float] = field(default_factory=list)
    token_times: list[float] = field(default_factory=list)
    total_s: float = 0.0


def stream_answer(llm: ChatOllama, question: str, *, exit_rule: Any = None) -> Answer:
    """Stream one answer, timing each token; ``exit_rule(logprobs)`` may close it early."""
    result = Answer()
    start = time.perf_counter()
    stream = llm.stream(question)
    try:
        for chunk in stream:
            for entry in chunk.response_metadata.get("logprobs") or ():
                result.logprobs.append(float(entry["logprob"]))
                result.token_times.append(time.perf_counter() - start)
            result.text += chunk.text
            if exit_rule is not None and result.logprobs and exit_rule(result.logprobs):
                break
    finally:
        stream.close()  # early exit: the server stops generating
    result.total_s = time.perf_counter() - start
    return result


def escalates(signal: str, threshold: float, logprobs: list[float]) -> bool:
    policy = RoutingPolicy(threshold=threshold, signal=signal)
    return decide_after_generation(policy, compute_signals(logprobs)).escalate


def main() -> None:
    """Parse the arguments and run the sections."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dataset", default="triviaqa",
                        help="a known evaluation set (triviaqa, nq_open, wikidata) or a JSONL "
                             "file of your own questions (default triviaqa)")
    parser.add_argument("--n", type=int, default=200, help="questions")
    parser.add_argument("--offset", type=int, default=0)
    parser.add_argument("--threshold", type=float, default=0.7, help="keep-local threshold")
    parser.add_argument("--max-tokens", type=int, default=48, help="answer num_predict")
    parser.add_argument("--gsa-version", default=GSA_V2_QUESTION_LAST_VERSION,
                        choices=GSA_VERSIONS, help="probe prompt of 'cache off' and 'cache on'")
    parser.add_argument("--concurrency", type=int, default=30,
                        help="questions per client in the two-client section (0: skip)")
    args = parser.parse_args()
    if args.n > 0:
        main_section(args)
    if args.concurrency > 0:
        concurrency_section(args)


def make_probe(url: str, version: str) -> SelfAssessmentProbe:
    """The GSA probe of ``version`` for the embedded base model: YES/NO demonstrations in the
    same order around the prompt, sent to the raw variant (the template is the whole prompt)."""
    raw = ChatOllama(base_url=url, model=model_variant(DEFAULT_MODEL_NAME, "raw"))
    return SelfAssessmentProbe(model=raw, version=version,
                               message_template=yes_no_template(version))


def concurrency_section(args: argparse.Namespace) -> None:
    """Two clients at once against one backend, cache off vs on."""
    from concurrent.futures import ThreadPoolExecutor

    items = load_dataset(args.dataset, limit=2 * args.concurrency, offset=args.offset)
    halves = [items[: args.concurrency], items[args.concurrency:]]
    with start_embedded_server(max_tokens_default=args.max_tokens) as server:
        backend = server.backend
        chat = ChatOllama(base_url=server.url, model=DEFAULT_MODEL_NAME, temperature=0,
                          logprobs=True)
        probe = make_probe(server.url, args.gsa_version)
        reference = {item.question: chat.invoke(item.question).content for item in items}

        def client(part: list[Any]) -> list[tuple[str, str]]:
            out = []
            for item in part:
                probe.invoke(item.question)
                out.append((item.question, chat.invoke(item.question).content))
            return out

        print(f"\n## Two concurrent clients ({args.concurrency} probe + answer each)")
        print("| backend | wall time (s) | prompts reusing a prefix | answers as with one client |")
        print("| --- | ---: | ---: | ---: |")
        for cache in (False, True, False, True):
            backend.prefix_cache = cache
            backend.clear_prefix_cache()
            before = backend.cache_stats.requests, backend.cache_stats.hits
            start = time.perf_counter()
            with ThreadPoolExecutor(max_workers=2) as pool:
                results = [f.result() for f in [pool.submit(client, h) for h in halves]]
            wall = time.perf_counter() - start
            same = sum(got == reference[q] for r in results for q, got in r)
            requests = backend.cache_stats.requests - before[0]
            hits = backend.cache_stats.hits - before[1]
            print(f"| cache {'on' if cache else 'off'} | {wall:.1f} | {hits}/{requests} "
                  f"| {same}/{len(items)} |")


def main_section(args: argparse.Namespace) -> None:
    """Probe/answer ratio, cache speed-up, identity, early exit (simulated and live)."""
    items = load_dataset(args.dataset, limit=args.n, offset=args.offset)
    print(f"# fast path benchmark: {len(items)} questions of {args.dataset} "
          f"(from {args.offset}), embedded {DEFAULT_MODEL_NAME}")
    # Two servers: "before" has its own backend (one-batch prompts, no cache); "cache off" and
    # "cache on" share one, toggling only prefix_cache (its snapshots survive the toggle).
    print(f"# probe: {args.gsa_version} ('before': {GSA_V2_VERSION}, one-batch prompts, no cache)")
    # Four snapshot slots: answers (whose new prompts each take a slot), the probe and the
    # paper-order probe (each restored from and replacing its own snapshot).
    with start_embedded_server(max_tokens_default=args.max_tokens, prefix_slots=4) as server, \
            start_embedded_server(max_tokens_default=args.max_tokens, prefix_cache=False,
                                  prompt_batch=1024, batch_at_newlines=False,
                                  n_threads_batch=1) as before_server:
        backend = server.backend
        print(f"# model loaded in {backend.load_seconds:.2f} s, {backend._threads()} thread(s), "
              f"{backend.prefix_slots} snapshot slots")

        def clients(url: str, version: str) -> tuple[ChatOllama, SelfAssessmentProbe]:
            chat = ChatOllama(base_url=url, model=DEFAULT_MODEL_NAME, temperature=0,
                              logprobs=True, top_logprobs=1)
            return chat, make_probe(url, version)

        chat, probe = clients(server.url, args.gsa_version)
        paper_probe = make_probe(server.url, GSA_V2_VERSION)

        def live_rule(logprobs: list[float]) -> bool:
            return should_exit_early("min_logprob", args.threshold, logprobs,
                                     max_remaining_tokens=args.max_tokens - len(logprobs))

        variants = {  # name: (clients, prefix_cache, n_threads_batch)
            "before": (clients(before_server.url, GSA_V2_VERSION), False, 1),
            "cache off": ((chat, probe), False, None),
            "cache on": ((chat, probe), True, None),
            "cache on, 1 batch thread": ((chat, probe), True, 1),
        }
        threads_used: dict[str, dict[int, int]] = {name: {} for name in variants}
        probe_s: dict[str, list[float]] = {name: [] for name in variants}
        paper_probe_s: list[float] = []
        answer_s: dict[str, list[float]] = {name: [] for name in variants}
        answers: list[Answer] = []
        live: list[tuple[Answer, Answer]] = []
        mismatched_answers = mismatched_probes = same_as_before = 0
        started = time.perf_counter()
        names = list(variants)
        for index, item in enumerate(items):
            outputs: dict[str, tuple[float, Answer]] = {}
            # Rotate which variant goes first, so drifting machine load hits all alike.
            turn = index % len(names)
            for name in names[turn:] + names[:turn]:
                (variant_chat, variant_probe), cache, batch_threads = variants[name]
                backend.prefix_cache = cache
                backend.n_threads_batch = batch_threads
                counted = (before_server.backend if name == "before" else backend)
                counts_before = dict(counted.batch_thread_counts)
                score = variant_probe.invoke(item.question)
                answer = stream_answer(variant_chat, item.question)
                for threads, count in counted.batch_thread_counts.items():
                    used = threads_used[name]
                    used[threads] = used.get(threads, 0) + count - counts_before.get(threads, 0)
                probe_s[name].append(score.latency_s)
                answer_s[name].append(answer.total_s)
                outputs[name] = (score.p_yes, answer)
            (p_off, a_off), (p_on, a_on) = outputs["cache off"], outputs["cache on"]
            mismatched_probes += p_off != p_on
            mismatched_answers += (a_off.text, a_off.logprobs) != (a_on.text, a_on.logprobs)
            same_as_before += outputs["before"][1].text == a_on.text
            answers.append(a_on)
            backend.prefix_cache, backend.n_threads_batch = True, None
            paper_probe_s.append(paper_probe.invoke(item.question).latency_s)
            live.append((a_on, stream_answer(chat, item.question, exit_rule=live_rule)))
            if (index + 1) % 25 == 0:
                print(f"#   {index + 1}/{len(items)} questions, "
                      f"{time.perf_counter() - started:.0f} s", flush=True)
        stats = backend.cache_stats

    med = statistics.median
    print("\n## Probe and prefix cache (medians over the same questions)")
    print("| backend | probe (s) | answer (s) | probe / answer | prompts per batch threads |")
    print("| --- | ---: | ---: | ---: | --- |")
    for name in variants:
        p, a = med(probe_s[name]), med(answer_s[name])
        used = ", ".join(f"{n}: {c}" for n, c in sorted(threads_used[name].items()) if c)
        print(f"| {name} | {p:.3f} | {a:.3f} | {p / a:.2f} | {used} |")
    p, a = med(paper_probe_s), med(answer_s["cache on"])
    print(f"| cache on, paper order ({GSA_V2_VERSION}) | {p:.3f} | {a:.3f} | {p / a:.2f} | |")
    one = "cache on, 1 batch thread"
    print(f"\nbatch threads alone (cache on vs {one}): answers "
          f"{med(answer_s[one]) / med(answer_s['cache on']):.2f}x faster, probes "
          f"{med(probe_s[one]) / med(probe_s['cache on']):.2f}x (median)")
    print(f"cache alone ({one} vs before): answers "
          f"{med(answer_s['before']) / med(answer_s[one]):.2f}x faster (median)")
    for base in ("before", "cache off"):
        print(f"\ncache on vs {base}: answers {med(answer_s[base]) / med(answer_s['cache on']):.2f}x"
              f" faster (median; {sum(answer_s[base]) / sum(answer_s['cache on']):.2f}x in total "
              f"time), probes {med(probe_s[base]) / med(probe_s['cache on']):.2f}x (median)")
    print(f"\nidentical outputs with the cache off and on: answers "
          f"{len(items) - mismatched_answers}/{len(items)} (text and every logprob), "
          f"probe scores {len(items) - mismatched_probes}/{len(items)}; answer text equal to "
          f"'before' (one-batch prompts): {same_as_before}/{len(items)}")
    print(f"cache: {stats.hits}/{stats.requests} prompts reused a prefix "
          f"({stats.restores} from a snapshot); prompt tokens reused {stats.reused_tokens}, "
          f"evaluated {stats.evaluated_tokens} (cache-off requests included)")

    print(f"\n## Early exit on the recorded answers (threshold {args.threshold}, "
          f"num_predict {args.max_tokens})")
    print("| signal / rule | escalated | tokens saved | decode time saved | answer time saved "
          "| decisions changed |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    rules: list[tuple[str, str, Any]] = [
        ("min_logprob", "exact", lambda n, k: args.max_tokens - k),
        ("mean_logprob", "exact (true cap)", lambda n, k: args.max_tokens - k),
        ("mean_logprob", "horizon 4 tokens", lambda n, k: 4),
        ("mean_logprob", "horizon 2 tokens", lambda n, k: 2),
        # The router's default signal: its bound needs no cap (sound without one).
        ("mean_min", "bound, no cap", lambda n, k: None),
        ("mean_min", "bound, true cap", lambda n, k: args.max_tokens - k),
        ("mean_min", "horizon 2 tokens", lambda n, k: 2),
        # Exact like the minimum: the sums can only fall as tokens arrive.
        ("sum_logprob", "exact", lambda n, k: None),
        ("sum_min", "exact", lambda n, k: None),
    ]
    for signal, label, remaining in rules:
        simulate(answers, signal, label, remaining, args.threshold)
    for signal in SIGNAL_SCORERS:
        if signal not in {rule[0] for rule in rules}:
            print(f"| {signal} | - | no early-exit rule (never exits) | | | 0 |")

    print("\n## Live early exit (min_logprob): answers streamed and closed at the deciding "
          "token")
    full = [a.total_s for a, _ in live]
    early = [e.total_s for _, e in live]
    exited = [(a, e) for a, e in live if len(e.logprobs) < len(a.logprobs)]
    agree = sum(
        escalates("min_logprob", args.threshold, e.logprobs)
        == escalates("min_logprob", args.threshold, a.logprobs)
        for a, e in live
    )
    print(f"answers cut short: {len(exited)}/{len(live)}; decisions identical: "
          f"{agree}/{len(live)}")
    print(f"wall time, all answers: full {sum(full):.1f} s, with early exit {sum(early):.1f} s "
          f"({1 - sum(early) / sum(full):.0%} saved)")
    if exited:
        full_x = sum(a.total_s for a, _ in exited)
        early_x = sum(e.total_s for _, e in exited)
        print(f"wall time, answers cut short: full {full_x:.1f} s, early {early_x:.1f} s "
              f"({1 - early_x / full_x:.0%} saved)")


def simulate(answers: list[Answer], signal: str, label: str, remaining: Any,
             threshold: float) -> None:
    """Replay early exit over recorded answers; print one table row."""
    escalated = changed = 0
    tokens = saved_tokens = 0
    decode = saved_decode = total = saved_total = 0.0
    for answer in answers:
        n = len(answer.logprobs)
        if n == 0:
            continue
        exit_at = None
        for k in range(1, n + 1):
            left = remaining(n, k)  # None: no cap known
            if should_exit_early(signal, threshold, answer.logprobs[:k],
                                 max_remaining_tokens=None if left is None else max(0, left)):
                exit_at = k
                break
        full_escalates = escalates(signal, threshold, answer.logprobs)
        if exit_at is not None and not full_escalates:
            changed += 1  # would have been kept locally: early exit escalates it wrongly
        if not full_escalates:
            continue
        escalated += 1
        tokens += n
        decode += answer.total_s - answer.token_times[0]
        total += answer.total_s
        if exit_at is not None:
            saved_tokens += n - exit_at
            saved_decode += answer.total_s - answer.token_times[exit_at - 1]
            saved_total += answer.total_s - answer.token_times[exit_at - 1]
    if signal in EXACT_SIGNALS and signal != "mean_logprob":  # exact without a cap: the
        # replay must never change a decision (early_exit_index is the same replay)
        assert all(
            (early_exit_index(signal, threshold, a.logprobs) is not None)
            <= escalates(signal, threshold, a.logprobs) for a in answers if a.logprobs
        )

    def share(part: float, whole: float) -> str:
        return f"{part / whole:.0%}" if whole else "-"

    print(f"| {signal} ({label}) | {escalated}/{len(answers)} | {share(saved_tokens, tokens)} "
          f"| {share(saved_decode, decode)} | {share(saved_total, total)} | {changed} |")


if __name__ == "__main__":
    main()
