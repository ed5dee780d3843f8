"""An island of DiLoCo: trains on its own devices and meets the others only in the store.

    python -m near_jax.diloco.island --store=gs://bucket/runs --run=demo --island=eu-1 \\
        --config=configs/tiny.py [--config.KEY=V ...] [--rounds=N] [--workdir=DIR]

loop       `train_island`: join the run, then each round train, push Δ, follow (plain
           arguments; contributor runs: a signer and a slot check passed in)
hosts      a multi-host island: which shards each host holds, pulls and pushes, and what
           host 0 decides for all (`Hosts`)
follow     waiting for versions, tolerant reads, catching up by updates or a full pull
__main__   the program: flags and their checks, the island's name claim, contrib's signer,
           exit codes

Exit codes: 0 after `--rounds` rounds or at the run's end, 1 when the store cannot go on
or the inner loss diverged, 2 for a usage error (one line each). What the program does is
`__main__`'s docstring (its --help).
"""

from near_jax.diloco.island.follow import newer
from near_jax.diloco.island.loop import island_seed, train_island

__all__ = ["island_seed", "newer", "train_island"]
