"""`python -m near_jax.grow`: a new run whose params are grown from another run's checkpoint.

    python -m near_jax.grow --from=runs/m500m[:STEP] --config=configs/ladder.py:m2b \\
        --workdir=runs/m2b [--width=clone|zero] [--depth=stack|identity] [--noise=0.01]
    python -m near_jax.train --config=configs/ladder.py:m2b --workdir=runs/m2b   # continues it

Width (d_model, heads, MLP units): `clone` copies units and rescales so the grown model
computes the source's function (RMSNorm statistics included), with zero-sum noise that
lets the copies drift apart in training; `zero` keeps the source's units and starts the
new ones at zero output (preserves the function up to RMSNorm's epsilon). Depth: `stack`
repeats the source's blocks (G_stack; does not preserve the function), `identity` adds
blocks whose output projections are zero (preserves it).
"""

from __future__ import annotations

import sys

from absl import flags
from ml_collections import config_flags

from near_jax import cli
from near_jax import workdir as workdir_lib
from near_jax._io import one_line
from near_jax.cli import load_config_flag, quiet_library_logs, usage_error
from near_jax.config import ConfigError
from near_jax.grow import maps
from near_jax.grow.run import grow_run
from near_jax.infer import loading
from near_jax.train import checkpoint, distributed


def define_flags() -> None:
    """Defines the flags (at launch, so importing this module defines none)."""
    flags.DEFINE_string("from", None, "The run to grow from: PATH[:STEP] (default: its latest).")
    config_flags.DEFINE_config_file(
        "config", None, "The grown model's config (configs/*.py[:arg]), as train will take it."
    )
    flags.DEFINE_string("workdir", None, "The new run directory to write (absent or empty).")
    flags.DEFINE_string("width", "clone", f"Width growth: {' | '.join(maps.WIDTHS)}.")
    flags.DEFINE_string("depth", "stack", f"Depth growth: {' | '.join(maps.DEPTHS)}.")
    flags.DEFINE_float(
        "noise", 0.01, "clone: symmetry-breaking noise, relative to each matrix's RMS (>= 0)."
    )
    flags.DEFINE_integer("seed", 0, "Seed of the noise and of any fresh weights.")
    distributed.define_flags()


def _main(argv: list[str]) -> None:
    quiet_library_logs()
    f = flags.FLAGS
    try:
        distributed.initialize(f.coordinator_address, f.num_processes, f.process_id)
    except distributed.DistributedError as e:
        usage_error(str(e))
    if len(argv) > 1:
        usage_error(f"unexpected arguments: {' '.join(argv[1:])}")
    if not f["from"].value:
        usage_error("--from is required: the run to grow from, PATH[:STEP]")
    if not f.workdir:
        usage_error("--workdir is required: the new run directory to write")
    if f.noise < 0:
        usage_error(f"--noise={f.noise} is not allowed: a relative scale >= 0")
    cfg = load_config_flag(f.config)
    try:
        grown = grow_run(
            f["from"].value,
            cfg,
            f.workdir,
            width=f.width,
            depth=f.depth,
            noise=f.noise,
            seed=f.seed,
        )
    except (maps.GrowError, ConfigError, loading.RunError, workdir_lib.WorkdirError) as e:
        if isinstance(e, loading.CheckpointUnreadable):
            _fail(str(e))
        usage_error(str(e).splitlines()[0])
    except (OSError, checkpoint.CheckpointError) as e:
        _fail(one_line(e))
    preserves = grown.record["preserves_function"]
    print(
        f"grew {grown.source} step {grown.source_step} ({grown.params_source:,} params) into "
        f"{grown.workdir} ({grown.params_grown:,} params) in {grown.seconds:.1f}s\n"
        f"  width={f.width}: function preserved: {preserves[f.width]}\n"
        f"  depth={f.depth}: function preserved: {preserves[f.depth]}\n"
        f"train it: python -m near_jax.train {' '.join(_config_args())} --workdir={f.workdir}"
    )


def _config_args() -> list[str]:
    """This command's --config flags (the file and every override: the grown shape)."""
    args, keep = [], False
    for arg in sys.argv[1:]:
        if keep:  # the value of a "--config.X VALUE" pair
            args.append(arg)
            keep = False
        elif arg.startswith("--config"):
            args.append(arg)
            keep = "=" not in arg
    return args


def _fail(message: str) -> None:
    print(f"near_jax.grow: failed: {message}", file=sys.stderr)
    sys.exit(1)


def main() -> None:
    """Console entry point."""
    cli.run(_main, define_flags)


if __name__ == "__main__":
    main()
