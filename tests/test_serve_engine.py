"""The serving engine: greedy output equals Generator's under concurrent submission with slot
reuse (one device and a data x tensor mesh), decode buckets that follow the busy slots,
prefill by token budget, seeded sampling independent of the batch, EOS, max_tokens, cancel,
the queue bound, and the failure path. (Request checks: test_serve_requests.py.)"""

import dataclasses
import functools
import threading
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import small_config

from near_jax import model, sharding
from near_jax.infer import loading
from near_jax.infer.generator import Generator
from near_jax.serve.engine import Engine, EngineError, QueueFull, Request, engine_for_run

VOCAB_LIMIT = 300  # a tokenizer smaller than the (padded) embedding
MAX_LEN = 32  # small_config's data.seq_len
CHUNK = 8
LENGTHS = [3, 20, 9, 1, 16, 12, 8, 17]  # ragged; 20, 16, 17 take several chunks
MAX_TOKENS = [10, 3, 1, 12, 7, 10, 2, 9]  # 1: the request ends with its prefill


class Collector:
    """An emit callback that checks the event contract and records the result."""

    def __init__(self, engine=None):
        self.tokens, self.finish, self.done = [], None, threading.Event()
        self.after_finish, self.engine, self.cache = 0, engine, None

    def __call__(self, tokens, finish):
        if self.done.is_set():
            self.after_finish += 1
        elif finish is None:
            assert len(tokens) == 1
            self.tokens.extend(tokens)
        else:
            assert tokens == [] and finish in ("stop", "length", "cancelled", "error")
            self.finish = finish
            if self.engine is not None:  # the cache as the request leaves it (engine thread)
                self.cache = {k: np.asarray(v) for k, v in self.engine._cache.items()}
            self.done.set()

    def wait(self):
        assert self.done.wait(30), "the request never finished"
        return self.tokens, self.finish


def _mesh(**axes):
    mcfg = small_config().mesh
    mcfg.update({**dict(data=1, fsdp=1, tensor=1), **axes})
    n = mcfg.data * mcfg.fsdp * mcfg.tensor
    return sharding.make_mesh(mcfg, jax.devices()[:n])


def _prompts(lengths, seed=1):
    rng = np.random.default_rng(seed)
    return [tuple(rng.integers(0, VOCAB_LIMIT, n).tolist()) for n in lengths]


@pytest.fixture(scope="module")
def setup():
    cfg = model.ModelConfig.from_config(small_config().model)
    # Sharper logits than at init, so greedy choices are not near-ties.
    params = jax.tree.map(lambda x: x * 1.5, model.init(cfg, jax.random.key(0)))
    return cfg, params


def _engine(setup, mesh, **kw):
    cfg, params = setup
    kw = {**dict(eos_id=-1, pad_id=0, vocab_limit=VOCAB_LIMIT, max_len=MAX_LEN), **kw}
    return Engine(params, cfg, mesh, prefill_chunk=CHUNK, **kw)


@pytest.fixture(scope="module", params=["one-device", "data2-tensor2"])
def engine(request, setup):
    mesh = _mesh() if request.param == "one-device" else _mesh(data=2, tensor=2)
    eng = _engine(setup, mesh, slots=2 if request.param == "one-device" else 3)
    eng.start()
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def reference(setup):
    """Generator's greedy continuations of the prompts (one device)."""
    cfg, params = setup
    gen = Generator(params, cfg, _mesh(), eos_id=-1, pad_id=0, vocab_limit=VOCAB_LIMIT)
    return gen.generate([list(p) for p in _prompts(LENGTHS)], max_new_tokens=max(MAX_TOKENS))


