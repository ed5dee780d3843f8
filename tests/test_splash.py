"""The splash-attention wrapper (`near_jax.model.kernels.splash`) in interpret mode: it matches
the float64 reference, and refuses lengths that are not multiples of 128. (The dispatcher,
which refuses splash off-TPU: test_attention.py.)"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import attention_qkv
from test_flash_attention import reference

from near_jax.model.kernels import splash


def test_splash_wrapper_matches_reference_in_interpret_mode():
    # The dispatcher refuses splash off-TPU; the wrapper itself runs in interpret mode.
    q, k, v, seg = attention_qkv(length=256, heads=4, kv_heads=2, batch=1, seed=5)
    do = jnp.asarray(np.random.default_rng(6).standard_normal(q.shape), jnp.float32)

    def f(q, k, v):
        return splash.splash_attention(
            q,
            k,
            v,
            seg,
            causal=True,
            scale=0.125,
            window=70,
            block_q=128,
            block_kv=128,
            interpret=True,
        )

    out, vjp = jax.vjp(f, q, k, v)
    got = (out, *vjp(do))
    want = reference(q, k, v, seg, do, True, 70, 0.125)
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5 * np.abs(w).max(), err_msg=name)
    with pytest.raises(ValueError, match="multiple of 128"):
        splash.splash_attention(q[:, :200], k[:, :200], v[:, :200], None, causal=True, scale=1.0)
