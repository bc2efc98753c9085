"""Attack round on the stored runs (SQLite): corrupted, foreign and other-schema files give a
typed error naming the file (and are left untouched); concurrent writers neither duplicate
nor lose rows; a failure never overwrites a completed row."""

from __future__ import annotations

import hashlib
import os
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from langchain_ollama import ChatOllama

from confidence_router.calibration import EvalDatabaseError, calibrate_run, load_scores_from_run
from confidence_router.errors import ConfidenceRouterError
from confidence_router.evaluation.datasets import QAItem
from confidence_router.evaluation.runner import (
    EvalRunner,
    ResultRow,
    connect,
    list_runs,
    load_run,
    register_run,
    write_row,
)


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _corrupt(tmp_path: Path) -> Path:
    path = tmp_path / "corrupt.sqlite"
    path.write_bytes(b"this is not a database at all\n" * 200)
    return path


def _foreign(tmp_path: Path) -> Path:
    """Another application's SQLite file that happens to have a ``results`` table."""
    path = tmp_path / "foreign.sqlite"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE results (id INTEGER PRIMARY KEY, score REAL, label TEXT)")
    conn.execute("INSERT INTO results (score, label) VALUES (0.5, 'x')")
    conn.commit()
    conn.close()
    return path


def _other_version(tmp_path: Path, version: str) -> Path:
    path = tmp_path / f"v{version}.sqlite"
    connect(path).close()
    conn = sqlite3.connect(path)
    conn.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (version,))
    conn.commit()
    conn.close()
    return path


READERS = {
    "connect": lambda p: connect(p).close(),
    "list_runs": list_runs,
    "load_run": lambda p: load_run(p, "anything"),
}


@pytest.mark.parametrize("reader", list(READERS), ids=str)
def test_corrupted_file_is_a_typed_error_naming_it(tmp_path, reader):
    # Found: sqlite3.DatabaseError "file is not a database", without the file name, from
    # every entry point (and a traceback from the CLI).
    path = _corrupt(tmp_path)
    before = _digest(path)
    with pytest.raises(EvalDatabaseError, match="corrupt.sqlite") as info:
        READERS[reader](path)
    assert isinstance(info.value, ConfidenceRouterError) and info.value.path == path
    assert _digest(path) == before


@pytest.mark.parametrize("reader", list(READERS), ids=str)
def test_foreign_sqlite_file_is_refused_and_left_untouched(tmp_path, reader):
    # Found: connect() added its tables to the foreign file, stamped schema_version 2 into it
    # and switched it to WAL; load_run then failed on missing columns.
    path = _foreign(tmp_path)
    with pytest.raises(EvalDatabaseError, match="foreign.sqlite.*not an evaluation database"):
        READERS[reader](path)
    conn = sqlite3.connect(path)
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    mode = conn.execute("PRAGMA journal_mode").fetchone()[0]
    conn.close()
    assert tables == {"results"} and mode == "delete"


@pytest.mark.parametrize("version", ["3", "abc"])
def test_other_schema_version_is_a_typed_error(tmp_path, version):
    # Found: "abc" raised a bare ValueError from int().
    path = _other_version(tmp_path, version)
    for read in READERS.values():
        with pytest.raises(EvalDatabaseError, match=f"v{version}.sqlite.*schema version"):
            read(path)


def test_schema_missing_a_table_is_a_typed_error(tmp_path):
    path = tmp_path / "half.sqlite"
    connect(path).close()
    conn = sqlite3.connect(path)
    conn.execute("DROP TABLE results")
    conn.commit()
    conn.close()
    with pytest.raises(EvalDatabaseError, match="half.sqlite.*results"):
        load_run(path, "x")


def test_empty_file_is_not_silently_turned_into_a_database_by_readers(tmp_path):
    path = tmp_path / "empty.sqlite"
    path.write_bytes(b"")
    with pytest.raises(EvalDatabaseError, match="empty.sqlite"):
        list_runs(path)
    assert path.read_bytes() == b""


def test_directory_as_database_is_a_typed_error(tmp_path):
    with pytest.raises(EvalDatabaseError, match="directory"):
        connect(tmp_path)


@pytest.mark.parametrize("maker", [_corrupt, _foreign])
def test_calibrate_reader_gives_typed_errors(tmp_path, maker):
    path = maker(tmp_path)
    with pytest.raises(EvalDatabaseError, match=path.name):
        calibrate_run(path, target_rate=0.3)


def test_calibrate_reader_on_a_bad_label_names_the_file(tmp_path):
    path = tmp_path / "labels.sqlite"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE results (correct TEXT, confidence REAL, error TEXT)")
    conn.execute("INSERT INTO results VALUES ('yes', 0.5, NULL)")
    conn.commit()
    conn.close()
    # Found: ValueError "invalid literal for int() with base 10: 'yes'".
    with pytest.raises(EvalDatabaseError, match="labels.sqlite.*'correct'"):
        load_scores_from_run(path, "confidence")


