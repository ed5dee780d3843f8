"""Checkpoint integrity: finite states, the sha256 manifest, quarantine, retention, multi-save."""

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from etils import epath

from near_jax.train import checkpoint, checkpoint_reads
from near_jax.train import checkpoint_integrity as integrity


class _Iterator:
    def get_state(self):
        return {"num_shards": 1, "shards": {"0": 0}}

    def set_state(self, state):
        pass


_CFG = ml_collections.ConfigDict({"model": {"d": 1}, "data": {"seq_len": 8}})


def _state(seed=0):
    rng = np.random.default_rng(seed)
    return {
        "w": jnp.asarray(rng.standard_normal((64, 32)), jnp.float32),
        "b": jnp.asarray(rng.standard_normal((32,)), jnp.bfloat16),
        "step": jnp.asarray(seed, jnp.int32),
    }


def _abstract(state):
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), state)


def _saved(directory, steps, keep=0):
    ckpt = checkpoint.Checkpointer(directory, keep=keep)
    for step in steps:
        ckpt.save(step, _state(step), _Iterator(), _CFG)
    ckpt.close()


def _largest_file(step_dir):
    files = [os.path.join(r, f) for r, _, fs in os.walk(step_dir) for f in fs]
    return max(files, key=os.path.getsize)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_is_finite_finds_any_non_finite_value(bad):
    state = _state()
    assert integrity.is_finite(state)
    for leaf in ("w", "b"):
        broken = dict(state)
        broken[leaf] = state[leaf].at[3].set(bad)
        assert not integrity.is_finite(broken), leaf
    assert integrity.is_finite({"ints": jnp.arange(4)})  # no floats: nothing to check


def test_a_non_finite_state_is_never_saved(tmp_path):
    ckpt = checkpoint.Checkpointer(tmp_path, keep=2)
    ckpt.save(5, _state(5), _Iterator(), _CFG)
    broken = _state(10)
    broken["w"] = broken["w"].at[0, 0].set(jnp.nan)
    with pytest.raises(checkpoint.NonFiniteStateError, match="step 10: .*NaN or Inf"):
        ckpt.save(10, broken, _Iterator(), _CFG)
    ckpt.close()
    assert checkpoint.Checkpointer(tmp_path).step_dirs() == [5]


def test_every_saved_step_has_a_manifest_that_verifies(tmp_path):
    _saved(tmp_path, (5, 10))
    for step in ("5", "10"):
        step_dir = epath.Path(tmp_path) / step
        files = json.loads((step_dir / integrity.MANIFEST_NAME).read_text())["files"]
        assert any(name.startswith("state/") for name in files)
        assert any(name.startswith("data/") for name in files)
        integrity.verify(step_dir)


