"""DiLoCo across islands: the round protocol in-process, then real processes on localhost."""

import json
import os
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import REPO, FakeClock, start_module, subprocess_env

from near_jax.diloco import island, protocol
from near_jax.diloco import store as store_lib
from near_jax.diloco.aggregator import Aggregator
from near_jax.diloco.codec.compress import LeafPayload, Payload, decode, encode
from near_jax.diloco.outer import outer_optimizer, outer_step
from near_jax.diloco.store import ObjectStore

RUN, SPEC, LR, MU = "demo", "int8", 0.7, 0.9
SHAPES = {"w": (4, 33), "b": (33,), "blocks": {"k": (2, 3, 5)}}


def tree(seed, scale=1.0):
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda s: (rng.standard_normal(s) * scale).astype(np.float32),
        SHAPES,
        is_leaf=lambda x: isinstance(x, tuple),
    )


LIKE = tree(0)


def make_aggregator(store, clock, quorum=3, timeout=10.0):
    return Aggregator(
        store,
        RUN,
        LIKE,
        spec=SPEC,
        lr=LR,
        momentum=MU,
        quorum=quorum,
        round_timeout=timeout,
        poll_seconds=0.5,
        clock=clock,
        sleep=clock.sleep,
    )


@pytest.fixture
def started(tmp_path):
    """(store, clock, aggregator) of a run created at version 0 from tree(1)."""
    store, clock = ObjectStore.open(str(tmp_path)), FakeClock()
    agg = make_aggregator(store, clock)
    assert agg.create(tree(1), {"inner_steps": 3})
    assert not make_aggregator(store, clock).create(tree(99), {})  # idempotent: kept
    agg.load()
    return store, clock, agg


def push(store, island, version, delta, **kw):
    base = protocol.pull_version(store, RUN, version, LIKE)
    return protocol.push_contribution(store, RUN, island, base, delta, SPEC, **kw)


def optax_rounds(params, updates):
    """The reference: optax outer_step applied to each update in turn (eager, float32)."""
    opt = outer_optimizer(LR, MU)
    state = opt.init(params)
    for update in updates:
        params, state = outer_step(opt, params, state, update)
    return params, state[0].trace


def bits_equal(a, b):
    leaves = zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    return all(
        np.array_equal(np.asarray(x).view(np.uint32), np.asarray(y).view(np.uint32))
        for x, y in leaves
    )


# ------------------------------------------------------------------------ outer step math


@pytest.mark.parametrize("mu", [0.9, 0.0])
def test_numpy_outer_update_is_bit_identical_to_optax(mu):
    """Host numpy float32 == optax op by op. A jitted step may fuse (e.g. into FMAs) and
    differ in the last bit, which is why islands and the aggregator step on the host."""
    params, momentum = tree(1), protocol.zeros_like(LIKE)
    opt = outer_optimizer(LR, mu)
    ref_params, ref_state = params, opt.init(params)
    jitted = jax.jit(lambda p, s, d: outer_step(opt, p, s, d))
    for step in range(5):
        delta = tree(10 + step, scale=1e-2)
        params, momentum = protocol.outer_update(params, momentum, delta, LR, mu)
        eager = outer_step(opt, ref_params, ref_state, delta)
        jit_params, _ = jitted(ref_params, ref_state, delta)
        ref_params, ref_state = eager
        assert bits_equal(params, ref_params)
        for x, y in zip(jax.tree.leaves(params), jax.tree.leaves(jit_params), strict=True):
            np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)
        if mu:
            assert bits_equal(momentum, ref_state[0].trace)


# ---------------------------------------------------------------------------- protocol


