"""`python -m near_jax.train --config=configs/tiny.py --workdir=/tmp/run`: flags and main."""

from __future__ import annotations

import json
import os
import sys

from absl import flags
from ml_collections import config_flags

from near_jax import cli
from near_jax import workdir as workdir_lib
from near_jax._io import one_line
from near_jax.cli import load_config_flag, quiet_library_logs, usage_error
from near_jax.config import ConfigError
from near_jax.train import checkpoint, distributed
from near_jax.train.loop import train
from near_jax.train.step import DivergedError


def define_flags() -> None:
    """Defines --config and --workdir (at launch, so importing this module defines none)."""
    config_flags.DEFINE_config_file(
        "config", None, "Config file (configs/*.py[:arg]); override fields with --config.KEY=V."
    )
    flags.DEFINE_string(
        "workdir", None, "Run directory: checkpoints, metrics, TensorBoard events, config."
    )
    distributed.define_flags()  # --coordinator_address, --num_processes, --process_id


def _main(argv: list[str]) -> None:
    quiet_library_logs()
    try:
        f = flags.FLAGS  # before anything touches a device
        distributed.initialize(f.coordinator_address, f.num_processes, f.process_id)
    except distributed.DistributedError as e:
        usage_error(str(e))
    if len(argv) > 1:
        usage_error(f"unexpected arguments: {' '.join(argv[1:])}")
    cfg = load_config_flag(flags.FLAGS.config)
    if not flags.FLAGS.workdir:
        usage_error("--workdir is required: the run directory for metrics and config")
    try:
        # Orbax writes only to absolute paths: a relative --workdir would fail at the first save.
        result = train(cfg, os.path.abspath(flags.FLAGS.workdir))
    except (ConfigError, workdir_lib.WorkdirError) as e:
        usage_error(str(e))
    except checkpoint.CheckpointError as e:
        _fail(f"checkpoint error: {e}")
    except DivergedError as e:
        _fail(f"diverged: {e}")
    except OSError as e:  # a full disk, a filesystem gone read-only mid-run
        _fail(f"cannot write the run: {one_line(e)} (committed checkpoints stay readable)")
    if "stopped_at" in result:
        print(
            f"stopped at step {result['stopped_at']} (train.stop_at): checkpoint saved in "
            f"{flags.FLAGS.workdir}; run again without it to continue"
        )
        return
    if "preempted_at" in result:
        print(
            f"stopped by signal: checkpoint saved at step {result['preempted_at']} "
            f"in {flags.FLAGS.workdir}; run the same command to resume"
        )
        return
    if result.get("start_step", 0) >= cfg.train.steps:
        print(
            f"nothing to do: {flags.FLAGS.workdir} is already trained to step "
            f"{result['start_step']} (raise --config.train.steps to continue)"
        )
        return
    summary = {k: round(v, 4) for k, v in result.items() if k in ("train_loss", "eval_loss")}
    print(f"done: {json.dumps(summary)} | workdir {flags.FLAGS.workdir}")


def _fail(message: str) -> None:
    print(f"near_jax.train: {message}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    # Exit now: after a failed save, Orbax's abandoned I/O threads may still print their own
    # tracebacks at interpreter shutdown, burying this line. Every file near_jax wrote is
    # closed by now, and the kernel drops the workdir lock.
    os._exit(1)


def main() -> None:
    """Console entry point."""
    cli.run(_main, define_flags)


if __name__ == "__main__":
    main()
