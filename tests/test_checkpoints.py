"""Evaluating a run's checkpoints: unreadable steps are skipped and named, watch starts late."""

from helpers import damaged_copy

from near_jax.eval.checkpoints import Evaluator, run_once, watch


def test_all_skips_an_unreadable_step_and_evaluates_the_others(two_steps, tmp_path):
    workdir = damaged_copy(two_steps, tmp_path, 3, "arrays_truncated")
    evaluator = Evaluator(workdir, max_tokens=300)
    records = run_once(evaluator, [3, 5], skip_unreadable=True)
    assert [r["step"] for r in records] == [5] and list(evaluator.skipped) == [3]
    assert evaluator.skipped[3].startswith("checkpoint step 3: unreadable (")
    assert "the manifest says" in evaluator.skipped[3]  # found by the integrity check


def test_watch_starts_from_the_latest_readable_step(two_steps, tmp_path):
    workdir = damaged_copy(two_steps, tmp_path, 5, "config_garbage")
    evaluator = Evaluator(workdir, max_tokens=300)
    lines = []
    records = watch(
        evaluator, poll_seconds=0, idle_timeout=0, log=lambda m, file=None: lines.append(m)
    )
    assert [r["step"] for r in records] == [3] and list(evaluator.skipped) == [5]
    assert lines[0].startswith("checkpoint step 5: unreadable (") and "JSONDecodeError" in lines[0]
