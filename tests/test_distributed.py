"""Multi-host start-up (`near_jax.train.distributed`): who this process is, from flags or
the environment (explicit, SLURM, Cloud TPU), and initialize() for one process."""

import jax
import pytest

from near_jax.train import distributed


def test_single_process_needs_nothing():
    assert distributed.resolve({}) == distributed.Spec("single")
    assert not distributed.resolve({}).multi_process


def test_explicit_flags_or_environment():
    env = {
        "NEAR_JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234",
        "NEAR_JAX_NUM_PROCESSES": "4",
        "NEAR_JAX_PROCESS_ID": "3",
    }
    assert distributed.resolve(env) == distributed.Spec("explicit", "10.0.0.1:1234", 4, 3)
    spec = distributed.resolve({}, coordinator_address="h:1", num_processes=2, process_id=1)
    assert spec == distributed.Spec("explicit", "h:1", 2, 1)
    with pytest.raises(distributed.DistributedError, match="needs all of"):
        distributed.resolve({}, coordinator_address="h:1", num_processes=2)
    with pytest.raises(distributed.DistributedError, match="not HOST:PORT"):
        distributed.resolve({}, coordinator_address="h", num_processes=2, process_id=0)
    with pytest.raises(distributed.DistributedError, match="not in \\[0, num_processes=2\\)"):
        distributed.resolve({}, coordinator_address="h:1", num_processes=2, process_id=2)


def _slurm(**extra):
    env = {
        "SLURM_JOB_ID": "4242",
        "SLURM_STEP_NODELIST": "gpu[007-009,012],cpu1",
        "SLURM_NTASKS": "32",
        "SLURM_PROCID": "9",
        "SLURM_LOCALID": "1",
        "SLURM_STEP_TASKS_PER_NODE": "8(x4)",
    }
    return {**env, **extra}


def test_slurm_job_steps():
    spec = distributed.resolve(_slurm())
    port = distributed.SLURM_BASE_PORT + 4242 % 4096
    assert spec == distributed.Spec("slurm", f"gpu007:{port}", 32, 9, (1,))
    # One task per node drives all of the node's GPUs; the sbatch script's coordinator wins.
    one = _slurm(
        SLURM_NTASKS="4",
        SLURM_PROCID="2",
        SLURM_LOCALID="0",
        SLURM_STEP_TASKS_PER_NODE="1(x4)",
        NEAR_JAX_COORDINATOR_ADDRESS="gpu007:8476",
    )
    assert distributed.resolve(one) == distributed.Spec("slurm", "gpu007:8476", 4, 2, None)
    assert distributed.resolve(_slurm(SLURM_NTASKS="1", SLURM_PROCID="0")).source == "single"
    # The batch script itself (no srun step) is one process.
    batch_env = {k: v for k, v in _slurm().items() if k != "SLURM_STEP_NODELIST"}
    assert distributed.resolve(batch_env).source == "single"
    assert distributed.first_slurm_host("node5") == "node5"
    assert distributed.first_slurm_host("a[10-11],b") == "a10"


def test_cloud_tpu_is_detected_from_its_environment():
    assert distributed.resolve({"TPU_WORKER_HOSTNAMES": "w0,w1"}) == distributed.Spec("tpu")
    assert distributed.resolve({"MEGASCALE_COORDINATOR_ADDRESS": "w0"}).multi_process


def test_initialize_of_one_process_joins_nothing(monkeypatch):
    def refuse(**kwargs):
        raise AssertionError("jax.distributed.initialize called for one process")

    monkeypatch.setattr(jax.distributed, "initialize", refuse)
    assert distributed.initialize(env={}) == distributed.Spec("single")
    one = {"SLURM_JOB_ID": "1", "SLURM_STEP_NODELIST": "n1", "SLURM_NTASKS": "1"}
    assert distributed.initialize(env={**one, "SLURM_PROCID": "0"}).source == "single"
    with pytest.raises(distributed.DistributedError, match="needs all of"):
        distributed.initialize("h:1", num_processes=2, env={})
