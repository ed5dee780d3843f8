"""The engine's device steps: per-request keys, a chunked prefill that writes its own slot
only (also where the slot axis is sharded and other slots hold non-finite garbage)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import small_config

from near_jax import model, sharding
from near_jax.serve.slots import SlotSteps, request_keys


def test_request_keys_are_fold_in_of_the_seed():
    seeds, counts = np.array([0, 7, 7, 2**32 - 1], np.uint32), np.array([0, 0, 5, 3], np.int32)
    got = jax.random.key_data(request_keys(jnp.asarray(seeds), jnp.asarray(counts)))
    for row, s, n in zip(got, seeds, counts, strict=True):
        want = jax.random.key_data(jax.random.fold_in(jax.random.key(int(s)), int(n)))
        np.testing.assert_array_equal(row, want)


def test_shapes_that_would_clamp_a_chunk_are_refused():
    cfg = model.ModelConfig.from_config(small_config().model)
    mcfg = small_config().mesh
    mcfg.update(dict(data=2, fsdp=1, tensor=1))
    mesh = sharding.make_mesh(mcfg, jax.devices()[:2])
    with pytest.raises(ValueError, match=r"^slots=3, cache_len=32, chunk=8 are not allowed"):
        SlotSteps(cfg, mesh, slots=3, cache_len=32, chunk=8, vocab_limit=300)
    with pytest.raises(ValueError, match="cache_len a multiple of chunk"):
        SlotSteps(cfg, mesh, slots=2, cache_len=30, chunk=8, vocab_limit=300)


@pytest.mark.parametrize("data", [1, 2], ids=["dynamic-slice", "sharded-masked-sum"])
def test_chunked_prefill_writes_its_slot_as_a_whole_prefill_would(small_params, data):
    cfg = model.ModelConfig.from_config(small_config().model)
    mcfg = small_config().mesh
    mcfg.update(dict(data=data, fsdp=1, tensor=1))
    mesh = sharding.make_mesh(mcfg, jax.devices()[:data])
    steps = SlotSteps(cfg, mesh, slots=2, cache_len=32, chunk=8, vocab_limit=300)
    prompt = np.random.default_rng(0).integers(0, 300, 13)
    with jax.set_mesh(mesh):
        cache = steps.new_cache()
        # Slot 0 holds garbage, NaN included: slot 1's prefill must neither read nor change it.
        garbage = {k: v.at[:, 0].set(jnp.nan).at[:, 0, 1].set(3.0) for k, v in cache.items()}
        cache = jax.device_put(garbage, steps.cache_shardings)
        kept = {k: np.asarray(v[:, 0]) for k, v in cache.items()}
        for start in (0, 8):
            piece = prompt[start : start + 8]
            tokens = np.zeros(8, np.int32)
            tokens[: len(piece)] = piece
            token, cache = steps.run_prefill(
                small_params, cache, tokens, 1, start, len(piece) - 1, (0.0, 0, 1.0), 0
            )
        whole = model.init_cache(cfg, 1, 32)
        logits, whole = model.apply_with_cache(
            small_params, jnp.asarray(prompt)[None], jnp.arange(13)[None], whole, cfg
        )
    for k in ("k", "v"):
        np.testing.assert_array_equal(np.asarray(cache[k][:, 0]), kept[k])
        np.testing.assert_allclose(cache[k][:, 1, :13], whole[k][:, 0, :13], atol=2e-5, rtol=1e-4)
    assert int(token) == int(jnp.argmax(logits[0, -1, :300]))
