"""Early exit replayed on stored evaluation runs (`eval-early-exit`).

The run is made by the real runner through the unchanged ChatOllama against the scripted
server, with answers whose figures are worked out by hand below.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from langchain_ollama import ChatOllama

from confidence_router.cli import main
from confidence_router.errors import InvalidArgumentError, RoutingConfigError
from confidence_router.evaluation.datasets import QAItem
from confidence_router.evaluation.exit_replay import decode_seconds_per_token, replay_early_exit
from confidence_router.evaluation.runner import EvalRunner, load_run

CAP = 8  # the run's num_predict
# Per-token latency of the scripted answers: the replay fits the decode time per token from it.
DELAY = 0.05


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


ITEMS = [
    QAItem("a", "What is the capital of France?", ("Paris",), "question"),
    QAItem("b", "What is the capital of Kenya?", ("Nairobi",), "question"),
    QAItem("c", "What is the capital of Peru?", ("Lima",), "question"),
    QAItem("d", "What is the capital of Chile?", ("Santiago",), "question"),
    QAItem("e", "What is the capital of Italy?", ("Rome",), "question"),
    QAItem("f", "What is the capital of Spain?", ("Madrid",), "question"),
]


@pytest.fixture
def run(ollama_backend, ollama_server, tmp_path: Path):
    # min_logprob scores at threshold 0.7 (sigmoid(2 * min + 3)):
    say = ollama_backend.add_answer
    say("France", [" Paris"], logprobs=[-0.05], token_delay=DELAY)  # right, 0.948: kept
    # wrong; exits at its 2nd (last) token: escalated, nothing saved
    say("Kenya", [" Mom", "basa"], logprobs=[-0.1, -3.0], token_delay=DELAY)
    # right; exits at token 2 of 3 (1 saved); scored 0.269 at the exit, 0.0067 in full
    say("Peru", [" Lima", " is", " nice"], logprobs=[-0.2, -2.0, -4.0], token_delay=DELAY)
    say("Chile", [" Santiago"], logprobs=[-1.0], token_delay=DELAY)  # right, 0.731: kept
    # right, kept by the mean (0.92) but its first token alone scores 0.5
    say("Italy", [" Rome", ",", " Italy", ".", "", ""],
        logprobs=[-1.5, -0.01, -0.01, -0.01, -0.01, -0.01], token_delay=DELAY)
    ollama_backend.fail("Spain", status=500)  # a failure row: excluded everywhere
    db = tmp_path / "runs.sqlite"
    runner = EvalRunner(
        ChatOllama(base_url=ollama_server.url, model="scripted-local"), db_path=db,
        dataset="toy", prompts="few-shot", num_predict=CAP, progress=False,
    )
    runner.run(ITEMS)
    return db, runner.run_name


def test_min_logprob_replay_matches_the_hand_count(run):
    db, name = run
    data = load_run(db, name)
    r = replay_early_exit(data, "min_logprob", 0.7)
    assert (r.run, r.dataset, r.signal, r.threshold, r.bound) == (
        name, "toy", "min_logprob", 0.7, f"cap {CAP}")
    assert r.answers == 5  # the failure row is not replayed
    assert r.escalated == 3  # Kenya, Peru, Italy (min -1.5 scores 0.5)
    assert r.exited == 3 and r.decisions_changed == 0  # exact rule
    assert r.tokens_escalated == 2 + 3 + 6
    assert r.tokens_saved == 0 + 1 + 5  # Italy exits at its first token
    assert r.token_share_saved == pytest.approx(6 / 11)
    assert r.seconds_per_token > 0  # fitted from latencies that grow by DELAY per token
    assert r.time_saved_s == pytest.approx(r.tokens_saved * r.seconds_per_token)
    assert r.time_share_saved == pytest.approx(r.time_saved_s / r.latency_escalated_s)
    # Labels: France, Peru, Chile, Italy right; Kenya wrong. In full, Peru (right) scores
    # below Kenya (wrong): one of four pairs inverted. At its exit Peru scores 0.269 > 0.047.
    assert r.auroc_full == pytest.approx(3 / 4)
    assert r.auroc_early == pytest.approx(1.0)


def test_a_horizon_shorter_than_the_cap_can_change_decisions(run):
    db, name = run
    data = load_run(db, name)
    # The mean: with the true cap (8), Italy's first token (-1.5) could still be averaged up
    # by certain tokens: no exit. Assuming no more tokens (horizon 0) exits at once, although
    # the whole answer's mean (-0.258 -> 0.92) keeps it local.
    exact = replay_early_exit(data, "mean_logprob", 0.7)
    assert exact.decisions_changed == 0
    guess = replay_early_exit(data, "mean_logprob", 0.7, horizon=0)
    assert guess.bound == "horizon 0"
    assert guess.decisions_changed >= 1
    italy = sigmoid(2 * (-1.5 - 0.05) / 6 + 3)
    assert italy > 0.7  # the whole answer is kept: the exit changed a decision


def test_bad_arguments_are_typed_errors(run):
    db, name = run
    data = load_run(db, name)
    with pytest.raises(RoutingConfigError, match="threshold"):
        replay_early_exit(data, "min_logprob", 1.5)
    with pytest.raises(RoutingConfigError, match="signal"):
        replay_early_exit(data, "nope", 0.7)
    with pytest.raises(InvalidArgumentError, match="horizon"):
        replay_early_exit(data, "min_logprob", 0.7, horizon=-1)


def test_decode_seconds_per_token():
    assert decode_seconds_per_token([1, 2, 4], [0.25, 0.30, 0.40]) == pytest.approx(0.05)
    assert decode_seconds_per_token([1, float("nan"), 3], [0.1, 9.0, 0.3]) == pytest.approx(0.1)
    assert math.isnan(decode_seconds_per_token([2, 2], [0.1, 0.3]))  # one length only
    assert math.isnan(decode_seconds_per_token([1, 2], [0.3, 0.1]))  # not positive
    with pytest.raises(InvalidArgumentError, match="length"):
        decode_seconds_per_token([1, 2], [0.1])


def test_cli_prints_a_row_per_run_signal_and_bound(run, capsys):
    db, name = run
    assert main(["eval-early-exit", "--db", str(db), "--horizon", "2"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith(f"| {name}")]
    assert len(rows) == 3 * 2  # three signals, cap and horizon 2
    first = rows[0].split(" | ")
    assert first[1:4] == ["min_logprob", f"cap {CAP}", "3/5"]
    assert first[5].startswith("6/11 (55%)")
    assert first[7] == "0"


def test_cli_rejects_a_missing_database_and_run(run, tmp_path, capsys):
    db, _ = run
    assert main(["eval-early-exit", "--db", str(tmp_path / "none.sqlite")]) == 2
    assert main(["eval-early-exit", "--db", str(db), "--run", "no-such-run"]) == 2
    assert "no-such-run" in capsys.readouterr().err
