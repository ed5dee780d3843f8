"""The engine's device steps: per-request keys, a chunked prefill that writes its own slot
only (also where the slot axis is sharded and other slots hold non-finite garbage), decode
buckets that run and write the first rows only, attending over a span of the cache."""

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
            tokens = np.zeros((1, 8), np.int32)
            tokens[0, : len(piece)] = piece
            ints = np.array([[1], [start], [len(piece) - 1], [0]])
            floats = np.array([[0.0], [1.0]])
            token, cache = steps.run_prefill(small_params, cache, tokens, ints, np.zeros(1), floats)
        whole = model.init_cache(cfg, 1, 32)
        logits, whole = model.apply_with_cache(
            small_params, jnp.asarray(prompt)[None], jnp.arange(13)[None], whole, cfg
        )
    for k in ("k", "v"):
        np.testing.assert_array_equal(np.asarray(cache[k][:, 0]), kept[k])
        np.testing.assert_allclose(cache[k][:, 1, :13], whole[k][:, 0, :13], atol=2e-5, rtol=1e-4)
    assert int(token[0]) == int(jnp.argmax(logits[0, -1, :300]))


def test_one_prefill_call_runs_several_slots_chunks_as_separate_calls_would(small_params):
    # Slots 4, 1 and 6 of 8 (a bucket of 4 rows, one of them padding) take their first
    # chunks in one call, then slot 1 its second (5 tokens: a chunk of 8), then slot 3 its
    # whole prompt of 3 (a chunk of 4).
    cfg = model.ModelConfig.from_config(small_config().model)
    mcfg = small_config().mesh
    mcfg.update(dict(data=1, fsdp=1, tensor=1))
    mesh = sharding.make_mesh(mcfg, jax.devices()[:1])
    steps = SlotSteps(cfg, mesh, slots=8, cache_len=32, chunk=8, vocab_limit=300, prefill_rows=4)
    assert steps.prefill_buckets == (1, 2, 4) and steps.prefill_lengths == (2, 4, 8)
    rng = np.random.default_rng(1)
    prompts = {n: rng.integers(0, 300, length) for n, length in [(4, 5), (1, 13), (6, 8), (3, 3)]}
    calls = [[(4, 0), (1, 0), (6, 0)], [(1, 8)], [(3, 0)]]
    with jax.set_mesh(mesh):
        # The other slots hold NaN: neither read nor changed.
        nan = {k: v.at[:, [0, 2, 5, 7]].set(jnp.nan) for k, v in steps.new_cache().items()}
        cache = jax.device_put(nan, steps.cache_shardings)
        first = {}
        for call in calls:
            tokens = np.zeros((len(call), 8), np.int32)
            ints = np.zeros((4, len(call)), np.int32)
            for i, (slot, start) in enumerate(call):
                piece = prompts[slot][start : start + 8]
                tokens[i, : len(piece)] = piece
                ints[:, i] = (slot, start, len(piece) - 1, 0)
            floats = np.stack([np.zeros(len(call)), np.ones(len(call))])
            out, cache = steps.run_prefill(
                small_params, cache, tokens, ints, np.zeros(len(call)), floats
            )
            assert out.shape == (steps.bucket_of_prefill(len(call)),)
            first.update({slot: int(out[i]) for i, (slot, _) in enumerate(call)})
        for slot, prompt in prompts.items():
            whole = model.init_cache(cfg, 1, 32)
            logits, whole = model.apply_with_cache(
                small_params, jnp.asarray(prompt)[None], jnp.arange(len(prompt))[None], whole, cfg
            )
            n = len(prompt)
            for k in ("k", "v"):
                got = np.asarray(cache[k][:, slot, :n])
                np.testing.assert_allclose(got, whole[k][:, 0, :n], atol=2e-5, rtol=1e-4)
            assert first[slot] == int(jnp.argmax(logits[0, -1, :300]))
    for k in ("k", "v"):
        assert np.isnan(np.asarray(cache[k][:, [0, 2, 5, 7]])).all()
    assert steps.prefill._cache_size() == 3  # [4, 8], [1, 8] and [1, 4]