def test_round_of_three_matches_independent_recomputation(started):
    store, _, agg = started
    deltas = {name: tree(20 + i, scale=1e-2) for i, name in enumerate("abc")}
    for name, delta in deltas.items():
        written, nbytes, _ = push(store, name, 0, delta, inner_loss=1.0)
        assert written and nbytes > 0
    stats = agg.run_round()
    assert (stats["round"], stats["version"], stats["reason"]) == (0, 1, "quorum")
    assert [e["island"] for e in stats["decision"]["accepted"]] == ["a", "b", "c"]

    # Independently: decode each island's payload, average in fp32, compress the mean with
    # the run's spec, apply optax's outer step to version 0.
    decoded = [decode(encode(deltas[n], SPEC)[0]) for n in "abc"]
    mean = jax.tree.map(lambda a, b, c: (a + b + c) / np.float32(3), *decoded)
    update = decode(encode(mean, SPEC)[0])
    ref_params, ref_momentum = optax_rounds(tree(1), [update])
    v1 = protocol.pull_version(store, RUN, 1, LIKE, with_server_ef=True)
    assert bits_equal(v1.params, ref_params) and bits_equal(v1.momentum, ref_momentum)
    # An island following by the update alone reaches the same bits (hash-checked).
    island_v0 = protocol.pull_version(store, RUN, 0, LIKE)
    island_v1 = protocol.apply_update(store, RUN, island_v0, SPEC, LR, MU, LIKE)
    assert island_v1.params_sha256 == v1.params_sha256 and bits_equal(island_v1.params, ref_params)
    assert json.loads(store.get(protocol.latest_key(RUN)))["version"] == 1
    assert protocol.verify_run(store, RUN, LIKE) == []


def test_late_push_is_recorded_late_and_never_applied(started):
    store, _, agg = started
    agg.quorum = 2
    push(store, "a", 0, tree(20, 1e-2))
    push(store, "b", 0, tree(21, 1e-2))
    agg.run_round()  # closes round 0 with a and b
    written, _, _ = push(store, "c", 0, tree(22, 1e-2))  # after the decision: late
    assert written
    push(store, "a", 1, tree(23, 1e-2))
    push(store, "b", 1, tree(24, 1e-2))
    stats = agg.run_round()
    assert stats["decision"]["late"] == [
        {"island": "c", "round": 0, "key": protocol.contrib_key(RUN, 0, "c")}
    ]
    d0 = json.loads(store.get(protocol.decision_key(RUN, 0)))
    assert [e["island"] for e in d0["accepted"]] == ["a", "b"]
    stats = agg.run_round()  # round 2 (deadline, empty): c is not reported twice
    assert stats["decision"]["late"] == [] and stats["reason"] == "deadline"
    assert protocol.verify_run(store, RUN, LIKE) == []  # every version = its decision, once


