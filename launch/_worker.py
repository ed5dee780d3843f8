"""One training process of a multi-process run: join the job, then run `near_jax.train`.

`launch/local.py` (and the SLURM script) start `python -m launch._worker <train flags>` with
the NEAR_JAX_* variables set; `near_jax.train.distributed.initialize()` reads them. Once
`near_jax.train` initializes itself (its `--coordinator_address/...` flags), this module is a
thin alias kept so launch commands stay the same.
"""

from near_jax.train import distributed


def main() -> None:
    distributed.initialize()
    from near_jax.train.__main__ import main as train_main

    train_main()


if __name__ == "__main__":
    main()
