"""`python -m near_jax.eval`: evaluate a run's checkpoints once or as they appear."""

from __future__ import annotations

import os
import sys

from absl import flags

from near_jax import cli
from near_jax.cli import quiet_library_logs, usage_error
from near_jax.config import ConfigError
from near_jax.eval import taskfile
from near_jax.eval.checkpoints import Evaluator, run_once, watch
from near_jax.infer import loading


def define_flags() -> None:
    """The flags of `python -m near_jax.eval` (defined at launch)."""
    flags.DEFINE_string("workdir", None, "Run directory whose checkpoints to evaluate.")
    flags.DEFINE_integer("step", None, "Evaluate this step (default: the latest).")
    flags.DEFINE_bool("all", False, "Evaluate every committed step, oldest first.")
    flags.DEFINE_bool("watch", False, "Evaluate each new checkpoint as it lands.")
    flags.DEFINE_string(
        "data",
        "",
        "Held-out documents: a source like data.source (all its documents); "
        "default the run's validation split.",
    )
    flags.DEFINE_integer("max_tokens", 131072, "Held-out target tokens (whole documents).")
    flags.DEFINE_list("tasks", [], "Multiple-choice tasks: shipped names or JSONL paths.")
    flags.DEFINE_integer("num_fewshot", 0, "Few-shot examples per task prompt.")
    flags.DEFINE_integer("batch_size", 16, "Rows per evaluation batch.")
    loading.define_mesh_flags()
    flags.DEFINE_float("poll_seconds", 30.0, "--watch: seconds between looks for new steps.")
    flags.DEFINE_float("idle_timeout", 3600.0, "--watch: stop after this long without a step.")


def _check_flags(f) -> None:
    if not f.workdir:
        usage_error("--workdir is required: the run directory to evaluate")
    chosen = [
        f"--{n}"
        for n, on in (("step", f.step is not None), ("all", f.all), ("watch", f.watch))
        if on
    ]
    if len(chosen) > 1:
        usage_error(f"choose one of --step, --all, --watch (got {' and '.join(chosen)})")
    for name in ("max_tokens", "batch_size"):
        if f[name].value < 1:
            usage_error(f"--{name}={f[name].value} is not allowed: must be >= 1")
    if f.num_fewshot < 0:
        usage_error(f"--num_fewshot={f.num_fewshot} is not allowed: must be >= 0")
    if f.poll_seconds <= 0:
        usage_error(f"--poll_seconds={f.poll_seconds} is not allowed: must be > 0")
    if f.idle_timeout < 0:
        usage_error(f"--idle_timeout={f.idle_timeout} is not allowed: must be >= 0")


def _main(argv: list[str]) -> None:
    quiet_library_logs()
    if len(argv) > 1:
        usage_error(f"unexpected arguments: {' '.join(argv[1:])}")
    f = flags.FLAGS
    _check_flags(f)
    try:
        evaluator = Evaluator(
            f.workdir,
            data=f.data,
            max_tokens=f.max_tokens,
            task_names=tuple(f.tasks),
            num_fewshot=f.num_fewshot,
            batch_size=f.batch_size,
            fsdp=f.fsdp,
            tensor=f.tensor,
        )
        if f.watch:
            if not os.path.isdir(f.workdir):
                usage_error(f"--workdir={f.workdir!r}: no such directory")
            records = watch(evaluator, poll_seconds=f.poll_seconds, idle_timeout=f.idle_timeout)
        else:
            steps = loading.committed_steps(f.workdir) if f.all else [f.step]
            records = run_once(evaluator, steps, skip_unreadable=f.all)
    except loading.CheckpointUnreadable as e:  # damaged data, not a usage mistake
        _fail(" ".join(str(e).split()))
    except (loading.RunError, taskfile.TaskError, ConfigError) as e:
        usage_error(" ".join(str(e).split()))
    if evaluator.skipped:
        skipped = ", ".join(map(str, evaluator.skipped))
        _fail(
            f"evaluated {len(records)} steps; skipped {len(evaluator.skipped)} that could not "
            f"be read (steps {skipped}; see the warnings above)"
        )


def _fail(message: str) -> None:
    """Prints one line for a failure (not a usage mistake) and exits with status 1."""
    print(f"near_jax.eval: error: {message}", file=sys.stderr)
    sys.exit(1)


def main() -> None:
    """Console entry point."""
    cli.run(_main, define_flags)


if __name__ == "__main__":
    main()
