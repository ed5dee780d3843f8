"""`python -m near_jax.train`: bad input, the README quick start, divergence, a second run,
failed writes. (The step: test_step.py; the loop in-process: test_train_loop.py.)"""

import json
import os
import re
import resource
import shlex
import shutil
import subprocess
import time

import numpy as np
import orbax.checkpoint as ocp
import pytest
from helpers import REPO, SMALL_TRAIN_FLAGS, run_module, start_module, subprocess_env

from near_jax.train import checkpoint
from near_jax.train import checkpoint_integrity as integrity

# --- the command line -------------------------------------------------------------------


def _run_cli(args, tmp_path, timeout=300):
    return run_module(*args, env=subprocess_env(devices=8), timeout=timeout)


def _bad_tokenizer(tmp_path):
    path = tmp_path / "tok.model"
    path.write_bytes(b"\x00 this is not a tokenizer")
    return str(path)


BAD_INPUTS = {
    "unknown key": (["--config.model.bogus=1"], "bogus"),
    "heads": (["--config.model.n_kv_heads=3"], "config.model.n_kv_heads=3"),
    "mesh product": (["--config.mesh.data=3"], "config.mesh="),
    "batch vs data parallel": (["--config.train.global_batch_size=4"], "global_batch_size=4"),
    "missing data": (["--config.data.source=/nonexistent/dir/*.txt"], "config.data.source"),
    "bad tokenizer": (["--config.data.tokenizer={tok}"], "config.data.tokenizer"),
    "bad value type": (["--config.train.steps=many"], "config.train.steps"),
    "missing config file": (["--config=configs/nope.py"], "--config"),
    "missing workdir": (["--workdir="], "--workdir"),
    "workdir is a file": (["--workdir={file}"], "is not a directory"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_line_and_exit_2(case, tmp_path):
    extra, needle = BAD_INPUTS[case]
    (tmp_path / "file").write_text("in the way")
    extra = [a.format(tok=_bad_tokenizer(tmp_path), file=tmp_path / "file") for a in extra]
    args = ["near_jax.train", "--config=configs/tiny.py", f"--workdir={tmp_path / 'run'}", *extra]
    proc = _run_cli(args, tmp_path)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1, proc.stderr
    assert needle in lines[0], lines[0]
    assert "Traceback" not in proc.stderr


def _readme_train_command() -> list[str]:
    text = open(os.path.join(REPO, "README.md")).read()
    match = re.search(
        r"^python3 -m pip install -e \. && (python3 -m near_jax\.train .*)$", text, re.M
    )
    assert match, "README lost its quick-start command"
    return shlex.split(match.group(1))[2:]  # drop "python3 -m"


def test_readme_quick_start_runs_end_to_end_and_plots(tmp_path):
    workdir = tmp_path / "run"
    args = [a for a in _readme_train_command() if not a.startswith("--workdir")]
    args += [
        f"--workdir={workdir}",
        "--config.train.steps=6",
        "--config.train.log_every=2",
        "--config.train.eval_every=3",
        "--config.train.eval_batches=1",
    ]
    proc = _run_cli(args, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "done:" in proc.stdout
    saved = json.load(open(workdir / "config.json"))
    assert saved["train"]["steps"] == 6 and saved["model"]["vocab_size"] == 384
    records = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
    train_steps = [r["step"] for r in records if r["split"] == "train"]
    eval_steps = [r["step"] for r in records if r["split"] == "eval"]
    assert train_steps == [2, 4, 6] and eval_steps == [3, 6]
    assert all(np.isfinite(r["loss"]) for r in records)
    assert all(r["tokens_per_s"] > 0 for r in records if r["split"] == "train")
    assert os.listdir(workdir / "tb")

    plot = _run_cli(["near_jax.plot", f"--workdir={workdir}"], tmp_path)
    assert plot.returncode == 0, plot.stderr
    assert (workdir / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --- nothing lost: divergence, a second run, failed writes --------------------------------

SMALL = [
    "near_jax.train",
    *SMALL_TRAIN_FLAGS,
    "--config.train.log_every=20",
    "--config.checkpoint.keep=3",
]


def _small(workdir, *extra, limit_file_bytes=None, wait=True):
    def limit():  # as a full disk answers a write (Python ignores SIGXFSZ: writes fail EFBIG)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_file_bytes, limit_file_bytes))

    args = [*SMALL, f"--workdir={workdir}", *extra]
    kwargs = dict(env=subprocess_env(devices=1), preexec_fn=limit if limit_file_bytes else None)
    if not wait:
        pipes = dict(stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        return start_module(*args, **pipes, **kwargs)
    return run_module(*args, **kwargs)


def _steps_with_manifests(workdir):
    directory = checkpoint.checkpoint_dir(workdir)
    return sorted(int(p.name) for p in directory.iterdir() if integrity.has_manifest(p))


@pytest.fixture(scope="module")
def trained_20(tmp_path_factory):
    """A small run trained to step 20 (checkpoints 10, 15, 20 kept)."""
    workdir = tmp_path_factory.mktemp("trained_20") / "run"
    proc = _small(workdir, "--config.train.steps=20")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _steps_with_manifests(workdir) == [10, 15, 20]
    return workdir


def _copy(run, tmp_path):
    shutil.copytree(run, tmp_path / "run")
    return tmp_path / "run"


def _last_line(proc):
    return [line for line in proc.stderr.splitlines() if line.strip()][-1]


def test_divergence_saves_nothing_and_keeps_every_good_step(trained_20, tmp_path):
    """lr=1e30 turns the state non-finite at once: before, NaN steps pushed out the good ones."""
    workdir = _copy(trained_20, tmp_path)
    proc = _small(
        workdir, "--config.train.steps=40", "--config.optim.lr=1e30", "--config.train.eval_every=5"
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    line = _last_line(proc)
    assert line.startswith("near_jax.train: diverged: step 25: the eval loss is "), line
    assert "the newest good checkpoint is step 20" in line and "Traceback" not in proc.stderr
    assert _steps_with_manifests(workdir) == [10, 15, 20]
    for step in (10, 15, 20):
        integrity.verify(checkpoint.checkpoint_dir(workdir) / str(step))
        state = ocp.StandardCheckpointer().restore(
            checkpoint.checkpoint_dir(workdir) / str(step) / checkpoint.STATE
        )
        assert integrity.is_finite(state), step
    losses = [json.loads(x) for x in open(workdir / "metrics.jsonl")]
    assert all(r["loss"] is None or np.isfinite(r["loss"]) for r in losses)  # strict JSON


def test_a_second_train_on_the_same_workdir_is_refused(trained_20, tmp_path):
    workdir = _copy(trained_20, tmp_path)
    first = _small(workdir, "--config.train.steps=100000", wait=False)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and f'"pid": {first.pid}' not in _read(workdir / ".lock"):
            assert first.poll() is None, first.stderr.read()[-3000:]
            time.sleep(0.1)
        second = _small(workdir, "--config.train.steps=100000")
        holder = _read(workdir / ".lock")  # read while the first still runs
    finally:
        first.kill()
        first.wait()
    assert second.returncode == 2, second.stderr[-3000:]
    lines = [x for x in second.stderr.splitlines() if x.strip() and not x.startswith("I")]
    assert len(lines) == 1 and f"is in use by near_jax.train (pid {first.pid} on" in lines[0]
    assert json.loads(holder)["pid"] == first.pid  # the refused run changed nothing of it
    for line in open(workdir / "metrics.jsonl"):  # one writer: no interleaved lines
        json.loads(line)


def _read(path):
    try:
        return open(path).read()
    except OSError:
        return ""


def test_a_failed_write_is_one_line_and_keeps_the_checkpoints(trained_20, tmp_path):
    workdir = _copy(trained_20, tmp_path)
    proc = _small(workdir, "--config.train.steps=40", limit_file_bytes=200_000)
    assert proc.returncode == 1, proc.stderr[-3000:]
    line = _last_line(proc)
    assert line.startswith("near_jax.train: checkpoint error: step 25 could not be written")
    assert line.endswith("the newest good checkpoint is step 20"), line
    assert "Traceback" not in proc.stderr and len(proc.stderr.splitlines()) < 20, proc.stderr
    assert _steps_with_manifests(workdir) == [10, 15, 20]
    resumed = _small(workdir, "--config.train.steps=25")  # the half-written step is cleared
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from step 20" in resumed.stderr and "incomplete save 25" in resumed.stderr
    assert _steps_with_manifests(workdir) == [15, 20, 25]
