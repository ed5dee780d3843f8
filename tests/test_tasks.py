"""Multiple-choice tasks: loading, few-shot prompts, log-likelihood scoring and metrics."""

import json
import math
import re

import jax
import numpy as np
import optax
import pytest
from helpers import small_config

from near_jax import model, sharding
from near_jax.data.tokenizer import ByteTokenizer
from near_jax.eval import prompts, scoring, taskfile, tasks
from near_jax.infer import loading

TOK = ByteTokenizer()
CFG = model.ModelConfig.from_config(small_config().model)
MAX_LEN = 48  # not a power of two: the top bucket is MAX_LEN itself
BATCH = 8  # one batch size (and one cfg) for every test, so compiled shapes are shared
apply = jax.jit(model.apply, static_argnums=4)


@pytest.fixture(scope="module")
def params():
    return model.init(CFG, jax.random.key(0))


def _write(tmp_path, lines, name="task.jsonl") -> str:
    path = tmp_path / name
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return str(path)


def _line(context="c", choices=("a", "b"), answer=0, **extra) -> str:
    return json.dumps({"context": context, "choices": list(choices), "answer": answer} | extra)


def _reference(params, request: prompts.Request) -> tuple[float, bool]:
    """Unpadded forward of one request; log_softmax in float64 numpy."""
    cont = TOK.encode(request.continuation)
    ids = ([TOK.bos_id] + TOK.encode(request.prompt) + cont)[-(MAX_LEN + 1) :]
    inputs, targets = np.asarray(ids[:-1])[None], np.asarray(ids[1:])
    n = inputs.shape[1]
    logits = apply(params, inputs, np.arange(n)[None], np.ones((1, n), np.int32), CFG)
    logits_LxV = np.asarray(logits[0], np.float64)
    logprobs_LxV = logits_LxV - np.log(np.exp(logits_LxV).sum(-1, keepdims=True))
    last = np.arange(n - len(cont), n)
    logprob = logprobs_LxV[last, targets[last]].sum()
    greedy = bool((logits_LxV[last].argmax(-1) == targets[last]).all())
    return float(logprob), greedy


def _random_text(rng, n_bytes: int) -> str:
    """Random text of exactly n_bytes UTF-8 bytes, multi-byte characters included."""
    alphabet = list("abcdefghij klmnop():=\n") + ["é", "€"]
    out = ""
    while len(out.encode()) < n_bytes:
        char = rng.choice(alphabet)
        out += char if len((out + char).encode()) <= n_bytes else "x"
    return out


# ---------------------------------------------------------------------------------------------
# Scoring


def test_loglikelihood_matches_unpadded_reference_with_and_without_mesh(params):
    # A sharper head makes logits peaky, so summing a wrong position would show.
    params = params | {"head": params["head"] * 20.0}
    rng = np.random.default_rng(0)
    # Two texts per length pair: 12 requests, 2 batches (the second part padding rows);
    # the 70-byte prompts are cut to MAX_LEN; 5 distinct unpadded lengths to compile.
    requests = [
        prompts.Request(k, 0, _random_text(rng, p), _random_text(rng, c))
        for k, (p, c) in enumerate([(5, 1), (30, 12), (70, 1), (5, 12), (30, 1), (70, 12)] * 2)
    ]
    calls = []
    got = scoring.score_requests(
        params,
        CFG,
        TOK,
        requests,
        max_len=MAX_LEN,
        batch_size=BATCH,
        progress=lambda done, total: calls.append((done, total)),
    )
    want = [_reference(params, r) for r in requests]
    np.testing.assert_allclose(
        [s.loglikelihood for s in got], [w[0] for w in want], rtol=1e-6, atol=1e-4
    )
    assert [s.is_greedy for s in got] == [w[1] for w in want]
    assert np.std([w[0] for w in want]) > 5  # the comparison has something to compare
    assert calls == [(8, 12), (12, 12)]

    # On a mesh: params sharded by the rules table (vocab split too), rows over data axes.
    mesh = loading.inference_mesh(fsdp=2, tensor=2)
    shardings = sharding.logical_to_sharding(model.logical_axes(CFG), params, mesh)
    # batch_size 3 rounds up to the 4 data-parallel ways (data x fsdp): 3 batches of 4 rows.
    on_mesh = scoring.score_requests(
        jax.device_put(params, shardings),
        CFG,
        TOK,
        requests,
        max_len=MAX_LEN,
        batch_size=3,
        mesh=mesh,
    )
    np.testing.assert_allclose(
        [s.loglikelihood for s in on_mesh], [w[0] for w in want], rtol=1e-6, atol=1e-4
    )
    assert [s.is_greedy for s in on_mesh] == [w[1] for w in want]