def test_invalid_contributions_are_rejected_with_reasons(started, tmp_path):
    store, clock, agg = started
    base = protocol.pull_version(store, RUN, 0, LIKE)
    good = tree(20, 1e-2)
    push(store, "good", 0, good)
    # Wrong base: built on other params.
    other = protocol.make_version(0, tree(5), protocol.zeros_like(LIKE))
    protocol.push_contribution(store, RUN, "stale", other, good, SPEC)
    # Shapes unlike the params.
    bad_shape = {**good, "b": np.zeros(32, np.float32)}
    protocol.push_contribution(store, RUN, "shape", base, bad_shape, SPEC)
    # Not a payload at all.
    store.put(protocol.contrib_key(RUN, 0, "garbage"), b"\x05\x00\x00\x00{}abc" + b"junk" * 9)
    # Finite scales whose decoded values overflow to inf.
    payload, _ = encode(good, SPEC)
    leaves = list(payload.leaves)
    leaves[0] = LeafPayload(
        leaves[0].path,
        leaves[0].shape,
        leaves[0].values,
        np.full_like(leaves[0].scales, 3e38),
        None,
    )
    tag = {"run": RUN, "round": 0, "island": "huge", "base_sha256": base.params_sha256}
    body = protocol.pack_contribution(tag, Payload(payload.spec, tuple(leaves)))
    store.put(protocol.contrib_key(RUN, 0, "huge"), body)
    # Tag naming another island than its key.
    store.put(protocol.contrib_key(RUN, 0, "liar"), body)
    # A torn object (as a store without atomic writes might leave).
    push(store, "torn", 0, good)
    path = tmp_path / protocol.contrib_key(RUN, 0, "torn")
    path.write_bytes(path.read_bytes()[:100])

    stats = agg.run_round()
    decision = stats["decision"]
    assert stats["reason"] == "deadline" and clock.t >= agg.opened_at  # quorum 3 not met
    assert [e["island"] for e in decision["accepted"]] == ["good"]
    reasons = {e["island"]: e["reason"] for e in decision["rejected"]}
    assert set(reasons) == {"stale", "shape", "garbage", "huge", "liar", "torn"}
    assert "built on base" in reasons["stale"]
    assert "does not match" in reasons["shape"]
    assert "invalid" in reasons["garbage"]
    assert "non-finite" in reasons["huge"]
    assert "island" in reasons["liar"]
    assert reasons["torn"].startswith("corrupt object")
    # Only the good contribution was applied.
    update = decode(encode(decode(encode(good, SPEC)[0]), SPEC)[0])
    ref_params, _ = optax_rounds(tree(1), [update])
    assert bits_equal(protocol.pull_version(store, RUN, 1, LIKE).params, ref_params)


def test_junk_and_links_are_rejected_without_being_read(started, tmp_path):
    """A 200 MB (sparse) contribution is refused from its header; a link to a file outside
    the store is refused by name, and nothing of that file reaches the decision."""
    store, clock, agg = started
    push(store, "good", 0, tree(20, 1e-2))
    size = 200 << 20
    with open(tmp_path / protocol.contrib_key(RUN, 0, "junk"), "wb") as f:
        f.write(store_lib.HEADER.pack(store_lib.MAGIC, 1, size, b"\0" * 32))
        f.truncate(store_lib.HEADER.size + size)
    outside = tmp_path.parent / f"{tmp_path.name}-passwd"
    outside.write_bytes(store_lib.frame(b"SECRET:x:0:0:root:/root:/bin/bash"))
    os.symlink(outside, tmp_path / protocol.contrib_key(RUN, 0, "link"))
    read0 = store.bytes_read
    decision = agg.run_round()["decision"]
    assert store.bytes_read - read0 < protocol.object_limit(LIKE)
    reasons = {e["island"]: e["reason"] for e in decision["rejected"]}
    assert "oversized" in reasons["junk"]
    assert (
        "symbolic link" in reasons["link"]
        and protocol.contrib_key(RUN, 0, "link") in reasons["link"]
    )
    assert "SECRET" not in json.dumps(decision)
    assert [e["island"] for e in decision["accepted"]] == ["good"]


@pytest.mark.parametrize("planted", ["unframed", "not_json", "forged"])
def test_a_planted_decision_is_moved_aside_and_the_round_decided(started, tmp_path, planted):
    """Garbage or a forgery in the decision slot never stops the run: the aggregator moves
    it aside with a warning naming it and decides the round; islands keep waiting."""
    store, clock, agg = started
    logged = []
    agg.log = logged.append
    push(store, "good", 0, tree(20, 1e-2))
    key = protocol.decision_key(RUN, 0)
    if planted == "unframed":
        (tmp_path / key).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / key).write_bytes(b"garbage")
    elif planted == "not_json":
        store.put(key, b"{not json")
    else:  # well-formed, but its result is not what replaying its contributions gives
        base = agg.state
        fake = protocol.make_version(1, tree(7), protocol.zeros_like(LIKE))
        verdict = protocol.check_contribution(
            store, RUN, base, protocol.contrib_key(RUN, 0, "good"), LIKE
        )
        store.put(
            key,
            protocol.dumps(
                protocol.make_decision(RUN, base, fake, [verdict], [], "quorum", None, 1.0)
            ),
        )
    assert island.newer(store, RUN, 0, "eu-1") is None  # an island waits, it does not die
    stats = agg.run_round()
    assert stats["accepted"] == 1 and not stats["replayed"]
    aside = store.list(f"{RUN}/quarantine/")
    assert len(aside) == 1 and aside[0].startswith(f"{RUN}/quarantine/rounds.00000000.decision.")
    assert any(key in m and aside[0] in m for m in logged), logged
    assert protocol.verify_run(store, RUN, LIKE) == []