def _serve(eng, requests, threads=4, tickets=None):
    """Submits the requests from several threads at once; returns their (tokens, finish).
    With `tickets` (a dict), also their tickets and collectors by index."""
    collectors = [Collector(eng if tickets is not None else None) for _ in requests]
    go = threading.Barrier(threads)

    def submit(part):
        go.wait()
        for i in part:
            ticket = eng.submit(requests[i], collectors[i])
            if tickets is not None:
                tickets[i] = (ticket, collectors[i])

    workers = [
        threading.Thread(target=submit, args=(range(t, len(requests), threads),))
        for t in range(threads)
    ]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    results = [c.wait() for c in collectors]
    assert all(c.after_finish == 0 for c in collectors)
    return results


@functools.partial(jax.jit, static_argnums=2)
def _prefill(params, tokens_1xS, cfg):
    positions_1xS = jnp.arange(tokens_1xS.shape[1])[None]
    cache = model.init_cache(cfg, 1, tokens_1xS.shape[1])
    return model.apply_with_cache(params, tokens_1xS, positions_1xS, cache, cfg)[1]


def _reference_cache(params, cfg, seq):
    """K/V of a sequence prefilled whole on a fresh cache (right-padded: one compile)."""
    tokens = np.zeros((1, MAX_LEN), np.int32)
    tokens[0, : len(seq)] = seq
    return {k: np.asarray(v) for k, v in _prefill(params, jnp.asarray(tokens), cfg).items()}


