"""An island's loop: join the run, then each round train H steps, push Δ, follow the run.

    train_island(cfg, mesh, store, run, "eu-1", manifest, rounds=0, poll_seconds=0.5)

Arguments are plain values; the program (`python -m near_jax.diloco.island`) reads them
from its flags. In a contributor run (a manifest with a `contrib` section) every push is
signed: the program passes `make_signer(manifest) -> sign(tag, payload bytes) -> fields`
and `slot_problem(store, key, signer, expect) -> str` (contrib's contributor module). The
loop raises `UsageError` for a run it cannot join, ProtocolError / StoreError when the store
cannot go on, FloatingPointError for a diverged inner loss.
"""

from __future__ import annotations

import hashlib
import math
import os
import time
from collections.abc import Callable

import jax
import numpy as np

from near_jax import data
from near_jax.diloco import claims, protocol
from near_jax.diloco.island.follow import Waiter, catch_up, kb, log, newer, now, tolerant
from near_jax.diloco.island.hosts import Hosts
from near_jax.diloco.protocol import ProtocolError
from near_jax.diloco.startup import UsageError, manifest_problem
from near_jax.diloco.store import ObjectStore
from near_jax.train import metrics
from near_jax.train.loop import trainer_for


def island_seed(seed: int, island: str, version: int) -> int:
    """The data seed of `island` joining at `version`: 31 bits of blake2b of all three."""
    digest = hashlib.blake2b(repr((int(seed), island, int(version))).encode(), digest_size=4)
    return int.from_bytes(digest.digest(), "little") & 0x7FFFFFFF


Signer = Callable[[dict, bytes], dict]


