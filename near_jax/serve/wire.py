"""The OpenAI-compatible request and response bodies: parsing untrusted JSON, building replies.

A request body is untrusted: every field is checked for type and range, and a bad one is a
`BadRequest` whose one-line message names the field and what is allowed (the API answers
400 with it). Fields the server does not implement (`n` > 1, `logprobs`, `echo`, `best_of`,
`suffix`, tools) are refused by name rather than silently ignored: a client relying on them
would otherwise get something else than it asked for. Fields that change nothing here
(`user`, `presence_penalty`/`frequency_penalty` of 0, `stream_options`) are accepted.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from typing import Any

MAX_STOP_STRINGS = 4  # as OpenAI's API
MAX_STOP_CHARS = 256
MAX_SEED = 2**63 - 1

# Accepted only at their no-op value (OpenAI clients send some of them by default).
_NOOP_FIELDS = {
    "n": 1,
    "best_of": 1,
    "echo": False,
    "logprobs": None,
    "top_logprobs": None,
    "presence_penalty": 0,
    "frequency_penalty": 0,
    "suffix": None,
    "logit_bias": None,
    "tools": None,
    "tool_choice": None,
    "response_format": None,
    "parallel_tool_calls": None,
}
_ACCEPTED = {"model", "user", "stream_options", "metadata", "store", "service_tier"}
_SAMPLING = {"max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "stop"}
_COMPLETION_FIELDS = {"prompt", "stream", "seed", *_SAMPLING, *_ACCEPTED, *_NOOP_FIELDS}
_CHAT_FIELDS = {"messages", "stream", "seed", *_SAMPLING, *_ACCEPTED, *_NOOP_FIELDS}
CHAT_ROLES = ("system", "user", "assistant")


class BadRequest(ValueError):
    """A request body the server refuses (HTTP 400); the message is one line naming the field."""


@dataclasses.dataclass(frozen=True)
class Options:
    """Sampling options shared by completions and chat completions."""

    max_tokens: int | None  # None = as many as the context allows
    temperature: float
    top_p: float
    top_k: int
    stop: tuple[str, ...]
    seed: int | None
    stream: bool
    model: str | None


@dataclasses.dataclass(frozen=True)
class CompletionBody:
    """A parsed POST /v1/completions body."""

    prompts: tuple[str, ...]
    options: Options


@dataclasses.dataclass(frozen=True)
class ChatBody:
    """A parsed POST /v1/chat/completions body."""

    messages: tuple[tuple[str, str], ...]  # (role, content)
    options: Options


def _load_object(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BadRequest(f"the body is not valid JSON ({e.__class__.__name__}: {e})") from None
    if not isinstance(body, dict):
        raise BadRequest(f"the body must be a JSON object, got {type(body).__name__}")
    return body


def _check_fields(body: dict[str, Any], allowed: set[str]) -> None:
    for name in sorted(body):
        if name not in allowed:
            raise BadRequest(f"unknown field {name!r}: this server does not implement it")
        if name in _NOOP_FIELDS:
            value, default = body[name], _NOOP_FIELDS[name]
            # 0 and 0.0, null and the default, are the same no-op (bool is not an int here).
            if value is not None and not (
                value == default and isinstance(value, bool) == isinstance(default, bool)
            ):
                raise BadRequest(
                    f"{name}={json.dumps(value)} is not supported: only {json.dumps(default)}"
                )


def _number(body: dict, name: str, default: float, low: float, high: float) -> float:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise BadRequest(f"{name} must be a number in [{low}, {high}], got {json.dumps(value)}")
    if not low <= value <= high:
        raise BadRequest(f"{name}={value} is not allowed: must be in [{low}, {high}]")
    return float(value)


def _integer(body: dict, name: str, low: int, high: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    limit = f"an integer >= {low}" + (f" and <= {high}" if high is not None else "")
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest(f"{name} must be {limit}, got {json.dumps(value)}")
    if value < low or (high is not None and value > high):
        raise BadRequest(f"{name}={value} is not allowed: must be {limit}")
    return value


def _top_p(body: dict) -> float:
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
    if top_p == 0.0:  # the nucleus must keep at least the most likely token
        raise BadRequest("top_p=0 is not allowed: must be in (0, 1]")
    return top_p


def _stop(body: dict) -> tuple[str, ...]:
    value = body.get("stop")
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise BadRequest(f"stop must be a string or a list of strings, got {json.dumps(value)}")
    if len(stops) > MAX_STOP_STRINGS:
        raise BadRequest(f"stop has {len(stops)} strings: at most {MAX_STOP_STRINGS}")
    if any(not s or len(s) > MAX_STOP_CHARS for s in stops):
        raise BadRequest(f"stop strings must have 1 to {MAX_STOP_CHARS} characters")
    return tuple(stops)


def _options(body: dict) -> Options:
    stream = body.get("stream", False)
    if stream is not None and not isinstance(stream, bool):
        raise BadRequest(f"stream must be true or false, got {json.dumps(stream)}")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise BadRequest(f"model must be a string, got {json.dumps(model)}")
    max_tokens = _integer(body, "max_tokens", 1)
    if max_tokens is None:  # the chat API's newer name
        max_tokens = _integer(body, "max_completion_tokens", 1)
    return Options(
        max_tokens=max_tokens,
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_top_p(body),
        top_k=_integer(body, "top_k", 0) or 0,
        stop=_stop(body),
        seed=_integer(body, "seed", 0, MAX_SEED),
        stream=bool(stream),
        model=model,
    )


def parse_completion(raw: bytes) -> CompletionBody:
    """The parsed body of POST /v1/completions; BadRequest naming the field."""
    body = _load_object(raw)
    _check_fields(body, _COMPLETION_FIELDS)
    if "prompt" not in body:
        raise BadRequest("prompt is required: a string or a list of strings")
    prompt = body["prompt"]
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, list) or not prompts:
        raise BadRequest("prompt must be a string or a non-empty list of strings")
    if not all(isinstance(p, str) for p in prompts):
        # Token-id prompts would let a client spend ids the tokenizer never makes.
        raise BadRequest("prompt must be a string or a list of strings (token ids are not taken)")
    return CompletionBody(tuple(prompts), _options(body))


def parse_chat(raw: bytes) -> ChatBody:
    """The parsed body of POST /v1/chat/completions; BadRequest naming the field."""
    body = _load_object(raw)
    _check_fields(body, _CHAT_FIELDS)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("messages is required: a non-empty list of {role, content} objects")
    parsed = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise BadRequest(f"messages[{i}] must be an object with role and content")
        role, content = m.get("role"), m.get("content")
        if role not in CHAT_ROLES:
            allowed = ", ".join(CHAT_ROLES)
            raise BadRequest(f"messages[{i}].role={json.dumps(role)} is not allowed: {allowed}")
        if isinstance(content, list):  # the content-parts form: text parts only
            if not all(isinstance(p, dict) and p.get("type") == "text" for p in content):
                raise BadRequest(f"messages[{i}].content: only text parts are supported")
            content = "".join(str(p.get("text", "")) for p in content)
        if not isinstance(content, str):
            raise BadRequest(f"messages[{i}].content must be a string")
        parsed.append((role, content))
    return ChatBody(tuple(parsed), _options(body))


# ------------------------------------------------------------------------------- replies


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    """The `usage` object of every reply."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def completion(
    response_id: str, model: str, created: int, texts: list[str], finishes: list[str], used: dict
) -> dict[str, Any]:
    """A whole /v1/completions reply."""
    choices = [
        {"index": i, "text": t, "finish_reason": f, "logprobs": None}
        for i, (t, f) in enumerate(zip(texts, finishes, strict=True))
    ]
    return {
        "id": response_id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": choices,
        "usage": used,
    }