@pytest.mark.parametrize(
    "damage, reason",
    [
        ("flip", "does not match its sha256"),
        ("truncate", "bytes, the manifest says"),
        ("delete", "is missing"),
        ("garbage manifest", "is unreadable"),
        ("no manifest", "never finished"),
    ],
)
def test_damage_is_detected_and_set_aside(tmp_path, damage, reason):
    directory = tmp_path / "checkpoints"
    _saved(directory, (5, 10))
    step_dir = directory / "10"
    path = _largest_file(step_dir / "state")
    if damage == "flip":  # same size, different bytes: only the hash can tell
        data = bytearray(open(path, "rb").read())
        for i in range(0, len(data), 7):
            data[i] ^= 0xFF
        open(path, "wb").write(bytes(data))
    elif damage == "truncate":
        os.truncate(path, os.path.getsize(path) // 2)
    elif damage == "delete":
        os.remove(path)
    elif damage == "garbage manifest":
        (step_dir / integrity.MANIFEST_NAME).write_text("[1, 2")
    else:
        (step_dir / integrity.MANIFEST_NAME).unlink()

    restored = checkpoint.Checkpointer(directory).restore(_abstract(_state()))
    assert restored.step == 5
    np.testing.assert_array_equal(restored.state["w"], _state(5)["w"])
    assert len(restored.skipped) == 1 and reason in restored.skipped[0], restored.skipped
    assert not step_dir.exists()  # moved aside, not deleted:
    (aside,) = (tmp_path / "checkpoints.damaged").iterdir()
    assert aside.name.startswith("10-") and os.path.exists(aside / "state")
    assert reason in (aside / integrity.REASON_NAME).read_text()


def test_a_set_aside_step_can_be_saved_again(tmp_path):
    """Resuming before a damaged step reaches it again: the save must not collide with it."""
    _saved(tmp_path, (5, 10))
    os.remove(_largest_file(tmp_path / "10" / "state"))
    ckpt = checkpoint.Checkpointer(tmp_path, keep=3)
    assert ckpt.restore(_abstract(_state())).step == 5
    ckpt.save(10, _state(11), _Iterator(), _CFG)
    ckpt.close()
    restored = checkpoint.Checkpointer(tmp_path).restore(_abstract(_state()))
    assert restored.step == 10 and not restored.skipped
    np.testing.assert_array_equal(restored.state["w"], _state(11)["w"])


@pytest.mark.parametrize("saved", [[1, 2], {}, {"model": {}, "data": "x"}])
def test_a_saved_config_that_is_not_a_run_config_counts_as_damage(tmp_path, saved):
    _saved(tmp_path, (5, 10))
    # Rewrite the config item and the manifest, as a bad writer would have: only the
    # content check can tell.
    (tmp_path / "10" / checkpoint.CONFIG / "metadata").write_text(json.dumps(saved))
    integrity.write(epath.Path(tmp_path) / "10")
    restored = checkpoint.Checkpointer(tmp_path).restore(_abstract(_state()))
    assert restored.step == 5 and "config" in restored.skipped[0], restored.skipped
    with pytest.raises(checkpoint.CheckpointError, match="step 10: unreadable config"):
        checkpoint_reads.read_config(tmp_path / "10-missing", 10)  # no such dir: one line too


def test_an_empty_newer_step_directory_is_set_aside(tmp_path):
    _saved(tmp_path, (5,))
    os.makedirs(tmp_path / "30")
    ckpt = checkpoint.Checkpointer(tmp_path)
    restored = ckpt.restore(_abstract(_state()))
    assert restored.step == 5 and "step 30: incomplete" in restored.skipped[0]
    ckpt.save(30, _state(30), _Iterator(), _CFG)  # the step number is free again
    ckpt.close()
    assert ckpt.good_steps() == [5, 30]


def test_read_only_restore_moves_nothing(tmp_path):
    _saved(tmp_path, (5, 10))
    os.remove(_largest_file(tmp_path / "10" / "state"))
    restored = checkpoint.Checkpointer(tmp_path, read_only=True).restore(_abstract(_state()))
    assert restored.step == 5 and (tmp_path / "10").exists()


def test_retention_waits_for_the_manifest(tmp_path, monkeypatch):
    """A save whose manifest cannot be written deletes nothing older."""
    ckpt = checkpoint.Checkpointer(tmp_path, keep=2)
    for step in (5, 10):
        ckpt.save(step, _state(step), _Iterator(), _CFG)
    ckpt.wait()

    def failing_write(step_dir):
        raise OSError(28, "No space left on device (injected)")

    monkeypatch.setattr(integrity, "write", failing_write)
    ckpt.save(15, _state(15), _Iterator(), _CFG)
    with pytest.raises(checkpoint.CheckpointError, match="step 15 could not be written"):
        ckpt.wait()
    ckpt.close()
    assert ckpt.good_steps() == [5, 10]


def test_explicit_damaged_step_is_an_error_and_stays(tmp_path):
    _saved(tmp_path, (5, 10))
    os.remove(_largest_file(tmp_path / "10" / "state"))
    with pytest.raises(checkpoint.CheckpointError, match="step 10: damaged"):
        checkpoint.Checkpointer(tmp_path).restore(_abstract(_state()), step=10)
    assert (tmp_path / "10").exists()


def test_restore_params_verifies_the_step(tmp_path):
    ckpt = checkpoint.Checkpointer(tmp_path / "checkpoints")
    ckpt.save(5, {"params": _state(5)}, _Iterator(), _CFG)
    ckpt.close()
    abstract = {"params": _abstract(_state())}
    step, params = checkpoint_reads.restore_params(str(tmp_path), abstract["params"])
    np.testing.assert_array_equal(params["w"], _state(5)["w"])
    path = _largest_file(tmp_path / "checkpoints" / "5" / "state")
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0x01
    open(path, "wb").write(bytes(data))
    with pytest.raises(checkpoint.CheckpointError, match="step 5 is damaged .*sha256"):
        checkpoint_reads.restore_params(f"{tmp_path}:5", abstract["params"], what="--workdir")


def test_a_run_without_manifests_restores_unverified(tmp_path):
    """Checkpoints from before manifests existed stay usable."""
    _saved(tmp_path, (5,))
    (tmp_path / "5" / integrity.MANIFEST_NAME).unlink()
    (tmp_path / integrity.MARKER_NAME).unlink()
    restored = checkpoint.Checkpointer(tmp_path).restore(_abstract(_state()))
    assert restored.step == 5 and not restored.skipped


def test_the_last_manifest_lost_is_still_damage(tmp_path):
    """Once a directory has manifests, a step without one is never read unverified."""
    _saved(tmp_path, (5,))
    (tmp_path / "5" / integrity.MANIFEST_NAME).unlink()
    with pytest.raises(checkpoint.CheckpointError, match="step 5: damaged .*never finished"):
        checkpoint.Checkpointer(tmp_path).restore(_abstract(_state()))


def test_only_unfinished_saves_let_a_run_start_afresh(tmp_path):
    """A kill before the first manifest: nothing was lost, so train may start from scratch;
    a finished step damaged later is an error instead."""
    _saved(tmp_path / "a", (5,))
    (tmp_path / "a" / "5" / integrity.MANIFEST_NAME).unlink()
    with pytest.raises(checkpoint.NoFinishedCheckpoint, match="never finished"):
        checkpoint.Checkpointer(tmp_path / "a").restore(_abstract(_state()))
    _saved(tmp_path / "b", (5,))
    os.remove(_largest_file(tmp_path / "b" / "5" / "state"))
    with pytest.raises(checkpoint.CheckpointError, match="is missing") as e:
        checkpoint.Checkpointer(tmp_path / "b").restore(_abstract(_state()))
    assert not isinstance(e.value, checkpoint.NoFinishedCheckpoint)
