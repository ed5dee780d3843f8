"""Multiple-choice evaluation scored by log-likelihood (the way lm-eval-harness scores
HellaSwag, ARC and PIQA): every choice is scored as a continuation of the prompt, and the
model "answers" with the choice it finds most likely.

    run = loading.load_run("/tmp/near_jax_tiny")
    result = evaluate_task(run.params, run.model_cfg, run.tokenizer, "python_syntax",
                           max_len=run.cfg.data.seq_len, mesh=run.mesh)
    # {"task": "python_syntax", "n": 35, "num_fewshot": 0, "acc": ..., "acc_stderr": ...,
    #  "acc_norm": ..., "acc_norm_stderr": ...}

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

Requests. Every (example, choice) pair becomes one request:

    shot         = context_j + target_delimiter + choices_j[answer_j]
    prompt       = shot_1 + fewshot_delimiter + ... + shot_k + fewshot_delimiter + context
    continuation = target_delimiter + choice

with target_delimiter " " and fewshot_delimiter "\\n\\n" by default. The k = num_fewshot shots
are drawn without replacement from the few-shot pool (the task itself, or a separate file) by
a generator seeded with (seed, example index), so a prompt depends only on the seed and the
example; a pool entry with the example's own context and choices is never drawn.

Scoring. A request's tokens are [bos] + encode(prompt) + encode(continuation), the two
encoded separately so the continuation's tokens are exactly its own. The model reads all
tokens but the last; if that is longer than `max_len` it is cut from the left, always keeping
the whole continuation (one longer than max_len is an error). loglikelihood = the sum of
log p(continuation token | all before it); is_greedy = every continuation token is the
model's argmax. Requests are sorted by length and padded (padding has segment_id 0) to
`batch_size` rows of a power-of-two length (at least 16, at most max_len), so jit compiles
only a few shapes. Progress is reported only through an optional `progress(done, total)`.

Metrics. Per example, acc = 1 if the choice with the highest loglikelihood is the answer;
acc_norm the same for loglikelihood / (length of the continuation in UTF-8 bytes).
lm-eval-harness normalizes by length in characters; bytes equal characters for ASCII and
match what a byte-level model predicts. Ties go to the lowest index. Each stderr is the
sample standard deviation (n - 1) over examples divided by sqrt(n) (NaN when n = 1).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import json
import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from near_jax import model, sharding
from near_jax.data.tokenizer import Tokenizer

TASKS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "evaltasks")
MIN_BUCKET = 16  # the shortest padded row length, so tiny requests share one shape

_FIELDS = ("context", "choices", "answer", "id")
_REQUIRED = ("context", "choices", "answer")
_SHAPE = '{"context": str, "choices": [str, str, ...], "answer": int, "id": str|int (optional)}'

Progress = Callable[[int, int], None]


class TaskError(ValueError):
    """A task file or evaluation request that cannot be used; the message is one line."""


@dataclasses.dataclass(frozen=True)
class Example:
    """One multiple-choice question: `choices[answer]` is the right continuation."""

    context: str
    choices: tuple[str, ...]
    answer: int
    id: str | int | None = None


@dataclasses.dataclass(frozen=True)
class Request:
    """One (example, choice) pair to score: log p(continuation | prompt)."""

    example: int  # index of the example in its task
    choice: int  # index of the choice in the example
    prompt: str
    continuation: str


@dataclasses.dataclass(frozen=True)
class Score:
    """The model's verdict on one request."""

    loglikelihood: float
    is_greedy: bool


# ---------------------------------------------------------------------------------------------
# Loading


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


# ---------------------------------------------------------------------------------------------
# Prompts


class FewshotSampler:
    """Draws the few-shot examples for each evaluated example from a pool, deterministically."""

    def __init__(self, pool: Sequence[Example], num_fewshot: int, seed: int):
        if num_fewshot < 0 or seed < 0:
            raise TaskError(f"num_fewshot={num_fewshot}, seed={seed}: both must be >= 0")
        self.pool, self.num_fewshot, self.seed = pool, num_fewshot, seed
        # Pool indices by (context, choices), so excluding an example is a lookup, not a scan.
        self._by_key: dict[tuple, list[int]] = collections.defaultdict(list)
        for j, shot in enumerate(pool):
            self._by_key[_key(shot)].append(j)

    def indices(self, example_index: int, example: Example) -> list[int]:
        """Pool indices of the shots for `example`, in prompt order; never the example."""
        if self.num_fewshot == 0:
            return []
        excluded = self._by_key.get(_key(example), [])
        # Draw enough that dropping the excluded entries still leaves num_fewshot.
        draw = self.num_fewshot + len(excluded)
        if draw > len(self.pool):
            raise TaskError(
                f"num_fewshot={self.num_fewshot} is not allowed: the few-shot pool has only "
                f"{len(self.pool) - len(excluded)} examples other than example {example_index}"
            )
        rng = np.random.default_rng([self.seed, example_index])
        picks = rng.choice(len(self.pool), size=draw, replace=False).tolist()
        return [j for j in picks if j not in excluded][: self.num_fewshot]


