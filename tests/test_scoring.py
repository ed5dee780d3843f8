"""Log-likelihood scoring: padded, bucketed batches agree with an unpadded forward, on a mesh."""

import dataclasses

import jax
import numpy as np
import pytest
from helpers import small_config

from near_jax import model, sharding
from near_jax.data.tokenizer import ByteTokenizer
from near_jax.eval import prompts, scoring, taskfile
from near_jax.infer import loading

TOK = ByteTokenizer()
CFG = model.ModelConfig.from_config(small_config().model)  # small_params' config
MAX_LEN = 48  # not a power of two: the top bucket is MAX_LEN itself
BATCH = 8  # one batch size (and one cfg) for every test, so compiled shapes are shared
apply = jax.jit(model.apply, static_argnums=4)


def _reference(params, request: prompts.Request) -> tuple[float, bool]:
    """Unpadded forward of one request; log_softmax in float64 numpy."""
    cont = TOK.encode(request.continuation)
    ids = ([TOK.bos_id] + TOK.encode(request.prompt) + cont)[-(MAX_LEN + 1) :]
    inputs, targets = np.asarray(ids[:-1])[None], np.asarray(ids[1:])
    n = inputs.shape[1]
    logits = apply(params, inputs, np.arange(n)[None], np.ones((1, n), np.int32), CFG)
    logits_LxV = np.asarray(logits[0], np.float64)
    logprobs_LxV = logits_LxV - np.log(np.exp(logits_LxV).sum(-1, keepdims=True))
    last = np.arange(n - len(cont), n)
    logprob = logprobs_LxV[last, targets[last]].sum()
    greedy = bool((logits_LxV[last].argmax(-1) == targets[last]).all())
    return float(logprob), greedy


def _random_text(rng, n_bytes: int) -> str:
    """Random text of exactly n_bytes UTF-8 bytes, multi-byte characters included."""
    alphabet = list("abcdefghij klmnop():=\n") + ["é", "€"]
    out = ""
    while len(out.encode()) < n_bytes:
        char = rng.choice(alphabet)
        out += char if len((out + char).encode()) <= n_bytes else "x"
    return out


def test_loglikelihood_matches_unpadded_reference_with_and_without_mesh(small_params):
    # A sharper head makes logits peaky, so summing a wrong position would show.
    params = small_params | {"head": small_params["head"] * 20.0}
    rng = np.random.default_rng(0)
    # Two texts per length pair: 12 requests, 2 batches (the second part padding rows);
    # the 70-byte prompts are cut to MAX_LEN; 5 distinct unpadded lengths to compile.
    requests = [
        prompts.Request(k, 0, _random_text(rng, p), _random_text(rng, c))
        for k, (p, c) in enumerate([(5, 1), (30, 12), (70, 1), (5, 12), (30, 1), (70, 12)] * 2)
    ]
    calls = []
    got = scoring.score_requests(
        params,
        CFG,
        TOK,
        requests,
        max_len=MAX_LEN,
        batch_size=BATCH,
        progress=lambda done, total: calls.append((done, total)),
    )
    want = [_reference(params, r) for r in requests]
    np.testing.assert_allclose(
        [s.loglikelihood for s in got], [w[0] for w in want], rtol=1e-6, atol=1e-4
    )
    assert [s.is_greedy for s in got] == [w[1] for w in want]
    assert np.std([w[0] for w in want]) > 5  # the comparison has something to compare
    assert calls == [(8, 12), (12, 12)]

    # On a mesh: params sharded by the rules table (vocab split too), rows over data axes.
    mesh = loading.inference_mesh(fsdp=2, tensor=2)
    shardings = sharding.logical_to_sharding(model.logical_axes(CFG), params, mesh)
    # batch_size 3 rounds up to the 4 data-parallel ways (data x fsdp): 3 batches of 4 rows.
    on_mesh = scoring.score_requests(
        jax.device_put(params, shardings),
        CFG,
        TOK,
        requests,
        max_len=MAX_LEN,
        batch_size=3,
        mesh=mesh,
    )
    np.testing.assert_allclose(
        [s.loglikelihood for s in on_mesh], [w[0] for w in want], rtol=1e-6, atol=1e-4
    )
    assert [s.is_greedy for s in on_mesh] == [w[1] for w in want]


def test_chunked_head_scores_like_the_full_logits_on_and_off_a_mesh(small_params):
    # model.loss_chunk: 40 tokens = 5 positions of 8 rows at a time (dividing no bucket).
    params = small_params | {"head": small_params["head"] * 20.0}
    rng = np.random.default_rng(1)
    requests = [
        prompts.Request(k, 0, _random_text(rng, p), _random_text(rng, c))
        for k, (p, c) in enumerate([(5, 1), (30, 12), (70, 1), (5, 12)])
    ]
    fused_cfg = dataclasses.replace(CFG, loss_chunk=40)
    want = [_reference(params, r) for r in requests]
    mesh = loading.inference_mesh(fsdp=2, tensor=2)
    shardings = sharding.logical_to_sharding(model.logical_axes(CFG), params, mesh)
    for p, m in ((params, None), (jax.device_put(params, shardings), mesh)):
        got = scoring.score_requests(
            p, fused_cfg, TOK, requests, max_len=MAX_LEN, batch_size=BATCH, mesh=m
        )
        np.testing.assert_allclose(
            [s.loglikelihood for s in got], [w[0] for w in want], rtol=1e-6, atol=1e-4
        )
        assert [s.is_greedy for s in got] == [w[1] for w in want]
    assert any(w[1] for w in want) or np.std([w[0] for w in want]) > 5


def test_encode_request_truncates_from_the_left_keeping_the_continuation():
    request = prompts.Request(0, 0, "abcdefghij", " xyz")
    ids, n = scoring.encode_request(TOK, request, max_len=6)
    assert n == 4 and TOK.decode(ids) == "hij xyz"  # 7 ids: the model reads 6
    ids, n = scoring.encode_request(TOK, request, max_len=100)
    assert ids[0] == TOK.bos_id and TOK.decode(ids) == "abcdefghij xyz"
    with pytest.raises(taskfile.TaskError, match="continuation ' xyz' is 4 tokens"):
        scoring.encode_request(TOK, request, max_len=3)
    assert [scoring.bucket_length(n, 100) for n in (1, 16, 17, 33, 64, 65, 99)] == [
        16,
        16,
        32,
        64,
        64,
        100,
        100,
    ]
