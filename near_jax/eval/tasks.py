"""Multiple-choice evaluation scored by log-likelihood (the way lm-eval-harness scores
HellaSwag, ARC and PIQA): every choice is scored as a continuation of the prompt, and the
model "answers" with the choice it finds most likely.

    run = loading.load_run("/tmp/near_jax_tiny")
    result = evaluate_task(run.params, run.model_cfg, run.tokenizer, "python_syntax",
                           max_len=run.cfg.data.seq_len, mesh=run.mesh)
    # {"task": "python_syntax", "n": 35, "num_fewshot": 0, "acc": ..., "acc_stderr": ...,
    #  "acc_norm": ..., "acc_norm_stderr": ...}

A task file (`taskfile`: the JSONL format) becomes requests (`prompts`: few-shot prompt +
continuation per choice), the model scores them (`scoring`: log p(continuation | prompt)),
and the picks become metrics here.

Metrics. Per example, acc = 1 if the choice with the highest loglikelihood is the answer;
acc_norm the same for loglikelihood / (length of the continuation in UTF-8 bytes).
lm-eval-harness normalizes by length in characters; bytes equal characters for ASCII and
match what a byte-level model predicts. Ties go to the lowest index. Each stderr is the
sample standard deviation (n - 1) over examples divided by sqrt(n) (NaN when n = 1).
"""

from __future__ import annotations

import collections
import math
import os
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from near_jax import model
from near_jax.data.tokenizer import Tokenizer
from near_jax.eval.prompts import Request, build_requests
from near_jax.eval.scoring import Progress, Score, score_requests
from near_jax.eval.taskfile import Example, TaskError, load_task, resolve_task


def choose(loglikelihoods: Sequence[float], continuations: Sequence[str]) -> tuple[int, int]:
    """The picked choice by raw loglikelihood and by loglikelihood per UTF-8 byte."""
    raw_C = np.asarray(loglikelihoods, np.float64)
    bytes_C = np.asarray([len(c.encode("utf-8")) for c in continuations], np.float64)
    return int(np.argmax(raw_C)), int(np.argmax(raw_C / bytes_C))


def mean_stderr(values: Sequence[float]) -> tuple[float, float]:
    """Mean and its standard error: sample std (n - 1) / sqrt(n); NaN stderr when n < 2."""
    values_E = np.asarray(values, np.float64)
    n = len(values_E)
    if n == 0:
        raise TaskError("no values to average")
    if n < 2:
        return float(values_E.mean()), math.nan
    return float(values_E.mean()), float(values_E.std(ddof=1) / math.sqrt(n))


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
        examples,
        num_fewshot=num_fewshot,
        seed=seed,
        fewshot_pool=pool,
        target_delimiter=target_delimiter,
        fewshot_delimiter=fewshot_delimiter,
    )
    scores = score_requests(
        params,
        model_cfg,
        tokenizer,
        requests,
        max_len=max_len,
        batch_size=batch_size,
        mesh=mesh,
        progress=progress,
    )
    name = os.path.basename(path).removesuffix(".jsonl")
    result = aggregate(examples, requests, scores, name)
    return {"task": name, "n": result["n"], "num_fewshot": num_fewshot} | result