def chat_completion(
    response_id: str, model: str, created: int, text: str, finish: str, used: dict
) -> dict[str, Any]:
    """A whole /v1/chat/completions reply."""
    message = {"role": "assistant", "content": text}
    return {
        "id": response_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "message": message, "finish_reason": finish, "logprobs": None}],
        "usage": used,
    }


def completion_chunk(
    response_id: str, model: str, created: int, index: int, text: str, finish: str | None
) -> dict[str, Any]:
    """One streamed /v1/completions event."""
    choice = {"index": index, "text": text, "finish_reason": finish, "logprobs": None}
    return {
        "id": response_id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [choice],
    }


def chat_chunk(
    response_id: str, model: str, created: int, delta: dict, finish: str | None
) -> dict[str, Any]:
    """One streamed /v1/chat/completions event."""
    choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
    return {
        "id": response_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [choice],
    }


def usage_chunk(response_id: str, model: str, created: int, obj: str, used: dict) -> dict:
    """The last streamed event: no choices, the usage (as OpenAI's include_usage)."""
    return {
        "id": response_id,
        "object": obj,
        "created": created,
        "model": model,
        "choices": [],
        "usage": used,
    }


def sse(event: dict[str, Any]) -> bytes:
    """One server-sent event."""
    return b"data: " + json.dumps(event, ensure_ascii=False).encode() + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"


def error(message: str, kind: str, status: int, param: str | None = None) -> dict[str, Any]:
    """An error body, shaped as OpenAI's."""
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}


def models(model: str, created: float | None = None) -> dict[str, Any]:
    """The GET /v1/models reply."""
    entry = {
        "id": model,
        "object": "model",
        "created": int(created or time.time()),
        "owned_by": "near_jax",
    }
    return {"object": "list", "data": [entry]}
