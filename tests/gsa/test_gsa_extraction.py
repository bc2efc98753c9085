"""GSA P(YES) extraction: the three tiers, candidate lookup and text_hard rules."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import pytest

from confidence_router.gsa import (
    NO_TOKENS,
    YES_TOKENS,
    GsaExtractionWarning,
    GsaPrompt,
    GsaScore,
    extract_p_yes,
    parse_yes_no_text,
)


@dataclass
class _Obj:
    """Stands in for ollama's pydantic ``TokenLogprob`` (attribute access)."""

    token: str
    logprob: float


def _top(*pairs: tuple[str, float]) -> list[dict]:
    return [{"token": t, "logprob": lp} for t, lp in pairs]


# ---------------------------------------------------------------------- tier 1


def test_spec_examples() -> None:
    ext = extract_p_yes(_top(("YES", -0.1), ("NO", -3.0)), "YES")
    assert ext.extraction_mode == "logprob_softmax"
    assert ext.recognized
    assert round(ext.p_yes, 4) == 0.9478
    assert ext.yes_logprob == -0.1 and ext.no_logprob == -3.0

    equal = extract_p_yes(_top(("NO", -0.7), ("YES", -0.7)), "NO")
    assert equal.p_yes == 0.5

    one_sided = extract_p_yes(_top(("YES", -0.1), ("Sure", -2.5)), "YES")
    assert one_sided.extraction_mode == "logprob_softmax"
    assert one_sided.no_logprob is None  # raw value recorded as missing, -20 used inside
    assert one_sided.p_yes == pytest.approx(1 - 2.3e-9, abs=1e-10)
    assert 1 - one_sided.p_yes == pytest.approx(math.exp(-19.9), rel=1e-6)

    only_no = extract_p_yes(_top(("No", -0.05)), "No")
    assert only_no.p_yes == pytest.approx(math.exp(-19.95), rel=1e-6)
    assert only_no.yes_logprob is None


def test_candidate_sets() -> None:
    for base in ("YES", "Yes", "yes", "Y", "y"):
        assert base in YES_TOKENS and " " + base in YES_TOKENS
    for base in ("NO", "No", "no", "N", "n"):
        assert base in NO_TOKENS and " " + base in NO_TOKENS
    assert len(YES_TOKENS) == len(NO_TOKENS) == 10


def test_stable_softmax_extreme_values() -> None:
    ext = extract_p_yes(_top(("YES", -1000.0), ("NO", -1001.0)), "")
    assert ext.p_yes == pytest.approx(1 / (1 + math.exp(-1)))
    zero = extract_p_yes(_top(("NO", 0.0), ("YES", -math.inf)), "NO")
    assert zero.p_yes == 0.0 and zero.extraction_mode == "logprob_softmax"


def test_variants_not_summed_first_in_list_order_counts() -> None:
    # "Yes" and "YES" both present: only the first in list order counts.
    ext = extract_p_yes(_top(("Yes", -1.0), ("YES", -1.2), ("NO", -1.0)), "Yes")
    assert ext.yes_logprob == -1.0
    assert ext.p_yes == 0.5  # summing would give > 0.5


def test_pass1_exact_beats_earlier_pass2_match() -> None:
    # "\nYES" only matches in pass 2; the exact " yes" later in the list wins pass 1.
    ext = extract_p_yes(_top(("\nYES", -0.5), ("NO", -2.0), (" yes", -1.5)), "\nYES")
    assert ext.yes_logprob == -1.5


def test_pass2_matches_stripped_uppercase_forms() -> None:
    ext = extract_p_yes(_top(("YES ", -0.2), ("nO\n", -2.0)), "YES")
    assert ext.yes_logprob == -0.2 and ext.no_logprob == -2.0
    ext = extract_p_yes(_top(("  yes", -0.3)), "")  # two spaces: not a pass-1 candidate
    assert ext.yes_logprob == -0.3
    assert ext.extraction_mode == "logprob_softmax"


def test_leading_space_candidates_match_in_pass1() -> None:
    ext = extract_p_yes(_top((" yes", -0.3), (" No", -1.3)), " yes")
    assert (ext.yes_logprob, ext.no_logprob) == (-0.3, -1.3)


