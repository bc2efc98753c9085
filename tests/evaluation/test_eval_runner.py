"""EvalRunner against the scripted Ollama-compatible server, through the real ChatOllama."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from langchain_core.language_models.fake_chat_models import FakeListChatModel
from langchain_ollama import ChatOllama

from confidence_router.evaluation.datasets import QAItem
from confidence_router.evaluation.runner import (
    BUILTIN_SIGNALS,
    FEW_SHOT_PROMPTS,
    FEW_SHOT_V2_PROMPTS,
    INSTRUCT_PROMPTS,
    PROMPT_SETS,
    EvalRunner,
    ExtraSignal,
    RunConfigMismatchError,
    list_runs,
    load_run,
)
from confidence_router.serving.llamacpp import (
    COMPLETION_FEW_SHOT_PREFIX,
    FEW_SHOT_PREFIX,
    TRIVIA_FEW_SHOT_PREFIX,
    render_raw_prompt,
)


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


ITEMS = [
    QAItem("toy:1", "What is the capital of France?", ("Paris",), "question"),
    QAItem("toy:2", "What is the capital of Australia?", ("Canberra",), "question"),
    QAItem("toy:3", "The country of Novosibirsk is", ("Russia",), "completion"),
    QAItem("toy:4", "Which question explodes?", ("nothing",), "question"),
]


def script(backend) -> None:
    backend.add_answer("capital of France", " Paris", logprobs=-0.2)
    backend.add_answer("capital of Australia", " Sydney maybe", logprobs=[-1.9, -2.7])
    backend.add_answer("Novosibirsk", [" Russia", "."], logprobs=[-0.5, -1.5])
    backend.fail("explodes", status=500, message="model crashed")


def chat(server, model: str = "scripted-local") -> ChatOllama:
    return ChatOllama(base_url=server.url, model=model)


def runner(server, tmp_path: Path, **kwargs) -> EvalRunner:
    kwargs.setdefault("dataset", "toy")
    kwargs.setdefault("prompts", "few-shot")
    kwargs.setdefault("progress", False)
    return EvalRunner(chat(server), db_path=tmp_path / "runs.sqlite", **kwargs)


def db_rows(db: Path, run_name: str) -> dict[str, dict]:
    conn = sqlite3.connect(db)
    conn.row_factory = sqlite3.Row
    rows = conn.execute(
        "SELECT r.* FROM results r JOIN runs USING (run_id) WHERE runs.name = ?", (run_name,)
    ).fetchall()
    conn.close()
    return {r["item_id"]: dict(r) for r in rows}


def test_rows_hold_hand_computed_signals(ollama_backend, ollama_server, tmp_path):
    script(ollama_backend)
    r = runner(ollama_server, tmp_path)
    summary = r.run(ITEMS)
    assert (summary.n_items, summary.n_written, summary.n_errors) == (4, 4, 1)

    rows = db_rows(tmp_path / "runs.sqlite", r.run_name)
    paris = rows["toy:1"]
    assert paris["answer"] == " Paris" and paris["correct"] == 1
    assert json.loads(paris["gold_answers"]) == ["Paris"]
    assert paris["token_count"] == 1
    assert paris["mean_logprob"] == pytest.approx(-0.2)
    assert paris["confidence"] == pytest.approx(sigmoid(2 * -0.2 + 3))
    assert paris["min_confidence"] == pytest.approx(sigmoid(2 * -0.2 + 3))
    assert paris["error"] is None and paris["signal_unknown_reason"] is None
    assert paris["latency_s"] > 0

    sydney = rows["toy:2"]
    assert sydney["correct"] == 0 and sydney["token_count"] == 2
    assert sydney["mean_logprob"] == pytest.approx(-2.3)
    assert sydney["min_logprob"] == pytest.approx(-2.7)
    assert sydney["confidence"] == pytest.approx(sigmoid(2 * -2.3 + 3))
    assert sydney["min_confidence"] == pytest.approx(sigmoid(2 * -2.7 + 3))

    russia = rows["toy:3"]
    assert russia["answer"] == " Russia." and russia["correct"] == 1
    assert russia["confidence"] == pytest.approx(sigmoid(2 * -1.0 + 3))
    assert russia["min_confidence"] == pytest.approx(sigmoid(2 * -1.5 + 3))

    # What went over the wire: greedy, logprobs on, the few-shot prompt of each style.
    bodies = {
        m["messages"][0]["content"]: m
        for m in (q["body"] for q in ollama_server.requests_to("/api/chat"))
    }
    # A question gets the eight trivia demonstrations of few-shot-v3, then the question.
    france = TRIVIA_FEW_SHOT_PREFIX + "Question: What is the capital of France?\nAnswer:"
    assert bodies[france]["options"]["temperature"] == 0
    assert bodies[france]["options"]["num_predict"] == 50
    assert bodies[france]["options"]["stop"] == ["\n"]
    assert bodies[france]["logprobs"] is True
    assert bodies[france]["top_logprobs"] == 5  # the alternatives are recorded
    # A completion prompt gets plain completion demonstrations, never Q:/A: pairs.
    completion = COMPLETION_FEW_SHOT_PREFIX + "The country of Novosibirsk is"
    assert FEW_SHOT_PROMPTS.render(ITEMS[2]) == completion and completion in bodies
    assert "Q:" not in completion
    # The set renders the whole prompt: the embedded server's raw variant uses it unchanged.
    assert FEW_SHOT_PROMPTS.raw
    assert render_raw_prompt([{"role": "user", "content": completion}]) == completion

    info = list_runs(tmp_path / "runs.sqlite")[0]
    assert info.name == r.run_name == "toy__scripted-local__few-shot-v3"
    assert info.model == "scripted-local" and info.prompt_set == "few-shot-v3"
    assert info.prompt_templates["question"] == FEW_SHOT_PROMPTS.question
    assert info.prompt_templates["completion"] == completion.replace(
        "The country of Novosibirsk is", "{question}"
    )
    assert info.prompt_templates["raw"] is True
    assert info.library_version and info.started_at and info.grader == "match_grader"


def test_few_shot_v2_stays_reproducible_by_name(ollama_backend, ollama_server, tmp_path):
    # v3 changed only the question template; v2's bytes are kept under their own name, and a
    # run with either set is recorded under its version.
    assert PROMPT_SETS["few-shot"] is FEW_SHOT_PROMPTS
    assert PROMPT_SETS["few-shot-v2"] is FEW_SHOT_V2_PROMPTS
    assert FEW_SHOT_V2_PROMPTS.question == FEW_SHOT_PREFIX + "Q: {question}\nA:"
    assert FEW_SHOT_PROMPTS.completion == FEW_SHOT_V2_PROMPTS.completion
    assert FEW_SHOT_PROMPTS.question != FEW_SHOT_V2_PROMPTS.question
    assert TRIVIA_FEW_SHOT_PREFIX.count("Question: ") == 8
    assert TRIVIA_FEW_SHOT_PREFIX.count("\nAnswer: ") == 8
    script(ollama_backend)
    r = runner(ollama_server, tmp_path, prompts="few-shot-v2")
    r.run(ITEMS[:1])
    sent = [q["body"]["messages"][0]["content"] for q in ollama_server.requests_to("/api/chat")]
    assert sent == [FEW_SHOT_PREFIX + "Q: What is the capital of France?\nA:"]
    info = list_runs(tmp_path / "runs.sqlite")[0]
    assert info.name == "toy__scripted-local__few-shot-v2" and info.prompt_set == "few-shot-v2"
    assert info.prompt_templates["question"] == FEW_SHOT_V2_PROMPTS.question


def test_failures_are_recorded_and_excluded(ollama_backend, ollama_server, tmp_path):
    script(ollama_backend)
    r = runner(ollama_server, tmp_path)
    r.run(ITEMS)
    failed = db_rows(tmp_path / "runs.sqlite", r.run_name)["toy:4"]
    assert failed["correct"] is None and failed["confidence"] is None
    assert "model crashed" in failed["error"] and failed["error"].startswith("local: ")

    data = load_run(tmp_path / "runs.sqlite", r.run_name)
    assert data.n == 4 and data.n_errors == 1
    assert data.error_counts() == {"local: ResponseError": 1}
    assert data.accuracy == pytest.approx(2 / 3)
    mean = data.signal("mean_logprob")
    assert mean.item_ids == ("toy:1", "toy:2", "toy:3")
    assert mean.labels.tolist() == [1, 0, 1]
    assert mean.n_excluded_errors == 1 and mean.n_missing == 0


def test_missing_logprobs_are_unknown_not_half(tmp_path):
    # Any chat model works; one without logprobs gives rows flagged "no_logprobs".
    model = FakeListChatModel(responses=[" Paris", " "])
    items = ITEMS[:2]
    EvalRunner(
        model, db_path=tmp_path / "r.sqlite", dataset="toy", run_name="fake", progress=False
    ).run(items)
    data = load_run(tmp_path / "r.sqlite", "fake")
    assert data.signal_unknown_reason == ("no_logprobs", "empty_answer")
    assert np.isnan(data.confidence).all()
    arrays = data.signal("mean_logprob")
    assert arrays.labels.size == 0
    assert arrays.missing_reasons == {"empty_answer": 1, "no_logprobs": 1}


def test_concurrency_gives_the_same_rows(ollama_backend, ollama_server, tmp_path):
    script(ollama_backend)
    ollama_backend.delay(None, 0.05)  # every request takes a while: they really overlap
    items = ITEMS + [
        QAItem(f"toy:{i}", f"Filler question {i}?", ("know",), "question") for i in range(5, 13)
    ]
    serial = runner(ollama_server, tmp_path, run_name="serial", concurrency=1)
    parallel = runner(ollama_server, tmp_path, run_name="parallel", concurrency=4)
    serial.run(items)
    in_flight = _InFlight(ollama_backend)
    parallel.run(items)
    # Overlapped, not one after another: the server saw several requests at once (counted,
    # not timed: this machine is shared and noisy).
    assert in_flight.peak >= 2

    volatile = {"run_id", "latency_s", "completed_at"}
    a = db_rows(tmp_path / "runs.sqlite", "serial")
    b = db_rows(tmp_path / "runs.sqlite", "parallel")
    assert a.keys() == b.keys() == {it.id for it in items}
    for item_id in a:
        assert {k: v for k, v in a[item_id].items() if k not in volatile} == {
            k: v for k, v in b[item_id].items() if k not in volatile
        }


class _InFlight:
    """Counts how many of ``backend``'s replies are being generated at the same time."""

    def __init__(self, backend) -> None:
        import threading

        self.peak = 0
        self._now = 0
        self._lock = threading.Lock()
        chat = backend.chat

        def counting_chat(request):
            reply = chat(request)
            reply.tokens = self._track(reply.tokens)
            return reply

        backend.chat = counting_chat

    def _track(self, tokens):
        with self._lock:
            self._now += 1
            self.peak = max(self.peak, self._now)
        try:
            yield from tokens
        finally:
            with self._lock:
                self._now -= 1


