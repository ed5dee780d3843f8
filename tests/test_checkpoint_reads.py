"""Reads of a step without resuming: params only (init_from), the PATH[:STEP] spec."""

import jax
import numpy as np
import pytest
from helpers import mesh_trainer, save_steps

from near_jax.train import checkpoint, checkpoint_reads


def test_init_from_loads_params_only(tmp_path):
    trainer = mesh_trainer(data=8)
    saved = save_steps(tmp_path / "checkpoints", trainer, steps=(10,))
    step, params = checkpoint_reads.restore_params(f"{tmp_path}:10", trainer.abstract_state.params)
    assert step == 10
    jax.tree.map(np.testing.assert_array_equal, params, saved.params)
    with pytest.raises(checkpoint.CheckpointError, match="step 7 not found"):
        checkpoint_reads.restore_params(f"{tmp_path}:7", trainer.abstract_state.params)


def test_init_from_spec_splits_a_trailing_step_only():
    assert checkpoint_reads.parse_init_from("runs/a:10") == ("runs/a", 10)
    assert checkpoint_reads.parse_init_from("runs/a") == ("runs/a", None)
    # A URL's colon is part of the path; a step is digits after the last colon.
    assert checkpoint_reads.parse_init_from("gs://b/run:5") == ("gs://b/run", 5)
    assert checkpoint_reads.parse_init_from("gs://b/run") == ("gs://b/run", None)
    assert checkpoint_reads.parse_init_from("run:latest") == ("run:latest", None)
    assert checkpoint_reads.parse_init_from(":5") == (":5", None)  # no path: not a step