def _key(example: Example) -> tuple:
    return (example.context, example.choices)


def render_shot(example: Example, target_delimiter: str = " ") -> str:
    """A solved example as it appears in a few-shot prompt: context + delimiter + answer."""
    return example.context + target_delimiter + example.choices[example.answer]


def build_requests(
    examples: Sequence[Example],
    *,
    num_fewshot: int = 0,
    seed: int = 0,
    fewshot_pool: Sequence[Example] | None = None,
    target_delimiter: str = " ",
    fewshot_delimiter: str = "\n\n",
) -> list[Request]:
    """One request per (example, choice), example-major (prompt shape: module docstring).

    `fewshot_pool` defaults to `examples` itself.
    """
    sampler = FewshotSampler(examples if fewshot_pool is None else fewshot_pool, num_fewshot, seed)
    requests = []
    for i, example in enumerate(examples):
        shots = [
            render_shot(sampler.pool[j], target_delimiter) for j in sampler.indices(i, example)
        ]
        prompt = "".join(shot + fewshot_delimiter for shot in shots) + example.context
        for c, choice in enumerate(example.choices):
            requests.append(Request(i, c, prompt, target_delimiter + choice))
    return requests


# ---------------------------------------------------------------------------------------------
# Scoring


def encode_request(
    tokenizer: Tokenizer, request: Request, max_len: int, prompt_ids: list[int] | None = None
) -> tuple[np.ndarray, int]:
    """Token ids of a request, cut from the left to `max_len` + 1, and the continuation length.

    The model reads ids[:-1] and is scored on the last n_continuation of ids[1:].
    `prompt_ids` (the encoded prompt) may be passed to skip encoding it again.
    """
    if prompt_ids is None:
        prompt_ids = tokenizer.encode(request.prompt)
    continuation_ids = tokenizer.encode(request.continuation)
    n = len(continuation_ids)
    if n == 0 or n > max_len:
        raise TaskError(
            f"example {request.example} choice {request.choice}: the continuation "
            f"{request.continuation!r} is {n} tokens; it must be 1..max_len={max_len}"
        )
    ids = [tokenizer.bos_id, *prompt_ids, *continuation_ids][-(max_len + 1) :]
    return np.asarray(ids, np.int32), n


def bucket_length(length: int, max_len: int) -> int:
    """The padded row length for `length` tokens: a power of two >= MIN_BUCKET, <= max_len."""
    return min(max(MIN_BUCKET, 1 << (length - 1).bit_length()), max_len)


@functools.partial(jax.jit, static_argnames="cfg")
def score_rows(
    params: Any,
    tokens_BxL: jax.Array,
    positions_BxL: jax.Array,
    segment_ids_BxL: jax.Array,
    targets_BxL: jax.Array,
    mask_BxL: jax.Array,
    cfg: model.ModelConfig,
) -> tuple[jax.Array, jax.Array]:
    """Per row: the summed log p(target) over masked positions, and whether all are argmax."""
    logits_BxLxV = model.apply(params, tokens_BxL, positions_BxL, segment_ids_BxL, cfg)
    # logit[target] - logsumexp avoids materializing a second [B, L, V] log_softmax.
    log_z_BxL = jax.nn.logsumexp(logits_BxLxV, axis=-1)
    target_logit_BxL = jnp.take_along_axis(logits_BxLxV, targets_BxL[..., None], axis=-1)[..., 0]
    # where, not multiply: a padding position's logits may be anything, NaN included.
    logprob_B = jnp.where(mask_BxL, target_logit_BxL - log_z_BxL, 0.0).sum(axis=-1)
    hit_BxL = jnp.argmax(logits_BxLxV, axis=-1) == targets_BxL
    greedy_B = jnp.all(hit_BxL | ~mask_BxL, axis=-1)
    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty:  # replicated, so every process can read the results
        replicated = NamedSharding(mesh, PartitionSpec())
        logprob_B = jax.lax.with_sharding_constraint(logprob_B, replicated)
        greedy_B = jax.lax.with_sharding_constraint(greedy_B, replicated)
    return logprob_B, greedy_B


