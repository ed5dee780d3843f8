"""Chaos: a run killed at random moments, with random damage to random checkpoint files between
restarts, ends exactly where a clean run does; no good step is lost, every damaged one is set
aside with a warning naming it."""

import os
import random
import re
import signal
import subprocess
import time

import pytest
from helpers import run_module, start_module, subprocess_env

from near_jax.train import checkpoint, metrics
from near_jax.train import checkpoint_integrity as integrity

STEPS = 120
RUN = [
    "--config=configs/tiny.py",
    "--config.model.d_model=32",
    "--config.model.n_layers=1",
    "--config.model.n_heads=2",
    "--config.model.n_kv_heads=1",
    "--config.model.mlp_dim=64",
    "--config.data.seq_len=32",
    "--config.train.global_batch_size=4",
    f"--config.train.steps={STEPS}",
    "--config.train.log_every=1",
    "--config.train.eval_every=0",
    "--config.train.eval_batches=1",
    "--config.train.progress=lines",
    "--config.checkpoint.every=4",
    "--config.checkpoint.keep=2",
]


def _args(workdir):
    return ["near_jax.train", *RUN, f"--workdir={workdir}"]


CACHE = {}  # the runs share one persistent compilation cache: most of a start is compiling


def _env():
    return subprocess_env(devices=1, compilation_cache=CACHE["dir"])


def _losses(workdir):
    if not os.path.exists(os.path.join(workdir, "metrics.jsonl")):
        return {}
    records = metrics.drop_superseded(metrics.read_metrics(str(workdir)))
    return {r["step"]: r["loss"] for r in records if r["split"] == "train"}


def _good_steps(workdir):
    """Steps a restart may resume from: committed, finished (manifest) and intact."""
    directory = checkpoint.checkpoint_dir(workdir)
    good = []
    for path in directory.iterdir() if directory.exists() else []:
        if not path.name.isdigit() or not (path / checkpoint.COMMIT_MARKER).exists():
            continue
        try:
            integrity.verify(path)
        except integrity.DamagedStep:
            continue
        good.append(int(path.name))
    return sorted(good)


def _damage(rng, workdir):
    """Random damage to a random file of a random step; returns the step it spoiled, if any."""
    directory = checkpoint.checkpoint_dir(workdir)
    steps = sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())
    if not steps:
        return None
    step = steps[-1] if rng.random() < 0.6 else rng.choice(steps)
    step_dir = directory / str(step)
    files = sorted(os.path.join(r, f) for r, _, names in os.walk(step_dir) for f in names)
    kind = rng.choice(["flip", "truncate", "delete", "no commit marker", "empty newer step"])
    if kind == "empty newer step":
        os.makedirs(directory / str(steps[-1] + 4), exist_ok=True)
        return steps[-1] + 4
    if kind == "no commit marker":
        (step_dir / checkpoint.COMMIT_MARKER).unlink(missing_ok=True)
        return step
    path = rng.choice(files)
    if kind == "delete":
        os.remove(path)
    elif kind == "truncate":
        os.truncate(path, os.path.getsize(path) // 2)
    else:  # same size, other bytes
        data = bytearray(open(path, "rb").read())
        if not data:
            return None
        for i in rng.sample(range(len(data)), k=min(len(data), 16)):
            data[i] ^= 0xFF
        open(path, "wb").write(bytes(data))
    return step


def _run_until(workdir, target_losses, deadline_s=240):
    """Starts training and kills it (SIGKILL) once `target_losses` steps are logged."""
    proc = start_module(
        *_args(workdir),
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + deadline_s
    while proc.poll() is None and time.time() < deadline:
        if len(_losses(workdir)) >= target_losses:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    _, err = proc.communicate(timeout=120)
    return proc.returncode, err


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory):
    CACHE["dir"] = str(tmp_path_factory.mktemp("jax_cache"))
    workdir = tmp_path_factory.mktemp("clean") / "run"
    proc = run_module(*_args(workdir), env=_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    return _losses(workdir)


def test_kills_and_damage_never_lose_a_good_step(clean_run, tmp_path):
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    workdir = tmp_path / "run"
    history = []
    for _ in range(3):
        target = len(_losses(workdir)) + rng.randint(5, 30)
        rc, err = _run_until(workdir, target)
        history.append(("killed" if rc == -signal.SIGKILL else f"exit {rc}", target))
        assert rc in (-signal.SIGKILL, 0), (seed, history, err[-3000:])
        damaged = _damage(rng, workdir) if rng.random() < 0.8 else None
        good = _good_steps(workdir)
        history.append(("damaged", damaged, "good", good))
        if rc == 0:
            break

        # The next start resumes from the newest good step, and sets aside every newer one.
        newer = [s for s in (checkpoint.checkpoint_dir(workdir)).iterdir() if s.name.isdigit()]
        newer = sorted(int(p.name) for p in newer if not good or int(p.name) > good[-1])
        rc, err = _run_until(workdir, len(_losses(workdir)) + 1)
        resumed = re.search(r"resumed from step (\d+)", err)
        if good:
            assert resumed and int(resumed.group(1)) == good[-1], (seed, history, err[-3000:])
        else:
            assert "starting from scratch" in err or "none of the checkpoints" in err, (seed, err)
        for step in newer:
            assert re.search(rf"step {step}: .*set aside in", err), (seed, history, step, err)
            aside = tmp_path / "run" / "checkpoints.damaged"
            assert any(p.name.startswith(f"{step}-") for p in aside.iterdir()), (seed, step)

    final = run_module(*_args(workdir), env=_env())
    if (
        "none of the checkpoints" in final.stderr
    ):  # every step was spoiled: a fresh start is allowed
        final = run_module(*_args(workdir), env=_env())
    assert final.returncode == 0, (seed, history, final.stderr[-3000:])
    assert _losses(workdir) == clean_run, (seed, history)  # bit-identical, step by step
    assert _good_steps(workdir)[-1] == STEPS