def test_greedy_equals_generator_with_concurrent_requests_and_reused_slots(
    engine, reference, setup
):
    before = engine.stats()
    prompts = _prompts(LENGTHS)
    requests = [Request(p, m) for p, m in zip(prompts, MAX_TOKENS, strict=True)]
    tickets = {}
    results = _serve(engine, requests, tickets=tickets)
    for got, want, m in zip(results, reference.tokens, MAX_TOKENS, strict=True):
        assert got == (want[:m], "length")
    # Every cache entry a request read is the one of its own sequence: nothing another row,
    # a padded chunk or an idle slot's decode wrote survived into its positions.
    cfg, params = setup
    for i, (ticket, collector) in tickets.items():
        seq = list(prompts[i]) + results[i][0][:-1]  # the last token is never fed back
        want = _reference_cache(params, cfg, seq)
        for k in ("k", "v"):
            got = collector.cache[k][:, ticket.slot, : len(seq)]
            np.testing.assert_allclose(got, want[k][:, 0, : len(seq)], atol=2e-5, rtol=1e-4)
    after = engine.stats()
    assert engine.slots == (2 if engine.mesh.shape["data"] == 1 else 4)  # 3 rounded up to 4
    assert after["slots"] < len(requests) and after["active_slots"] == 0
    assert after["prefill_chunks"] - before["prefill_chunks"] == sum(
        -(-n // CHUNK) for n in LENGTHS
    )
    assert after["tokens_out"] - before["tokens_out"] == sum(MAX_TOKENS)
    assert after["finished"]["length"] - before["finished"]["length"] == len(requests)
    # Fixed shapes: warmup compiled the only programs serving runs (a decode per bucket and
    # attention span).
    buckets = (1, 2) if engine.mesh.shape["data"] == 1 else (2, 4)  # multiples of data=2
    assert engine.device.buckets == buckets and len(engine.device.spans) > 1
    prefills = len(engine.device.prefill_buckets) * len(engine.device.prefill_lengths)
    assert engine.device.prefill._cache_size() == prefills
    assert engine.device.decode._cache_size() == len(buckets) * len(engine.device.spans)


def test_seeded_sampling_does_not_depend_on_the_batch(engine):
    prompt = _prompts([6], seed=3)[0]
    seeded = Request(prompt, 20, temperature=1.5, top_p=0.98, seed=7)
    (alone,) = _serve(engine, [seeded], threads=1)
    crowd = [
        Request(p, 20, temperature=1.0, top_k=5, seed=i) for i, p in enumerate(_prompts([4, 11, 2]))
    ]
    results = _serve(engine, [crowd[0], seeded, crowd[1], crowd[2], Request(prompt, 20, seed=7)])
    assert results[1] == alone
    other = Request(prompt, 20, temperature=1.5, top_p=0.98, seed=8)
    assert _serve(engine, [other], threads=1)[0][0] != alone[0]
    assert max(max(tokens) for tokens, _ in results) < VOCAB_LIMIT


def test_eos_stops_a_row_and_is_not_emitted(engine):
    prompt = _prompts([5], seed=2)[0]
    ((free, _),) = _serve(engine, [Request(prompt, 12)], threads=1)
    eos = free[3]
    engine.eos_id = eos  # host-side only: read when a token comes back
    try:
        results = _serve(engine, [Request(prompt, 12), Request(prompt + tuple(free[:3]), 12)])
    finally:
        engine.eos_id = -1
    assert results[0] == (free[: free.index(eos)], "stop")
    assert results[1] == ([], "stop")  # EOS as the first token: nothing emitted


def test_cancel_frees_the_slot(engine):
    first = threading.Event()
    release = threading.Event()
    collector = Collector()

    def blocking(tokens, finish):  # holds the engine thread at the first token
        collector(tokens, finish)
        if tokens and not first.is_set():
            first.set()
            assert release.wait(30)

    long = engine.submit(Request(_prompts([5])[0], 25), blocking)
    assert first.wait(30)
    queued = Collector()
    waiting = engine.submit(Request(_prompts([4])[0], 5), queued)
    long.cancel()
    waiting.cancel()
    release.set()
    tokens, finish = collector.wait()
    assert finish == "cancelled" and 1 <= len(tokens) < 25
    assert queued.wait() == ([], "cancelled") and long.finish == "cancelled"
    # The slots are free again: the next request is served in full.
    assert _serve(engine, [Request(_prompts([3])[0], 4)], threads=1)[0][1] == "length"
    assert engine.stats()["active_slots"] == 0


def test_a_full_queue_refuses_and_shutdown_cancels_the_waiting(setup):
    eng = _engine(setup, _mesh(), slots=1, max_queue=2)  # never started: requests wait
    collectors = [Collector(), Collector()]
    for c in collectors:
        eng.submit(Request((1, 2), 3), c)
    with pytest.raises(QueueFull, match=r"^the queue is full: 2 requests waiting \(max_queue=2\)$"):
        eng.submit(Request((1, 2), 3), Collector())
    stats = eng.stats()
    assert stats["queue_depth"] == 2 and stats["requests_rejected"] == 1
    eng.shutdown()
    assert [c.wait() for c in collectors] == [([], "cancelled")] * 2
    with pytest.raises(EngineError, match="shut down"):
        eng.submit(Request((1, 2), 3), Collector())


def test_engine_settings_are_checked(setup):
    with pytest.raises(ValueError, match=r"^slots=0 is not allowed: must be >= 1$"):
        _engine(setup, _mesh(), slots=0)
    assert _engine(setup, _mesh(), max_len=30).cache_len == 32  # whole chunks
    eng = _engine(setup, _mesh())
    with pytest.raises(ValueError, match=r"^prompt token 300 at index 1 is not allowed"):
        eng.submit(Request((1, 300), 4), Collector())  # the checks of test_serve_requests.py
    assert eng.stats()["queue_depth"] == 0


def _twin(setup, engine, **kw):
    """A fresh engine over `engine`'s compiled steps: no compiling."""
    eng = _engine(setup, engine.mesh, slots=engine.slots, **kw)
    eng.device = engine.device
    return eng


# Host-side scheduling does not depend on the mesh: the one-device engine only.
@pytest.mark.parametrize("engine", ["one-device"], indirect=True)
@pytest.mark.parametrize("step_tokens,steps", [(1, 4), (2 * CHUNK, 3)])
def test_a_burst_is_prefilled_within_the_token_budget(setup, engine, step_tokens, steps):
    eng = _twin(setup, engine, step_tokens=step_tokens)
    collectors = [Collector(), Collector()]
    for c, p in zip(collectors, _prompts([5, 6]), strict=True):
        eng.submit(Request(p, 4), c)  # both wait for the first iteration
    eng.start()
    assert [c.wait()[1] for c in collectors] == ["length"] * 2
    stats = eng.stats()
    eng.shutdown()
    # Budget 1: one chunk an iteration, so the second prompt waits for one decode step
    # (4 steps); budget 2 chunks: both in the first iteration, then 3 steps of both.
    assert (stats["steps"], stats["prefill_chunks"], stats["tokens_out"]) == (steps, 2, 8)


def test_decode_runs_the_smallest_bucket_holding_the_busy_slots(setup, engine):
    eng = _twin(setup, engine)
    eng.start()
    tickets = {}
    _serve(eng, [Request(_prompts([4])[0], 6)], threads=1, tickets=tickets)
    one = eng.stats()  # alone: the first slot of the order, the smallest bucket
    assert tickets[0][0].slot == eng.device.order[0] == 0
    assert one["decode_rows"] == one["steps"] * eng.device.buckets[0] == 5 * eng.slots // 2
    _serve(eng, [Request(p, 6) for p in _prompts([4, 7])], threads=1, tickets=tickets)
    two = eng.stats()  # the first two slots of the order (one per device where data=2)
    eng.shutdown()
    assert {tickets[0][0].slot, tickets[1][0].slot} == set(eng.device.order[:2].tolist())
    assert two["decode_rows"] - one["decode_rows"] == 2 * (two["steps"] - one["steps"])
    # Warmup compiled both buckets at every span.
    assert engine.device.decode._cache_size() == 2 * len(engine.device.spans)


@pytest.mark.parametrize("engine", ["one-device"], indirect=True)  # mesh-independent
def test_a_failure_ends_every_request_with_error(setup, engine):
    eng = _engine(setup, engine.mesh, slots=2)

    class Failing:  # the compiled steps of `engine` (warmup included), but decode fails
        def __getattr__(self, name):
            return getattr(engine.device, name)

        def run_decode(self, *args):
            raise RuntimeError("device lost\nand a second line")

    eng.device = Failing()
    collectors = [Collector() for _ in range(4)]  # two get slots, two wait
    for c in collectors:
        eng.submit(Request(_prompts([3])[0], 5), c)
    eng.start()
    results = [c.wait() for c in collectors]
    assert all(finish == "error" and len(tokens) <= 1 for tokens, finish in results)
    eng.shutdown()  # the thread has ended already; this joins it
    stats = eng.stats()
    assert stats["error"] == "RuntimeError: device lost" and not stats["running"]
    assert stats["finished"]["error"] == 4
    with pytest.raises(EngineError, match="device lost"):
        eng.submit(Request((1,), 1), Collector())


def test_engine_for_run_takes_the_runs_tokenizer_and_context(setup):
    cfg, params = setup
    tokenizer = types.SimpleNamespace(eos_id=2, pad_id=0, vocab_size=VOCAB_LIMIT)
    run = loading.LoadedRun("", 5, small_config(), cfg, params, _mesh(), tokenizer)
    eng = engine_for_run(run, slots=3, prefill_chunk=CHUNK)
    assert (eng.eos_id, eng.pad_id, eng.vocab_limit) == (2, 0, VOCAB_LIMIT)
    assert (eng.max_len, eng.slots, eng.cache_len) == (MAX_LEN, 3, MAX_LEN)
    # Sliding-window attention has no context bound but memory: data.seq_len by default.
    windowed = dataclasses.replace(run, model_cfg=dataclasses.replace(cfg, attention_window=6))
    assert engine_for_run(windowed, max_len=20, prefill_chunk=CHUNK).cache_len == 24
    assert engine_for_run(windowed, prefill_chunk=CHUNK).max_len == MAX_LEN
