"""The training loop (`near_jax.train.loop`) in-process: the trainer a config asks for, the
saved config, the resume check, and a run that starts from its own params-only step (an
imported or grown model). (The command line: test_train.py.)"""

import json
import os
import shutil

import jax
import numpy as np
import pytest
from helpers import DataPosition, damage_step, random_params, small_config

from near_jax import sharding
from near_jax.config import ConfigError
from near_jax.train import checkpoint, inmesh, loop
from near_jax.train.loop import check_resume_config, save_config, trainer_for


def test_save_config_writes_the_config_a_resume_accepts(tmp_path):
    cfg = small_config()
    save_config(cfg, str(tmp_path))
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved == json.loads(json.dumps(cfg.to_dict()))
    check_resume_config(saved, cfg)  # the same config resumes
    cfg.train.steps += 1  # train and optimizer settings may change on resume
    check_resume_config(saved, cfg)
    cfg.model.loss_chunk = 1024  # so may the fused loss, even for a run saved before it existed
    del saved["model"]["loss_chunk"]
    check_resume_config(saved, cfg)


@pytest.mark.parametrize(
    "section, key, value",
    [("model", "n_layers", 3), ("data", "seq_len", 16), ("data", "source", "elsewhere")],
)
def test_resuming_with_another_model_or_data_layout_is_one_line(tmp_path, section, key, value):
    cfg = small_config()
    save_config(cfg, str(tmp_path))
    saved = json.loads((tmp_path / "config.json").read_text())
    cfg[section][key] = value
    with pytest.raises(ConfigError, match=f"config.{section}.{key}={value!r} is not allowed"):
        check_resume_config(saved, cfg)


def test_trainer_for_picks_in_mesh_diloco_only_when_asked(monkeypatch):
    calls = []
    monkeypatch.setattr(loop, "make_trainer", lambda cfg, mesh: calls.append("plain"))
    monkeypatch.setattr(inmesh, "make_trainer", lambda cfg, mesh: calls.append("diloco"))
    cfg = small_config()
    mesh = sharding.make_mesh(cfg.mesh)
    trainer_for(cfg, mesh)
    cfg.diloco.replicas = 2
    trainer_for(cfg, mesh)
    assert calls == ["plain", "diloco"]


@pytest.mark.parametrize("groups, expected", [(0, 4), (2, 2), (1, 1)])
def test_replica_groups_set_the_meshs_replica_axis(monkeypatch, tmp_path, groups, expected):
    """diloco.replica_groups G lays the M replicas over G device groups (0: one each)."""
    seen = []

    def stop(cfg, mesh):
        seen.append(mesh.shape[sharding.REPLICA_AXIS])
        raise KeyboardInterrupt  # the mesh is all this test needs

    monkeypatch.setattr(loop, "trainer_for", stop)
    cfg = small_config()
    cfg.diloco.replicas, cfg.diloco.replica_groups, cfg.diloco.inner_steps = 4, groups, 2
    with pytest.raises(KeyboardInterrupt):
        loop.train(cfg, str(tmp_path))
    assert seen == [expected]


# ------------------------------------------------ a run that starts from its params-only step


@pytest.fixture(scope="module")
def trainer():
    """The Trainer of small_config() on all 8 devices (shared: building one compiles)."""
    cfg = small_config()
    return trainer_for(cfg, sharding.make_mesh(cfg.mesh))


@pytest.fixture(scope="module")
def origin(tmp_path_factory):
    """(workdir, params): a run holding only a params-only step 0, written as `hf import` and
    `grow` write one; the params are random, not what the seed initializes (copy to change)."""
    workdir = tmp_path_factory.mktemp("origin")
    cfg = small_config()
    params = random_params(cfg, seed=1)
    ckpt = checkpoint.Checkpointer(checkpoint.checkpoint_dir(workdir), async_save=False)
    # A data position that is not the start: training from the origin must not use it.
    ckpt.save(0, {"params": params}, DataPosition(7), cfg, wait=True)
    ckpt.close()
    save_config(cfg, str(workdir))
    return workdir, params


def _copy(origin, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(origin[0], workdir)
    return workdir


def _start(trainer, workdir, data_iter=None):
    """loop.start_state on `workdir` with a fresh Checkpointer, as a run starts."""
    ckpt = checkpoint.Checkpointer(checkpoint.checkpoint_dir(workdir), keep=0)
    try:
        return loop.start_state(trainer, ckpt, data_iter or DataPosition())
    finally:
        ckpt.close()


def _assert_params_equal(a, b):
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(a), jax.device_get(b))


def _set_aside(workdir) -> list[str]:
    damaged = workdir / "checkpoints.damaged"
    return sorted(os.listdir(damaged)) if damaged.exists() else []


