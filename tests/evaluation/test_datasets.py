"""Tests for confidence_router.evaluation.datasets (offline; no network)."""

from __future__ import annotations

import json
import os
import sys
import types
from pathlib import Path
from typing import Any

import pytest

from confidence_router.evaluation import datasets as datasets_module
from confidence_router.evaluation.datasets import (
    DATA_DIR_ENV,
    KNOWN_DATASETS,
    SAMPLE_DATASETS,
    QAItem,
    dataset_file,
    load_dataset,
    load_hf_dataset,
    question_hash_id,
    resolve_data_dir,
)


def _write_jsonl(path: Path, records: list[Any]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


# ----------------------------------------------------------------------------------------------
# Schemas
# ----------------------------------------------------------------------------------------------


def test_wikidata_schema(tmp_path: Path) -> None:
    path = _write_jsonl(
        tmp_path / "wiki.jsonl",
        [
            {"prompt": "The country of Novosibirsk is", "answer": "Russia"},
            {"prompt": "The capital of France is ", "answer": " Paris "},
        ],
    )
    items = load_dataset(path)
    assert items == [
        QAItem("wiki:1", "The country of Novosibirsk is", ("Russia",), "completion"),
        QAItem("wiki:2", "The capital of France is", ("Paris",), "completion"),
    ]


def test_triviaqa_schema_strips_scaffold_and_dedupes(tmp_path: Path) -> None:
    path = _write_jsonl(
        tmp_path / "tqa.jsonl",
        [
            {
                "context": "Question: What type of animal is a dik-dik?\nAnswer:",
                "answer": "Antelope",
                "aliases": ["Antelopes", "Antelope", "antelope", " Antelopes "],
            },
            {"context": "Which planet is red?", "answer": "Mars", "aliases": []},
        ],
    )
    first, second = load_dataset(str(path))
    assert first.question == "What type of animal is a dik-dik?"
    # canonical first, exact de-duplication after strip (case kept distinct)
    assert first.answers == ("Antelope", "Antelopes", "antelope")
    assert first.prompt_style == "question"
    assert first.id == "tqa:1"
    assert second.question == "Which planet is red?"  # no scaffold: kept as is
    assert second.answers == ("Mars",)


def test_nq_open_schema(tmp_path: Path) -> None:
    path = _write_jsonl(
        tmp_path / "nq.jsonl",
        [
            {"question": "who wrote hamlet", "answer": ["Shakespeare", "William Shakespeare"]},
            {"question": "largest planet", "answer": "Jupiter"},  # a bare string is tolerated
        ],
    )
    a, b = load_dataset(path)
    assert a == QAItem(
        "nq:1", "who wrote hamlet", ("Shakespeare", "William Shakespeare"), "question"
    )
    assert b.answers == ("Jupiter",)


def test_generic_schema_with_ids_and_style(tmp_path: Path) -> None:
    path = _write_jsonl(
        tmp_path / "gen.jsonl",
        [
            {"id": "q-7", "question": "2+2?", "answers": ["4", "four"]},
            {"question": "The sky is", "answers": ["blue"], "prompt_style": "completion"},
        ],
    )
    a, b = load_dataset(path)
    assert a.id == "q-7" and a.answers == ("4", "four")
    assert b.id == "gen:2" and b.prompt_style == "completion"


def test_blank_lines_skipped_and_line_numbers_physical(tmp_path: Path) -> None:
    path = tmp_path / "w.jsonl"
    path.write_text(
        '{"prompt": "A is", "answer": "x"}\n\n   \n{"prompt": "B is", "answer": "y"}\n',
        encoding="utf-8",
    )
    assert [i.id for i in load_dataset(path)] == ["w:1", "w:4"]


def test_limit_offset_and_determinism(tmp_path: Path) -> None:
    path = _write_jsonl(
        tmp_path / "n.jsonl", [{"question": f"q{i}", "answer": [f"a{i}"]} for i in range(10)]
    )
    assert [i.question for i in load_dataset(path, limit=3)] == ["q0", "q1", "q2"]
    assert [i.question for i in load_dataset(path, limit=2, offset=5)] == ["q5", "q6"]
    assert [i.question for i in load_dataset(path, offset=8)] == ["q8", "q9"]
    assert load_dataset(path, offset=20) == []
    assert load_dataset(path, limit=0) == []
    assert load_dataset(path) == load_dataset(path)


# ----------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------


def test_unknown_name_lists_known_names() -> None:
    with pytest.raises(ValueError, match="known names: nq_open, triviaqa, wikidata"):
        load_dataset("squad")


def test_missing_path_is_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not found"):
        load_dataset(tmp_path / "nope.jsonl")


@pytest.mark.parametrize(
    ("lines", "bad_line", "match"),
    [
        (['{"prompt": "A is", "answer": "x"}', "{not json"], 2, "invalid JSON"),
        (['{"prompt": "A is", "answer": "x"}', "[1, 2]"], 2, "JSON object"),
        (['{"foo": 1}'], 1, "unrecognised record keys"),
        (['{"prompt": "A is", "answer": 3}'], 1, "'answer' must be a string"),
        (['{"prompt": "   ", "answer": "x"}'], 1, "'prompt' is empty"),
        (['{"question": "q", "answer": []}'], 1, "no non-empty gold answer"),
        (['{"question": "q", "answer": [1]}'], 1, "list of strings"),
        (['{"context": "Question: \\nAnswer:", "answer": "x"}'], 1, "no question text"),
        (['{"prompt": "A is", "answer": "x"}', '{"question": "q", "answer": ["a"]}'], 2, "schema"),
        (['{"id": 1, "question": "q", "answers": ["a"]}'] * 2, 2, "duplicate id"),
        (['{"question": "q", "answers": ["a"], "prompt_style": "chat"}'], 1, "prompt_style"),
    ],
)
def test_malformed_line_reports_file_and_line(
    tmp_path: Path, lines: list[str], bad_line: int, match: str
) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=match) as info:
        load_dataset(path)
    assert str(info.value).startswith(f"{path}:{bad_line}: ")


