"""`python -m near_jax.eval`: the table and eval.jsonl, --watch, one-line errors and exit codes."""

import json
import math
import os
import subprocess
import time

import pytest
from helpers import damaged_copy, run_module, save_run, small_config, start_module, subprocess_env


def _eval(*args, timeout=300):
    return run_module("near_jax.eval", *args, env=subprocess_env(devices=2), timeout=timeout)


def _records(workdir):
    path = os.path.join(workdir, "eval.jsonl")
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def test_cli_writes_eval_jsonl_and_a_table(saved_run):
    proc = _eval(f"--workdir={saved_run}", "--max_tokens=1500", "--tasks=python_syntax")
    assert proc.returncode == 0, proc.stderr[-2000:]
    header, row = proc.stdout.strip().splitlines()[-2:]
    assert "bits_per_byte" in header and "python_syntax/acc" in header
    assert row.split()[0] == "5"
    (record,) = [r for r in _records(saved_run) if r["split"] == "checkpoint_eval"]
    assert record["step"] == 5 and record["tokens"] >= 1500
    assert record["bits_per_byte"] == pytest.approx(record["loss"] / math.log(2), rel=0.05)
    assert 0.0 <= record["python_syntax/acc"] <= 1.0 and record["python_syntax/n"] == 35
    assert os.listdir(os.path.join(saved_run, "tb"))


def test_watch_picks_up_a_checkpoint_written_after_it_started(tmp_path):
    cfg = small_config()  # train.steps = 10: watch stops once step 10 is evaluated
    save_run(tmp_path, cfg, steps=(5,))
    proc = start_module(
        "near_jax.eval",
        f"--workdir={tmp_path}",
        "--watch",
        "--poll_seconds=0.5",
        "--idle_timeout=240",
        "--max_tokens=500",
        env=subprocess_env(devices=2),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 240
        while not (tmp_path / "eval.jsonl").exists() or not _records(tmp_path):
            assert proc.poll() is None, proc.communicate()[1][-2000:]
            assert time.monotonic() < deadline, "watch never evaluated step 5"
            time.sleep(0.5)
        save_run(tmp_path, cfg, steps=(10,))  # lands while watch is polling
        out, err = proc.communicate(timeout=240)
    finally:
        proc.kill()
    assert proc.returncode == 0, err[-2000:]
    assert [r["step"] for r in _records(tmp_path)] == [5, 10]
    assert "run finished at step 10" in err


def test_bad_input_is_one_line_and_exit_2(tmp_path, saved_run):
    bad_task = tmp_path / "bad.jsonl"
    bad_task.write_text('{"context": "x", "choices": ["a"], "answer": 0}\n')
    for args, message in [
        ([f"--workdir={tmp_path / 'nope'}"], "no such directory"),
        ([f"--workdir={tmp_path}"], "no committed checkpoint"),
        ([f"--workdir={saved_run}", "--step=7"], "--step=7: not found"),
        ([f"--workdir={saved_run}", "--step=5", "--all"], "choose one of"),
        ([f"--workdir={saved_run}", f"--tasks={bad_task}"], "bad.jsonl:1:"),
        ([f"--workdir={saved_run}", "--watch", "--poll_seconds=-1"], "--poll_seconds=-1.0"),
    ]:
        proc = _eval(*args)
        assert proc.returncode == 2, (args, proc.stderr[-2000:])
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], (args, proc.stderr)


def test_cli_unreadable_checkpoints_are_one_line_and_exit_1(two_steps, saved_run, tmp_path):
    proc = _eval(f"--workdir={damaged_copy(saved_run, tmp_path / 'a', 5, 'arrays_deleted')}")
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) < 10, proc.stderr[-3000:]
    assert "no checkpoint could be read: checkpoint step 5: unreadable (" in lines[-1]

    workdir = damaged_copy(two_steps, tmp_path / "b", 3, "config_list")
    proc = _eval(f"--workdir={workdir}", "--all", "--max_tokens=300")
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) < 10, proc.stderr[-3000:]
    assert "evaluated 1 steps; skipped 1 that could not be read (steps 3;" in lines[-1]
    assert proc.stdout.strip().splitlines()[-1].split()[0] == "5"
