"""The router on the signal library: every signal selectable (top-k signals included, since
the router asks the local tier for top alternatives), the default signal, and calibrated
P(correct) in the routing record with a threshold set as a target accuracy."""

from __future__ import annotations

import pytest

from confidence_router import ConfidenceRoutedLLM
from confidence_router.correctness import ConfidenceCalibration
from confidence_router.errors import RoutingConfigError
from confidence_router.policy import DEFAULT_POLICY
from confidence_router.signals import NEEDS_TOP_LOGPROBS, SIGNAL_SCORERS


@pytest.fixture
def scripted(ollama_backend, bedrock_server):
    # Two tokens: a sure one and a hesitant one (top alternatives close to it).
    ollama_backend.add_answer(
        "Kenya", ["Jomo", " Kenyatta"], logprobs=[-0.05, -0.9],
        top_logprobs=[{"Jomo": -0.05, "Daniel": -3.2}, {" Kenyatta": -0.9, " Moi": -1.0}],
    )
    bedrock_server.set_default("Daniel arap Moi")


@pytest.mark.parametrize("signal", sorted(SIGNAL_SCORERS))
def test_every_signal_is_known_through_the_router(signal, ollama_chat, bedrock_chat, scripted,
                                                  ollama_server):
    router = ConfidenceRoutedLLM(local=ollama_chat(), cloud=bedrock_chat(), signal=signal)
    routing = router.invoke("Second president of Kenya?").response_metadata["routing"]
    assert routing["signal"] == signal
    assert routing["confidence"] is not None and 0.0 <= routing["confidence"] <= 1.0
    # Top alternatives are requested from the local server only for the signals that read
    # them (margins and entropies): the others do not pay for them.
    requested = ollama_server.requests[-1]["body"].get("top_logprobs") or 0
    assert (requested >= 2) == (signal in NEEDS_TOP_LOGPROBS)


def test_default_signal_is_the_evaluated_best(ollama_chat):
    assert DEFAULT_POLICY.signal == "mean_min"
    assert ConfidenceRoutedLLM(local=ollama_chat()).signal == "mean_min"


def _calibration() -> ConfidenceCalibration:
    scores = [i / 100 for i in range(100)]
    labels = [1 if s >= 0.6 else 0 for s in scores]
    return ConfidenceCalibration.fit(scores, labels, signal="mean_logprob", method="isotonic")


def test_p_correct_in_the_record_and_threshold_from_target_accuracy(ollama_chat, bedrock_chat,
                                                                     scripted):
    calibration = _calibration()
    router = ConfidenceRoutedLLM(local=ollama_chat(), cloud=bedrock_chat(),
                                 confidence_calibration=calibration)
    routing = router.invoke("Second president of Kenya?").response_metadata["routing"]
    mean_score = routing["signals"]["confidence"]  # the calibration's own signal
    assert routing["p_correct"] == pytest.approx(calibration.p_correct(mean_score))

    target = ConfidenceRoutedLLM(local=ollama_chat(), cloud=bedrock_chat(),
                                 confidence_calibration=calibration, target_accuracy=0.9)
    assert target.signal == "mean_logprob"
    assert target.threshold == calibration.threshold_for_accuracy(0.9)
    with pytest.raises(RoutingConfigError, match="confidence_calibration"):
        ConfidenceRoutedLLM(local=ollama_chat(), target_accuracy=0.9)


def test_calibration_round_trip_through_a_file(tmp_path, ollama_chat, bedrock_chat, scripted):
    path = _calibration().save(tmp_path / "cal.json")
    loaded = ConfidenceCalibration.load(path)
    router = ConfidenceRoutedLLM(local=ollama_chat(), cloud=bedrock_chat(),
                                 confidence_calibration=loaded)
    assert "p_correct" in router.invoke("Kenya?").response_metadata["routing"]
