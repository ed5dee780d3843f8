"""Sampling: greedy, top-k and top-p masks, temperature draws against the softmax."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from near_jax.infer.sampling import Sampling, mask_top_k, mask_top_p, sample, sample_rows


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


_MIXED = [
    Sampling(),
    Sampling(temperature=1.0),
    Sampling(temperature=0.7, top_k=5),
    Sampling(temperature=1.3, top_p=0.6),
    Sampling(temperature=2.0, top_k=10, top_p=0.8),
    Sampling(temperature=1.0, top_k=1),
    Sampling(temperature=0.5, top_k=50, top_p=1.0),  # k = V keeps everything
    Sampling(temperature=3.0, top_p=0.05),
]


def _rows(settings):
    return (
        jnp.asarray([s.temperature for s in settings], jnp.float32),
        jnp.asarray([s.top_k for s in settings], jnp.int32),
        jnp.asarray([s.top_p for s in settings], jnp.float32),
    )


def test_sample_rows_draws_what_sample_draws_for_each_row_alone():
    logits = _logits(seed=6, b=len(_MIXED))
    keys = jax.random.split(jax.random.key(100), (50, len(_MIXED)))  # 50 draws per row
    got = np.asarray(jax.vmap(lambda k: sample_rows(logits, k, *_rows(_MIXED)))(keys))

    @jax.jit
    def alone(keys):  # row i drawn by itself under its own Sampling
        return jnp.stack(
            [
                jax.vmap(lambda k, i=i, s=s: sample(logits[i : i + 1], k, s)[0])(keys[:, i])
                for i, s in enumerate(_MIXED)
            ],
            axis=1,
        )

    np.testing.assert_array_equal(got, alone(keys))
    # Greedy rows are the argmax whatever their key; the others draw several tokens.
    assert set(got[:, 0]) == {int(np.argmax(logits[0]))} and len(set(got[:, 1])) > 3


def test_sample_rows_does_not_depend_on_the_other_rows():
    logits = _logits(seed=7, b=len(_MIXED))
    keys = jax.random.split(jax.random.key(8), len(_MIXED))
    a = np.asarray(sample_rows(logits, keys, *_rows(_MIXED)))
    others = [Sampling(temperature=1.9, top_k=2)] * len(_MIXED)
    others[3] = _MIXED[3]
    b = np.asarray(sample_rows(logits, keys, *_rows(others)))
    assert a[3] == b[3] and not np.array_equal(a, b)


def test_sample_rows_follows_each_rows_softmax():
    logits = jnp.asarray([[2.0, 1.0, 0.0, -1.0]] * 2)
    settings = [Sampling(temperature=0.7), Sampling(temperature=1.0, top_p=0.7)]
    n = 20000
    keys = jax.random.split(jax.random.key(9), (n, 2))
    draws = jax.vmap(lambda k: sample_rows(logits, k, *_rows(settings)))(keys)
    freq = [np.bincount(np.asarray(draws[:, i]), minlength=4) / n for i in range(2)]
    np.testing.assert_allclose(freq[0], jax.nn.softmax(logits[0] / 0.7), atol=0.015)
    # top_p 0.7 keeps the two most likely tokens (0.64 before the second), renormalized.
    p = np.asarray(jax.nn.softmax(logits[1]))
    np.testing.assert_allclose(freq[1], [p[0] / p[:2].sum(), p[1] / p[:2].sum(), 0, 0], atol=0.015)


def test_sample_rows_draw_is_the_same_whichever_branch_the_batch_takes():
    # A temperature-only row: in a batch with a top-k row (the sort), with only plain rows
    # (no sort), and its greedy neighbour in an all-greedy batch (argmax alone).
    logits = _logits(seed=10, b=3)
    draw = jax.jit(sample_rows)
    for seed in range(20):
        keys = jax.random.split(jax.random.key(seed), 3)
        masked = [Sampling(temperature=1.5), Sampling(), Sampling(temperature=1.0, top_k=3)]
        plain = [Sampling(temperature=1.5), Sampling(), Sampling(temperature=1.0)]
        a = np.asarray(draw(logits, keys, *_rows(masked)))
        b = np.asarray(draw(logits, keys, *_rows(plain)))
        assert a[0] == b[0] and a[1] == b[1] == int(np.argmax(logits[1]))
        alone = sample(logits[:1], keys[0], Sampling(temperature=1.5))[0]
        assert a[0] == int(alone)
        greedy = np.asarray(draw(logits, keys, *_rows([Sampling()] * 3)))
        np.testing.assert_array_equal(greedy, np.argmax(np.asarray(logits), axis=-1))