def test_a_planted_latest_is_moved_aside_and_rebuilt(started):
    store, clock, agg = started
    push(store, "good", 0, tree(20, 1e-2))
    agg.run_round()
    store.put(protocol.latest_key(RUN), b'{"version": 99}')
    assert island.newer(store, RUN, 1, "eu-1") is None
    again = make_aggregator(store, clock)
    assert not again.create(tree(1), {})
    assert again.load().version == 1 and again.state.hashes() == agg.state.hashes()
    assert protocol.read_latest(store, RUN)["version"] == 1
    assert len(store.list(f"{RUN}/quarantine/")) == 1


def test_empty_round_publishes_the_same_version(started):
    store, clock, agg = started
    stats = agg.run_round()
    assert (stats["reason"], stats["accepted"], stats["version"]) == ("deadline", 0, 1)
    v0, v1 = (protocol.pull_version(store, RUN, v, LIKE) for v in (0, 1))
    assert v0.hashes() == v1.hashes() and store.get(protocol.update_key(RUN, 0)) is None


class Crash(Exception):
    pass


@pytest.mark.parametrize("where", ["after_decision", "before_latest"])
def test_aggregator_restart_after_commit_finishes_the_round_once(started, tmp_path, where):
    store, clock, agg = started
    deltas = [tree(30 + i, 1e-2) for i in range(3)]
    for name, delta in zip("abc", deltas, strict=True):
        push(store, name, 0, delta)

    def crash(*args, **kwargs):
        raise Crash()

    if where == "after_decision":
        agg._publish = crash  # dies right after writing the decision
    else:
        real = protocol.advance_latest
        protocol.advance_latest = crash  # dies after the derived objects, before `latest`
    try:
        with pytest.raises(Crash):
            agg.run_round()
    finally:
        if where == "before_latest":
            protocol.advance_latest = real
    decision_bytes = store.get(protocol.decision_key(RUN, 0))
    assert decision_bytes is not None
    assert json.loads(store.get(protocol.latest_key(RUN)))["version"] == 0
    written = {}
    if where == "before_latest":
        written = {k: (tmp_path / k).read_bytes() for k in store.list(f"{RUN}/versions/00000001/")}
        assert len(written) == 3

    fresh = make_aggregator(store, clock)  # a new process: all state from the store
    assert fresh.load().version == 0
    stats = fresh.run_round()
    assert stats["replayed"] == 1 and stats["version"] == 1
    assert store.get(protocol.decision_key(RUN, 0)) == decision_bytes  # the commit stands
    for key, raw in written.items():
        assert (tmp_path / key).read_bytes() == raw  # recomputed: identical bytes
    # Applied exactly once: version 1 = version 0 + one outer step; version 2 continues.
    mean = jax.tree.map(
        lambda a, b, c: (a + b + c) / np.float32(3), *[decode(encode(d, SPEC)[0]) for d in deltas]
    )
    ref_params, _ = optax_rounds(tree(1), [decode(encode(mean, SPEC)[0])])
    assert bits_equal(protocol.pull_version(store, RUN, 1, LIKE).params, ref_params)
    assert fresh.load().version == 1
    assert fresh.run_round()["reason"] == "deadline"  # round 1: nothing was pushed
    assert protocol.verify_run(store, RUN, LIKE) == []