@pytest.mark.parametrize("data", [1, 2], ids=["one-device", "sharded-slots"])
def test_a_decode_bucket_runs_its_slots_as_the_full_step_does(small_params, data):
    cfg = model.ModelConfig.from_config(small_config().model)
    mcfg = small_config().mesh
    mcfg.update(dict(data=data, fsdp=1, tensor=1))
    mesh = sharding.make_mesh(mcfg, jax.devices()[:data])
    n = 3 * data
    steps = SlotSteps(cfg, mesh, slots=n, cache_len=16, chunk=8, vocab_limit=300)
    assert steps.buckets == ((1, 2, 3) if data == 1 else (2, 4, 6))
    # The order takes one row of every device in turn; a bucket is the order's first slots.
    assert steps.order.tolist() == ([0, 1, 2] if data == 1 else [0, 3, 1, 4, 2, 5])
    b = steps.buckets[1]
    mine = steps.bucket_slots[b]
    assert sorted(mine.tolist()) == sorted(steps.order[:b].tolist())
    assert [steps.bucket(r) for r in (1, b, b + 1)] == list(steps.buckets)
    others = np.setdiff1d(np.arange(n), mine)
    ints_4xN = np.stack([5 + 2 * np.arange(n), np.arange(n), np.zeros(n), np.zeros(n)])
    floats_2xN = np.stack([np.zeros(n), np.ones(n)])
    assert steps.spans == (2, 4, 8, 16) and steps.span(4) == 4 and steps.span(5) == 8
    span = steps.span(int(ints_4xN[1, mine].max()) + 1)  # past every position of the bucket
    with jax.set_mesh(mesh):
        tokens, cache = steps.run_decode(
            small_params, steps.new_cache(), ints_4xN, np.zeros(n), floats_2xN, 16
        )
        full = np.asarray(tokens), {k: np.asarray(v) for k, v in cache.items()}
        # The rows the bucket leaves alone, and its rows past the span, hold garbage:
        # neither read nor changed.
        nan = {k: v.at[:, others].set(jnp.nan) for k, v in steps.new_cache().items()}
        nan = {k: v.at[:, mine, span:].set(jnp.nan) for k, v in nan.items()}
        cache = jax.device_put(nan, steps.cache_shardings)
        tokens, cache = steps.run_decode(
            small_params, cache, ints_4xN[:, mine], np.zeros(b), floats_2xN[:, mine], span
        )
        hlo = steps.decode.lower(small_params, cache, jnp.zeros((7, b), jnp.int32), span=span)
        hlo = hlo.compile().as_text()
    np.testing.assert_array_equal(np.asarray(tokens), full[0][mine])
    for k, v in cache.items():
        got = np.asarray(v[:, mine])
        np.testing.assert_allclose(got[:, :, :span], full[1][k][:, mine, :span], atol=1e-6)
        assert np.isnan(got[:, :, span:]).all() and np.isnan(np.asarray(v[:, others])).all()
    # Each device runs its own rows: nothing moves the cache between devices.
    assert not any(op in hlo for op in ("all-gather", "all-to-all", "collective-permute"))


@pytest.mark.parametrize("span", [0, 8])
def test_a_small_bucket_updates_the_donated_cache_in_place(span):
    cfg = model.ModelConfig.from_config(small_config().model)
    params = model.init(cfg, jax.random.key(0))
    mcfg = small_config().mesh
    mcfg.update(dict(data=1, fsdp=1, tensor=1))
    mesh = sharding.make_mesh(mcfg, jax.devices()[:1])
    steps = SlotSteps(cfg, mesh, slots=8, cache_len=32, chunk=8, vocab_limit=300)
    ints = jax.device_put(np.zeros((7, 1), np.int32), steps.rows_sharding)
    with jax.set_mesh(mesh):
        hlo = steps.decode.lower(params, steps.new_cache(), ints, span=span)
        hlo = hlo.compile().as_text()
    # Bucket 1 of 8 slots (one busy request): no copy of the whole cache. Writing a one-row
    # slice back made XLA copy it into and out of the step (4 whole-cache copies a step);
    # the model now writes the bucket's rows in place. So with a span (a slice it reads).
    shape = f"f32[{cfg.n_layers},8,32,{cfg.n_kv_heads},{cfg.head_dim}]"
    copies = [line for line in hlo.splitlines() if f"= {shape}" in line and " copy(" in line]
    assert copies == []


def test_a_prefill_of_several_slots_updates_the_donated_cache_in_place(small_params):
    cfg = model.ModelConfig.from_config(small_config().model)
    mcfg = small_config().mesh
    mcfg.update(dict(data=1, fsdp=1, tensor=1))
    mesh = sharding.make_mesh(mcfg, jax.devices()[:1])
    steps = SlotSteps(cfg, mesh, slots=8, cache_len=32, chunk=8, vocab_limit=300, prefill_rows=4)
    tokens, ints = np.zeros((4, 8), np.int32), np.zeros((7, 4), np.int32)
    with jax.set_mesh(mesh):
        hlo = steps.prefill.lower(small_params, steps.new_cache(), tokens, ints)
        hlo = hlo.compile().as_text()
    # The 4 slots' rows are gathered and scattered back: no copy of the whole cache.
    shape = f"f32[{cfg.n_layers},8,32,{cfg.n_kv_heads},{cfg.head_dim}]"
    lines = [line for line in hlo.splitlines() if f"= {shape}" in line]
    assert any("scatter" in line for line in lines)
    assert not any(" copy(" in line or " transpose(" in line for line in lines)
