"""The training loop (`near_jax.train.loop`) in-process: the trainer a config asks for, the
saved config, and the resume check. (The command line: test_train.py.)"""

import json

import pytest
from helpers import small_config

from near_jax import sharding
from near_jax.config import ConfigError
from near_jax.train import inmesh, loop
from near_jax.train.loop import check_resume_config, save_config, trainer_for


def test_save_config_writes_the_config_a_resume_accepts(tmp_path):
    cfg = small_config()
    save_config(cfg, str(tmp_path))
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved == json.loads(json.dumps(cfg.to_dict()))
    check_resume_config(saved, cfg)  # the same config resumes
    cfg.train.steps += 1  # train and optimizer settings may change on resume
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
