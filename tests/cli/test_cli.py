"""The ``confidence-router`` command line: version, help, serve's port errors, eval's early
dataset check, and the demo's table and guidance on the scripted test bed."""

from __future__ import annotations

import io
import os
import re
import socket
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from confidence_router.cli import build_parser, main
from confidence_router.commands import COMMANDS as _COMMANDS
from confidence_router.demo import DemoRow, guidance, print_table, run_demo, shorten
from confidence_router.settings import RouterSettings

ROOT = Path(__file__).resolve().parents[2]


def _cli(*args: str, env: dict[str, str] | None = None,
         timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run the real entry point in a subprocess (what a user types)."""
    return subprocess.run(
        [sys.executable, "-c", "from confidence_router.cli import main; raise SystemExit(main())",
         *args],
        check=False, capture_output=True, text=True, timeout=timeout,
        env=env or dict(os.environ),
    )


# ---- --version and --help ---------------------------------------------------------------------


def test_version_is_the_package_metadata_version(capsys: pytest.CaptureFixture[str]) -> None:
    from importlib.metadata import version

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"confidence-router {version('confidence-router')}"


def test_help_lists_every_command_with_its_one_line_summary() -> None:
    text = build_parser().format_help()
    text, epilog = text.split("\nRun 'confidence-router COMMAND --help'")
    assert epilog.strip() == "for a command's options."
    assert set(_COMMANDS) >= {"demo", "serve", "calibrate", "eval", "eval-report", "eval-all"}
    for name, registered in _COMMANDS.items():
        summary = registered.summary
        assert "\n" not in summary and summary.strip() == summary and summary
        # argparse may wrap a long summary (also after a hyphen, as textwrap does): compare
        # with whitespace collapsed and hyphen breaks joined.
        listed = re.search(rf"^\s+{re.escape(name)}\s+(.+?)(?=^\s{{4}}\S|\Z)", text,
                           re.MULTILINE | re.DOTALL)
        assert listed is not None, (name, text)
        assert re.sub(r"-\n\s+", "-", listed.group(1)).split() == summary.split()
    assert "``" not in text and ":func:" not in text and "::" not in text  # no reST markup
    assert "--version" in text


def test_each_command_help_is_plain_text() -> None:
    for name in _COMMANDS:
        result = _cli(name, "--help")
        assert result.returncode == 0, result.stderr
        assert "``" not in result.stdout and ":class:" not in result.stdout


# ---- serve: one clear line for a bad or busy port ----------------------------------------------


def test_serve_on_a_busy_port_prints_one_line_and_loads_nothing() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-c",
             ("import sys\n"
             "from confidence_router.cli import main\n"
             f"code = main(['serve', '--port', '{port}'])\n"
             "print('llama_cpp imported:', 'llama_cpp' in sys.modules)\n"
             "raise SystemExit(code)")],
            check=False, capture_output=True, text=True, timeout=120,
        )
    assert result.returncode == 2
    assert result.stdout.strip() == "llama_cpp imported: False"  # the model never started loading
    (line,) = result.stderr.strip().splitlines()
    assert line == (f"confidence-router serve: error: port {port} on 127.0.0.1 is already in "
                    "use (another server?); choose another with --port, or --port 0 for a free one")


@pytest.mark.parametrize("port", ["70000", "-1"])
def test_serve_on_an_impossible_port_prints_one_line(port: str) -> None:
    result = _cli("serve", "--port", port)
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert line == ("confidence-router serve: error: --port must be between 0 and 65535 "
                    f"(0 picks a free port), got {port}")


def test_serve_with_a_non_numeric_port_is_an_argparse_error() -> None:
    result = _cli("serve", "--port", "http")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "argument --port: invalid int value: 'http'" in result.stderr


# ---- eval: a bad dataset fails before any model loads ------------------------------------------


def test_eval_unknown_dataset_fails_before_loading_the_model(tmp_path: Path) -> None:
    pytest.importorskip("sklearn", reason="the eval extra is needed to get past its check")
    result = _cli("eval", "--dataset", "nosuch", "--db", str(tmp_path / "x.sqlite"))
    assert result.returncode == 2
    assert "unknown dataset 'nosuch'" in result.stderr
    # The embedded model announces itself before loading; it must never get that far.
    assert "starting the embedded model" not in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "x.sqlite").exists()


def test_eval_missing_dataset_file_fails_before_loading_the_model(tmp_path: Path) -> None:
    pytest.importorskip("sklearn", reason="the eval extra is needed to get past its check")
    missing = tmp_path / "questions.jsonl"
    result = _cli("eval", "--dataset", str(missing), "--ollama-url", "http://127.0.0.1:9",
                  "--model", "m")
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"confidence-router eval: error: dataset file not found: {str(missing)!r}")


# ---- demo ----------------------------------------------------------------------------------------


def _row(question: str, confidence: float | None, *, correct: bool = True,
         decision: str = "local", would_escalate: bool = False) -> DemoRow:
    return DemoRow(question=question, answer="an answer", correct=correct, decision=decision,
                   reason="", confidence=confidence, would_escalate=would_escalate,
                   local_answer="an answer")


def test_shorten_cuts_between_words_and_marks_the_cut() -> None:
    question = "Who composed the opera 'The Cunning Little Vixen'?"
    assert shorten(question, 100) == question
    cut = shorten(question, 30)
    assert cut == "Who composed the opera 'The..."
    assert len(cut) <= 30
    assert shorten("Supercalifragilisticexpialidocious", 10) == "Superca..."
    assert shorten("two\nlines", 20) == "two lines"


def test_guidance_computes_a_stricter_thresholds_effect_on_these_rows() -> None:
    rows = [_row("a", 0.95), _row("b", 0.8, correct=False), _row("c", 0.6),
            _row("d", None)]
    line = guidance(rows, 0.7, has_cloud=False)
    assert "\n" not in line
    assert "a stricter --threshold 0.90 would keep 1 of 4 local (1 correct)" in line
    assert "AWS credentials" in line
    strict = guidance(rows, 0.95, has_cloud=True)
    assert "a looser --threshold 0.65 would keep 2 of 4 local (1 correct)" in strict
    assert "ConfidenceRoutedLLM(" in strict


def test_demo_table_on_the_test_bed_without_a_cloud(ollama_server, ollama_backend,
                                                    monkeypatch) -> None:
    # No AWS credentials at all: the demo must not look for a cloud.
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name, raising=False)
    long_question = ("In which year did the Treaty of Westphalia end the Thirty Years' War "
                     "in the Holy Roman Empire and beyond?")
    ollama_backend.add_answer("France", "Paris", logprobs=-0.05)
    ollama_backend.add_answer("Westphalia", "1648", logprobs=-0.5)  # 0.881
    ollama_backend.add_answer("Kenya", "Jomo Kenyatta", logprobs=-2.5)
    settings = replace(RouterSettings.load(environ={}), ollama_host=ollama_server.url,
                       local_model="scripted-local", threshold=0.7)
    out = io.StringIO()
    rows = run_demo(
        [("What is the capital of France?", ("Paris",)),
         (long_question, ("1648",)),
         ("Who was the second president of Kenya?", ("Moi",))],
        settings=settings, out=out, progress=False,
    )
    text = out.getvalue()
    assert [r.decision for r in rows] == ["local", "local", "local"]
    assert [r.would_escalate for r in rows] == [False, False, True]
    assert "cloud: no AWS credentials found" in text
    table = re.split(r"^-+$", text, flags=re.MULTILINE)[1]
    assert "would escalate" in table
    assert re.search(r"\blocal\b.*What is the capital of France\?", table)
    # The long question is cut between two words, with the cut marked.
    (long_line,) = [line for line in table.splitlines() if "Westphalia" in line]
    cell = long_line.split("✓", 1)[1].strip().split("  ")[0]
    assert cell.endswith("...") and long_question.startswith(cell[:-3])
    assert long_question[len(cell) - 3] == " "  # the next character was a space
    lines = text.rstrip().splitlines()
    assert lines[-2] == "2/3 kept local (2 of them correct), 1 would escalate."
    assert lines[-1].startswith("Try: a stricter --threshold 0.90 would keep 1 of 3 local")
    # Exactly one request per question reached the scripted model (no retries, no probes).
    assert [r["path"] for r in ollama_server.requests if r["method"] == "POST"] == [
        "/api/chat"] * 3


def test_demo_with_the_fake_bedrock_escalates(ollama_server, ollama_backend, bedrock_server):
    ollama_backend.add_answer("Kenya", "Jomo Kenyatta", logprobs=-2.5)
    bedrock_server.add_answer("Kenya", "Daniel arap Moi")
    settings = replace(RouterSettings.load(environ={}), ollama_host=ollama_server.url,
                       local_model="scripted-local", bedrock_endpoint=bedrock_server.url,
                       aws_region="us-east-1")
    out = io.StringIO()
    (row,) = run_demo([("Who was the second president of Kenya?", ("Moi",))],
                      settings=settings, out=out, progress=False)
    assert (row.decision, row.answer, row.correct) == ("cloud", "Daniel arap Moi", True)
    text = out.getvalue()
    assert "0/1 kept local (0 of them correct), 1 escalated." in text
    assert text.rstrip().splitlines()[-1].startswith("Try: a stricter --threshold 0.90")
    assert len(bedrock_server.requests) == 1


def test_print_table_labels_routes() -> None:
    out = io.StringIO()
    print_table([_row("q1", 0.9), _row("q2", 0.2, decision="cloud"),
                 _row("q3", 0.2, would_escalate=True)], 0.7, has_cloud=False, out=out)
    routes = [line.split()[1:3] for line in out.getvalue().splitlines()
              if line.strip().startswith(("0.", "unknown"))]
    assert routes == [["local", "✓"], ["cloud", "✓"], ["would", "escalate"]]


def test_a_command_without_a_summary_uses_its_docstring(monkeypatch) -> None:
    from confidence_router import cli, commands

    monkeypatch.setattr(commands, "COMMANDS", dict(commands.COMMANDS))

    @commands.command("hello-test", lambda parser: None)
    def _hello(args) -> int:
        """Say hello to the test.

        More text that --help does not show.
        """
        return 0

    assert commands.COMMANDS["hello-test"].summary == "Say hello to the test"
    help_text = " ".join(cli.build_parser().format_help().split())
    assert "hello-test Say hello to the test" in help_text
    assert cli.main(["hello-test"]) == 0