# ----------------------------------------------------------------------------------------------
# Writers
# ----------------------------------------------------------------------------------------------


def _row(item_id: str, *, error: str | None = None, correct: int | None = 1) -> ResultRow:
    return ResultRow(
        item_id=item_id, position=0, dataset="d", question="q?", gold_answers=("a",),
        answer=None if error else "a", correct=None if error else correct, token_count=None,
        mean_logprob=None, min_logprob=None, confidence=None, min_confidence=None,
        latency_s=0.1, signal_unknown_reason=None, error=error,
    )  # fmt: skip


def _register(conn: sqlite3.Connection) -> int:
    return register_run(conn, name="r", dataset="d", model="m",
                        prompt_templates={"name": "p"}, grader="g")


def test_a_failure_never_overwrites_a_completed_row(tmp_path):
    # Found: INSERT OR REPLACE let a second writer's failure row (e.g. a timeout in a
    # concurrent run of the same command) replace the first writer's completed row.
    conn = connect(tmp_path / "w.sqlite")
    run_id = _register(conn)
    write_row(conn, run_id, _row("a"))
    write_row(conn, run_id, _row("a", error="local: TimeoutError"))
    # A failure row is still replaced by a later success (retry_errors).
    write_row(conn, run_id, _row("b", error="local: TimeoutError"))
    write_row(conn, run_id, _row("b", correct=0))
    rows = dict(conn.execute("SELECT item_id, COALESCE(error, correct) FROM results"))
    conn.close()
    assert rows == {"a": 1, "b": 0}


def test_register_race_between_two_connections(tmp_path):
    # Found: both writers saw no run, both INSERTed; the second died with
    # sqlite3.IntegrityError "UNIQUE constraint failed: runs.name".
    db = tmp_path / "race.sqlite"
    connect(db).close()
    first = connect(db)
    first.execute("BEGIN IMMEDIATE")  # the first writer holds the write lock ...
    result: dict[str, object] = {}

    def register_second() -> None:
        second = connect(db)
        try:
            result["id"] = _register(second)
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            result["error"] = exc
        finally:
            second.close()

    thread = threading.Thread(target=register_second)
    thread.start()
    time.sleep(0.5)  # ... while the second looks the run up (not found) and waits to insert
    first_id = _register(first)  # the first inserts the run and commits
    thread.join(timeout=30)
    first.close()
    assert result == {"id": first_id}


CONCURRENT = textwrap.dedent(
    """
    import sys
    from langchain_ollama import ChatOllama
    from confidence_router.evaluation.datasets import QAItem
    from confidence_router.evaluation.runner import EvalRunner

    url, db, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    items = [QAItem(f"c:{i}", f"Concurrent question {i}?", ("yes",), "question")
             for i in range(n)]
    EvalRunner(ChatOllama(base_url=url, model="scripted-local"), db_path=db,
               dataset="conc", run_name="shared", progress=False).run(items)
    """
)


def test_two_processes_on_the_same_run(ollama_backend, ollama_server, tmp_path):
    n = 12
    ollama_backend.add_answer("Concurrent question", " yes", logprobs=-0.1, latency=0.05)
    db = tmp_path / "shared.sqlite"
    procs = [
        subprocess.Popen([sys.executable, "-c", CONCURRENT, ollama_server.url, str(db), str(n)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=dict(os.environ))
        for _ in range(2)
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err.decode()[-2000:]
    assert [r.name for r in list_runs(db)] == ["shared"]
    run = load_run(db, "shared")
    assert sorted(run.item_ids) == sorted(f"c:{i}" for i in range(n))  # each exactly once
    assert run.n_errors == 0 and run.accuracy == 1.0
    # And a third run of the same command has nothing left to do.
    again = EvalRunner(ChatOllama(base_url=ollama_server.url, model="scripted-local"),
                       db_path=db, dataset="conc", run_name="shared", progress=False)
    ollama_server.clear_requests()
    summary = again.run([QAItem(f"c:{i}", f"Concurrent question {i}?", ("yes",), "question")
                         for i in range(n)])
    assert (summary.n_skipped, summary.n_written) == (n, 0)
    assert ollama_server.requests_to("/api/chat") == []


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_predict": -3}, "num_predict"),  # Found: accepted and sent to Ollama
        ({"num_predict": 0}, "num_predict"),
        ({"num_predict": 2.5}, "num_predict"),
        ({"timeout_s": float("inf")}, "timeout_s"),  # Found: accepted
        ({"timeout_s": float("nan")}, "timeout_s"),
        ({"concurrency": 0}, "concurrency"),
        ({"concurrency": True}, "concurrency"),
    ],
)
def test_runner_refuses_impossible_settings(ollama_server, tmp_path, kwargs, match):
    from confidence_router.errors import InvalidArgumentError

    with pytest.raises(InvalidArgumentError, match=match):
        EvalRunner(ChatOllama(base_url=ollama_server.url, model="m"),
                   db_path=tmp_path / "x.sqlite", dataset="d", **kwargs)
    assert not (tmp_path / "x.sqlite").exists()


