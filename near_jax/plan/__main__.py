"""`python -m near_jax.plan`: what a config needs on given hardware; the ladder table."""

from __future__ import annotations

import math
import os
import sys
from typing import Any

import jax
import ml_collections

from near_jax import cli, sharding
from near_jax import hardware as hardware_lib
from near_jax.config import ConfigError
from near_jax.plan.planner import Plan, load_ladder, make_plan
from near_jax.plan.tables import _gib, format_plan, format_targets

_WORKER_ENV = "NEAR_JAX_PLAN_COMPILE_WORKER"


def _define_flags() -> None:
    from absl import flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file(
        "config", None, "Config file, e.g. configs/ladder.py:m7b (or :m7b,gpu)."
    )
    flags.DEFINE_string(
        "hardware", "", "Accelerator (near_jax.hardware); default: that of the rung's job."
    )
    flags.DEFINE_integer("devices", 0, "Devices; default: the mesh's product (needed for -1).")
    flags.DEFINE_float("mfu", 0.4, "MFU assumed for device-days of the token budget.")
    flags.DEFINE_bool("json", False, "Print JSON instead of a table.")
    flags.DEFINE_bool("ladder", False, "Summarize every rung of configs/ladder.py, TPU and GPU.")
    flags.DEFINE_bool(
        "compile",
        False,
        "Also compile the train step on simulated CPU devices (AOT) and "
        "compare XLA's per-device memory with the plan's.",
    )


def _usage_error(message: str) -> None:
    print(f"near_jax.plan: error: {message}", file=sys.stderr)
    sys.exit(2)


def _loaded(value: Any) -> ml_collections.ConfigDict:
    """The --config value, or a one-line usage error if the file failed to load."""
    try:
        value.keys()  # a config file that failed to load raises here
    except Exception as e:  # noqa: BLE001 - any load failure is a usage error
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        _usage_error(f"--config could not be loaded: {lines[-1] if lines else e}")
    if not isinstance(value, ml_collections.ConfigDict):
        _usage_error("--config must return an ml_collections.ConfigDict")
    return value


def target(cfg, flag_hardware: str, flag_devices: int) -> tuple[hardware_lib.Accelerator, int]:
    """The accelerator (flag, else that of the ladder job `cfg.name` names: "m7b" its TPU
    job, "m7b,gpu" its GPU job) and the device count (flag, else the mesh's product: a
    config's mesh is the source of truth)."""
    name = flag_hardware
    found = load_ladder().lookup(cfg.name) if cfg.name and not name else None
    if found:
        rung, job = found
        name = rung.target(job).hardware
    if not name:
        raise ConfigError(f"--hardware is required for config {cfg.name or '(unnamed)'!r}")
    acc = hardware_lib.get(name)
    devices = flag_devices
    if not devices:
        sizes = [cfg.mesh[a] for a in sharding.MESH_AXES]
        if -1 in sizes:
            raise ConfigError("--devices is required when a mesh axis is -1")
        devices = math.prod(sizes) * cfg.mesh.dcn_data
    return acc, devices


def ladder_plans(hardware: str = "", mfu: float = 0.4) -> list[tuple[str, Plan]]:
    """(target, plan) of every rung's TPU job, then of every rung's GPU job; `hardware`
    replaces each job's accelerator (same meshes) when set."""
    ladder = load_ladder()
    plans = []
    for tgt in ladder.TARGETS:
        for name, rung in ladder.RUNGS.items():
            acc = hardware_lib.get(hardware or rung.target(tgt).hardware)
            cfg = ladder.get_config(f"{name},{tgt}")
            plans.append((tgt, make_plan(cfg, acc, ladder.devices(rung, tgt), mfu)))
    return plans


def _compile_child(argv: list[str], devices: int) -> int:
    """Re-runs this command in a fresh process that simulates `devices` CPU devices."""
    import subprocess

    env = dict(os.environ, JAX_PLATFORMS="cpu", **{_WORKER_ENV: "1"})
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    return subprocess.call([sys.executable, "-m", "near_jax.plan", *argv[1:]], env=env)


