"""Generation with a KV cache: exact against full forward passes, ragged batches, EOS, bounds."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import small_config

from near_jax import model, sharding
from near_jax.infer.generator import Generator
from near_jax.infer.sampling import Sampling

VOCAB_LIMIT = 300  # a tokenizer smaller than the (padded) embedding


def _setup(**overrides):
    cfg = model.ModelConfig.from_config(small_config(**overrides).model)
    params = model.init(cfg, jax.random.key(0))
    # Sharper logits than at init, so greedy choices are not near-ties.
    params = jax.tree.map(lambda x: x * 1.5, params)
    return cfg, params


REF_LEN = 32


@functools.partial(jax.jit, static_argnums=2)
def _full_forward(params, tokens_1xL, cfg):
    positions = jnp.arange(tokens_1xL.shape[1])[None]
    return model.apply(params, tokens_1xL, positions, jnp.ones_like(tokens_1xL), cfg)[0]


def _reference_greedy(params, cfg, prompt, steps):
    """Greedy continuation by a full forward pass over the whole sequence at every step.

    The sequence is right-padded to a fixed length (one compile): causal attention keeps
    the padding from reaching the positions read.
    """
    seq = list(prompt)
    for _ in range(steps):
        tokens = np.zeros((1, REF_LEN), np.int32)
        tokens[0, : len(seq)] = seq
        logits = np.asarray(_full_forward(params, jnp.asarray(tokens), cfg))[len(seq) - 1]
        seq.append(int(np.argmax(logits[:VOCAB_LIMIT])))
    return seq[len(prompt) :]


def _prompts(lengths, seed=1):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, VOCAB_LIMIT, n).tolist() for n in lengths]


@pytest.mark.parametrize(
    "overrides,mesh_axes",
    [
        (dict(), dict(data=-1)),
        (dict(scan_layers=False, tie_embeddings=True), dict(data=2, fsdp=2, tensor=2)),
        (dict(attention_window=6), dict(data=1, fsdp=-1)),
    ],
    ids=["scan-dp8", "unrolled-tied-mixed-mesh", "window-fsdp8"],
)
def test_greedy_with_cache_equals_full_forward(overrides, mesh_axes):
    cfg, params = _setup(**overrides)
    mcfg = small_config().mesh
    for key, value in mesh_axes.items():
        mcfg[key] = value
    mesh = sharding.make_mesh(mcfg)
    prompts = _prompts([3, 11, 1])  # ragged: rows prefill and decode at their own positions
    gen = Generator(params, cfg, mesh, eos_id=-1, pad_id=0, vocab_limit=VOCAB_LIMIT)
    steps = 10
    result = gen.generate(prompts, max_new_tokens=steps)
    for prompt, got in zip(prompts, result.tokens, strict=True):
        assert got == _reference_greedy(params, cfg, prompt, steps)
    assert result.finished == [False] * 3 and result.new_tokens == 3 * steps


def test_rows_stop_at_eos_and_batches_are_independent():
    cfg, params = _setup()
    mesh = sharding.make_mesh(small_config().mesh)
    prompts = _prompts([5, 8], seed=2)
    free = _reference_greedy(params, cfg, prompts[0], 10)
    eos = free[3]  # row 0 stops where it first emits this token
    gen = Generator(params, cfg, mesh, eos_id=eos, pad_id=0, vocab_limit=VOCAB_LIMIT)
    result = gen.generate(prompts, max_new_tokens=10)
    first = free.index(eos)
    assert result.tokens[0] == free[:first] and result.finished[0]
    # Row 1 alone gives the same tokens as in the batch (up to its own EOS, if any).
    alone = gen.generate(prompts[1:], max_new_tokens=10)
    assert alone.tokens[0] == result.tokens[1]


def test_sampling_is_reproducible_and_stays_in_vocab():
    cfg, params = _setup()
    mesh = sharding.make_mesh(small_config().mesh)
    gen = Generator(params, cfg, mesh, eos_id=-1, pad_id=0, vocab_limit=VOCAB_LIMIT)
    sampling = Sampling(temperature=1.5, top_p=0.98)
    a = gen.generate(_prompts([4, 4]), max_new_tokens=16, sampling=sampling, seed=7)
    b = gen.generate(_prompts([4, 4]), max_new_tokens=16, sampling=sampling, seed=7)
    c = gen.generate(_prompts([4, 4]), max_new_tokens=16, sampling=sampling, seed=8)
    assert a.tokens == b.tokens and a.tokens != c.tokens
    assert max(max(t) for t in a.tokens) < VOCAB_LIMIT


def test_bad_requests_are_refused():
    cfg, params = _setup()
    mesh = sharding.make_mesh(small_config().mesh)
    gen = Generator(params, cfg, mesh, eos_id=1, pad_id=0)
    with pytest.raises(ValueError, match="max_new_tokens=0"):
        gen.generate([[1, 2]], max_new_tokens=0)
    with pytest.raises(ValueError, match="empty prompt"):
        gen.generate([[1], []], max_new_tokens=2)


def test_max_new_tokens_is_bounded_by_context_and_cache_memory():
    cfg, params = _setup()
    mesh = sharding.make_mesh(small_config().mesh)
    gen = Generator(params, cfg, mesh, eos_id=-1, pad_id=0, max_len=32)
    with pytest.raises(ValueError, match=r"^max_new_tokens=28 is not allowed: at most 27 "):
        gen.generate([[1] * 5, [2]], max_new_tokens=28)
    with pytest.raises(ValueError, match="a prompt of 32 tokens is not allowed"):
        gen.generate([[1] * 32], max_new_tokens=1)
    assert gen.check_request([[1] * 5], 27) == (8, 64, 128)  # batch over 8 data shards

    # 8 rows (one per device) x 128 positions x 2 layers x 2 kv heads x 16 x 4 bytes x (k, v)
    per_bucket = 128 * 2 * 2 * 16 * 4 * 2
    assert gen.cache_bytes_per_device(8, 128) == per_bucket
    small = Generator(params, cfg, mesh, eos_id=-1, pad_id=0, cache_budget_bytes=2 * per_bucket)
    assert small.check_request([[1] * 5], 192)[2] == 256
    with pytest.raises(ValueError, match=r"max_new_tokens=193 is not allowed: .* at most 192 "):
        small.generate([[1] * 5], max_new_tokens=193)
    # The default budget is the devices' free memory: a huge request fails before allocating.
    unbounded = Generator(params, cfg, mesh, eos_id=-1, pad_id=0)
    with pytest.raises(ValueError, match=r"max_new_tokens=100000000000 .*KV cache needs"):
        unbounded.generate([[1]], max_new_tokens=10**11)