def test_resume_skips_recorded_items_and_checks_config(ollama_backend, ollama_server, tmp_path):
    script(ollama_backend)
    r = runner(ollama_server, tmp_path)
    r.run(ITEMS[:2])
    ollama_server.clear_requests()
    summary = r.run(ITEMS)
    assert (summary.n_skipped, summary.n_written) == (2, 2)
    asked = [q["body"]["messages"][0]["content"] for q in ollama_server.requests_to("/api/chat")]
    assert not any("France" in text or "Australia" in text for text in asked)
    assert len(asked) == 2

    # Failure rows are kept on resume unless retry_errors is set.
    ollama_backend.reset()
    ollama_backend.add_answer("explodes", " nothing")
    assert runner(ollama_server, tmp_path).run(ITEMS).n_written == 0
    retried = runner(ollama_server, tmp_path, retry_errors=True).run(ITEMS)
    assert retried.n_written == 1 and retried.n_errors == 0
    assert load_run(tmp_path / "runs.sqlite", r.run_name).n_errors == 0

    with pytest.raises(RunConfigMismatchError, match="prompt_set"):
        runner(ollama_server, tmp_path, run_name=r.run_name, prompts="instruct").run(ITEMS)


def test_extra_signals_and_cloud_labels(ollama_backend, ollama_server, tmp_path):
    # The cloud rule first: rules match in order, and the others match any model.
    ollama_backend.add_answer(None, " Canberra", logprobs=-0.3, model="cloud-model")
    script(ollama_backend)

    def sync_signal(item: QAItem) -> dict:
        return {"p_yes": 0.25 if "Australia" in item.question else 0.75, "mode": "logprob_softmax"}

    async def async_signal(item: QAItem) -> dict:
        if "France" in item.question:
            raise RuntimeError("probe down")
        return {"score": len(item.question) / 100, "latency_s": 0.5}

    r = runner(
        ollama_server,
        tmp_path,
        signals=[
            ExtraSignal("gsa", sync_signal, score_fields=("p_yes",)),
            ExtraSignal("toy", async_signal, score_fields=("score",)),
        ],
        cloud_model=chat(ollama_server, "cloud-model"),
    )
    r.run(ITEMS)
    data = load_run(tmp_path / "runs.sqlite", r.run_name)
    assert data.info.score_signals == [*BUILTIN_SIGNALS, "gsa.p_yes", "toy.score"]
    assert data.extras["gsa.p_yes"].tolist() == [0.75, 0.25, 0.75, 0.75]
    assert data.extra_values["gsa.mode"][0] == "logprob_softmax"
    assert data.extras["gsa.latency_s"][0] >= 0
    assert np.isnan(data.extras["toy.score"][0])
    assert data.extras["toy.latency_s"][1] == 0.5  # the signal's own latency is kept
    toy = data.signal("toy.score")
    assert toy.n_missing == 1 and toy.missing_reasons == {"signal error: RuntimeError": 1}

    # Cloud: "Canberra" is right only for the Australia question.
    assert data.cloud_correct[:3].tolist() == [0, 1, 0]
    assert data.signal("mean_logprob").cloud_labels.tolist() == [0, 1, 0]
    rows = db_rows(tmp_path / "runs.sqlite", r.run_name)
    assert rows["toy:2"]["cloud_answer"] == " Canberra"
    assert rows["toy:2"]["cloud_output_tokens"] == 1
    cloud_prompts = [
        q["body"]["messages"][0]["content"]
        for q in ollama_server.requests_to("/api/chat")
        if q["body"]["model"] == "cloud-model"
    ]
    assert INSTRUCT_PROMPTS.render(ITEMS[1]) in cloud_prompts