def test_a_params_only_step_is_where_training_starts(trainer, origin, tmp_path):
    workdir = _copy(origin, tmp_path)
    data_iter = DataPosition()
    state, how = _start(trainer, workdir, data_iter)
    assert how == (
        f"starting from the params of step 0 in {workdir} (params only: fresh optimizer)"
    )
    _assert_params_equal(state.params, origin[1])
    fresh = trainer.init(jax.random.key(trainer.cfg.seed))
    assert int(state.step) == 0
    jax.tree.map(np.testing.assert_array_equal, state.opt_state, fresh.opt_state)
    assert data_iter.position == 0  # the data from its start, not the origin's position 7


def test_a_run_trains_in_its_origins_workdir_then_resumes_its_own_step(trainer, origin, tmp_path):
    workdir = _copy(origin, tmp_path)
    cfg = small_config()
    cfg.train.steps, cfg.train.log_every, cfg.checkpoint.every = 3, 1, 1
    cfg.train.eval_every, cfg.train.eval_batches, cfg.checkpoint.keep = 0, 1, 1
    cfg.data.shards = 1  # as train resolves it, so the resume below accepts the config
    result = loop.train(cfg, str(workdir))
    assert result["start_step"] == 0 and np.isfinite(result["train_loss"])
    ckpt = checkpoint.Checkpointer(checkpoint.checkpoint_dir(workdir), read_only=True)
    assert ckpt.good_steps() == [0, 3] and ckpt.params_only_steps() == [0]  # keep=1, and 0
    ckpt.close()
    state, how = _start(trainer._replace(cfg=cfg), workdir)
    assert how.startswith("resumed from step 3 ") and int(state.step) == 3
    # An Adam step moves each weight by about lr at most: trained from the origin's params,
    # far from the seed's init.
    moved = jax.tree.map(lambda a, b: float(np.abs(a - b).max()), state.params, origin[1])
    assert 0 < max(jax.tree.leaves(moved)) < 10 * cfg.optim.lr
    init = trainer.init(jax.random.key(cfg.seed)).params
    apart = jax.tree.map(lambda a, b: float(np.abs(a - b).max()), state.params, init)
    assert max(jax.tree.leaves(apart)) > 0.1


@pytest.mark.parametrize(
    "kind", ["stale temporary directory", "no_commit_marker", "no manifest", "arrays_truncated"]
)
def test_killed_during_the_first_save_starts_again_from_the_origin(trainer, origin, tmp_path, kind):
    """A grown run killed -9 during its first save: its origin is neither restored as a full
    state nor set aside, and training starts from its params again (not from scratch)."""
    workdir = _copy(origin, tmp_path)
    directory = checkpoint.checkpoint_dir(workdir)
    if kind == "stale temporary directory":  # killed before the commit
        (directory / "5.orbax-checkpoint-tmp-1").mkdir()
    else:
        ckpt = checkpoint.Checkpointer(directory, keep=0)
        ckpt.save(5, trainer.init(jax.random.key(0))._asdict(), DataPosition(5), trainer.cfg)
        ckpt.close()
        if kind == "no manifest":  # killed between the commit and the manifest
            (directory / "5" / "near_jax_manifest.json").unlink()
        else:
            damage_step(workdir, 5, kind)
    state, how = _start(trainer, workdir)
    assert how.startswith("starting from the params of step 0 ")
    _assert_params_equal(state.params, origin[1])
    assert int(state.step) == 0
    ckpt = checkpoint.Checkpointer(directory, read_only=True)
    assert ckpt.params_only_steps() == [0]
    ckpt.close()
    assert not (directory / "5").exists()  # removed (never committed) or set aside
    assert all(not name.startswith("0-") for name in _set_aside(workdir))


def test_another_architecture_than_the_origin_is_one_line(origin, tmp_path):
    workdir = _copy(origin, tmp_path)
    cfg = small_config(mlp_dim=96)
    other = trainer_for(cfg, sharding.make_mesh(cfg.mesh))
    with pytest.raises(checkpoint.CheckpointError, match="a different architecture") as e:
        _start(other, workdir)
    assert "\n" not in str(e.value) and "(2, 128, 64) in the checkpoint" in str(e.value)
    assert _set_aside(workdir) == []  # refused, not damaged: nothing moved


def test_init_from_and_a_params_only_workdir_is_one_line(trainer, origin, tmp_path):
    workdir = _copy(origin, tmp_path)
    cfg = small_config()
    cfg.checkpoint.init_from = str(tmp_path / "another_run")
    with pytest.raises(ConfigError, match=r"init_from=.* is not allowed: --workdir=") as e:
        _start(trainer._replace(cfg=cfg), workdir)
    assert "\n" not in str(e.value) and "drop init_from, or use a new --workdir" in str(e.value)
