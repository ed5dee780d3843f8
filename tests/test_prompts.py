"""Few-shot requests: seeded shots that are never the example, delimiters, separate pools."""

import pytest

from near_jax.eval import prompts, taskfile


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
