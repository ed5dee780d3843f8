"""Checkpoint evaluation: bits per byte by hand, the CLI's table and eval.jsonl, --watch."""

import json
import math
import os
import shutil
import subprocess
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import damage_step, run_module, save_run, small_config, start_module, subprocess_env

from near_jax import model, sharding
from near_jax.data.tokenizer import ByteTokenizer
from near_jax.eval import heldout
from near_jax.eval.checkpoints import Evaluator, run_once, watch

TEXTS = {
    "a.txt": "héllo wörld",  # 13 bytes: é and ö take two each
    "b.txt": "def f(x):\n    return x * 2\n",  # 9 + 1 + 16 + 1 = 27 bytes
    "c.txt": "€" * 30 + " long enough to span rows",  # 90 + 25 bytes: cut into pieces
}
HAND_BYTES = 13 + 27 + 115


def _nats(logits_LxV, targets_L) -> np.ndarray:
    logits = np.asarray(logits_LxV, np.float64)
    top = logits.max(-1, keepdims=True)
    lse = np.log(np.exp(logits - top).sum(-1)) + top[:, 0]
    return lse - logits[np.arange(len(targets_L)), targets_L]


def test_bits_per_byte_matches_a_hand_computation(tmp_path):
    for name, text in TEXTS.items():
        (tmp_path / name).write_text(text, encoding="utf-8")
    cfg = small_config()
    cfg.data.source = str(tmp_path)
    cfg.data.seq_len = 32
    mcfg = model.ModelConfig.from_config(cfg.model)
    params = model.init(mcfg, jax.random.key(3))
    tok = ByteTokenizer()

    held = heldout.load_heldout(cfg.data, tok, max_tokens=10**6, all_docs=True)
    assert held.bytes == HAND_BYTES and held.docs == 3
    got = heldout.evaluate_heldout(params, mcfg, sharding.make_mesh(cfg.mesh), held, batch_size=3)

    # Reference: each document alone, cut into windows of 33 tokens that overlap by one.
    nats, count = 0.0, 0
    for text in TEXTS.values():
        ids = [tok.bos_id, *text.encode("utf-8"), tok.eos_id]
        for start in range(0, len(ids) - 1, 32):
            window = ids[start : start + 33]
            x = jnp.asarray([window[:-1]])
            logits = model.apply(params, x, jnp.arange(x.shape[1])[None], jnp.ones_like(x), mcfg)
            per_target = _nats(logits[0], np.asarray(window[1:]))
            is_text = [start + 1 + j < len(ids) - 1 for j in range(len(window) - 1)]
            nats += per_target[is_text].sum()
            count += sum(is_text)
    assert got["tokens"] == count == HAND_BYTES  # byte tokenizer: one token per byte
    np.testing.assert_allclose(got["loss"], nats / count, rtol=1e-5)
    np.testing.assert_allclose(got["bits_per_byte"], nats / math.log(2) / HAND_BYTES, rtol=1e-5)
    np.testing.assert_allclose(got["perplexity"], math.exp(nats / count), rtol=1e-5)


def test_validation_split_is_the_default_and_whole_documents_are_taken():
    cfg = small_config()  # stdlib source
    held = heldout.load_heldout(cfg.data, ByteTokenizer(), max_tokens=2000)
    assert held.tokens >= 2000 and held.bytes == held.tokens  # ascii-dominated stdlib
    w = held.rows["weights"]
    assert w.sum() == held.tokens and set(np.unique(w)) <= {0.0, 1.0}


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


@pytest.fixture(scope="module")
def two_steps(tmp_path_factory):
    """A run with checkpoints at steps 3 and 5 (copy it before damaging it)."""
    workdir = tmp_path_factory.mktemp("two_steps")
    save_run(workdir, small_config(), steps=(3, 5))
    return workdir


def _damaged(source, tmp_path, step, kind):
    workdir = tmp_path / "run"
    shutil.copytree(source, workdir)
    damage_step(workdir, step, kind)
    return str(workdir)


def test_all_skips_an_unreadable_step_and_evaluates_the_others(two_steps, tmp_path):
    workdir = _damaged(two_steps, tmp_path, 3, "arrays_truncated")
    evaluator = Evaluator(workdir, max_tokens=300)
    records = run_once(evaluator, [3, 5], skip_unreadable=True)
    assert [r["step"] for r in records] == [5] and list(evaluator.skipped) == [3]
    assert evaluator.skipped[3].startswith("checkpoint step 3: unreadable (")
    assert "the manifest says" in evaluator.skipped[3]  # found by the integrity check


def test_watch_starts_from_the_latest_readable_step(two_steps, tmp_path):
    workdir = _damaged(two_steps, tmp_path, 5, "config_garbage")
    evaluator = Evaluator(workdir, max_tokens=300)
    lines = []
    records = watch(
        evaluator, poll_seconds=0, idle_timeout=0, log=lambda m, file=None: lines.append(m)
    )
    assert [r["step"] for r in records] == [3] and list(evaluator.skipped) == [5]
    assert lines[0].startswith("checkpoint step 5: unreadable (") and "JSONDecodeError" in lines[0]


def test_cli_unreadable_checkpoints_are_one_line_and_exit_1(two_steps, saved_run, tmp_path):
    proc = _eval(f"--workdir={_damaged(saved_run, tmp_path / 'a', 5, 'arrays_deleted')}")
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) < 10, proc.stderr[-3000:]
    assert "no checkpoint could be read: checkpoint step 5: unreadable (" in lines[-1]

    workdir = _damaged(two_steps, tmp_path / "b", 3, "config_list")
    proc = _eval(f"--workdir={workdir}", "--all", "--max_tokens=300")
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) < 10, proc.stderr[-3000:]
    assert "evaluated 1 steps; skipped 1 that could not be read (steps 3;" in lines[-1]
    assert proc.stdout.strip().splitlines()[-1].split()[0] == "5"
