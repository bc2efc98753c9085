"""GSA probe quality and cost in the paper's order vs the question-last order (embedded model).

For each question (TriviaQA by default, ``--dataset``), on the embedded Gemma 3 270M (through
the unchanged ChatOllama and the project's Ollama-compatible server, prompt-prefix cache on):
the local answer (graded against the gold answers), then the GSA v2 probe in the paper's order
(``gsa-v2-confidence`` with :data:`YES_NO_TEMPLATE`) and in the question-last order
(``gsa-v2-question-last`` with :data:`YES_NO_QUESTION_LAST_TEMPLATE`), both sent raw. Prints,
per order: AUROC of P(YES) against answer correctness, how many probe answers were read from
the YES/NO logprobs, the mean P(YES), the median probe time and prompt tokens evaluated.

Needs the ``embedded`` and ``eval`` extras and the questions: a known set in the data directory
(``CONFIDENCE_ROUTER_DATA_DIR``, else the packaged sample) or a JSONL file of your own::

    CONFIDENCE_ROUTER_DATA_DIR=/path/to/data python benchmarks/probe_order.py --n 300
"""

from __future__ import annotations

import argparse
import statistics
import warnings

from langchain_ollama import ChatOllama

from confidence_router.embedded import DEFAULT_MODEL_NAME, start_embedded_server
from confidence_router.evaluation.datasets import load_dataset
from confidence_router.evaluation.grading import is_correct
from confidence_router.evaluation.metrics import auroc, bootstrap_ci, paired_bootstrap_delta
from confidence_router.gsa import GSA_V2_QUESTION_LAST_VERSION, GSA_V2_VERSION
from confidence_router.probe import SelfAssessmentProbe
from confidence_router.serving.llamacpp import model_variant, yes_no_template


def main() -> None:
    """Parse the arguments, run the questions, print one row per probe order."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dataset", default="triviaqa",
                        help="a known evaluation set (triviaqa, nq_open, wikidata) or a JSONL "
                             "file of your own questions (default triviaqa)")
    parser.add_argument("--n", type=int, default=300, help="questions")
    parser.add_argument("--offset", type=int, default=0)
    parser.add_argument("--max-tokens", type=int, default=48, help="answer num_predict")
    args = parser.parse_args()
    items = load_dataset(args.dataset, limit=args.n, offset=args.offset)
    orders = {"paper (gsa-v2-confidence)": GSA_V2_VERSION,
              "question-last (gsa-v2-question-last)": GSA_V2_QUESTION_LAST_VERSION}
    # Three prompt families (answers, two probe orders): one snapshot each.
    with start_embedded_server(max_tokens_default=args.max_tokens, prefix_slots=3) as server:
        backend = server.backend
        chat = ChatOllama(base_url=server.url, model=DEFAULT_MODEL_NAME, temperature=0)
        raw = ChatOllama(base_url=server.url, model=model_variant(DEFAULT_MODEL_NAME, "raw"))
        probes = {name: SelfAssessmentProbe(model=raw, version=version,
                                            message_template=yes_no_template(version))
                  for name, version in orders.items()}
        labels: list[bool] = []
        scores: dict[str, list[float]] = {name: [] for name in orders}
        read: dict[str, int] = dict.fromkeys(orders, 0)
        seconds: dict[str, list[float]] = {name: [] for name in orders}
        evaluated: dict[str, list[int]] = {name: [] for name in orders}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # unreadable probe answers are counted below
            for index, item in enumerate(items):
                labels.append(is_correct(str(chat.invoke(item.question).content), item.answers))
                for name, probe in probes.items():
                    before = backend.cache_stats.evaluated_tokens
                    score = probe.invoke(item.question)
                    evaluated[name].append(backend.cache_stats.evaluated_tokens - before)
                    scores[name].append(score.p_yes)
                    read[name] += score.extraction_mode == "logprob_softmax"
                    seconds[name].append(score.latency_s)
                if (index + 1) % 50 == 0:
                    print(f"#   {index + 1}/{len(items)}", flush=True)
    print(f"# {len(items)} questions of {args.dataset} (offset {args.offset}), embedded "
          f"{DEFAULT_MODEL_NAME}; local answers correct: {sum(labels)}/{len(labels)}")
    print("| probe order | AUROC P(YES) vs correct (95% CI) | read from logprobs | mean P(YES) "
          "| probe median (s) | prompt tokens evaluated (median) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name in orders:
        ci = bootstrap_ci(labels, scores[name])
        print(f"| {name} | {auroc(labels, scores[name]):.3f} ({ci.low:.2f}-{ci.high:.2f}) "
              f"| {read[name]}/{len(items)} "
              f"| {statistics.mean(scores[name]):.3f} | {statistics.median(seconds[name]):.3f} "
              f"| {statistics.median(evaluated[name]):.0f} |")
    paper, last = (scores[name] for name in orders)
    delta = paired_bootstrap_delta(labels, last, paper)
    print(f"\nAUROC question-last minus paper: {delta.delta:+.3f} (paired bootstrap 95% CI "
          f"{delta.low:+.3f} to {delta.high:+.3f})")


if __name__ == "__main__":
    main()
