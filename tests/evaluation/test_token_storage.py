"""Per-token data in evaluation runs: stored compactly, recomputed exactly, old runs still load.

The runner talks to the scripted Ollama-compatible server through the real ChatOllama.
"""

from __future__ import annotations

import math
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from langchain_ollama import ChatOllama

from confidence_router.evaluation.datasets import QAItem
from confidence_router.evaluation.runner import (
    SCHEMA_VERSION,
    TOP_LOGPROBS,
    EvalRunner,
    EvalRunnerError,
    connect,
    decode_tokens,
    encode_tokens,
    load_run,
)
from confidence_router.extraction import TokenLogprob
from confidence_router.signals import SIGNAL_SCORERS, compute_signals, score_for

ITEMS = [
    QAItem("t:1", "What is the capital of France?", ("Paris",), "question"),
    QAItem("t:2", "The country of Novosibirsk is", ("Russia",), "completion"),
    QAItem("t:3", "Which question has no answer?", ("none",), "question"),
]

PARIS_TOP = [{" Paris": -0.05, " Lyon": -3.2, " Nice": -4.0, " Marseille": -4.5, " the": -5.0,
              " a": -6.0}]
RUSSIA_TOP = [
    {" Russia": -0.4, " Siberia": -1.9, " Kazakhstan": -3.0, " the": -3.5, " Ukraine": -4.0},
    {".": -0.05, "\n": -4.1, ",": -5.0, " and": -6.0, "!": -7.0},
]


def _script(backend) -> None:
    backend.add_answer("capital of France", [" Paris"], top_logprobs=PARIS_TOP)
    backend.add_answer("Novosibirsk", [" Russia", "."], top_logprobs=RUSSIA_TOP)
    backend.add_answer("no answer", [" "], logprobs=[-0.3])  # a blank answer


def _run(server, tmp_path: Path) -> tuple[EvalRunner, Path]:
    db = tmp_path / "runs.sqlite"
    runner = EvalRunner(ChatOllama(base_url=server.url, model="scripted-local"), db_path=db,
                        dataset="toy", prompts="few-shot", progress=False)
    runner.run(ITEMS)
    return runner, db


def test_rows_store_every_token_with_top5_alternatives(ollama_backend, ollama_server, tmp_path):
    _script(ollama_backend)
    runner, db = _run(ollama_server, tmp_path)
    # the request asked for the alternatives
    bodies = [q["body"] for q in ollama_server.requests_to("/api/chat")]
    assert bodies and all(b["top_logprobs"] == TOP_LOGPROBS == 5 for b in bodies)

    data = load_run(db, runner.run_name)
    russia = data.tokens[data.item_ids.index("t:2")]
    assert [t.token for t in russia] == [" Russia", "."]
    assert [t.logprob for t in russia] == [-0.4, -0.05]
    # the server trims to k = 5, highest first, exactly as sent
    assert russia[0].top_logprobs == tuple(RUSSIA_TOP[0].items())
    paris = data.tokens[data.item_ids.index("t:1")]
    assert len(paris[0].top_logprobs) == 5 and paris[0].top_logprobs[0] == (" Paris", -0.05)

    # compact: a zlib BLOB, smaller than its JSON text
    conn = sqlite3.connect(db)
    blob = conn.execute("SELECT tokens FROM results WHERE item_id = 't:2'").fetchone()[0]
    conn.close()
    assert isinstance(blob, bytes) and len(blob) < 300