def one_slice(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The job of one slice of a multi-slice config: the same per-device shapes.

    Slices only replicate the model (data parallelism over `dcn_data`), so one slice with
    1/dcn_data of the global batch holds exactly the shards and rows of each device of the
    full job. XLA's CPU backend simulates at most 2048 devices in one process, and has no
    slices, so `--compile` compiles this.
    """
    cfg = cfg.copy_and_resolve_references()
    dcn = cfg.mesh.dcn_data
    if dcn > 1:
        cfg.train.global_batch_size //= dcn
        cfg.mesh.dcn_data = 1
    return cfg


def _compile_report(cfg, acc, devices: int, as_json: bool) -> None:
    """In the child: compile one slice on simulated CPU devices and print it with the plan."""
    import json

    # Lazy: compiling pulls in the train loop and grain/orbax, which planning never needs.
    from near_jax.plan.compiled import compiled_memory

    dcn = cfg.mesh.dcn_data
    per_slice = devices // dcn
    cpu = jax.devices()
    if len(cpu) < per_slice:
        raise ConfigError(f"only {len(cpu)} CPU devices are simulated, {per_slice} needed")
    xla = compiled_memory(one_slice(cfg), cpu[:per_slice])
    planned = make_plan(cfg, acc, devices, attention="xla").memory["total"]
    result = {
        "devices": devices,
        "compiled_devices": per_slice,
        "xla": xla,
        "plan_xla_attention": planned,
        "ratio": planned / xla["total"],
    }
    if as_json:
        print(json.dumps(result))
        return
    note = f" (one of {dcn} slices: same per-device shapes)" if dcn > 1 else ""
    print(f"compiled {cfg.name} for {per_slice} simulated devices{note} in {xla['compile_s']:.1f}s")
    print(
        f"XLA per-device memory: {_gib(xla['total'])} (arguments {_gib(xla['arguments'])}, "
        f"temporaries {_gib(xla['temporaries'])}, outputs {_gib(xla['outputs'])}, "
        f"aliased {_gib(xla['aliased'])})"
    )
    print(
        f"planner (XLA attention, as compiled on CPU): {_gib(planned)} "
        f"= {planned / xla['total']:.2f} x XLA"
    )
    if cfg.model.dtype != "float32":
        print(
            f"note: XLA's CPU backend keeps {cfg.model.dtype} activations in float32 (no "
            f"{cfg.model.dtype} arithmetic on CPU); compare like with like by adding "
            "--config.model.dtype=float32"
        )


def _main(argv: list[str]) -> None:
    import json

    from absl import flags

    f = flags.FLAGS
    if len(argv) > 1:
        _usage_error(f"unexpected arguments: {' '.join(argv[1:])}")
    try:
        if f.ladder:
            plans = ladder_plans(f.hardware, f.mfu)
            if f.json:
                print(json.dumps([{"target": t, **p.to_json()} for t, p in plans]))
            else:
                print(format_targets(plans))
            return
        if f.config is None:
            _usage_error("--config is required (or --ladder), e.g. --config=configs/ladder.py:m7b")
        cfg = _loaded(f.config)
        acc, devices = target(cfg, f.hardware, f.devices)
        if f.compile:
            if not os.environ.get(_WORKER_ENV):
                per_slice = devices // cfg.mesh.dcn_data
                raise SystemExit(_compile_child(list(sys.argv), per_slice))
            _compile_report(cfg, acc, devices, f.json)
            return
        p = make_plan(cfg, acc, devices, f.mfu)
        print(json.dumps(p.to_json()) if f.json else format_plan(p))
    except (ConfigError, ValueError) as e:
        _usage_error(str(e).splitlines()[0])


def main() -> None:
    """Console entry point."""
    import logging

    from absl import app

    logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)
    _define_flags()
    app.run(_main, flags_parser=cli.parse_flags)


if __name__ == "__main__":
    main()
