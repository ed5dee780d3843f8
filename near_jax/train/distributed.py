"""Multi-host start-up: `jax.distributed.initialize` from flags or the environment.

One call, `initialize()`, before JAX touches a device. It works out who this process is from,
in order:

  explicit  `coordinator_address` + `num_processes` + `process_id` arguments (the train
            flags --coordinator_address/--num_processes/--process_id), or the environment
            variables NEAR_JAX_COORDINATOR_ADDRESS / NEAR_JAX_NUM_PROCESSES /
            NEAR_JAX_PROCESS_ID (what `launch/local.py` and `launch/slurm.py` set);
  slurm     an `srun` job step (SLURM_STEP_NODELIST, SLURM_NTASKS, SLURM_PROCID, ...): the
            coordinator is NEAR_JAX_COORDINATOR_ADDRESS if set, else the first host of the
            step's node list; one task per node sees all of its GPUs, several tasks per node
            see one GPU each (SLURM_LOCALID);
  tpu       a Cloud TPU VM (libtpu installed and TPU chips, or the TPU_WORKER_* / MEGASCALE_*
            variables of GKE and multi-slice): JAX's own detection asks the TPU metadata
            server for the workers, so `jax.distributed.initialize()` gets no arguments;
  single    none of these, or one process: nothing to do.

`resolve(env)` is the pure part (no JAX, testable); `initialize()` acts on it. On CPU (the
local multi-process launcher and the tests) cross-process collectives use gloo.
"""

from __future__ import annotations

import dataclasses
import glob
import importlib.util
import os
import re
from collections.abc import Mapping, Sequence

ENV_COORDINATOR = "NEAR_JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "NEAR_JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "NEAR_JAX_PROCESS_ID"
# SLURM jobs without an exported coordinator use this port on the first node, offset by the
# job id so two jobs sharing a node do not collide.
SLURM_BASE_PORT = 61440
# Set inside an `srun` job step (not in the batch script itself, which is one process).
_SLURM_VARS = (
    "SLURM_JOB_ID",
    "SLURM_STEP_NODELIST",
    "SLURM_NTASKS",
    "SLURM_PROCID",
    "SLURM_LOCALID",
)
_TPU_VARS = ("TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES", "MEGASCALE_COORDINATOR_ADDRESS")


class DistributedError(ValueError):
    """A multi-host setting that cannot work; the message is one line."""


@dataclasses.dataclass(frozen=True)
class Spec:
    """Who this process is. `source` is explicit | slurm | tpu | single."""

    source: str
    coordinator_address: str = ""
    num_processes: int = 1
    process_id: int = 0
    local_device_ids: tuple[int, ...] | None = None  # None: all local devices

    @property
    def multi_process(self) -> bool:
        return self.source == "tpu" or self.num_processes > 1


def _int(value: str | int, name: str) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise DistributedError(f"{name}={value!r} is not an integer") from None


def first_slurm_host(nodelist: str) -> str:
    """The first host of a SLURM node list: 'gpu[003-005,9],cpu1' -> 'gpu003'."""
    match = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not match:
        raise DistributedError(f"cannot read a host from the SLURM node list {nodelist!r}")
    prefix, ranges = match.groups()
    if not ranges:
        return prefix
    return prefix + re.split(r"[,-]", ranges, maxsplit=1)[0]


def on_cloud_tpu(env: Mapping[str, str]) -> bool:
    """True on a Cloud TPU VM or GKE TPU node (no network access needed to decide)."""
    if any(env.get(k) for k in _TPU_VARS):
        return True
    if importlib.util.find_spec("libtpu") is None:
        return False
    return bool(glob.glob("/dev/accel[0-9]*") or glob.glob("/dev/vfio/[0-9]*"))