def test_island_follows_by_updates_and_detects_mismatch(started):
    store, _, agg = started
    agg.quorum = 1
    for r in range(3):
        push(store, "a", r, tree(40 + r, 1e-2))
        agg.run_round()
    held = protocol.pull_version(store, RUN, 0, LIKE)
    for _ in range(3):
        held = protocol.apply_update(store, RUN, held, SPEC, LR, MU, LIKE)
    assert held.hashes() == protocol.pull_version(store, RUN, 3, LIKE).hashes()
    drifted = protocol.make_version(1, tree(7), protocol.pull_version(store, RUN, 1, LIKE).momentum)
    with pytest.raises(protocol.ProtocolError, match="another base"):
        protocol.apply_update(store, RUN, drifted, SPEC, LR, MU, LIKE)


def test_jnp_params_are_accepted_like_numpy(started):
    store, _, agg = started
    agg.quorum = 1
    delta = jax.tree.map(jnp.asarray, tree(50, 1e-2))
    assert push(store, "a", 0, delta)[0]
    assert agg.run_round()["accepted"] == 1


def test_keep_versions_collects_old_full_versions(started):
    store, _, agg = started
    agg.keep_versions, agg.quorum = 2, 1
    held = protocol.pull_version(store, RUN, 0, LIKE)  # an island that falls behind
    for r in range(4):
        push(store, "a", r, tree(60 + r, 1e-2))
        agg.run_round()
    versions = {k.split("/")[2] for k in store.list(f"{RUN}/versions/")}
    assert versions == {"00000003", "00000004"}
    for _ in range(4):  # updates and decisions are kept: it can still follow
        held = protocol.apply_update(store, RUN, held, SPEC, LR, MU, LIKE)
    assert held.hashes() == protocol.pull_version(store, RUN, 4, LIKE).hashes()


# ------------------------------------------------------------------- processes on localhost

MODEL = [
    "--config=configs/tiny.py",
    "--config.model.d_model=32",
    "--config.model.n_layers=1",
    "--config.model.n_heads=2",
    "--config.model.n_kv_heads=1",
    "--config.model.mlp_dim=64",
    "--config.data.seq_len=32",
    "--config.train.global_batch_size=4",
    "--config.train.eval_batches=2",
    "--config.optim.warmup_steps=0",
    "--config.optim.lr=1e-2",
    "--config.diloco.inner_steps=3",
    "--config.diloco.compression=int8",
]
ROUNDS, QUORUM, TIMEOUT = 8, 2, 5


class Procs:
    """Subprocesses on one CPU device each, sharing a persistent compilation cache."""

    def __init__(self, tmp_path):
        self.tmp, self.procs = tmp_path, {}
        cache = tmp_path.parent / "jax_cache"  # session-wide
        self.env = subprocess_env(devices=1, compilation_cache=cache, PYTHONPATH=REPO)

    def start(self, name, module, *args):
        with open(self.tmp / f"{name}.log", "w") as log:  # the child keeps its own handle
            self.procs[name] = start_module(
                f"near_jax.diloco.{module}", *args, env=self.env, stdout=log, stderr=log
            )
        return self.procs[name]

    def log(self, name):
        return (self.tmp / f"{name}.log").read_text()

    def logs(self):
        return "\n".join(f"--- {n}\n{self.log(n)[-3000:]}" for n in self.procs)

    def wait_for(self, what, fn, timeout):
        deadline = time.monotonic() + timeout
        while not fn():
            dead = {n: p.returncode for n, p in self.procs.items() if p.poll() not in (None, -9)}
            if time.monotonic() > deadline or any(dead.values()):
                pytest.fail(f"timed out waiting for {what} ({dead})\n{self.logs()}")
            time.sleep(0.2)

    def kill_all(self):
        for p in self.procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()


def _latest(store):
    body = store.get(protocol.latest_key(RUN))
    return json.loads(body)["version"] if body else -1


