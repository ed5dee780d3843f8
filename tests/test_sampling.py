"""Sampling: greedy, top-k and top-p masks, temperature draws against the softmax."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from near_jax.infer.sampling import Sampling, mask_top_k, mask_top_p, sample


def _logits(seed=0, b=4, v=50):
    return jax.random.normal(jax.random.key(seed), (b, v)) * 3.0


def test_greedy_is_argmax():
    logits = _logits()
    got = sample(logits, jax.random.key(1), Sampling(temperature=0.0))
    np.testing.assert_array_equal(got, np.argmax(logits, -1))


@pytest.mark.parametrize("k", [1, 5, 49])
def test_top_k_keeps_the_k_largest(k):
    logits = np.asarray(_logits())
    kept = np.isfinite(np.asarray(mask_top_k(jnp.asarray(logits), k)))
    for row, keep in zip(logits, kept, strict=True):
        assert keep.sum() == k
        assert set(np.flatnonzero(keep)) == set(np.argsort(row)[::-1][:k])


@pytest.mark.parametrize("p", [0.05, 0.5, 0.9, 0.999])
def test_top_p_keeps_the_smallest_set_reaching_p(p):
    logits = np.asarray(_logits(seed=2), np.float64)
    kept = np.isfinite(np.asarray(mask_top_p(jnp.asarray(logits, jnp.float32), p)))
    for row, keep in zip(logits, kept, strict=True):
        probs = np.exp(row - row.max())
        probs /= probs.sum()
        order = np.argsort(row)[::-1]
        mass = np.cumsum(probs[order])
        n = int(np.searchsorted(mass, p) + 1)  # first prefix whose mass reaches p
        assert set(np.flatnonzero(keep)) == set(order[:n])


def test_temperature_draws_follow_the_softmax():
    logits = jnp.asarray([[2.0, 1.0, 0.0, -1.0]])
    temperature = 0.7
    draws = jax.vmap(lambda r: sample(logits, r, Sampling(temperature=temperature))[0])(
        jax.random.split(jax.random.key(3), 20000)
    )
    freq = np.bincount(np.asarray(draws), minlength=4) / 20000
    want = np.asarray(jax.nn.softmax(logits[0] / temperature))
    np.testing.assert_allclose(freq, want, atol=0.015)


def test_top_k_sampling_never_draws_outside_the_top_k():
    logits = _logits(seed=4, b=1, v=100)
    draws = jax.vmap(lambda r: sample(logits, r, Sampling(temperature=2.0, top_k=3))[0])(
        jax.random.split(jax.random.key(5), 2000)
    )
    assert set(np.asarray(draws).tolist()) <= set(np.argsort(np.asarray(logits[0]))[-3:])


@pytest.mark.parametrize(
    "kwargs",
    [dict(temperature=-1.0), dict(top_k=-2), dict(top_p=0.0), dict(top_p=1.5)]
    + [dict(temperature=x) for x in (math.nan, math.inf)]
    + [dict(top_p=x) for x in (math.nan, math.inf, -math.inf)],
)
def test_bad_settings_are_refused(kwargs):
    with pytest.raises(ValueError, match="is not allowed"):
        Sampling(**kwargs)
