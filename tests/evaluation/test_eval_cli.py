"""``confidence-router eval`` / ``eval-report`` end to end against the scripted server."""

from __future__ import annotations

import json

from confidence_router.cli import build_parser, main
from confidence_router.evaluation.runner import list_runs, load_run


def test_eval_then_report(ollama_backend, ollama_server, tmp_path, capsys):
    data = tmp_path / "mini.jsonl"
    rows = [
        {"question": f"Where is the {'zebra' if i % 3 == 0 else 'lamp'} number {i}?",
         "answers": ["here" if i % 3 == 0 else "nowhere"]}
        for i in range(80)
    ]  # fmt: skip
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    ollama_backend.add_answer("zebra", " here", logprobs=-0.1)
    ollama_backend.add_answer("lamp", " here", logprobs=-2.0)
    db = tmp_path / "cli.sqlite"
    common = ["eval", "--dataset", str(data), "--ollama-url", ollama_server.url]
    common += ["--model", "scripted-local", "--db", str(db), "--concurrency", "4"]
    assert main([*common, "--limit", "50", "--no-progress"]) == 0
    assert main([*common, "--limit", "80", "--no-progress"]) == 0  # extends the same run
    out = capsys.readouterr().out
    assert "50 already done, 30 written" in out

    (run,) = list_runs(db)
    assert run.name == "mini__scripted-local__instruct-v1" and run.prompt_set == "instruct-v1"
    loaded = load_run(db, run.name)
    assert loaded.n == 80 and loaded.accuracy == 27 / 80

    out_dir = tmp_path / "results"
    report_args = ["eval-report", "--db", str(db), "--out-dir", str(out_dir), "--bootstrap", "50"]
    embed = ["--embeddings-url", ollama_server.url, "--embeddings-model", "scripted-local"]
    assert main([*report_args, *embed, "--name", "mini", "--curve-sizes", "25"]) == 0
    md = (tmp_path / "results" / "mini.md").read_text()
    assert "## Dataset: mini" in md and "### Learning curve" in md
    assert (tmp_path / "results" / "mini-roc.png").is_file()
    assert main([*report_args, "--no-baseline", "--name", "mini2"]) == 0
    assert "Not trained" in (tmp_path / "results" / "mini2.md").read_text()


def test_cli_errors_are_clear(tmp_path, capsys):
    assert main(["eval", "--dataset", "wikidata", "--ollama-url", "http://127.0.0.1:9"]) == 2
    assert "--model is required" in capsys.readouterr().err
    assert main(["eval-report", "--db", str(tmp_path / "missing.sqlite"), "--no-baseline"]) == 2
    assert "not found" in capsys.readouterr().err
    parser = build_parser()
    assert {"eval", "eval-report", "eval-all"} <= set(parser._subparsers._group_actions[0].choices)
