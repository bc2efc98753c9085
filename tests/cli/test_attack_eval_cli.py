"""Attack round on the evaluation commands: bad paths, bad numbers, broken files and missing
extras end with a non-zero exit code and one line on stderr, never a traceback."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from confidence_router.cli import main

pytest.importorskip("sklearn", reason="the eval extra is needed to get past its check")


def one_line_error(capsys, *argv: str, code: int = 2) -> str:
    """Run the CLI in-process; it must return ``code`` and print exactly one stderr line."""
    returned = main(list(argv))
    err = capsys.readouterr().err
    assert returned == code, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture
def files(tmp_path):
    corrupt = tmp_path / "corrupt.sqlite"
    corrupt.write_bytes(b"not a database\n" * 100)
    foreign = tmp_path / "foreign.sqlite"
    conn = sqlite3.connect(foreign)
    conn.execute("CREATE TABLE results (id INTEGER, score REAL)")
    conn.commit()
    conn.close()
    questions = tmp_path / "q.jsonl"
    questions.write_text(json.dumps({"question": "Who wrote Hamlet?", "answers": ["Shakespeare"]})
                         + "\n")
    a_file = tmp_path / "plain.txt"
    a_file.write_text("x")
    return {"corrupt": corrupt, "foreign": foreign, "questions": questions, "file": a_file,
            "dir": tmp_path}


def _eval(files, *extra: str) -> list[str]:
    return ["eval", "--dataset", str(files["questions"]), "--ollama-url", "http://127.0.0.1:9",
            "--model", "m", "--no-progress", *extra]


# ---- eval -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["corrupt", "foreign"])
def test_eval_into_a_broken_database(capsys, files, which):
    # Found: sqlite3.DatabaseError / OperationalError tracebacks (28 lines), and the foreign
    # file got the runner's tables added to it.
    line = one_line_error(capsys, *_eval(files, "--db", str(files[which])))
    assert line.startswith("confidence-router eval: error: ") and files[which].name in line


def test_eval_into_a_directory_or_below_a_file(capsys, files):
    line = one_line_error(capsys, *_eval(files, "--db", str(files["dir"])))
    assert "directory" in line
    line = one_line_error(capsys, *_eval(files, "--db", str(files["file"] / "x.sqlite")))
    assert "plain.txt" in line


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("--num-predict", "-3"),  # Found: accepted and sent to the server
        ("--num-predict", "0"),
        ("--concurrency", "0"),
        ("--limit", "-3"),
        ("--offset", "-1"),
        ("--timeout", "-1"),
        ("--timeout", "nan"),
        ("--timeout", "inf"),
        ("--kb-size", "0"),
        ("--kb-offset", "-5"),
        ("--tau", "1.5"),
        ("--tau", "nan"),
    ],
)
def test_eval_bad_numbers(capsys, files, tmp_path, option, value):
    db = tmp_path / "never.sqlite"
    line = one_line_error(capsys, *_eval(files, "--db", str(db), option, value))
    assert option in line and value in line
    assert not db.exists()  # refused before anything was written


def test_eval_empty_question_file(capsys, files, tmp_path):
    # Found: an empty file "ran" 0 items and exited 0.
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    line = one_line_error(capsys, "eval", "--dataset", str(empty), "--ollama-url",
                          "http://127.0.0.1:9", "--model", "m", "--db", str(tmp_path / "e.sqlite"))
    assert "no records" in line


def test_eval_bad_row_names_the_line(capsys, files, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"question": "Q?", "answers": ["A"]}\n{"question": "\xe9"}\n')
    line = one_line_error(capsys, "eval", "--dataset", str(bad), "--ollama-url",
                          "http://127.0.0.1:9", "--model", "m", "--db", str(tmp_path / "b.sqlite"))
    assert f"{bad}:2:" in line


def test_eval_where_every_answer_failed_exits_non_zero(capsys, files, tmp_path):
    # Found: nothing listens on port 9, every row was a failure row, and eval exited 0.
    db = tmp_path / "down.sqlite"
    returned = main(_eval(files, "--db", str(db)))
    captured = capsys.readouterr()
    assert returned == 1
    (line,) = captured.err.strip().splitlines()
    assert "every answer failed" in line and "local: ConnectError" in line


# ---- eval-report, eval-early-exit ---------------------------------------------------------------


@pytest.mark.parametrize("command", ["eval-report", "eval-early-exit"])
@pytest.mark.parametrize("which", ["corrupt", "foreign", "dir"])
def test_readers_of_a_broken_database(capsys, files, command, which):
    extra = ["--no-baseline"] if command == "eval-report" else []
    line = one_line_error(capsys, command, "--db", str(files[which]), *extra)
    assert line.startswith(f"confidence-router {command}: error: ")
    assert files[which].name in line or "directory" in line


def _good_db(tmp_path: Path) -> Path:
    from confidence_router.evaluation.runner import ResultRow, connect, register_run, write_row

    db = tmp_path / "good.sqlite"
    conn = connect(db)
    run_id = register_run(conn, name="r", dataset="d", model="m",
                          prompt_templates={"name": "p"}, grader="g")
    for i in range(30):
        write_row(conn, run_id, ResultRow(
            item_id=f"i{i}", position=i, dataset="d", question=f"q{i}?", gold_answers=("a",),
            answer="a", correct=i % 2, token_count=1, mean_logprob=-0.1 * i,
            min_logprob=-0.1 * i, confidence=0.9 - 0.01 * i, min_confidence=0.9 - 0.01 * i,
            latency_s=0.1, signal_unknown_reason=None, error=None,
        ))  # fmt: skip
    conn.close()
    return db


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["eval-report", "--no-baseline", "--bootstrap", "-3"], "--bootstrap"),
        (["eval-report", "--no-baseline", "--bootstrap", "0"], "--bootstrap"),
        (["eval-early-exit", "--threshold", "1.5"], "threshold"),
        (["eval-early-exit", "--threshold", "nan"], "threshold"),
        (["eval-early-exit", "--horizon", "-3"], "horizon"),
        (["eval-early-exit", "--signal", "bogus"], "bogus"),
        (["eval-early-exit", "--run", "nosuch"], "nosuch"),
        (["eval-report", "--no-baseline", "--run", "nosuch"], "nosuch"),
    ],
)
def test_readers_bad_numbers_and_names(capsys, tmp_path, argv, needle):
    db = _good_db(tmp_path)
    line = one_line_error(capsys, *argv, "--db", str(db))
    assert needle in line


def test_eval_report_into_a_file_as_out_dir(capsys, tmp_path, files):
    # Found: FileExistsError traceback from mkdir.
    db = _good_db(tmp_path)
    line = one_line_error(capsys, "eval-report", "--db", str(db), "--no-baseline",
                          "--out-dir", str(files["file"]))
    assert "plain.txt" in line


def test_eval_early_exit_on_a_database_without_runs(capsys, tmp_path):
    from confidence_router.evaluation.runner import connect

    db = tmp_path / "none.sqlite"
    connect(db).close()
    # Found: printed an empty table and exited 0.
    line = one_line_error(capsys, "eval-early-exit", "--db", str(db))
    assert "no runs" in line


def test_eval_all_refuses_bad_numbers_before_deleting_anything(capsys, tmp_path):
    db = _good_db(tmp_path)
    before = db.read_bytes()
    # Found: --fresh deleted the database first, then failed on the bad --limit.
    line = one_line_error(capsys, "eval-all", "--fresh", "--db", str(db), "--limit", "-3",
                          "--no-gsa")
    assert "--limit" in line
    assert db.read_bytes() == before


# ---- calibrate --------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["corrupt", "foreign", "dir"])
def test_calibrate_on_a_broken_database(capsys, files, which):
    line = one_line_error(capsys, "calibrate", str(files[which]), "--target-rate", "0.3")
    assert files[which].name in line or "directory" in line
    line = one_line_error(capsys, "calibrate", "--fit", str(files[which]))
    assert files[which].name in line or "directory" in line


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--target-rate", "1.5"], "1.5"),
        (["--target-rate", "nan"], "nan"),
        (["--target-accuracy", "-0.2"], "-0.2"),
        (["--signal", "bogus", "--target-rate", "0.3"], "bogus"),
        (["--run", "nosuch", "--target-rate", "0.3"], "nosuch"),
    ],
)
def test_calibrate_bad_values(capsys, tmp_path, argv, needle):
    db = _good_db(tmp_path)
    line = one_line_error(capsys, "calibrate", str(db), *argv)
    assert needle in line


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--holdout", "1.5"], "--holdout"),  # Found: reported "0 labelled rows" instead
        (["--holdout", "0"], "--holdout"),
        (["--target-accuracy", "2"], "2"),
        (["--out", "/proc/nonexistent-dir/cal.json"], "cal.json"),  # Found: OSError traceback
    ],
)
def test_calibrate_fit_bad_values(capsys, tmp_path, argv, needle):
    db = _good_db(tmp_path)
    line = one_line_error(capsys, "calibrate", "--fit", str(db), "--signal", "mean_logprob",
                          *argv)
    assert needle in line


# ---- missing extras ---------------------------------------------------------------------------------

BLOCK_SKLEARN = textwrap.dedent(
    """
    import sys

    class Block:
        def find_spec(self, name, path=None, target=None):
            if name == "sklearn" or name.startswith("sklearn."):
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None

    sys.meta_path.insert(0, Block())
    from confidence_router.cli import main
    sys.exit(main(sys.argv[1:]))
    """
)


@pytest.mark.parametrize("command", ["eval", "eval-report", "eval-early-exit", "eval-all"])
def test_missing_eval_extra_is_one_line(tmp_path, command):
    argv = {"eval": ["--dataset", "wikidata"], "eval-report": ["--no-baseline"],
            "eval-early-exit": [], "eval-all": ["--no-gsa"]}[command]
    result = subprocess.run(
        [sys.executable, "-c", BLOCK_SKLEARN, command, "--db", str(tmp_path / "x.sqlite"), *argv],
        check=False, capture_output=True, text=True, timeout=120, env=dict(os.environ),
    )
    assert result.returncode == 2, result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert "pip install" in line and "[eval]" in line


def test_eval_offset_past_the_end(capsys, files, tmp_path):
    # Found: "0 items, 0 already done, 0 written" and exit 0.
    line = one_line_error(capsys, *_eval(files, "--db", str(tmp_path / "o.sqlite"),
                                         "--offset", "5"))
    assert "--offset 5" in line
