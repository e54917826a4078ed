"""Loading errors are clear: they name the file, the line and the field."""

from __future__ import annotations

import pytest

from saebench import loading


def test_unknown_dictionary_lists_what_the_zoo_has():
    with pytest.raises(loading.ZooError, match="no dictionary 'nope'.*resid-L0-topk16"):
        loading.load_zoo_dictionary("nope")


def test_missing_zoo_says_how_to_build_one(tmp_path):
    with pytest.raises(loading.ZooError, match="saebench zoo build"):
        loading.zoo_manifest(tmp_path)


def test_unknown_task_name():
    with pytest.raises(loading.ZooError, match="no task 'nope'"):
        loading.load_task("nope")


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"prompt": "a", "answer": "b"}', r":2: field 'distractor'"),
        ('{"prompt": "a", "answer": "", "distractor": "c"}', r":2: field 'answer'"),
        ('{"prompt": "a", "answer": "b", "distractor": "c", "pos": "x"}', r":2: field 'pos'"),
        ('{"prompt": "a", "answer": "b", "distractor": "c", "extra": 1}', r":2: unknown field"),
        ("not json", r":2: not valid JSON"),
        ("[1, 2]", r":2: a row must be a JSON object"),
    ],
)
def test_bad_task_rows_name_file_line_and_field(tmp_path, line, message):
    path = tmp_path / "task.jsonl"
    path.write_text('{"prompt": "x", "answer": "y", "distractor": "z"}\n' + line + "\n")
    with pytest.raises(ValueError, match="task.jsonl" + message):
        loading.load_task(path)


def test_task_file_round_trip(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text('{"prompt": "x y", "answer": "y", "distractor": "z", "pos": -1}\n\n')
    assert loading.load_task(path) == [loading.TaskPrompt("x y", "y", "z", -1)]