@pytest.mark.parametrize(("limit", "offset"), [(-1, 0), (None, -2), (1.5, 0)])
def test_bad_window_arguments(tmp_path: Path, limit: Any, offset: Any) -> None:
    path = _write_jsonl(tmp_path / "n.jsonl", [{"question": "q", "answer": ["a"]}])
    with pytest.raises(ValueError, match="limit|offset"):
        load_dataset(path, limit=limit, offset=offset)


# ----------------------------------------------------------------------------------------------
# Data-directory resolution
# ----------------------------------------------------------------------------------------------


def _fake_data_dir(root: Path) -> Path:
    data = root / "data"
    data.mkdir(parents=True)
    _write_jsonl(data / KNOWN_DATASETS["wikidata"], [{"prompt": "X is", "answer": "y"}])
    return data


def test_resolve_explicit_then_env_then_none(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = _fake_data_dir(tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    assert resolve_data_dir() is None  # nothing configured: no directory guessing
    monkeypatch.setenv(DATA_DIR_ENV, str(data))
    assert resolve_data_dir() == data
    assert load_dataset("wikidata")[0].id == f"{KNOWN_DATASETS['wikidata'][:-6]}:1"
    monkeypatch.setenv(DATA_DIR_ENV, str(other))
    assert resolve_data_dir() == other
    # the explicit argument wins over the variable
    assert resolve_data_dir(data) == data
    assert load_dataset("wikidata", data_dir=data)[0].answers == ("y",)


def test_resolve_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match=DATA_DIR_ENV):
        resolve_data_dir()
    # a configured but missing directory is an error, not a silent fallback to the samples
    with pytest.raises(FileNotFoundError, match=DATA_DIR_ENV):
        load_dataset("wikidata")
    with pytest.raises(FileNotFoundError, match="not a directory"):
        resolve_data_dir(tmp_path / "missing")
    monkeypatch.delenv(DATA_DIR_ENV)
    # nq_open has no packaged sample: the message says how to point at the full file
    with pytest.raises(FileNotFoundError, match=f"data_dir=.*{DATA_DIR_ENV}.*nq_open_dev"):
        load_dataset("nq_open")


def test_known_file_missing_in_data_dir(tmp_path: Path) -> None:
    data = _fake_data_dir(tmp_path)
    with pytest.raises(FileNotFoundError, match="nq_open_dev.jsonl"):
        load_dataset("nq_open", data_dir=data)


# ----------------------------------------------------------------------------------------------
# Packaged samples
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(SAMPLE_DATASETS))
def test_packaged_samples_load_without_a_data_dir(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)
    path = dataset_file(name)
    assert path.name == SAMPLE_DATASETS[name] and path.parent.name == "data"
    items = load_dataset(name)
    assert 200 <= len(items) <= 500  # "a few hundred rows"
    assert len({i.id for i in items}) == len(items)
    assert all(i.id.startswith(f"{name}_sample:") for i in items)
    assert all(i.question and i.answers for i in items)
    assert {i.prompt_style for i in items} == {
        "completion" if name == "wikidata" else "question"
    }
    assert load_dataset(name, limit=3, offset=2) == items[2:5]
    # attribution and licence travel with the data
    notes = (path.parent / "README.md").read_text(encoding="utf-8")
    assert SAMPLE_DATASETS[name] in notes and "Apache-2.0" in notes