def test_sentencepiece_marker_does_not_match() -> None:
    ext = extract_p_yes(_top(("\u2581YES", -0.1), ("\u2581NO", -2.0)), "YES")
    # neither side found in the top list -> falls through to text_hard on the text
    assert ext.extraction_mode == "text_hard"
    assert ext.p_yes == 1.0
    assert ext.yes_logprob is None and ext.no_logprob is None


def test_item_shapes_objects_dicts_pairs() -> None:
    expected = extract_p_yes(_top(("YES", -0.4), ("NO", -1.1)), "").p_yes
    assert extract_p_yes([_Obj("YES", -0.4), _Obj("NO", -1.1)], "").p_yes == expected
    assert extract_p_yes([("YES", -0.4), ("NO", -1.1)], "").p_yes == expected


def test_malformed_items_are_ignored() -> None:
    items = [
        {"token": "YES"},
        {"token": None, "logprob": -0.1},
        "garbage",
        {"token": "NO", "logprob": float("nan")},
        {"token": "No", "logprob": -2.0},
    ]
    ext = extract_p_yes(items, "")
    assert ext.yes_logprob is None and ext.no_logprob == -2.0


# ---------------------------------------------------------------------- tier 2


def test_text_hard_when_no_logprobs() -> None:
    tops: list[list[dict] | None] = [None, []]
    for top in tops:
        ext = extract_p_yes(top, " Yes.")
        assert ext.extraction_mode == "text_hard"
        assert ext.recognized and ext.p_yes == 1.0
        assert ext.yes_logprob is None and ext.no_logprob is None


def test_text_hard_when_top_list_has_neither_side() -> None:
    ext = extract_p_yes(_top(("Maybe", -0.1), ("I", -1.0)), "NO")
    assert ext.extraction_mode == "text_hard" and ext.p_yes == 0.0


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("YES", 1.0),
        ("yes", 1.0),
        (" Yes. ", 1.0),
        ("(YES)", 1.0),
        ('"no"', 0.0),
        ("`NO`", 0.0),
        ("Y", 1.0),
        ("n", 0.0),
        ("No, I cannot.", 0.0),
        ("Yes I can", 1.0),
        ("Nope", 0.0),  # prefix NO
        ("NONE", 0.0),  # prefix NO
        ("Yesterday", 1.0),  # prefix YES
        ("Y es", 1.0),  # first word "Y"
        ("**YES**", None),  # markdown is unparseable
        ("Maybe", None),
        ("", None),
        ("   ", None),
        ("...", None),
    ],
)
def test_text_hard_rules(text: str, expected: float | None) -> None:
    assert parse_yes_no_text(text) == expected


def test_text_hard_consequences_via_extract() -> None:
    assert extract_p_yes(None, "Nope").p_yes == 0.0
    assert extract_p_yes(None, "NONE").p_yes == 0.0
    assert extract_p_yes(None, "Yesterday").p_yes == 1.0


# ---------------------------------------------------------------------- tier 3


def test_neutral_with_warning() -> None:
    with pytest.warns(GsaExtractionWarning):
        ext = extract_p_yes(None, "**YES**")
    assert ext.extraction_mode == "neutral"
    assert ext.p_yes == 0.5
    assert not ext.recognized


def test_neutral_for_empty_everything() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ext = extract_p_yes([], None)
    assert ext.extraction_mode == "neutral" and ext.p_yes == 0.5
    assert any(issubclass(w.category, GsaExtractionWarning) for w in caught)


def test_no_warning_when_recognized() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        extract_p_yes(_top(("YES", -0.1)), "YES")
        extract_p_yes(None, "NO")


# ---------------------------------------------------------------------- record


def test_gsa_score_from_parts() -> None:
    prompt = GsaPrompt(
        text="p", version="gsa-v3-retrieval-conditional", had_retrieval=True, n_hits_used=2
    )
    ext = extract_p_yes(_top(("YES", -0.1), ("NO", -3.0)), "YES")
    score = GsaScore.from_parts(
        prompt, ext, raw_text="YES", latency_s=0.25, retrieval_latency_s=0.01, n_hits_retrieved=5
    )
    assert score.p_yes == ext.p_yes
    assert score.prompt_version == "gsa-v3-retrieval-conditional"
    assert score.had_retrieval and score.n_hits_used == 2 and score.n_hits_retrieved == 5
    data = score.to_dict()
    assert data["extraction_mode"] == "logprob_softmax"
    assert data["latency_s"] == 0.25 and data["prompt"] == "p"