def _records(path, split):
    """JSONL records of `split` (a line torn by SIGKILL is skipped)."""
    records = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return [x for x in records if x.get("split") == split]


def test_islands_and_aggregator_survive_kills(tmp_path):
    """3 islands + aggregator: b is SIGKILLed mid-round, c joins late, the aggregator is
    SIGKILLed mid-round and restarted; the run finishes, consistent and learning."""
    store_dir = tmp_path / "store"
    store_dir.mkdir()
    store = ObjectStore.open(str(store_dir))
    common = [f"--store=file://{store_dir}", f"--run={RUN}", "--poll_seconds=0.1", *MODEL]
    agg_args = [
        *common,
        f"--rounds={ROUNDS}",
        f"--quorum={QUORUM}",
        f"--round_timeout={TIMEOUT}",
        f"--workdir={tmp_path / 'agg'}",
    ]

    def island(name, *extra):
        return procs.start(
            name, "island", *common, f"--island={name}", f"--workdir={tmp_path / name}", *extra
        )

    procs = Procs(tmp_path)
    t0 = time.monotonic()
    phases = {}
    try:
        for name in "ab":  # compile first, then wait for the run
            island(name, "--wait_for_run=300")
        procs.wait_for(
            "islands a, b compiled", lambda: all("waiting up to" in procs.log(n) for n in "ab"), 150
        )
        phases["compiled"] = round(time.monotonic() - t0, 1)
        procs.start("agg1", "aggregator", *agg_args)
        procs.wait_for("version 2", lambda: _latest(store) >= 2, 90)
        procs.procs["b"].send_signal(signal.SIGKILL)  # mid-round: training or waiting
        b_killed_at = _latest(store)
        phases["v2"] = round(time.monotonic() - t0, 1)
        island("c")  # joins late: the run exists
        procs.wait_for("version 5", lambda: _latest(store) >= 5, 90)
        procs.procs["agg1"].send_signal(signal.SIGKILL)  # mid-round (collecting or publishing)
        procs.procs["agg1"].wait()
        agg_killed_at = _latest(store)
        phases["v5"] = round(time.monotonic() - t0, 1)
        restarted = procs.start("agg2", "aggregator", *agg_args)
        restarted.wait(timeout=120)
        phases["agg2 done"] = round(time.monotonic() - t0, 1)
        for name in "ac":
            procs.procs[name].wait(timeout=60)
    finally:
        procs.kill_all()
    elapsed = time.monotonic() - t0
    assert restarted.returncode == 0, procs.logs()
    assert procs.procs["a"].returncode == 0 and procs.procs["c"].returncode == 0, procs.logs()
    assert procs.procs["b"].returncode == -signal.SIGKILL

    # The run is complete and every version is exactly version 0 + its decisions, each
    # applied once (replayed from the store; every object read is validated).
    like = decode(Payload.from_bytes(store.get(protocol.version_key(RUN, 0, "params"))))
    assert _latest(store) == ROUNDS and store.exists(protocol.finished_key(RUN))
    assert protocol.verify_run(store, RUN, like) == []
    decisions = [json.loads(store.get(protocol.decision_key(RUN, r))) for r in range(ROUNDS)]
    applied = [{e["island"] for e in d["accepted"]} for d in decisions]
    assert all(not d["rejected"] for d in decisions)  # no partial or corrupt object was read
    assert any("b" in a for a in applied[:b_killed_at])
    assert not any("b" in a for a in applied[b_killed_at + 1 :])
    after_b = next(r for r in range(b_killed_at, ROUNDS) if "b" not in applied[r])
    assert decisions[after_b]["reason"] in ("deadline", "quorum") and applied[after_b] <= {"a", "c"}
    first_c = min(r for r, a in enumerate(applied) if "c" in a)
    assert first_c >= b_killed_at
    assert f"resumed at version {agg_killed_at} " in procs.log("agg2")  # that round: once
    # The aggregator logged each round at most once over both lives; eval loss fell.
    records = _records(tmp_path / "agg" / "metrics.jsonl", "aggregator")
    logged = [x["round"] for x in records if "round" in x]
    assert len(logged) == len(set(logged)) and set(logged) <= set(range(ROUNDS))
    v0_loss = next(x["eval_loss"] for x in records if x.get("version") == 0 and "round" not in x)
    last = max((x for x in records if "round" in x), key=lambda x: x["round"])
    assert last["version"] == ROUNDS and last["eval_loss"] < v0_loss - 0.5, records
    # Islands log what they moved: a full pull when joining, then updates only.
    a = _records(tmp_path / "a" / "metrics.jsonl", "island")
    assert a[0]["full_pull"] == 1 and all(x["full_pull"] == 0 for x in a[1:])
    assert all(x["bytes_pulled"] > 0 and x["inner_loss"] > 0 for x in a)
    # An island does not push into a round that closed first (e.g. the restarted aggregator
    # closing an overdue round at once): that round is late for it, and sends nothing.
    assert sum(x["accepted"] for x in a) >= ROUNDS - 2
    assert all(x["bytes_pushed"] > 0 or x["late"] for x in a), a
    c = _records(tmp_path / "c" / "metrics.jsonl", "island")
    assert c and c[0]["round"] >= b_killed_at and c[0]["full_pull"] == 1
    print(
        f"multi-process run: {elapsed:.1f}s; b killed at {b_killed_at}, aggregator at "
        f"{agg_killed_at}, c first applied in round {first_c}; phases {phases}"
    )


