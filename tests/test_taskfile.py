"""Task files: the JSONL format, one-line errors naming file and line, the shipped tasks."""

import re

import numpy as np
import pytest
from helpers import task_line, write_lines

from near_jax.eval import taskfile

BAD_LINES = [
    ('{"context": "c", "choices": ["a", "b"], "answer": 0', "not valid JSON"),
    ('["c", ["a", "b"], 0]', "the line holds an array, not an object"),
    ('{"context": "c", "choices": ["a", "b"]}', "missing field 'answer'"),
    ('{"choices": ["a", "b"], "answer": 0}', "missing field 'context'"),
    (task_line(label=1), "unknown field 'label'; allowed: context, choices, answer, id"),
    (task_line(context=3), "'context' is an integer; it must be a string"),
    ('{"context": "c", "choices": "ab", "answer": 0}', "'choices' is a string; it must be a list"),
    (task_line(choices=["a"]), "'choices' has only 1; it must be a list of at least 2"),
    (task_line(choices=["a", 2]), r"'choices'\[1\] is an integer"),
    (task_line(choices=["a", ""]), r"'choices'\[1\] is empty"),
    (task_line(answer=2), r"'answer' is 2; it must be an integer index into 'choices' \(0..1\)"),
    (task_line(answer=-1), r"'answer' is -1; it must be an integer index"),
    (task_line(answer=1.0), "'answer' is a number; it must be an integer index"),
    (task_line(answer=True), "'answer' is a boolean; it must be an integer index"),
    (task_line(answer="0"), "'answer' is a string"),
    (task_line(id=[1]), "'id' is an array; it must be a string or int"),
]


@pytest.mark.parametrize("bad, message", BAD_LINES)
def test_malformed_line_names_file_and_line(tmp_path, bad, message):
    # Line 2 is blank (skipped, but still counted), so the bad line is line 3.
    path = write_lines(tmp_path, [task_line(id="ok"), "", bad, task_line()])
    with pytest.raises(taskfile.TaskError, match=message) as info:
        taskfile.load_task(path)
    text = str(info.value)
    assert text.startswith(f"{path}:3: ") and "\n" not in text


def test_unreadable_or_empty_task_files(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(task_line().encode() + b"\n" + b'{"context": "caf\xe9"}\n')
    with pytest.raises(taskfile.TaskError, match=f"^{re.escape(str(path))}:2: not valid UTF-8"):
        taskfile.load_task(path)
    for lines in ([], ["", "  "]):
        empty = write_lines(tmp_path, lines, "empty.jsonl")
        with pytest.raises(taskfile.TaskError, match=f"^{re.escape(empty)}: no examples"):
            taskfile.load_task(empty)
    with pytest.raises(taskfile.TaskError, match="cannot read the task file"):
        taskfile.load_task(tmp_path / "missing.jsonl")
    with pytest.raises(taskfile.TaskError, match="no such task file; .*python_syntax"):
        taskfile.resolve_task("no_such_task")
    loaded = taskfile.load_task(write_lines(tmp_path, [task_line(id=7, answer=1)]))
    assert loaded == [taskfile.Example("c", ("a", "b"), 1, 7)]


def test_shipped_python_syntax_task_is_valid():
    assert "python_syntax" in taskfile.shipped_tasks()
    examples = taskfile.load_task(taskfile.resolve_task("python_syntax"))
    assert len(examples) >= 30
    assert len({e.id for e in examples}) == len(examples)
    for e in examples:
        assert 0 <= e.answer < len(e.choices) and len(set(e.choices)) == len(e.choices)
        # A choice that is a prefix of another always wins on summed log-likelihood.
        assert not any(a != b and b.startswith(a) for a in e.choices for b in e.choices)
    # Answers are spread over positions, so a position bias cannot score well.
    counts = np.bincount([e.answer for e in examples])
    assert counts.max() <= len(examples) // 2