def resolve(
    env: Mapping[str, str] | None = None,
    *,
    coordinator_address: str = "",
    num_processes: int = 0,
    process_id: int = -1,
) -> Spec:
    """Decides the Spec from explicit arguments, then `env` (default os.environ)."""
    env = os.environ if env is None else env
    address = coordinator_address or env.get(ENV_COORDINATOR, "")
    count = num_processes or _int(env.get(ENV_NUM_PROCESSES, 0), ENV_NUM_PROCESSES)
    pid = process_id if process_id >= 0 else _int(env.get(ENV_PROCESS_ID, -1), ENV_PROCESS_ID)
    in_slurm = all(k in env for k in _SLURM_VARS)
    if in_slurm and (count == 0 or pid < 0):
        count = count or _int(env["SLURM_NTASKS"], "SLURM_NTASKS")
        pid = pid if pid >= 0 else _int(env["SLURM_PROCID"], "SLURM_PROCID")
        if count <= 1:
            return Spec("single")
        if not address:
            nodelist = env["SLURM_STEP_NODELIST"]
            port = SLURM_BASE_PORT + _int(env["SLURM_JOB_ID"], "SLURM_JOB_ID") % 4096
            address = f"{first_slurm_host(nodelist)}:{port}"
        per_node = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_NTASKS_PER_NODE", "1")
        one_per_node = _int(per_node.split("(")[0], "SLURM_NTASKS_PER_NODE") <= 1
        local = None if one_per_node else (_int(env["SLURM_LOCALID"], "SLURM_LOCALID"),)
        return _checked(Spec("slurm", address, count, pid, local))
    if address or count > 1:
        if not address or count <= 0 or pid < 0:
            raise DistributedError(
                "explicit multi-process start needs all of coordinator_address, "
                f"num_processes and process_id (got {address!r}, {count}, {pid})"
            )
        return _checked(Spec("explicit", address, count, pid))
    if on_cloud_tpu(env):
        return Spec("tpu")
    return Spec("single")


def _checked(spec: Spec) -> Spec:
    if not re.fullmatch(r"[^\s:]+:\d+", spec.coordinator_address):
        raise DistributedError(f"coordinator_address={spec.coordinator_address!r} is not HOST:PORT")
    if spec.num_processes < 1 or not 0 <= spec.process_id < spec.num_processes:
        raise DistributedError(
            f"process_id={spec.process_id} is not in [0, num_processes={spec.num_processes})"
        )
    return spec


def initialize(
    coordinator_address: str = "",
    num_processes: int = 0,
    process_id: int = -1,
    *,
    env: Mapping[str, str] | None = None,
) -> Spec:
    """Joins the job's other processes (a no-op for one process, or when already joined).

    Must run before the first JAX computation. Returns the Spec that was acted on.
    """
    import jax

    spec = resolve(
        env,
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
    )
    if not spec.multi_process or jax.distributed.is_initialized():
        return spec
    if spec.source == "tpu":
        jax.distributed.initialize()
        return spec
    if (jax.config.jax_platforms or os.environ.get("JAX_PLATFORMS", "")).startswith("cpu"):
        # Cross-process collectives on CPU (gloo is JAX 0.10's default; say so explicitly).
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=spec.coordinator_address,
        num_processes=spec.num_processes,
        process_id=spec.process_id,
        local_device_ids=_device_ids(spec.local_device_ids),
        # Everything is resolved here; stop JAX from re-detecting (it would pin one GPU per
        # SLURM task even with one task per node).
        cluster_detection_method="deactivate",
    )
    return spec


def _device_ids(ids: Sequence[int] | None) -> list[int] | None:
    return None if ids is None else list(ids)


def define_flags() -> None:
    """Defines --coordinator_address, --num_processes and --process_id (absl); the program
    passes their values to `initialize`."""
    from absl import flags

    flags.DEFINE_string(
        "coordinator_address", "", f"HOST:PORT of process 0 (or ${ENV_COORDINATOR})."
    )
    flags.DEFINE_integer(
        "num_processes",
        0,
        f"Processes in the job; 0 = from the environment (${ENV_NUM_PROCESSES}).",
    )
    flags.DEFINE_integer(
        "process_id", -1, f"This process's index; -1 = from the environment (${ENV_PROCESS_ID})."
    )