def test_a_signal_recomputed_from_stored_tokens_equals_the_live_value(
    ollama_backend, ollama_server, tmp_path
):
    _script(ollama_backend)
    runner, db = _run(ollama_server, tmp_path)
    conn = sqlite3.connect(db)
    live = dict(conn.execute("SELECT item_id, confidence FROM results").fetchall())
    live_min = dict(conn.execute("SELECT item_id, min_confidence FROM results").fetchall())
    conn.close()
    data = load_run(db, runner.run_name)
    recomputed = data.score_column("mean_logprob")
    recomputed_min = data.score_column("min_logprob")
    for i, item_id in enumerate(data.item_ids):
        if live[item_id] is None:
            assert math.isnan(recomputed[i])
        else:  # exactly, not approximately: the stored floats are the live ones
            assert recomputed[i] == live[item_id]
            assert recomputed_min[i] == live_min[item_id]
    # a top-k signal, from the tokens as scripted on the server
    expected = compute_signals(
        [TokenLogprob(t, lp, tuple(top.items())) for (t, lp), top in
         zip(((" Russia", -0.4), (".", -0.05)), RUSSIA_TOP)]
    )
    index = data.item_ids.index("t:2")
    for name in SIGNAL_SCORERS:
        assert data.score_column(name)[index] == score_for(expected, name), name
    assert data.score_column("min_margin")[index] == pytest.approx(
        math.exp(-0.4) - math.exp(-1.9)  # the first position is the less decided one
    )
    assert expected.top_k == 5


def test_blank_answer_is_missing_for_every_signal_with_its_reason(
    ollama_backend, ollama_server, tmp_path
):
    _script(ollama_backend)
    runner, db = _run(ollama_server, tmp_path)
    data = load_run(db, runner.run_name)
    for name in (*SIGNAL_SCORERS, "rank_avg"):
        arrays = data.signal(name)
        assert "t:3" not in arrays.item_ids
        assert arrays.missing_reasons.get("empty_answer") == 1, name


def _downgrade_to_v1(db: Path) -> None:
    conn = sqlite3.connect(db)
    conn.execute("ALTER TABLE results DROP COLUMN tokens")
    conn.execute("UPDATE meta SET value = '1' WHERE key = 'schema_version'")
    conn.commit()
    conn.close()


def test_runs_written_before_tokens_were_stored_still_load(ollama_backend, ollama_server, tmp_path):
    _script(ollama_backend)
    runner, db = _run(ollama_server, tmp_path)
    before = load_run(db, runner.run_name).score_column("mean_logprob")
    _downgrade_to_v1(db)

    data = load_run(db, runner.run_name)  # upgrades the file in place
    assert all(t is None for t in data.tokens)
    # the paper's pair comes from the stored columns ...
    np.testing.assert_array_equal(data.score_column("mean_logprob"), before)
    assert data.signal("min_logprob").labels.size == 2
    # ... every token signal is missing (unknown), counted with its reason, never 0.5
    margin = data.signal("min_margin")
    assert margin.labels.size == 0
    assert margin.missing_reasons == {"empty_answer": 1, "no_token_data": 2}
    conn = connect(db)
    version = conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0]
    columns = {r["name"] for r in conn.execute("PRAGMA table_info(results)")}
    conn.close()
    assert int(version) == SCHEMA_VERSION and "tokens" in columns
    # and the upgraded file takes new rows with tokens
    ollama_backend.add_answer("Canberra", [" Canberra"], top_logprobs=[{" Canberra": -0.1}])
    runner.run([*ITEMS, QAItem("t:4", "Capital of Australia? Canberra", ("Canberra",),
                                "question")])
    assert load_run(db, runner.run_name).tokens[-1][0].token == " Canberra"


def test_a_newer_schema_is_refused(tmp_path):
    db = tmp_path / "future.sqlite"
    connect(db).close()
    conn = sqlite3.connect(db)
    conn.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    conn.commit()
    conn.close()
    with pytest.raises(EvalRunnerError, match="schema version 99"):
        connect(db)


def test_encoding_round_trips_exactly_and_keeps_none():
    tokens = (
        TokenLogprob(" é", -1e-300, ((" é", -1e-300), ("\n", -7.123456789012345))),
        TokenLogprob("", -0.1, ()),
        TokenLogprob("x", float("-inf"), ()),
    )
    assert decode_tokens(encode_tokens(tokens)) == tokens
    assert encode_tokens(None) is None and decode_tokens(None) is None