def test_encode_request_truncates_from_the_left_keeping_the_continuation():
    request = prompts.Request(0, 0, "abcdefghij", " xyz")
    ids, n = scoring.encode_request(TOK, request, max_len=6)
    assert n == 4 and TOK.decode(ids) == "hij xyz"  # 7 ids: the model reads 6
    ids, n = scoring.encode_request(TOK, request, max_len=100)
    assert ids[0] == TOK.bos_id and TOK.decode(ids) == "abcdefghij xyz"
    with pytest.raises(taskfile.TaskError, match="continuation ' xyz' is 4 tokens"):
        scoring.encode_request(TOK, request, max_len=3)
    assert [scoring.bucket_length(n, 100) for n in (1, 16, 17, 33, 64, 65, 99)] == [
        16,
        16,
        32,
        64,
        64,
        100,
        100,
    ]


def _synthetic_task(n: int) -> list[str]:
    colors = ["red", "green", "blue", "gold"]
    return [_line(f"q{i:02d}:", colors, i % len(colors)) for i in range(n)]


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


def test_trained_model_picks_the_answers_it_learned_untrained_is_near_chance(params, tmp_path):
    path = _write(tmp_path, _synthetic_task(16), "colors.jsonl")
    examples = taskfile.load_task(path)
    trained = _train(params, examples)

    before = tasks.evaluate_task(params, CFG, TOK, path, max_len=MAX_LEN, batch_size=BATCH)
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


# ---------------------------------------------------------------------------------------------
# Metrics


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


# ---------------------------------------------------------------------------------------------
# Few-shot prompts


def _examples(n):
    return [taskfile.Example(f"c{i}", ("x", "y"), i % 2) for i in range(n)]


def test_fewshot_prompts_are_seeded_never_the_example_and_have_the_documented_shape():
    examples = _examples(8)
    requests = prompts.build_requests(examples, num_fewshot=3, seed=5)
    assert requests == prompts.build_requests(examples, num_fewshot=3, seed=5)
    assert requests != prompts.build_requests(examples, num_fewshot=3, seed=6)
    assert len(requests) == 16
    shots_of = {f"c{j} {'xy'[j % 2]}": j for j in range(8)}
    for r in requests:
        parts = r.prompt.split("\n\n")
        assert parts[-1] == f"c{r.example}" and len(parts) == 4
        drawn = [shots_of[p] for p in parts[:-1]]  # each part is a rendered solved example
        assert r.example not in drawn and len(set(drawn)) == 3
        assert r.continuation == " " + "xy"[r.choice]
    # The choices of an example share its prompt; order is example-major.
    assert [(r.example, r.choice) for r in requests[:4]] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert requests[0].prompt == requests[1].prompt
    # Every other example can be drawn, never the example itself.
    for r in prompts.build_requests(examples, num_fewshot=7):
        assert f"c{r.example} " not in r.prompt
    with pytest.raises(taskfile.TaskError, match="num_fewshot=8 is not allowed"):
        prompts.build_requests(examples, num_fewshot=8)
    zero = prompts.build_requests(examples, target_delimiter="", fewshot_delimiter="#")
    assert (zero[3].prompt, zero[3].continuation) == ("c1", "y")
    custom = prompts.build_requests(examples, num_fewshot=1, target_delimiter="=", seed=1)
    shot, context = custom[0].prompt.split("\n\n")
    assert context == "c0" and shot[-2] == "=" and custom[0].continuation == "=x"


