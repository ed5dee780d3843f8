"""A task end to end: a trained model picks the answers it learned; acc, acc_norm, stderrs."""

import math

import jax
import numpy as np
import optax
import pytest
from helpers import small_config, task_line, write_lines

from near_jax import model
from near_jax.data.tokenizer import ByteTokenizer
from near_jax.eval import prompts, scoring, taskfile, tasks

TOK = ByteTokenizer()
CFG = model.ModelConfig.from_config(small_config().model)  # small_params' config
MAX_LEN = 48  # as in test_scoring.py: the same compiled shapes
BATCH = 8


def _synthetic_task(n: int) -> list[str]:
    colors = ["red", "green", "blue", "gold"]
    return [task_line(f"q{i:02d}:", colors, i % len(colors)) for i in range(n)]


def _train(params, examples, steps=150):
    """Overfits `context + " " + right choice` (loss on the choice only)."""
    rows = [
        ([TOK.bos_id] + TOK.encode(e.context), TOK.encode(" " + e.choices[e.answer]))
        for e in examples
    ]
    length = 16
    batch = {k: np.zeros((len(rows), length), np.int32) for k in ("inputs", "targets")}
    batch |= {k: np.zeros((len(rows), length), np.int32) for k in ("positions", "segment_ids")}
    batch["weights"] = np.zeros((len(rows), length), np.float32)
    for r, (prompt, cont) in enumerate(rows):
        ids = prompt + cont
        n = len(ids) - 1
        batch["inputs"][r, :n], batch["targets"][r, :n] = ids[:-1], ids[1:]
        batch["positions"][r, :n], batch["segment_ids"][r, :n] = np.arange(n), 1
        batch["weights"][r, n - len(cont) : n] = 1.0
    optimizer = optax.adam(1e-2)

    @jax.jit
    def step(params, opt_state):
        grads = jax.grad(lambda p: model.loss_fn(p, batch, CFG)[0])(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    opt_state = optimizer.init(params)
    for _ in range(steps):
        params, opt_state = step(params, opt_state)
    return params


def test_trained_model_picks_the_answers_it_learned_untrained_is_near_chance(
    small_params, tmp_path
):
    path = write_lines(tmp_path, _synthetic_task(16), "colors.jsonl")
    examples = taskfile.load_task(path)
    trained = _train(small_params, examples)

    before = tasks.evaluate_task(small_params, CFG, TOK, path, max_len=MAX_LEN, batch_size=BATCH)
    after = tasks.evaluate_task(trained, CFG, TOK, path, max_len=MAX_LEN, batch_size=BATCH)
    assert before["task"] == "colors" and before["n"] == 16
    assert before["acc"] <= 0.5  # 4 choices: chance is 0.25
    assert after["acc"] == 1.0 and after["acc_norm"] == 1.0
    assert after["acc_stderr"] == 0.0

    requests = prompts.build_requests(examples)
    scores = scoring.score_requests(trained, CFG, TOK, requests, max_len=MAX_LEN, batch_size=BATCH)
    # Exactly the right choices are the model's greedy continuations.
    is_answer = [r.choice == examples[r.example].answer for r in requests]
    assert [s.is_greedy for s in scores] == is_answer


def test_evaluate_task_with_fewshot_file_and_progress(small_params, tmp_path):
    path = write_lines(tmp_path, _synthetic_task(6), "colors.jsonl")
    shots = write_lines(tmp_path, _synthetic_task(3), "shots.jsonl")
    calls = []
    result = tasks.evaluate_task(
        small_params,
        CFG,
        TOK,
        path,
        max_len=MAX_LEN,
        num_fewshot=2,
        fewshot_path=shots,
        batch_size=BATCH,
        progress=lambda done, total: calls.append((done, total)),
    )
    assert result["num_fewshot"] == 2 and result["n"] == 6
    assert calls[-1] == (24, 24) and [d for d, _ in calls] == [8, 16, 24]


def test_mean_and_stderr_match_hand_computed_values():
    mean, stderr = tasks.mean_stderr([1, 0, 1, 1, 0])
    # mean 0.6; squared deviations 3 * 0.16 + 2 * 0.36 = 1.2; sample var 1.2 / 4 = 0.3.
    assert mean == pytest.approx(0.6)
    assert stderr == pytest.approx(math.sqrt(0.3) / math.sqrt(5))
    assert tasks.mean_stderr([1, 1, 1]) == (1.0, 0.0)
    assert math.isnan(tasks.mean_stderr([1])[1])


def _aggregate(cases, name="t"):
    """Metrics for [(choices, loglikelihoods, answer), ...] under the default delimiter."""
    examples = [taskfile.Example("c", tuple(ch), ans) for ch, _, ans in cases]
    requests = prompts.build_requests(examples)
    scores = [scoring.Score(ll, False) for _, lls, _ in cases for ll in lls]
    return tasks.aggregate(examples, requests, scores, name)


def test_acc_over_examples_and_its_stderr():
    right, wrong = (["a", "b"], [-1.0, -2.0], 0), (["a", "b"], [-1.0, -2.0], 1)
    result = _aggregate([right, wrong, right, right, wrong])
    assert result == {
        "task": "t",
        "n": 5,
        "acc": pytest.approx(0.6),
        "acc_stderr": pytest.approx(0.24494897),
        "acc_norm": pytest.approx(0.6),
        "acc_norm_stderr": pytest.approx(0.24494897),
    }


def test_length_normalization_flips_the_choice():
    # Raw: " a" (-2) beats " bbbbbbbbb" (-4); per byte: -2/2 = -1 loses to -4/10 = -0.4.
    result = _aggregate([(["a", "bbbbbbbbb"], [-2.0, -4.0], 1)])
    assert (result["acc"], result["acc_norm"]) == (0.0, 1.0)
    # Bytes, not characters: " éé" is 5 bytes (-3/5 = -0.6 beats -2.5/3), 3 characters.
    assert tasks.choose([-3.0, -2.5], [" éé", " ab"]) == (1, 0)
    assert tasks.choose([-1.0, -1.0], [" a", " b"]) == (0, 0)  # ties: the lowest index