def test_runner_refuses_duplicate_item_ids_before_writing(ollama_server, tmp_path):
    from confidence_router.errors import InvalidArgumentError

    runner = EvalRunner(ChatOllama(base_url=ollama_server.url, model="m"),
                        db_path=tmp_path / "x.sqlite", dataset="d", progress=False)
    item = QAItem("same", "Q?", ("A",), "question")
    with pytest.raises(InvalidArgumentError, match="duplicate item ids"):
        runner.run([item, item])
    assert ollama_server.requests_to("/api/chat") == []


def test_cancelled_run_resumes_without_duplicates_or_losses(ollama_backend, ollama_server, tmp_path):
    # Ctrl-C in `eval` cancels the run's task: the rows committed so far stay, the database is
    # not left locked, and the same run resumes with exactly the missing items.
    import asyncio

    n = 10
    ollama_backend.add_answer("Cancel question", " yes", logprobs=-0.1, latency=0.1)
    db = tmp_path / "cancel.sqlite"
    items = [QAItem(f"x:{i}", f"Cancel question {i}?", ("yes",), "question") for i in range(n)]

    def make() -> EvalRunner:
        return EvalRunner(ChatOllama(base_url=ollama_server.url, model="scripted-local"),
                          db_path=db, dataset="cancel", run_name="c", concurrency=2,
                          progress=False)

    def committed() -> int:
        if not db.exists():
            return 0
        conn = sqlite3.connect(db)
        try:
            return conn.execute("SELECT COUNT(*) FROM results").fetchone()[0]
        except sqlite3.OperationalError:
            return 0
        finally:
            conn.close()

    async def interrupt() -> None:
        task = asyncio.ensure_future(make().arun(items))
        for _ in range(600):
            await asyncio.sleep(0.02)
            if committed() >= 3:
                break
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(interrupt())
    done_before = committed()
    assert 3 <= done_before < n
    ollama_server.clear_requests()
    summary = make().run(items)
    assert (summary.n_skipped, summary.n_written) == (done_before, n - done_before)
    asked = [q["body"]["messages"][0]["content"] for q in ollama_server.requests_to("/api/chat")]
    assert len(asked) == n - done_before
    run = load_run(db, "c")
    assert sorted(run.item_ids) == sorted(it.id for it in items) and run.n_errors == 0


def test_a_stored_value_that_does_not_decode_names_the_file(tmp_path):
    db = tmp_path / "garbled.sqlite"
    conn = connect(db)
    run_id = _register(conn)
    write_row(conn, run_id, _row("a"))
    conn.execute("UPDATE results SET extras = '[1, 2]'")  # another tool wrote a list
    conn.commit()
    conn.close()
    # Found: AttributeError "'list' object has no attribute 'items'".
    with pytest.raises(EvalDatabaseError, match="garbled.sqlite.*decoded"):
        load_run(db, "r")


def test_a_failing_write_names_the_database(ollama_backend, ollama_server, tmp_path):
    # A write refused by SQLite (here a trigger stands in for a full disk or a lock held past
    # the 30 s timeout) ends the run with a typed error naming the file; found: a bare
    # sqlite3.IntegrityError from inside the runner.
    ollama_backend.add_answer("Write question", " yes", logprobs=-0.1)
    db = tmp_path / "refusing.sqlite"
    connect(db).close()
    conn = sqlite3.connect(db)
    conn.execute("CREATE TRIGGER refuse BEFORE INSERT ON results "
                 "BEGIN SELECT RAISE(ABORT, 'database or disk is full'); END")
    conn.commit()
    conn.close()
    runner = EvalRunner(ChatOllama(base_url=ollama_server.url, model="scripted-local"),
                        db_path=db, dataset="w", progress=False)
    with pytest.raises(EvalDatabaseError, match="refusing.sqlite.*disk is full"):
        runner.run([QAItem("w:1", "Write question 1?", ("yes",), "question")])


CREATE_MANY = textwrap.dedent(
    """
    import sys
    from confidence_router.evaluation.runner import connect
    for i in range(int(sys.argv[2])):
        connect(f"{sys.argv[1]}/db{i}.sqlite").close()
    """
)


def test_processes_creating_the_same_new_files_never_see_half_a_schema(tmp_path):
    # Two processes open the same 40 new files at the same time: each file's schema appears
    # in one transaction, so neither process ever takes a half-created file for a foreign one.
    procs = [
        subprocess.Popen([sys.executable, "-c", CREATE_MANY, str(tmp_path), "40"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=dict(os.environ))
        for _ in range(2)
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err.decode()[-2000:]
    for i in range(40):
        assert list_runs(tmp_path / f"db{i}.sqlite") == []