def test_fewshot_from_a_separate_pool_skips_copies_of_the_example():
    examples = _examples(2)
    pool = [
        examples[0],
        taskfile.Example("p1", ("u", "v"), 1),
        taskfile.Example("p2", ("u", "v"), 0),
    ]
    requests = prompts.build_requests(examples, num_fewshot=2, fewshot_pool=pool, seed=3)
    shots = requests[0].prompt.split("\n\n")[:-1]
    assert sorted(shots) == ["p1 v", "p2 u"]  # the copy of example 0 is never drawn
    with pytest.raises(taskfile.TaskError, match="only 2 examples other than example 0"):
        prompts.build_requests(examples, num_fewshot=3, fewshot_pool=pool)


def test_evaluate_task_with_fewshot_file_and_progress(params, tmp_path):
    path = _write(tmp_path, _synthetic_task(6), "colors.jsonl")
    shots = _write(tmp_path, _synthetic_task(3), "shots.jsonl")
    calls = []
    result = tasks.evaluate_task(
        params,
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


# ---------------------------------------------------------------------------------------------
# Loading


BAD_LINES = [
    ('{"context": "c", "choices": ["a", "b"], "answer": 0', "not valid JSON"),
    ('["c", ["a", "b"], 0]', "the line holds an array, not an object"),
    ('{"context": "c", "choices": ["a", "b"]}', "missing field 'answer'"),
    ('{"choices": ["a", "b"], "answer": 0}', "missing field 'context'"),
    (_line(label=1), "unknown field 'label'; allowed: context, choices, answer, id"),
    (_line(context=3), "'context' is an integer; it must be a string"),
    ('{"context": "c", "choices": "ab", "answer": 0}', "'choices' is a string; it must be a list"),
    (_line(choices=["a"]), "'choices' has only 1; it must be a list of at least 2"),
    (_line(choices=["a", 2]), r"'choices'\[1\] is an integer"),
    (_line(choices=["a", ""]), r"'choices'\[1\] is empty"),
    (_line(answer=2), r"'answer' is 2; it must be an integer index into 'choices' \(0..1\)"),
    (_line(answer=-1), r"'answer' is -1; it must be an integer index"),
    (_line(answer=1.0), "'answer' is a number; it must be an integer index"),
    (_line(answer=True), "'answer' is a boolean; it must be an integer index"),
    (_line(answer="0"), "'answer' is a string"),
    (_line(id=[1]), "'id' is an array; it must be a string or int"),
]


@pytest.mark.parametrize("bad, message", BAD_LINES)
def test_malformed_line_names_file_and_line(tmp_path, bad, message):
    # Line 2 is blank (skipped, but still counted), so the bad line is line 3.
    path = _write(tmp_path, [_line(id="ok"), "", bad, _line()])
    with pytest.raises(taskfile.TaskError, match=message) as info:
        taskfile.load_task(path)
    text = str(info.value)
    assert text.startswith(f"{path}:3: ") and "\n" not in text


def test_unreadable_or_empty_task_files(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(_line().encode() + b"\n" + b'{"context": "caf\xe9"}\n')
    with pytest.raises(taskfile.TaskError, match=f"^{re.escape(str(path))}:2: not valid UTF-8"):
        taskfile.load_task(path)
    for lines in ([], ["", "  "]):
        empty = _write(tmp_path, lines, "empty.jsonl")
        with pytest.raises(taskfile.TaskError, match=f"^{re.escape(empty)}: no examples"):
            taskfile.load_task(empty)
    with pytest.raises(taskfile.TaskError, match="cannot read the task file"):
        taskfile.load_task(tmp_path / "missing.jsonl")
    with pytest.raises(taskfile.TaskError, match="no such task file; .*python_syntax"):
        taskfile.resolve_task("no_such_task")
    loaded = taskfile.load_task(_write(tmp_path, [_line(id=7, answer=1)]))
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
