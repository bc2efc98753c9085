"""``confidence-router eval``, ``eval-report`` and ``eval-all``: thin wrappers over the modules.

Imported by :mod:`confidence_router.cli`, which lists the commands; the logic lives in
:mod:`~confidence_router.evaluation.runner`, :mod:`~confidence_router.evaluation.baseline` and
:mod:`~confidence_router.evaluation.report`.

Usage::

    # measure the signals on 1000 Wikidata completions with the embedded Gemma 3 270M
    confidence-router eval --dataset wikidata --limit 1000 --db eval-runs.sqlite
    # ... or on a real Ollama model
    confidence-router eval --dataset triviaqa --ollama-url http://127.0.0.1:11434 \\
        --model qwen2.5:7b --concurrency 2 --db eval-runs.sqlite
    # report every run in the database (first run = main dataset, baseline training set)
    confidence-router eval-report --db eval-runs.sqlite --name my-report
    # regenerate the committed report from scratch (1000 Wikidata + 1000 TriviaQA, embedded)
    confidence-router eval-all --fresh

A killed ``eval`` (or ``eval-all``) resumes when the same command is run again.

Exit codes: 0 done; 1 ``eval`` wrote rows but every answer failed (is the model server up?);
2 a bad option, path, question file or database, reported in one line on stderr before any
model loads (and before ``eval-all --fresh`` deletes anything); 130 interrupted (the committed
rows are kept).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import math
import shutil
import sqlite3
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from confidence_router._extras import require_extra
from confidence_router.commands import command
from confidence_router.errors import ConfidenceRouterError, InvalidArgumentError

DEFAULT_DB = "eval-runs.sqlite"
DEFAULT_REPORT_NAME = "embedded-gemma3-270m"
DEFAULT_OUT_DIR = "docs/results"
CURVE_SIZES = (25, 50, 100, 250, 500, 1000)
ALL_DATASETS = ("wikidata", "triviaqa")
"""The committed report: main set (baseline training) first, then the shifted set."""
GSA_DATASETS = ("triviaqa",)
"""Where eval-all also measures GSA v2 vs v3 (the issue's TriviaQA measurement)."""
GSA_ORDERS = ("paper", "question-last", "both")
"""``--gsa-order``: the paper's probe prompts, the cache-friendly question-last ones, or both."""


# ---- errors: one line on stderr, never a traceback ---------------------------------------------


def _one_line_errors(name: str) -> Callable[[Callable[[argparse.Namespace], int]],
                                            Callable[[argparse.Namespace], int]]:
    """Wrap command ``name`` so that every expected failure -- a bad option, a missing or
    broken file, a database that is not an evaluation database, a missing run, an unreachable
    directory -- prints ``confidence-router NAME: error: ...`` on one line and returns 2, and
    Ctrl-C says how to resume (exit 130)."""

    def wrap(run: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
        @functools.wraps(run)
        def wrapped(args: argparse.Namespace) -> int:
            try:
                return run(args)
            except KeyboardInterrupt:
                print(f"confidence-router {name}: interrupted; every committed row is kept, run "
                      "the same command again to resume", file=sys.stderr)
                return 130
            except (ConfidenceRouterError, ValueError, LookupError, OSError,
                    sqlite3.Error) as error:
                text = error.args[0] if isinstance(error, KeyError) and error.args else error
                message = " ".join(str(text).split())  # one line, whatever the error held
                print(f"confidence-router {name}: error: {message}", file=sys.stderr)
                return 2

        return wrapped

    return wrap


def _at_least(args: argparse.Namespace, attr: str, minimum: int, option: str) -> None:
    value = getattr(args, attr, None)
    if value is not None and value < minimum:
        raise InvalidArgumentError(f"{option} must be an integer >= {minimum}; got {value}")


def _finite_in(args: argparse.Namespace, attr: str, option: str, low: float, high: float,
               *, low_open: bool = False) -> None:
    value = getattr(args, attr, None)
    if value is None:
        return
    ok = math.isfinite(value) and (low < value if low_open else low <= value) and value <= high
    if not ok:
        bound = "(" if low_open else "["
        raise InvalidArgumentError(f"{option} must be in {bound}{low:g}, {high:g}]; got {value}")


def _positive_finite(args: argparse.Namespace, attr: str, option: str) -> None:
    value = getattr(args, attr, None)
    if value is not None and not (math.isfinite(value) and value > 0):
        raise InvalidArgumentError(f"{option} must be a finite number > 0; got {value}")


def _check_database(db: str, *, create: bool) -> None:
    """Fail now, before a model loads, if ``db`` cannot be an evaluation database."""
    from confidence_router.evaluation.runner import connect

    connect(db, create=create).close()


def _embedded_model_name() -> str:
    from confidence_router import embedded

    # The embedded module names its constant DEFAULT_MODEL_NAME; accept a rename too.
    return str(getattr(embedded, "EMBEDDED_MODEL_NAME", None) or embedded.DEFAULT_MODEL_NAME)


def _answer_model(model: str, prompts: str, *, embedded: bool) -> str:
    """The model name to send answer prompts to.

    A raw prompt set (the few-shot set renders the whole prompt) goes to the embedded server's
    ``-raw`` variant, which applies no template; on a user's Ollama the given model is used
    as is (it must apply no template of its own for such a set).
    """
    from confidence_router.evaluation.runner import PROMPT_SETS
    from confidence_router.serving.llamacpp import model_variant

    if embedded and PROMPT_SETS[prompts].raw:
        return model_variant(model, "raw")
    return model


@contextlib.contextmanager
def _ollama_endpoint(url: str | None) -> Iterator[str]:
    """Yield ``url``, or start the embedded server for the duration when it is ``None``."""
    if url:
        yield url
        return
    from confidence_router.embedded import start_embedded_server

    print("starting the embedded model (Gemma 3 270M) ...", file=sys.stderr)
    with start_embedded_server() as server:
        yield server.url


def _chat_model(url: str, model: str) -> Any:
    from langchain_ollama import ChatOllama

    # The runner copies it with temperature 0, logprobs on, num_predict and stop strings.
    return ChatOllama(base_url=url, model=model)


def _embeddings(url: str, model: str, cache: str | None = None) -> Any:
    from langchain_ollama import OllamaEmbeddings

    embeddings = OllamaEmbeddings(base_url=url, model=model)
    if cache is None:
        return embeddings
    from confidence_router.evaluation.embedding_cache import CachedEmbeddings

    return CachedEmbeddings(embeddings, cache, model=model)


def _run_dataset(
    url: str,
    *,
    model: str,
    dataset: str,
    db: str,
    limit: int | None,
    offset: int,
    prompts: str,
    concurrency: int,
    run_name: str | None,
    num_predict: int,
    timeout: float | None,
    retry_errors: bool,
    progress: bool,
    data_dir: str | None,
    gsa: GsaOptions | None = None,
    items: list[Any] | None = None,
) -> Any:
    from confidence_router.evaluation.datasets import (
        KNOWN_DATASETS,
        dataset_file,
        load_dataset,
    )
    from confidence_router.evaluation.runner import EvalRunner

    path = dataset_file(dataset, data_dir)
    if dataset in KNOWN_DATASETS and path.name != KNOWN_DATASETS[dataset]:
        # The packaged sample: label the run by the sample's file, so it never resumes into
        # (or is compared as) a run on the full file.
        print(
            f"using the packaged sample {path.name}; set $CONFIDENCE_ROUTER_DATA_DIR or "
            f"--data-dir to the directory holding {KNOWN_DATASETS[dataset]} for the full set",
            file=sys.stderr,
        )
        dataset = str(path)
    if items is None:
        items = load_dataset(dataset, limit=limit, offset=offset, data_dir=data_dir)
    signals = (
        _gsa_signals(url, model, dataset, db, offset, len(items), gsa, data_dir) if gsa else ()
    )
    runner = EvalRunner(
        _chat_model(url, model),
        db_path=db,
        dataset=dataset,
        run_name=run_name,
        prompts=prompts,
        concurrency=concurrency,
        num_predict=num_predict,
        timeout_s=timeout,
        retry_errors=retry_errors,
        progress=progress,
        signals=signals,
    )
    summary = runner.run(items, start_position=offset)
    print(
        f"{summary.run_name}: {summary.n_items} items, {summary.n_skipped} already done, "
        f"{summary.n_written} written ({summary.n_errors} failures) in "
        f"{summary.elapsed_s:.1f} s -> {db}"
    )
    return summary


@dataclass(frozen=True)
class GsaOptions:
    """GSA v2 (bare) and v3 (retrieval-conditional) probes as extra signals of a run.

    The v3 knowledge store is seeded from ``kb_size`` items starting at ``kb_offset`` of the
    same dataset, with their gold answers as content; that slice must not overlap the
    evaluated items. ``tau=None`` calibrates the strong-hit threshold from the store's
    self-similarity (:meth:`KnowledgeStore.self_similarity_tau`), since the paper's 0.70 is
    specific to bge-large. ``order`` picks the probe prompts (:data:`GSA_ORDERS`): the paper's
    (signals ``gsa_v2`` and ``gsa_v3``), the question-last ones (``gsa_v2_question_last`` and
    ``gsa_v3_question_last``), or ``"both"`` (all four, on the same items).
    """

    kb_offset: int = 1000
    kb_size: int = 1000
    tau: float | None = None
    order: str = "paper"


def _gsa_signals(
    url: str,
    model: str,
    dataset: str,
    db: str,
    offset: int,
    n_items: int,
    gsa: GsaOptions,
    data_dir: str | None,
) -> tuple[Any, ...]:
    from langchain_ollama import ChatOllama, OllamaEmbeddings

    from confidence_router.evaluation.datasets import load_dataset
    from confidence_router.evaluation.runner import runnable_signal
    from confidence_router.gsa import (
        GSA_V2_QUESTION_LAST_VERSION,
        GSA_V2_VERSION,
        GSA_V3_QUESTION_LAST_VERSION,
        GSA_V3_VERSION,
    )
    from confidence_router.knowledge import KnowledgeStore
    from confidence_router.probe import SelfAssessmentProbe

    if gsa.order not in GSA_ORDERS:
        raise InvalidArgumentError(f"unknown GSA order {gsa.order!r}; choose one of {GSA_ORDERS}")
    kb_end, eval_end = gsa.kb_offset + gsa.kb_size, offset + n_items
    if gsa.kb_offset < eval_end and offset < kb_end:
        raise InvalidArgumentError(
            f"the knowledge-store slice [{gsa.kb_offset}, {kb_end}) overlaps the evaluated "
            f"items [{offset}, {eval_end}); choose a disjoint --kb-offset"
        )
    seed = load_dataset(dataset, limit=gsa.kb_size, offset=gsa.kb_offset, data_dir=data_dir)
    store = KnowledgeStore(
        OllamaEmbeddings(base_url=url, model=model),
        path=f"{db}.kb",
        collection=f"{Path(dataset).stem}-{gsa.kb_offset}-{kb_end}",
    )
    if store.count() < len({item.question.strip().casefold() for item in seed}):
        print(f"seeding the knowledge store with {len(seed)} gold answers ...", file=sys.stderr)
        for start in range(0, len(seed), 100):  # batches: a killed seeding resumes cheaply
            batch = seed[start : start + 100]
            store.add_many(
                [(item.question, item.answers[0]) for item in batch],
                provenance={"dataset": dataset, "kind": "gold answer"},
            )
    tau = gsa.tau if gsa.tau is not None else store.self_similarity_tau()
    print(f"GSA v3 strong-hit threshold tau = {tau:.4f}", file=sys.stderr)
    from confidence_router.serving.llamacpp import model_variant, yes_no_template

    embedded = _embedded_model_name()
    base_model = model in (embedded, model_variant(embedded, "raw"))
    if base_model:
        # A base model needs YES/NO demonstrations around the exact GSA prompt bytes; the
        # template renders the whole prompt, so it goes to the raw variant.
        model = model_variant(embedded, "raw")
    probe_model = ChatOllama(base_url=url, model=model)
    fields = ("p_yes", "latency_s", "extraction_mode", "had_retrieval", "n_hits_used", "tau")
    pairs = {  # signal suffix: (bare version, retrieval-conditional version)
        "paper": ("", GSA_V2_VERSION, GSA_V3_VERSION),
        "question-last": ("_question_last", GSA_V2_QUESTION_LAST_VERSION,
                          GSA_V3_QUESTION_LAST_VERSION),
    }
    orders = ("paper", "question-last") if gsa.order == "both" else (gsa.order,)
    signals: list[Any] = []
    for order in orders:
        suffix, bare, conditional = pairs[order]
        template = yes_no_template(bare) if base_model else None
        signals += [
            runnable_signal(
                f"gsa_v2{suffix}",
                SelfAssessmentProbe(model=probe_model, version=bare, message_template=template),
                fields=fields,
            ),
            runnable_signal(
                f"gsa_v3{suffix}",
                SelfAssessmentProbe(
                    model=probe_model, store=store, tau=tau, version=conditional,
                    message_template=template,
                ),
                fields=(*fields, "retrieval_latency_s"),
            ),
        ]
    return tuple(signals)


# ---- eval ------------------------------------------------------------------------------------


def _eval_args(parser: argparse.ArgumentParser) -> None:
    parser.description = "Answer a QA dataset with a local model and record confidence signals."
    parser.add_argument(
        "--dataset", required=True, help="wikidata | triviaqa | nq_open | PATH to a .jsonl file"
    )
    parser.add_argument("--limit", type=int, default=None, help="at most this many items")
    parser.add_argument("--offset", type=int, default=0, help="skip this many items first")
    parser.add_argument("--db", default=DEFAULT_DB, help=f"SQLite file (default {DEFAULT_DB})")
    parser.add_argument(
        "--ollama-url",
        default=None,
        help="an Ollama server; default: start the embedded Gemma 3 270M",
    )
    parser.add_argument(
        "--model",
        default=None,
        help="model name (default: the embedded model; required with --ollama-url)",
    )
    parser.add_argument(
        "--prompts",
        choices=("few-shot", "few-shot-v2", "instruct"),  # the keys of runner.PROMPT_SETS
        default=None,
        help="answer prompt set (default: few-shot for the embedded base "
        "model, instruct for an Ollama chat model)",
    )
    parser.add_argument(
        "--concurrency",
        type=int,
        default=1,
        help="requests in flight (latency is only meaningful at 1)",
    )
    parser.add_argument(
        "--run-name",
        default=None,
        help="run name in the database (default: dataset__model__prompts); "
        "re-running the same name resumes",
    )
    parser.add_argument("--num-predict", type=int, default=50, help="answer token limit")
    parser.add_argument("--timeout", type=float, default=None, help="per-call timeout, s")
    parser.add_argument(
        "--retry-errors", action="store_true", help="re-run items whose stored row is a failure"
    )
    parser.add_argument("--data-dir", default=None,
                        help="evaluation data directory (default: $CONFIDENCE_ROUTER_DATA_DIR, "
                        "else the packaged samples)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.add_argument(
        "--gsa", action="store_true",
        help="also record GSA v2 and v3 self-assessment probes (v3 with a knowledge store "
        "seeded from a disjoint slice of the dataset with gold answers)",
    )
    parser.add_argument("--kb-offset", type=int, default=1000, help="GSA store slice start")
    parser.add_argument("--kb-size", type=int, default=1000, help="GSA store slice size")
    parser.add_argument("--tau", type=float, default=None,
                        help="GSA v3 strong-hit threshold (default: calibrated on the store)")
    parser.add_argument("--gsa-order", choices=GSA_ORDERS, default="paper",
                        help="GSA probe prompts: the paper's (question first; signals gsa_v2, "
                        "gsa_v3), question-last (instruction first, cheap behind a prefix "
                        "cache; signals gsa_v2_question_last, gsa_v3_question_last) or both")


@command("eval", _eval_args,
         "answer a QA dataset with a local model and record the confidence signals (SQLite)")
@_one_line_errors("eval")
def _eval(args: argparse.Namespace) -> int:
    if args.ollama_url and not args.model:
        print(
            "confidence-router eval: error: --model is required with --ollama-url", file=sys.stderr
        )
        return 2
    require_extra("eval", "confidence-router eval")
    if args.gsa:
        require_extra("gsa", "confidence-router eval --gsa")
    _check_eval_numbers(args)
    prompts = args.prompts or ("instruct" if args.ollama_url else "few-shot")
    model = args.model or _embedded_model_name()
    if not args.ollama_url:
        model = _answer_model(model, prompts, embedded=True)
    try:
        # Read the dataset and open the database first: a typo in --dataset or --db fails at
        # once, before a model loads.
        items = _load_items(args)
        if not items:
            raise InvalidArgumentError(
                f"no questions to evaluate: --offset {args.offset} is past the last record of "
                f"{args.dataset}"
            )
        _check_database(args.db, create=True)
        with _ollama_endpoint(args.ollama_url) as url:
            summary = _run_dataset(
                url,
                model=model,
                dataset=args.dataset,
                db=args.db,
                limit=args.limit,
                offset=args.offset,
                prompts=prompts,
                concurrency=args.concurrency,
                run_name=args.run_name,
                num_predict=args.num_predict,
                timeout=args.timeout,
                retry_errors=args.retry_errors,
                progress=not args.no_progress,
                data_dir=args.data_dir,
                gsa=GsaOptions(args.kb_offset, args.kb_size, args.tau, args.gsa_order)
                if args.gsa else None,
                items=items,
            )
    except ValueError as error:
        print(f"confidence-router eval: error: {error}", file=sys.stderr)
        return 2
    if summary.n_written and summary.n_errors == summary.n_written:
        from confidence_router.evaluation.runner import load_run

        kinds = load_run(args.db, summary.run_name).error_counts()
        first = next(iter(kinds), "unknown")
        from confidence_router.settings import redact_url

        where = redact_url(args.ollama_url) if args.ollama_url else "the embedded model"
        print(f"confidence-router eval: error: every answer failed ({summary.n_errors} of "
              f"{summary.n_written}, e.g. {first}); is {where} up and serving {model!r}? "
              "Re-run with --retry-errors once it is", file=sys.stderr)
        return 1
    return 0


def _check_eval_numbers(args: argparse.Namespace) -> None:
    """Refuse impossible numbers before anything is loaded or written."""
    _at_least(args, "limit", 0, "--limit")
    _at_least(args, "offset", 0, "--offset")
    _at_least(args, "concurrency", 1, "--concurrency")
    if args.num_predict is not None and args.num_predict < 1 and args.num_predict != -1:
        raise InvalidArgumentError(
            f"--num-predict must be an integer >= 1 (or -1: no limit); got {args.num_predict}"
        )
    _positive_finite(args, "timeout", "--timeout")
    _at_least(args, "kb_offset", 0, "--kb-offset")
    _at_least(args, "kb_size", 1, "--kb-size")
    _finite_in(args, "tau", "--tau", 0.0, 1.0, low_open=True)


def _load_items(args: argparse.Namespace) -> list[Any]:
    from confidence_router.evaluation.datasets import load_dataset

    return list(load_dataset(args.dataset, limit=args.limit, offset=args.offset,
                             data_dir=args.data_dir))


# ---- eval-report -------------------------------------------------------------------------------


def _report_args(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Write docs/results/<name>.md and PNGs from evaluation runs; the "
        "first run is the main dataset (supervised-baseline training set)."
    )
    parser.add_argument("--db", default=DEFAULT_DB, help=f"SQLite file (default {DEFAULT_DB})")
    parser.add_argument(
        "--run",
        action="append",
        default=None,
        dest="runs",
        help="run name (repeatable, main first); default: every run, oldest first",
    )
    parser.add_argument("--name", default="evaluation", help="report file stem")
    parser.add_argument("--out-dir", default=DEFAULT_OUT_DIR, help="output directory")
    parser.add_argument(
        "--embeddings-url",
        default=None,
        help="Ollama server for the baseline's /api/embed; default: the embedded model",
    )
    parser.add_argument(
        "--embeddings-model",
        default=None,
        help="embedding model name (default: the embedded model)",
    )
    parser.add_argument(
        "--no-baseline",
        action="store_true",
        help="skip the supervised baseline (no embeddings needed)",
    )
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples")
    parser.add_argument(
        "--curve-sizes",
        type=_sizes,
        default=CURVE_SIZES,
        help="baseline learning-curve training sizes, comma-separated (default: "
        f"{','.join(map(str, CURVE_SIZES))}; the whole training pool is added)",
    )


def _sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"expected positive sizes, got {text!r}")
    return sizes


def _write_report(
    args: argparse.Namespace,
    db: str,
    runs: list[str] | None,
    name: str,
    url: str | None,
    embeddings_model: str | None,
) -> None:
    from confidence_router.evaluation.report import generate_report

    embeddings = None
    description = ""
    if url is not None:
        model = embeddings_model or _embedded_model_name()
        # Cached beside the database: a regenerated report does not re-embed every question.
        embeddings = _embeddings(url, model, cache=f"{db}.embeddings")
        description = f"`{model}` via Ollama /api/embed"
    report = generate_report(
        db,
        runs=runs,
        name=name,
        out_dir=args.out_dir,
        embeddings=embeddings,
        embeddings_name=description,
        n_resamples=args.bootstrap,
        learning_curve_sizes=getattr(args, "curve_sizes", CURVE_SIZES),
    )
    print(f"wrote {report.markdown_path}")
    for path in report.figure_paths.values():
        print(f"wrote {path}")


@command("eval-report", _report_args,
         "write a Markdown report with AUROC, operating points and plots from eval runs")
@_one_line_errors("eval-report")
def _eval_report(args: argparse.Namespace) -> int:
    require_extra("eval", "confidence-router eval-report")
    _at_least(args, "bootstrap", 1, "--bootstrap")
    out_dir = Path(args.out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise InvalidArgumentError(f"--out-dir {str(out_dir)!r} is a file, not a directory")
    # The database and the runs first: a bad --db or --run fails before a model loads.
    from confidence_router.evaluation.runner import list_runs

    stored = [info.name for info in list_runs(args.db)]
    if not stored:
        raise InvalidArgumentError(f"{args.db}: no runs in the database")
    unknown = [name for name in args.runs or () if name not in stored]
    if unknown:
        raise InvalidArgumentError(f"{args.db}: no run {unknown[0]!r}; runs: {stored}")
    try:
        if args.no_baseline:
            _write_report(args, args.db, args.runs, args.name, None, None)
        else:
            with _ollama_endpoint(args.embeddings_url) as url:
                _write_report(args, args.db, args.runs, args.name, url, args.embeddings_model)
    except ValueError as error:
        print(f"confidence-router eval-report: error: {error}", file=sys.stderr)
        return 2
    return 0


# ---- eval-all ----------------------------------------------------------------------------------


def _all_args(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Regenerate the committed report: the embedded model on "
        f"{' + '.join(ALL_DATASETS)} (--limit each), then eval-report with the baseline. "
        "Resumes an interrupted run unless --fresh."
    )
    parser.add_argument("--name", default=DEFAULT_REPORT_NAME, help="report name")
    parser.add_argument("--out-dir", default=DEFAULT_OUT_DIR, help="output directory")
    parser.add_argument("--db", default=None, help="SQLite file (default: <out-dir>/<name>.sqlite)")
    parser.add_argument("--limit", type=int, default=1000, help="items per dataset")
    parser.add_argument(
        "--fresh", action="store_true", help="delete the database first (re-measure everything)"
    )
    parser.add_argument("--concurrency", type=int, default=1, help="requests in flight")
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples")
    parser.add_argument("--data-dir", default=None,
                        help="evaluation data directory (default: $CONFIDENCE_ROUTER_DATA_DIR, "
                        "else the packaged samples)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    parser.add_argument("--kb-size", type=int, default=500,
                        help="GSA v3 knowledge store on TriviaQA: items after the evaluated "
                        "ones, with their gold answers (default 500)")
    parser.add_argument("--no-gsa", action="store_true",
                        help="skip the GSA v2/v3 probes on TriviaQA (about half the run time)")


@command("eval-all", _all_args,
         "regenerate the committed report of the embedded model from scratch (about an hour)")
@_one_line_errors("eval-all")
def _eval_all(args: argparse.Namespace) -> int:
    require_extra("eval", "confidence-router eval-all")
    if not getattr(args, "no_gsa", False):
        require_extra("gsa", "confidence-router eval-all (GSA v3 knowledge store)")
    # Every number is checked before --fresh deletes anything.
    _at_least(args, "limit", 1, "--limit")
    _at_least(args, "concurrency", 1, "--concurrency")
    _at_least(args, "bootstrap", 1, "--bootstrap")
    _at_least(args, "kb_size", 1, "--kb-size")
    out_dir = Path(args.out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise InvalidArgumentError(f"--out-dir {str(out_dir)!r} is a file, not a directory")
    db = Path(args.db or Path(args.out_dir) / f"{args.name}.sqlite")
    if args.fresh:
        for suffix in ("", "-wal", "-shm"):
            Path(f"{db}{suffix}").unlink(missing_ok=True)
        shutil.rmtree(f"{db}.kb", ignore_errors=True)
    model = _answer_model(_embedded_model_name(), "few-shot", embedded=True)
    try:
        if not args.fresh:
            _check_database(str(db), create=True)
        with _ollama_endpoint(None) as url:
            names = [
                _run_dataset(
                    url,
                    model=model,
                    dataset=dataset,
                    db=str(db),
                    limit=args.limit,
                    offset=0,
                    prompts="few-shot",
                    concurrency=args.concurrency,
                    run_name=None,
                    num_predict=50,
                    timeout=None,
                    retry_errors=False,
                    progress=not args.no_progress,
                    data_dir=args.data_dir,
                    gsa=GsaOptions(kb_offset=args.limit, kb_size=args.kb_size)
                    if dataset in GSA_DATASETS and not args.no_gsa
                    else None,
                ).run_name
                for dataset in ALL_DATASETS
            ]
            _write_report(args, str(db), names, args.name, url, _embedded_model_name())
    except ValueError as error:
        print(f"confidence-router eval-all: error: {error}", file=sys.stderr)
        return 2
    return 0


# ---- eval-early-exit ---------------------------------------------------------------------------

EXIT_SIGNALS = ("min_logprob", "mean_min", "mean_logprob")
"""The signals with an early-exit rule (the exact one, the default signal's bound, the mean)."""


def _early_exit_args(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Replay early exit on stored evaluation runs: decode tokens and estimated time saved "
        "on escalated answers, decisions changed, AUROC with and without early exit."
    )
    parser.add_argument("--db", default=DEFAULT_DB, help=f"SQLite file (default {DEFAULT_DB})")
    parser.add_argument("--run", action="append", default=None, dest="runs",
                        help="run name (repeatable); default: every run in the database")
    parser.add_argument("--threshold", type=float, default=0.7, help="keep-local threshold")
    parser.add_argument("--signal", action="append", default=None, dest="signals",
                        help=f"signal (repeatable); default: {', '.join(EXIT_SIGNALS)}")
    parser.add_argument("--horizon", type=int, action="append", default=None, dest="horizons",
                        help="also replay with this many remaining tokens assumed instead of "
                        "the run's num_predict cap (repeatable)")


@command("eval-early-exit", _early_exit_args,
         "replay early exit on stored eval runs: tokens and time saved, decisions changed")
@_one_line_errors("eval-early-exit")
def _eval_early_exit(args: argparse.Namespace) -> int:
    require_extra("eval", "confidence-router eval-early-exit")
    from confidence_router.evaluation.exit_replay import replay_early_exit
    from confidence_router.evaluation.runner import list_runs, load_run
    from confidence_router.signals import SIGNAL_SCORERS

    _finite_in(args, "threshold", "--threshold", 0.0, 1.0)
    for horizon in args.horizons or ():
        if horizon < 0:
            raise InvalidArgumentError(f"--horizon must be an integer >= 0; got {horizon}")
    for signal in args.signals or ():
        if signal not in SIGNAL_SCORERS:
            raise InvalidArgumentError(
                f"unknown --signal {signal!r}; choose from {', '.join(SIGNAL_SCORERS)}"
            )
    stored = [info.name for info in list_runs(args.db)]
    if not stored:
        raise InvalidArgumentError(f"{args.db}: no runs in the database")
    unknown = [name for name in args.runs or () if name not in stored]
    if unknown:
        raise InvalidArgumentError(f"{args.db}: no run {unknown[0]!r}; runs: {stored}")
    names = args.runs or stored
    print("| run | signal | bound | escalated | exited | tokens saved | est. time saved "
          "| decisions changed | AUROC full -> early |")
    print("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | --- |")
    try:
        for name in names:
            run = load_run(args.db, name)
            for signal in args.signals or EXIT_SIGNALS:
                for horizon in [None, *(args.horizons or ())]:
                    r = replay_early_exit(run, signal, args.threshold, horizon=horizon)
                    print(f"| {r.run} | {r.signal} | {r.bound} | {r.escalated}/{r.answers} "
                          f"| {r.exited} | {r.tokens_saved}/{r.tokens_escalated} "
                          f"({_share(r.token_share_saved)}) | {r.time_saved_s:.1f} s "
                          f"({_share(r.time_share_saved)}) | {r.decisions_changed} "
                          f"| {r.auroc_full:.3f} -> {r.auroc_early:.3f} |")
    except (ValueError, LookupError) as error:
        print(f"confidence-router eval-early-exit: error: {error}", file=sys.stderr)
        return 2
    return 0


def _share(value: float) -> str:
    import math

    return "-" if math.isnan(value) else f"{value:.0%}"  # NaN: nothing to share