def train_island(
    cfg,
    mesh,
    store: ObjectStore,
    run: str,
    island: str,
    manifest: dict | None,
    *,
    claim: claims.Claim | None = None,
    rounds: int = 0,
    poll_seconds: float = 0.5,
    wait_timeout: float = 0.0,
    wait_for_run: float = 0.0,
    workdir: str | None = None,
    make_signer: Callable[[dict], Signer] | None = None,
    slot_problem: Callable[[ObjectStore, str, Signer, dict], str] | None = None,
) -> None:
    """Joins the run and trains rounds until `rounds` (0: no limit) or the run's end.

    `manifest` None: waits up to `wait_for_run` seconds for the run to be created. Polls
    every `poll_seconds`; waits at most `wait_timeout` seconds for a version (0: forever).
    """
    waiter = Waiter(poll_seconds, wait_timeout)
    trainer = trainer_for(cfg, mesh)
    abstract = trainer.abstract_state.params
    state = trainer.init(jax.random.key(cfg.seed))
    # Compile the step before joining, so the first round is not spent compiling.
    probe = data.make_iterator(
        cfg.data, split="val", seed=0, global_batch_size=cfg.train.global_batch_size
    )
    sample = data.to_global_batch(next(probe), trainer.batch_sharding)
    trainer.step.lower(trainer.abstract_state, sample).compile()
    del probe, sample

    if manifest is None:
        manifest = _wait_for_run(cfg, store, run, island, wait_for_run, poll_seconds)
    spec, lr, mu = manifest["compression"], manifest["outer_lr"], manifest["outer_momentum"]
    inner_steps = int(manifest["inner_steps"])
    plan = protocol.run_plan(manifest, abstract)
    hosts = Hosts(plan, trainer.state_shardings.params)
    lead = hosts.index == 0  # reads what decides the island's path, writes the manifest
    signer = None
    if "contrib" in manifest and lead:  # a run of untrusted contributors: sign every push
        if make_signer is None:
            raise UsageError(f"run {run!r} takes signed contributions only")
        signer = make_signer(manifest)
    cache_dir = os.path.join(workdir, "pull_cache", f"host{hosts.index}") if workdir else None
    cache = protocol.PullCache(cache_dir)
    latest = waiter.until("the run's first version", lambda: newer(store, run, -1, island))
    target = hosts.agree(latest["version"])
    held, _ = catch_up(
        store, run, island, None, target, plan, lr, mu, shards=hosts.held, cache=cache
    )
    seed = island_seed(cfg.seed, island, held.version)
    train_iter = data.make_iterator(
        cfg.data, split="train", seed=seed, global_batch_size=cfg.train.global_batch_size
    )
    where = f" | host {hosts.index}/{hosts.count}: {len(hosts.owned)} of {plan.num_shards} shards"
    log(
        island,
        f"joined run {run!r} at version {held.version} ({kb(store.bytes_read)} "
        f"pulled) | H={inner_steps} | spec {spec} | data seed {seed}"
        + (where if hosts.count > 1 else ""),
    )

    shardings, dtypes = trainer.state_shardings.params, jax.tree.map(lambda a: a.dtype, abstract)
    # Host 0's metrics are the island's; the others' (what each pushed and pulled) go below.
    where_metrics = workdir if lead or not workdir else os.path.join(workdir, f"host{hosts.index}")
    writer = metrics.MetricsWriter(where_metrics) if workdir else None
    error_feedback, done = None, 0
    pulled_mark, full_pending = 0, True  # the join pull counts toward the first round
    try:
        while True:
            finished = None
            if lead:
                finished = tolerant(
                    island, lambda: protocol.read_json(store, protocol.finished_key(run))
                )
            end = hosts.agree(finished["version"] if finished is not None else -1)
            if end >= 0 and held.version >= end:
                log(island, f"run {run!r} is finished at version {end}")
                return
            r = held.version
            # 1. inner steps from θ_r.
            t0 = now()
            state = state._replace(params=hosts.device_params(held.params, shardings, dtypes))
            losses = []
            for _ in range(inner_steps):
                batch = data.to_global_batch(next(train_iter), trainer.batch_sharding)
                state, stats = trainer.step(state, batch)
                losses.append(stats["loss"])
            inner_loss = float(np.mean([np.asarray(x.addressable_data(0)) for x in losses]))
            train_s = now() - t0
            if not math.isfinite(inner_loss):
                raise FloatingPointError(f"inner loss is {inner_loss} in round {r}")
            if claim is not None and claim.lost:
                raise ProtocolError(
                    f"island {claim.lost} took over the name {island!r}; "
                    "stopping so that only one island pushes under it"
                )
            # 2. push this host's shards of Δ = θ_r − θ_island (unless the round closed).
            hosts.gather_leaves(state.params)
            local = hosts.pieces(state.params, hosts.owned)
            delta = {
                s: [g - x for g, x in zip(held.params[s], local[s], strict=True)]
                for s in hosts.owned
            }
            decided = lead and tolerant(
                island, lambda r=r: store.exists(protocol.decision_key(run, r))
            )
            closed = hosts.agree(bool(decided))
            pushed_bytes, written, new_ef, note = 0, False, None, ""
            if closed:
                note = "round closed before the push (late; not sent)"
            else:
                written, pushed_bytes, new_ef, note = _push(
                    store,
                    (run, island, held, plan, hosts),
                    delta,
                    spec,
                    error_feedback,
                    (signer, slot_problem),
                    inner_loss=inner_loss,
                    inner_steps=inner_steps,
                )
            # 3. wait for version r + 1, learn the outcome, follow.
            t1 = now()
            latest = waiter.until(f"version {r + 1}", lambda r=r: newer(store, run, r, island))
            target = hosts.agree(latest["version"])
            wait_s = now() - t1
            if target <= r:  # the run finished at version r meanwhile
                log(island, f"run {run!r} finished at version {r}; round {r} was not applied")
                return
            key = protocol.decision_key(run, r)
            decision = tolerant(island, lambda key=key: protocol.read_json(store, key)) or {}
            accepted, late, outcome, scored = _outcome(decision, island, written)
            # Host 0's reading of the decision for all: every host's residual moves together.
            if hosts.agree(accepted and written):
                error_feedback = new_ef  # else Δ was not applied: the old residual still owed
            held, full = catch_up(
                store, run, island, held, target, plan, lr, mu, shards=hosts.held, cache=cache
            )
            pulled = store.bytes_read - pulled_mark
            pulled_mark = store.bytes_read
            full, full_pending = full or full_pending, False
            stats = {
                "round": r,
                "version": held.version,
                "inner_loss": inner_loss,
                "bytes_pushed": pushed_bytes,
                "bytes_pulled": pulled,
                "full_pull": int(full),
                "wait_s": wait_s,
                "train_s": train_s,
                "accepted": int(accepted),
                "late": int(late),
            }
            stats.update(scored)
            if writer:
                writer.write(r, stats, "island")
            log(
                island,
                f"round {r} | loss {inner_loss:.4f} | pushed {kb(pushed_bytes)} | "
                f"pulled {kb(pulled)}{' (full)' if full else ''} | train {train_s:.2f}s"
                f" | wait {wait_s:.2f}s | {outcome}{'; ' + note if note else ''} -> "
                f"version {held.version}",
            )
            done += 1
            if rounds and done >= rounds:
                log(island, f"done: {done} rounds")
                return
    finally:
        if writer:
            writer.close()


