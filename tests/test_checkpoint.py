"""Checkpoints: exact resume, kill -9, SIGTERM, resharding restore, corruption, async errors."""

import json
import os
import shutil
import signal
import subprocess
import time

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest
from helpers import (
    SMALL_TRAIN_FLAGS,
    DataPosition,
    mesh_trainer,
    run_module,
    save_steps,
    small_config,
    start_module,
    subprocess_env,
)

from near_jax import sharding
from near_jax.train import checkpoint, checkpoint_integrity, metrics
from near_jax.train.loop import trainer_for
from near_jax.train.step import TrainState

SMALL_RUN = [
    *SMALL_TRAIN_FLAGS,
    "--config.train.steps=40",
    "--config.train.log_every=1",
    "--config.checkpoint.keep=0",
]


def _args(workdir, *extra):
    return ["near_jax.train", *SMALL_RUN, f"--workdir={workdir}", *extra]


def _run(workdir, *extra, timeout=300):
    proc = run_module(*_args(workdir, *extra), env=subprocess_env(devices=1), timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _losses(workdir) -> dict[int, float]:
    records = metrics.drop_superseded(metrics.read_metrics(str(workdir)))
    return {r["step"]: r["loss"] for r in records if r["split"] == "train"}


def _saved_state(workdir, step):
    path = checkpoint.checkpoint_dir(workdir) / str(step) / checkpoint.STATE
    return ocp.StandardCheckpointer().restore(path)


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """40 steps in one go."""
    workdir = tmp_path_factory.mktemp("reference")
    _run(workdir)
    return workdir


def test_resume_is_bit_exact(reference_run, tmp_path):
    stopped = _run(tmp_path, "--config.train.stop_at=20")
    assert "stopped at step 20" in stopped.stdout
    assert max(_losses(tmp_path)) == 20
    resumed = _run(tmp_path)
    assert "resumed from step 20" in resumed.stderr
    want, got = _losses(reference_run), _losses(tmp_path)
    assert sorted(got) == list(range(1, 41))
    assert got == want  # bit-identical per-step losses
    a, b = _saved_state(reference_run, 40), _saved_state(tmp_path, 40)
    jax.tree.map(np.testing.assert_array_equal, a, b)
    again = _run(tmp_path)  # a finished run says so and trains nothing
    assert "nothing to do" in again.stdout and max(_losses(tmp_path)) == 40


def _committed_steps(workdir):
    return _committed_steps_of(checkpoint.checkpoint_dir(workdir))


def test_kill_9_then_resume_reproduces_the_run(reference_run, tmp_path):
    # A different kill point each run (logged on failure): once a random step is logged,
    # after a random few milliseconds (maybe mid-save). By step, not by wall time: a quiet
    # fast machine runs the 40 steps in ~1 s, and a kill "1.3 s in" came after the end.
    rng = np.random.default_rng()
    kill_step, delay = int(rng.integers(2, 31)), float(rng.uniform(0.0, 0.03))
    proc = start_module(
        *_args(tmp_path),
        env=subprocess_env(devices=1),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    directory = checkpoint.checkpoint_dir(tmp_path)

    def finished_steps() -> list[int]:
        # A step counts once its manifest is written too (a kill between commit and manifest
        # leaves it unfinished: the restart sets it aside and takes the one before).
        steps = _committed_steps(tmp_path)
        return [s for s in steps if checkpoint_integrity.has_manifest(directory / str(s))]

    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        # at least one finished checkpoint to resume from (what this test is about)
        if max(_losses(tmp_path) or [0]) >= kill_step and finished_steps():
            break
        time.sleep(0.005)
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = max(_losses(tmp_path) or [0])
    last_committed = max(_committed_steps(tmp_path))
    assert proc.returncode == -signal.SIGKILL and last_committed < 40, (kill_step, delay)
    last_finished = max(finished_steps())

    resumed = _run(tmp_path)
    resumed_from = int(resumed.stderr.split("resumed from step ")[1].split()[0])
    assert resumed_from == last_finished and resumed_from <= max(killed_at, resumed_from)
    assert _losses(tmp_path) == _losses(reference_run)
    jax.tree.map(
        np.testing.assert_array_equal, _saved_state(reference_run, 40), _saved_state(tmp_path, 40)
    )


def test_sigterm_saves_at_the_interrupted_step_and_exits_0(tmp_path):
    proc = start_module(
        *_args(tmp_path, "--config.checkpoint.every=0", "--config.train.steps=400"),
        env=subprocess_env(devices=1),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 240
    while len(_losses(tmp_path)) < 3 and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    line = [x for x in out.splitlines() if x.startswith("stopped by signal")]
    assert len(line) == 1, out
    step = int(line[0].split("at step ")[1].split()[0])
    assert _committed_steps(tmp_path) == [step]  # every=0: only the preemption save
    assert 3 <= step < 400 and step >= max(_losses(tmp_path))


# --- in-process: resharding, corruption, async errors ----------------------------------


@pytest.mark.parametrize(
    "target",
    [dict(data=2, tensor=4), dict(data=1, n=1), dict(data=1, fsdp=4, tensor=2)],
    ids=["data2xtensor4", "1 device", "fsdp4xtensor2"],
)
def test_restore_onto_another_mesh(tmp_path, target):
    source = mesh_trainer(data=1, fsdp=8)
    saved = save_steps(tmp_path, source, steps=(10,))
    n = target.pop("n", 8)
    cfg = small_config()
    for key, value in target.items():
        cfg.mesh[key] = value
    dest = trainer_for(cfg, sharding.make_mesh(cfg.mesh, jax.devices()[:n]))
    it = DataPosition()
    restored = checkpoint.Checkpointer(tmp_path).restore(dest.abstract_state._asdict(), it)
    assert restored.step == 10 and it.position == {"num_shards": 1, "shards": {"0": 10}}
    state = TrainState(**restored.state)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), state, saved)
    got = jax.tree.map(lambda x: x.sharding, state)
    for x, want in zip(jax.tree.leaves(state), jax.tree.leaves(dest.state_shardings), strict=True):
        assert x.sharding.is_equivalent_to(want, x.ndim), (x.sharding, want)
    assert all(len(s.device_set) == n for s in jax.tree.leaves(got))


def _state_files(step_dir):
    """The array data files of a step (tensorstore OCDBT keeps them in .../d/)."""
    paths = [
        os.path.join(root, f)
        for root, _, files in os.walk(step_dir / checkpoint.STATE)
        for f in files
        if os.path.basename(root) == "d"
    ]
    assert paths, f"no array files under {step_dir}"
    return sorted(paths)


def _damage(kind, step_dir):
    if kind == "no commit marker":
        os.remove(step_dir / checkpoint.COMMIT_MARKER)
    elif kind == "truncated array file":
        for path in _state_files(step_dir):
            with open(path, "r+b") as f:
                f.truncate(os.path.getsize(path) // 2)
    elif kind == "missing array file":
        for path in _state_files(step_dir):
            os.remove(path)
    elif kind == "stale temporary directory":
        shutil.move(step_dir, step_dir.parent / f"{step_dir.name}.orbax-checkpoint-tmp-1234")


@pytest.mark.parametrize(
    "kind, message",
    [
        ("no commit marker", "step 20: incomplete"),
        ("truncated array file", "step 20: damaged"),
        ("missing array file", "step 20: damaged"),
        ("stale temporary directory", "step 20: incomplete save"),
    ],
)
def test_damaged_latest_falls_back_to_previous_step(tmp_path, kind, message):
    trainer = mesh_trainer(data=8)
    save_steps(tmp_path, trainer)
    _damage(kind, tmp_path / "20")
    restored = checkpoint.Checkpointer(tmp_path).restore(trainer.abstract_state._asdict())
    assert restored.step == 10
    assert any(message in line for line in restored.skipped), restored.skipped


def test_no_readable_checkpoint_is_a_clear_error(tmp_path):
    trainer = mesh_trainer(data=8)
    save_steps(tmp_path, trainer)
    for step in ("10", "20"):
        _damage("missing array file", tmp_path / step)
    with pytest.raises(checkpoint.CheckpointError, match="none of the checkpoints"):
        checkpoint.Checkpointer(tmp_path).restore(trainer.abstract_state._asdict())


def test_background_save_error_is_raised(tmp_path, monkeypatch):
    class FailingFuture:
        def result(self, timeout=None):
            raise OSError("disk full (injected)")

    original = ocp.StandardCheckpointHandler.async_save

    async def failing_async_save(self, *args, **kwargs):
        return [*(await original(self, *args, **kwargs) or []), FailingFuture()]

    ckpt = checkpoint.Checkpointer(tmp_path)
    state = {"w": jax.numpy.arange(8.0)}
    cfg = ml_collections.ConfigDict({"x": 1})
    ckpt.save(1, state, DataPosition(), cfg)
    ckpt.wait()
    monkeypatch.setattr(ocp.StandardCheckpointHandler, "async_save", failing_async_save)
    ckpt.save(2, state, DataPosition(), cfg)  # returns at once; the write fails behind it
    with pytest.raises(checkpoint.CheckpointError, match="step 2 could not be written .*disk full"):
        ckpt.close()
    assert _committed_steps_of(tmp_path) == [1]


def _committed_steps_of(directory):
    if not os.path.isdir(directory):
        return []
    names = [n for n in os.listdir(directory) if n.isdigit()]
    return sorted(
        int(n)
        for n in names
        if os.path.exists(os.path.join(directory, n, checkpoint.COMMIT_MARKER))
    )


def test_data_position_merges_every_process_file(tmp_path):
    trainer = mesh_trainer(data=8)
    save_steps(tmp_path, trainer, steps=(10,))
    data_dir = tmp_path / "10" / checkpoint.DATA
    # As if two processes had saved, each with the two shards it reads.
    (data_dir / "process_0-of-1.json").unlink()
    for p in range(2):
        state = {"num_shards": 4, "shards": {str(2 * p + i): {"pos": 2 * p + i} for i in (0, 1)}}
        (data_dir / f"process_{p}-of-2.json").write_text(json.dumps(state))
    checkpoint_integrity.write(tmp_path / "10")  # as the two-process save would have
    ckpt = checkpoint.Checkpointer(tmp_path)
    assert ckpt.read_data_state(10) == {
        "num_shards": 4,
        "shards": {str(s): {"pos": s} for s in range(4)},
    }
    restored_into = DataPosition()
    ckpt.restore(trainer.abstract_state._asdict(), restored_into)
    assert restored_into.position == {
        "num_shards": 4,
        "shards": {str(s): {"pos": s} for s in range(4)},
    }


def test_keep_last_k_and_every_m_th_step(tmp_path):
    ckpt = checkpoint.Checkpointer(tmp_path, keep=2, keep_every=10)
    state = {"w": jax.numpy.arange(4.0)}
    for step in range(5, 35, 5):
        ckpt.save(step, state, DataPosition(step), ml_collections.ConfigDict({"x": 1}))
    ckpt.close()
    assert _committed_steps_of(tmp_path) == [10, 20, 25, 30]


@pytest.mark.parametrize("keep", [1, 2])
@pytest.mark.parametrize("params_only", [True, False])
def test_keep_never_deletes_a_params_only_step(tmp_path, keep, params_only):
    """A run's params-only origin (imported or grown) stays and is not counted in `keep`; a
    full step 0 goes like any other."""
    ckpt = checkpoint.Checkpointer(tmp_path, keep=keep)
    cfg = ml_collections.ConfigDict({"x": 1})
    params = {"w": jax.numpy.arange(4.0)}
    first = {"params": params} if params_only else {"params": params, "step": 0}
    ckpt.save(0, first, DataPosition(), cfg)
    for step in range(1, 5):
        ckpt.save(step, {"params": params, "step": step}, DataPosition(step), cfg)
    ckpt.close()
    newest = list(range(5 - keep, 5))
    assert _committed_steps_of(tmp_path) == ([0] if params_only else []) + newest
    ckpt = checkpoint.Checkpointer(tmp_path, read_only=True)
    assert ckpt.params_only_steps() == ([0] if params_only else [])
    ckpt.close()


def test_restore_skips_a_params_only_step_without_setting_it_aside(tmp_path):
    """restore(skip=...) walks past the origin: never tried as a TrainState, never moved."""
    trainer = mesh_trainer(data=8)
    ckpt = checkpoint.Checkpointer(tmp_path)
    ckpt.save(0, {"params": trainer.init(jax.random.key(1)).params}, DataPosition(), trainer.cfg)
    ckpt.close()
    save_steps(tmp_path, trainer, steps=(10,))
    _damage("truncated array file", tmp_path / "10")
    ckpt = checkpoint.Checkpointer(tmp_path)
    assert ckpt.params_only_steps() == [0]
    with pytest.raises(checkpoint.NoReadableCheckpoint, match="step 10: damaged") as e:
        ckpt.restore(trainer.abstract_state._asdict(), skip=[0])
    assert "step 0" not in str(e.value)
    assert _committed_steps_of(tmp_path) == [0]  # 10 set aside, 0 untouched
    assert [n.split("-")[0] for n in os.listdir(f"{tmp_path}.damaged")] == ["10"]