# ----------------------------------------------------------------------------------------------
# Full files (when $CONFIDENCE_ROUTER_DATA_DIR points at them)
# ----------------------------------------------------------------------------------------------

FULL_DATA = os.environ.get(DATA_DIR_ENV)


@pytest.mark.skipif(
    not (FULL_DATA and (Path(FULL_DATA) / KNOWN_DATASETS["wikidata"]).is_file()),
    reason=f"${DATA_DIR_ENV} does not point at the full evaluation files",
)
@pytest.mark.parametrize("name", sorted(KNOWN_DATASETS))
def test_real_full_files_load(name: str) -> None:
    items = load_dataset(name, limit=5, data_dir=FULL_DATA)
    assert len(items) == 5
    assert len({i.id for i in items}) == 5
    for item in items:
        assert item.question and item.answers and all(a.strip() == a for a in item.answers)
        assert not item.question.startswith("Question:")
        assert not item.question.endswith("Answer:")
        assert item.prompt_style == ("completion" if name == "wikidata" else "question")
    assert load_dataset(name, limit=2, offset=3, data_dir=FULL_DATA) == items[3:5]
    if name in SAMPLE_DATASETS:
        # the packaged sample is the full file's last rows, unchanged
        sample_path = Path(datasets_module.__file__).parent.parent / "data" / SAMPLE_DATASETS[name]
        sample = load_dataset(sample_path)
        full = load_dataset(name, data_dir=FULL_DATA)
        assert [(i.question, i.answers) for i in full[-len(sample):]] == [
            (i.question, i.answers) for i in sample
        ]


# ----------------------------------------------------------------------------------------------
# Hugging Face path (no network: a fake `datasets` module)
# ----------------------------------------------------------------------------------------------


def test_load_hf_dataset_missing_package_advice(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(ImportError, match="pip install datasets"):
        load_hf_dataset("google-research-datasets/nq_open")


def test_load_hf_dataset_maps_known_layouts(monkeypatch: pytest.MonkeyPatch) -> None:
    rows: dict[str, list[dict[str, Any]]] = {
        "trivia": [
            {
                "question": "Which planet is red?",
                "question_id": "tc_1",
                "answer": {"value": "Mars", "aliases": ["Mars", "Red Planet"]},
            }
        ],
        "nq": [{"question": "who wrote hamlet", "answer": ["Shakespeare"]}] * 3,
        "generic": [{"question": "2+2?", "answers": ["4"], "id": 9}],
        "broken": [{"text": "no question"}],
    }
    calls: list[tuple[Any, ...]] = []

    def fake_load_dataset(name: str, config: str | None, split: str) -> list[dict[str, Any]]:
        calls.append((name, config, split))
        return rows[name]

    monkeypatch.setitem(
        sys.modules, "datasets", types.SimpleNamespace(load_dataset=fake_load_dataset)
    )
    (t,) = load_hf_dataset("trivia", "validation", config="rc.nocontext")
    assert t == QAItem(
        "trivia:validation:tc_1", "Which planet is red?", ("Mars", "Red Planet"), "question"
    )
    assert calls[-1] == ("trivia", "rc.nocontext", "validation")
    nq = load_hf_dataset("nq", "validation", limit=2)
    assert [i.id for i in nq] == ["nq:validation:0", "nq:validation:1"]
    assert load_hf_dataset("generic", "train")[0].id == "generic:train:9"
    with pytest.raises(ValueError, match="row 0"):
        load_hf_dataset("broken", "train")


def test_question_hash_id_is_stable() -> None:
    assert question_hash_id("  Who? ") == question_hash_id("Who?")
    assert len(question_hash_id("Who?")) == 16
    assert question_hash_id("Who?") != question_hash_id("What?")
