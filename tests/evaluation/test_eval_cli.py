"""``confidence-router eval`` / ``eval-report`` end to end against the scripted server."""

from __future__ import annotations

import json
import math

import pytest

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


def test_eval_with_gsa_probes(ollama_backend, ollama_server, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HOME", str(tmp_path))
    data = tmp_path / "gsa.jsonl"
    rows = [{"question": f"Which colour is item {i}?", "answers": [f"colour {i}"]}
            for i in range(30)]
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    ollama_backend.set_default(" no idea", logprobs=-1.0)
    probe = "Are you confident you can answer this question correctly?"
    ollama_backend.add_probe(probe, {"YES": -0.2, "NO": -1.8})
    db = tmp_path / "gsa.sqlite"
    args = ["eval", "--dataset", str(data), "--ollama-url", ollama_server.url,
            "--model", "scripted-local", "--db", str(db), "--limit", "10", "--gsa",
            "--kb-offset", "10", "--kb-size", "20", "--tau", "0.99", "--no-progress"]
    assert main(args) == 0
    (run,) = list_runs(db)
    loaded = load_run(db, run.name)
    v2, v3 = loaded.signal("gsa_v2.p_yes"), loaded.signal("gsa_v3.p_yes")
    expected = 1 / (1 + math.exp(-1.6))  # YES -0.2 vs NO -1.8
    assert v2.scores.tolist() == pytest.approx([expected] * 10)
    assert v3.scores.tolist() == pytest.approx([expected] * 10)
    # the store was seeded from the disjoint slice, with gold answers as content
    chat = [r["body"]["messages"][-1]["content"] for r in ollama_server.requests
            if r["path"] == "/api/chat"]
    assert sum(probe in text for text in chat) == 20  # one v2 + one v3 probe per item
    assert not any("Here is what you recall" in text for text in chat)  # tau 0.99: no hits
    # overlapping slices are refused
    bad = [*args[:-7], "--kb-offset", "5", "--kb-size", "20", "--no-progress"]
    assert main(bad) == 2
    assert "overlaps the evaluated items" in capsys.readouterr().err


def test_calibrate_command_on_an_eval_run(ollama_backend, ollama_server, tmp_path, capsys):
    data = tmp_path / "cal.jsonl"
    # 40 questions; confidence falls with i, and only the first 20 answers are right.
    rows = [{"question": f"Calibration question {i}?", "answers": ["right" if i < 20 else "x"]}
            for i in range(40)]
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    for i in range(40):
        ollama_backend.add_answer(f"Calibration question {i}?", " right", logprobs=-0.05 * (i + 1))
    db = tmp_path / "cal.sqlite"
    assert main(["eval", "--dataset", str(data), "--ollama-url", ollama_server.url,
                 "--model", "scripted-local", "--db", str(db), "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["calibrate", str(db), "--target-rate", "0.25", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["expected_call_rate"] == pytest.approx(0.25)
    # escalating the 10 least confident (i = 30..39) keeps everything above them
    assert result["threshold"] == pytest.approx(1 / (1 + math.exp(-(2 * -0.05 * 30 + 3))))
    assert main(["calibrate", str(db), "--target-accuracy", "1.0"]) == 0
    out = capsys.readouterr().out
    assert "expected call rate 0.500" in out  # keep only the 20 right answers
    assert main(["calibrate", str(tmp_path / "none.sqlite"), "--target-rate", "0.3"]) == 2


def test_eval_gsa_order_both_records_both_probe_orders(ollama_backend, ollama_server, tmp_path,
                                                       monkeypatch, capsys):
    from confidence_router.gsa import GSA_QUESTION_LAST_HEAD

    monkeypatch.setenv("HOME", str(tmp_path))
    data = tmp_path / "order.jsonl"
    rows = [{"question": f"Which shape is item {i}?", "answers": [f"shape {i}"]}
            for i in range(16)]
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    ollama_backend.set_default(" no idea", logprobs=-1.0)
    paper = "Are you confident you can answer this question correctly?"
    question_last = "Are you confident you can answer the question below correctly?"
    ollama_backend.add_probe(paper, {"YES": -0.2, "NO": -1.8})
    ollama_backend.add_probe(question_last, {"YES": -1.8, "NO": -0.2})
    db = tmp_path / "order.sqlite"
    args = ["eval", "--dataset", str(data), "--ollama-url", ollama_server.url,
            "--model", "scripted-local", "--db", str(db), "--limit", "6", "--gsa",
            "--kb-offset", "6", "--kb-size", "10", "--tau", "0.99", "--no-progress",
            "--gsa-order", "both"]
    assert main(args) == 0
    (run,) = list_runs(db)
    loaded = load_run(db, run.name)
    high, low = 1 / (1 + math.exp(-1.6)), 1 / (1 + math.exp(1.6))
    assert loaded.signal("gsa_v2.p_yes").scores.tolist() == pytest.approx([high] * 6)
    assert loaded.signal("gsa_v3.p_yes").scores.tolist() == pytest.approx([high] * 6)
    assert loaded.signal("gsa_v2_question_last.p_yes").scores.tolist() == pytest.approx([low] * 6)
    assert loaded.signal("gsa_v3_question_last.p_yes").scores.tolist() == pytest.approx([low] * 6)
    chat = [r["body"]["messages"][-1]["content"] for r in ollama_server.requests
            if r["path"] == "/api/chat"]
    last = [text for text in chat if text.startswith(GSA_QUESTION_LAST_HEAD)]
    assert len(last) == 12 and sum(paper in text for text in chat) == 12  # v2 + v3 per item
    questions = {row["question"] for row in rows[:6]}
    # question last, nothing after it; tau 0.99: no knowledge, so v3 == v2 byte for byte
    assert {text.rsplit("\n", 1)[1] for text in last} == questions
    assert len(set(last)) == 6

    # only one order: the default is the paper's, --gsa-order question-last the other
    db2 = tmp_path / "order2.sqlite"
    assert main([*args[:8], str(db2), *args[9:-1], "question-last"]) == 0
    (run2,) = list_runs(db2)
    names = set(load_run(db2, run2.name).extras)
    assert {"gsa_v2_question_last.p_yes", "gsa_v3_question_last.p_yes"} <= names
    assert not {"gsa_v2.p_yes", "gsa_v3.p_yes"} & names
    with pytest.raises(SystemExit):
        main([*args[:-1], "sideways"])
    assert "invalid choice: 'sideways'" in capsys.readouterr().err