def _wait_for_run(
    cfg, store: ObjectStore, run: str, island: str, wait_for_run: float, poll_seconds: float
) -> dict:
    """The run's manifest once it is created, within `wait_for_run` seconds; UsageError if
    it is not, or if the run's model and data settings are not the config's."""
    log(island, f"waiting up to {wait_for_run:g}s for run {run!r} to be created")
    deadline = now() + wait_for_run
    manifest = None
    while manifest is None and now() < deadline:
        time.sleep(poll_seconds)
        manifest = protocol.read_json(store, protocol.manifest_key(run))
    if manifest is None:
        raise UsageError(f"unknown run {run!r} in {store.url}: no {protocol.manifest_key(run)}")
    problem = manifest_problem(manifest, cfg)
    if problem:
        raise UsageError(problem)
    return manifest


def _outcome(decision: dict, island: str, written: bool) -> tuple[bool, bool, str, dict]:
    """(accepted, late, the log's outcome text, score and reward if scored) of this
    island's push in a round's decision ({} while the decision is unreadable)."""
    accepted = any(e["island"] == island for e in decision.get("accepted", []))
    rejected = [e["reason"] for e in decision.get("rejected", []) if e["island"] == island]
    late = not accepted and not rejected  # not in the decision: it came too late
    outcome = "accepted" if accepted else f"rejected: {rejected[0]}" if rejected else "late"
    if not written and (accepted or rejected):  # the verdict is on the slot's object
        outcome = f"this push was NOT stored; the object already in our slot was {outcome}"
    mine = [
        e
        for e in decision.get("contrib", {}).get("entries", [])
        if e["contributor"] == island and e["key_id"]
    ]  # signed by us
    scored = {}
    if mine and mine[0]["score"] is not None:
        outcome += f" (score {mine[0]['score']:.4g}, reward {mine[0]['reward']:.3f})"
        scored = {"score": mine[0]["score"], "reward": mine[0]["reward"]}
    return accepted, late, outcome, scored


def _push(
    store: ObjectStore,
    where: tuple,
    delta: protocol.Shards,
    spec: str,
    error_feedback: protocol.Shards | None,
    signing: tuple,
    **extra,
) -> tuple[bool, int, protocol.Shards | None, str]:
    """Every host pushes its shards, host 0 the manifest once all are in; (written, bytes
    this host wrote, new error feedback of its shards, a note for the log). `where` is
    (run, island, base version, plan, hosts), `signing` (signer, slot_problem)."""
    run, island, held, plan, hosts = where
    signer, slot_problem = signing
    lead, r = hosts.index == 0, held.version
    key = protocol.contrib_key(run, r, island)
    taken = hosts.agree(lead and store.exists(key))
    written, manifest_bytes, note = False, 0, ""
    entries, shard_bytes, new_ef = {}, 0, None
    if not taken:  # else pushed before a restart: the stored shards stay as it names them
        entries, shard_bytes, new_ef = protocol.push_shards(
            store, run, r, island, plan, delta, spec, error_feedback
        )
        entries = hosts.gather_entries(entries)
        if lead:
            written, manifest_bytes = protocol.push_manifest(
                store, run, island, held, plan, spec, entries, signer, **extra
            )
        written = bool(hosts.agree(written))
    if not written:
        note = (
            "our slot already held a contribution (pushed before a restart, or by another "
            "island under this name)"
        )
        if lead and signer is not None and slot_problem is not None:
            expect = {"run": run, "round": r, "base_sha256": held.params_sha256}
            problem = slot_problem(store, key, signer, expect)
            if problem:
                note = (
                    f"WARNING: our slot for round {r} already holds an object and "
                    f"{problem}: someone else wrote under our name"
                )
    return written, (shard_bytes + manifest_bytes) if written else 0, new_ef, note
