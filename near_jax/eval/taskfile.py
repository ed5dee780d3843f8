"""Task files: the JSONL format of a multiple-choice task, loaded and validated.

Task files are local JSONL (UTF-8), one example per line:

    {"context": "for i", "choices": ["in range(3):", "of range(3):"], "answer": 0, "id": "x"}

`context` is a string, `choices` a list of at least two non-empty strings, `answer` the
integer index of the right choice, `id` optional (a string or an integer); no other field is
allowed. Blank lines are skipped. Anything else stops loading with a one-line TaskError
`path:LINE: what is wrong; what is allowed`. (For task authors: a choice that is a prefix of
another never loses on acc, since log-probabilities only fall as tokens are added.) Files
shipped in `near_jax/eval/evaltasks/` can be named without a path: `python_syntax` holds 35
completions of Python syntax for the CPU quick-start model, written for the default
target_delimiter " " (each context stops where a space comes next).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

TASKS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "evaltasks")

_FIELDS = ("context", "choices", "answer", "id")
_REQUIRED = ("context", "choices", "answer")
_SHAPE = '{"context": str, "choices": [str, str, ...], "answer": int, "id": str|int (optional)}'


class TaskError(ValueError):
    """A task file or evaluation request that cannot be used; the message is one line."""


@dataclasses.dataclass(frozen=True)
class Example:
    """One multiple-choice question: `choices[answer]` is the right continuation."""

    context: str
    choices: tuple[str, ...]
    answer: int
    id: str | int | None = None


def resolve_task(spec: str | os.PathLike) -> str:
    """The path of a task file: `spec` itself if it is a file, else a shipped task's name."""
    path = os.fspath(spec)
    if os.path.isfile(path):
        return path
    shipped = os.path.join(TASKS_DIR, f"{path}.jsonl")
    if os.sep not in path and os.path.isfile(shipped):
        return shipped
    raise TaskError(f"{path}: no such task file; a JSONL path or one of {shipped_tasks()}")


def shipped_tasks() -> list[str]:
    """Names of the task files shipped in `near_jax/eval/evaltasks/`."""
    if not os.path.isdir(TASKS_DIR):
        return []
    return sorted(f[: -len(".jsonl")] for f in os.listdir(TASKS_DIR) if f.endswith(".jsonl"))


def load_task(path: str | os.PathLike) -> list[Example]:
    """Reads and validates a task file (format in the module docstring); TaskError if bad."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            raw_lines = f.read().splitlines()
    except OSError as e:
        raise TaskError(f"{path}: cannot read the task file ({e.strerror or e})") from e
    examples = []
    for lineno, raw in enumerate(raw_lines, start=1):
        if raw.strip():
            examples.append(_parse_line(raw, f"{path}:{lineno}"))
    if not examples:
        raise TaskError(f"{path}: no examples (empty file); one JSON object a line: {_SHAPE}")
    return examples


def _parse_line(raw: bytes, where: str) -> Example:
    """Parses one non-blank line; `where` is "path:LINE" for the error message."""
    try:
        record = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise TaskError(f"{where}: not valid UTF-8 (byte {e.start}); task files are UTF-8") from e
    except json.JSONDecodeError as e:
        raise TaskError(
            f"{where}: not valid JSON ({e.msg} at column {e.colno}); one JSON object a line"
        ) from e
    if not isinstance(record, dict):
        raise TaskError(
            f"{where}: the line holds {_kind(record)}, not an object; expected {_SHAPE}"
        )
    for key in record:
        if key not in _FIELDS:
            raise TaskError(f"{where}: unknown field {key!r}; allowed: {', '.join(_FIELDS)}")
    for key in _REQUIRED:
        if key not in record:
            raise TaskError(f"{where}: missing field {key!r}; required: {', '.join(_REQUIRED)}")
    context, choices, answer = record["context"], record["choices"], record["answer"]
    if not isinstance(context, str):
        raise TaskError(f"{where}: 'context' is {_kind(context)}; it must be a string")
    _check_choices(choices, where)
    is_int = isinstance(answer, int) and not isinstance(answer, bool)  # JSON true is no index
    if not is_int or not 0 <= answer < len(choices):
        raise TaskError(
            f"{where}: 'answer' is {answer if is_int else _kind(answer)}; it must be an integer "
            f"index into 'choices' (0..{len(choices) - 1})"
        )
    example_id = record.get("id")
    if isinstance(example_id, bool) or not isinstance(example_id, str | int | None):
        raise TaskError(f"{where}: 'id' is {_kind(example_id)}; it must be a string or int")
    return Example(context, tuple(choices), answer, example_id)


def _check_choices(choices: Any, where: str) -> None:
    allowed = "it must be a list of at least 2 non-empty strings"
    if not isinstance(choices, list):
        raise TaskError(f"{where}: 'choices' is {_kind(choices)}; {allowed}")
    if len(choices) < 2:
        raise TaskError(f"{where}: 'choices' has only {len(choices)}; {allowed}")
    for i, choice in enumerate(choices):
        if not isinstance(choice, str):
            raise TaskError(f"{where}: 'choices'[{i}] is {_kind(choice)}; {allowed}")
        if not choice:
            raise TaskError(f"{where}: 'choices'[{i}] is empty; {allowed}")


def _kind(value: Any) -> str:
    """The JSON name of a parsed value's type with its article ("an integer"), for errors."""
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean"}
    names |= {int: "an integer", float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)
