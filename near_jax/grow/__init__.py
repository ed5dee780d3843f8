"""Growing a rung of the ladder from the one below: `python -m near_jax.grow`.

maps        where each unit of the grown model comes from (index maps), refusals
transform   grow_params: source params -> grown params (pure jnp; jit with target shardings)
run         grow_run: a source run's checkpoint -> a new run directory that `train` continues
"""

from near_jax.grow.maps import DEPTHS, PRESERVES_FUNCTION, WIDTHS, GrowError
from near_jax.grow.transform import grow_params

__all__ = ["DEPTHS", "PRESERVES_FUNCTION", "WIDTHS", "GrowError", "grow_params"]
