"""The flash kernels' tiling (`near_jax.model.kernels.flash_blocks.Tiling`): each query block
visits exactly the key blocks holding a visible pair, and back. (The kernels themselves, on
both backends in interpret mode: test_flash_attention.py.)"""

import jax.numpy as jnp
import numpy as np
import pytest

from near_jax.model.kernels.flash_blocks import Tiling


def _brute_force_blocks(t: Tiling):
    """Which (query block, key block) pairs hold at least one visible (query, key) pair."""
    qi, ki = np.arange(t.len_q)[:, None], np.arange(t.len_kv)[None, :]
    vis = (ki < t.valid_kv) & (qi < t.valid_q)
    if t.causal:
        vis &= qi >= ki
    if t.window:
        vis &= np.abs(qi - ki) < t.window
    return vis.reshape(t.num_q, t.block_q, t.num_kv, t.block_kv).any(axis=(1, 3))


@pytest.mark.parametrize(
    "causal,window,blocks,length",
    [
        (True, 0, (128, 128), 1000),
        (True, 300, (256, 128), 1024),
        (False, 200, (128, 256), 777),
        (False, 0, (64, 64), 200),
        (True, 1, (128, 64), 512),
    ],
)
def test_tiling_visits_exactly_the_blocks_with_visible_pairs(causal, window, blocks, length):
    bq, bk = blocks
    padded = -(-length // max(bq, bk)) * max(bq, bk)
    t = Tiling(bq, bk, padded, padded, length, length, causal, window, segments=False)
    needed = _brute_force_blocks(t)
    for i in range(t.num_q):
        lo, hi = (int(x) for x in t.kv_range(i, np))
        visited = np.zeros(t.num_kv, bool)
        visited[lo : hi + 1] = True
        if needed[i].any():  # padding-only query rows may visit blocks nobody needs
            np.testing.assert_array_equal(visited, needed[i], err_msg=f"query block {i}")
        assert hi - lo + 1 <= t.kv_steps
    for j in range(t.num_kv):
        lo, hi = (int(x) for x in t.q_range(j, np))
        visited = np.zeros(t.num_q, bool)
        visited[lo : hi + 1] = True
        np.testing.assert_array_equal(visited, needed[:, j], err_msg=f"key block {j}")
        assert hi - lo + 1 <= t.q_steps
    # The kernels' jnp path agrees with the static numpy path.
    for i in range(t.num_q):
        assert [int(x) for x in t.kv_range(jnp.int32(i))] == [int(x) for x in t.kv_range(i, np)]
    if causal:  # masked blocks are skipped, not computed: about half the work at most
        assert t.visited_fraction() <= 0.5 + 1.5 / t.num_q
