"""The aggregator of DiLoCo across islands: closes rounds and publishes global versions.

    python -m near_jax.diloco.aggregator --store=gs://bucket/runs --run=demo \\
        --config=configs/tiny.py --rounds=100 --quorum=3 --round_timeout=600 [--workdir=DIR]

core       `Aggregator`: creates a run, closes its rounds (collect, check, decide, commit,
           publish); contributor runs fill its hooks (`near_jax.contrib.validator`)
workers    `--shards=i/K`: the coordinator's proposals and the `ShardWorker`s that derive
           their slice of each round's shards (bounded memory, split over machines)
loop       the run: version 0 from the config (`create_run`), rounds until `--rounds`,
           eval on fixed batches (`fixed_eval`), metrics and log lines
__main__   the program: flags and their checks, which Aggregator (contrib's validator for
           a contributor run), exit codes

Exit codes: 0 when the run is finished, 1 when the store cannot go on, 2 for a usage
error (one line each). What the program does is `__main__`'s docstring (its --help).
"""

from near_jax.diloco.aggregator.core import Aggregator
from near_jax.diloco.aggregator.loop import (
    aggregate,
    contrib_stats,
    create_run,
    fixed_eval,
    outer_settings,
)
from near_jax.diloco.aggregator.workers import ShardWorker, parse_shards
from near_jax.diloco.startup import manifest_fields, manifest_problem

__all__ = [
    "Aggregator",
    "ShardWorker",
    "aggregate",
    "contrib_stats",
    "create_run",
    "fixed_eval",
    "manifest_fields",
    "manifest_problem",
    "outer_settings",
    "parse_shards",
]
