"""Attack round on the question-file loader: every bad row is a typed error naming file and
line; encodings and line endings that editors produce (BOM, CRLF) load."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from confidence_router.errors import ConfidenceRouterError, InvalidArgumentError
from confidence_router.evaluation.datasets import DatasetFormatError, QAItem, load_dataset

GOOD = {"question": "Who wrote Hamlet?", "answers": ["Shakespeare"]}


def _lines(path: Path, *records: object) -> Path:
    path.write_text(
        "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records),
        encoding="utf-8",
    )
    return path


def test_utf8_bom_loads(tmp_path):
    # Found: a BOM (Notepad, PowerShell's Out-File) failed line 1 with "invalid JSON
    # (Unexpected UTF-8 BOM)".
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + (json.dumps(GOOD) + "\n").encode() * 2)
    items = load_dataset(path)
    assert [i.question for i in items] == ["Who wrote Hamlet?"] * 2
    assert items[0].id == "bom:1"


def test_crlf_line_endings_load(tmp_path):
    path = tmp_path / "crlf.jsonl"
    body = json.dumps(GOOD) + "\r\n" + json.dumps({**GOOD, "question": "Who wrote Faust?"})
    path.write_bytes((body + "\r\n\r\n").encode())
    items = load_dataset(path)
    assert [i.question for i in items] == ["Who wrote Hamlet?", "Who wrote Faust?"]
    assert all("\r" not in i.question and "\r" not in i.answers[0] for i in items)


def test_non_utf8_bytes_name_the_line(tmp_path):
    # Found: a Latin-1 byte raised a bare UnicodeDecodeError ("'utf-8' codec can't decode
    # byte 0xe9 in position 1234") without file or line.
    path = tmp_path / "latin1.jsonl"
    lines = [json.dumps(GOOD).encode()] * 2 + ['{"question": "Où est Zürich?", '
                                               '"answers": ["Suisse"]}'.encode("latin-1")]
    path.write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(DatasetFormatError, match=r"latin1\.jsonl:3: .*UTF-8") as info:
        load_dataset(path)
    assert info.value.path == path and info.value.line == 3


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        ({"question": "Q?"}, "answers"),                                # missing field
        ({"answers": ["A"], "question": 7}, "'question' must be a string"),
        ({"question": "Q?", "answers": [1990]}, "list of strings"),     # wrong type
        ({"question": "Q?", "answers": []}, "no non-empty gold answer"),
        ({"question": "Q?", "answers": ["", "  "]}, "no non-empty gold answer"),
        ({"question": "   ", "answers": ["A"]}, "'question' is empty"),
        ('{"question": "Q?", "answers": ["A"]', "invalid JSON"),       # truncated
        ("[1, 2]", "JSON object"),
        ({"question": "Q?", "answers": ["A"], "id": None}, "'id'"),
        ({"question": "Q?", "answers": ["A"], "id": {"a": 1}}, "'id'"),
        ({"question": "Q?", "answers": ["A"], "id": ""}, "'id'"),
        ({"question": "Q?", "answers": ["A"], "prompt_style": "Question"}, "prompt_style"),
    ],
)
def test_bad_row_is_a_typed_error_naming_the_line(tmp_path, bad, match):
    path = _lines(tmp_path / "bad.jsonl", GOOD, "", bad)
    with pytest.raises(DatasetFormatError, match=match) as info:
        load_dataset(path)
    err = info.value
    assert isinstance(err, InvalidArgumentError) and isinstance(err, ValueError)
    assert isinstance(err, ConfidenceRouterError)
    assert str(err).startswith(f"{path}:3: ") and err.line == 3


def test_duplicate_ids_name_both_lines(tmp_path):
    path = _lines(tmp_path / "dup.jsonl", {**GOOD, "id": "q1"}, {**GOOD, "id": 5},
                  {**GOOD, "id": "q1"})
    with pytest.raises(DatasetFormatError, match=r"dup\.jsonl:3: duplicate id 'q1'.*line 1"):
        load_dataset(path)


def test_int_and_string_ids_that_print_alike_collide(tmp_path):
    # 5 and "5" would become the same stored item id, so the second must be refused.
    path = _lines(tmp_path / "ids.jsonl", {**GOOD, "id": 5}, {**GOOD, "id": "5"})
    with pytest.raises(DatasetFormatError, match="duplicate id '5'"):
        load_dataset(path)


def test_empty_file_is_an_error_not_an_empty_run(tmp_path):
    # Found: an empty (or blank-only) file returned [] and `eval` "ran" 0 items.
    for name, text in (("empty.jsonl", ""), ("blank.jsonl", "\n  \n\r\n")):
        path = tmp_path / name
        path.write_text(text)
        with pytest.raises(DatasetFormatError, match="no records"):
            load_dataset(path)


def test_json_array_file_gets_a_hint(tmp_path):
    path = tmp_path / "array.json"
    path.write_text(json.dumps([GOOD, GOOD], indent=2))
    with pytest.raises(DatasetFormatError, match=r"array\.json:1: .*JSON Lines"):
        load_dataset(path)


def test_mixed_schema_names_the_line(tmp_path):
    path = _lines(tmp_path / "mixed.jsonl", GOOD, {"prompt": "The sky is", "answer": "blue"})
    with pytest.raises(DatasetFormatError, match=r"mixed\.jsonl:2: .*schema"):
        load_dataset(path)


@pytest.mark.parametrize(("limit", "offset"), [(True, 0), (None, False), (1.5, 0), (-3, 0)])
def test_bool_and_float_window_refused(tmp_path, limit, offset):
    path = _lines(tmp_path / "ok.jsonl", GOOD)
    with pytest.raises(InvalidArgumentError, match="limit|offset"):
        load_dataset(path, limit=limit, offset=offset)


def test_documented_formats_load(tmp_path):
    # README: "any JSONL file with question/answers"; answers may be a bare string; the
    # known-name schemas load by path too.
    generic = _lines(tmp_path / "mine.jsonl", {"question": "Q1?", "answers": "A1"},
                     {"question": "Q2?", "answers": ["A2", "B2"], "id": "x"})
    assert load_dataset(generic) == [
        QAItem("mine:1", "Q1?", ("A1",), "question"),
        QAItem("x", "Q2?", ("A2", "B2"), "question"),
    ]
    wiki = _lines(tmp_path / "w.jsonl", {"prompt": "The sky is", "answer": "blue"})
    assert load_dataset(wiki)[0].prompt_style == "completion"
    trivia = _lines(tmp_path / "t.jsonl", {"context": "Question: Q?\nAnswer:", "answer": "A",
                                          "aliases": ["a"]})
    assert load_dataset(trivia)[0].question == "Q?"
    nq = _lines(tmp_path / "n.jsonl", {"question": "q", "answer": ["a"]})
    assert load_dataset(nq)[0].answers == ("a",)


def test_a_directory_is_not_reported_as_missing(tmp_path):
    # Found: "dataset file not found: '.../data/'" for a directory that exists.
    with pytest.raises(InvalidArgumentError, match="is a directory"):
        load_dataset(str(tmp_path) + "/")