def pack_rows(
    encoded: Sequence[tuple[np.ndarray, int]], num_rows: int, length: int, pad_id: int
) -> dict[str, np.ndarray]:
    """Right-padded [num_rows, length] arrays for `score_rows`; padding has segment_id 0."""
    tokens_BxL = np.full((num_rows, length), pad_id, np.int32)
    targets_BxL = np.zeros((num_rows, length), np.int32)
    positions_BxL = np.zeros((num_rows, length), np.int32)
    segment_ids_BxL = np.zeros((num_rows, length), np.int32)
    mask_BxL = np.zeros((num_rows, length), bool)
    for row, (ids, n_cont) in enumerate(encoded):
        n = len(ids) - 1
        tokens_BxL[row, :n], targets_BxL[row, :n] = ids[:-1], ids[1:]
        positions_BxL[row, :n] = np.arange(n)
        segment_ids_BxL[row, :n] = 1
        mask_BxL[row, n - n_cont : n] = True
    return dict(
        tokens_BxL=tokens_BxL, positions_BxL=positions_BxL, segment_ids_BxL=segment_ids_BxL,
        targets_BxL=targets_BxL, mask_BxL=mask_BxL,
    )  # fmt: skip


def score_requests(
    params: Any,
    model_cfg: model.ModelConfig,
    tokenizer: Tokenizer,
    requests: Sequence[Request],
    *,
    max_len: int,
    batch_size: int = 32,
    mesh: jax.sharding.Mesh | None = None,
    progress: Progress | None = None,
) -> list[Score]:
    """Scores every request (see the module docstring), returned in the order given.

    With a `mesh`, rows are sharded over its data-parallel axes (batch_size is rounded up to
    a multiple of them) and the model traces under it. `progress(done, total)` is called after
    each batch.
    """
    if max_len < 1 or batch_size < 1:
        raise TaskError(f"max_len={max_len}, batch_size={batch_size}: both must be >= 1")
    model_cfg = model.ModelConfig.from_config(model_cfg)  # hashable: a static jit argument
    if mesh is not None:
        dp = sharding.data_parallel_size(mesh)
        batch_size = -(-batch_size // dp) * dp
    encoded = _encode_all(tokenizer, requests, max_len)
    # Longest first: the largest shape compiles and allocates first, so OOM shows at once.
    order = sorted(range(len(requests)), key=lambda i: -len(encoded[i][0]))
    scores: list[Score | None] = [None] * len(requests)
    pending = None  # one batch in flight: the host packs the next while the device runs
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        length = bucket_length(max(len(encoded[i][0]) - 1 for i in rows), max_len)
        arrays = pack_rows([encoded[i] for i in rows], batch_size, length, tokenizer.pad_id)
        outputs = _run_batch(params, model_cfg, arrays, mesh)
        if pending is not None:
            _collect(pending, scores, progress, len(requests))
        pending = (rows, outputs, start + len(rows))
    if pending is not None:
        _collect(pending, scores, progress, len(requests))
    return scores  # type: ignore[return-value]


def _encode_all(
    tokenizer: Tokenizer, requests: Sequence[Request], max_len: int
) -> list[tuple[np.ndarray, int]]:
    """Encodes every request; the choices of an example share one encoding of its prompt."""
    encoded, last_prompt, prompt_ids = [], None, []
    for request in requests:
        if request.prompt != last_prompt:  # build_requests puts an example's choices together
            last_prompt, prompt_ids = request.prompt, tokenizer.encode(request.prompt)
        encoded.append(encode_request(tokenizer, request, max_len, prompt_ids))
    return encoded


def _run_batch(params, model_cfg, arrays: dict[str, np.ndarray], mesh) -> tuple:
    """Dispatches `score_rows` on one packed batch (asynchronously)."""
    if mesh is None:
        return score_rows(params, **arrays, cfg=model_cfg)
    batch_sharding = sharding.batch_sharding(mesh)
    placed = {k: jax.device_put(v, batch_sharding) for k, v in arrays.items()}
    # Tracing must see the mesh so the model's activation constraints apply.
    with jax.set_mesh(mesh):
        return score_rows(params, **placed, cfg=model_cfg)


def _collect(pending, scores: list, progress: Progress | None, total: int) -> None:
    """Waits for one batch's outputs and stores them at their requests' original indices."""
    rows, outputs, done = pending
    logprob_B, greedy_B = jax.device_get(outputs)
    for row, i in enumerate(rows):
        scores[i] = Score(float(logprob_B[row]), bool(greedy_B[row]))
    if progress is not None:
        progress(done, total)


# ---------------------------------------------------------------------------------------------
# Metrics


def choose(loglikelihoods: Sequence[float], continuations: Sequence[str]) -> tuple[int, int]:
    """The picked choice by raw loglikelihood and by loglikelihood per UTF-8 byte."""
    raw_C = np.asarray(loglikelihoods, np.float64)
    bytes_C = np.asarray([len(c.encode("utf-8")) for c in continuations], np.float64)
    return int(np.argmax(raw_C)), int(np.argmax(raw_C / bytes_C))


def mean_stderr(values: Sequence[float]) -> tuple[float, float]:
    """Mean and its standard error: sample std (n - 1) / sqrt(n); NaN stderr when n < 2."""
    values_N = np.asarray(values, np.float64)
    n = len(values_N)
    if n == 0:
        raise TaskError("no values to average")
    if n < 2:
        return float(values_N.mean()), math.nan
    return float(values_N.mean()), float(values_N.std(ddof=1) / math.sqrt(n))


def aggregate(
    examples: Sequence[Example],
    requests: Sequence[Request],
    scores: Sequence[Score],
    name: str = "task",
) -> dict[str, Any]:
    """acc and acc_norm over examples (with stderrs) from the scored requests."""
    by_example: dict[int, list[tuple[int, str, float]]] = collections.defaultdict(list)
    for request, score in zip(requests, scores, strict=True):
        by_example[request.example].append(
            (request.choice, request.continuation, score.loglikelihood)
        )
    acc, acc_norm = [], []
    for i, example in enumerate(examples):
        entries = sorted(by_example[i])
        if [c for c, _, _ in entries] != list(range(len(example.choices))):
            raise TaskError(f"example {i}: expected one score per choice, got {len(entries)}")
        picked, picked_norm = choose([e[2] for e in entries], [e[1] for e in entries])
        acc.append(float(picked == example.answer))
        acc_norm.append(float(picked_norm == example.answer))
    acc_mean, acc_se = mean_stderr(acc)
    norm_mean, norm_se = mean_stderr(acc_norm)
    return {
        "task": name,
        "n": len(examples),
        "acc": acc_mean,
        "acc_stderr": acc_se,
        "acc_norm": norm_mean,
        "acc_norm_stderr": norm_se,
    }


def evaluate_task(
    params: Any,
    model_cfg: model.ModelConfig,
    tokenizer: Tokenizer,
    path: str | os.PathLike,
    *,
    max_len: int,
    num_fewshot: int = 0,
    seed: int = 0,
    batch_size: int = 32,
    mesh: jax.sharding.Mesh | None = None,
    fewshot_path: str | os.PathLike | None = None,
    target_delimiter: str = " ",
    fewshot_delimiter: str = "\n\n",
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Loads a task, scores every choice and returns its metrics (see the module docstring).

    `path` is a task file or a shipped task's name; `max_len` is the longest row the model
    reads (the run's data.seq_len); `fewshot_path` draws shots from another file.
    """
    path = resolve_task(path)
    examples = load_task(path)
    pool = None if fewshot_path is None else load_task(resolve_task(fewshot_path))
    requests = build_requests(
        examples, num_fewshot=num_fewshot, seed=seed, fewshot_pool=pool,
        target_delimiter=target_delimiter, fewshot_delimiter=fewshot_delimiter,
    )  # fmt: skip
    scores = score_requests(
        params, model_cfg, tokenizer, requests, max_len=max_len, batch_size=batch_size,
        mesh=mesh, progress=progress,
    )  # fmt: skip
    name = os.path.basename(path).removesuffix(".jsonl")
    result = aggregate(examples, requests, scores, name)
    return {"task": name, "n": result["n"], "num_fewshot": num_fewshot} | result