def test_cli_bad_input_is_one_line_and_exit_2(tmp_path):
    empty = tmp_path / "store"
    empty.mkdir()
    store, run = f"--store={empty}", f"--run={RUN}"
    afile = tmp_path / "afile"
    afile.write_text("x")
    cases = {
        "workdir file": (
            "aggregator",
            [store, run, "--rounds=2", f"--workdir={afile}"],
            "--workdir",
        ),
        "island workdir file": (
            "island",
            [store, run, "--island=a", f"--workdir={afile}"],
            "--workdir",
        ),
        "missing store": (
            "aggregator",
            [f"--store={tmp_path / 'nope'}", run, "--rounds=2"],
            "does not exist",
        ),
        "unknown run": ("island", [store, run, "--island=a"], "unknown run"),
        "bad quorum": ("aggregator", [store, run, "--rounds=2", "--quorum=0"], "--quorum"),
        "unknown flag": ("island", [store, run, "--island=a", "--bogus=1"], "bogus"),
        "bad island": ("island", [store, run, "--island=../x"], "bad island name"),
    }
    procs = Procs(tmp_path)
    try:
        for name, (module, args, _) in cases.items():
            procs.start(name.replace(" ", "_"), module, *MODEL, *args)
        for name, (_, _, message) in cases.items():
            proc = procs.procs[name.replace(" ", "_")]
            proc.wait(timeout=120)
            err = procs.log(name.replace(" ", "_")).strip()
            assert proc.returncode == 2 and message in err and len(err.splitlines()) == 1, err
        assert os.listdir(empty) == []  # nothing was created in the store
    finally:
        procs.kill_all()


def test_an_invalid_run_writes_nothing_to_the_store(tmp_path):
    store, clock = ObjectStore.open(str(tmp_path)), FakeClock()
    with pytest.raises(ValueError, match="outer lr is nan"):
        Aggregator(
            store, RUN, LIKE, spec=SPEC, lr=float("nan"), momentum=MU, quorum=1, round_timeout=1.0
        )
    agg = make_aggregator(store, clock)
    with pytest.raises(ValueError, match="cannot be created"):
        agg.create(tree(1), {"inner_steps": 3, "round_timeout": float("inf")})
    assert store.list("") == []