KILL_SCRIPT = textwrap.dedent(
    """
    import sys
    from langchain_ollama import ChatOllama
    from confidence_router.evaluation.datasets import QAItem
    from confidence_router.evaluation.runner import EvalRunner

    url, db, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    items = [QAItem(f"kill:{i}", f"Question number {i}?", (f"answer {i}",), "question")
             for i in range(n)]
    EvalRunner(ChatOllama(base_url=url, model="scripted-local"), db_path=db,
               dataset="killtest", run_name="killed", progress=False).run(items)
    """
)


def _count_rows(db: Path) -> int:
    if not db.exists():
        return 0
    conn = sqlite3.connect(db, timeout=5)
    try:
        return conn.execute("SELECT COUNT(*) FROM results").fetchone()[0]
    except sqlite3.OperationalError:  # schema not created yet
        return 0
    finally:
        conn.close()


def test_resume_after_sigkill_loses_nothing(ollama_backend, ollama_server, tmp_path):
    n = 14
    ollama_backend.add_answer(re.compile(r"Question number \d+\?"), " answer", latency=0.15)
    db = tmp_path / "killed.sqlite"
    proc = subprocess.Popen(
        [sys.executable, "-c", KILL_SCRIPT, ollama_server.url, str(db), str(n)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=dict(os.environ),
    )
    try:
        deadline = time.monotonic() + 30
        while _count_rows(db) < 3:
            if proc.poll() is not None:
                pytest.fail(f"runner exited early: {proc.stderr.read().decode()[-2000:]}")
            if time.monotonic() > deadline:
                pytest.fail("the runner committed no rows within 30 s")
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL

    conn = sqlite3.connect(db)
    done_before = {r[0] for r in conn.execute("SELECT item_id FROM results")}
    conn.close()
    assert 3 <= len(done_before) < n

    def requests_for(i: int) -> int:
        needle = f"Question number {i}?"
        return sum(
            needle in q["body"]["messages"][0]["content"]
            for q in ollama_server.requests_to("/api/chat")
        )

    # Re-run the same command (in this process): only the missing items are requested. Count
    # the resumed run's requests alone (the killed process may have retried one of its own).
    ollama_server.clear_requests()
    summary = EvalRunner(
        chat(ollama_server), db_path=db, dataset="killtest", run_name="killed", progress=False
    ).run(
        [
            QAItem(f"kill:{i}", f"Question number {i}?", (f"answer {i}",), "question")
            for i in range(n)
        ]
    )
    assert summary.n_skipped == len(done_before)
    conn = sqlite3.connect(db)
    ids = [r[0] for r in conn.execute("SELECT item_id FROM results")]
    conn.close()
    assert sorted(ids) == sorted(f"kill:{i}" for i in range(n))  # each exactly once
    for i in range(n):
        if f"kill:{i}" in done_before:
            assert requests_for(i) == 0, f"completed item {i} was requested again"
        else:
            assert requests_for(i) == 1  # each missing item exactly once
